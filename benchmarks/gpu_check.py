#!/usr/bin/env python
"""What a lent GPU is for (issues #22 and #26), as one short run.

1. The default pipeline, raw multi-echo phase → χ, stage by stage as the app
   runs it (``accuracy.pipeline``), on a 1 mm whole head, with the CPU limited
   to ``--threads`` threads (2: the issues' "2 cores") and the stages that take
   a device on ``--device``. A warm-up run on the 2 mm version of the head
   comes first (numba compilation, CUDA start-up), untimed.
2. DM-QSM's dipole inversion of that head's true local field in its true
   mask, with the shipped default steps (``--dmqsm-steps`` to change).

The head is the accuracy benchmark's first case (``challenge-3T``:
Challenge 2.0 anatomy from ``qsmprep.sim``, 3 T, 4 echoes, cropped to the
brain plus 12 mm). It is made by our own generator, so this script only
times: nothing it measures may choose a default (docs/benchmarks.md, the
selection rule). χ is scored against the head's truth (NRMSE, %) so that a
device run can be checked against the same script's CPU run: the maps must
agree to float32 rounding of the FFTs.

Writes ``gpu_check_<device>.json`` into ``--out`` (default
``benchmarks/results``). ``--publish`` renders the ``gpu_check`` section of
docs/benchmarks.md from the JSON files in ``benchmarks/results``.

The GPU machine has torch, numpy, scipy, numba and pytest but neither nibabel
(the simulator reads its head with it) nor tomli_w (``qsmprep.config``):
carry their wheels in ``.whl/`` (ignored by git; ``pip download nibabel
tomli_w --no-deps -d .whl``), as the device tool's ``carry`` ([".whl"]).
On the device (on an H200 on 2026-12-04: 70 s, and 18 s for the CUDA tests,
after about a minute of the machine's start)::

    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
    python3 benchmarks/gpu_check.py --device cuda --out $OUT > $OUT/gpu_check.log 2>&1
    python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_tfi.py \
        tests/test_dmqsm.py tests/test_inversion.py tests/test_dl.py > $OUT/pytest.log 2>&1

then, here: copy ``gpu_check_cuda.json`` into ``benchmarks/results`` and run
``python benchmarks/gpu_check.py --publish``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

SECTION = "gpu_check"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="torch device of the stages that take one")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch, numba, BLAS)")
    p.add_argument("--voxel", type=float, default=1.0, help="voxel size (mm) of the timed head")
    p.add_argument("--repeats", type=int, default=2, help="timed pipeline runs (median)")
    p.add_argument("--dmqsm-steps", type=int, help="DM-QSM steps (default: the shipped ones)")
    p.add_argument("--skip-dmqsm", action="store_true")
    p.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                   help="run the pipeline once on the 2 mm head first, untimed")
    p.add_argument("--out", type=Path, help="folder of the JSON (default benchmarks/results)")
    p.add_argument("--publish", action="store_true",
                   help="only render the docs section from the gpu_check_*.json files in "
                        "--out")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.publish:
        return publish_section(args.out)
    # thread limits before numpy, torch and numba start their pools
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch

    from _common import RESULTS, hardware, write_json
    from accuracy import build_case, case_specs, pipeline
    from qsmprep.config import DEFAULT_METHODS
    from qsmprep.dl import dmqsm
    from qsmprep.qsm import metrics

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")

    def measured(func, *args, **kwargs):
        """``(func(...), wall s, peak GPU memory GB or None)``, the device synchronised."""
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = func(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        return out, wall, torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    name, _, builder, spec = case_specs(quick=False)[0]

    def head(voxel):
        start = time.perf_counter()
        case = build_case(name, "", builder, **{**spec, "voxel_size_mm": voxel})
        print(f"[gpu_check] {voxel:g} mm head {case.mask.shape} built in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        return case

    methods = dict(DEFAULT_METHODS)
    if args.warm_up:
        pipeline(head(2.0), methods, device=args.device)
    case = head(args.voxel)
    runs = []
    for _ in range(max(1, args.repeats)):
        times = {}
        chi, wall, peak = measured(pipeline, case, methods, device=args.device, times=times)
        runs.append({"wall_s": wall, "stages_s": times,
                     "nrmse": metrics.nrmse(chi, case.chi, case.mask), "gpu_peak_gb": peak})
        print(f"[gpu_check] pipeline {runs[-1]['wall_s']:.1f} s", flush=True)
    result = {
        "device": args.device, "threads": args.threads, "head": name,
        "voxel_size_mm": args.voxel, "grid": list(case.mask.shape),
        "brain_voxels": int(case.mask.sum()), "methods": methods,
        "pipeline_wall_s": statistics.median(r["wall_s"] for r in runs), "pipeline_runs": runs,
        "gpu": torch.cuda.get_device_name() if cuda else None, "hardware": hardware(),
    }
    if not args.skip_dmqsm:
        options = {} if args.dmqsm_steps is None else {"steps": args.dmqsm_steps}
        chi, wall, peak = measured(dmqsm.invert, case.local_field, case.mask,
                                   case.voxel_size_mm, case.b0_dir, device=args.device,
                                   **options)
        result["dmqsm"] = {"wall_s": wall, "steps": options.get("steps", dmqsm.SAMPLING["steps"]),
                           "nrmse": metrics.nrmse(chi, case.chi, case.mask), "gpu_peak_gb": peak}
        print(f"[gpu_check] DM-QSM {result['dmqsm']['wall_s']:.1f} s", flush=True)
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"gpu_check_{args.device.split(':')[0]}.json", result)
    return 0


def publish_section(results=None, docs=None):
    """The ``gpu_check`` section of ``docs`` (docs/benchmarks.md) from the JSON
    files in ``results`` (benchmarks/results)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import DOCS, RESULTS, fmt, hardware_note, markdown_table, replace_section

    results = Path(results or RESULTS)
    found = {p.stem.split("_")[-1]: json.loads(p.read_text())
             for p in sorted(results.glob("gpu_check_*.json"))}
    if not found:
        raise SystemExit(f"no {results}/gpu_check_*.json to publish")
    stages = list(next(iter(found.values()))["pipeline_runs"][0]["stages_s"])
    rows = []
    for dev, r in found.items():
        per_stage = {s: statistics.median(run["stages_s"][s] for run in r["pipeline_runs"])
                     for s in stages}
        d = r.get("dmqsm") or {}
        rows.append([dev + (f" ({r['gpu']})" if r.get("gpu") else ""), r["threads"],
                     fmt(r["pipeline_wall_s"]), *[fmt(per_stage[s]) for s in stages],
                     fmt(r["pipeline_runs"][0]["nrmse"]),
                     fmt(d.get("wall_s")), fmt(d.get("nrmse")),
                     fmt(r["pipeline_runs"][0].get("gpu_peak_gb"), 2)])
    first = next(iter(found.values()))
    body = (
        "## Default pipeline and DM-QSM on a device (1 mm whole head)\n\n"
        "Generated by `python benchmarks/gpu_check.py --device DEVICE` (one JSON per device "
        "in `benchmarks/results`, then `--publish`). The head is the accuracy benchmark's "
        f"`{first['head']}` at {first['voxel_size_mm']:g} mm (grid "
        f"{' × '.join(map(str, first['grid']))}, "
        f"{first['brain_voxels'] / 1e6:.2f} M brain voxels; "
        "our own generator, so these rows time and choose nothing). Pipeline: median of "
        "the timed runs after an untimed warm-up on the 2 mm head, the CPU limited to the "
        "threads shown; DM-QSM: its inversion of the true local field, shipped default "
        "steps, one run. NRMSE (%) against the head's truth checks that a device run "
        "gives the CPU's map.\n\n"
        + markdown_table(["device", "CPU threads", "pipeline (s)", *stages, "χ NRMSE",
                          "DM-QSM (s)", "DM-QSM NRMSE", "GPU peak (GB)"], rows)
        + "\n" + "\n".join(f"{dev}: {hardware_note(r['hardware'])}"
                           + (f" Note: {r['note']}." if r.get("note") else "")
                           for dev, r in found.items())
        + "\n")
    replace_section(docs or DOCS, SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
