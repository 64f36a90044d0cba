"""One training loop for every model: checkpoints, resume, CSV log, export.

A run lives in one output folder: ``checkpoint.pt`` (latest: model,
optimiser, RNG states, step, wall time), ``best.pt`` (lowest validation
NRMSE), ``metrics.csv`` (one row per logged step) and ``config.json``.
``--resume`` continues at the exact step with the same data stream.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..dl import merge_config
from ..dl.inference import autocast, resolve_precision
from ..utils.files import atomic_write, write_text
from .tasks import TASKS, validation_metrics


#: Smallest edge (voxels) of the U-Nets' bottom feature map that bf16 training
#: accepts: with 16^3 patches (2^3 at the bottom) the bf16 gradients of a step
#: came out inf or 1e17 times the float32 ones; 32^3 to 128^3 patches (4^3 to
#: 16^3) gave the float32 gradients (cosine >= 0.9999).
MIN_BF16_BOTTOM = 4

#: Steps between validations (the default of ``qsmprep-train --validate-every``).
VALIDATE_EVERY = 250

#: batch key -> key of a :func:`qsmprep.sim.hybrid.hybrid_sample` dict
SAMPLE_KEYS = {"total": "total_field", "local": "local_field", "chi": "chi", "mask": "mask"}


def to_batch(samples, device):
    """Stack hybrid sample dicts (:func:`qsmprep.sim.hybrid.hybrid_sample`)
    into a batch of tensors (see :mod:`qsmprep.train.tasks`)."""
    def stack(key):
        return torch.from_numpy(np.stack([np.asarray(s[key], np.float32) for s in samples]))

    batch = {key: stack(src)[:, None].to(device) for key, src in SAMPLE_KEYS.items()}
    batch["b0"] = stack("b0_dir")
    batch["voxel_size"] = stack("voxel_size_mm").numpy()
    return batch


def run_fraction(step, total_steps, wall_s=0.0, time_budget_s=None):
    """Fraction of the run done: of its steps, or of its time budget (seconds
    of training steps) when that runs out first."""
    frac = step / max(total_steps, 1)
    if time_budget_s:
        frac = max(frac, wall_s / time_budget_s)
    return min(frac, 1.0)


def learning_rate(frac, lr, step=0, warmup_steps=0):
    """Cosine decay from ``lr`` to ``lr / 20`` over the run (``frac`` of it
    done), after a linear warm-up over the first ``warmup_steps`` steps (for
    fine-tuning trained weights, whose fresh Adam state would otherwise take
    full-size steps while its moment estimates are still poor)."""
    rate = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
    return rate * min(1.0, (step + 1) / warmup_steps) if warmup_steps else rate


def _csv_writer(fh, path, keys, new_log, resumed_step=0):
    """A DictWriter on ``fh`` with its header written. When appending (a
    resumed run), the log is rewritten first without the rows after
    ``resumed_step`` (steps the run does again) and with the header extended
    by the new ``keys``."""
    rows = []
    if not new_log:
        fh.flush()
        with open(path, newline="") as old:
            reader = csv.DictReader(old)
            header = reader.fieldnames or []
            rows = [r for r in reader if int(r["step"]) <= resumed_step]
        keys = header + [k for k in keys if k not in header]
        fh.seek(0)
        fh.truncate()
    writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return writer


def _save(path, state):
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def hardware():
    """A line describing where training ran."""
    if torch.cuda.is_available():
        return f"CUDA {torch.cuda.get_device_name(0)}"
    return (f"CPU {platform.machine()} ({os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads), torch {torch.__version__}")


def train(task_name, out_dir, stream, val_samples, *, steps, batch_size=1, device="cpu",
          seed=0, config=None, lr=1e-3, resume=None, init=None, checkpoint_every_s=300.0,
          validate_every=VALIDATE_EVERY, log_every=10, stop_at=None, time_limit_s=None,
          time_budget_s=None, progress=True, whole_samples=None, data_options=None,
          precision="fp32", warmup_steps=0):
    """Train model ``task_name`` (a key of :data:`~qsmprep.train.tasks.TASKS`).

    Parameters
    ----------
    out_dir : path
        Run folder (created).
    stream : callable ``start -> iterator of sample dicts``
        The training samples from stream position ``start`` on (sample ``i``
        a pure function of ``i``, so a resumed run sees the same data).
    val_samples : list of sample dicts
        The fixed validation set (patches).
    whole_samples : list of sample dicts, optional
        Held-out whole heads (:func:`qsmprep.train.data.whole_validation_set`);
        when given, ``best.pt`` is the checkpoint with the lowest mean NRMSE
        on them (logged as ``val_whole_nrmse_*``) instead of on the patches.
    steps : int
        Total optimiser steps (a resumed run continues up to it).
    resume : path, optional
        Checkpoint to continue from (model, optimiser, RNG states, step).
    init : path, optional
        Checkpoint or shipped weights file (``qsmprep/data/models/<name>.pt``)
        whose matching weights initialise the model (e.g. a ``nextqsm-bfr``
        pre-training run for ``nextqsm``, or the shipped weights to fine-tune);
        each top-level module (NeXtQSM's ``bfr``, ``regulariser``, ...) is
        taken whole when all its tensors fit, else left as initialised. Its
        saved architecture config, updated by ``config``, builds the model:
        a fine-tune continues the model it starts from (e.g. the shipped
        U-Net's TV input channel) without repeating its ``--config``.
    checkpoint_every_s : float
        Seconds of wall time between checkpoints (also written at the end).
    stop_at, time_limit_s : int, float, optional
        Stop (with a checkpoint) at this step or after this many seconds of
        this call, without changing the schedule of ``steps``; resume later.
    time_budget_s : float, optional
        The run ends after this many seconds of training steps (summed over
        resumes; validation not counted) or at ``steps``, whichever comes
        first, and the learning rate decays over whichever that is: a run
        sized by time, for a lent GPU whose speed is known only once there.
    data_options : dict, optional
        The sample options of the stream, recorded in ``config.json`` (the
        model card and export read them).
    precision : ``"fp32"``, ``"bf16"`` or ``"auto"`` (:func:`resolve_precision`)
        Of the training steps' forward passes (:func:`autocast`); weights,
        optimiser and validation stay float32. The model is kept in the
        ``channels_last_3d`` memory format, which oneDNN and cuDNN convolve
        fastest (bf16 + channels_last: a step 2-3x faster than float32 on 2
        CPU cores with native bfloat16; ``benchmarks/train_speed.py``).

    Returns
    -------
    (model, dict of the last validation metrics)
    """
    task = TASKS[task_name]
    selected_on = "whole" if whole_samples else "patches"
    device = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)  # the loss's own draws (teacher forcing)
    precision = resolve_precision(precision, device)
    src = None
    if init and not resume:
        src = torch.load(init, map_location=device, weights_only=False)
        if isinstance(src.get("config"), dict):  # fine-tune the architecture of --init
            config = merge_config(src["config"], config)
    model = task.build(config).to(device, memory_format=torch.channels_last_3d)
    bottom = min(val_samples[0]["mask"].shape) // model.multiple
    if precision == "bf16" and bottom < MIN_BF16_BOTTOM:
        raise ValueError(
            f"precision 'bf16' needs patches of at least {MIN_BF16_BOTTOM * model.multiple} "
            f"voxels a side for this {task_name} ({min(val_samples[0]['mask'].shape)} give "
            f"{bottom}^3 voxels at the U-Net's bottom, where bfloat16 batch statistics blow up "
            f"the gradients); use a larger --patch or --precision fp32")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    step, wall, best = 0, 0.0, math.inf
    if resume:
        state = torch.load(resume, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        step, wall, best = state["step"], state["wall_s"], state["best"]
        if state.get("selected_on", "patches") != selected_on:
            best = math.inf  # scores on another validation set do not compare
    elif init:
        src = {k: v.float() if v.is_floating_point() else v
               for k, v in src.get("model", src.get("state_dict", {})).items()}
        own = model.state_dict()
        # a top-level module is taken whole or not at all: a network whose
        # input layer changed (e.g. NeXtQSM's background removal gaining its
        # V-SHARP channel) starts fresh instead of from half its old weights
        misfits = {k.split(".")[0] for k, v in src.items()
                   if k not in own or own[k].shape != v.shape}
        matching = {k: v for k, v in src.items() if k.split(".")[0] not in misfits}
        if not matching:
            raise ValueError(f"--init {init}: no weights of a {task_name} model in this file "
                             f"(expected a qsmprep-train checkpoint or shipped weights)")
        own.update(matching)
        model.load_state_dict(own)
    write_text(out / "config.json", json.dumps(
        {"task": task_name, "config": model.config, "steps": steps, "batch_size": batch_size,
         "seed": seed, "lr": lr, "init": str(init) if init else None,
         "time_budget_s": time_budget_s, "data": data_options,
         "validation": len(val_samples), "validation_whole": len(whole_samples or []),
         "validate_every": validate_every,
         "precision": precision, "warmup_steps": warmup_steps}, indent=2))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch shapes: pick the fastest kernels
    val_batches = [to_batch([s], device) for s in val_samples]
    whole_batches = [to_batch([s], device) for s in whole_samples or []]
    samples = stream(step * batch_size)
    resumed_step = step
    log_path = out / "metrics.csv"
    fields = ["step", "wall_s", "lr", "loss"]
    new_log = not log_path.exists() or not resume

    def checkpoint(path):
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        _save(path, {"task": task_name, "config": model.config, "model": weights,
                     "optimizer": opt.state_dict(), "numpy_rng": rng.bit_generator.state,
                     "torch_rng": torch.get_rng_state(), "step": step, "wall_s": wall,
                     "best": best, "selected_on": selected_on, "hardware": hardware(),
                     "precision": precision})

    metrics = {}
    model.train()
    last_ckpt = started = time.monotonic()
    stop_at = steps if stop_at is None else min(stop_at, steps)
    bar = tqdm(total=steps, initial=step, disable=not progress, desc=task_name)

    def done():
        return run_fraction(step, steps, wall, time_budget_s) >= 1.0

    # metrics.csv is a log, appended row by row (a resume drops rows past its checkpoint)
    with open(log_path, "w" if new_log else "a", newline="") as fh:  # log
        writer = None
        while step < stop_at and not done():
            t0 = time.monotonic()
            rate = learning_rate(run_fraction(step, steps, wall, time_budget_s), lr, step,
                                 warmup_steps)
            for group in opt.param_groups:
                group["lr"] = rate
            batch = to_batch([next(samples) for _ in range(batch_size)], device)
            with autocast(precision, device):
                loss, terms = task.loss(model, batch, step, steps, rng)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            loss = float(loss.detach())
            opt.step()
            step += 1
            wall += time.monotonic() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            row = {}
            finished = done()
            if step % validate_every == 0 or step == steps or finished:
                metrics = validation_metrics(task, model, val_batches)
                if whole_batches:
                    whole = validation_metrics(task, model, whole_batches)
                    metrics.update({k.replace("val_", "val_whole_"): v for k, v in whole.items()})
                row.update(metrics)
                score = sum(v for k, v in metrics.items() if ("whole" in k) == bool(whole_batches))
                if score < best:
                    best = score
                    checkpoint(out / "best.pt")
            if row or step % log_every == 0:
                row.update(step=step, wall_s=round(wall, 1), lr=rate,
                           loss=loss, **terms)
                if writer is None:
                    keys = fields + sorted(k for k in row if k not in fields)
                    keys += [f"val{w}_nrmse_{k}" for w in ("", "_whole")
                             for k in ("local", "chi", "chi_dipole", "chi_denoised")
                             if f"val{w}_nrmse_{k}" not in keys]
                    writer = _csv_writer(fh, log_path, keys, new_log, resumed_step)
                writer.writerow(row)
                fh.flush()
            timed_out = time_limit_s is not None and time.monotonic() - started > time_limit_s
            if (time.monotonic() - last_ckpt > checkpoint_every_s or step == stop_at
                    or timed_out or finished):
                checkpoint(out / "checkpoint.pt")
                last_ckpt = time.monotonic()
            if timed_out:
                break
    bar.close()
    return model, metrics
