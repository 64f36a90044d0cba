"""Export a training run as shipped weights with a model card.

Writes ``qsmprep/data/models/<name>.pt`` (float16, sha256 in the manifest),
``<name>.md`` (the card) and, once, ``check_case.npz``: a small fixed hybrid
sample on which the card's check NRMSE is measured with the shipped weights,
so the test suite can verify that the installed weights reproduce it.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
from pathlib import Path

import numpy as np
import torch

from ..dl.weights import MODELS_DIR, load_weights, save_file, save_weights, verify
from ..sim.hybrid import hybrid_sample
from .data import (DATA, VALIDATION_PATCHES, VALIDATION_START, content_options, validation_set,
                   whole_validation_set)
from .loop import VALIDATE_EVERY, to_batch
from .tasks import TASKS, validation_metrics

CHECK_CASE = "check_case.npz"
#: The check case: held-out sample of this seed, 1 mm, 48^3.
CHECK_SEED = 20251

#: Held-out whole heads scored on the card (the default of
#: ``qsmprep-train --validation-whole``, on which checkpoints are selected).
WHOLE_HEADS = 2


def check_case(models_dir=None):
    """The shipped check case (dict of arrays), written on first use."""
    models_dir = Path(models_dir or MODELS_DIR)
    if not (models_dir / CHECK_CASE).exists():
        sample = hybrid_sample(VALIDATION_START, seed=CHECK_SEED, patch_size=48)
        buf = io.BytesIO()
        np.savez_compressed(buf, **sample)
        save_file(CHECK_CASE, buf.getvalue(), models_dir)
    with np.load(verify(CHECK_CASE, models_dir)) as data:
        return dict(data)


def check_nrmse(task_name, model, models_dir=None):
    """NRMSE (%) of each output of ``model`` on the check case."""
    batch = to_batch([check_case(models_dir)], next(model.parameters()).device)
    return validation_metrics(TASKS[task_name], model, [batch])


#: DM-QSM's sampling on the check case, scored on its card (fewer steps than
#: the default 20, so that the test suite can check them in seconds).
#: DM-QSM sampling of the card's check case, fixed (xi and t_start of the
#: inversion as when the shipped card was made; super-resolution keeps its own)
CHECK_SAMPLING = {"steps": 8, "seed": 0}
CHECK_INVERSION = {"xi": 1.5, "t_start": 150}


def dmqsm_check_scores(model=None, models_dir=None):
    """NRMSE (%) on the check case of DM-QSM's dipole inversion and x2
    super-resolution (k-space) with :data:`CHECK_SAMPLING`, and of their
    closed-form starts (TKD 0.1; zero-filled up-sampling)."""
    from ..dl import dmqsm, dmqsm_sampler
    from ..dl.dipole import DipoleOperator
    from ..dl.inference import to_numpy, to_tensor
    from ..dl.methods import load_model
    from ..qsm.metrics import nrmse

    case = check_case(models_dir)
    model = model if model is not None else load_model("dmqsm", "cpu", models_dir)
    model = model.cpu().eval()
    mask, chi = case["mask"] > 0, case["chi"]
    vox, b0 = tuple(case["voxel_size_mm"]), tuple(case["b0_dir"])
    field = case["local_field"] * mask
    inv = dmqsm.invert(field, mask, vox, b0, device="cpu", model=model, **CHECK_SAMPLING,
                       **CHECK_INVERSION)
    tkd = to_numpy(DipoleOperator(chi.shape, vox, b0).tkd(
        to_tensor(field, "cpu"), dmqsm.TKD_THRESHOLD)) * mask
    down = dmqsm_sampler.Downsample(chi.shape, 2)
    lowres = down(to_tensor(chi, "cpu"))
    zero_filled = to_numpy(down.zero_filled(lowres)) * mask
    sr = dmqsm.super_resolve(to_numpy(lowres), 2, mask=mask, device="cpu", model=model,
                             **CHECK_SAMPLING)
    return {"inversion": nrmse(inv, chi, mask), "inversion_tkd_start": nrmse(tkd, chi, mask),
            "sr2": nrmse(sr, chi, mask), "sr2_zero_filled": nrmse(zero_filled, chi, mask)}


def _sampling_section(scores):
    rows = "\n".join(f"| {k} | {v:.2f} |" for k, v in scores.items())
    return f"""
Posterior sampling on the check case (`check_case.npz`, 1 mm, 48^3), NRMSE (%) in the
mask, `{json.dumps(CHECK_SAMPLING)}` (other settings the defaults of
`qsmprep.dl.dmqsm.SAMPLING`; ×2 super-resolution with xi 2 and the default samples and
band weight of `super_resolve` from the k-space down-sampled truth):

| task | NRMSE |
|---|---|
{rows}
"""


def prior_nrmse(task_name, model, batches):
    """Mean NRMSE (%) of the closed-form input that the network corrects (the
    TKD channel of IR2QSM and the U-Net, NeXtQSM's V-SHARP local field) over
    ``batches``: ``{output: NRMSE}``, or None for a model without one."""
    task = TASKS[task_name]
    if task.prior is None:
        return None
    prior_only = dataclasses.replace(task, predict=lambda m, b: task.prior(m, b) or {})
    scores = {k.replace("val_nrmse_", ""): v
              for k, v in validation_metrics(prior_only, model, batches).items()}
    return scores or None


def run_config(run_dir):
    """``config.json`` of a run, with the sample options and validation size
    of runs older than their record filled in (the defaults then)."""
    cfg = json.loads((Path(run_dir) / "config.json").read_text())
    cfg["data"] = cfg.get("data") or DATA[cfg["task"]]
    cfg["validation"] = cfg.get("validation") or VALIDATION_PATCHES
    cfg.setdefault("validation_whole", WHOLE_HEADS)  # recorded since 2026-11-27
    return cfg


def _run_length(run, cfg):
    """How the run was sized, for the card: its steps, or the steps its
    time budget gave."""
    if not cfg.get("time_budget_s"):
        return f"a {cfg['steps']}-step run"
    last = run / "checkpoint.pt"
    done = torch.load(last, map_location="cpu", weights_only=False)["step"] if last.exists() else "?"
    return f"a run of {cfg['time_budget_s']:.0f} s of training steps ({done} steps)"


_PRECISION_TEXT = {"fp32": "float32 steps",
                   "bf16": "bfloat16 mixed-precision steps, float32 weights"}


def _warmup_text(cfg):
    n = cfg.get("warmup_steps")
    return f" (linear warm-up over {n} steps)" if n else ""


def config_overrides(task, config):
    """The entries of a model ``config`` that differ from the model's defaults:
    the ``--config`` that rebuilds it."""
    default = json.loads(json.dumps(task.build(None).config))
    return {k: v for k, v in json.loads(json.dumps(config)).items() if default.get(k) != v}


def _retrain_command(task, cfg, ckpt):
    opts = [f"--steps {cfg['steps']}", f"--batch {cfg['batch_size']}", f"--seed {cfg['seed']}"]
    overrides = config_overrides(task, ckpt["config"])
    if overrides:
        opts.append(f"--config '{json.dumps(overrides)}'")
    if cfg["data"].get("patch_size") != DATA[task.name].get("patch_size"):
        opts.append(f"--patch {cfg['data']['patch_size']}")
    default = json.loads(json.dumps(DATA[task.name]))  # tuples as config.json has them
    data = {k: v for k, v in cfg["data"].items() if k != "patch_size" and default.get(k) != v}
    if data:
        opts.append(f"--data '{json.dumps(data)}'")
    if cfg.get("time_budget_s"):
        opts.append(f"--time-budget {cfg['time_budget_s']:.0f}")
    if cfg["lr"] != 1e-3:
        opts.append(f"--lr {cfg['lr']}")
    if cfg.get("warmup_steps"):
        opts.append(f"--warmup {cfg['warmup_steps']}")
    if cfg.get("init"):
        opts.append(f"--init {cfg['init']}")
    if cfg["validation"] != VALIDATION_PATCHES:
        opts.append(f"--validation {cfg['validation']}")
    if cfg["validation_whole"] != WHOLE_HEADS:  # the heads best.pt was selected on
        opts.append(f"--validation-whole {cfg['validation_whole']}")
    if cfg.get("validate_every", VALIDATE_EVERY) != VALIDATE_EVERY:  # recorded since 2026-11-26
        opts.append(f"--validate-every {cfg['validate_every']}")
    if str(ckpt.get("hardware", "")).startswith("CUDA"):
        opts.append("--device cuda")
    if cfg.get("precision"):  # recorded since bf16 training; older runs were float32
        opts.append(f"--precision {cfg['precision']}")
    return f"qsmprep-train {task.name} --out runs/{task.name} {' '.join(opts)} --export"


def _data_text(name, cfg):
    if name == "dmqsm":
        from .data import MAX_BACKGROUND, PATCH_STRIDE, PATCHES_PER_HEAD

        opts = {k: v for k, v in cfg["data"].items() if k != "patch_size"}
        return (f"chi only (no field enters the loss): {cfg['data']['patch_size']}^3 patches cut "
                f"with stride {PATCH_STRIDE} from whole heads of "
                f"`qsmprep.sim.hybrid.hybrid_sample(patch_size=None)` (seed {cfg['seed']}, options "
                f"`{json.dumps(opts)}`), patches over {MAX_BACKGROUND:.0%} background dropped, "
                f"{PATCHES_PER_HEAD} per head in a random order "
                "(`qsmprep.train.data.ChiPatchDataset`): the deformed QSM Challenge 2.0 head with "
                "random tissue chi, texture, random shapes and lesions. The MNI head (benchmark "
                "anatomy) was never used.")
    return (f"hybrid samples of `qsmprep.sim.hybrid.hybrid_sample` (seed {cfg['seed']}, options "
            f"`{json.dumps(cfg['data'])}`): the deformed QSM Challenge 2.0 head with random tissue "
            "chi, texture, random shapes and background sources, random B0 tilt up to 30 "
            "degrees. The MNI head (benchmark anatomy) was never used.")


def _card(name, task, run, cfg, ckpt, n_params, size, val, check, whole, prior=None,
          whole_heads=WHOLE_HEADS):

    def cell(scores, key):
        return f"{scores[key]:.2f}" if key in scores else "–"

    rows = "\n".join(f"| {k.replace('val_nrmse_', '')} | {v:.2f} | {cell(whole, k)} | "
                     f"{cell(check, k)} |" for k, v in sorted(val.items()))
    if prior is not None:
        label = TASKS[name].prior_label(ckpt["config"])  # the shipped model's input
        for key in sorted(prior[0]):
            rows += (f"\n| {key}: {label} | "
                     + " | ".join(f"{scores[key]:.2f}" for scores in prior) + " |")
    init = cfg.get("init")
    start = (f"initialised from `{init}` (the previously shipped weights when that is "
             "the package's file), then " if init else "")
    selected = ("the lowest mean NRMSE on the held-out whole heads"
                if ckpt.get("selected_on") == "whole" else "the best validation NRMSE")
    return f"""# Model card: `{name}`

{task.description}, trained with `qsmprep-train {task.name}`.

| | |
|---|---|
| architecture | `{json.dumps(ckpt['config'])}` |
| parameters | {n_params:,} ({size / 1e6:.1f} MB as float16) |
| training data | {_data_text(name, cfg)} |
| steps | {start}{ckpt['step']}: the checkpoint with {selected} of {_run_length(run, cfg)} (batch {cfg['batch_size']}, Adam, lr {cfg['lr']}{_warmup_text(cfg)} cosine-decayed over the run, {_PRECISION_TEXT[cfg.get('precision', 'fp32')]}) |
| wall time | {ckpt['wall_s'] / 3600:.2f} h of training steps up to this checkpoint |
| hardware | {ckpt.get('hardware', 'unknown')} |
| exported | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC |

Validation NRMSE (%, QSM-CI convention, in the mask) of the shipped float16 weights:

| output | validation patches ({cfg['validation']} held-out samples) | held-out whole heads (1 mm, {whole_heads}) | check case (`check_case.npz`) |
|---|---|---|---|
{rows}

Retrain: `{_retrain_command(task, cfg, ckpt)}`
(a GPU user may add a larger `--config`; the shipped size keeps inference fast on CPUs).
"""


def export(task_name, run_dir, models_dir=None, device="cpu", whole_heads=None):
    """Ship the best checkpoint of ``run_dir`` (else its latest) and its card,
    scored on the run's validation patches, ``whole_heads`` held-out whole
    1 mm heads (default: the run's ``--validation-whole``, or
    :data:`WHOLE_HEADS` for a run that selected on patches) and the check case.

    Returns the validation and check-case metrics of the shipped weights.
    """
    task = TASKS[task_name]
    name = task.export_name
    scored = TASKS[name]  # the card scores every output of the shipped model
    run = Path(run_dir)
    path = run / "best.pt" if (run / "best.pt").exists() else run / "checkpoint.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = task.build(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    cfg = run_config(run)
    whole_heads = whole_heads or cfg["validation_whole"] or WHOLE_HEADS
    meta = {"step": ckpt["step"], "wall_s": ckpt["wall_s"], "hardware": ckpt.get("hardware")}
    save_weights(name, model, meta, models_dir)
    # measure with the shipped (float16-rounded) weights, as a user gets them
    shipped = task.build(ckpt["config"])
    shipped.load_state_dict(load_weights(name, models_dir)["state_dict"])
    shipped.to(device)
    val_batches = [to_batch([s], device)
                   for s in validation_set(cfg["seed"], cfg["data"], cfg["validation"])]
    val = validation_metrics(scored, shipped, val_batches)
    check = check_nrmse(name, shipped, models_dir)
    whole_batches = [to_batch([s], device) for s in whole_validation_set(
        cfg["seed"], whole_heads, **content_options(cfg["data"]))]
    whole = validation_metrics(scored, shipped, whole_batches)
    meta.update(validation_nrmse=val, whole_head_nrmse=whole, check_case_nrmse=check)
    sampling = dmqsm_check_scores(shipped, models_dir) if name == "dmqsm" else None
    if sampling is not None:
        meta["check_case_sampling_nrmse"] = sampling
    path = save_weights(name, shipped, meta, models_dir)
    n_params = sum(p.numel() for p in shipped.parameters())
    prior = prior_nrmse(name, shipped, val_batches)
    if prior is not None:
        check_batch = to_batch([check_case(models_dir)], device)
        prior = (prior, prior_nrmse(name, shipped, whole_batches),
                 prior_nrmse(name, shipped, [check_batch]))
    card = _card(name, task, run, cfg, ckpt, n_params, path.stat().st_size, val, check, whole,
                 prior, whole_heads)
    if sampling is not None:
        card += _sampling_section(sampling)
    save_file(f"{name}.md", card.encode(), models_dir)
    return val, check
