"""Multi-echo gradient-echo signal from a field map.

``S_n = M0 exp(-R2* TE_n) exp(i (2 pi gamma_bar B0 f TE_n + phi0)) + noise``
with f the total field (ppm), gamma_bar B0 in MHz so that f (ppm) times it is
in Hz, phi0 the per-voxel phase offset at TE = 0 (coil/transmit phase), and
complex Gaussian noise of standard deviation sigma in each of the real and
imaginary channels. With ``intravoxel_dephasing`` each echo's magnitude is
also multiplied by the signal loss of a linear field gradient across the
voxel, ``prod_a |sinc(g_a TE_n)|`` with ``g_a`` the field change per voxel
along axis a (Hz) and ``sinc(x) = sin(pi x) / (pi x)`` (the integral of
``exp(2 pi i g x TE)`` over a unit voxel; Yablonskiy DA, Haacke EM, MRM 1994;
32:749-763). This is the dark rim of GRE magnitude at air-tissue borders,
where the phase is also least reliable. Positive chi (paramagnetic, e.g. veins) gives a positive
field along B0 and a phase increasing with TE (the convention of qsm-forward
and of the QSM Challenge 2.0 data).
"""

from __future__ import annotations

import numpy as np

from ..qsm.units import ppm_to_hz
from .phantoms import as_rng, smooth_noise


def multi_echo_signal(field_ppm, m0, r2star_hz, echo_times_s, field_strength_t, *,
                      phase_offset_rad=0.0, snr=np.inf, mask=None, rng=None,
                      intravoxel_dephasing=True):
    """Complex multi-echo signal, (X, Y, Z, echo) complex64.

    Parameters
    ----------
    field_ppm : (X, Y, Z) total field (ppm).
    m0 : (X, Y, Z) or float, proton density.
    r2star_hz : (X, Y, Z) or float, R2* (Hz) at ``field_strength_t``.
    echo_times_s : sequence of echo times (s).
    field_strength_t : float, B0 (T).
    phase_offset_rad : (X, Y, Z) or float, phase at TE = 0 (rad).
    snr : float, mean first-echo magnitude inside ``mask`` (all voxels with
        M0 > 0 when None) divided by the noise standard deviation of each
        channel. ``inf``: no noise.
    rng : int, Generator or None, for the noise.
    intravoxel_dephasing : bool, attenuate the magnitude by
        :func:`dephasing_attenuation` of the field.
    """
    te = np.asarray(echo_times_s, np.float32)
    if te.ndim != 1 or np.any(te <= 0):
        raise ValueError(f"echo_times_s must be a 1-D sequence of positive times in s, got {te}")
    freq_hz = ppm_to_hz(np.asarray(field_ppm, np.float32), field_strength_t)[..., None]
    m0 = np.asarray(m0, np.float32)[..., None]
    decay = np.exp(-np.asarray(r2star_hz, np.float32)[..., None] * te)
    phase = 2 * np.pi * freq_hz * te + np.asarray(phase_offset_rad, np.float32)[..., None]
    if intravoxel_dephasing:
        decay = decay * dephasing_attenuation(freq_hz[..., 0], te)
    signal = (m0 * decay * np.exp(1j * phase)).astype(np.complex64)
    if np.isfinite(snr):
        rng = as_rng(rng)
        region = (np.broadcast_to(m0[..., 0], signal.shape[:3]) > 0) if mask is None else mask
        sigma = np.abs(signal[..., 0])[region].mean() / float(snr)
        noise = rng.standard_normal(signal.shape + (2,), dtype=np.float32) * np.float32(sigma)
        signal += noise[..., 0] + 1j * noise[..., 1]
    return signal


def dephasing_attenuation(field_hz, echo_times_s):
    """Magnitude factor (X, Y, Z, echo) of intravoxel dephasing in a field
    ``field_hz`` (X, Y, Z) whose gradient is taken constant over each voxel:
    ``prod_a |sinc(g_a TE)|``, ``g_a`` the central difference of the field
    along axis a (Hz per voxel; one-sided at the edges)."""
    field_hz = np.asarray(field_hz, np.float32)
    te = np.asarray(echo_times_s, np.float32)
    factor = np.ones(field_hz.shape + te.shape, np.float32)
    for axis in range(3):
        if field_hz.shape[axis] < 2:
            continue
        g = np.gradient(field_hz, axis=axis)[..., None]
        factor *= np.abs(np.sinc(g * te)).astype(np.float32)
    return factor


def smooth_phase_offset(shape, voxel_size_mm, rng, *, fwhm_mm=60.0, amplitude_rad=np.pi):
    """Smooth random phase offset at TE = 0 (rad): a Gaussian random field
    (FWHM ``fwhm_mm``) scaled to standard deviation ``amplitude_rad / 2``
    plus a uniform random constant, as from a coil combination."""
    field = smooth_noise(shape, voxel_size_mm, fwhm_mm, rng) * (amplitude_rad / 2)
    return (field + rng.uniform(-np.pi, np.pi)).astype(np.float32)


def magnitude_phase(signal):
    """Magnitude and wrapped phase in [-pi, pi) (rad) of a complex signal."""
    return np.abs(signal).astype(np.float32), np.angle(signal).astype(np.float32)
