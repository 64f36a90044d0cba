"""Helpers of benchmarks/dmqsm_independent.py (DM-QSM on an independent head; tiny arrays,
no sampling)."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import dmqsm_independent as bench  # noqa: E402


def test_kspace_resample_round_trip_and_amplitude():
    """Zero padding in k-space then cropping back returns the map; a constant
    keeps its value on the finer grid (the amplitude scaling is right). Odd
    sizes: no Nyquist plane, whose sign a real map cannot keep on padding."""
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(11, 13, 9)).astype(np.float32)
    fine = bench.kspace_resample(vol, (17, 19, 15))
    np.testing.assert_allclose(bench.kspace_resample(fine, vol.shape), vol, atol=1e-4)
    np.testing.assert_allclose(bench.kspace_resample(np.full((8, 8, 8), 0.3), (12, 12, 12)), 0.3,
                               atol=1e-6)


def test_even_box_holds_the_mask_with_even_edges():
    mask = np.zeros((21, 20, 19), bool)
    mask[3:10, 2:9, 4:15] = True          # odd extents + margins reach both edges of axis 2
    box = bench._even_box(mask, margin=4)
    assert all((sl.stop - sl.start) % 2 == 0 for sl in box)
    assert mask[box].sum() == mask.sum()
    assert all(0 <= sl.start and sl.stop <= n for sl, n in zip(box, mask.shape))


def test_render_independent_states_the_verdict():
    """The section says which way DM-QSM compares with each yardstick."""
    row = {"s": 1.0, "cpu_s": 1.0}
    saved = {"head": {"name": "h", "description": "d", "shape": [4, 4, 4]}, "rows": {
        "inversion/TKD 0.1 (DM-QSM start)": {**row, "nrmse": 40.0, "xsim": 0.7},
        "inversion/DM-QSM": {**row, "nrmse": 30.0, "xsim": 0.8},
        "sr2/k-space zero-filled": {**row, "nrmse": 30.0, "xsim": 0.9},
        "sr2/DM-QSM": {**row, "nrmse": 35.0, "xsim": 0.8}}}
    text = bench.render_independent(saved)
    assert "inversion: NRMSE better than its TKD start (30.0 against 40.0 %), XSIM better" in text
    assert "sr2: NRMSE worse than k-space zero filling (35.0 against 30.0 %), XSIM worse" in text
