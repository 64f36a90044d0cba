#!/usr/bin/env python
"""Wall time and peak memory of every classical method on a 1 mm whole head.

The unseen-anatomy phantom (MNI head, 1 mm, cropped to 160x192x160 around
the brain, as in ``dl_speed.py``) is simulated once: a 4-echo 3 T
acquisition (SNR 100), unwrapped with ROMEO for the echo-combination inputs,
plus the true total field, local field and brain mask. Then each method of
the stages ``echo_combination``, ``masking``, ``bf_removal`` and
``inversion`` (the deep-learning ones are in ``dl_speed.py``) runs in its
own fresh Python process, so that the peak resident memory of that process
(``VmHWM``: Python, numpy/torch and the inputs included) belongs to that
method alone. In the child: a warm-up call on a 32³ crop (numba/torch
initialisation), then ``--repeats`` calls on the whole head; the table gives
the median wall time, the CPU time of the median call (all threads) and the
peak RSS. The baseline row is a child that only loads the inputs.

Targets (issue #5): each method < 30 s, MEDI and PDF < 120 s, peak memory
< 4 GB on 2 cores.

Writes the ``classical_speed`` section of docs/benchmarks.md and
benchmarks/results/classical_speed.json.

Usage: ``python benchmarks/classical_speed.py [--repeats 3] [--methods tv pdf]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    WHOLE_HEAD_SHAPE as SHAPE, fmt, hardware, hardware_note, markdown_table, proc_status_gb,
    publish, unseen_head,
)

SECTION = "classical_speed"
STAGES = ("echo_combination", "masking", "bf_removal", "inversion")
TIME_TARGET_S = {"medi": 120.0, "pdf": 120.0}
DEFAULT_TIME_TARGET_S = 30.0
MEMORY_TARGET_GB = 4.0
ECHO_TIMES_S = (0.004, 0.012, 0.020, 0.028)


def make_inputs(path):
    """Simulate the phantom and save every stage's inputs to ``path`` (npz)."""
    from qsmprep.qsm.romeo import romeo_unwrap
    from qsmprep.qsm.unwrap import mcpc3ds
    from qsmprep.sim import acquisition

    head, total, local = unseen_head(SHAPE)
    vox = head.voxel_size_mm
    acq = acquisition.simulate_acquisition(head, ECHO_TIMES_S, 3.0, snr=100.0, rng=1)
    phase, _ = mcpc3ds(acq.phase, acq.magnitude, ECHO_TIMES_S, voxel_size_mm=vox)
    unwrapped, quality = romeo_unwrap(phase, magnitude=acq.magnitude, echo_times_s=ECHO_TIMES_S)
    np.savez(path, magnitude=acq.magnitude, unwrapped=unwrapped, quality=quality,
             total=total, local=local, mask=head.brain_mask, voxel_size=np.asarray(vox))


def _call(stage, name, d, box=(slice(None),) * 3):
    """One call of a registered method on the (cropped) inputs ``d``."""
    from qsmprep.qsm import registry

    vox = tuple(float(v) for v in d["voxel_size"])
    mag = d["magnitude"][box]
    if stage == "echo_combination":
        return registry.run(stage, name, d["unwrapped"][box], mag, ECHO_TIMES_S)
    if stage == "masking":
        rss = np.sqrt(np.sum(mag**2, axis=-1))
        return registry.run(stage, name, rss, quality=d["quality"][box], voxel_size_mm=vox)
    b0 = {"b0_dir": (0.0, 0.0, 1.0)}  # the phantom's B0 (unseen_head: third voxel axis)
    if stage == "bf_removal":
        return registry.run(stage, name, d["total"][box], d["mask"][box], vox, **b0)
    kwargs = {"magnitude": mag} if name == "medi" else {}
    return registry.run(stage, name, d["local"][box], d["mask"][box], vox, **b0, **kwargs)


def child(stage, name, inputs, repeats):
    """Run in a fresh process: warm-up on a crop, then time ``repeats`` calls;
    print one JSON line."""
    d = dict(np.load(inputs))
    result = {"stage": stage, "method": name}
    if stage != "baseline":
        small = tuple(slice(n // 2 - 16, n // 2 + 16) for n in SHAPE)
        _call(stage, name, d, small)
        walls, cpus = [], []
        for _ in range(repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            _call(stage, name, d)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        i = sorted(range(repeats), key=walls.__getitem__)[repeats // 2]
        result.update(wall_s=walls[i], cpu_s=cpus[i], walls_s=walls)
    result["peak_rss_gb"] = peak_rss_gb()
    print(json.dumps(result))


def peak_rss_gb():
    """Peak resident memory of this process (GB): ``VmHWM``
    (:func:`_common.proc_status_gb`), else ``ru_maxrss``."""
    peak = proc_status_gb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def classical_methods(selected=None):
    """(stage, name) of every registered method not implemented in qsmprep.dl."""
    from qsmprep.qsm import registry

    out = []
    for stage in STAGES:
        for name in registry.names(stage):
            if registry.get(stage, name).module.startswith("qsmprep.dl"):
                continue
            if selected and name not in selected:
                continue
            out.append((stage, name))
    return out


def time_target_s(method):
    """Wall-time target (s) of a method on the 1 mm head."""
    return TIME_TARGET_S.get(method, DEFAULT_TIME_TARGET_S)


def verdict(row):
    """("met" or "missed ...") for the time and the memory target of a row."""
    target = time_target_s(row["method"])
    t = "met" if row["wall_s"] < target else f"missed ({row['wall_s'] - target:+.0f} s)"
    m = "met" if row["peak_rss_gb"] < MEMORY_TARGET_GB else "missed"
    return t, m


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", nargs="+", help="only these method names")
    p.add_argument("--child", nargs=4, metavar=("STAGE", "NAME", "INPUTS", "REPEATS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        stage, name, inputs, repeats = args.child
        child(stage, name, inputs, int(repeats))
        return 0

    info = hardware()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = str(Path(tmp) / "inputs.npz")
        make_inputs(inputs)
        for stage, name in [("baseline", "load inputs")] + classical_methods(args.methods):
            cmd = [sys.executable, __file__, "--child", stage, name, inputs, str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"stage": stage, "method": name, "error": err[:200]})
                print(f"[classical_speed] {stage} {name} FAILED: {err}", flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"[classical_speed] {stage:16s} {name:18s} "
                  + (f"{row['wall_s']:6.1f} s " if "wall_s" in row else "")
                  + f"{row['peak_rss_gb']:.2f} GB", flush=True)
    table = []
    for row in rows:
        if "error" in row:
            table.append([row["stage"], row["method"], "–", "–", "–", "–", f"failed: {row['error']}"])
        elif row["stage"] == "baseline":
            table.append(["–", "(load inputs only)", "–", "–", fmt(row["peak_rss_gb"], 2), "–", "–"])
        else:
            t, m = verdict(row)
            table.append([row["stage"], row["method"], fmt(row["wall_s"]), fmt(row["cpu_s"]),
                          fmt(row["peak_rss_gb"], 2), fmt(time_target_s(row["method"]), 0),
                          f"time {t}, memory {m}"])
    body = (
        "## Classical methods: time and memory (1 mm whole head, CPU)\n\n"
        f"Generated by `benchmarks/classical_speed.py`. MNI head phantom (unseen anatomy), 1 mm, "
        f"{'×'.join(map(str, SHAPE))} voxels, 4 echoes at 3 T; each method in a fresh process "
        f"(median of {args.repeats} calls after a warm-up on a 32³ crop); peak RSS is that "
        "process's (Python, libraries and the 0.3 GB of inputs included; see the baseline row). "
        f"Targets: < {DEFAULT_TIME_TARGET_S:.0f} s per method, MEDI and PDF < 120 s, peak memory "
        f"< {MEMORY_TARGET_GB:.0f} GB.\n\n"
        + markdown_table(["stage", "method", "wall (s)", "CPU (s)", "peak RSS (GB)",
                          "target (s)", "targets"], table)
        + "\n" + hardware_note(info) + "\n"
    )
    if not args.methods:
        publish(SECTION, body, {"hardware": info, "shape": SHAPE, "rows": rows})
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
