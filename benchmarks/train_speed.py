"""Training-step time of the deep-learning models: float32 against bfloat16.

One hybrid sample (``--patch`` voxels a side, the models' training data) goes
through a full training step of each model (forward pass with its training
loss, backward pass, Adam update) in three settings, all in this process:
float32 with the default memory layout (the reference: how the shipped
weights up to 2026-11-26 were trained), float32 with the model in the
``channels_last_3d`` layout, and bfloat16 autocast in that layout (what
``qsmprep-train --precision bf16`` runs). Median of ``--repeats`` steps after
a warm-up step each. It also reports the cosine similarity between the
float32 and bfloat16 gradients of the same step (1 = the same direction), the
check that mixed precision trains the same model.

Writes the ``train_speed`` section of docs/benchmarks.md.

Usage: ``python benchmarks/train_speed.py [--patch 64] [--repeats 5] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, hardware, hardware_note, markdown_table, publish, timed  # noqa: E402

SECTION = "train_speed"
SETTINGS = {  # name: (precision, memory format of the model)
    "fp32": ("fp32", torch.contiguous_format),
    "fp32 channels_last": ("fp32", torch.channels_last_3d),
    "bf16 channels_last": ("bf16", torch.channels_last_3d),
}


def _step(task, model, opt, batch, precision, device):
    from qsmprep.dl.inference import autocast

    with autocast(precision, device):
        loss, _ = task.loss(model, batch, 0, 1, np.random.default_rng(0))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def gradient_cosine(task, model, batch, device):
    """Cosine similarity of the float32 and bfloat16 gradients of one loss."""
    from qsmprep.dl.inference import autocast

    grads = []
    for precision in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        with autocast(precision, device):
            loss, _ = task.loss(model, batch, 0, 1, np.random.default_rng(0))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()
                                if p.grad is not None]))
    a, b = (g.double() for g in grads)
    return float(a @ b / (a.norm() * b.norm()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", nargs="+", default=["nextqsm", "ir2qsm", "unet"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-publish", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from qsmprep.dl.inference import bf16_supported
    from qsmprep.dl.methods import load_model
    from qsmprep.sim.hybrid import hybrid_sample
    from qsmprep.train.data import DATA
    from qsmprep.train.loop import to_batch
    from qsmprep.train.tasks import TASKS

    device = torch.device(args.device)
    info = hardware()
    rows, results = [], {}
    for name in args.models:
        task = TASKS[name]
        options = {**DATA[name], "patch_size": args.patch}
        batch = to_batch([hybrid_sample(1, seed=0, **options)], device)
        times = {}
        for setting, (precision, layout) in SETTINGS.items():
            if precision == "bf16" and not bf16_supported(device):
                continue
            # the shipped weights: a trained model's activations, not an untrained one's
            model = load_model(name, device).train().to(memory_format=layout)
            opt = torch.optim.Adam(model.parameters(), lr=1e-5)
            _step(task, model, opt, batch, precision, device)  # warm-up
            runs = [timed(_step, task, model, opt, batch, precision, device)[1]
                    for _ in range(args.repeats)]
            times[setting] = statistics.median(runs)
        model = load_model(name, device).train().to(memory_format=torch.channels_last_3d)
        cosine = gradient_cosine(task, model, batch, device) if bf16_supported(device) else None
        ref = times["fp32"]
        rows.append([name, *(f"{fmt(times[s], 2)} ({ref / times[s]:.1f}x)" if s in times else "–"
                             for s in SETTINGS), "–" if cosine is None else f"{cosine:.4f}"])
        results[name] = {"step_s": times, "gradient_cosine_fp32_bf16": cosine}
        print(rows[-1], flush=True)
    body = (
        f"## Training-step time ({args.patch}³ patch, {args.device.upper()}, "
        f"{args.threads} threads)\n\n"
        f"One training step (forward with the training loss, backward, Adam) on one hybrid "
        f"sample, median of {args.repeats} after a warm-up, the three settings in one process "
        f"(`benchmarks/train_speed.py --patch {args.patch}`); in brackets the speed-up over "
        f"float32 in the default layout. `qsmprep-train --precision bf16` (the default where "
        f"the hardware has native bfloat16) runs the last column. Gradient cosine: similarity "
        f"of the float32 and bfloat16 gradients of the same step, shipped weights.\n\n"
        + markdown_table(["model", *SETTINGS, "gradient cosine"], rows)
        + "\n" + hardware_note(info) + "\n"
    )
    if not args.no_publish:
        publish(SECTION, body, {"hardware": info, "patch": args.patch, "results": results})
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
