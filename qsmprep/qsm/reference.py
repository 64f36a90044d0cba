"""Susceptibility referencing: QSM gives chi up to a constant; fix that constant.

Every method has the referencing stage signature of :mod:`qsmprep.qsm.registry`::

    f(chi_ppm, mask, **params) -> chi_ppm
"""

from __future__ import annotations

import numpy as np

from .registry import register


def _check(chi, mask):
    chi = np.asarray(chi, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if chi.shape != mask.shape:
        raise ValueError(f"Expected chi and mask of the same shape, got {chi.shape} and {mask.shape}")
    if not mask.any():
        raise ValueError("The mask is empty: no voxel to reference chi to.")
    return chi, mask


@register(
    "referencing",
    "none",
    summary="No referencing (chi as inverted)",
    description="Susceptibility values were not re-referenced.",
)
def reference_none(chi_ppm, mask):
    """Return chi unchanged (zero outside the mask)."""
    chi, mask = _check(chi_ppm, mask)
    return chi * mask


@register(
    "referencing",
    "mean",
    summary="Mean chi of the mask set to zero",
    description="Susceptibility values were referenced to the mean over the brain mask.",
)
def reference_mean(chi_ppm, mask):
    """Subtract the mean chi over the mask (zero outside the mask)."""
    chi, mask = _check(chi_ppm, mask)
    return (chi - np.mean(chi[mask], dtype=np.float64)).astype(np.float32) * mask
