"""Accuracy metrics of a susceptibility (or field) map against a ground truth.

Every metric follows the scoring conventions of the QSM-CI leaderboard, so
that the numbers in ``docs/benchmarks.md`` can be read beside its table:

* both maps are set to 0 outside the truth ``mask`` first, and a voxel of the
  reconstruction that is not finite is also set to 0;
* every mask voxel counts: a voxel a method dropped (an eroded rim, NaN) is
  scored as 0 against the truth there, so eroding the mask costs accuracy
  (:func:`coverage` reports the fraction of the mask that carries a value);
* the neighbourhood filters of :func:`xsim` and :func:`hfen` run over the whole
  volume, the sums over the mask only.

NRMSE and HFEN are in percent, XSIM and the correlation are fractions.

References
----------
Langkammer C et al. Quantitative susceptibility mapping: Report from the 2016
reconstruction challenge. Magn Reson Med 2018;79:1661-1673 (NRMSE, HFEN).
QSM Challenge 2.0 Organization Committee, Bilgic B et al. QSM reconstruction
challenge 2.0: Design and report of results. Magn Reson Med 2021;86:1241-1255
(detrended NRMSE, region metrics, calcification moment and streaking).
Milovic C et al. XSIM: A structural similarity index measure optimized for
MRI QSM. Magn Reson Med 2025;93:411-421.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation, gaussian_laplace, uniform_filter

#: Challenge 2.0 head labels used by :func:`region_metrics`.
DGM_LABELS = (1, 2, 3, 4, 5, 6)
TISSUE_LABELS = (7, 8, 9)
BLOOD_LABEL = 11
CALCIFICATION_LABEL = 16


def _prepare(recon, truth, mask):
    """Float64 copies of both maps, zero outside the mask (and where recon is
    not finite), and the boolean mask."""
    recon = np.asarray(recon, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    m = np.asarray(mask) > 0
    if recon.shape != truth.shape or recon.shape != m.shape:
        raise ValueError(
            f"recon, truth and mask must have the same shape; got {recon.shape}, "
            f"{truth.shape} and {m.shape}"
        )
    if not m.any():
        raise ValueError("The mask is empty: expected at least one voxel > 0")
    return np.where(m & np.isfinite(recon), recon, 0.0), np.where(m, truth, 0.0), m


def _fit_line(x, y):
    """Least-squares ``y ≈ slope·x + intercept``; (0, 0) when x is constant."""
    xc = x - x.mean()
    sxx = float(np.dot(xc, xc))
    if sxx < 1e-30 * max(x.size, 1):
        return 0.0, 0.0
    slope = float(np.dot(xc, y - y.mean())) / sxx
    return slope, float(y.mean() - slope * x.mean())


def _nrmse_pair(x, y):
    """(NRMSE, detrended NRMSE) in % of two voxel vectors (x recon, y truth).

    NRMSE = 100·‖x̃ − ỹ‖/‖ỹ‖ of the demeaned vectors. The detrended NRMSE first
    fits x = a·y + b and scores (x − b)/a instead of x.
    """
    x = x - x.mean()
    y = y - y.mean()
    norm = float(np.linalg.norm(y))
    if norm < 1e-30:
        return np.nan, np.nan
    err = 100.0 * float(np.linalg.norm(x - y)) / norm
    slope, intercept = _fit_line(y, x)
    if abs(slope) < 1e-30:
        return err, err
    return err, 100.0 * float(np.linalg.norm((x - intercept) / slope - y)) / norm


def nrmse(recon, truth, mask):
    """Normalised root-mean-square error (%) in the mask, both maps demeaned.

    ``100 · ‖(x − x̄) − (y − ȳ)‖ / ‖y − ȳ‖`` over the mask voxels, x the
    reconstruction, y the truth. 0 for identical maps; NaN for a constant truth.
    """
    x, y, m = _prepare(recon, truth, mask)
    return _nrmse_pair(x[m], y[m])[0]


def nrmse_detrend(recon, truth, mask):
    """Detrended NRMSE (%): NRMSE after fitting x = a·y + b and undoing it.

    Invariant to a global scale and offset of the reconstruction (a ≠ 0), so it
    scores structure rather than calibration (QSM Challenge 2.0).
    """
    x, y, m = _prepare(recon, truth, mask)
    return _nrmse_pair(x[m], y[m])[1]


def hfen(recon, truth, mask, sigma=1.5):
    """High-frequency error norm (%): NRMSE of Laplacian-of-Gaussian images.

    ``100 · ‖LoG(x) − LoG(y)‖ / ‖LoG(y)‖`` over the mask, the LoG (σ = 1.5
    voxels, kernel truncated at 5σ, ≈15 voxels) taken over the whole volume
    after masking (Ravishankar & Bresler 2011; QSM challenge 2016).
    """
    x, y, m = _prepare(recon, truth, mask)
    lx = gaussian_laplace(x, sigma=sigma, truncate=5.0)
    ly = gaussian_laplace(y, sigma=sigma, truncate=5.0)
    norm = float(np.linalg.norm(ly[m]))
    if norm < 1e-30:
        return np.nan
    return 100.0 * float(np.linalg.norm(lx[m] - ly[m])) / norm


def xsim(recon, truth, mask, window=5, demean=False):
    """XSIM: structural similarity tuned for QSM (Milovic et al. 2025).

    SSIM with dynamic range L = 1 ppm, K1 = 0.01, K2 = 0.001, local statistics
    over ``window``³ boxes (boxes cut at the volume edge use the voxels that
    exist), averaged over the mask voxels. 1 for identical maps.

    Scored on the maps as given (as QSM-CI does), XSIM depends on their
    reference: its luminance term sees an offset of 0.005 ppm. With
    ``demean`` both maps are first demeaned in the mask, as :func:`nrmse`
    does, so that two maps referenced differently (CSF = 0 against a zero
    brain mean) are compared on structure.
    """
    x, y, m = _prepare(recon, truth, mask)
    if demean:
        x, y = np.where(m, x - x[m].mean(), 0.0), np.where(m, y - y[m].mean(), 0.0)
    c1, c2 = 0.01**2, 0.001**2
    count = uniform_filter(np.ones_like(x), size=window, mode="constant")

    def local_mean(a):
        return uniform_filter(a, size=window, mode="constant") / count

    mx, my = local_mean(x), local_mean(y)
    vx = local_mean(x * x) - mx * mx
    vy = local_mean(y * y) - my * my
    cov = local_mean(x * y) - mx * my
    num = (2 * mx * my + c1) * (2 * cov + c2)
    den = (mx * mx + my * my + c1) * (vx + vy + c2)
    valid = m & (den > 0)
    return float(np.mean(num[valid] / den[valid])) if valid.any() else np.nan


def correlation(recon, truth, mask):
    """Pearson correlation coefficient of the two maps over the mask voxels."""
    x, y, m = _prepare(recon, truth, mask)
    x, y = x[m] - x[m].mean(), y[m] - y[m].mean()
    den = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(np.dot(x, y)) / den if den > 0 else np.nan


def coverage(recon, mask):
    """Fraction of the mask where ``recon`` holds a finite, non-zero value."""
    recon = np.asarray(recon)
    m = np.asarray(mask) > 0
    if recon.shape != m.shape:
        raise ValueError(f"recon and mask must have the same shape; got {recon.shape}, {m.shape}")
    if not m.any():
        raise ValueError("The mask is empty: expected at least one voxel > 0")
    return float(np.count_nonzero(np.isfinite(recon) & (recon != 0) & m) / np.count_nonzero(m))


def _dgm_linearity(x, y, labels):
    """|1 − slope| of the region means of recon against truth over labels 1–6."""
    present = [lab for lab in DGM_LABELS if np.any(labels == lab)]
    if len(present) < 2:
        return np.nan
    tmeans = np.array([y[labels == lab].mean() for lab in present])
    rmeans = np.array([x[labels == lab].mean() for lab in present])
    return abs(1.0 - _fit_line(tmeans, rmeans)[0])


def _grow(box, by, shape):
    return tuple(slice(max(s.start - by, 0), min(s.stop + by, n)) for s, n in zip(box, shape))


def _calcification(x, y, labels):
    """(moment deviation, streaking) around the calcification (label 16).

    The calcification's bounding box grown by 3 voxels is the "cube"; a shell
    4 voxels thick around it is the "rim", and a further 4 voxels the outer
    shell. The reconstructed calcification is the cube voxels below the
    highest threshold t ∈ {0, −0.01, …, −3.5} ppm that no shell voxel falls
    below. Moment = Σχ over the calcification; its deviation is
    |moment_true − moment_recon| (ppm·voxel). Streaking = std of the residuals
    of a line fit of recon on truth in the rim, over |mean χ| of the
    reconstructed calcification (QSM Challenge 2.0).
    """
    calc = labels == CALCIFICATION_LABEL
    if not calc.any():
        return np.nan, np.nan
    true_moment = float(y[calc].sum())
    idx = np.nonzero(calc)
    cube = _grow(tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx), 3, labels.shape)
    rim_box = _grow(cube, 4, labels.shape)
    outer_box = _grow(rim_box, 4, labels.shape)
    in_cube = np.zeros(labels.shape, bool)
    in_cube[cube] = True
    shell = np.zeros(labels.shape, bool)
    shell[outer_box] = True
    shell &= ~in_cube
    rim = np.zeros(labels.shape, bool)
    rim[rim_box] = True
    rim &= ~in_cube

    steps = -0.01 * np.arange(351)
    ok = steps <= x[shell].min() if shell.any() else np.ones_like(steps, bool)
    threshold = steps[np.argmax(ok)] if ok.any() else steps[-1]
    found = x[in_cube][x[in_cube] < threshold]
    if found.size == 0:
        return abs(true_moment), np.nan
    moment_dev = abs(true_moment - float(found.sum()))
    if np.count_nonzero(rim) < 2:
        return moment_dev, np.nan
    slope, intercept = _fit_line(y[rim], x[rim])
    residual = x[rim] - (slope * y[rim] + intercept)
    mean = abs(float(found.mean()))
    return moment_dev, (float(residual.std()) / mean if mean > 1e-30 else np.nan)


def region_metrics(recon, truth, labels, mask):
    """QSM Challenge 2.0 region metrics on the challenge head labels.

    Parameters
    ----------
    recon, truth : ndarray (X, Y, Z), ppm
    labels : integer ndarray (X, Y, Z)
        Challenge labels: 1–6 deep grey matter, 7 thalamus, 8 WM, 9 GM,
        11 blood, 16 calcification.
    mask : ndarray (X, Y, Z)
        Brain mask the maps are scored in.

    Returns
    -------
    dict with
    ``nrmse_tissue``, ``nrmse_dgm``, ``nrmse_blood``
        detrended NRMSE (%) over labels 7–9, 1–6 and over the blood (label 11,
        dilated by one voxel, 26-connected);
    ``dgm_linearity``
        |1 − slope| of the region means (labels 1–6), recon against truth;
    ``calc_moment_dev``, ``calc_streak``
        calcification moment deviation (ppm·voxel) and streaking (fraction).
    A metric whose region is absent is NaN.
    """
    x, y, m = _prepare(recon, truth, mask)
    labels = np.rint(np.asarray(labels)).astype(np.int32)
    if labels.shape != m.shape:
        raise ValueError(f"labels must have the mask's shape {m.shape}; got {labels.shape}")

    def region_nrmse(sel):
        return _nrmse_pair(x[sel], y[sel])[1] if sel.any() else np.nan

    blood = binary_dilation(m & (labels == BLOOD_LABEL), structure=np.ones((3, 3, 3), bool))
    moment_dev, streak = _calcification(x, y, labels)
    return {
        "nrmse_tissue": region_nrmse(m & np.isin(labels, TISSUE_LABELS)),
        "nrmse_dgm": region_nrmse(m & np.isin(labels, DGM_LABELS)),
        "nrmse_blood": region_nrmse(blood),
        "dgm_linearity": _dgm_linearity(x, y, labels),
        "calc_moment_dev": moment_dev,
        "calc_streak": streak,
    }


def score(recon, truth, mask, labels=None):
    """All metrics at once: a dict with ``nrmse``, ``nrmse_detrend``, ``hfen``,
    ``xsim``, ``xsim_demeaned``, ``correlation``, ``coverage`` and, with ``labels``, the
    :func:`region_metrics`."""
    out = {
        "nrmse": nrmse(recon, truth, mask),
        "nrmse_detrend": nrmse_detrend(recon, truth, mask),
        "hfen": hfen(recon, truth, mask),
        "xsim": xsim(recon, truth, mask),
        "xsim_demeaned": xsim(recon, truth, mask, demean=True),
        "correlation": correlation(recon, truth, mask),
        "coverage": coverage(recon, mask),
    }
    if labels is not None:
        out.update(region_metrics(recon, truth, labels, mask))
    return out
