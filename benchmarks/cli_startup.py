"""Start-up time of the ``qsmprep`` command: ``--help`` and ``--version``, and of the
import of the outputs' sink (``qsmprep.interfaces.bids``), which every run pays.

Each command runs as a fresh subprocess (what a user waits for), ``--repeats``
times after one warm-up (file cache), the commands interleaved so that load
from other jobs spreads over all of them; the table gives the median, min and
max wall time and the median above ``python -c pass`` of the same
interpreter, measured in the same loop. It also records which heavy
libraries ``--help`` loads (none of torch, numba, antspyx, nipype is the
aim: the method registry is a static table, ``qsmprep/data/methods.toml``),
and, for scale, what importing torch or numba alone costs. Target: ``--help``
under 1 s.

The command is the ``qsmprep`` console script beside this interpreter, run
with this checkout first on ``PYTHONPATH``, or, without the script, its entry
point ``qsmprep.cli.run:main``.

Writes the ``cli_startup`` section of docs/benchmarks.md and
``benchmarks/results/cli_startup.json``.

Usage: ``python benchmarks/cli_startup.py [--repeats 15] [--before CHECKOUT] [--no-write]``;
``--from-json FILE`` re-renders the docs section from saved results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, fmt, hardware, hardware_note, markdown_table, publish  # noqa: E402

SECTION = "cli_startup"
TARGET_S = 1.0
HEAVY = ("torch", "numba", "ants", "nipype", "scipy", "nibabel", "numpy")
ENTRY = "import sys; from qsmprep.cli.run import main; sys.exit(main())"


def _env(root=ROOT):
    paths = [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _commit(root):
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"


def qsmprep_command():
    """``[argv...]`` running the ``qsmprep`` command of this checkout."""
    script = Path(sys.executable).parent / "qsmprep"
    return [str(script)] if script.is_file() else [sys.executable, "-c", ENTRY]


def commands(before=None):
    """Label -> (argv, env) of every command timed (the baseline first); with
    ``before`` (another checkout) its ``qsmprep --help`` too."""
    qsmprep, env = qsmprep_command(), _env()
    out = {
        "python -c pass": ([sys.executable, "-c", "pass"], env),
        "qsmprep --help": ([*qsmprep, "--help"], env),
        "qsmprep --version": ([*qsmprep, "--version"], env),
    }
    sink = [sys.executable, "-P", "-c", "import qsmprep.interfaces.bids"]  # -P: PYTHONPATH first
    out["python -P -c 'import qsmprep.interfaces.bids' (the outputs' sink)"] = (sink, env)
    if before:
        out[f"qsmprep --help before (checkout at {_commit(before)})"] = (
            [*qsmprep, "--help"], _env(before))
        out[f"python -P -c 'import qsmprep.interfaces.bids' before (checkout at "
            f"{_commit(before)})"] = (sink, _env(before))
    out["python -c 'import niworkflows.interfaces.bids' (for scale)"] = (
        [sys.executable, "-c", "import niworkflows.interfaces.bids"], env)
    out["python -c 'import numba' (for scale)"] = ([sys.executable, "-c", "import numba"], env)
    out["python -c 'import torch' (for scale)"] = ([sys.executable, "-c", "import torch"], env)
    return out


def wall_time(argv, env):
    """Wall-clock seconds of one run of ``argv``; an error if it fails."""
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def heavy_modules(flag, env):
    """The libraries of :data:`HEAVY` in ``sys.modules`` after ``qsmprep flag``."""
    code = ("import contextlib, io, json, sys\nfrom qsmprep.cli.run import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main([sys.argv[1]])\n    except SystemExit:\n        pass\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code, flag], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(repeats, before=None):
    cmds = commands(before)
    times = {label: [] for label in cmds}
    for argv, env in cmds.values():  # warm-up: file cache, .pyc files
        wall_time(argv, env)
    for _ in range(repeats):
        for label, (argv, env) in cmds.items():
            times[label].append(wall_time(argv, env))
    base = statistics.median(times["python -c pass"])
    rows = [{"command": label, "median_s": statistics.median(t), "min_s": min(t),
             "max_s": max(t), "above_python_s": statistics.median(t) - base, "runs": len(t)}
            for label, t in times.items()]
    loads = {flag: heavy_modules(flag, _env()) for flag in ("--help", "--version")}
    return {"hardware": hardware(), "repeats": repeats, "target_s": TARGET_S,
            "command": qsmprep_command()[0], "rows": rows, "loads": loads}


def render(results):
    """The Markdown of the section from a results dict (see :func:`measure`)."""
    rows = [[r["command"], fmt(r["median_s"], 2), fmt(r["min_s"], 2), fmt(r["max_s"], 2),
             fmt(r["above_python_s"], 2)] for r in results["rows"]]
    help_row = next(r for r in results["rows"] if r["command"] == "qsmprep --help")
    verdict = "met" if help_row["median_s"] < results["target_s"] else "**not met**"
    loads = "; ".join(f"`{flag}`: {', '.join(mods) if mods else 'none of them'}"
                      for flag, mods in results["loads"].items())
    return "\n".join([
        "## Command-line start-up time",
        "",
        f"Generated by `benchmarks/cli_startup.py`. Each command in a fresh process, "
        f"{results['repeats']} runs after a warm-up, interleaved; wall time in seconds. "
        f"`qsmprep` is the console script of the venv with this checkout first on "
        f"`PYTHONPATH`. Target for `--help`: under {results['target_s']:g} s ({verdict}). "
        f"Libraries among {', '.join(HEAVY)} loaded by {loads}. The method choices and "
        f"defaults shown by `--help` come from the static registry table "
        f"(`qsmprep/data/methods.toml`, defaults read from the functions' source), so no "
        f"method module is imported; before that table, `--help` imported every method "
        f"module, torch and numba included (6.88 s for `--help` at e988b50, before issue 27, "
        f"in this section's run of that time). The `before` rows time the checkout named in "
        f"them. Every run that writes outputs imports the sink "
        f"(`qsmprep.interfaces.bids`, niworkflows' `DerivativesDataSink`); niworkflows lists "
        f"TemplateFlow's templates when it is imported, and templateflow indexes every file "
        f"of its home for that; since 2026-12-06 qsmprep gives it the list from the home's "
        f"`tpl-*` folders (the same list: tests/test_workflow.py); the `before` row of the "
        f"sink is the commit before that change.",
        "",
        markdown_table(["command", "median (s)", "min (s)", "max (s)",
                        "median above `python -c pass` (s)"], rows),
        hardware_note(results["hardware"]),
    ])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--before", type=Path, metavar="CHECKOUT",
                    help="also time the --help of another checkout (e.g. one before issue 27)")
    ap.add_argument("--from-json", type=Path, metavar="FILE",
                    help="only re-render the docs section from saved results")
    ap.add_argument("--no-write", action="store_true",
                    help="print the section; write neither docs nor results")
    args = ap.parse_args()
    if args.from_json:
        from _common import DOCS, replace_section

        replace_section(DOCS, SECTION, render(json.loads(args.from_json.read_text())))
        return
    results = measure(args.repeats, args.before)
    body = render(results)
    print(body)
    if not args.no_write:
        publish(SECTION, body, results)


if __name__ == "__main__":
    main()
