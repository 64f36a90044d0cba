"""Time of the group level (``qsmprep bids out group``) on 500 synthetic runs.

``qsmprep.sim.group_outputs`` writes 500 runs (Chimap, mask, regional
statistics of 7 regions) with Chimaps of ``--shape`` voxels (default
80x96x80, a 2 mm head; the brain a quarter of the field of view). The table
gives the median over ``--repeats`` of the whole group level (tables,
metadata, report) from scratch ("cold": every thumbnail drawn) and again with
the thumbnails cached ("warm"), with ``--nprocs`` processes for the
thumbnails. The target is under a minute for 500 runs.

Usage: ``python benchmarks/group_report.py [--runs 500] [--repeats 3] [--nprocs 2]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, hardware, hardware_note, markdown_table, publish  # noqa: E402

SECTION = "group_report"


def main(argv=None):
    from qsmprep.sim.group_outputs import write_synthetic_outputs
    from qsmprep.workflows.group import write_group_outputs

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--shape", type=int, nargs=3, default=(80, 96, 80))
    args = ap.parse_args(argv)
    info = hardware()
    cold, warm = [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        write_synthetic_outputs(out, args.runs, shape=tuple(args.shape))
        for i in range(args.repeats):
            shutil.rmtree(out / "group", ignore_errors=True)
            t0 = time.perf_counter()
            write_group_outputs(out, nprocs=args.nprocs)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            write_group_outputs(out, nprocs=args.nprocs)
            warm.append(time.perf_counter() - t0)
            print(f"repeat {i + 1}: cold {cold[-1]:.1f} s, warm {warm[-1]:.1f} s", flush=True)
    rows = [[args.runs, "x".join(map(str, args.shape)), args.nprocs, args.repeats,
             fmt(statistics.median(cold)), fmt(statistics.median(warm))]]
    body = (
        "## Group level on 500 runs (synthetic outputs, CPU)\n\n"
        "`python benchmarks/group_report.py`: `qsmprep bids out group` (runs table, "
        "`qsmprep_regions.tsv`, `qsmprep_processing.json`, `qsmprep_group.html`) on synthetic "
        "participant outputs (`qsmprep.sim.group_outputs`), median of "
        f"{args.repeats} runs. Cold: from scratch, every χ thumbnail drawn; warm: thumbnails "
        "cached. Most of the time goes to the runs table (`qsmprep_runs.tsv`), which reads "
        "every Chimap and brain mask in full for its whole-mask mean; the thumbnails read one "
        "slice. Target: under 60 s.\n\n"
        + markdown_table(["runs", "Chimap grid", "processes", "repeats", "cold (s)",
                          "warm (s)"], rows)
        + "\n" + hardware_note(info) + "\n")
    publish(SECTION, body, {"hardware": info, "cold_s": cold, "warm_s": warm,
                            "runs": args.runs, "shape": list(args.shape),
                            "nprocs": args.nprocs})
    print(body)


if __name__ == "__main__":
    main()
