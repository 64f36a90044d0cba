"""Reading multi-echo GRE images into arrays, and writing results like the source.

The physics in :mod:`qsmprep.qsm` takes arrays in rad, s, Hz and ppm; this
module turns NIfTI files into such arrays (echo stacking, phase units,
non-finite voxels) and writes arrays back with the source's geometry.
"""

from __future__ import annotations

import logging

import nibabel as nb
import numpy as np

from ..qsm.units import rescale_phase
from .files import atomic_write

LOGGER = logging.getLogger("qsmprep")

#: margin (rad) when deciding from its range whether phase is already in rad
_RAD_TOLERANCE = 0.01
#: nominal ranges [lo, hi) of phase stored as scanner integers, mapped onto
#: [-pi, pi): 12-bit signed (Siemens) and unsigned, 16-bit signed and unsigned
SCANNER_PHASE_RANGES = ((-4096, 4096), (0, 4096), (-32768, 32768), (0, 65536))


def load_stack(files, echo_times):
    """Stack the echo volumes of ``files`` along a last axis, sorted by echo time.

    ``files`` are 3-D images (one echo each) or one 4-D image; ``echo_times``
    (s) gives the time of each stacked volume in file order. Returns the
    float32 array (X, Y, Z, E), the sorted echo times and the first image
    (the reference for geometry).
    """
    imgs = [nb.load(f) for f in files]
    vols = [_read(img, f) for img, f in zip(imgs, files)]
    data = np.concatenate([v.reshape(v.shape[:3] + (-1,)) for v in vols], axis=3)
    if data.shape[3] != len(echo_times):
        raise ValueError(
            f"{len(echo_times)} echo times given for {data.shape[3]} volumes in {files}"
        )
    order = np.argsort(echo_times, kind="stable")
    return data[..., order], [float(echo_times[i]) for i in order], imgs[0]


def _read(img, path):
    """The voxel data (float32, ``scl_slope``/``scl_inter`` applied) of a NIfTI image."""
    try:
        return np.asanyarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # EOFError, zlib.error, OSError... from a damaged file
        raise ValueError(
            f"Cannot read the voxel data of {path} ({type(err).__name__}: {err}): the file "
            "is truncated or corrupt; re-export it or copy it again"
        ) from err


def phase_range(phase):
    """The stored range ``(lo, hi)`` that maps onto -pi..pi for phase in arbitrary units.

    Integer-valued phase within one of :data:`SCANNER_PHASE_RANGES` uses the
    smallest such nominal range (so e.g. -4096..4095 maps exactly, however
    much of it the image fills); anything else its finite min..max.
    """
    finite = phase[np.isfinite(phase)]
    if not finite.size:
        return 0.0, 0.0
    lo, hi = float(finite.min()), float(finite.max())
    if np.array_equal(finite, np.round(finite)):
        for a, b in SCANNER_PHASE_RANGES:
            if a <= lo and hi < b and (lo < 0) == (a < 0):
                return float(a), float(b)
    return lo, hi


def phase_in_rad(phase, units, source):
    """Phase in rad from stored values.

    ``units`` is "rad" (kept), "arbitrary" (all echoes rescaled together from
    :func:`phase_range` to -pi..pi) or None: then phase within -pi..pi is
    taken as rad and anything else as arbitrary, with a warning naming
    ``source``. Returns the phase and the units actually applied.
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
        lo, hi = phase_range(phase)
        LOGGER.info("%s: phase in arbitrary units, [%g, %g) mapped onto [-pi, pi)",
                    source, lo, hi)
        return rescale_phase(phase, lo=lo, hi=hi), units
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

    The file appears atomically (:func:`~qsmprep.utils.files.atomic_write`).
    """
    header = ref_img.header.copy()
    header.set_data_dtype(dtype)
    img = nb.Nifti1Image(np.asarray(data).astype(dtype, copy=False), ref_img.affine, header)
    img.header.set_slope_inter(1, 0)
    return str(atomic_write(path, lambda tmp: img.to_filename(str(tmp))))
