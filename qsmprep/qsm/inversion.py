"""Dipole inversion: local field (ppm) -> susceptibility chi (ppm).

Every method has the inversion stage signature of :mod:`qsmprep.qsm.registry`::

    f(local_field_ppm, mask, voxel_size_mm, *, b0_dir, **params) -> chi_ppm

The field is cropped to the mask's bounding box and zero-padded to a fast FFT
size (``pad_factor`` times the box) to limit wrap-around of the dipole.
"""

from __future__ import annotations

import numpy as np
import torch

from . import torch_ops as T
from .fft import fftn, ifftn
from .kernels import dipole_kernel
from .mask import MaskBox
from .registry import register


def _check_field(field, mask):
    field = np.asarray(field, dtype=np.float32)
    if field.shape != np.shape(mask) or field.ndim != 3:
        raise ValueError(
            f"Expected a 3-D local field and a mask of the same shape, got "
            f"{field.shape} and {np.shape(mask)}"
        )
    return field


@register(
    "inversion",
    "tkd",
    summary="Thresholded k-space division",
    citations=("shmueli2009tkd", "wharton2010tkd"),
    defaults={"threshold": 0.15, "pad_factor": 1.5},
    description=(
        "The dipole inversion used thresholded k-space division (TKD) with threshold "
        "{threshold}."
    ),
)
def tkd(local_field_ppm, mask, voxel_size_mm, *, b0_dir=(0.0, 0.0, 1.0), threshold=0.15,
        pad_factor=1.5):
    """Thresholded k-space division (Shmueli 2009; Wharton 2010).

    ``chi = F^-1{ F{f} / D }`` with ``1/D`` replaced by ``sign(D)/t`` where
    ``|D| < t`` (``D(0) = 0`` gives a zero-mean chi over the padded grid).

    Parameters
    ----------
    local_field_ppm : ndarray (X, Y, Z)
    mask : ndarray of bool (X, Y, Z)
    voxel_size_mm : tuple of 3 floats
    b0_dir : unit vector in voxel axes
    threshold : float
        Truncation level ``t`` of the kernel (0.1-0.2 typical).
    pad_factor : float
        Zero-padding of the mask's bounding box before the FFT.
    """
    field = _check_field(local_field_ppm, mask)
    grid = MaskBox(mask, pad_factor=pad_factor)
    d = dipole_kernel(grid.shape, voxel_size_mm, b0_dir)
    with np.errstate(divide="ignore"):
        inv = np.where(np.abs(d) >= threshold, 1.0 / d, np.sign(d) / threshold)
    chi = ifftn(fftn(grid.pad(field)) * inv.astype(np.float32))
    return grid.unpad(chi)


@register(
    "inversion",
    "tv",
    summary="Total-variation regularised inversion (ADMM, closed-form k-space update)",
    citations=("bilgic2014tv",),
    defaults={"lam": 5e-4, "rho": None, "max_iter": 60, "tol": 1e-3, "pad_factor": 1.5,
              "device": "cpu"},
    description=(
        "The dipole inversion used total-variation regularisation solved with ADMM "
        "(Bilgic et al. 2014; lambda {lam}, at most {max_iter} iterations)."
    ),
)
def tv_admm(local_field_ppm, mask, voxel_size_mm, *, b0_dir=(0.0, 0.0, 1.0), lam=5e-4,
            rho=None, max_iter=60, tol=1e-3, pad_factor=1.5, device="cpu"):
    """Total-variation dipole inversion by ADMM (Bilgic et al. 2014).

    Solves ``min_chi 1/2 ||D chi - f||^2 + lam ||grad chi||_1`` with the
    splitting ``z = grad chi``; the chi update is closed-form in k-space,
    ``X = (D F{f} + rho E^H F{z - u}) / (D^2 + rho |E|^2)``, and ``z`` is a
    soft threshold of ``grad chi + u`` at ``lam / rho``. Gradients are forward
    differences in voxel units.

    Parameters
    ----------
    lam : float
        TV weight for fields in ppm (2e-4..1e-3 typical).
    rho : float, optional
        ADMM penalty; default ``100 * lam``.
    max_iter : int
    tol : float
        Stop when the relative change of chi falls below ``tol``.
    device : str
        Torch device, e.g. "cpu" or "cuda".
    """
    field = _check_field(local_field_ppm, mask)
    rho = 100.0 * lam if rho is None else float(rho)
    grid = MaskBox(mask, pad_factor=pad_factor)
    shape = grid.shape
    f_k = T.rfft3(T.as_tensor(grid.pad(field), device))
    d = T.dipole_kernel_t(shape, voxel_size_mm, b0_dir, device)
    denom = d**2 + rho * T.grad_norm2_t(shape, device)
    denom[denom == 0] = 1.0  # k = 0: chi's mean is not determined; keep it 0
    d_f = d * f_k
    x = T.irfft3(d_f / denom, shape)
    z = T.grad(x)
    u = torch.zeros_like(z)
    for _ in range(int(max_iter)):
        x_old = x
        x = T.irfft3((d_f + rho * T.rfft3(T.grad_adj(z - u))) / denom, shape)
        gx = T.grad(x)
        z = T.soft_threshold(gx + u, lam / rho)
        u += gx - z
        if torch.linalg.vector_norm(x - x_old) <= tol * torch.linalg.vector_norm(x):
            break
    return grid.unpad(T.to_numpy(x))
