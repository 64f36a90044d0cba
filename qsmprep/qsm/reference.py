"""Susceptibility referencing: QSM gives chi up to a constant; fix that constant.

Every method has the referencing stage signature of :mod:`qsmprep.qsm.registry`::

    f(chi_ppm, mask, **params) -> chi_ppm
"""

from __future__ import annotations

import inspect
import logging

import numpy as np
from scipy import ndimage

from .mask import erode

LOGGER = logging.getLogger("qsmprep")


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


def reference_values(chi_ppm, mask, csf_region=None):
    """What ``chi_ppm`` averages to over the two regions a map is commonly
    referenced to: the whole brain's mean (``mask``) and the median over the
    ventricular CSF core, ``csf_region`` = :func:`csf_mask`'s ``(core,
    problem)`` (the region ``--referencing csf`` takes; None where there was no
    magnitude to find it in). Subtracting one of them from the map gives it
    that reference, so maps referenced differently can be compared (they differ
    by 0.005-0.016 ppm on the independent benchmark's heads, docs/methods.md).
    Returns a dict for the Chimap sidecar (ppm; ``VentricularCSFNote`` says why
    there is no CSF value)."""
    def ppm(value):   # 6 decimals; + 0.0 writes a rounded -0.0 as 0.0
        return round(float(value), 6) + 0.0

    chi, mask = _check(chi_ppm, mask)
    out = {"WholeBrainMean": ppm(np.mean(chi[mask], dtype=np.float64)),
           "VentricularCSFMedian": None, "VentricularCSFVoxels": 0, "Units": "ppm"}
    csf, problem = csf_region or (None, "no magnitude image to find CSF in")
    if problem:   # else csf is a non-empty part of the mask (its deep voxels)
        return {**out, "VentricularCSFNote": problem}
    return {**out, "VentricularCSFMedian": ppm(np.median(chi[csf])),
            "VentricularCSFVoxels": int(np.count_nonzero(csf))}


def csf_mask(magnitude, mask, voxel_size_mm=(1.0, 1.0, 1.0), *, echo_times_s=None,
             depth_mm=15.0, fraction=0.05, min_size_mm3=200.0, max_r2star_hz=10.0,
             core_voxels=2, min_core_voxels=100):
    """Ventricular CSF estimate without a segmentation: ``(csf, problem)``.

    CSF has the longest T2*, so it is the brightest tissue on the last echo
    (Liu et al. 2018, MEDI+0 used R2* < 5/s the same way). Candidates are
    the brightest ``fraction`` of the mask voxels at least ``depth_mm`` from
    the mask's edge (ventricles are central; this excludes sulcal CSF and
    vessels near the surface); connected pieces smaller than ``min_size_mm3``
    are dropped. With a multi-echo ``magnitude`` (X, Y, Z, E) and its
    ``echo_times_s``, the candidates' R2* (1/s, from the first and last echo's
    median signal) must be below ``max_r2star_hz``: CSF's is 1-5/s, grey and
    white matter's 15-25/s at 3 T, more at 7 T.

    The CSF found is then eroded by ``core_voxels`` voxels (by fewer where
    that would leave under ``min_core_voxels``): its outer voxels share their
    volume with the periventricular tissue, and the scanner's k-space
    truncation rings that tissue's chi into them, so they sit above CSF's
    (+0.006 to +0.009 ppm on the independent benchmark's heads, against
    +0.001 to +0.002 two voxels in; docs/methods.md, rule R20-1).

    ``problem`` is None when CSF was found, else a sentence saying why not
    (``csf`` is then empty): a slab or a crop without the ventricles.
    """
    mag = np.asarray(magnitude, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    last = mag[..., -1] if mag.ndim == 4 else mag
    if last.shape != mask.shape:
        raise ValueError(f"The magnitude for the CSF search has shape {mag.shape}; expected "
                         f"{mask.shape}, the brain mask's (with echoes last for several)")
    none = np.zeros(mask.shape, bool)
    deep = erode(mask, depth_mm, voxel_size_mm)
    if not deep.any():
        deep = erode(mask, depth_mm / 3, voxel_size_mm)
    if not deep.any():
        return none, f"the brain mask has no voxel {depth_mm / 3:g} mm inside its edge"
    candidates = deep & (last >= np.quantile(last[deep], 1.0 - fraction))
    if candidates.sum() > 2 * fraction * deep.sum():   # ties: a flat image, no contrast
        return none, ("the last echo's magnitude has no contrast in the deep brain to find "
                      "CSF by (its brightest voxels tie: phase-only data, whose magnitude is 1, "
                      "or a piecewise-constant phantom)")
    labels, n = ndimage.label(candidates)
    sizes = np.bincount(labels.ravel(), minlength=n + 1) * float(np.prod(voxel_size_mm))
    keep = np.flatnonzero(sizes >= min_size_mm3)
    keep = keep[keep > 0]
    if keep.size == 0:
        return none, (f"no bright deep region of at least {min_size_mm3:g} mm³ (the "
                      "ventricles) in the last echo")
    csf = np.isin(labels, keep)
    if mag.ndim == 4 and echo_times_s is not None and mag.shape[-1] >= 2:
        te = np.asarray(echo_times_s, dtype=np.float64)
        first, final = np.median(mag[..., 0][csf]), np.median(last[csf])
        r2star = (np.log(max(first, 1e-12) / max(final, 1e-12)) / (te[-1] - te[0])
                  if te[-1] > te[0] else 0.0)
        if r2star > max_r2star_hz:
            return none, (f"its brightest deep voxels decay with R2* {r2star:.1f}/s, "
                          f"above CSF's (< {max_r2star_hz:g}/s): no ventricles in the "
                          "field of view")
    return csf_core(csf, core_voxels, min_core_voxels), None


def csf_core(csf, core_voxels, min_voxels):
    """``csf`` eroded by ``core_voxels`` voxels, or by the most erosions (down to
    none) that leave at least ``min_voxels`` voxels."""
    csf = np.asarray(csf, dtype=bool)
    for k in range(int(core_voxels), 0, -1):
        core = ndimage.binary_erosion(csf, iterations=k)
        if core.sum() >= min_voxels:
            return core
    return csf


def reference_csf(chi_ppm, mask, *, magnitude=None, voxel_size_mm=(1.0, 1.0, 1.0),
                  echo_times_s=None, csf=None, csf_region=None, depth_mm=15.0,
                  fraction=0.05, max_r2star_hz=10.0, core_voxels=2, source="this run"):
    """Subtract the median chi of CSF: the given ``csf`` mask (a segmentation,
    used as given) or :func:`csf_mask` from the magnitude (its core, ``core_voxels``
    inside its edge), whose result ``(core, problem)`` may be given as
    ``csf_region`` (the workflow finds it once for a run). When no CSF is found there, chi
    is referenced to the mask's mean instead, with a warning naming
    ``source`` (the run's file): the map stays usable, and the log, the
    report and the Chimap sidecar say which reference it has."""
    chi, mask = _check(chi_ppm, mask)
    if csf is None:
        if csf_region is None and magnitude is None:
            raise ValueError("CSF referencing needs a magnitude image or a CSF mask")
        csf, problem = csf_region or csf_mask(
            magnitude, mask, voxel_size_mm, echo_times_s=echo_times_s, depth_mm=depth_mm,
            fraction=fraction, max_r2star_hz=max_r2star_hz, core_voxels=core_voxels)
        if problem:
            LOGGER.warning(
                "%s: CSF referencing found no ventricular CSF (%s); chi was referenced to "
                "the whole-brain mean instead. Give --referencing mean to choose that, or a "
                "dataset that covers the ventricles", source, problem)
            return reference_mean(chi, mask)
    csf = np.asarray(csf, dtype=bool) & mask
    if not csf.any():
        raise ValueError("The CSF mask has no voxel inside the brain mask")
    return (chi - np.median(chi[csf])).astype(np.float32) * mask


def csf_search_params(referencing, params):
    """The keywords of :func:`qsmprep.qsm.reference.csf_mask` for the run's one
    CSF search (the ``csf_core`` node, whose core TFI's CSF term, ``--referencing
    csf`` and the Chimap's ``ReferenceValues`` all take): ``--referencing csf``'s
    settings (``params``) when that is the ``referencing`` method, else its
    defaults."""
    if referencing != "csf":
        return {}
    names = inspect.signature(csf_mask).parameters
    return {k: v for k, v in params.items() if k in names and k != "echo_times_s"}
