"""No module of the package grows past 500 lines (issue #27): a module that
long holds more than one job and is split by job, not cut in half."""

from pathlib import Path

import qsmprep

MAX_LINES = 500
PACKAGE = Path(qsmprep.__file__).resolve().parent

#: modules still over the limit, each with the work that brings it under;
#: an entry that is no longer needed fails the test, so none outlives its reason
OVER_LIMIT: dict = {}


def _line_counts():
    return {path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines())
            for path in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_exceeds_500_lines():
    counts = _line_counts()
    assert len(counts) > 50 and "bids/discover.py" in counts  # the package, not a stray copy
    too_long = {name: n for name, n in counts.items()
                if n > MAX_LINES and name not in OVER_LIMIT}
    assert not too_long, (f"modules over {MAX_LINES} lines: {too_long}; split each by job "
                          "(see docs/architecture.md)")
    stale = {name: counts.get(name) for name in OVER_LIMIT
             if counts.get(name, 0) <= MAX_LINES}
    assert not stale, f"remove these from OVER_LIMIT, they are within the limit now: {stale}"
