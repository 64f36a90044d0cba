import numpy as np
import pytest

from qsmprep.qsm import registry


def test_mean_reference_zeroes_the_mask_mean_and_keeps_contrast():
    rng = np.random.default_rng(0)
    chi = rng.normal(0.3, 0.05, (10, 12, 8)).astype(np.float32)
    mask = np.zeros(chi.shape, bool)
    mask[2:8, 3:9, 1:7] = True
    out = registry.run("referencing", "mean", chi, mask)
    assert abs(out[mask].mean()) < 1e-6
    assert np.allclose(out[mask] - chi[mask], -chi[mask].mean(), atol=1e-6)
    assert np.all(out[~mask] == 0)


def test_none_reference_keeps_values():
    chi = np.linspace(-1, 1, 64, dtype=np.float32).reshape(4, 4, 4)
    mask = chi > -0.5
    out = registry.run("referencing", "none", chi, mask)
    assert np.array_equal(out[mask], chi[mask]) and np.all(out[~mask] == 0)


def test_empty_mask_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        registry.run("referencing", "mean", np.ones((3, 3, 3)), np.zeros((3, 3, 3), bool))
