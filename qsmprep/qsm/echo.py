"""Echo combination: B0 maps (Hz) from unwrapped multi-echo phase.

References
----------
Dymerska B, Eckstein K, Bachrata B, et al. Phase unwrapping with a rapid
opensource minimum spanning tree algorithm (ROMEO). Magn Reson Med
2021;85:2294-2308 (phase-SNR weighted B0 combination).
"""

from __future__ import annotations

import numpy as np


def _as_echoes(unwrapped, magnitude, echo_times_s):
    """Float32 (X, Y, Z, E) phase and magnitude, and the echo times (s) as (E,)."""
    phase = np.asarray(unwrapped, dtype=np.float32)
    if phase.ndim == 3:
        phase = phase[..., None]
    if phase.ndim != 4:
        raise ValueError(f"unwrapped phase must be (X, Y, Z) or (X, Y, Z, E), got {phase.shape}")
    te = np.asarray(echo_times_s, dtype=np.float32).reshape(-1)
    if te.size != phase.shape[-1]:
        raise ValueError(f"Got {te.size} echo times for {phase.shape[-1]} echoes")
    if np.any(te <= 0):
        raise ValueError(f"Echo times must be positive (s), got {te.tolist()}")
    mag = None
    if magnitude is not None:
        mag = np.asarray(magnitude, dtype=np.float32).reshape(phase.shape)
    if not np.isfinite(phase).all() or (mag is not None and not np.isfinite(mag).all()):
        raise ValueError("unwrapped phase and magnitude must be finite (romeo_unwrap output is)")
    return phase, mag, te


def romeo_b0(unwrapped, magnitude, echo_times_s):
    """Phase-SNR weighted B0 map (Hz) from unwrapped multi-echo phase.

    ``B0 = 1/(2 pi) sum_n (phi_n / TE_n) w_n / sum_n w_n`` with
    ``w_n = mag_n TE_n`` (``w_n = TE_n`` when ``magnitude`` is None).

    Parameters
    ----------
    unwrapped : array (X, Y, Z, E) or (X, Y, Z)
        Unwrapped phase (rad), offset-free (e.g. after :func:`mcpc3ds`).
    magnitude : array like ``unwrapped`` or None
    echo_times_s : sequence of E floats (s)

    Returns
    -------
    float32 (X, Y, Z): B0 in Hz (0 where all weights vanish).
    """
    phase, mag, te = _as_echoes(unwrapped, magnitude, echo_times_s)
    num = np.zeros(phase.shape[:3], dtype=np.float32)
    den = np.zeros_like(num)
    for e, t in enumerate(te):
        w = t if mag is None else mag[..., e] * t
        num += phase[..., e] * (w / t)
        den += w
    b0 = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return b0 / np.float32(2 * np.pi)


def weighted_echo_fit(unwrapped, magnitude, echo_times_s):
    """Weighted linear fit of phase against echo time through the origin.

    ``omega = sum w TE phi / sum w TE^2`` with ``w = mag^2`` (1 when
    ``magnitude`` is None); ``B0 = omega / (2 pi)``.

    Returns
    -------
    b0_hz : float32 (X, Y, Z)
        B0 in Hz.
    residual : float32 (X, Y, Z)
        Weighted RMS phase residual of the fit (rad),
        ``sqrt(sum w (phi - omega TE)^2 / sum w)``; 0 for a single echo.
    """
    phase, mag, te = _as_echoes(unwrapped, magnitude, echo_times_s)
    w = np.ones_like(phase) if mag is None else mag * mag
    den = np.sum(w * te * te, axis=-1)
    omega = np.divide(np.sum(w * te * phase, axis=-1), den, out=np.zeros(den.shape, np.float32), where=den > 0)
    wsum = np.sum(w, axis=-1)
    sq = np.sum(w * (phase - omega[..., None] * te) ** 2, axis=-1)
    residual = np.sqrt(np.divide(sq, wsum, out=np.zeros_like(sq), where=wsum > 0))
    return (omega / (2 * np.pi)).astype(np.float32), residual.astype(np.float32)
