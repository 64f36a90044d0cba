"""B0 maps from unwrapped multi-echo phase."""

import numpy as np
import pytest
from _data import simulate_multi_echo

from qsmprep.qsm.echo import romeo_b0, weighted_echo_fit
from qsmprep.qsm.unwrap import romeo_unwrap

TE = np.array([0.004, 0.008, 0.012], dtype=np.float32)


@pytest.fixture
def linear_phase():
    rng = np.random.default_rng(3)
    b0 = rng.uniform(-200, 200, (5, 6, 7)).astype(np.float32)
    mag = rng.uniform(0.1, 1.0, (5, 6, 7, 3)).astype(np.float32)
    return b0, 2 * np.pi * b0[..., None] * TE, mag


def test_noiseless_linear_phase_gives_exact_b0(linear_phase):
    b0, phase, mag = linear_phase
    np.testing.assert_allclose(romeo_b0(phase, mag, TE), b0, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(romeo_b0(phase, None, TE), b0, rtol=1e-5, atol=1e-3)
    fit, residual = weighted_echo_fit(phase, mag, TE)
    np.testing.assert_allclose(fit, b0, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(residual, 0, atol=1e-4)


def test_weights_follow_the_formulas(linear_phase):
    b0, phase, mag = linear_phase
    # a phase error on echo 1 alone: each estimator moves by its echo-1 weight share
    err = np.zeros_like(phase)
    err[..., 0] = 0.3
    w = mag * TE
    expected = b0 + 0.3 / TE[0] * w[..., 0] / w.sum(-1) / (2 * np.pi)
    np.testing.assert_allclose(romeo_b0(phase + err, mag, TE), expected, rtol=1e-4, atol=1e-3)
    w2 = mag**2
    omega_shift = 0.3 * w2[..., 0] * TE[0] / (w2 * TE**2).sum(-1)
    fit, residual = weighted_echo_fit(phase + err, mag, TE)
    np.testing.assert_allclose(fit, b0 + omega_shift / (2 * np.pi), rtol=1e-4, atol=1e-3)
    res = err - omega_shift[..., None] * TE
    np.testing.assert_allclose(residual, np.sqrt((w2 * res**2).sum(-1) / w2.sum(-1)), atol=1e-4)


def test_single_echo_and_zero_magnitude():
    phase = np.full((3, 3, 3), 1.0, dtype=np.float32)
    np.testing.assert_allclose(romeo_b0(phase, None, [0.01]), 1 / (2 * np.pi * 0.01), rtol=1e-6)
    b0, residual = weighted_echo_fit(phase, np.zeros_like(phase), [0.01])
    assert (b0 == 0).all() and (residual == 0).all()  # no signal: no estimate, no NaN
    with pytest.raises(ValueError, match="echo times"):
        romeo_b0(phase, None, [0.01, 0.02])


def test_b0_from_simulated_multi_echo_matches_field():
    te = (0.005, 0.010, 0.015, 0.020)
    snr = 40.0
    phase, mag, field, mask = simulate_multi_echo(echo_times_s=te, amplitude_hz=300.0, snr=snr)
    unwrapped, _ = romeo_unwrap(phase, magnitude=mag, echo_times=te)
    b0 = romeo_b0(unwrapped, mag, te)
    fit, residual = weighted_echo_fit(unwrapped, mag, te)
    # phase noise std ~ 1/(snr |S|); the last echo alone would give ~1/(2 pi TE snr) Hz
    noise_hz = 1 / (2 * np.pi * te[-1] * snr)
    for estimate in (b0, fit):
        error = (estimate - field)[mask]
        assert np.sqrt(np.mean(error**2)) < 1.5 * noise_hz
        assert np.abs(error).max() < 8 * noise_hz
    assert np.median(residual[mask]) < 3 / snr
