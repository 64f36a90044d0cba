"""Sidecars and NIfTI headers of the GRE files: echo times, field strength,
phase units, ``B0_dir``; complete files, one voxel grid per run, the affine
that gives the B0 direction, thin slabs."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nb
import numpy as np

from ..qsm.units import field_strength_from_frequency, voxel_size_from_affine
from . import QSMPrepInputError

LOGGER = logging.getLogger("qsmprep")

#: field of view (mm) below which a slab gets a warning: the dipole field of
#: sources outside it cannot be told apart from that of the tissue inside
THIN_SLAB_MM = 32.0


def _number(value, key, path):
    """A float from a sidecar value, accepting numbers written as strings."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise QSMPrepInputError(
            f"{key} in the sidecar of {path} is {value!r}, not a number"
        ) from None


def echo_times_s_from_sidecar(meta, path):
    """Echo time(s) in seconds from a sidecar (``EchoTime``: number, string or list)."""
    if "EchoTime" not in meta:
        raise QSMPrepInputError(
            f"{path} has no EchoTime in its JSON sidecar; add \"EchoTime\": <seconds> "
            "(a list, one per volume, for a 4-D file)"
        )
    value = meta["EchoTime"]
    values = value if isinstance(value, (list, tuple)) else [value]
    times = [_number(v, "EchoTime", path) for v in values]
    for t in times:
        if t >= 1:
            raise QSMPrepInputError(
                f"EchoTime {t:g} in the sidecar of {path} is not in seconds: it looks like "
                f"milliseconds: write {t / 1000:g} (divide every EchoTime by 1000)"
            )
        if not t > 0:
            raise QSMPrepInputError(
                f"EchoTime {t:g} in the sidecar of {path} is not a positive time; give "
                "the echo time in seconds, e.g. 0.004 for 4 ms"
            )
    return times


#: relative difference between ImagingFrequency / gamma_bar and the nominal
#: MagneticFieldStrength above which the two cannot describe the same scanner
#: (a "3 T" Siemens runs at 2.89 T, 3.6 % below; a frequency of another
#: nucleus, or one in Hz or kHz, is far off)
FIELD_STRENGTH_MISMATCH = 0.10


def _optional_number(meta, key, path):
    return None if meta.get(key) is None else _number(meta[key], key, path)


def field_strength_t_from_sidecar(meta, path, *, with_source=False):
    """Main field in tesla from a sidecar, and (``with_source``) the key it came from.

    ``ImagingFrequency`` (MHz, the proton resonance the scanner measured) /
    γ̄ is preferred: ``MagneticFieldStrength`` is the nominal value (3, 7),
    and a Siemens "3 T" scanner runs at 2.89 T, so χ from the nominal value
    would be about 3.6 % too low. Without ``ImagingFrequency`` the nominal
    ``MagneticFieldStrength`` is used. Both present but more than
    :data:`FIELD_STRENGTH_MISMATCH` apart is an error (one of them is wrong).
    """
    nominal = _optional_number(meta, "MagneticFieldStrength", path)
    frequency = _optional_number(meta, "ImagingFrequency", path)
    if frequency is not None:
        value, source = field_strength_from_frequency(frequency), "ImagingFrequency"
        if not 0 < value < 30:
            raise QSMPrepInputError(
                f"ImagingFrequency {frequency:g} in the sidecar of {path} gives a field of "
                f"{value:.4g} T; expected the proton frequency in MHz (e.g. 123.25 at 3 T, "
                "297.2 at 7 T): fix or remove it")
        if nominal is not None and abs(value - nominal) > FIELD_STRENGTH_MISMATCH * nominal:
            raise QSMPrepInputError(
                f"The sidecar of {path} has MagneticFieldStrength {nominal:g} T but "
                f"ImagingFrequency {frequency:g} MHz, i.e. {value:.4g} T: they cannot both "
                "be right (a frequency of another nucleus, or not in MHz?). Fix the wrong "
                "one, or remove ImagingFrequency to use the nominal field strength")
    elif nominal is not None:
        value, source = nominal, "MagneticFieldStrength"
    else:
        raise QSMPrepInputError(
            f"{path} has neither MagneticFieldStrength (T) nor ImagingFrequency (MHz) in "
            "its sidecar; add one, e.g. \"MagneticFieldStrength\": 3"
        )
    if not 0 < value < 30:
        raise QSMPrepInputError(
            f"The field strength from the sidecar of {path} is {value} T; expected "
            "MagneticFieldStrength in tesla (e.g. 3 or 7)"
        )
    return (value, source) if with_source else value


def phase_units(metas):
    """``Units`` of the phase files: "rad", "arbitrary" or None (not given).

    ``metas`` maps each phase file to its sidecar; all must agree.
    """
    found = {}
    for path, meta in metas.items():
        unit = meta.get("Units")
        unit = None if unit is None else str(unit).strip().lower()
        if unit in ("radian", "radians"):
            unit = "rad"
        if unit not in (None, "rad", "arbitrary"):
            raise QSMPrepInputError(
                f"Phase Units {meta['Units']!r} in the sidecar of {path} is not supported; "
                "use \"rad\" or \"arbitrary\" (rescaled to -pi..pi)"
            )
        found.setdefault(unit, path)
    if len(found) > 1:
        raise QSMPrepInputError(
            "The phase files of one run disagree on Units: "
            + "; ".join(f"{Path(p).name}: {u}" for u, p in found.items())
        )
    return next(iter(found))


def b0_dir_from_sidecar(meta, path):
    """``B0_dir`` (unit vector in voxel axes) from a sidecar, or None."""
    if meta.get("B0_dir") is None:
        return None
    try:
        b = np.asarray(meta["B0_dir"], dtype=float).reshape(3)
    except (TypeError, ValueError):
        raise QSMPrepInputError(
            f"B0_dir in the sidecar of {path} is {meta['B0_dir']!r}; expected three numbers"
        ) from None
    norm = np.linalg.norm(b)
    if not norm > 0:
        raise QSMPrepInputError(f"B0_dir in the sidecar of {path} is the zero vector")
    return tuple(float(v) for v in b / norm)


def check_run(run):
    """Check the files of a run from their NIfTI headers.

    Every file must be a complete NIfTI image (not empty, not truncated) and
    all echoes, magnitude and phase, must share shape and affine. A header
    whose qform and sform disagree gets a warning (:func:`b0_affine` says which
    one gives the B0 direction).
    """
    ref_path = run.phase[0]
    ref = read_header(ref_path)
    check_orientation(ref, ref_path)
    check_extent(ref, ref_path)
    for part, files in (("phase", run.phase), ("magnitude", run.magnitude)):
        for path in files:
            img = read_header(path)
            what = "magnitude and phase" if part == "magnitude" else "phase echoes"
            if img.shape[:3] != ref.shape[:3]:
                raise QSMPrepInputError(
                    f"{path} has shape {img.shape[:3]}, not the shape {ref.shape[:3]} of "
                    f"{ref_path}: the {what} of a run must share one voxel grid"
                    f"{_grid_fix(part)}"
                )
            if not np.allclose(img.affine, ref.affine, atol=1e-4):
                raise QSMPrepInputError(
                    f"{path} and {ref_path} have different affines (voxel-to-world "
                    f"matrices): the {what} of a run must share one voxel grid"
                    f"{_grid_fix(part)}"
                )
    if len(run.magnitude) == 1:
        n_mag = nb.load(run.magnitude[0]).shape[3:4] or (1,)
        if n_mag[0] != len(run.echo_times_s):
            raise QSMPrepInputError(
                f"{run.magnitude[0]} holds {n_mag[0]} echoes but the phase has "
                f"{len(run.echo_times_s)}; magnitude and phase need the same echoes"
            )


def read_header(path):
    """The NIfTI image at ``path`` (header only), checked to be complete.

    Raises :class:`QSMPrepInputError` naming the file for an empty, unreadable
    or truncated file. Truncation is detected from the file size (``.nii``) or
    the gzip trailer's uncompressed size (``.nii.gz``), confirmed by reading
    the stream to its end, so a complete file is never read whole here.
    """
    fix = "re-export it from the scanner/converter or copy it again"
    try:
        img = nb.load(path)
    except Exception as err:  # nibabel raises several types for a broken file
        size = Path(path).stat().st_size
        what = "is empty (0 bytes)" if size == 0 else f"is not a readable NIfTI file ({err})"
        raise QSMPrepInputError(f"{path} {what}; {fix}") from None
    header = img.header
    offset = getattr(img.dataobj, "offset", None) or header.get_data_offset()
    expected = int(offset) + int(
        np.prod(img.shape, dtype=np.int64) * header.get_data_dtype().itemsize)
    if not str(path).endswith(".gz"):
        if Path(path).stat().st_size < expected:
            raise QSMPrepInputError(
                f"{path} is truncated: {Path(path).stat().st_size} bytes for an image of "
                f"{expected} bytes (shape {img.shape}); {fix}")
        return img
    with open(path, "rb") as f:
        f.seek(-4, 2)
        isize = int.from_bytes(f.read(4), "little")
    if isize != expected % 2**32 and not _gzip_complete(path):
        raise QSMPrepInputError(
            f"{path} is truncated or corrupt (its compressed stream ends early, before "
            f"the {expected} bytes of an image of shape {img.shape}); {fix}")
    return img


def _gzip_complete(path):
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error):
        return False
    return True


#: NIfTI ``qform_code``/``sform_code`` of scanner coordinates (NIFTI_XFORM_SCANNER_ANAT)
XFORM_SCANNER = 1


def _forms_disagree(header):
    qform, _ = header.get_qform(coded=True)
    sform, _ = header.get_sform(coded=True)
    return qform is not None and sform is not None and not np.allclose(qform, sform, atol=1e-3)


def b0_affine(header):
    """The affine whose rotation gives the B0 direction, and its source in words.

    B0 lies along the scanner's z axis, which only the scanner-coordinate
    transform knows. The sform is used when set (as by nibabel and FSL),
    except when it disagrees with a qform whose ``qform_code`` is 1
    (scanner): then the sform was most likely rewritten by a registration
    or resampling (to a template, another session, a T1w) and its rotation
    is no longer the scanner's, so the qform's is used. Without either, the
    nibabel fallback (B0 along the third voxel axis) is returned.
    """
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if sform is not None:
        if qform is not None and int(qcode) == XFORM_SCANNER and _forms_disagree(header):
            return qform, (f"qform of the header (qform_code {int(qcode)}; the sform, "
                           f"sform_code {int(scode)}, disagrees with it)")
        return sform, f"sform of the header (sform_code {int(scode)})"
    if qform is not None:
        return qform, f"qform of the header (qform_code {int(qcode)})"
    return header.get_base_affine(), "none in the header: assumed along the third voxel axis"


def check_orientation(img, path):
    """Warn when the qform and sform of ``img`` disagree or neither is set."""
    header = img.header
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if qform is None and sform is None:
        LOGGER.warning(
            "%s has neither qform nor sform set: its orientation is unknown and B0 is "
            "assumed along the third voxel axis. Fix the header (e.g. re-convert with "
            "dcm2niix) or give \"B0_dir\" in the sidecar", path)
    elif _forms_disagree(header) and int(qcode) == XFORM_SCANNER:
        LOGGER.warning(
            "%s: the qform and sform of the header disagree and the qform is the scanner's "
            "(qform_code 1): the qform is used for the B0 direction (a registered or "
            "resampled sform would give the wrong dipole kernel), the sform for the voxel "
            "grid. If the sform is the scanner's, copy it to the qform (e.g. fslorient "
            "-copysform2qform) or give \"B0_dir\" in the sidecar", path)
    elif _forms_disagree(header):
        LOGGER.warning(
            "%s: the qform and sform of the header disagree; the sform is used (as by "
            "nibabel and FSL) for the voxel size and the B0 direction (the qform, "
            "qform_code %d, is not the scanner's). If the qform is the right one, copy it "
            "to the sform (e.g. fslorient -copyqform2sform)", path, int(qcode))


def check_extent(img, path):
    """Warn when the image is a slab thinner than :data:`THIN_SLAB_MM` along an axis."""
    extent = np.asarray(img.shape[:3]) * voxel_size_from_affine(img.affine)
    axis = int(np.argmin(extent))
    if extent[axis] < THIN_SLAB_MM:
        LOGGER.warning(
            "%s is a thin slab (%d voxels, %.3g mm along axis %d): QSM of so few slices is "
            "unreliable near its faces, and eroding background removal (V-SHARP, SHARP) "
            "may leave no voxel; prefer --bf-removal pdf or lbv, or acquire a thicker slab",
            path, img.shape[axis], extent[axis], axis)


def _grid_fix(part):
    if part == "magnitude":
        return "; export magnitude and phase from the same reconstruction"
    return "; re-export the echoes of this run together (same matrix and orientation)"

