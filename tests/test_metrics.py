"""QSM metrics: agreement with the QSM-CI scorer and metric properties."""

import numpy as np
import pytest
from scipy.ndimage import binary_erosion, gaussian_filter

from qsmprep.qsm import metrics

SHAPE = (40, 44, 36)


def _phantom(seed=0):
    """A structured truth (smooth texture plus label regions), a brain-like
    ellipsoid mask and challenge-style labels (DGM 1-6, tissue 7-9, blood 11,
    calcification 16)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    r = np.sqrt(sum(g**2 for g in grid))
    mask = r < 0.85
    labels = np.where(mask, 8, 0).astype(np.int16)
    labels[mask & (r > 0.7)] = 9
    labels[mask & (np.abs(grid[0]) < 0.12)] = 7
    for lab, (cx, cy) in enumerate([(-0.4, -0.3), (0.4, -0.3), (-0.4, 0.3), (0.4, 0.3),
                                     (0.0, 0.5), (0.0, -0.5)], start=1):
        labels[mask & ((grid[0] - cx) ** 2 + (grid[1] - cy) ** 2 + grid[2] ** 2 < 0.02)] = lab
    labels[mask & (np.abs(grid[1] - 0.1) < 0.04) & (np.abs(grid[2] + 0.3) < 0.04)] = 11
    labels[(grid[0] - 0.3) ** 2 + (grid[1] + 0.05) ** 2 + (grid[2] - 0.35) ** 2 < 0.006] = 16
    chi_of = {1: 0.044, 2: 0.13, 3: 0.038, 4: 0.1, 5: 0.152, 6: 0.111, 7: 0.02, 8: -0.03,
              9: 0.02, 11: 0.19, 16: -3.3}
    truth = np.zeros(SHAPE)
    for lab, chi in chi_of.items():
        truth[labels == lab] = chi
    truth += 0.01 * gaussian_filter(rng.standard_normal(SHAPE), 2.0) / 0.05
    truth[~mask] = rng.uniform(-2, 2, size=np.count_nonzero(~mask))  # skull/air: never scored
    return truth.astype(np.float32), mask, labels


def _recon(truth, mask, seed=1):
    """A plausible imperfect reconstruction: scaled, offset, blurred, noisy,
    streaky, its rim eroded, a few NaNs, garbage outside the mask."""
    rng = np.random.default_rng(seed)
    rec = 0.85 * gaussian_filter(np.where(mask, truth, 0), 0.8) + 0.01
    rec += 0.01 * rng.standard_normal(SHAPE)
    rec += 0.02 * np.sin(np.arange(SHAPE[2]) / 2.0)[None, None, :]
    rec[mask & ~binary_erosion(mask)] = 0.0
    rec[tuple(rng.integers(0, n, 20) for n in SHAPE)] = np.nan
    rec[~mask] = 5.0
    return rec.astype(np.float32)


@pytest.fixture(scope="module")
def case():
    truth, mask, labels = _phantom()
    return _recon(truth, mask), truth, mask, labels


@pytest.fixture(scope="module")
def reference(case):
    qsm_eval = pytest.importorskip("qsm_ci.qsm_eval")
    recon, truth, mask, labels = case
    return qsm_eval.score_arrays(recon.astype(np.float64), truth.astype(np.float64),
                                 mask.astype(np.uint8), kind="chi", seg=labels.astype(np.int32))[0]


@pytest.mark.parametrize("name", ["nrmse", "nrmse_detrend", "hfen", "xsim", "correlation"])
def test_global_metrics_match_qsm_ci(case, reference, name):
    recon, truth, mask, _ = case
    value = getattr(metrics, name)(recon, truth, mask)
    assert np.isfinite(value)
    assert value == pytest.approx(reference[name], rel=1e-3)


def test_coverage_matches_qsm_ci(case, reference):
    recon, _, mask, _ = case
    assert metrics.coverage(recon, mask) == pytest.approx(reference["coverage"], rel=1e-9)
    assert 0.5 < reference["coverage"] < 1.0  # the rim and NaNs were dropped


def test_region_metrics_match_qsm_ci(case, reference):
    recon, truth, mask, labels = case
    regions = metrics.region_metrics(recon, truth, labels, mask)
    assert set(regions) == {"nrmse_tissue", "nrmse_dgm", "nrmse_blood", "dgm_linearity",
                            "calc_moment_dev", "calc_streak"}
    for key, value in regions.items():
        assert np.isfinite(value), key
        assert value == pytest.approx(reference[key], rel=1e-3), key


def test_score_collects_everything(case, reference):
    recon, truth, mask, labels = case
    scores = metrics.score(recon, truth, mask, labels)
    for key, value in reference.items():
        assert scores[key] == pytest.approx(value, rel=1e-3, nan_ok=True), key


def test_identical_maps_are_perfect(case):
    _, truth, mask, labels = case
    assert metrics.nrmse(truth, truth, mask) == pytest.approx(0, abs=1e-9)
    assert metrics.nrmse_detrend(truth, truth, mask) == pytest.approx(0, abs=1e-9)
    assert metrics.hfen(truth, truth, mask) == pytest.approx(0, abs=1e-9)
    assert metrics.xsim(truth, truth, mask) == pytest.approx(1, abs=1e-9)
    assert metrics.correlation(truth, truth, mask) == pytest.approx(1, abs=1e-9)
    regions = metrics.region_metrics(truth, truth, labels, mask)
    assert regions["dgm_linearity"] == pytest.approx(0, abs=1e-9)
    assert regions["nrmse_dgm"] == pytest.approx(0, abs=1e-9)
    assert regions["calc_moment_dev"] < 1e-3 * abs(truth[labels == 16].sum())


def test_zero_map_scores_100_percent(case):
    _, truth, mask, _ = case
    assert metrics.nrmse(np.zeros_like(truth), truth, mask) == pytest.approx(100.0)
    assert metrics.hfen(np.zeros_like(truth), truth, mask) == pytest.approx(100.0)


def test_outside_mask_is_ignored(case):
    recon, truth, mask, labels = case
    other = np.where(mask, recon, -7.0)
    for name in ("nrmse", "nrmse_detrend", "hfen", "xsim", "correlation"):
        f = getattr(metrics, name)
        assert f(other, truth, mask) == pytest.approx(f(recon, truth, mask), rel=1e-12), name


def test_detrended_nrmse_invariant_to_scale_and_offset(case):
    recon, truth, mask, _ = case
    x = np.where(mask & np.isfinite(recon), recon, 0.0)
    base = metrics.nrmse_detrend(x, truth, mask)
    for a, b in [(2.0, 0.0), (0.3, -0.1), (-1.5, 0.05)]:
        y = np.where(mask, a * x + b, 0.0)
        assert metrics.nrmse_detrend(y, truth, mask) == pytest.approx(base, rel=1e-6)
    t64 = truth.astype(np.float64)
    assert metrics.nrmse_detrend(0.5 * t64 + 0.2, t64, mask) == pytest.approx(0, abs=1e-9)
    # the plain NRMSE sees the scale but not the offset
    assert metrics.nrmse(0.5 * t64, t64, mask) == pytest.approx(50.0, rel=1e-9)
    assert metrics.nrmse(t64 + 0.2, t64, mask) == pytest.approx(0, abs=1e-9)


def test_correlation_sign_and_scale(case):
    _, truth, mask, _ = case
    assert metrics.correlation(-3 * truth + 1, truth, mask) == pytest.approx(-1, abs=1e-9)
    assert metrics.correlation(0.1 * truth, truth, mask) == pytest.approx(1, abs=1e-9)


def test_dropped_voxels_cost_accuracy(case):
    _, truth, mask, _ = case
    eroded = binary_erosion(mask, iterations=2)
    dropped = np.where(eroded, truth, 0.0)
    assert metrics.coverage(dropped, mask) < 1.0
    assert metrics.nrmse(dropped, truth, mask) > 1.0
    assert metrics.xsim(dropped, truth, mask) < 1.0
    with_nan = np.where(eroded, truth, np.nan)
    assert metrics.nrmse(with_nan, truth, mask) == pytest.approx(
        metrics.nrmse(dropped, truth, mask))


def test_metrics_rank_a_worse_reconstruction_lower(case):
    recon, truth, mask, _ = case
    rng = np.random.default_rng(3)
    worse = recon + 0.05 * rng.standard_normal(SHAPE)
    assert metrics.nrmse(worse, truth, mask) > metrics.nrmse(recon, truth, mask)
    assert metrics.hfen(worse, truth, mask) > metrics.hfen(recon, truth, mask)
    assert metrics.xsim(worse, truth, mask) < metrics.xsim(recon, truth, mask)
    assert metrics.correlation(worse, truth, mask) < metrics.correlation(recon, truth, mask)


def test_dgm_linearity_measures_the_slope(case):
    _, truth, mask, labels = case
    regions = metrics.region_metrics(1.25 * truth, truth, labels, mask)
    assert regions["dgm_linearity"] == pytest.approx(0.25, rel=1e-6)


def test_bad_inputs_raise(case):
    recon, truth, mask, _ = case
    with pytest.raises(ValueError, match="same shape"):
        metrics.nrmse(recon[:-1], truth, mask)
    with pytest.raises(ValueError, match="empty"):
        metrics.xsim(recon, truth, np.zeros_like(mask))


def test_demeaned_xsim_ignores_the_reference_and_plain_xsim_does_not():
    """XSIM as QSM-CI scores it sees a 0.01 ppm offset between two maps (the
    luminance term; a map referenced to CSF against one with a zero mean);
    ``demean=True`` compares them on structure alone, as NRMSE does."""
    rng = np.random.default_rng(2)
    mask = np.zeros((24, 24, 24), bool)
    mask[4:20, 4:20, 4:20] = True
    truth = np.where(mask, gaussian_filter(rng.normal(size=mask.shape), 1.0) * 0.05, 0)
    recon = truth + np.where(mask, rng.normal(0, 0.01, mask.shape), 0)
    shifted = np.where(mask, recon + 0.01, 0)
    plain = [metrics.xsim(r, truth, mask) for r in (recon, shifted)]
    demeaned = [metrics.xsim(r, truth, mask, demean=True) for r in (recon, shifted)]
    assert plain[1] < plain[0] - 0.05, plain
    assert abs(demeaned[1] - demeaned[0]) < 1e-9, demeaned
    assert metrics.score(shifted, truth, mask)["xsim_demeaned"] == pytest.approx(demeaned[1])
