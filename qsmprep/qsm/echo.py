"""Echo combination: B0 maps (Hz) from unwrapped multi-echo phase.

References
----------
Dymerska B, Eckstein K, Bachrata B, et al. Phase unwrapping with a rapid
opensource minimum spanning tree algorithm (ROMEO). Magn Reson Med
2021;85:2294-2308 (phase-SNR weighted B0 combination).
"""

from __future__ import annotations

import numpy as np

from .units import check_echo_times_s


def _as_echoes(unwrapped, magnitude, echo_times_s):
    """Float32 (X, Y, Z, E) phase and magnitude, and the echo times (s) as (E,)."""
    phase = np.asarray(unwrapped, dtype=np.float32)
    if phase.ndim == 3:
        phase = phase[..., None]
    if phase.ndim != 4:
        raise ValueError(f"unwrapped phase must be (X, Y, Z) or (X, Y, Z, E), got {phase.shape}")
    te = check_echo_times_s(echo_times_s).astype(np.float32)
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

    def weight(e):  # w of echo e, (X, Y, Z): echo by echo, no 4-D temporaries
        return np.ones(phase.shape[:3], np.float32) if mag is None else mag[..., e] * mag[..., e]

    def echo_sum(term):
        total = term(0)
        for e in range(1, te.size):
            total += term(e)
        return total

    den = echo_sum(lambda e: weight(e) * te[e] * te[e])
    num = echo_sum(lambda e: weight(e) * te[e] * phase[..., e])
    omega = np.divide(num, den, out=np.zeros(den.shape, np.float32), where=den > 0)
    wsum = echo_sum(weight)
    sq = echo_sum(lambda e: weight(e) * (phase[..., e] - omega * te[e]) ** 2)
    residual = np.sqrt(np.divide(sq, wsum, out=np.zeros_like(sq), where=wsum > 0))
    return (omega / (2 * np.pi)).astype(np.float32), residual.astype(np.float32)


# ---------------------------------------------------------------------------
# Noise of the field estimate (N_std) and the nonlinear complex fit
# ---------------------------------------------------------------------------

#: voxels whose mean magnitude over echoes is at least this fraction of its
#: 99th percentile count as signal when the noise level is estimated
SIGNAL_FRACTION = 0.25


def estimate_noise_sigma(rss, dof, magnitude_mean):
    """Noise std ``sigma`` of the complex signal (per real channel, magnitude
    units) from the residuals of a per-voxel echo fit.

    ``rss`` is the residual sum of squares of the whitened fit in each voxel,
    ``sum_n mag_n^2 (phi_n - model_n)^2`` (for small residuals the tangential
    part of the complex residual), which is ``sigma^2 chi^2_dof`` distributed
    where the model holds. One global ``sigma`` is taken: the median of
    ``rss`` over signal voxels (mean magnitude >= :data:`SIGNAL_FRACTION` of
    its 99th percentile) divided by the median of ``chi^2_dof``. The median
    ignores voxels where the model fails (vessels, unwrapping errors); a
    per-voxel estimate with ``dof = E - 2`` degrees of freedom would be too
    noisy to weight with (and undefined for two echoes).

    Returns None when ``dof < 1``, no voxel has signal or the residuals are 0
    (noise-free data); the noise maps are then relative (``sigma = 1``).
    """
    from scipy.stats import chi2

    if dof < 1:
        return None
    mean_mag = np.asarray(magnitude_mean, dtype=np.float32)
    positive = mean_mag > 0
    if not positive.any():
        return None
    signal = mean_mag >= SIGNAL_FRACTION * np.percentile(mean_mag[positive], 99)
    values = np.asarray(rss, dtype=np.float64)[signal]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    sigma = float(np.sqrt(np.median(values) / chi2.ppf(0.5, dof)))
    return sigma if sigma > 0 else None  # noise-free (simulated) data: relative map


#: parameters of each echo_combination method's per-voxel fit (the rest of the
#: echoes are the residual degrees of freedom its noise level is estimated from)
FIT_PARAMETERS = {"romeo": 1, "linear": 1, "nonlinear": 2}


def noise_level_known(method, n_echoes):
    """Whether the N_std of echo-combination ``method`` on ``n_echoes`` echoes has an
    absolute level: its fit leaves residual degrees of freedom for
    :func:`estimate_noise_sigma` (``E - 1`` for romeo and linear, ``E - 2`` for
    nonlinear). Otherwise (one echo) only its relative values are known."""
    return n_echoes - FIT_PARAMETERS.get(method, n_echoes) >= 1


def _field_std_hz(var_omega_per_sigma2, sigma):
    """``sigma * sqrt(var)/(2 pi)`` in Hz; 0 where undefined (no signal)."""
    var = np.asarray(var_omega_per_sigma2, dtype=np.float64)
    ok = np.isfinite(var) & (var > 0)
    out = np.zeros(var.shape, dtype=np.float32)
    out[ok] = (1.0 if sigma is None else sigma) * np.sqrt(var[ok]) / (2 * np.pi)
    return out


def romeo_b0_noise_std(magnitude, echo_times_s, sigma=None):
    """Standard deviation (Hz) of the :func:`romeo_b0` estimate.

    With the phase noise of echo ``n`` ``sigma_n = sigma / mag_n`` (complex
    Gaussian noise of std ``sigma`` per channel, SNR well above 1) and the
    weights ``w_n = mag_n TE_n``, error propagation through
    ``B0 = 1/(2 pi) sum (phi_n/TE_n) w_n / sum w_n`` gives

    ``std(B0) = sigma sqrt(E) / (2 pi sum_n mag_n TE_n)``.

    ``sigma`` None gives the map for ``sigma = 1`` (relative values only).
    Voxels without signal get 0 (no estimate).
    """
    te = check_echo_times_s(echo_times_s)
    mag = np.asarray(magnitude, dtype=np.float32)
    if mag.ndim == 3:
        mag = mag[..., None]
    den = np.zeros(mag.shape[:3])  # float64, echo by echo (no 4-D float64 copy)
    for e, t in enumerate(te):
        den += mag[..., e] * float(t)
    with np.errstate(divide="ignore"):
        return _field_std_hz(te.size / den**2, sigma)  # inf (no signal) -> 0


def _linear_fit_sigma(residual, mag):
    """Noise std from the ``residual`` of :func:`weighted_echo_fit` (weights
    ``mag^2``, ``dof = E - 1``); None for one echo."""
    if mag.shape[-1] < 2:
        return None
    rss = residual.astype(np.float64) ** 2 * np.einsum("...e,...e->...", mag, mag)
    return estimate_noise_sigma(rss, mag.shape[-1] - 1, mag.mean(axis=-1))


def _cos_cost(a, ph, p0, om, t):
    """Per-voxel cost ``sum_n a_n (1 - cos(phase_n - p0 - om TE_n))`` of the
    complex fit (``|S - model|^2 / 2`` with ``a = mag^2``)."""
    return (a * (1 - np.cos(ph - (p0[:, None] + om[:, None] * t)))).sum(1)


def nonlinear_complex_fit(unwrapped, magnitude, echo_times_s, *, max_iter=30,
                          tol_hz=1e-3, noise_sigma=None, chunk_voxels=1 << 18):
    """Nonlinear fit of the complex multi-echo signal (MEDI's ``Fit_ppm_complex``).

    Model per voxel: ``S_n = |S_n| exp(i (phi0 + omega TE_n))``, fitted to the
    complex data ``mag_n exp(i phase_n)`` by Gauss-Newton (Liu et al., MRM
    2013). As in MEDI the magnitude of each echo is taken from the data, so
    the unknowns are the phase offset ``phi0`` (rad) and ``omega`` (rad/s),
    and the Gauss-Newton normal matrix is the fixed
    ``sum_n mag_n^2 [[1, TE_n], [TE_n, TE_n^2]]``; the gradient is
    ``sum_n mag_n^2 sin(phase_n - model_n) [1, TE_n]``. The cost depends on
    the phase only through ``exp(i phase)``, so 2 pi errors of the unwrapped
    phase (e.g. in noisy late echoes) do not bias the result, and the phase
    offset is fitted rather than assumed 0. It is initialised with the
    weighted linear fit with intercept on the unwrapped phase (weights
    ``mag^2``); a step that raises the cost is halved, or refused.

    Parameters
    ----------
    unwrapped : (X, Y, Z, E) phase, rad (wrapped phase also works for the
        model, but the initial guess needs the unwrapped one)
    magnitude : like ``unwrapped`` or None (1 everywhere)
    echo_times_s : E >= 2 echo times (s)
    max_iter : Gauss-Newton iterations at most (MEDI: 30)
    tol_hz : stop when no voxel's field changes by more than this (Hz)
    noise_sigma : noise std of the complex signal (per real channel, magnitude
        units); None: estimated from the fit residuals
        (:func:`estimate_noise_sigma`, ``dof = E - 2``; with two echoes the
        fit is exact and the noise map is relative, ``sigma = 1``)

    Returns
    -------
    field_hz : float32 (X, Y, Z), ``omega / 2 pi``
    phase_offset_rad : float32 (X, Y, Z), ``phi0``
    noise_std_hz : float32 (X, Y, Z)
        N_std, the standard deviation of ``field_hz`` from the Jacobian and
        the residual noise level: ``sigma sqrt([(J^T J)^-1]_omega) / 2 pi``
        with ``(J^T J)^-1_omega = sum mag^2 / det``, i.e.
        ``sigma / (2 pi sqrt(sum_n mag_n^2 (TE_n - TE_w)^2))``
        (``TE_w`` the mag^2-weighted mean echo time). In Hz like the field;
        :class:`~qsmprep.interfaces.qsm.TotalField` converts both to ppm.
        0 where there is no signal (no estimate).
    """
    phase, mag, te = _as_echoes(unwrapped, magnitude, echo_times_s)
    if te.size < 2:
        raise ValueError(
            "The nonlinear complex fit needs two echoes or more (it fits a phase offset "
            "and the field); use the romeo or linear echo combination for one echo")
    if mag is None:
        mag = np.ones_like(phase)
    shape = phase.shape[:3]
    flat_phase = phase.reshape(-1, te.size)
    flat_mag = mag.reshape(-1, te.size)
    field = np.zeros(flat_phase.shape[0], np.float32)
    offset = np.zeros_like(field)
    var = np.zeros(flat_phase.shape[0], np.float64)
    rss = np.full(flat_phase.shape[0], np.nan)
    active = np.flatnonzero(np.any(flat_mag > 0, axis=1))
    t = te.astype(np.float32)
    t64 = te.astype(np.float64)
    tol = np.float32(2 * np.pi * tol_hz)
    for start in range(0, active.size, chunk_voxels):
        idx = active[start:start + chunk_voxels]
        ph = flat_phase[idx]
        a = flat_mag[idx].astype(np.float32) ** 2
        a64 = a.astype(np.float64)
        a11, a12, a22 = a64.sum(1), a64 @ t64, a64 @ (t64 * t64)
        det = a11 * a22 - a12 * a12
        ok = det > 1e-12 * np.maximum(a11 * a22, 1e-300)
        det = np.where(ok, det, np.inf)
        # initial guess: weighted linear fit with intercept on the unwrapped phase
        b1 = (a * ph).sum(1, dtype=np.float64)
        b2 = (a * ph) @ t64
        p0 = ((a22 * b1 - a12 * b2) / det).astype(np.float32)
        om = ((a11 * b2 - a12 * b1) / det).astype(np.float32)
        i11, i12, i22 = (a22 / det).astype(np.float32), (-a12 / det).astype(np.float32), \
            (a11 / det).astype(np.float32)

        current = _cos_cost(a, ph, p0, om, t)
        todo = np.ones(idx.size, bool) & ok
        for _ in range(max_iter):
            if not todo.any():
                break
            g = a[todo] * np.sin(ph[todo] - (p0[todo, None] + om[todo, None] * t))
            pr1, pr2 = g.sum(1), g @ t
            d0 = i11[todo] * pr1 + i12[todo] * pr2
            d1 = i12[todo] * pr1 + i22[todo] * pr2
            sub = np.flatnonzero(todo)
            accepted = np.zeros(sub.size, bool)
            for step in (1.0, 0.5):
                trial0, trial1 = p0[sub] + step * d0, om[sub] + step * d1
                new = _cos_cost(a[sub], ph[sub], trial0, trial1, t)
                better = ~accepted & (new <= current[sub] * (1 + 1e-6) + 1e-30)
                p0[sub[better]], om[sub[better]] = trial0[better], trial1[better]
                current[sub[better]] = new[better]
                accepted |= better
            small = np.abs(d1) <= tol
            todo[sub[~accepted | small]] = False
        field[idx] = om / np.float32(2 * np.pi)
        offset[idx] = np.angle(np.exp(1j * p0)).astype(np.float32)
        var[idx] = np.where(ok, a11 / det, 0.0)
        rss[idx] = 2 * current  # |S - model|^2 = 2 mag^2 (1 - cos)
    if noise_sigma is None:
        noise_sigma = estimate_noise_sigma(rss.reshape(shape), te.size - 2, mag.mean(-1))
    noise = _field_std_hz(var.reshape(shape), noise_sigma)
    return field.reshape(shape), offset.reshape(shape), noise


# ---------------------------------------------------------------------------
# Registry stage ``echo_combination``
#   f(unwrapped_rad[X,Y,Z,E], magnitude[X,Y,Z,E] or None, echo_times_s, **params)
#   -> (b0_hz[X,Y,Z], noise_std_hz[X,Y,Z])
# (listed in qsmprep/data/methods.toml as romeo, linear, nonlinear)
# ---------------------------------------------------------------------------


def romeo_combination(unwrapped_rad, magnitude, echo_times_s):
    """:func:`romeo_b0` and its N_std (:func:`romeo_b0_noise_std`, Hz), with
    ``sigma`` from the residual of the weighted linear fit (``dof = E - 1``)."""
    phase, mag, te = _as_echoes(unwrapped_rad, magnitude, echo_times_s)
    mag1 = np.ones_like(phase) if mag is None else mag
    _, residual = weighted_echo_fit(phase, mag1, te)
    sigma = _linear_fit_sigma(residual, mag1)
    return romeo_b0(phase, mag, te), romeo_b0_noise_std(mag1, te, sigma)


def linear_combination(unwrapped_rad, magnitude, echo_times_s):
    """:func:`weighted_echo_fit` and its N_std: ``var(omega) = sigma^2 /
    sum mag^2 TE^2`` (Hz), ``sigma`` from the fit residual (``dof = E - 1``)."""
    phase, mag, te = _as_echoes(unwrapped_rad, magnitude, echo_times_s)
    mag1 = np.ones_like(phase) if mag is None else mag
    b0, residual = weighted_echo_fit(phase, mag1, te)
    den = np.tensordot(mag1.astype(np.float64) ** 2, te.astype(np.float64) ** 2,
                       axes=([-1], [0]))
    with np.errstate(divide="ignore"):
        return b0, _field_std_hz(1.0 / den, _linear_fit_sigma(residual, mag1))  # inf -> 0


def nonlinear_combination(unwrapped_rad, magnitude, echo_times_s, *, max_iter=30, tol_hz=1e-3):
    """:func:`nonlinear_complex_fit` as an echo-combination method (the fitted
    phase offset is dropped)."""
    field, _, noise = nonlinear_complex_fit(unwrapped_rad, magnitude, echo_times_s,
                                            max_iter=max_iter, tol_hz=tol_hz)
    return field, noise
