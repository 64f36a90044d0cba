"""Reading multi-echo GRE images into arrays, and writing results like the source.

The physics in :mod:`qsmprep.qsm` takes arrays in rad, s, Hz and ppm; this
module turns NIfTI files into such arrays (echo stacking, phase units,
non-finite voxels) and writes arrays back with the source's geometry.
"""

from __future__ import annotations

import logging

import nibabel as nb
import numpy as np

from ..qsm.units import outer_slices, rescale_phase
from .files import atomic_write

LOGGER = logging.getLogger("qsmprep")

#: margin (rad) when deciding from its range whether phase is already in rad
_RAD_TOLERANCE = 0.01
#: nominal ranges [lo, hi) of phase stored as scanner integers, mapped onto
#: [-pi, pi): 12-bit signed (Siemens) and unsigned, 16-bit signed and unsigned
SCANNER_PHASE_RANGES = ((-4096, 4096), (0, 4096), (-32768, 32768), (0, 65536))


def load_stack(files, echo_times_s):
    """Stack the echo volumes of ``files`` along a last axis, sorted by echo time.

    ``files`` are 3-D images (one echo each) or one 4-D image; ``echo_times_s``
    (s) gives the time of each stacked volume in file order. Returns the
    float32 array (X, Y, Z, E) in Fortran order, the sorted echo times and the first image
    (the reference for geometry).
    """
    imgs = [nb.load(f) for f in files]
    counts = [int(np.prod(img.shape[3:], dtype=int)) for img in imgs]
    if sum(counts) != len(echo_times_s):
        raise ValueError(
            f"{len(echo_times_s)} echo times given for {sum(counts)} volumes in {files}"
        )
    grid = tuple(imgs[0].shape[:3])
    for img, f in zip(imgs, files):
        if tuple(img.shape[:3]) != grid:
            raise ValueError(f"{f} has a grid of {tuple(img.shape[:3])} voxels and {files[0]} "
                             f"one of {grid}: the echoes of a run must share one grid; "
                             "re-export them together")
    order = np.argsort(echo_times_s, kind="stable")
    slot = np.empty(len(order), dtype=int)
    slot[order] = np.arange(len(order))  # volume i (in file order) goes to slot[i]
    # Fortran order, as nibabel reads NIfTI files (and the app's nodes the work folder's):
    # sums over the echoes round the same in the app and in an in-process chain
    data = np.empty(grid + (len(order),), dtype=np.float32, order="F")  # filled in place
    first = 0
    for img, f, n in zip(imgs, files, counts):
        vol = _read(img, f).reshape(grid + (n,))
        for i in range(n):
            data[..., slot[first + i]] = vol[..., i]
        first += n
    return data, [float(echo_times_s[i]) for i in order], imgs[0]


def _read(img, path):
    """The voxel data (float32, ``scl_slope``/``scl_inter`` applied) of a NIfTI image."""
    try:
        return np.asanyarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # EOFError, zlib.error, OSError... from a damaged file
        raise ValueError(
            f"Cannot read the voxel data of {path} ({type(err).__name__}: {err}): the file "
            "is truncated or corrupt; re-export it or copy it again"
        ) from err


_SCANNER_NAMES = {(-4096, 4096): " (Siemens, signed)", (0, 4096): " (Siemens 12-bit)"}

#: a wrapped phase has its largest neighbour jumps at one period (2 pi in rad)
#: less the true phase step across the wrap; accepted: [0.85, 1.02] periods
#: (a smooth field changes by well under 0.15 * 2 pi ~ 0.9 rad per voxel at a
#: wrap, and 1.02 leaves room for integer quantisation)
WRAP_JUMP_RANGE = (0.85, 1.02)
#: milliradian integers: the period 2 pi * 1000, range about -3142..3142
MILLIRAD_LIMIT = 1000 * np.pi + 1.0


class PhaseScaleError(ValueError):
    """The declared phase units or scaling disagree with the phase values."""


def max_neighbour_jump(phase):
    """Largest absolute difference between neighbouring voxels along the
    three spatial axes (each echo of a 4-D array on its own)."""
    phase = np.asarray(phase)
    if phase.ndim == 4:  # echo by echo: 3-D temporaries instead of 4-D ones
        return max((max_neighbour_jump(phase[..., e]) for e in range(phase.shape[3])),
                   default=0.0)
    jump = 0.0
    for axis in range(min(3, phase.ndim)):
        if phase.shape[axis] > 1:
            jump = max(jump, float(np.abs(np.diff(phase, axis=axis)).max()))
    return jump


def _all_integers(values):
    """Whether every value of the array ``values`` is a whole number, compared
    a slice at a time along its outermost axis in memory (no temporary of the
    whole array)."""
    return all(np.array_equal(values[part], np.round(values[part]))
               for part in outer_slices(values))


def _phase_candidates(lo, hi, integer, units, jump):
    """The conventions whose range holds [lo, hi], as (name, description, offset,
    period): stored value v maps to ``(v - offset) / period * 2 pi - pi``.
    Declared radians may lie beyond -pi..2pi (an unwrapped phase) as long as
    no neighbour jump exceeds a 2pi wrap."""
    out = []
    in_range = (lo >= -np.pi - _RAD_TOLERANCE and hi <= 2 * np.pi + _RAD_TOLERANCE
                and hi - lo <= 2 * np.pi + _RAD_TOLERANCE)
    if units == "rad":
        if in_range or jump <= WRAP_JUMP_RANGE[1] * 2 * np.pi:
            out.append(("rad", "radians", None, 2 * np.pi))
        return out
    if units is None and in_range:
        out.append(("rad", "radians", None, 2 * np.pi))
    if integer:
        for a, b in SCANNER_PHASE_RANGES:
            if a <= lo and hi < b and (lo < 0) == (a < 0):
                out.append((f"int{a}..{b - 1}", f"integers {a}..{b - 1}"
                            f"{_SCANNER_NAMES.get((a, b), '')} rescaled to -pi..pi",
                            float(a), float(b - a)))
    if -MILLIRAD_LIMIT <= lo and hi <= MILLIRAD_LIMIT and lo < 0:
        out.append(("mrad", "milliradians (-3142..3142) divided by 1000", None, 2000 * np.pi))
    if hi > lo:
        step = 1.0 if integer else 0.0  # integers: hi is the last value below the period
        out.append(("range", f"the stored range {lo:g}..{hi:g} rescaled to -pi..pi",
                    lo, hi - lo + step))
    return out


def interpret_phase(phase, units, source, *, header_scaling=None):
    """Phase in rad from stored values, with the scale decided and checked.

    The convention is decided from the sidecar ``units`` ("rad",
    "arbitrary" or None), the stored values (after the header's
    ``scl_slope``/``scl_inter``, given as ``header_scaling`` for messages)
    and their range, and verified with the data: the wrapped phase of a
    smooth field has its largest neighbour jumps at one period (2 pi after
    scaling; :data:`WRAP_JUMP_RANGE`). Candidates, in order: radians (values
    within -pi..2pi), scanner integers (Siemens 12-bit -4096..4095 and
    0..4095, 16-bit; :data:`SCANNER_PHASE_RANGES`), milliradians (integers
    or not, within +-3142; only when the wraps show them) and the stored min..max. When the phase jumps
    across its whole range (wraps or noise) the first candidate whose
    period matches the jumps is used; otherwise (no wraps: nothing to verify)
    the first candidate in range, as before this check (radians, the nominal
    integer range, min..max).

    Returns ``(phase_rad float32, record)``; ``record`` holds ``units``
    ("rad" or "arbitrary", as applied), ``convention``, ``description``,
    ``stored_range``, ``rad_per_unit``, ``verified`` (True, or False when
    the data had no wraps) and ``max_jump_periods``.

    Raises :class:`PhaseScaleError` naming ``source`` when ``units`` is "rad"
    but the values are not radians (e.g. +-4096 integers), or when the
    phase jumps by more than a period of every convention.
    """
    phase = np.asarray(phase, dtype=np.float32)
    is_finite = np.isfinite(phase)
    all_finite = bool(is_finite.all())  # the loader has zeroed non-finite voxels
    finite = phase if all_finite else phase[is_finite]  # no copy in the common case
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    integer = bool(finite.size) and _all_integers(finite)
    jump = max_neighbour_jump(phase if all_finite else np.where(is_finite, phase, 0))
    del is_finite, finite
    span = hi - lo
    wrapped = span > 0 and jump >= WRAP_JUMP_RANGE[0] * span
    header = ""
    if header_scaling and tuple(header_scaling) != (1.0, 0.0):
        header = (f" (after the header's scl_slope {header_scaling[0]:g} and scl_inter "
                  f"{header_scaling[1]:g})")
    candidates = _phase_candidates(lo, hi, integer, units, jump)
    if units == "rad" and (not candidates or jump > WRAP_JUMP_RANGE[1] * 2 * np.pi):
        raise PhaseScaleError(
            f"{source}: the sidecar says the phase is in radians (\"Units\": \"rad\") but "
            f"its values{header} range over [{lo:.5g}, {hi:.5g}]"
            f"{' (integers)' if integer else ''} with jumps of up to {jump:.5g} between "
            "neighbours, more than one 2pi wrap: they are not radians. If the phase is "
            "stored as scanner integers, set \"Units\": \"arbitrary\" in the phase "
            "sidecars (or remove Units); if it is in radians, re-export it")
    if not candidates or span <= 0:
        raise PhaseScaleError(f"{source}: the phase is constant ({lo:g}); re-export it")
    chosen, verified = None, False
    if units == "rad":
        chosen = candidates[0]
        verified = bool(wrapped and jump >= WRAP_JUMP_RANGE[0] * 2 * np.pi)
    elif wrapped:
        for cand in candidates:
            if WRAP_JUMP_RANGE[0] <= jump / cand[3] <= WRAP_JUMP_RANGE[1]:
                chosen, verified = cand, True
                break
        if chosen is None:
            raise PhaseScaleError(
                f"{source}: the phase{header} ranges over [{lo:.5g}, {hi:.5g}] with "
                f"neighbour jumps of up to {jump:.5g}, which matches no phase convention "
                f"({', '.join(c[0] for c in candidates)}; jumps must be one period, 2pi "
                "in radians): check the sidecar Units and the header's scl_slope/scl_inter,"
                " or convert the phase to radians")
    else:  # nothing to verify: the conventions of old (mrad only when its wraps show it)
        chosen = next(c for c in candidates if c[0] != "mrad")
    name, description, offset, period = chosen
    if name == "rad":
        out = phase
    elif name == "mrad":
        out = (phase / 1000.0).astype(np.float32)
    else:
        out = rescale_phase(phase, lo=offset, hi=offset + period)
    applied = "rad" if name == "rad" else "arbitrary"
    record = {
        "units": applied, "declared_units": units, "convention": name,
        "description": description, "stored_range": [lo, hi],
        "rad_per_unit": float(2 * np.pi / period), "verified": verified,
        "max_jump_periods": round(jump / period, 4) if period else None,
    }
    if header:
        record["header_scaling"] = [float(v) for v in header_scaling]
    if units is None or name == "mrad":
        LOGGER.warning(
            "%s: the phase sidecar has %s; its values%s [%.5g, %.5g] were taken as %s%s. %s",
            source, "no Units" if units is None else f"Units {units!r}", header, lo, hi,
            description, " (verified by its 2pi wraps)" if verified else
            " (not verified: no phase wraps in the data)",
            "Add \"Units\": \"rad\" or \"arbitrary\" to the sidecar to silence this."
            if units is None else "If that is wrong, convert the phase to radians and set "
            "\"Units\": \"rad\".")
    else:
        LOGGER.info("%s: phase in %s%s", source, description,
                    "" if verified else " (not verified: no phase wraps)")
    return out.astype(np.float32, copy=False), record


def phase_in_rad(phase, units, source):
    """Phase in rad from stored values (:func:`interpret_phase`); returns the
    phase and the units applied ("rad" or "arbitrary")."""
    out, record = interpret_phase(phase, units, source)
    return out, record["units"]


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


def _describe_files(files):
    """The file, or the first file and how many echo files there are, for messages."""
    return files[0] if len(files) == 1 else f"{files[0]} (and the other {len(files) - 1} echoes)"


def load_echoes(phase_files, echo_times_s, magnitude_files=(), magnitude_echo_times_s=(), *,
                phase_units=None, complex_parts=False):
    """Magnitude and phase (rad) stacked by echo time, non-finite voxels zeroed.

    Returns ``(magnitude, phase_rad, valid, sorted_echo_times_s, ref_img, record)``:
    4-D float32 arrays ``(X, Y, Z, E)``, the voxels finite in every input,
    the reference image of the grid, and how the stored phase became rad
    (``record``, see :func:`interpret_phase`; ``"units"`` is always given).
    Without magnitude files (phase-only) the magnitude is 1 everywhere; with
    ``complex_parts`` the "magnitude" and "phase" files hold the real and
    imaginary parts, whose modulus and angle are returned.
    """
    raw, tes, ref = load_stack(phase_files, echo_times_s)
    if magnitude_files:
        mag, _, _ = load_stack(magnitude_files, magnitude_echo_times_s)
        sources = [_describe_files(phase_files), _describe_files(magnitude_files)]
        valid = zero_nonfinite([raw, mag], sources)
        if not mag.any():
            raise ValueError(
                f"{sources[1]}: the magnitude is zero everywhere; re-export it, or "
                "process the run from the phase only (remove the part-mag files and "
                "use --masking quality)"
            )
    else:
        sources = [_describe_files(phase_files)]
        valid = zero_nonfinite([raw], sources)
        mag = np.ones_like(raw)
    if complex_parts:  # mag holds the real part, raw the imaginary part
        signal = mag + 1j * raw
        phase, mag = np.angle(signal), np.abs(signal).astype(np.float32)
        record = {"units": "rad", "convention": "complex",
                  "description": "angle of the real and imaginary parts"}
    else:
        proxy = nb.load(phase_files[0]).dataobj  # nibabel keeps scl_* here
        phase, record = interpret_phase(
            raw, phase_units, sources[0],
            header_scaling=(float(getattr(proxy, "slope", 1.0)),
                            float(getattr(proxy, "inter", 0.0))))
    return mag, phase, valid, tes, ref, record


def save_like(data, ref_img, path, dtype=np.float32):
    """Write ``data`` (3-D or 4-D) with the affine and header of ``ref_img``.

    The file appears atomically (:func:`~qsmprep.utils.files.atomic_write`).
    """
    header = ref_img.header.copy()
    header.set_data_dtype(dtype)
    img = nb.Nifti1Image(np.asarray(data).astype(dtype, copy=False), ref_img.affine, header)
    img.header.set_slope_inter(1, 0)
    return str(atomic_write(path, lambda tmp: img.to_filename(str(tmp))))
