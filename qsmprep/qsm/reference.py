"""Susceptibility referencing: QSM gives chi up to a constant; fix that constant.

Every method has the referencing stage signature of :mod:`qsmprep.qsm.registry`::

    f(chi_ppm, mask, **params) -> chi_ppm
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .mask import erode


def _check(chi, mask):
    chi = np.asarray(chi, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if chi.shape != mask.shape:
        raise ValueError(f"Expected chi and mask of the same shape, got {chi.shape} and {mask.shape}")
    if not mask.any():
        raise ValueError("The mask is empty: no voxel to reference chi to.")
    return chi, mask


def reference_none(chi_ppm, mask):
    """Return chi unchanged (zero outside the mask)."""
    chi, mask = _check(chi_ppm, mask)
    return chi * mask


def reference_mean(chi_ppm, mask):
    """Subtract the mean chi over the mask (zero outside the mask)."""
    chi, mask = _check(chi_ppm, mask)
    return (chi - np.mean(chi[mask], dtype=np.float64)).astype(np.float32) * mask


def csf_mask(magnitude, mask, voxel_size_mm=(1.0, 1.0, 1.0), *, depth_mm=15.0, fraction=0.05,
             min_size_mm3=200.0):
    """Ventricular CSF estimate without a segmentation.

    CSF has the longest T2*, so it is the brightest tissue on the last echo
    (Liu et al. 2018, MEDI+0 used R2* < 5/s the same way). Candidates are
    the brightest ``fraction`` of the mask voxels at least ``depth_mm`` from
    the mask's edge (ventricles are central; this excludes sulcal CSF and
    vessels near the surface); connected pieces smaller than ``min_size_mm3``
    are dropped.
    """
    mag = np.asarray(magnitude, dtype=np.float32)
    if mag.ndim == 4:
        mag = mag[..., -1]
    mask = np.asarray(mask, dtype=bool)
    if mag.shape != mask.shape:
        raise ValueError(f"Expected a magnitude of shape {mask.shape}, got {mag.shape}")
    deep = erode(mask, depth_mm, voxel_size_mm)
    if not deep.any():
        deep = erode(mask, depth_mm / 3, voxel_size_mm)
    if not deep.any():
        raise ValueError("The mask is too small to find CSF deep inside it")
    candidates = deep & (mag >= np.quantile(mag[deep], 1.0 - fraction))
    labels, n = ndimage.label(candidates)
    sizes = np.bincount(labels.ravel(), minlength=n + 1) * float(np.prod(voxel_size_mm))
    keep = np.flatnonzero(sizes >= min_size_mm3)
    keep = keep[keep > 0]
    if keep.size == 0:  # fall back to the largest piece
        keep = np.array([int(np.argmax(sizes[1:])) + 1])
    return np.isin(labels, keep)


def reference_csf(chi_ppm, mask, *, magnitude=None, voxel_size_mm=(1.0, 1.0, 1.0),
                  csf=None, depth_mm=15.0, fraction=0.05):
    """Subtract the median chi of CSF: the given ``csf`` mask (a segmentation)
    or :func:`csf_mask` from the (last-echo) magnitude."""
    chi, mask = _check(chi_ppm, mask)
    if csf is None:
        if magnitude is None:
            raise ValueError("CSF referencing needs a magnitude image or a CSF mask")
        csf = csf_mask(magnitude, mask, voxel_size_mm, depth_mm=depth_mm, fraction=fraction)
    csf = np.asarray(csf, dtype=bool) & mask
    if not csf.any():
        raise ValueError("The CSF mask has no voxel inside the brain mask")
    return (chi - np.median(chi[csf])).astype(np.float32) * mask
