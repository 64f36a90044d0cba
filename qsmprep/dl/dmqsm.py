"""DM-QSM: a diffusion prior on chi with dipole-guided posterior sampling.

One unconditional prior of susceptibility maps -- a small 3-D U-Net with a
time embedding, trained by denoising score matching (DDPM epsilon-prediction,
the discrete variance-preserving SDE) on chi patches only -- solves several
inverse problems by diffusion posterior sampling (DPS): after each reverse
step ::

    x_{t-1} <- x'_{t-1} - xi * grad_{x_t} || W (y - A(x0_hat(x_t))) ||^2

with ``A`` the masked dipole convolution (dipole inversion, :func:`invert`),
a k-space or block down-sampling (super-resolution, :func:`super_resolve`) or
their composition (:func:`invert_super_resolve`). Every task starts from a
closed-form estimate (TKD with threshold 0.1, or its zero-filled up-sampling)
noised to an intermediate time ``t_start`` (SDEdit) and runs a reduced-step
DDIM schedule. The whole volume is sampled as overlapping patches
(:func:`patch_grid`): the network's noise estimates are summed and divided by
the overlap count at every step, and the fresh noise of each step is drawn
once for the whole volume, so no seam can appear.

Units: the network works on ``chi / chi_scale_ppm`` (default 0.1 ppm, a fixed
scale: a prior of chi also knows its amplitude).

Deviations from the abstract (docs/deep-learning.md): by default the
gradient of the data term skips the network's Jacobian
(``d x0_hat / d x_t ~ 1/sqrt(abar_t)``, as DiffPIR/"DPS without Jacobian"):
4x fewer network passes, so that a 1 mm head finishes on 2 CPU cores;
``jacobian=True`` is the exact DPS gradient. The CPU training run uses 32^3
patches (the paper: 48^3); sampling uses 48^3 patches with overlap 8 as the
paper.

References
----------
Xiong Z, Gao Y, Sun H. DM-QSM: a score-based diffusion model for dipole
inversion and super-resolution in QSM. ISMRM 2024. Ho J, Jain A, Abbeel P.
Denoising diffusion probabilistic models. NeurIPS 2020. Song J, Meng C,
Ermon S. Denoising diffusion implicit models. ICLR 2021. Meng C et al.
SDEdit. ICLR 2022. Chung H, Kim J, McCann MT, Klasky ML, Ye JC. Diffusion
posterior sampling for general noisy inverse problems. ICLR 2023.

The network and its training pieces are in :mod:`qsmprep.dl.dmqsm_prior`,
the patches, operators and sampler in :mod:`qsmprep.dl.dmqsm_sampler`.
"""

from __future__ import annotations

import math

import numpy as np

from .dipole import DipoleOperator
from .dmqsm_sampler import (
    SAMPLING,
    T_START_SUPER_RESOLUTION,
    XI_SUPER_RESOLUTION,
    Composed,
    Downsample,
    Masked,
    MaskedDipole,
    dps_sample,
)
from .inference import on_mask_box, select_device, to_numpy, to_tensor

#: TKD threshold of the start of dipole inversion (the paper's 0.1).
TKD_THRESHOLD = 0.1

#: Posterior samples averaged in super-resolution (``super_resolve``'s
#: ``samples``) and the weight of the band their mean adds above the measured
#: one (``band_weight``; 0 is the zero-filled up-sampling). The 4 samples were
#: chosen on 48^3 crops of the independent 7 T and 1 mm heads (R19-2,
#: docs/deep-learning.md); the weight was then re-chosen on whole heads (R21-3,
#: rule fixed before the sweep: XSIM at least zero filling's on the whole
#: 1.5 mm and 7 T heads, then the lowest mean NRMSE): 0.5, 32.18 % / 0.914 and
#: 30.42 / 0.916 (0.75: 32.24 / 0.906 and 30.34 / 0.907, below zero filling's
#: 0.908 / 0.912), and on the held-out whole 1 mm head 23.57 / 0.937 against
#: zero filling 24.97 / 0.936 and 0.75's 23.61 / 0.928. Crops, mostly
#: structure, favoured more band than whole heads (likely: a whole head's flat
#: parts pay in XSIM for every detail the truth lacks).
SAMPLES_SUPER_RESOLUTION = 4
BAND_WEIGHT_SUPER_RESOLUTION = 0.5


# ---------------------------------------------------------------------------
# Python API


def _model_cached(device, models_dir=None):
    from .methods import _model
    if models_dir is not None:
        from .methods import load_model
        return load_model("dmqsm", device, models_dir)
    return _model("dmqsm", device)


def _options(overrides, **defaults):
    opts = {**SAMPLING, **defaults, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(opts) - set(SAMPLING) - {"precision"}
    if unknown:
        raise TypeError(f"unknown DM-QSM sampling option(s) {sorted(unknown)}; "
                        f"expected {sorted(SAMPLING)}")
    return opts


def invert(local_field_ppm, mask, voxel_size_mm, b0_dir, *, device="auto",
           model=None, history=None, **options):
    """Dipole inversion by DM-QSM: chi (ppm, numpy ``[X, Y, Z]``) from the
    local field (ppm) in ``mask``, starting from TKD (threshold 0.1).
    ``options``: :data:`SAMPLING` (``steps``, ``t_start``, ``xi``, ``seed``, ...).
    The volume is cropped to the mask's bounding box plus 8 voxels to sample
    (:func:`~qsmprep.dl.inference.on_mask_box`, as for IR2QSM and the U-Net)."""
    dev = select_device(device)
    opts = _options(options)
    model = model if model is not None else _model_cached(dev)
    local = np.asarray(local_field_ppm, np.float32)
    mask = np.asarray(mask) > 0
    if local.ndim != 3 or local.shape != mask.shape:
        raise ValueError(f"Expected a 3-D field and a mask of the same shape; got "
                         f"{local.shape} and {mask.shape}")
    if not mask.any():
        raise ValueError("DM-QSM: the mask is empty")
    local = np.where(mask & np.isfinite(local), local, 0.0).astype(np.float32)

    def sample(box_field, box_mask):
        """DPS on the box, zero-padded at its end to the network's multiple."""
        pads = [(0, -n % model.multiple) for n in box_field.shape]
        field = to_tensor(np.pad(box_field, pads), dev)
        m = to_tensor(np.pad(box_mask, pads), dev)
        op = MaskedDipole(field.shape[-3:], voxel_size_mm, b0_dir, m, dev)
        start = op.dipole.tkd(field * m, TKD_THRESHOLD) * m
        chi = dps_sample(model, field * m, op, start, m, history=history, **opts)
        return to_numpy(chi)[tuple(slice(0, n) for n in box_field.shape)]

    return on_mask_box(sample, local, mask)


def _upsampled_mask(mask_lr, factor):
    m = np.asarray(mask_lr) > 0
    for ax in range(3):
        m = np.repeat(m, factor, axis=ax)
    return m


def super_resolve(chi_lowres, factor=2, mask=None, *, mode="kspace", project=True,
                  samples=SAMPLES_SUPER_RESOLUTION, band_weight=BAND_WEIGHT_SUPER_RESOLUTION,
                  device="auto", model=None, history=None, **options):
    """Super-resolution of a chi map (ppm, numpy ``[x, y, z]``) by ``factor``
    per axis: ``y = D chi`` with ``D`` the ``mode`` down-sampling
    (:class:`Downsample`), started from its zero-filled up-sampling;
    ``xi`` defaults to 2 (the paper) and ``t_start`` to 100. ``mask``: the high-resolution support
    (default: the low-resolution non-zero voxels, nearest-neighbour
    up-sampled). ``project``: a last hard data-consistency step replaces
    the measured band of the sample by the data (``D^+`` is the zero-filled
    up-sampling), so the map keeps everything the low-resolution map
    measured and adds only what the prior puts above it (not in the
    abstract). ``samples`` posterior samples (seeds ``seed``, ``seed + 1``,
    ...) are averaged into ``x``, an estimate of the posterior mean, and
    ``band_weight`` (with ``project``) scales what it adds above the measured
    band: ``chi = D^+ y + band_weight (x - D^+ D x)``; 1 keeps the band of
    ``x``, 0 gives the zero-filled up-sampling. One sample of a weakly informed
    posterior adds about as much error as detail; half the band of the mean
    of four (chosen on whole independent heads: docs/deep-learning.md) lowers
    the error, at four times the sampling time. ``history`` gets the first
    sample's data consistency. Returns chi (ppm) ``factor`` times larger per
    axis."""
    dev = select_device(device)
    opts = _options(options, xi=XI_SUPER_RESOLUTION, t_start=T_START_SUPER_RESOLUTION)
    model = model if model is not None else _model_cached(dev)
    lr = np.asarray(chi_lowres, np.float32)
    if lr.ndim != 3:
        raise ValueError(f"Expected a 3-D chi map, got shape {lr.shape}")
    lr = np.where(np.isfinite(lr), lr, 0.0).astype(np.float32)
    f = int(factor)
    hr_shape = tuple(n * f for n in lr.shape)
    mask_hr = _upsampled_mask(lr != 0, f) if mask is None else np.asarray(mask) > 0
    if mask_hr.shape != hr_shape:
        raise ValueError(f"mask shape {mask_hr.shape} is not factor x the low-resolution "
                         f"shape {hr_shape}")
    # pad the low-resolution grid so that the high-resolution one is a multiple of the network's
    mult = model.multiple // math.gcd(model.multiple, f)
    pads_lr = [(0, -n % mult) for n in lr.shape]
    y = to_tensor(np.pad(lr, pads_lr), dev)
    m = to_tensor(np.pad(mask_hr, [(0, p * f) for _, p in pads_lr]), dev)
    down = Downsample(m.shape[-3:], f, mode)
    start = down.zero_filled(y) * m
    n_samples = int(samples)
    if n_samples < 1:
        raise ValueError(f"Expected samples >= 1, got {samples}")
    chi = sum(dps_sample(model, y, down, start, m, history=history if i == 0 else None,
                         **{**opts, "seed": int(opts["seed"]) + i})
              for i in range(n_samples)) / n_samples
    if project:
        # the measured band exactly, plus band_weight w times the samples' mean's band above it:
        # D^+ y + w (chi - D^+ D chi) = w chi + D^+(y - w D chi) (D^+ = the zero-filled
        # up-sampling, linear; w = 1: chi + D^+(y - D chi))
        w = float(band_weight)
        chi = (w * chi + down.zero_filled(y - w * down(chi))) * m
    return to_numpy(chi)[tuple(slice(0, n) for n in hr_shape)]


def invert_super_resolve(local_field_lowres_ppm, mask_lowres, voxel_size_mm_lowres,
                         b0_dir, factor=2, *, mode="kspace", device="auto",
                         model=None, history=None, **options):
    """The combined task: high-resolution chi (ppm) from a low-resolution
    local field (ppm) in ``mask_lowres``: ``A = M_lr D d_hr`` (dipole
    convolution at the high resolution, then down-sampling), started from
    the zero-filled up-sampling of the low-resolution TKD (threshold 0.1).
    ``xi`` and ``t_start`` default to the inversion's."""
    dev = select_device(device)
    opts = _options(options)
    model = model if model is not None else _model_cached(dev)
    local = np.asarray(local_field_lowres_ppm, np.float32)
    mask_lr = np.asarray(mask_lowres) > 0
    if local.shape != mask_lr.shape or local.ndim != 3:
        raise ValueError(f"Expected a 3-D field and a mask of the same shape; got "
                         f"{local.shape} and {mask_lr.shape}")
    f = int(factor)
    local = np.where(mask_lr & np.isfinite(local), local, 0.0).astype(np.float32)
    mult = model.multiple // math.gcd(model.multiple, f)
    pads_lr = [(0, -n % mult) for n in local.shape]
    y = to_tensor(np.pad(local, pads_lr), dev)
    m_lr = to_tensor(np.pad(mask_lr, pads_lr), dev)
    m = to_tensor(_upsampled_mask(np.pad(mask_lr, pads_lr), f), dev)
    vox_hr = np.asarray(voxel_size_mm_lowres, np.float64) / f
    dipole_hr = DipoleOperator(m.shape[-3:], vox_hr, b0_dir, device=dev)
    down = Downsample(m.shape[-3:], f, mode)
    op = Masked(Composed(down, dipole_hr), m_lr)
    tkd_lr = DipoleOperator(y.shape[-3:], voxel_size_mm_lowres, b0_dir, device=dev).tkd(
        y * m_lr, TKD_THRESHOLD) * m_lr
    start = down.zero_filled(tkd_lr) * m
    chi = dps_sample(model, y * m_lr, op, start, m, history=history, **opts)
    return to_numpy(chi)[tuple(slice(0, n * f) for n in local.shape)]
