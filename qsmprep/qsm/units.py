"""Physical constants and unit conversions.

Conventions used across qsmprep (see docs/methods.md):

* phase in rad, echo times in s, field strength in T;
* B0 maps in Hz, total and local fields in ppm, susceptibility chi in ppm.
"""

from __future__ import annotations

import numpy as np

#: Gyromagnetic ratio of 1H divided by 2*pi, in MHz/T.
GAMMA_BAR_MHZ_PER_T = 42.57747892


#: an echo time (s) above this is taken for milliseconds: GRE echo times are
#: a few to ~100 ms, and no MR signal is left after half a second
MAX_ECHO_TIME_S = 0.5


def check_echo_times_s(echo_times_s):
    """``echo_times_s`` as a float64 (E,) array, checked to be in seconds.

    Raises :class:`ValueError` when an echo time exceeds
    :data:`MAX_ECHO_TIME_S` (0.5 s): echo times given in milliseconds would
    otherwise scale every B0 map (Hz) down by 1000 without any error.
    """
    te = np.asarray(echo_times_s, dtype=np.float64).reshape(-1)
    if te.size and np.nanmax(te) > MAX_ECHO_TIME_S:
        raise ValueError(
            f"echo times {te.tolist()} look like milliseconds: give seconds (0.004, not 4); "
            f"no echo time may exceed {MAX_ECHO_TIME_S} s")
    return te


def hz_to_ppm(field_hz, field_strength_t):
    """Convert a frequency offset (Hz) into a relative field (ppm).

    ``f_ppm = f_Hz / (gamma_bar * B0)`` with gamma_bar in MHz/T, so that the
    MHz in the denominator gives the factor 1e6 of ppm.
    """
    return np.asarray(field_hz) / (GAMMA_BAR_MHZ_PER_T * float(field_strength_t))


def ppm_to_hz(field_ppm, field_strength_t):
    """Convert a relative field (ppm) into a frequency offset (Hz)."""
    return np.asarray(field_ppm) * (GAMMA_BAR_MHZ_PER_T * float(field_strength_t))


def phase_to_ppm(phase_rad, echo_time_s, field_strength_t):
    """Field (ppm) from unwrapped phase (rad) at one echo time (s).

    ``f = phase / (2 pi TE gamma_bar B0) * 1e6``.
    """
    hz = np.asarray(phase_rad) / (2 * np.pi * float(echo_time_s))
    return hz_to_ppm(hz, field_strength_t)


def field_strength_from_frequency(imaging_frequency_mhz):
    """Field strength (T) from the proton imaging frequency (MHz)."""
    return float(imaging_frequency_mhz) / GAMMA_BAR_MHZ_PER_T


def rescale_phase(phase, *, lo=None, hi=None):
    """Rescale phase stored in arbitrary units (scanner integers) to [-pi, pi).

    The range ``lo..hi`` (default: the data's finite min..max) maps linearly
    onto ``-pi..pi``. Non-finite values are left as they are.
    """
    phase = np.asarray(phase)
    if lo is None or hi is None:
        finite = np.isfinite(phase)
        if lo is None:
            lo = float(phase[finite].min()) if finite.any() else 0.0
        if hi is None:
            hi = float(phase[finite].max()) if finite.any() else 0.0
    if hi <= lo:
        raise ValueError(
            f"Cannot rescale phase: its range [{lo}, {hi}] is empty. "
            "Check that the phase image is not constant."
        )
    out = np.empty_like(phase, dtype=np.float32)  # the input's memory layout
    for part in outer_slices(phase):  # float64 a slice at a time (a 4-D phase is ~1 GB so)
        out[part] = (phase[part].astype(np.float64) - lo) / (hi - lo) * 2 * np.pi - np.pi
    return out


def outer_slices(values, chunk=1 << 22):
    """Indices of parts of the array ``values`` that together cover it: blocks
    of about ``chunk`` values of a 1-D array, else the slices along its
    outermost axis in memory (each one contiguous in a C- or Fortran-ordered
    array)."""
    if values.ndim == 0:
        return [()]
    if values.ndim == 1:
        return [slice(i, i + chunk) for i in range(0, values.size, chunk)]
    axis = int(np.argmax(np.abs(values.strides)))
    return [(slice(None),) * axis + (i,) for i in range(values.shape[axis])]


def b0_dir_from_affine(affine):
    """Unit B0 direction in voxel axes from a NIfTI affine (head-first supine).

    In scanner (RAS+) coordinates B0 points along z. Its component along
    voxel axis ``i`` is ``R[2, i] / ||R[:, i]||`` with ``R`` the affine's 3x3
    block, so a slab acquired obliquely gives ``b != (0, 0, 1)``.
    """
    rot = np.asarray(affine, dtype=np.float64)[:3, :3]
    cols = rot / np.linalg.norm(rot, axis=0, keepdims=True)
    b = cols[2, :].copy()
    return b / np.linalg.norm(b)


#: voxel sizes read from an affine are rounded to this (mm)
VOXEL_SIZE_DECIMALS = 6


def voxel_size_from_affine(affine):
    """Voxel size (mm) along each voxel axis from a NIfTI affine, rounded to
    1e-6 mm (:data:`VOXEL_SIZE_DECIMALS`).

    A header stores the affine in float32, so a 1.2 mm voxel reads back as
    1.1999999838 or 1.2000000389 mm depending on the rotation. The rounding
    makes the map independent of that: BET's iterative surface turned the
    1e-8 mm into a mask 0.45 % different on a whole head (docs/methods.md,
    "Held-out heads")."""
    rot = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(round(float(v), VOXEL_SIZE_DECIMALS) for v in np.linalg.norm(rot, axis=0))


def b0_angle_deg(b0_dir):
    """Angle (degrees) between B0 and the third voxel axis (the slab normal)."""
    b = np.asarray(b0_dir, dtype=np.float64)
    b = b / np.linalg.norm(b)
    return float(np.degrees(np.arccos(np.clip(abs(b[2]), 0.0, 1.0))))
