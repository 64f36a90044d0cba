"""Phase unwrapping: Laplacian unwrapping, MCPC-3D-S phase-offset removal,
and the registered methods of the ``unwrapping`` stage (``romeo``, whose
region growing is in :mod:`qsmprep.qsm.romeo`, and ``laplacian``).

References
----------
Eckstein K, Dymerska B, Bachrata B, et al. Computationally efficient
combination of multi-channel phase data from multi-echo acquisitions
(ASPIRE). Magn Reson Med 2018;79:2996-3006 (MCPC-3D-S).
Schofield MA, Zhu Y. Fast phase unwrapping algorithm for interferometric
applications. Opt Lett 2003;28:1194-1196.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
from scipy import ndimage

from .fft import workers
from .romeo import TWO_PI, WEIGHTS, romeo_unwrap
from .units import check_echo_times_s


# --------------------------------------------------------------------------
# Laplacian unwrapping
# --------------------------------------------------------------------------
def laplacian_unwrap(phase, voxel_size_mm=(1.0, 1.0, 1.0), *, mask=None):
    """Laplacian phase unwrapping (Schofield & Zhu, Opt Lett 2003;28:1194).

    ``phi = lap^-1 [cos(p) lap sin(p) - sin(p) lap cos(p)]``, with the
    discrete Laplacian diagonalised by the DCT-II (mirror boundaries, the
    eigenvalues ``sum_d (2 cos(pi k_d / N_d) - 2) / v_d^2``), its free constant
    aligned to the wrapped phase within ``mask``.

    ``phi`` is returned as it is, not made congruent with the data: it differs
    from the true phase by a smooth field (harmonic where the Laplacian
    estimate holds: a boundary term, and the pull of the noise outside the
    head), which background removal or a total field inversion's outside
    sources absorb. Rounded to the nearest 2 pi multiple of the data, that
    error became 2 pi steps wherever it passed pi, different in each echo,
    which the echo combination took into B0 (on the independent benchmark's
    heads 330-434 % NRMSE made congruent, 75-94 % not; ROMEO 31-36 %;
    docs/unwrapping.md).

    Parameters
    ----------
    phase : array (X, Y, Z) or (X, Y, Z, E)
        Wrapped phase (rad); each echo is unwrapped independently.
    voxel_size_mm : sequence of 3 floats
    mask : bool array (X, Y, Z), optional
        Voxels used to align the constant (default: all).

    Returns
    -------
    float32 array like ``phase``: the unwrapped phase (rad), the true phase
    up to a smooth field (so not the data plus 2 pi multiples); NaNs become 0.
    """
    phase = _finite(phase)
    if phase.ndim == 4:
        return np.stack(
            [laplacian_unwrap(phase[..., e], voxel_size_mm, mask=mask) for e in range(phase.shape[-1])],
            axis=-1,
        )
    if phase.ndim != 3:
        raise ValueError(f"phase must be 3-D or 4-D, got shape {phase.shape}")
    eig = np.zeros(phase.shape, dtype=np.float32)
    for d, (n, v) in enumerate(zip(phase.shape, voxel_size_mm)):
        k = (2 * np.cos(np.pi * np.arange(n) / n) - 2) / float(v) ** 2
        eig = eig + k.astype(np.float32).reshape([-1 if a == d else 1 for a in range(3)])

    def dct(x):
        return sfft.dctn(x, type=2, workers=workers())

    def idct(x):
        return sfft.idctn(x, type=2, workers=workers())

    sin, cos = np.sin(phase), np.cos(phase)
    rhs = cos * idct(dct(sin) * eig) - sin * idct(dct(cos) * eig)
    inv = np.divide(1.0, eig, out=np.zeros_like(eig), where=eig != 0)
    smooth = idct(dct(rhs) * inv).astype(np.float32)
    sel = slice(None) if mask is None else np.asarray(mask, dtype=bool)
    offset = np.angle(np.mean(np.exp(1j * (phase[sel] - smooth[sel]))))
    return smooth + np.float32(offset)


# --------------------------------------------------------------------------
# MCPC-3D-S
# --------------------------------------------------------------------------
def _smooth_phase(phase, weight, sigma_vox, passes=3):
    """Magnitude-weighted smoothing of a phase map on the unit circle.

    The Gaussian of width ``sigma_vox`` is approximated by ``passes`` box
    filters of the odd width nearest ``sqrt(12 sigma^2 / passes + 1)``, whose
    cost does not grow with sigma.
    """
    size = [2 * int(round((np.sqrt(12 * s * s / passes + 1) - 1) / 2)) + 1 for s in sigma_vox]
    parts = []
    for part in (np.cos(phase), np.sin(phase)):
        part = (weight * part).astype(np.float32)
        for _ in range(passes):
            part = ndimage.uniform_filter(part, size, mode="constant")
        parts.append(part)
    return np.arctan2(parts[1], parts[0]).astype(np.float32)


def mcpc3ds(phase, magnitude, echo_times_s, *, voxel_size_mm, sigma_mm=3.0, bipolar=False):
    """MCPC-3D-S phase-offset removal (Eckstein et al., MRM 2018;79:2996).

    The Hermitian inner product of echoes 1 and 2, ``angle(S2 conj(S1)) =
    omega (TE2 - TE1)``, is unwrapped with ROMEO and gives the echo-independent
    offset ``phi0 = phi1 - omega TE1``; it is smoothed on the unit circle
    (magnitude-weighted, approximately Gaussian of width ``sigma_mm``) and
    removed from every echo.

    With ``bipolar=True`` (alternating readouts, >= 3 echoes) the extra phase
    ``b`` of the even echoes is estimated first from echoes 1-3,
    ``b = wrap(phi2 - phi1 - (phi3 - phi1)(TE2 - TE1)/(TE3 - TE1))``, smoothed
    and removed from the even echoes (2nd, 4th, ...).

    Parameters
    ----------
    phase, magnitude : arrays (X, Y, Z, E)
        Wrapped phase (rad) and magnitude, echoes last (E >= 2).
    echo_times_s : sequence of E floats
    voxel_size_mm : sequence of 3 floats
    sigma_mm : float
        Smoothing width of the offset (mm). Any smoothing bias of the offset
        stays constant in time and enters the B0 map as ``bias / mean TE``,
        so this is kept small: on simulated heads with a smooth offset
        (std 1.3 rad, FWHM 60 mm; SNR 20-100; 1 and 2 mm; 3 and 7 T) 3 mm
        left a 2.5-3.5x smaller residual (0.025-0.035 rad) than 7 mm, and
        the averaging still suppresses the noise of the two-echo estimate.

    Returns
    -------
    corrected : float32 (X, Y, Z, E)
        Phase with the offset removed, wrapped to [-pi, pi].
    offset : float32 (X, Y, Z)
        The smoothed phase offset ``phi0`` (rad).
    """
    phase = _finite(phase)
    mag = _finite(magnitude)
    te = check_echo_times_s(echo_times_s)
    if phase.ndim != 4 or phase.shape[-1] < 2 or mag.shape != phase.shape:
        raise ValueError(
            f"mcpc3ds needs phase and magnitude of shape (X, Y, Z, E>=2), got {phase.shape} "
            f"and {mag.shape}"
        )
    if bipolar and phase.shape[-1] < 3:
        raise ValueError("bipolar MCPC-3D-S needs at least 3 echoes")
    sigma_vox = [sigma_mm / float(v) for v in voxel_size_mm]
    weight = mag[..., 0]

    def hip_unwrapped(a, b):
        """Unwrapped phase of S_b conj(S_a), i.e. omega (TE_b - TE_a)."""
        hip = _wrap_np(phase[..., b] - phase[..., a])
        return romeo_unwrap(
            hip,
            magnitude=np.sqrt(mag[..., a] * mag[..., b]),
            weights=("phase_coherence", "magnitude_coherence", "magnitude_weight"),
        )[0]

    if bipolar:
        d13 = hip_unwrapped(0, 2)
        b = _wrap_np(phase[..., 1] - phase[..., 0] - d13 * np.float32((te[1] - te[0]) / (te[2] - te[0])))
        phase[..., 1::2] -= _smooth_phase(b, weight, sigma_vox)[..., None]
    d12 = hip_unwrapped(0, 1)
    offset = _smooth_phase(phase[..., 0] - d12 * np.float32(te[0] / (te[1] - te[0])), weight, sigma_vox)
    corrected = _wrap_np(phase - offset[..., None])
    return corrected, offset


def _wrap_np(x):
    """Wrap to [-pi, pi] (float32): ``x - 2 pi rint(x / 2 pi)``, computed in one
    output array (a 4-D phase is hundreds of MB)."""
    x = np.asarray(x, dtype=np.float32)
    out = np.divide(x, np.float32(TWO_PI))
    np.rint(out, out=out)
    out *= np.float32(TWO_PI)
    return np.subtract(x, out, out=out)


def _finite(x):
    """float32 copy of ``x`` with non-finite values set to 0."""
    x = np.array(x, dtype=np.float32)
    bad = ~np.isfinite(x)  # one pass (nan_to_num makes three over a 4-D volume)
    if bad.any():
        x[bad] = 0.0
    return x


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------
def romeo(phase_rad, *, magnitude=None, echo_times_s, mask=None, mode="template",
          template_echo=0, weights=WEIGHTS):
    """Registry wrapper of :func:`romeo_unwrap`: 4-D unwrapped phase and quality."""
    phase_rad = np.asarray(phase_rad)
    unwrapped, quality = romeo_unwrap(
        phase_rad,
        magnitude=magnitude,
        echo_times_s=echo_times_s,
        mask=mask,
        mode=mode,
        template_echo=template_echo,
        weights=tuple(weights),
    )
    return unwrapped.reshape(phase_rad.shape[:3] + (-1,)), quality


def laplacian(phase_rad, *, magnitude=None, echo_times_s, mask=None, voxel_size_mm=None):
    """Registry wrapper of :func:`laplacian_unwrap` (voxel size defaults to 1 mm).
    The echo times are not used, only checked to be seconds like every method's."""
    if echo_times_s is not None:
        check_echo_times_s(echo_times_s)
    phase_rad = np.asarray(phase_rad)
    vox = (1.0, 1.0, 1.0) if voxel_size_mm is None else voxel_size_mm
    unwrapped = laplacian_unwrap(phase_rad, vox, mask=mask)
    return unwrapped.reshape(phase_rad.shape[:3] + (-1,)), None
