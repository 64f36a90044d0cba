"""Background field removal: total field (ppm) -> local field (ppm).

Every method has the bf_removal stage signature of :mod:`qsmprep.qsm.registry`::

    f(total_field_ppm, mask, voxel_size_mm, *, b0_dir, **params) -> (local_field_ppm, mask_out)

The background field is harmonic inside the brain, so a spherical mean value
(SMV) filter ``delta - S_r`` removes it wherever the whole sphere lies inside
the mask (Li & Leigh 2001; Schweser et al. 2011).
"""

from __future__ import annotations

import numpy as np
import torch

from . import torch_ops as T
from .fft import fftn, ifftn
from .kernels import smv_kernel
from .mask import MaskBox, check_volume, erode


def default_radii_mm(voxel_size_mm, max_radius_mm=12.0, min_radius_mm=None):
    """V-SHARP radii: from ``max_radius_mm`` down to ``min_radius_mm``
    (default twice the largest voxel size) in steps of the largest voxel size."""
    step = float(max(voxel_size_mm))
    lo = 2.0 * step if min_radius_mm is None else float(min_radius_mm)
    return tuple(float(r) for r in np.arange(float(max_radius_mm), lo - 1e-6, -step))


def _sharp(field, mask, voxel_size_mm, radii, threshold):
    """SMV high-pass with per-voxel radius, then truncated deconvolution by the largest."""
    box = MaskBox(mask, margin=np.ceil(radii[0] / min(voxel_size_mm)))
    f_k = fftn(box.pad(field))
    mask_p = box.pad(mask) > 0
    high_pass = np.zeros(box.shape, dtype=np.float32)
    covered = np.zeros(box.shape, dtype=bool)
    for r in radii:
        inside = erode(mask_p, r, voxel_size_mm) & ~covered
        if inside.any():
            hp = 1.0 - smv_kernel(box.shape, voxel_size_mm, r)
            high_pass[inside] = np.real(ifftn(hp * f_k))[inside]
            covered |= inside
    if not covered.any():
        raise ValueError(f"The mask has no voxel farther than {radii[-1]} mm from its edge")
    deconv = 1.0 - smv_kernel(box.shape, voxel_size_mm, radii[0])
    with np.errstate(divide="ignore"):
        inv = np.where(np.abs(deconv) >= threshold, 1.0 / deconv, 0.0).astype(np.float32)
    local = np.real(ifftn(fftn(high_pass) * inv)) * covered
    mask_out = box.unpad(covered) > 0
    return box.unpad(local, mask_out), mask_out


def vsharp(total_field_ppm, mask, voxel_size_mm, *, b0_dir=None, max_radius_mm=12.0,
           min_radius_mm=None, threshold=0.05):
    """V-SHARP background field removal (Wu et al. 2012; Schweser et al. 2011).

    For radii ``r`` from large to small, each voxel takes the high-passed
    field ``(delta - S_r) * f`` of the largest ``r`` whose eroded mask
    contains it (the sphere around it lies in the mask). The result is
    deconvolved by ``delta - S_rmax``, truncated where ``|1 - S| < threshold``.

    Parameters
    ----------
    total_field_ppm : ndarray (X, Y, Z)
    mask : ndarray of bool (X, Y, Z)
    voxel_size_mm : tuple of 3 floats
    b0_dir : ignored (SMV filtering does not depend on B0)
    max_radius_mm, min_radius_mm : float
        Radius range (see :func:`default_radii_mm`).
    threshold : float
        Truncation of the deconvolution kernel.

    Returns
    -------
    local_field_ppm : ndarray (X, Y, Z), zero outside ``mask_out``
    mask_out : ndarray of bool, the mask eroded by the smallest radius
    """
    del b0_dir
    field = check_volume(total_field_ppm, mask, "total field")
    radii = default_radii_mm(voxel_size_mm, max_radius_mm, min_radius_mm)
    if not radii:
        raise ValueError(f"No V-SHARP radius between {max_radius_mm} and {min_radius_mm} mm")
    return _sharp(field, mask, voxel_size_mm, radii, threshold)


def sharp(total_field_ppm, mask, voxel_size_mm, *, b0_dir=None, radius_mm=6.0, threshold=0.05):
    """SHARP (Schweser et al. 2011): ``M_r F^-1{ F{M_r (delta - S_r) * f} / (1 - S_r) }``,
    truncated where ``|1 - S_r| < threshold``; the mask is eroded by ``radius_mm``."""
    del b0_dir
    field = check_volume(total_field_ppm, mask, "total field")
    return _sharp(field, mask, voxel_size_mm, (float(radius_mm),), threshold)


def resharp(total_field_ppm, mask, voxel_size_mm, *, b0_dir=None, radius_mm=5.0, lam=1e-4,
            max_iter=200, tol=1e-3, device="cpu"):
    """RESHARP (Sun & Wilman 2014): ``min_l ||M_r C (f - l)||^2 + lam ||l||^2``.

    ``C`` is the SMV high-pass ``delta - S_r`` and ``M_r`` the mask eroded by
    ``radius_mm``; the normal equations ``(C M_r C + lam) l = C M_r C f`` are
    solved by conjugate gradients (``C`` is symmetric).
    """
    del b0_dir
    field = check_volume(total_field_ppm, mask, "total field")
    r = float(radius_mm)
    box = MaskBox(mask, margin=np.ceil(r / min(voxel_size_mm)))
    m_e = T.as_tensor(erode(box.pad(mask) > 0, r, voxel_size_mm), device)
    if not m_e.any():
        raise ValueError(f"The mask has no voxel farther than {r} mm from its edge")
    hp = 1.0 - T.smv_kernel_t(box.shape, voxel_size_mm, r, device)

    def c(x):
        return T.irfft3(hp * T.rfft3(x), box.shape)

    def normal(x):
        return c(m_e * c(x)) + lam * x

    f = T.as_tensor(box.pad(field), device)
    local, _ = T.cg(normal, c(m_e * c(f)), max_iter=max_iter, tol=tol)
    mask_out = box.unpad(T.to_numpy(m_e)) > 0
    return box.unpad(T.to_numpy(local), mask_out), mask_out


def _data_weights(mask, noise_std_ppm):
    """``1 / noise_std_ppm`` in the mask, scaled to mean 1 (uniform when
    ``noise_std_ppm`` is None); so only relative values of N_std matter."""
    mask = np.asarray(mask, dtype=bool)
    if noise_std_ppm is None:
        return mask.astype(np.float32)
    noise_std_ppm = np.asarray(noise_std_ppm, dtype=np.float32)
    if noise_std_ppm.shape != mask.shape:
        raise ValueError(f"Expected noise_std_ppm of shape {mask.shape}, "
                         f"got {noise_std_ppm.shape}")
    ok = mask & np.isfinite(noise_std_ppm) & (noise_std_ppm > 0)
    w = np.where(ok, 1.0 / np.where(ok, noise_std_ppm, 1.0), 0.0)
    return (w / w[ok].mean()).astype(np.float32) if ok.any() else mask.astype(np.float32)


def pdf(total_field_ppm, mask, voxel_size_mm, *, b0_dir, noise_std_ppm=None,
        pad_factor=1.5, max_iter=50, tol=1e-3, device="cpu"):
    """Projection onto dipole fields (Liu et al. 2011).

    Background sources ``chi_b`` live outside the mask ``M``:
    ``min ||W M (f - D (1 - M) chi_b)||^2``, solved by CG on the normal
    equations; the local field is ``M (f - D (1 - M) chi_b)``. ``W`` is
    ``1 / noise_std_ppm`` (e.g. MEDI's N_std from the echo fit), uniform if None.
    The field is zero-padded by ``pad_factor`` so that sources may lie beyond
    the field of view. CG stops at a relative residual ``tol`` (1e-3 is
    reached in about 25 iterations on the Challenge 2.0 head and is as
    accurate as running on; 1e-2 stops after a few iterations and leaves
    much of the background in the local field: NRMSE 92 instead of 50 %).
    """
    field = check_volume(total_field_ppm, mask, "total field")
    box = MaskBox(mask, pad_factor=pad_factor)
    m = T.as_tensor(box.pad(mask), device)
    w2 = T.as_tensor(box.pad(_data_weights(mask, noise_std_ppm)), device) ** 2
    d = T.dipole_kernel_t(box.shape, voxel_size_mm, b0_dir, device)

    def dconv(x):
        return T.irfft3(d * T.rfft3(x), box.shape)

    f = T.as_tensor(box.pad(field), device)
    chi_b = fit_outside_sources(dconv, f, m, w2, max_iter=max_iter, tol=tol)
    local = m * (f - dconv(chi_b))
    return box.unpad(T.to_numpy(local)), np.asarray(mask, dtype=bool).copy()


def keep_total_field(total_field_ppm, mask, voxel_size_mm, *, b0_dir=None):
    """No background removal: the total field (ppm) in the mask, for an inversion
    that fits the background sources itself (``tfi``). Returns (field, mask)."""
    field = check_volume(total_field_ppm, mask, "total field")
    mask = np.asarray(mask, dtype=bool)
    return np.where(mask, field, 0).astype(np.float32), mask.copy()


def fit_outside_sources(dconv, f, m, w2, *, max_iter=50, tol=1e-3):
    """PDF's fit: the sources ``chi_b`` outside the mask ``m`` (tensors on one
    grid) whose field ``dconv(chi_b)`` best explains ``f`` in the mask,
    ``min ||W M (f - D (1 - M) chi_b)||^2`` by CG on the normal equations.
    Returns ``(1 - m) chi_b`` (ppm; 0 in the mask)."""
    def normal(x):
        return (1 - m) * dconv(w2 * dconv((1 - m) * x))

    chi_b, _ = T.cg(normal, (1 - m) * dconv(w2 * f), max_iter=max_iter, tol=tol)
    return (1 - m) * chi_b


def ismv(total_field_ppm, mask, voxel_size_mm, *, b0_dir=None, radius_mm=5.0, max_iter=500,
         tol=1e-3, device="cpu"):
    """iSMV (Wen et al. 2014): the background is harmonic, so it equals its
    spherical mean inside the eroded mask ``M_e``; iterate
    ``f_b <- M_e (S_r * f_b) + (M - M_e) f`` from ``f_b = f`` until the
    relative update is below ``tol``. Local field ``M_e (f - f_b)``.
    """
    del b0_dir
    field = check_volume(total_field_ppm, mask, "total field")
    r = float(radius_mm)
    box = MaskBox(mask, margin=np.ceil(r / min(voxel_size_mm)))
    m = T.as_tensor(box.pad(mask), device)
    m_e = T.as_tensor(erode(box.pad(mask) > 0, r, voxel_size_mm), device)
    if not m_e.any():
        raise ValueError(f"The mask has no voxel farther than {r} mm from its edge")
    s = T.smv_kernel_t(box.shape, voxel_size_mm, r, device)
    f = T.as_tensor(box.pad(field), device)
    rim = (m - m_e) * f
    f_b = f.clone()
    for _ in range(int(max_iter)):
        new = m_e * T.irfft3(s * T.rfft3(f_b), box.shape) + rim
        change = torch.linalg.vector_norm(new - f_b)
        f_b = new
        if change <= tol * torch.linalg.vector_norm(m_e * f_b):
            break
    mask_out = box.unpad(T.to_numpy(m_e)) > 0
    return box.unpad(T.to_numpy(m_e * (f - f_b)), mask_out), mask_out


def _pool_min(mask):
    """A coarse voxel is inside when all its 2x2x2 children are."""
    return -torch.nn.functional.max_pool3d(-mask[None, None], 2)[0, 0]


def lbv(total_field_ppm, mask, voxel_size_mm, *, b0_dir=None, levels=4, max_iter=300,
        tol=1e-4, device="cpu"):
    """Laplacian boundary value background removal (Zhou et al. 2014).

    The background is harmonic in the mask and equals the total field on its
    boundary, so the local field ``l`` solves ``lap l = lap f`` on the mask
    interior with ``l = 0`` on the boundary (voxels with a neighbour outside).
    Instead of the paper's full multigrid this solves the Dirichlet problem by
    cascadic conjugate gradients: CG on a 2x-coarsened grid (``levels`` of
    them), trilinear prolongation as the start of the next finer CG; the
    coarse solves remove the slow modes that make plain CG slow.

    Returns the local field on the interior, and the interior mask.
    """
    del b0_dir
    field = check_volume(total_field_ppm, mask, "total field")
    box = MaskBox(mask, margin=2 ** int(levels))
    mult = 2 ** int(levels)
    grow = [(0, (-n) % mult) for n in box.shape]
    f = T.as_tensor(np.pad(box.pad(field), grow), device)
    m = T.as_tensor(np.pad(box.pad(mask), grow), device)
    # interior: mask voxels whose 6 neighbours are in the mask
    interior = m * sum(torch.roll(m, s, dims=d) for d in range(3) for s in (1, -1)) == 6
    interior = interior.to(f.dtype)
    if not interior.any():
        raise ValueError("The mask has no interior voxel")
    b = -interior * T.laplacian(m * f, voxel_size_mm)
    pyramid = [(interior, b, tuple(float(v) for v in voxel_size_mm))]
    for _ in range(int(levels)):
        mi, bi, vi = pyramid[-1]
        pyramid.append((_pool_min(mi), T.block_mean2(bi) * _pool_min(mi), tuple(2 * v for v in vi)))
    x = None
    for mi, bi, vi in reversed(pyramid):
        x = None if x is None else T.upsample2(x) * mi
        x, _ = T.cg(lambda y, mi=mi, vi=vi: -mi * T.laplacian(mi * y, vi), bi, x,
                    max_iter=max_iter, tol=tol)
    crop = tuple(slice(0, n) for n in box.shape)
    local = T.to_numpy(x * interior)[crop]
    mask_out = box.unpad(T.to_numpy(interior)[crop]) > 0
    return box.unpad(local, mask_out), mask_out
