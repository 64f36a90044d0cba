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
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .dipole import DipoleOperator
from .inference import autocast, select_device, to_numpy, to_tensor

LOGGER = logging.getLogger("qsmprep.dl")

DEFAULT_CONFIG = {
    "base": 16,
    "levels": 3,
    "time_dim": 64,
    "groups": 8,
    "timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "chi_scale_ppm": 0.1,
}

#: TKD threshold of the start of dipole inversion (the paper's 0.1).
TKD_THRESHOLD = 0.1

#: Sampling defaults (``--inversion dmqsm`` and the Python API).
SAMPLING = {
    "steps": 20,        # reverse (DDIM) steps from t_start to 0
    "t_start": 150,     # SDEdit: the start is noised to this of 1000 steps
    "xi": 2.0,          # DPS step on ||W(y - A x0)||^2 in units of 0.1 ppm (see below)
    "eta": 0.0,         # DDIM stochasticity (0: deterministic after the start's noise)
    "patch": 48,        # sampling patch edge (voxels) and overlap (the paper's 48 and 8)
    "overlap": 8,
    "jacobian": False,  # exact DPS gradient through the network (4x slower)
    "seed": 0,
}

#: xi and t_start of super-resolution (xi: the paper's 2).
XI_SUPER_RESOLUTION, T_START_SUPER_RESOLUTION = 2.0, 100

# How the defaults were chosen (docs/deep-learning.md). xi: on the independent
# suite (benchmarks/independent.py's 1.5 mm head, two 48^3 crops; rule fixed
# before the sweep: lowest mean NRMSE, a tie within 0.5 keeps the old default):
# mean over the crops 52.4 / 48.1 / 45.7 / 44.1 % for xi 0.5 / 1 / 1.5 / 2 at
# t_start 150 (45.4 for xi 2 at t_start 100; TKD 57.2, TV 59.9), so xi 2
# since 2026-12-02. Before that, xi 1.5 had been taken on a 48^3 crop of the
# qsmprep.sim MNI head (unseen anatomy, but our generator) with the prior of step
# 600 of the shipped run: inversion NRMSE 51.6 % (xi 0.5, t_start 300), 44.3
# (xi 1), 40.2 (xi 1.5), 37.7 (xi 2, but its data residual oscillated in the
# first steps: unstable), 39.8 (xi 1.5, t_start 150, residual falling
# monotonically); 10 steps instead of 20: 50.4 (xi 1). TKD 47.5, TV 41.5.
# Super-resolution: t_start 100 gave 58.4 %, 300 gave 61.2 %.


# ---------------------------------------------------------------------------
# the score network


def timestep_embedding(t, dim):
    """Sinusoidal embedding ``[B, dim]`` of (float) timesteps ``t`` ``[B]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                         device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class TimeBlock(nn.Module):
    """Residual block: conv-GN-SiLU, + a per-channel bias from the time
    embedding, conv-GN-SiLU; a 1x1x1 skip when the width changes."""

    def __init__(self, cin, cout, time_dim, groups):
        super().__init__()
        g = math.gcd(groups, cout)
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm1 = nn.GroupNorm(g, cout)
        self.time = nn.Linear(time_dim, cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(g, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = F.silu(self.norm1(self.conv1(x)))
        h = h + self.time(emb)[:, :, None, None, None]
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class ScoreUNet(nn.Module):
    """The DM-QSM prior: a 3-D U-Net ``(x_t, t) -> epsilon`` (``[B, 1, X, Y, Z]``,
    ``t`` integer timesteps ``[B]``), with the DDPM noise schedule of its config
    (linear betas, ``timesteps`` steps) as buffers."""

    def __init__(self, config=None):
        super().__init__()
        self.config = {**DEFAULT_CONFIG, **(config or {})}
        c = self.config
        base, levels, tdim = c["base"], c["levels"], c["time_dim"]
        self.levels = levels
        chans = [base * 2**i for i in range(levels)]
        self.time_mlp = nn.Sequential(nn.Linear(tdim, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        cin = [1] + chans[:-1]
        self.down = nn.ModuleList(TimeBlock(a, b, tdim, c["groups"]) for a, b in zip(cin, chans))
        self.up = nn.ModuleList(nn.ConvTranspose3d(chans[i + 1], chans[i], 2, stride=2)
                                for i in range(levels - 1))
        self.dec = nn.ModuleList(TimeBlock(2 * chans[i], chans[i], tdim, c["groups"])
                                 for i in range(levels - 1))
        self.head = nn.Conv3d(base, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        betas = torch.linspace(c["beta_start"], c["beta_end"], c["timesteps"], dtype=torch.float64)
        self.register_buffer("alphas_bar", torch.cumprod(1 - betas, 0).float(), persistent=False)

    @property
    def multiple(self):
        """Spatial sizes must be multiples of this."""
        return 2 ** (self.levels - 1)

    def forward(self, x, t):
        emb = self.time_mlp(timestep_embedding(t, self.config["time_dim"]))
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = F.avg_pool3d(x, 2)
            x = block(x, emb)
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(self.levels - 1)):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], dim=1), emb)
        return self.head(x)


def q_sample(model, x0, t, noise):
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (the forward VP process)."""
    a = model.alphas_bar[t].view(-1, 1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def dsm_loss(model, chi_ppm, rng):
    """Denoising score matching (DDPM epsilon-prediction, Ho et al. 2020):
    mean squared error of the predicted noise at a uniform random timestep,
    on ``chi_ppm / chi_scale_ppm`` patches ``[B, 1, X, Y, Z]``. ``rng``: a
    numpy generator (timesteps and noise; the training loop restores it on
    resume)."""
    x0 = chi_ppm / model.config["chi_scale_ppm"]
    n = x0.shape[0]
    t = torch.from_numpy(rng.integers(0, model.config["timesteps"], size=n)).to(x0.device)
    noise = torch.from_numpy(rng.standard_normal(x0.shape, dtype=np.float32)).to(x0.device)
    return F.mse_loss(model(q_sample(model, x0, t, noise), t).float(), noise)


#: Timestep and noise seed of the validation denoising score (:func:`denoise_check`).
CHECK_T, CHECK_SEED = 200, 1234


def denoise_check(model, chi_ppm, t=CHECK_T, seed=CHECK_SEED):
    """The prior's one-step estimate ``x0_hat`` (ppm) of ``chi_ppm`` noised to
    timestep ``t`` with a fixed noise seed: a deterministic validation score
    of the network (its NRMSE to the truth; 0 noise would be trivial)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(chi_ppm.shape, generator=gen).to(chi_ppm.device)
    x0 = chi_ppm / model.config["chi_scale_ppm"]
    tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    a = model.alphas_bar[t]
    xt = q_sample(model, x0, tt, noise)
    eps = model(xt, tt).float()
    return (xt - (1 - a).sqrt() * eps) / a.sqrt() * model.config["chi_scale_ppm"]


# ---------------------------------------------------------------------------
# patches


def _starts(n, tile, step):
    if n <= tile:
        return [0]
    return sorted(set(list(range(0, n - tile, step)) + [n - tile]))


def patch_grid(shape, patch=48, overlap=8):
    """Slices of overlapping ``patch``^3 patches covering ``shape`` (the last
    patch of each axis flush with the end; an axis shorter than ``patch`` is
    one patch)."""
    if overlap >= patch:
        raise ValueError(f"overlap ({overlap}) must be smaller than the patch ({patch})")
    grids = [[slice(s, s + min(patch, n)) for s in _starts(n, patch, patch - overlap)]
             for n in shape]
    return [(a, b, c) for a in grids[0] for b in grids[1] for c in grids[2]]


def patch_average(fn, x, slices, keep=None):
    """``sum_p fn(x[p]) / count`` over the patches ``slices`` of ``x``
    (``[B, C, X, Y, Z]``), and the overlap count (``[X, Y, Z]``). ``keep``:
    a boolean per patch (False: not computed); voxels no computed patch
    covers have count 0 and value 0. A constant map gives the same constant
    everywhere, whatever the overlaps: no seams."""
    total = torch.zeros_like(x)
    count = torch.zeros(x.shape[-3:], dtype=x.dtype, device=x.device)
    for i, sl in enumerate(slices):
        if keep is not None and not keep[i]:
            continue
        full = (Ellipsis,) + sl
        total[full] += fn(x[full])
        count[sl] += 1
    return total / count.clamp(min=1), count


# ---------------------------------------------------------------------------
# forward operators (all on [1, 1, X, Y, Z] tensors; ``adjoint`` their transposes)


class MaskedDipole:
    """``A x = M (d * x)``: the masked dipole convolution of
    :class:`~qsmprep.dl.dipole.DipoleOperator` (true voxel size, B0 direction)."""

    def __init__(self, shape, voxel_size_mm, b0_dir, mask, device="cpu"):
        self.dipole = DipoleOperator(shape, voxel_size_mm, b0_dir, device=device)
        self.mask = mask

    def __call__(self, x):
        return self.mask * self.dipole(x)

    def adjoint(self, r):
        return self.dipole.adjoint(self.mask * r)


class Downsample:
    """Down-sampling by an integer ``factor`` per axis: ``"kspace"`` keeps the
    central ``1/factor`` of k-space (the physics of a lower-resolution
    acquisition), ``"block"`` averages ``factor^3`` blocks. Both keep
    constants; the high-resolution shape is ``factor`` times the low one.
    :meth:`zero_filled` is the k-space zero-filled (minimum-norm) up-sampling."""

    def __init__(self, shape_hr, factor=2, mode="kspace"):
        if mode not in ("kspace", "block"):
            raise ValueError(f"down-sampling mode must be 'kspace' or 'block', got {mode!r}")
        self.factor, self.mode = int(factor), mode
        self.shape_hr = tuple(int(n) for n in shape_hr)
        if any(n % self.factor for n in self.shape_hr):
            raise ValueError(f"shape {self.shape_hr} is not a multiple of the factor {factor}")
        self.shape_lr = tuple(n // self.factor for n in self.shape_hr)
        self.scale = math.sqrt(np.prod(self.shape_lr) / np.prod(self.shape_hr))
        # central k-space indices (in fftshift order) of the low-resolution grid
        self._centre = tuple(slice(h // 2 - lo // 2, h // 2 - lo // 2 + lo)
                             for h, lo in zip(self.shape_hr, self.shape_lr))

    def __call__(self, x):
        if self.mode == "block":
            return F.avg_pool3d(x, self.factor)
        k = torch.fft.fftshift(torch.fft.fftn(x, dim=(-3, -2, -1), norm="ortho"), dim=(-3, -2, -1))
        k = k[(Ellipsis,) + self._centre]
        y = torch.fft.ifftn(torch.fft.ifftshift(k, dim=(-3, -2, -1)), dim=(-3, -2, -1),
                            norm="ortho")
        return y.real * self.scale

    def adjoint(self, y):
        if self.mode == "block":
            f = self.factor
            up = y.repeat_interleave(f, -3).repeat_interleave(f, -2).repeat_interleave(f, -1)
            return up / f**3
        k = torch.fft.fftshift(torch.fft.fftn(y, dim=(-3, -2, -1), norm="ortho"), dim=(-3, -2, -1))
        full = torch.zeros(y.shape[:-3] + self.shape_hr, dtype=k.dtype, device=y.device)
        full[(Ellipsis,) + self._centre] = k
        x = torch.fft.ifftn(torch.fft.ifftshift(full, dim=(-3, -2, -1)), dim=(-3, -2, -1),
                            norm="ortho")
        return x.real * self.scale

    def zero_filled(self, y):
        """The minimum-norm up-sampling ``A^T y / ||A||^2`` (k-space zero
        filling; nearest-neighbour for ``"block"``): constants stay."""
        return self.adjoint(y) / self.scale**2


class Composed:
    """``A = outer(inner(x))`` (dipole convolution, then down-sampling)."""

    def __init__(self, outer, inner):
        self.outer, self.inner = outer, inner

    def __call__(self, x):
        return self.outer(self.inner(x))

    def adjoint(self, r):
        return self.inner.adjoint(self.outer.adjoint(r))


class Masked:
    """``A = M op`` on the operator's output grid."""

    def __init__(self, op, mask):
        self.op, self.mask = op, mask

    def __call__(self, x):
        return self.mask * self.op(x)

    def adjoint(self, r):
        return self.op.adjoint(self.mask * r)


# ---------------------------------------------------------------------------
# the sampler


def ddim_times(t_start, steps):
    """Descending integer timesteps ``t_start = tau_1 > ... > tau_n >= 0`` of
    the reduced schedule (``steps`` of them, evenly spaced)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    taus = np.unique(np.round(np.linspace(0, t_start, steps)).astype(int))[::-1]
    return [int(t) for t in taus]


def dps_sample(model, y, operator, start, mask, *, steps=SAMPLING["steps"],
               t_start=SAMPLING["t_start"], xi=SAMPLING["xi"], eta=SAMPLING["eta"],
               seed=SAMPLING["seed"], patch=SAMPLING["patch"], overlap=SAMPLING["overlap"],
               jacobian=SAMPLING["jacobian"], precision="fp32", history=None, log=LOGGER,
               log_every_s=30.0):
    """Diffusion posterior sampling of chi (ppm, ``[1, 1, X, Y, Z]``).

    Parameters
    ----------
    model : ScoreUNet (eval mode)
    y : tensor
        Measurements, in the units of ``operator(chi_ppm)`` (ppm).
    operator : callable with ``.adjoint``
        The forward model ``A`` on chi (ppm), masked where the data are.
    start : tensor ``[1, 1, X, Y, Z]``
        Closed-form chi estimate (ppm): noised to ``t_start`` (SDEdit).
    mask : tensor ``[1, 1, X, Y, Z]``
        Support of chi (0/1): the estimate ``x0_hat`` is zero outside.
    steps, t_start, eta : reduced DDIM schedule (:func:`ddim_times`), its
        stochasticity (0 deterministic, 1 DDPM-like).
    xi : the DPS step on ``||y - A x0_hat||^2`` (in units of
        ``chi_scale_ppm``; the paper: 0.5 inversion, 2 super-resolution).
    seed : the start's noise and every later draw (same seed, same map).
    patch, overlap : the sampling patches (:func:`patch_grid`).
    jacobian : exact DPS gradient through the network (else
        ``d x0_hat / d x_t ~ 1 / sqrt(abar_t)``).
    history : list, optional; gets ``||W(y - A x0_hat)|| / ||y||`` of every step.

    Returns chi (ppm) ``[1, 1, X, Y, Z]``: the last step's ``x0_hat`` with
    its data-consistency step, zero outside ``mask``.
    """
    scale = model.config["chi_scale_ppm"]
    device = start.device
    gen = torch.Generator(device="cpu").manual_seed(int(seed))

    def randn(shape):
        return torch.randn(shape, generator=gen).to(device)

    shape = start.shape[-3:]
    m = model.multiple
    if any(n % m for n in shape):
        raise ValueError(f"dps_sample needs sizes that are multiples of {m}, got {tuple(shape)}")
    patch = max(m, (min(patch, max(shape)) // m) * m)
    slices = patch_grid(shape, patch, min(overlap, patch - m))
    keep = [bool(mask[(Ellipsis,) + sl].any()) for sl in slices]
    y = y / scale
    ynorm = float(y.norm()) or 1.0
    taus = ddim_times(t_start, steps)
    abar = model.alphas_bar.to(device)
    a0 = abar[taus[0]]
    x = a0.sqrt() * (start / scale) * mask + (1 - a0).sqrt() * randn(start.shape)
    t0 = last_log = time.monotonic()
    for i, t in enumerate(taus):
        a = abar[t]
        a_prev = abar[taus[i + 1]] if i + 1 < len(taus) else torch.ones((), device=device)
        tt = torch.full((1,), t, dtype=torch.long, device=device)

        def eps_fn(xp, tt=tt):
            with autocast(precision, device):
                return model(xp, tt).float()

        with torch.no_grad():
            eps, count = patch_average(eps_fn, x, slices, keep)
            # voxels of no computed patch (all background): the noise of x0_hat = 0
            eps = torch.where(count > 0, eps, x / (1 - a).sqrt())
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt() * mask
        x0 = x0.detach().requires_grad_(True)
        residual = y - operator(x0)
        loss = (residual**2).sum()
        (grad_x0,) = torch.autograd.grad(loss, x0)
        if history is not None:
            history.append(float(residual.detach().norm()) / ynorm)
        with torch.no_grad():
            grad = grad_x0 * mask / a.sqrt()  # d x0_hat / d x_t without the network
        if jacobian:
            g = (-(1 - a).sqrt() / a.sqrt()) * grad_x0 * mask

            def vjp(xp, sl_g):
                xp = xp.detach().requires_grad_(True)
                with torch.enable_grad():
                    (gx,) = torch.autograd.grad(eps_fn(xp), xp, grad_outputs=sl_g)
                return gx

            for k, sl in enumerate(slices):
                if keep[k]:
                    full = (Ellipsis,) + sl
                    grad[full] += vjp(x[full], g[full] / count[sl].clamp(min=1))
        with torch.no_grad():
            sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0).sqrt()
            direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
            x = a_prev.sqrt() * x0.detach() + direction
            if eta > 0 and i + 1 < len(taus):
                x = x + sigma * randn(x.shape)
            x = x - xi * grad
        now = time.monotonic()
        if log is not None and (now - last_log >= log_every_s or i + 1 == len(taus)):
            last_log = now
            log.info("DM-QSM sampling: step %d/%d (t=%d), relative data residual %.4f, "
                     "%.0f s", i + 1, len(taus), t, float(residual.detach().norm()) / ynorm,
                     now - t0)
    return x * mask * scale


# ---------------------------------------------------------------------------
# Python API


def _model_cached(device, models_dir=None):
    from .methods import _model
    if models_dir is not None:
        from .methods import load_model
        return load_model("dmqsm", device, models_dir)
    return _model("dmqsm", device)


def _bbox(mask, margin, multiple):
    """Slices of ``mask``'s bounding box plus ``margin``, and padding widths
    that bring it to a multiple of ``multiple``."""
    from ..qsm.mask import bbox_slices

    box = bbox_slices(mask, margin=margin)
    pads = [(0, -(sl.stop - sl.start) % multiple) for sl in box]
    return box, pads


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
    The volume is cropped to the mask's bounding box (+8 voxels) to sample."""
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
    box, pads = _bbox(mask, 8, model.multiple)
    field = to_tensor(np.pad(local[box], pads), dev)
    m = to_tensor(np.pad(mask[box], pads), dev)
    op = MaskedDipole(field.shape[-3:], voxel_size_mm, b0_dir, m, dev)
    start = op.dipole.tkd(field * m, TKD_THRESHOLD) * m
    chi = dps_sample(model, field * m, op, start, m, history=history, **opts)
    out = np.zeros(mask.shape, np.float32)
    crop = tuple(slice(0, sl.stop - sl.start) for sl in box)
    out[box] = to_numpy(chi)[crop]
    return out


def _upsampled_mask(mask_lr, factor):
    m = np.asarray(mask_lr) > 0
    for ax in range(3):
        m = np.repeat(m, factor, axis=ax)
    return m


def super_resolve(chi_lowres, factor=2, mask=None, *, mode="kspace", project=True,
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
    abstract). Returns chi (ppm) ``factor`` times larger per axis."""
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
    chi = dps_sample(model, y, down, start, m, history=history, **opts)
    if project:
        # the measured band exactly: chi + D^+(y - D chi) (D^+ = the zero-filled up-sampling)
        chi = (chi + down.zero_filled(y - down(chi))) * m
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
