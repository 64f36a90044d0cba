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


def test_csf_reference_finds_bright_central_csf():
    from qsmprep.qsm.reference import csf_mask

    from _qsm_phantom import ellipsoid

    brain = ellipsoid((0, 0, 0), (24, 20, 18))
    ventricles = ellipsoid((0, 3, 0), (8, 3, 4)) | ellipsoid((0, -3, 0), (8, 2, 4))
    sulci = brain & ~ellipsoid((0, 0, 0), (22, 18, 16))  # bright but superficial CSF
    rng = np.random.default_rng(0)
    last_echo = 0.5 * brain + 0.5 * ventricles + 0.5 * sulci + rng.normal(0, 0.03, brain.shape)
    magnitude = np.stack([brain + 0.0 * last_echo, last_echo], axis=-1)
    found = csf_mask(magnitude, brain)
    assert found.sum() > 0 and np.mean(ventricles[found]) > 0.95
    chi = np.where(ventricles, 0.05, 0.0) + np.where(brain & ~ventricles, -0.02, 0.0) + 0.3
    out = registry.run("referencing", "csf", chi.astype(np.float32), brain, magnitude=magnitude)
    assert np.median(out[ventricles]) == pytest.approx(0.0, abs=1e-6)
    assert np.median(out[brain & ~ventricles]) == pytest.approx(-0.07, abs=1e-6)
    with pytest.raises(ValueError, match="magnitude"):
        registry.run("referencing", "csf", chi, brain)
