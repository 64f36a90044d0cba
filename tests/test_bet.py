"""Brain extraction (BET-like deformable surface) on simulated heads and real data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from qsmprep.qsm import registry
from qsmprep.qsm.bet import bet_mask, fill_surface, icosphere
from qsmprep.qsm.mask import robust_magnitude_mask
from qsmprep.sim import challenge_head, mni_head
from qsmprep.sim.signal import magnitude_phase, multi_echo_signal

from _data import shared_data_dir

TE = (0.004, 0.008, 0.012, 0.016)


def dice(a, b):
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def head_magnitude(phantom, *, snr=50.0, seed=1):
    """Multi-echo magnitude of a whole-head phantom (the field does not
    change the magnitude, so none is simulated) and the true brain mask."""
    signal = multi_echo_signal(np.zeros(phantom.m0.shape, np.float32), phantom.m0,
                               phantom.r2star_hz, TE, 3.0, snr=snr, mask=phantom.brain_mask,
                               rng=np.random.default_rng(seed))
    return magnitude_phase(signal)[0], phantom.brain_mask


def test_icosphere_is_a_closed_outward_mesh():
    verts, faces = icosphere(4)
    edges = np.unique(np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1), axis=0)
    assert len(verts) == 2562 and len(verts) - len(edges) + len(faces) == 2  # Euler: a sphere
    assert np.allclose(np.linalg.norm(verts, axis=1), 1.0)
    a, b, c = (verts[faces[:, k]] for k in range(3))
    assert np.all(np.sum(np.cross(b - a, c - a) * (a + b + c), axis=1) > 0)


def test_fill_surface_gives_the_enclosed_volume():
    vox = np.array([1.0, 1.0, 2.0])
    verts, faces = icosphere(4)
    radius, centre = 20.0, np.array([32.0, 30.0, 33.0])
    mask = fill_surface(centre + radius * verts, faces, (64, 64, 34), vox)
    volume = mask.sum() * vox.prod()
    assert volume == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.03)
    assert mask[32, 30, 16] and not mask[32, 30, 28] and not mask[5, 5, 5]


def test_bet_separates_brain_from_scalp_challenge_2mm():
    mag, brain = head_magnitude(challenge_head(2.0, rng=np.random.default_rng(0)))
    mask = registry.run("masking", "bet", mag, voxel_size_mm=(2.0, 2.0, 2.0))
    assert mask.dtype == bool and mask.shape == brain.shape
    assert dice(mask, brain) >= 0.90
    assert dice(robust_magnitude_mask(mag), brain) < 0.7  # the head mask is no brain mask


def test_bet_oblique_head():
    """A head tilted by 25 deg (pitch) and 10 deg (yaw) in the grid."""
    mag, brain = head_magnitude(challenge_head(2.0, rng=np.random.default_rng(2)), snr=30, seed=3)

    def tilt(x, order):
        x = ndimage.rotate(x, 25, axes=(1, 2), order=order, reshape=False)
        return ndimage.rotate(x, 10, axes=(0, 1), order=order, reshape=False)

    mag = np.stack([tilt(mag[..., e], 1) for e in range(mag.shape[-1])], axis=-1)
    brain = tilt(brain.astype(np.float32), 1) > 0.5
    assert dice(bet_mask(mag, voxel_size_mm=(2.0, 2.0, 2.0)), brain) >= 0.90


def test_bet_challenge_1mm():
    mag, brain = head_magnitude(challenge_head(1.0, rng=np.random.default_rng(4), texture=False,
                                               vessels=False, lesions=False))
    assert dice(bet_mask(mag[..., :2]), brain) >= 0.90


def test_bet_mni_head_unseen_anatomy():
    mag, brain = head_magnitude(mni_head(2.0, rng=np.random.default_rng(5), vessels=False))
    assert dice(bet_mask(mag, voxel_size_mm=(2.0, 2.0, 2.0)), brain) >= 0.90


def test_bet_keeps_a_brain_only_crop():
    """Real in-vivo GRE cropped to the brain: no scalp, nothing to remove."""
    nib = pytest.importorskip("nibabel")
    img = nib.load(shared_data_dir() / "romeo-invivo" / "Mag.nii")
    mag = np.asarray(img.dataobj, dtype=np.float32)
    vox = tuple(float(v) for v in img.header.get_zooms()[:3])
    head = robust_magnitude_mask(mag)
    mask = bet_mask(mag, voxel_size_mm=vox)
    assert np.sum(mask & head) >= 0.9 * np.sum(head)


def test_bet_rejects_bad_input():
    mag = np.ones((8, 8), np.float32)
    with pytest.raises(ValueError, match="3-D or 4-D"):
        bet_mask(mag)
    with pytest.raises(ValueError, match=r"fractional_threshold in \(0, 1\)"):
        bet_mask(np.ones((8, 8, 8)), fractional_threshold=1.5)
    with pytest.raises(ValueError, match="positive voxel sizes"):
        bet_mask(np.ones((8, 8, 8)), voxel_size_mm=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="nothing to extract"):
        bet_mask(np.zeros((8, 8, 8)))
