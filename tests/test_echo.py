"""B0 maps from unwrapped multi-echo phase."""

import numpy as np
import pytest
from _data import simulate_multi_echo

from qsmprep.qsm.echo import romeo_b0, weighted_echo_fit
from qsmprep.qsm.romeo import romeo_unwrap

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
    unwrapped, _ = romeo_unwrap(phase, magnitude=mag, echo_times_s=te)
    b0 = romeo_b0(unwrapped, mag, te)
    fit, residual = weighted_echo_fit(unwrapped, mag, te)
    # phase noise std ~ 1/(snr |S|); the last echo alone would give ~1/(2 pi TE snr) Hz
    noise_hz = 1 / (2 * np.pi * te[-1] * snr)
    for estimate in (b0, fit):
        error = (estimate - field)[mask]
        assert np.sqrt(np.mean(error**2)) < 1.5 * noise_hz
        assert np.abs(error).max() < 8 * noise_hz
    assert np.median(residual[mask]) < 3 / snr


# --- nonlinear complex fit, noise maps (N_std), the echo_combination stage ---------------

from qsmprep.qsm import registry  # noqa: E402
from qsmprep.qsm.echo import (  # noqa: E402
    noise_level_known,
    nonlinear_complex_fit,
    romeo_b0_noise_std,
)

TE4 = np.array([0.005, 0.010, 0.015, 0.020], dtype=np.float32)


def _voxels(field_hz, magnitude, te, *, sigma, offset=0.0, seed=0):
    """N independent voxels (N, 1, 1, E) of one true field: complex signal with
    per-channel noise ``sigma``, returned as temporally unwrapped phase and magnitude."""
    rng = np.random.default_rng(seed)
    rho = np.asarray(magnitude, np.float64)[:, None] * np.exp(-(te - te[0]) / 0.04)
    s = rho * np.exp(1j * (2 * np.pi * field_hz * te + offset))
    s = s + sigma * (rng.standard_normal(s.shape) + 1j * rng.standard_normal(s.shape))
    phase = np.unwrap(np.angle(s), axis=-1)
    n = s.shape[0]
    return (phase.reshape(n, 1, 1, -1).astype(np.float32),
            np.abs(s).reshape(n, 1, 1, -1).astype(np.float32))


def test_nonlinear_fit_recovers_field_and_offset_of_noisy_simulation():
    te = tuple(float(t) for t in TE4)
    snr = 40.0
    phase, mag, field, mask = simulate_multi_echo(echo_times_s=te, amplitude_hz=300.0,
                                                  snr=snr, shape=(40, 40, 40))
    x = np.linspace(-1, 1, 40, dtype=np.float32)
    offset = 1.2 * x[:, None, None] + 0.5 * x[None, None, :] ** 2  # smooth phase at TE = 0
    wrapped = np.angle(np.exp(1j * (phase + offset[..., None]))).astype(np.float32)
    unwrapped, _ = romeo_unwrap(wrapped, magnitude=mag, echo_times_s=te)
    fit, p0, n_std = nonlinear_complex_fit(unwrapped, mag, te)
    error = (fit - field)[mask]
    # N_std: sigma / (2 pi sqrt(sum |S|^2 (TE - TE_w)^2)), sigma = 1/snr per channel
    rho = np.exp(-(TE4 - TE4[0]) / 0.04)
    expected = 1 / snr / (2 * np.pi * np.sqrt(np.sum(rho**2 * (TE4 - np.sum(rho**2 * TE4)
                                                                 / np.sum(rho**2)) ** 2)))
    assert np.median(n_std[mask]) == pytest.approx(expected, rel=0.1)
    assert np.sqrt(np.mean(error**2)) < 1.2 * expected
    assert np.abs(error).max() < 8 * expected
    p0_error = np.angle(np.exp(1j * (p0 - offset)))[mask]
    assert np.sqrt(np.mean(p0_error**2)) < 0.05
    # the linear fit through the origin cannot absorb the offset: biased by ~offset/(2 pi TE)
    linear, _ = registry.run("echo_combination", "linear", unwrapped, mag, te)
    assert np.sqrt(np.mean((linear - field)[mask] ** 2)) > 10 * expected


@pytest.mark.parametrize("name", ["nonlinear", "romeo", "linear"])
def test_noise_std_tracks_the_monte_carlo_std(name):
    # 2 x 3000 noise draws of one voxel, at two signal levels: N_std must follow
    # the spread of the estimate (within 20 %), including its 1/|S| scaling
    sigma, n = 0.02, 3000
    magnitude = np.r_[np.ones(n), 0.4 * np.ones(n)]
    phase, mag = _voxels(30.0, magnitude, TE4, sigma=sigma, seed=5)
    b0, n_std = registry.run("echo_combination", name, phase, mag, TE4)
    b0, n_std = b0.reshape(2, n), n_std.reshape(2, n)
    for group in range(2):
        assert np.mean(b0[group]) == pytest.approx(30.0, abs=3 * np.std(b0[group]) / np.sqrt(n) + 0.01)
        assert np.std(b0[group]) == pytest.approx(np.mean(n_std[group]), rel=0.2)
    assert np.mean(n_std[1]) / np.mean(n_std[0]) == pytest.approx(2.5, rel=0.1)


def test_nonlinear_fit_works_where_the_linear_fits_fail():
    # 2 pi errors of temporal unwrapping in the weak (decayed) last echo of 30 % of the
    # voxels, and a phase offset of 0.5 rad: the complex model sees neither the 2 pi
    # errors nor is it biased by the offset
    te = np.array([0.005, 0.010, 0.015, 0.020, 0.025], np.float32)
    rng = np.random.default_rng(1)
    n = 3000
    rho = np.exp(-(te - te[0]) / 0.01)
    s = rho * np.exp(1j * (2 * np.pi * 40.0 * te + 0.5))
    s = s + 0.01 * (rng.standard_normal((n, 5)) + 1j * rng.standard_normal((n, 5)))
    phase = np.unwrap(np.angle(s), axis=-1)
    bad = rng.random(n) < 0.3
    phase[bad, -1] += 2 * np.pi
    phase, mag = phase.reshape(n, 1, 1, 5).astype(np.float32), np.abs(s).reshape(n, 1, 1, 5)
    nl, n_std = registry.run("echo_combination", "nonlinear", phase, mag, te)
    err = np.abs(nl.ravel() - 40.0)
    assert err[bad].mean() < 2 * np.median(n_std) and err[~bad].mean() < 2 * np.median(n_std)
    for name in ("linear", "romeo"):
        b0, _ = registry.run("echo_combination", name, phase, mag, te)
        assert np.abs(b0.ravel() - 40.0)[bad].mean() > 10 * np.median(n_std), name


def test_romeo_noise_std_formula_and_undefined_voxels():
    mag = np.zeros((2, 1, 1, 3), np.float32)
    mag[0] = [1.0, 0.5, 0.25]
    te = np.array([0.004, 0.008, 0.012])
    n_std = romeo_b0_noise_std(mag, te, sigma=0.1)
    expected = 0.1 * np.sqrt(3) / (2 * np.pi * (0.004 + 0.5 * 0.008 + 0.25 * 0.012))
    assert n_std[0, 0, 0] == pytest.approx(expected, rel=1e-5)
    assert n_std[1, 0, 0] == 0  # no signal: no estimate (weight 0 downstream)


def test_echo_combination_stage_and_two_echo_and_one_echo_cases():
    assert registry.names("echo_combination") == ["linear", "nonlinear", "romeo"]
    assert "liu2013nonlinear" in registry.get("echo_combination", "nonlinear").citations
    phase, mag = _voxels(20.0, np.ones(50), TE4[:2], sigma=0.01)
    b0, n_std = registry.run("echo_combination", "nonlinear", phase, mag, TE4[:2])
    np.testing.assert_allclose(b0, 20.0, atol=2.0)  # exact fit of two echoes
    assert (n_std > 0).all() and np.ptp(n_std) < 0.1 * n_std.mean()  # relative (sigma = 1)
    with pytest.raises(ValueError, match="two echoes or more"):
        nonlinear_complex_fit(phase[..., :1], mag[..., :1], TE4[:1])
    b0, n_std = registry.run("echo_combination", "romeo", phase[..., :1], mag[..., :1], TE4[:1])
    assert np.isfinite(n_std).all() and (n_std > 0).all()


@pytest.mark.parametrize("name", ["romeo", "linear", "nonlinear"])
def test_echo_times_in_milliseconds_are_refused(linear_phase, name):
    # issue 24: TE in ms would divide every B0 map by 1000 without a word
    from qsmprep.qsm import registry

    _, phase, mag = linear_phase
    with pytest.raises(ValueError, match=r"look like milliseconds: give seconds \(0.004, not 4\)"):
        registry.run("echo_combination", name, phase, mag, TE * 1000)
    # seconds up to the bound pass (a long-TE T2* acquisition)
    registry.run("echo_combination", name, phase, mag, np.array([0.1, 0.2, 0.4]))


def test_romeo_noise_std_refuses_milliseconds():
    from qsmprep.qsm.echo import romeo_b0_noise_std

    with pytest.raises(ValueError, match="look like milliseconds"):
        romeo_b0_noise_std(np.ones((2, 2, 2, 3)), [4, 8, 12])


@pytest.mark.parametrize("name", ["romeo", "linear", "nonlinear"])
def test_noise_level_known_says_when_n_std_follows_the_noise(name):
    # TFI scales its lambda to N_std's level where noise_level_known says it is
    # absolute: there four times the noise must give four times the level, and
    # where it is not (no residual degrees of freedom) the level must not move
    for n_echoes in ((2, 3) if name == "nonlinear" else (1, 2, 3)):
        te = TE4[:n_echoes]
        level = []
        for sigma in (0.01, 0.04):
            phase, mag = _voxels(30.0, np.ones(4000), te, sigma=sigma, seed=3)
            level.append(np.median(registry.run("echo_combination", name, phase, mag, te)[1]))
        ratio = level[1] / level[0]
        assert (ratio == pytest.approx(4, rel=0.15) if noise_level_known(name, n_echoes)
                else ratio == pytest.approx(1, abs=0.1)), (n_echoes, ratio)
