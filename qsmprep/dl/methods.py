"""Deep-learning methods of the algorithm registry (shipped weights; listed in
``qsmprep/data/methods.toml``, imported only when one runs).

``bf_removal``: ``nextqsm``. ``inversion``: ``nextqsm``, ``ir2qsm``, ``unet``, ``dmqsm``
(diffusion posterior sampling, :mod:`qsmprep.dl.dmqsm`; its own sampling parameters).
Each takes the registry's stage signature plus ``device="auto"``,
``max_voxels`` (tile above this many voxels; None: the default cap on the CPU,
none on CUDA) and ``precision`` (``"fp32"``, the default; ``"bf16"``:
convolutions in bfloat16, about 2x faster on CPUs with native bfloat16
(GPUs: not measured yet), maps within 0.6 % of the float32 ones, see
docs/deep-learning.md; ``"auto"``: bf16 where native) and runs on volumes of
any size.
"""

from __future__ import annotations

import numpy as np
import torch

from .dipole import DipoleOperator
from .inference import (autocast, on_mask_box, resolve_precision, run_network, select_device,
                        to_numpy, to_tensor)
from .dmqsm_prior import ScoreUNet
from .ir2qsm import IR2QSM
from .nextqsm import NeXtQSM
from .unet import UNetQSM, field_inputs
from .weights import load_weights

MODELS = {"nextqsm": NeXtQSM, "ir2qsm": IR2QSM, "unet": UNetQSM, "dmqsm": ScoreUNet}


def load_model(name, device="cpu", models_dir=None):
    """Model ``name`` with its shipped (sha256-checked) weights, in eval mode."""
    blob = load_weights(name, models_dir)
    model = MODELS[name](blob["config"])
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()


_CACHE = {}


def _model(name, device, precision="fp32"):
    """The cached model; for bfloat16 in the ``channels_last_3d`` layout, which
    oneDNN and cuDNN run fastest in bfloat16 (float32 keeps the default one)."""
    key = (name, str(device), precision)
    if key not in _CACHE:
        model = load_model(name, device)
        if precision == "bf16":
            model = model.to(memory_format=torch.channels_last_3d)
        _CACHE[key] = model
    return _CACHE[key]


def _run(fn, x, model, device, precision, max_voxels):
    """``run_network`` without gradients at ``precision``; float32 out."""
    with torch.no_grad(), autocast(precision, device):
        out = run_network(fn, x, multiple=model.multiple, max_voxels=max_voxels)
    return to_numpy(out.float())


def _check(field, mask):
    field = np.asarray(field, dtype=np.float32)
    mask = np.asarray(mask) > 0
    if field.ndim != 3 or field.shape != mask.shape:
        raise ValueError(f"Expected a 3-D field and a mask of the same shape; got "
                         f"{field.shape} and {mask.shape}")
    return np.where(mask & np.isfinite(field), field, 0.0).astype(np.float32), mask


def _nextqsm(step, field_ppm, mask, voxel_size_mm, b0_dir, device, max_voxels, precision):
    """One step of NeXtQSM on a field (ppm): ``"remove_background"`` (total ->
    local field, its U-Net) or ``"invert"`` (local field -> chi, its
    variational network), padded or tiled like every network. Unlike the
    feed-forward networks it runs on the whole image: its V-SHARP and dipole
    data terms are FFTs over the volume, and on the independent 1 mm head its
    map moved by up to 1.4 points of NRMSE with the box (rule R22-2,
    docs/deep-learning.md)."""
    dev = select_device(device)
    precision = resolve_precision(precision, dev, strict=False)
    field_ppm, mask = _check(field_ppm, mask)
    model = _model("nextqsm", dev, precision)
    run_step = getattr(model, step)
    x = torch.cat([to_tensor(field_ppm, dev), to_tensor(mask, dev)], dim=1)

    def fn(xp, apply):
        dipole = DipoleOperator(xp.shape[-3:], voxel_size_mm, b0_dir, device=dev)
        return run_step(xp[:, :1], xp[:, 1:], dipole, apply)

    return _run(fn, x, model, dev, precision, max_voxels)


def _feedforward(name, local_field_ppm, mask, voxel_size_mm, b0_dir, device, max_voxels,
                 precision):
    """IR2QSM or the U-Net on the mask's bounding box (:func:`on_mask_box`):
    on the independent heads 1.5-2.3 times faster than on the whole image,
    the same NRMSE within 0.02 points (rule R22-2)."""
    dev = select_device(device)
    precision = resolve_precision(precision, dev, strict=False)
    model = _model(name, dev, precision)

    def compute(field, box_mask):
        # the TKD (or TV) channel is computed once on the whole box, before padding and tiling
        x = field_inputs(to_tensor(field, dev), to_tensor(box_mask, dev), b0_dir, voxel_size_mm,
                         model.config["tkd_threshold"], model.config.get("init_tv"))
        return _run(lambda xp, apply: apply(model, xp), x, model, dev, precision, max_voxels)

    return on_mask_box(compute, *_check(local_field_ppm, mask))


def bfr_nextqsm(total_field_ppm, mask, voxel_size_mm, *, b0_dir, device="auto",
                max_voxels=None, precision="fp32"):
    local_field_ppm = _nextqsm("remove_background", total_field_ppm, mask, voxel_size_mm,
                               b0_dir, device, max_voxels, precision)
    return local_field_ppm, np.asarray(mask) > 0


def inversion_nextqsm(local_field_ppm, mask, voxel_size_mm, *, b0_dir, device="auto",
                      max_voxels=None, precision="fp32"):
    return _nextqsm("invert", local_field_ppm, mask, voxel_size_mm, b0_dir, device,
                    max_voxels, precision)


def inversion_ir2qsm(local_field_ppm, mask, voxel_size_mm, *, b0_dir, device="auto",
                     max_voxels=None, precision="fp32"):
    return _feedforward("ir2qsm", local_field_ppm, mask, voxel_size_mm, b0_dir, device, max_voxels,
                        precision)


def inversion_unet(local_field_ppm, mask, voxel_size_mm, *, b0_dir, device="auto",
                   max_voxels=None, precision="fp32"):
    return _feedforward("unet", local_field_ppm, mask, voxel_size_mm, b0_dir, device, max_voxels,
                        precision)


def inversion_dmqsm(local_field_ppm, mask, voxel_size_mm, *, b0_dir, device="auto", steps=20,
                    xi=2.0, seed=0, t_start=150, eta=0.0, patch=48, overlap=8, jacobian=False,
                    precision="fp32"):
    from .dmqsm import invert

    dev = select_device(device)
    precision = resolve_precision(precision, dev, strict=False)
    return invert(local_field_ppm, mask, voxel_size_mm, b0_dir, device=dev,
                  model=_model("dmqsm", dev, precision), steps=int(steps), xi=float(xi),
                  seed=int(seed), t_start=int(t_start), eta=float(eta), patch=int(patch),
                  overlap=int(overlap), jacobian=bool(jacobian), precision=precision)
