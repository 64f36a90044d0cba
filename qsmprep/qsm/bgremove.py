"""Background field removal: total field (ppm) -> local field (ppm).

Every method has the bf_removal stage signature of :mod:`qsmprep.qsm.registry`::

    f(total_field_ppm, mask, voxel_size_mm, *, b0_dir, **params) -> (local_field_ppm, mask_out)

The background field is harmonic inside the brain, so a spherical mean value
(SMV) filter ``delta - S_r`` removes it wherever the whole sphere lies inside
the mask (Li & Leigh 2001; Schweser et al. 2011).
"""

from __future__ import annotations

import numpy as np

from .fft import fftn, ifftn
from .kernels import smv_kernel
from .mask import MaskBox, erode
from .registry import register


def _check(field, mask):
    field = np.asarray(field, dtype=np.float32)
    if field.ndim != 3 or field.shape != np.shape(mask):
        raise ValueError(
            f"Expected a 3-D total field and a mask of the same shape, got "
            f"{field.shape} and {np.shape(mask)}"
        )
    return field


def default_radii_mm(voxel_size_mm, max_radius_mm=12.0, min_radius_mm=None):
    """V-SHARP radii: from ``max_radius_mm`` down to ``min_radius_mm``
    (default twice the largest voxel size) in steps of the largest voxel size."""
    step = float(max(voxel_size_mm))
    lo = 2.0 * step if min_radius_mm is None else float(min_radius_mm)
    return tuple(float(r) for r in np.arange(float(max_radius_mm), lo - 1e-6, -step))


@register(
    "bf_removal",
    "vsharp",
    summary="Variable-radius SHARP (SMV high-pass, truncated deconvolution)",
    citations=("schweser2011sharp", "wu2012vsharp"),
    defaults={"max_radius_mm": 12.0, "min_radius_mm": None, "threshold": 0.05},
    description=(
        "Background fields were removed with V-SHARP (SMV radii from {max_radius_mm} mm "
        "down to about two voxels, truncation {threshold})."
    ),
)
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
    field = _check(total_field_ppm, mask)
    radii = default_radii_mm(voxel_size_mm, max_radius_mm, min_radius_mm)
    if not radii:
        raise ValueError(f"No V-SHARP radius between {max_radius_mm} and {min_radius_mm} mm")
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
    deconv = 1.0 - smv_kernel(box.shape, voxel_size_mm, radii[0])
    with np.errstate(divide="ignore"):
        inv = np.where(np.abs(deconv) >= threshold, 1.0 / deconv, 0.0).astype(np.float32)
    local = np.real(ifftn(fftn(high_pass) * inv)) * covered
    mask_out = box.unpad(covered) > 0
    return box.unpad(local, mask_out), mask_out
