import numpy as np
import pytest
from scipy import ndimage

from qsmprep.qsm import registry
from qsmprep.qsm.mask import bbox_slices, erode, magnitude_threshold, robust_magnitude_mask

from _qsm_phantom import ellipsoid


def dice(a, b):
    return 2 * np.sum(a & b) / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def head():
    """Multi-echo magnitude of a head: bright brain, darker scalp ring, dark ventricle hole, noise."""
    brain = ellipsoid((0, 0, 0), (24, 20, 18))
    scalp = ellipsoid((0, 0, 0), (28, 24, 22)) & ~ellipsoid((0, 0, 0), (26, 22, 20))
    ventricle = ellipsoid((0, 2, 0), (6, 3, 4))
    rng = np.random.default_rng(0)
    echoes = []
    for decay in (1.0, 0.7, 0.5):
        clean = decay * (1.0 * brain + 0.4 * scalp) * (1 - 0.9 * ventricle)
        noise = rng.normal(0, 0.05, clean.shape) + 1j * rng.normal(0, 0.05, clean.shape)
        echoes.append(np.abs(clean + noise))
    return np.stack(echoes, axis=-1).astype(np.float32), brain, scalp


def test_magnitude_mask_finds_the_head(head):
    mag, brain, scalp = head
    mask = registry.run("masking", "magnitude", mag)
    truth = brain | scalp | ellipsoid((0, 0, 0), (26, 22, 20))
    assert mask.dtype == bool and mask.shape == brain.shape
    assert dice(mask, truth) > 0.95
    assert mask[brain].all()  # the dark ventricle is filled, no noise holes
    assert not mask[ellipsoid((0, 0, 0), (31, 29, 29)) == 0].any()  # no noise outside


def test_threshold_from_histogram_separates_noise_from_tissue(head):
    mag, brain, _ = head
    thr = magnitude_threshold(mag[..., 0])
    background = mag[..., 0][~ellipsoid((0, 0, 0), (30, 26, 24))]
    assert np.mean(background > thr) < 0.03  # the rest goes with the largest component
    assert np.mean(mag[..., 0][brain & ~ellipsoid((0, 2, 0), (7, 4, 5))] > thr) > 0.999


def test_explicit_threshold_and_erosion(head):
    mag, brain, _ = head
    mask = robust_magnitude_mask(mag[..., 0], threshold=0.7, erode_mm=3.0)
    assert dice(mask, erode(brain, 3.0)) > 0.9
    assert not (mask & ~brain).any()


def test_erode_and_bbox():
    ball = ellipsoid((0, 0, 0), (10, 10, 10), n=32)
    assert np.array_equal(erode(ball, 0), ball)
    # same as erosion by the voxelised ball of radius 4 (all voxels within 4 mm kept inside)
    structure = ellipsoid((0, 0, 0), (4, 4, 4), n=9)
    assert np.array_equal(erode(ball, 4.0), ndimage.binary_erosion(ball, structure))
    assert erode(np.ones((5, 5, 5), bool), 1.0).sum() == 27  # array border counts as outside
    box = bbox_slices(ball, margin=2)
    assert ball[box].shape == (24, 24, 24)  # 20 voxels across (centre at 15.5) + 2 + 2
    with pytest.raises(ValueError, match="empty"):
        bbox_slices(np.zeros((4, 4, 4), bool))


def test_quality_masks(head):
    mag, brain, scalp = head
    rng = np.random.default_rng(2)
    # ROMEO-like quality: high in the brain, low in the scalp (fat/phase errors) and in noise
    quality = np.clip(0.9 * brain + 0.05 + rng.normal(0, 0.05, brain.shape), 0, 1)
    q_mask = registry.run("masking", "quality", mag, quality=quality)
    assert dice(q_mask, brain) > 0.95
    both = registry.run("masking", "magnitude+quality", mag, quality=quality)
    assert dice(both, brain) > 0.95 and not (both & scalp).any()
    # quality alone cannot tell noise with smooth phase from tissue; the magnitude can
    quality_bad_noise = np.where(ellipsoid((0, 0, 0), (31, 31, 31)), quality, 0.9)
    assert dice(registry.run("masking", "magnitude+quality", mag,
                             quality=quality_bad_noise), brain) > 0.95
    with pytest.raises(ValueError, match="quality map"):
        registry.run("masking", "quality", mag)


def test_masks_that_cover_the_skull_of_a_whole_head_are_refused():
    """On a whole-head magnitude (brain, dark skull, bright scalp, air), a mask
    that takes in the scalp is refused with a message naming the fix; the
    BET brain and a brain-only image pass (independent benchmark: such masks
    gave 130-500 % NRMSE silently)."""
    from qsmprep.qsm.bet import bet_mask, check_brain_coverage

    shape, vox = (56, 64, 56), (3.0, 3.0, 3.0)
    grid = np.indices(shape, dtype=np.float32)
    r = np.sqrt(sum(((g - c) / s) ** 2 for g, c, s in
                    zip(grid, (28, 32, 28), (17, 21, 17))))
    mag = np.where(r < 1.0, 1.0, 0.0) + np.where((r >= 1.12) & (r < 1.45), 0.9, 0.0)
    mag = mag + 0.02 * np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    brain = r < 1.0
    whole_head = r < 1.45
    with pytest.raises(ValueError, match=r"'magnitude' brain mask of x\.nii covers .* "
                       r"--masking bet .* --mask"):
        check_brain_coverage(whole_head, mag, voxel_size_mm=vox, method="magnitude",
                             source="x.nii")
    check_brain_coverage(bet_mask(mag, voxel_size_mm=vox), mag, voxel_size_mm=vox)
    brain_only = np.where(brain, mag, 0)
    check_brain_coverage(brain, brain_only, voxel_size_mm=vox, method="magnitude")
    check_brain_coverage(whole_head, np.ones(shape), voxel_size_mm=vox, method="quality")
    # a slab of the same head (30 mm thick) or a small phantom: BET is no reference there
    slab = (slice(None), slice(None), slice(23, 33))
    check_brain_coverage(whole_head[slab], mag[slab], voxel_size_mm=vox, method="magnitude")


def test_closing_fills_a_notch_and_keeps_a_ball():
    """A 4 mm closing fills a 3 mm wide, 12 mm deep slot cut into a ball (a
    brain extraction stopped at a dark sinus), keeps every voxel of the mask,
    and leaves the ball itself alone; anisotropic voxels get a ball in mm."""
    from qsmprep.qsm.mask import close

    for vox in ((1.0, 1.0, 1.0), (1.0, 1.0, 2.0)):
        shape = (64, 64, 32 if vox[2] == 2.0 else 64)
        grid = [(np.arange(n) - n / 2 + 0.5) * v for n, v in zip(shape, vox)]
        x, y, z = np.meshgrid(*grid, indexing="ij")
        ball = x**2 + y**2 + z**2 <= 25.0**2
        slot = (np.abs(x) <= 1.5) & (z > 25.0 - 12.0)
        notched = ball & ~slot
        closed = close(notched, 4.0, vox)
        assert not (notched & ~closed).any()
        deep = slot & (x**2 + y**2 + z**2 <= 22.0**2)   # the slot 3 mm below the surface
        assert closed[deep].all()
        assert (closed & ~ball).sum() < 0.002 * ball.sum()
        assert (close(ball, 4.0, vox) ^ ball).sum() < 0.002 * ball.sum()
    assert np.array_equal(close(notched, 0.0, vox), notched)


def test_closing_in_the_bounding_box_equals_the_whole_volume_closing():
    """``close`` computes only the mask's bounding box (plus a margin); on a
    ragged mask near the volume's edge it must equal the closing computed
    over the whole volume from its definition (dilate by the ball, erode)."""
    from scipy import ndimage

    from qsmprep.qsm.mask import close

    rng = np.random.default_rng(3)
    mask = ndimage.gaussian_filter(rng.random((40, 36, 30)), 2.0) > 0.52
    mask[:, :, :3] = False
    for vox, r in (((1.0, 1.0, 1.0), 3.0), ((0.8, 1.0, 1.5), 2.5)):
        pad = 10
        padded = np.pad(mask, pad)
        dilated = ndimage.distance_transform_edt(~padded, sampling=vox) <= r
        whole = (ndimage.distance_transform_edt(dilated, sampling=vox) > r)[
            pad:-pad, pad:-pad, pad:-pad] | mask
        assert whole.sum() > mask.sum()          # the closing does fill something here
        assert np.array_equal(close(mask, r, vox), whole)


def test_distance_transform_is_scipys_and_exact_on_known_shapes():
    """``distance_to_outside_mm`` (numba, separable lower envelopes) gives
    scipy's Euclidean distance transform: bit for bit on isotropic grids whose
    squared distances are exact (1, 1.25, 1.5 mm) and on an anisotropic one,
    to 1e-12 mm on 1.2 mm voxels (equally far voxels may be chosen
    differently); the known distance to a plane and a ball's centre; inf
    where nothing is outside."""
    from scipy import ndimage

    from qsmprep.qsm.mask import distance_to_outside_mm

    rng = np.random.default_rng(11)
    for shape in ((23, 31, 17), (40, 9, 33), (1, 12, 20)):
        inside = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0) > -0.2
        inside.flat[rng.integers(0, inside.size, 3)] = False
        for vox in ((1.0, 1.0, 1.0), (1.25, 1.25, 1.25), (1.5, 1.5, 1.5), (0.7, 1.1, 2.3)):
            expected = ndimage.distance_transform_edt(inside, sampling=vox)
            assert np.array_equal(distance_to_outside_mm(inside, vox), expected), (shape, vox)
        vox = (1.2, 1.2, 1.2)
        np.testing.assert_allclose(distance_to_outside_mm(inside, vox),
                                   ndimage.distance_transform_edt(inside, sampling=vox),
                                   rtol=0, atol=1e-12)
    slab = np.ones((6, 7, 40), bool)
    slab[:, :, 0] = False                                   # the plane z = 0 is outside
    depth = distance_to_outside_mm(slab, (1.0, 2.0, 0.5))
    assert np.array_equal(depth[2, 3], 0.5 * np.arange(40))
    ball = np.ones((21, 21, 21), bool)
    ball[10, 10, 10] = False                                # one outside voxel
    d = distance_to_outside_mm(ball, (1.0, 1.0, 3.0))
    assert d[10, 10, 10] == 0 and d[0, 0, 0] == pytest.approx(np.sqrt(200 + 900))
    assert np.isinf(distance_to_outside_mm(np.ones((3, 4, 5), bool))).all()


def test_depth_in_the_bounding_box_equals_the_whole_volume_distance():
    """``depth_mm`` computes the distance to the nearest outside voxel in the
    mask's bounding box only; it must equal the whole-volume Euclidean
    distance transform, with the array border outside (``erode``'s
    convention) or not, for a mask that touches the array's border."""
    from scipy import ndimage

    from qsmprep.qsm.mask import depth_mm, erode

    rng = np.random.default_rng(5)
    mask = ndimage.gaussian_filter(rng.random((30, 34, 28)), 2.0) > 0.5
    mask[0, 10:20, 10:20] = True                       # touches the array's border
    vox = (0.9, 1.0, 1.6)
    inside = ndimage.distance_transform_edt(mask, sampling=vox)
    bordered = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=vox)[1:-1, 1:-1, 1:-1]
    assert not np.allclose(inside, bordered)            # the two conventions differ here
    assert np.allclose(depth_mm(mask, vox, border_outside=False), inside)
    assert np.allclose(depth_mm(mask, vox), bordered)
    assert np.array_equal(erode(mask, 2.0, vox), bordered > 2.0)
    assert not depth_mm(np.zeros((4, 4, 4), bool)).any()


def test_even_last_axis_padding_is_a_fast_even_length():
    """``fast_shape(even_last=True)`` (TFI's box) rounds the last axis up to an
    even length with only small prime factors, leaves the other axes as they
    were, and without the flag the padding is what it always was."""
    from qsmprep.qsm.fft import fast_shape
    from qsmprep.qsm.mask import MaskBox

    def smooth(n):
        for p in (2, 3, 5, 7, 11):
            while n % p == 0:
                n //= p
        return n == 1

    for shape in ((160, 210, 189), (120, 135, 125), (31, 33, 97)):
        plain, even = fast_shape(shape, factor=1.1), fast_shape(shape, factor=1.1, even_last=True)
        assert even[:2] == plain[:2] and even[2] % 2 == 0 and smooth(even[2])
        assert plain[2] <= even[2] < 2 * plain[2]
    mask = np.zeros((40, 40, 40), bool)
    mask[5:30, 6:31, 7:32] = True
    assert MaskBox(mask).shape == (25, 25, 25)
    assert MaskBox(mask, even_last=True).shape == (25, 25, 28)     # 25 -> 27 (odd) -> 28
