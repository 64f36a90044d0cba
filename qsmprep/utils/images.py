"""Reading multi-echo GRE images into arrays, and writing results like the source.

The physics in :mod:`qsmprep.qsm` takes arrays in rad, s, Hz and ppm; this
module turns NIfTI files into such arrays (echo stacking, phase units,
non-finite voxels) and writes arrays back with the source's geometry.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nb
import numpy as np

from ..qsm.units import rescale_phase

LOGGER = logging.getLogger("qsmprep")

#: margin (rad) when deciding from its range whether phase is already in rad
_RAD_TOLERANCE = 0.01


def load_stack(files, echo_times):
    """Stack the echo volumes of ``files`` along a last axis, sorted by echo time.

    ``files`` are 3-D images (one echo each) or one 4-D image; ``echo_times``
    (s) gives the time of each stacked volume in file order. Returns the
    float32 array (X, Y, Z, E), the sorted echo times and the first image
    (the reference for geometry).
    """
    imgs = [nb.load(f) for f in files]
    vols = [np.asanyarray(img.dataobj, dtype=np.float32) for img in imgs]
    data = np.concatenate([v.reshape(v.shape[:3] + (-1,)) for v in vols], axis=3)
    if data.shape[3] != len(echo_times):
        raise ValueError(
            f"{len(echo_times)} echo times given for {data.shape[3]} volumes in {files}"
        )
    order = np.argsort(echo_times, kind="stable")
    return data[..., order], [float(echo_times[i]) for i in order], imgs[0]


def phase_in_rad(phase, units, source):
    """Phase in rad from stored values.

    ``units`` is "rad" (kept), "arbitrary" (all echoes rescaled together from
    their min..max to -pi..pi) or None: then phase within -pi..pi is taken as
    rad and anything else as arbitrary, with a warning naming ``source``.
    Returns the phase and the units actually applied.
    """
    if units is None:
        finite = phase[np.isfinite(phase)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        in_rad = lo >= -np.pi - _RAD_TOLERANCE and hi <= np.pi + _RAD_TOLERANCE
        units = "rad" if in_rad else "arbitrary"
        LOGGER.warning(
            "%s: the phase sidecar has no Units; its range [%.4g, %.4g] was taken as %s%s. "
            "Add \"Units\": \"rad\" or \"arbitrary\" to the sidecar to silence this.",
            source, lo, hi, units, "" if in_rad else " (rescaled to -pi..pi)",
        )
    if units == "arbitrary":
        return rescale_phase(phase), units
    return np.asarray(phase, dtype=np.float32), units


def zero_nonfinite(arrays, sources):
    """Set NaN/Inf voxels to 0 in every array; return the mask of voxels finite in all.

    A voxel that is non-finite in any echo of any array is excluded (False)
    and a warning names the files concerned.
    """
    valid = np.ones(arrays[0].shape[:3], dtype=bool)
    for arr, source in zip(arrays, sources):
        bad = ~np.isfinite(arr)
        if bad.any():
            LOGGER.warning(
                "%s: %d NaN/Inf values were set to 0 and their voxels left out of the mask",
                source, int(bad.sum()),
            )
            arr[bad] = 0
            valid &= ~bad.reshape(bad.shape[:3] + (-1,)).any(axis=3)
    return valid


def save_like(data, ref_img, path, dtype=np.float32):
    """Write ``data`` (3-D or 4-D) with the affine and header of ``ref_img``.

    The file appears atomically: written under a temporary name, then renamed.
    """
    path = Path(path)
    header = ref_img.header.copy()
    header.set_data_dtype(dtype)
    img = nb.Nifti1Image(np.asarray(data).astype(dtype, copy=False), ref_img.affine, header)
    img.header.set_slope_inter(1, 0)
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    tmp = path.with_name(f".{path.name[: -len(suffix)]}.tmp{suffix}")
    img.to_filename(str(tmp))
    os.replace(tmp, path)
    return str(path)
