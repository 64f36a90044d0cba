"""What a run leaves for its report: step timings and the warnings it raised.

Warnings are recorded, one per line, by a logging handler attached to the
``qsmprep`` logger for the whole run (Nipype's MultiProc workers are forked
from the main process and inherit it). Step timings come from the result
files Nipype writes into the work folder, so steps reused from the cache
keep the time they took when they ran.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path


def record_warnings(path, logger_name="qsmprep"):
    """Append every WARNING (or worse) of ``logger_name`` to ``path``, one per
    line; returns the handler (remove it with ``logger.removeHandler``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_OneLine())
    logging.getLogger(logger_name).addHandler(handler)
    return handler


@contextmanager
def logged_warnings(logger_name="qsmprep"):
    """The WARNING (or worse) messages ``logger_name`` logs inside the block,
    as a list filled while it runs (one line each): what a step adds to its
    output's sidecar."""
    messages = []

    class _Collect(logging.Handler):
        def emit(self, record):
            messages.append(self.format(record))

    handler = _Collect(logging.WARNING)
    handler.setFormatter(_OneLine("%(message)s"))
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


class _OneLine(logging.Formatter):
    def format(self, record):
        return " ".join(super().format(record).split())


def subject_warnings(path, subject):
    """The recorded warnings that name ``sub-<subject>`` (messages name the
    file they are about), without repeats, in the order they were raised."""
    path = Path(path)
    if not path.is_file():
        return []
    tag = f"sub-{subject}"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return list(dict.fromkeys(line for line in lines if tag in line))


def step_timings(workflow_dir, since=None):
    """``({node: seconds}, [nodes reused from the cache])`` of one run's workflow folder.

    ``workflow_dir`` is the run's folder in the work directory (e.g.
    ``work/qsmprep_wf/sub_01_wf/qsm_MEGRE_wf``); a node counts as reused when
    its result file is older than ``since`` (a POSIX time).
    """
    from nipype.utils.filemanip import loadpkl

    timings, reused = {}, []
    for result in sorted(Path(workflow_dir).glob("*/result_*.pklz")):
        node = result.parent.name
        try:
            runtime = loadpkl(result).runtime
            duration = float(getattr(runtime, "duration", None))
        except Exception:  # an unreadable or odd result file: no timing for it
            continue
        timings[node] = round(duration, 2)
        if since is not None and result.stat().st_mtime < since:
            reused.append(node)
    return timings, reused
