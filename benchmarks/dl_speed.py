"""Whole-head inference time of the deep-learning methods (CPU, or a GPU).

The unseen-anatomy phantom (MNI head, 1 mm, cropped to 160x192x160 around
the brain) goes through each shipped network with the registry's call
(padding, dipole operator, float32): NeXtQSM background removal, NeXtQSM
inversion, the joint NeXtQSM chain, IR2QSM and the plain U-Net. Median of
``--repeats`` runs after a warm-up on a small crop (loads the weights; on a GPU
also one at the full size). Targets (issues #6, #7): NeXtQSM
< 60 s, IR2QSM < 30 s on 2 CPU cores.

On the CPU, where the cores have native bfloat16, each case is also timed
with ``precision="bf16"`` (bfloat16 convolutions), and the table gives how far
that map is from the float32 one (NRMSE %, in the brain mask).

Writes the table between ``<!-- dl_speed:start -->`` and
``<!-- dl_speed:end -->`` in docs/benchmarks.md. With ``--device cuda`` it
writes the ``dl_speed_cuda`` section instead: GPU times beside one CPU run of
each case in the same process (the reference for the speed-up), and no
targets (those are for 2 CPU cores).

Usage: ``python benchmarks/dl_speed.py [--repeats 3] [--quick] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    WHOLE_HEAD_SHAPE, fmt, hardware, hardware_note, markdown_table, publish, timed, unseen_head,
)

SECTION = "dl_speed"
TARGETS_S = {"nextqsm (joint)": 60.0, "ir2qsm": 30.0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a 96^3 crop, one repeat (smoke test)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from qsmprep.dl.inference import bf16_supported
    from qsmprep.qsm import registry
    from qsmprep.qsm.metrics import nrmse

    shape = (96, 96, 96) if args.quick else WHOLE_HEAD_SHAPE
    repeats = 1 if args.quick else args.repeats
    info = hardware()
    head, total, local = unseen_head(shape)
    mask, vox = head.brain_mask, head.voxel_size_mm
    b0 = (0.0, 0.0, 1.0)
    kw = {"b0_dir": b0, "device": args.device, "precision": "fp32"}

    def joint(total, mask, local):
        loc, m = registry.run("bf_removal", "nextqsm", total, mask, vox, **kw)
        return registry.run("inversion", "nextqsm", loc, m, vox, **kw)

    cases = {
        "nextqsm bfr": lambda t, m, f: registry.run("bf_removal", "nextqsm", t, m, vox, **kw),
        "nextqsm inversion": lambda t, m, f: registry.run("inversion", "nextqsm", f, m, vox, **kw),
        "nextqsm (joint)": joint,
        "ir2qsm": lambda t, m, f: registry.run("inversion", "ir2qsm", f, m, vox, **kw),
        "unet": lambda t, m, f: registry.run("inversion", "unet", f, m, vox, **kw),
    }
    small = tuple(slice(n // 2 - 16, n // 2 + 16) for n in shape)
    on_cpu = args.device == "cpu"
    with_bf16 = on_cpu and bf16_supported("cpu")

    def chi(result):
        return np.asarray(result[0] if isinstance(result, tuple) else result)
    rows, results = [], {}
    for name, fn in cases.items():
        try:
            fn(total[small], mask[small], local[small])  # warm-up: loads, checks the weights
            if not on_cpu:
                fn(total, mask, local)  # and at the full size (cuDNN picks its kernels)
        except Exception as exc:  # noqa: BLE001 - report a missing model in the table
            rows.append([name, "–", "–", f"not run: {exc}"])
            continue
        runs = [timed(fn, total, mask, local) for _ in range(repeats)]
        times = [t for _, t in runs]
        med = statistics.median(times)
        results[name] = {"median_s": med, "times_s": times}
        if on_cpu:
            target = TARGETS_S.get(name)
            verdict = "–" if target is None else (
                "met" if med < target else f"missed by {med - target:.0f} s")
            results[name]["target_s"] = target
            row = [name, fmt(med), fmt(target, 0) if target else "–", verdict]
            if with_bf16:
                kw["precision"] = "bf16"
                fn(total[small], mask[small], local[small])  # warm-up in this layout
                bf16 = [timed(fn, total, mask, local) for _ in range(repeats)]
                kw["precision"] = "fp32"
                bf16_s = statistics.median(t for _, t in bf16)
                diff = nrmse(chi(bf16[0][0]), chi(runs[0][0]), mask)
                results[name].update(bf16_median_s=bf16_s, bf16_vs_fp32_nrmse=diff)
                row += [f"{fmt(bf16_s)} ({med / bf16_s:.1f}x)", f"{diff:.3f}"]
            rows.append(row)
        else:
            kw["device"] = "cpu"
            cpu_s = timed(fn, total, mask, local)[1]
            kw["device"] = args.device
            results[name]["cpu_s"] = cpu_s
            rows.append([name, fmt(med, 2), fmt(cpu_s), f"{cpu_s / med:.0f}x"])
    headers = (["method", "time (s)", "target (s)", "target"]
               + (["bf16 time (s)", "bf16 vs fp32 map (NRMSE %)"] if with_bf16 else [])
               if on_cpu else
               ["method", f"{args.device.upper()} time (s)", "CPU time (s), same machine",
                "speed-up"])
    cpu_note = "" if on_cpu else (
        " The CPU column is one run of each case on this machine's CPU cores in the same "
        "process (the reference of the speed-up); the CPU targets of the issues are in the "
        "CPU table.")
    bf16_note = "" if not with_bf16 else (
        " Time columns are float32 (the default, the maps of the accuracy tables); the bf16 "
        "columns run the same call with `precision=\"bf16\"` (bfloat16 convolutions, these "
        "cores have native bfloat16) and compare its map with the float32 one in the brain "
        "mask.")
    body = (
        f"## Deep-learning inference time (1 mm whole head, {args.device.upper()})\n\n"
        f"MNI head phantom (unseen anatomy) cropped to {'x'.join(map(str, shape))} voxels at "
        f"1 mm; median of {repeats} run(s) after a warm-up, through the method registry "
        f"(`benchmarks/dl_speed.py --device {args.device}`).{cpu_note}{bf16_note}\n\n"
        + markdown_table(headers, rows)
        + "\n" + hardware_note(info) + "\n"
    )
    if not args.quick:
        section = SECTION if on_cpu else f"{SECTION}_{args.device.split(':')[0]}"
        publish(section, body, {"hardware": info, "shape": shape, "results": results})
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
