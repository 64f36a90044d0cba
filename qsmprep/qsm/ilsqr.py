"""The solvers behind the ``lsqr`` and ``ilsqr`` inversions
(:mod:`qsmprep.qsm.inversion`): the weighted least squares by CG, and iLSQR's
streak-free FastQSM estimate, gradient weights, ill-conditioned cone and
streaking-artefact solve (Li et al., NeuroImage 2015;108:111-122; LSQR step:
Li, Wu, Liu, NeuroImage 2011;55:1645-1656). Torch tensors on the padded grid.
"""

from __future__ import annotations

import numpy as np
import torch

from . import torch_ops as T
from .bgremove import _data_weights
from .kernels import dipole_kernel, half_spectrum
from .mask import MaskBox


def _masked_lsq(f, w2, d, shape, max_iter, tol):
    """CG on the normal equations of ``min ||W (D chi - f)||^2`` (CGLS; the same
    iterates as LSQR in exact arithmetic). Early stopping regularises."""

    def dconv(x):
        return T.irfft3(d * T.rfft3(x), shape)

    chi, _ = T.cg(lambda x: dconv(w2 * dconv(x)), dconv(w2 * f), max_iter=max_iter, tol=tol)
    return chi


def _quantiles(x, qs):
    """Quantiles ``qs`` (fractions) of the values of a tensor: the sorted value at
    1-based rank ``round(q N)`` (no interpolation, as STI Suite)."""
    x = x.reshape(-1)
    return [float(torch.kthvalue(x, min(max(round(q * x.numel()), 1), x.numel())).values)
            for q in qs]


def _kspace_ball_window(shape, radius, device):
    """Image-space factor ``h`` such that ``F{x h}`` is ``F{x}`` averaged over the
    k-space neighbours ``0 < |o| <= radius`` (in k-space index units) of every
    k. ``h(n) = sum_o K(o) cos(2 pi o.(n - c)/N)`` with ``K`` the normalised
    ball and ``c`` the grid centre (STI Suite's k-space convolution of the
    centred image; MaskBox centres the brain)."""
    r = int(radius)
    o = np.arange(-r, r + 1)
    oo = o[:, None, None] ** 2 + o[None, :, None] ** 2 + o[None, None, :] ** 2
    ball = ((oo > 0) & (oo <= radius**2)).astype(np.float64)
    ball /= ball.sum()
    kern = np.zeros(shape, dtype=np.float64)
    idx = np.ix_(*[np.arange(-r, r + 1) % n for n in shape])
    kern[idx] = ball
    # sum_o K(o) e^{2 pi i o.n/N}: K is real and even, so a real inverse FFT of its half
    h = np.fft.irfftn(half_spectrum(kern), s=shape, axes=(0, 1, 2)) * np.prod(shape)
    h = np.roll(h, [n // 2 for n in shape], axis=(0, 1, 2))
    return T.as_tensor(h, device)


def _fast_qsm(f_k, d, m, shape, radius=3.0, ramp=(0.01, 0.3)):
    """Streak-free structural estimate (FastQSM of Li et al. 2015, as in STI Suite).

    ``X = sign(D) F{f}`` (``= |D| X_true``: no division, hence no streaking),
    blended near the cone with its k-space average over a ball of ``radius``:
    ``X <- w X + (1 - w) (K * X)``, ``w`` a log ramp of ``|D|`` from its
    ``ramp[0]`` to its ``ramp[1]`` quantile (0 on the cone, 1 beyond); masked in
    image space and blended again. Only its gradients' ranks are used, so the
    overall scale (STI rescales to TKD) does not matter.
    """
    ad = torch.abs(d)
    lo, hi = _quantiles(ad, ramp)
    lo = max(lo, 1e-6)
    w = torch.clamp(torch.log(ad.clamp_min(1e-12) / lo) / np.log(max(hi / lo, 1.0 + 1e-6)),
                    0.0, 1.0)
    h = _kspace_ball_window(shape, radius, f_k.device)
    x_k = torch.sign(d) * f_k
    x = T.irfft3(x_k, shape)
    x = m * T.irfft3(w * x_k + (1 - w) * T.rfft3(x * h), shape)
    x_k = T.rfft3(x)
    return m * T.irfft3(w * x_k + (1 - w) * T.rfft3(x * h), shape)


def _gradient_weights(x, m, low=0.5, high=0.7):
    """Per-direction weights from ``|grad x|`` ranked over the mask (three
    directions pooled): 1 below the ``low`` quantile, 0 above ``high``, linear
    between; 0 outside the mask. (3, X, Y, Z)"""
    g = torch.abs(T.grad(x))
    inside = m > 0
    t_low, t_high = _quantiles(g[:, inside], (low, high))
    if t_high > t_low:
        w = torch.clamp((t_high - g) / (t_high - t_low), 0.0, 1.0)
    else:
        w = (g <= t_low).to(x.dtype)
    return w * m


def _cone(shape, voxel_size_mm, b0_dir, threshold, device):
    """Half-spectrum indicator of the ill-conditioned cone ``|D| < threshold``,
    from the symmetrised half spectrum (:func:`qsmprep.qsm.kernels.half_spectrum`:
    the even part ``(D(k) + D(-k)) / 2``), so that ``F^-1 M_ic F`` is an exact
    (real, symmetric) projection also with an oblique B0 on even grids."""
    d = dipole_kernel(shape, voxel_size_mm, b0_dir, half=True)
    return T.as_tensor(np.abs(d) < threshold, device)


def _ilsqr(field, mask, voxel_size_mm, b0_dir, noise_std_ppm, threshold, lsqr_iter, lsqr_tol,
           max_iter, tol, pad_factor, device):
    """iLSQR on the padded grid; returns ``(grid, dict)`` with the padded tensors
    ``chi``, ``chi_lsqr``, ``chi_sa`` (the streaking artefact before masking:
    its spectrum lies in the cone), ``chi_fqsm``, the gradient weights ``g``
    and the kernel ``d`` (half spectrum)."""
    grid = MaskBox(mask, pad_factor=pad_factor)
    shape = grid.shape
    f = T.as_tensor(grid.pad(field), device)
    m = T.as_tensor(grid.pad(mask), device)
    w2 = T.as_tensor(grid.pad(_data_weights(mask, noise_std_ppm)), device) ** 2
    d = T.dipole_kernel_t(shape, voxel_size_mm, b0_dir, device)
    # (1) weighted LSQR of the data term
    chi_lsqr = m * _masked_lsq(f, w2, d, shape, lsqr_iter, lsqr_tol)
    # (2) structural prior from the streak-free fast estimate
    chi_fqsm = _fast_qsm(T.rfft3(f), d, m, shape)
    g2 = _gradient_weights(chi_fqsm, m) ** 2
    # (3) streaking artefact: min ||G grad(P x) - G grad chi_lsqr||^2 with P the
    # projection onto the ill-conditioned cone; CG on the normal equations from
    # x = 0 stays in range(P), so P is applied once per iteration
    cone = _cone(shape, voxel_size_mm, b0_dir, threshold, device)

    def proj(x):
        return T.irfft3(cone * T.rfft3(x), shape)

    def normal(x):
        return proj(T.grad_adj_grad(x, g2))

    chi_sa, _ = T.cg(normal, normal(chi_lsqr), max_iter=max_iter, tol=tol)
    parts = {"chi": m * (chi_lsqr - chi_sa), "chi_lsqr": chi_lsqr, "chi_sa": chi_sa,
             "chi_fqsm": chi_fqsm, "g": g2.sqrt(), "d": d}
    return grid, parts
