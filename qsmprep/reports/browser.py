"""Open a report in headless Chromium: figure-load check, console messages, screenshot.

Used by the tests and to make the screenshot in docs/. Needs a Chromium
binary (Debian: ``apt-get install -y chromium chromium-driver``); no Python
browser driver is required.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run",
          "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000")


def find_chromium():
    """Path of a Chromium/Chrome executable, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def _run(page, *args, timeout=120):
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("Chromium not found; install it with "
                                "`apt-get install -y chromium chromium-driver`")
    with tempfile.TemporaryDirectory(prefix="qsmprep-chromium-") as profile:
        return subprocess.run([exe, *_FLAGS, f"--user-data-dir={profile}", *args,
                               Path(page).absolute().as_uri()],
                              capture_output=True, text=True, timeout=timeout, check=True)


def check_report(page):
    """Load ``page`` and report what a reader would see.

    Returns a dict: ``figures_total`` and ``figures_loaded`` (counted by the
    report's own self-check script once the page has loaded), ``console``
    (console messages and uncaught errors), ``text`` (visible text, spaces
    collapsed) and ``dom`` (the serialized DOM).
    """
    res = _run(page, "--dump-dom")
    dom = res.stdout

    def attr(name):
        m = re.search(rf'data-{name}="(\d+)"', dom)
        return int(m.group(1)) if m else None

    body = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return {
        "figures_total": attr("figures-total"),
        "figures_loaded": attr("figures-loaded"),
        "console": [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln],
        "text": re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body)),
        "dom": dom,
    }


def screenshot(page, out_png, *, width=1280, height=4000):
    """Save a PNG screenshot of ``page`` (``width`` x ``height`` CSS pixels)."""
    _run(page, f"--screenshot={Path(out_png).absolute()}", f"--window-size={width},{height}",
         "--hide-scrollbars")
    return Path(out_png)
