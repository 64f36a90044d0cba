"""What each trainable model computes: build, loss, validation prediction.

A batch is a dict of float32 tensors ``[B, 1, X, Y, Z]`` (``total``,
``local``, ``chi`` in ppm, ``mask`` 0/1), ``b0`` ``[B, 3]`` (B0 direction in
voxel axes) and ``voxel_size`` (numpy ``[B, 3]``, mm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..dl.dipole import DipoleOperator
from ..dl.dmqsm_prior import ScoreUNet, denoise_check, dsm_loss
from ..dl.ir2qsm import IR2QSM, ir2qsm_loss
from ..dl.nextqsm import NeXtQSM
from ..dl.unet import UNetQSM, field_inputs, mask_rms, normalised_mse


def _dipole(batch, device):
    return DipoleOperator(batch["chi"].shape[-3:], batch["voxel_size"],
                          batch["b0"].cpu().numpy(), device=device)


def _teacher_probability(step, total_steps):
    """Probability of feeding the VN the true local field during joint
    training: 1 at the start, decaying linearly to 0.5 at the end, so that
    the VN also stays a good dipole inversion of true local fields."""
    return 1.0 - 0.5 * min(step / max(total_steps, 1), 1.0)


def _normalised_mae(x, truth, mask):
    """Mean over the batch of each item's MAE in the mask in units of the
    RMS of its truth (so that every sample counts alike, whatever its
    contrast)."""
    per_item = ((x - truth).abs() * mask).sum(dim=(1, 2, 3, 4), keepdim=True)
    per_item = per_item / mask.sum(dim=(1, 2, 3, 4), keepdim=True).clamp(min=1)
    return (per_item / mask_rms(truth, mask)).mean()


def nextqsm_loss(model, batch, step, total_steps, rng):
    """MAE of the local field and of chi (each in units of its RMS), the
    VN fed the true local field with a probability decaying over training."""
    m = batch["mask"]
    dipole = _dipole(batch, m.device)
    local = model.remove_background(batch["total"], m, dipole)
    vn_input = batch["local"] if rng.random() < _teacher_probability(step, total_steps) else local
    chi = model.invert(vn_input, m, dipole)
    l_local = _normalised_mae(local, batch["local"], m)
    l_chi = _normalised_mae(chi, batch["chi"], m)
    return l_local + l_chi, {"loss_local": float(l_local.detach()),
                             "loss_chi": float(l_chi.detach())}


def nextqsm_bfr_loss(model, batch, step, total_steps, rng):
    """MAE of the local field only (pre-training of the background removal)."""
    m = batch["mask"]
    local = model.remove_background(batch["total"], m, _dipole(batch, m.device))
    loss = _normalised_mae(local, batch["local"], m)
    return loss, {"loss_local": float(loss.detach())}


def nextqsm_vn_loss(model, batch, step, total_steps, rng):
    """MAE of chi from the true local field only (the VN trained alone)."""
    m = batch["mask"]
    chi = model.invert(batch["local"], m, _dipole(batch, m.device))
    loss = _normalised_mae(chi, batch["chi"], m)
    return loss, {"loss_chi": float(loss.detach())}


def nextqsm_vn_predict(model, batch):
    m = batch["mask"]
    return {"chi_dipole": (model.invert(batch["local"], m, _dipole(batch, m.device)), "chi")}


def nextqsm_predict(model, batch):
    """Validation: local field and chi from the total field (joint), and chi
    from the true local field (the dipole stage alone)."""
    m = batch["mask"]
    dipole = _dipole(batch, m.device)
    local = model.remove_background(batch["total"], m, dipole)
    return {"local": (local, "local"), "chi": (model.invert(local, m, dipole), "chi"),
            "chi_dipole": (model.invert(batch["local"], m, dipole), "chi")}


def nextqsm_bfr_predict(model, batch):
    m = batch["mask"]
    return {"local": (model.remove_background(batch["total"], m, _dipole(batch, m.device)),
                      "local")}


def vsharp_prior(model, batch):
    """``{"local": (V-SHARP local field, "local")}``: the closed-form input
    NeXtQSM's background removal corrects; None for a model without it."""
    if model.config["bfr"].get("vsharp") is None:
        return None
    m = batch["mask"]
    return {"local": (model.vsharp(batch["total"], m, _dipole(batch, m.device)), "local")}


def _inputs(model, batch):
    return field_inputs(batch["local"], batch["mask"], batch["b0"], batch["voxel_size"],
                        model.config["tkd_threshold"], model.config.get("init_tv"))


def chi_prior(model, batch):
    """``{"chi": (TKD or TV input channel, "chi")}``: the closed-form input
    IR2QSM and the U-Net correct (chi, ppm)."""
    return {"chi": (_inputs(model, batch)[:, 5:6], "chi")}


def ir2qsm_task_loss(model, batch, step, total_steps, rng):
    loss = ir2qsm_loss(model, _inputs(model, batch), batch["chi"])
    return loss, {}


def unet_loss(model, batch, step, total_steps, rng):
    x = _inputs(model, batch)
    return normalised_mse(model(x), batch["chi"], x), {}


def chi_predict(model, batch):
    return {"chi": (model(_inputs(model, batch)), "chi")}


def dmqsm_task_loss(model, batch, step, total_steps, rng):
    """Denoising score matching on the chi patches alone (the prior is
    unsupervised: no field enters the loss)."""
    return dsm_loss(model, batch["chi"], rng), {}


def dmqsm_predict(model, batch):
    """Validation: the one-step denoised chi at a fixed timestep and noise
    (:func:`qsmprep.dl.dmqsm_prior.denoise_check`), zero outside the mask."""
    return {"chi_denoised": (denoise_check(model, batch["chi"]) * batch["mask"], "chi")}


def _vsharp_label(config):
    return "V-SHARP input alone (the untrained background removal)"


def _chi_prior_label(config):
    if config.get("init_tv"):
        return (f"TV-ADMM input channel alone (lambda {config['init_tv'].get('lam', 2e-4):g}; "
                "the untrained network)")
    return f"TKD input channel alone (threshold {config['tkd_threshold']}; the untrained network)"


@dataclass(frozen=True)
class Task:
    """A trainable model: how to build it, its loss and its validation output."""

    name: str
    build: Callable
    loss: Callable
    predict: Callable
    #: the shipped model its runs export as (``nextqsm-bfr`` ships a whole NeXtQSM)
    export_name: str
    description: str
    #: ``(model, batch) -> {name: (map, truth key)}`` of the closed-form input
    #: the network corrects (its output when untrained), or None
    prior: Callable | None = None
    #: ``config -> str``: what the prior is, for the model card
    prior_label: Callable | None = None


TASKS = {
    "nextqsm": Task("nextqsm", NeXtQSM, nextqsm_loss, nextqsm_predict, "nextqsm",
                    "NeXtQSM joint background removal + variational network, end to end",
                    vsharp_prior, _vsharp_label),
    "nextqsm-bfr": Task("nextqsm-bfr", NeXtQSM, nextqsm_bfr_loss, nextqsm_bfr_predict, "nextqsm",
                        "NeXtQSM with its background-removal U-Net trained alone, on top of the "
                        "variational network of its `--init` weights (or as pre-training: "
                        "pass the checkpoint to `qsmprep-train nextqsm --init`)",
                        vsharp_prior, _vsharp_label),
    "nextqsm-vn": Task("nextqsm-vn", NeXtQSM, nextqsm_vn_loss, nextqsm_vn_predict, "nextqsm",
                       "NeXtQSM with its variational network trained alone on true local "
                       "fields, under the background removal of its `--init` weights"),
    "ir2qsm": Task("ir2qsm", IR2QSM, ir2qsm_task_loss, chi_predict, "ir2qsm",
                   "IR2QSM dipole inversion (residual correction of a TKD or TV input channel)",
                   chi_prior, _chi_prior_label),
    "unet": Task("unet", UNetQSM, unet_loss, chi_predict, "unet",
                 "plain 3-D U-Net dipole inversion (IR2QSM's baseline; residual correction "
                 "of a TKD or TV input channel)", chi_prior, _chi_prior_label),
    "dmqsm": Task("dmqsm", ScoreUNet, dmqsm_task_loss, dmqsm_predict, "dmqsm",
                  "DM-QSM diffusion prior of chi (3-D U-Net with time embedding, denoising "
                  "score matching / DDPM epsilon-prediction on chi patches only; dipole "
                  "inversion and super-resolution by diffusion posterior sampling)"),
}


def validation_metrics(task, model, batches):
    """Mean NRMSE (%) of every predicted map over the validation batches
    (``task.predict`` returns ``{name: (map, key of its truth in the batch)}``)."""
    from ..qsm.metrics import nrmse

    scores = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            pred = task.predict(model, batch)
            for key, (value, truth) in pred.items():
                for i in range(value.shape[0]):
                    mask = batch["mask"][i, 0].cpu().numpy() > 0
                    scores.setdefault(f"val_nrmse_{key}", []).append(
                        nrmse(value[i, 0].cpu().numpy(), batch[truth][i, 0].cpu().numpy(), mask))
    model.train(was_training)
    return {k: float(np.mean(v)) for k, v in scores.items()}
