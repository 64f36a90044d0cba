"""ROMEO, Laplacian unwrapping and MCPC-3D-S on real and simulated phase."""

import numpy as np
import pytest
from _data import shared_data_dir, simulate_multi_echo, smooth_field_hz

from qsmprep.qsm import registry
from qsmprep.qsm.units import rescale_phase
from qsmprep.qsm.romeo import quality_mask, romeo_unwrap
from qsmprep.qsm.unwrap import laplacian_unwrap, mcpc3ds

TWO_PI = 2 * np.pi
TE = (0.004, 0.008, 0.012)


def wrap(x):
    return (np.asarray(x) + np.pi) % TWO_PI - np.pi


def wrong_voxels(unwrapped, truth, mask):
    """Voxels whose 2*pi multiple differs from the most common one in the mask."""
    k = np.rint((unwrapped - truth) / TWO_PI)[mask]
    values, counts = np.unique(k, return_counts=True)
    return int(k.size - counts.max())


def jumps(phase, region):
    """Neighbour pairs inside ``region`` whose phase differs by more than pi."""
    total = 0
    for ax in range(3):
        n = phase.shape[ax]
        both = np.take(region, range(n - 1), axis=ax) & np.take(region, range(1, n), axis=ax)
        total += int((np.abs(np.diff(phase, axis=ax)) > np.pi)[both].sum())
    return total


@pytest.fixture(scope="module")
def invivo():
    import nibabel as nib

    d = shared_data_dir() / "romeo-invivo"
    mag = nib.load(d / "Mag.nii").get_fdata(dtype=np.float32)
    phase = rescale_phase(nib.load(d / "Phase.nii").get_fdata(dtype=np.float32))
    brain = mag[..., 0] > np.percentile(mag[..., 0], 30)
    return phase, mag, brain


@pytest.mark.parametrize("mode", ["template", "individual"])
def test_invivo_unwraps_by_multiples_of_2pi_without_jumps(invivo, mode):
    phase, mag, brain = invivo
    assert jumps(phase[..., 2], brain) > 100  # the data really is wrapped
    unwrapped, quality = romeo_unwrap(phase, magnitude=mag, echo_times_s=TE, mode=mode)
    k = (unwrapped - phase) / TWO_PI
    np.testing.assert_allclose(k, np.rint(k), atol=1e-4)
    for e in range(3):
        assert jumps(unwrapped[..., e], brain) == 0
    # temporal consistency: echo n = n * echo 1 up to the (small) phase offset
    for n in (2, 3):
        residual = unwrapped[..., n - 1] - n * unwrapped[..., 0]
        assert np.abs(residual[brain] - np.median(residual[brain])).max() < np.pi
    assert quality.shape == brain.shape
    assert quality[brain].mean() > quality[~brain].mean()


def test_mcpc3ds_removes_invivo_offset(invivo):
    phase, mag, brain = invivo
    corrected, offset = mcpc3ds(phase, mag, TE, voxel_size_mm=(0.47, 0.47, 1.0))
    unwrapped, _ = romeo_unwrap(corrected, magnitude=mag, echo_times_s=TE)
    residual = unwrapped[..., 1] - 2 * unwrapped[..., 0]
    raw, _ = romeo_unwrap(phase, magnitude=mag, echo_times_s=TE)
    raw_residual = raw[..., 1] - 2 * raw[..., 0]
    # the offset-free echoes scale with TE: the echo-2 residual is centred on 0
    assert abs(np.median(residual[brain])) < 0.3 * abs(np.median(raw_residual[brain]))
    assert offset.shape == brain.shape


def test_nan_voxels_are_invalid():
    import nibabel as nib

    phase = nib.load(shared_data_dir() / "romeo-invivo" / "phase_with_nan.nii").get_fdata(
        dtype=np.float32)
    bad = ~np.isfinite(phase).all(axis=-1)
    assert bad.any()
    unwrapped, quality = romeo_unwrap(phase, echo_times_s=(0.005, 0.010))
    assert np.isfinite(unwrapped).all() and np.isfinite(quality).all()
    assert (unwrapped[bad] == 0).all() and (quality[bad] == 0).all()
    k = (unwrapped[~bad] - phase[~bad]) / TWO_PI
    np.testing.assert_allclose(k, np.rint(k), atol=1e-4)


@pytest.mark.parametrize("mode", ["template", "individual"])
def test_simulated_multi_echo_has_no_wrong_voxels(mode):
    te = (0.005, 0.010, 0.015, 0.020)
    phase, mag, field, mask = simulate_multi_echo(echo_times_s=te, amplitude_hz=300.0, snr=40.0)
    truth = TWO_PI * field[..., None] * np.asarray(te, dtype=np.float32)
    assert np.abs(truth[mask]).max() > 4 * np.pi  # several wraps per echo
    unwrapped, quality = romeo_unwrap(phase, magnitude=mag, echo_times_s=te, mode=mode)
    for e in range(len(te)):
        assert wrong_voxels(unwrapped[..., e], truth[..., e], mask) == 0
    # the field has median 0, so the global 2*pi correction recovers it exactly
    np.testing.assert_array_equal(np.rint((unwrapped - truth) / TWO_PI)[mask], 0)
    # the quality map separates the object from pure-noise background
    qmask = quality_mask(quality, threshold=0.2)
    assert 2 * (qmask & mask).sum() / (qmask.sum() + mask.sum()) > 0.98


def test_steep_field_beside_air_at_7t_is_unwrapped_along_smooth_paths():
    """Beside an air sphere at 7 T (2 mm, TE1 4 ms) the true first-echo phase
    steps reach several pi. A step near 2 pi wraps to a small step in every
    echo (all TEs are multiples of TE1), so coherence weights cannot see it; the
    phase-linearity weight keeps ROMEO off these edges. Every voxel joined to
    the bulk by true steps below pi/2 has a safe path and must come out right
    (96 wrong without phase linearity, 32 with it; the MNI 7 T errors)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from qsmprep.qsm.kernels import sphere_field
    from qsmprep.qsm.units import ppm_to_hz

    shape, te = (48, 48, 48), np.array([0.004, 0.008, 0.012, 0.016])
    field, air = sphere_field(shape, (2.0, 2.0, 2.0), 10.0, -9.0)
    rng = np.random.default_rng(0)
    signal = (~air)[..., None] * np.exp(1j * TWO_PI * ppm_to_hz(field, 7.0)[..., None] * te)
    signal = signal + 0.02 * (rng.standard_normal(signal.shape) + 1j * rng.standard_normal(signal.shape))
    unwrapped, _ = romeo_unwrap(np.angle(signal), magnitude=np.abs(signal), echo_times_s=te)
    truth = TWO_PI * ppm_to_hz(field, 7.0) * te[0]
    index = np.full(shape, -1)
    index[~air] = np.arange((~air).sum())
    rows, cols = [], []
    for ax in range(3):
        a, b = [slice(None)] * 3, [slice(None)] * 3
        a[ax], b[ax] = slice(0, -1), slice(1, None)
        a, b = tuple(a), tuple(b)
        smooth = ~air[a] & ~air[b] & (np.abs(truth[b] - truth[a]) < np.pi / 2)
        rows.append(index[a][smooth])
        cols.append(index[b][smooth])
    rows, cols, n = np.concatenate(rows), np.concatenate(cols), int((~air).sum())
    _, label = connected_components(coo_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n)))
    safe = np.zeros(shape, dtype=bool)
    safe[~air] = label == np.bincount(label).argmax()
    assert (~air & ~safe).sum() > 300  # the field really is steep beside the sphere
    assert wrong_voxels(unwrapped[..., 0], truth, safe) <= 50


@pytest.mark.parametrize("mode", ["template", "individual"])
def test_global_correction_brings_median_wrap_to_zero(mode):
    # A noise-free plateau at +2 pi (low x: the first voxels of the best score,
    # so it holds the seed) and a noisy bulk near 0: growing from the seed
    # offsets everything by -2 pi, which the global correction must undo.
    te = np.array([0.005, 0.010, 0.015], dtype=np.float32)
    x = np.linspace(-1, 1, 40, dtype=np.float32)[:, None, None] * np.ones((40, 40, 40), np.float32)
    truth1 = TWO_PI / (1 + np.exp((x + 0.5) / 0.08))
    rng = np.random.default_rng(0)
    noise = np.where(x > -0.3, rng.normal(0, 0.05, x.shape), 0).astype(np.float32)
    truth = truth1[..., None] * (te / te[0])
    phase = wrap(truth + noise[..., None])
    echo_ratio = np.round(te / te[0])
    for correct, expected in ((False, -echo_ratio), (True, 0 * echo_ratio)):
        unwrapped, _ = romeo_unwrap(phase, echo_times_s=te, mode=mode, correct_global=correct)
        k = np.rint((unwrapped - truth) / TWO_PI).reshape(-1, 3)
        np.testing.assert_array_equal(k, np.broadcast_to(expected, k.shape))


def test_background_noise_does_not_bias_global_correction():
    # a ball (13 % of the volume) in noise: unwrapped noise drifts by many 2 pi,
    # and would outvote the ball if every voxel counted in the median
    rng = np.random.default_rng(0)
    grid = np.indices((64, 64, 64)) - 31.5
    ball = (grid**2).sum(0) < 20**2
    truth = np.where(ball, 0.3 * grid[0], 0).astype(np.float32)  # median 0 in the ball
    signal = ball * np.exp(1j * truth) + (rng.standard_normal(ball.shape)
                                          + 1j * rng.standard_normal(ball.shape)) / 20
    unwrapped, _ = romeo_unwrap(np.angle(signal), magnitude=np.abs(signal))
    np.testing.assert_allclose(unwrapped[ball], truth[ball], atol=0.3)


def test_islands_unwrap_independently():
    shape = (48, 48, 32)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    blob_a = (x - 12) ** 2 + (y - 24) ** 2 + (z - 16) ** 2 < 9**2
    blob_b = (x - 36) ** 2 + (y - 24) ** 2 + (z - 16) ** 2 < 9**2
    # steep ramps (0.8 rad/voxel), each with median 0 inside its own blob
    truth = np.where(blob_a, 0.8 * (y - 24), 0) + np.where(blob_b, -0.8 * (z - 16), 0)
    magnitude = (blob_a | blob_b).astype(np.float32)
    unwrapped, quality = romeo_unwrap(wrap(truth), magnitude=magnitude, mask=magnitude > 0)
    np.testing.assert_allclose(unwrapped[blob_a], truth[blob_a], atol=1e-4)
    np.testing.assert_allclose(unwrapped[blob_b], truth[blob_b], atol=1e-4)
    assert (quality[magnitude == 0] == 0).all()


def test_single_echo_with_zeros_outside_the_head():
    phase, mag, field, mask = simulate_multi_echo(echo_times_s=(0.02,), snr=80.0)
    phase, mag = np.where(mask[..., None], phase, 0)[..., 0], np.where(mask[..., None], mag, 0)[..., 0]
    unwrapped, quality = romeo_unwrap(phase, magnitude=mag)
    assert unwrapped.shape == phase.shape
    assert wrong_voxels(unwrapped, TWO_PI * field * 0.02, mask) == 0


def test_mcpc3ds_recovers_smooth_offset():
    te = np.array([0.004, 0.008, 0.012], dtype=np.float32)
    phase, mag, field, mask = simulate_multi_echo((48, 48, 48), echo_times_s=te, snr=100.0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, 48, dtype=np.float32)] * 3, indexing="ij")
    offset_true = 1.5 * x - 1.0 * y * z + 0.8  # up to ~3 rad: itself wrapped
    _, offset = mcpc3ds(wrap(phase + offset_true[..., None]), mag, te, voxel_size_mm=(1, 1, 1),
                        sigma_mm=3.0)
    inner = mask & (x**2 + y**2 + z**2 < 0.7**2)
    assert np.abs(wrap(offset - offset_true))[inner].max() < 0.15
    # non-finite voxels (NaN, ±inf: scanner masks, broken conversions) count as zero signal
    # and leave the rest as it was
    broken_phase, broken_mag = wrap(phase + offset_true[..., None]), mag.copy()
    broken_phase[0, 0, 0, 0], broken_mag[1, 1, 1, 1], broken_mag[2, 2, 2, 0] = np.nan, np.inf, -np.inf
    corrected, offset2 = mcpc3ds(broken_phase, broken_mag, te, voxel_size_mm=(1, 1, 1),
                                 sigma_mm=3.0)
    assert np.isfinite(corrected).all() and np.isfinite(offset2).all()
    assert np.abs(wrap(offset2 - offset_true))[inner].max() < 0.15


def test_mcpc3ds_default_keeps_b0_bias_small():
    """A smooth coil-like offset (FWHM 60 mm, std ~1.2 rad) at 2 mm: whatever
    MCPC-3D-S smooths away stays in every echo and biases B0 by ~residual/mean TE."""
    from qsmprep.qsm.echo import romeo_b0
    from qsmprep.sim.signal import smooth_phase_offset

    te = np.array([0.004, 0.012, 0.020, 0.028], dtype=np.float32)
    phase, mag, field, mask = simulate_multi_echo((48, 48, 48), echo_times_s=te, snr=100.0,
                                                  amplitude_hz=60.0)
    offset_true = smooth_phase_offset(mask.shape, (2.0, 2.0, 2.0), np.random.default_rng(1))
    corrected, _ = mcpc3ds(wrap(phase + offset_true[..., None]), mag, te, voxel_size_mm=(2, 2, 2))
    unwrapped, _ = romeo_unwrap(corrected, magnitude=mag, echo_times_s=te)
    error = (romeo_b0(unwrapped, mag, te) - field)[mask]
    error -= np.median(error)  # a global 2 pi choice of the offset is irrelevant
    # measured: 0.52 Hz rms with the 3 mm default, 1.9 Hz with 7 mm; noise alone 0.07 Hz
    assert np.sqrt(np.mean(error**2)) < 1.0


def test_mcpc3ds_bipolar_removes_readout_phase():
    te = np.array([0.004, 0.008, 0.012, 0.016], dtype=np.float32)
    phase, mag, field, mask = simulate_multi_echo((40, 40, 40), echo_times_s=te, snr=100.0)
    x = np.linspace(-1, 1, 40, dtype=np.float32)[:, None, None]
    offset_true = np.float32(0.7) + 0 * x
    bipolar = 1.2 * x  # extra phase of the even echoes (a readout gradient ramp)
    shifted = phase + offset_true[..., None] + np.array([0, 1, 0, 1], np.float32) * bipolar[..., None]
    corrected, _ = mcpc3ds(wrap(shifted), mag, te, voxel_size_mm=(1, 1, 1), sigma_mm=3.0,
                           bipolar=True)
    inner = mask & (np.linalg.norm(np.indices(mask.shape) - 19.5, axis=0) < 12)
    expected = TWO_PI * field[..., None] * te
    for e in range(4):
        assert np.abs(wrap(corrected[..., e] - expected[..., e]))[inner].max() < 0.2


def test_laplacian_unwrap_removes_wraps_of_smooth_field():
    field = smooth_field_hz((48, 48, 40), amplitude_hz=150.0)
    truth = TWO_PI * field * 0.02
    assert np.abs(truth).max() > 4 * np.pi
    unwrapped = laplacian_unwrap(wrap(truth), (1.0, 1.0, 1.2))
    k = np.rint((unwrapped - truth) / TWO_PI)
    assert (k == np.median(k)).all()  # within pi of the truth up to one 2*pi multiple
    assert jumps(unwrapped, np.ones(truth.shape, bool)) == 0


def test_laplacian_unwrap_error_is_smooth_not_2pi_steps():
    """Noise outside a head (air: random phase) pulls the Laplacian estimate
    off the true phase by a smooth field inside, several radians here; that
    is a background, which background removal takes out. Made congruent with
    the data (the method until 2026-12-04), it came back as 2 pi steps where it
    passed pi (79 neighbour pairs in this head), a different set in every
    echo, which the echo combination took into B0."""
    import torch

    from qsmprep.qsm import torch_ops as T

    rng = np.random.default_rng(0)
    shape = (48, 48, 40)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    r = np.sqrt((x - 23.5) ** 2 + (y - 23.5) ** 2 + (z - 19.5) ** 2)
    head, inner = r < 17, r < 12
    bump = 3.0 * np.exp(-((x - 24) ** 2 + (y - 22) ** 2 + (z - 18) ** 2) / (2 * 4.0**2))
    truth = 0.3 * x + 0.2 * z + bump                  # 2.3 wraps along x
    phase = np.where(head, wrap(truth), rng.uniform(-np.pi, np.pi, shape)).astype(np.float32)
    unwrapped = laplacian_unwrap(phase, mask=head)
    assert jumps(unwrapped, head) == 0
    error = unwrapped - truth
    assert np.ptp(error[inner]) > np.pi               # the noise's pull is there ...
    # ... and smooth: its Laplacian is a small part of the bump's
    lap_error = T.laplacian(torch.from_numpy(error)).numpy()[inner]
    lap_bump = T.laplacian(torch.from_numpy(bump)).numpy()[inner]
    assert np.sqrt(np.mean(lap_error**2)) < 0.15 * np.sqrt(np.mean(lap_bump**2))


def test_registry_methods_return_4d():
    phase, mag, field, mask = simulate_multi_echo((24, 24, 24), echo_times_s=(0.005, 0.01))
    for name in ("romeo", "laplacian"):
        unwrapped, quality = registry.run("unwrapping", name, phase[..., 0], magnitude=mag[..., 0],
                                          echo_times_s=(0.005,), mask=mask)
        assert unwrapped.shape == mask.shape + (1,)
        assert wrong_voxels(unwrapped[..., 0], TWO_PI * field * 0.005, mask) == 0
    assert registry.get("unwrapping", "romeo").citations


def test_rejects_unknown_weights_and_missing_echo_times():
    with pytest.raises(ValueError, match="weights"):
        romeo_unwrap(np.zeros((4, 4, 4)), weights=("nope",))
    with pytest.raises(ValueError, match="echo_times"):
        romeo_unwrap(np.zeros((4, 4, 4, 2)))


@pytest.mark.parametrize("name", ["romeo", "laplacian"])
def test_unwrapping_refuses_echo_times_in_milliseconds(name):
    # issue 24: a check with a clear error, the same in every unwrapping entry point
    phase = np.zeros((6, 6, 6, 2), np.float32)
    with pytest.raises(ValueError, match=r"look like milliseconds: give seconds \(0.004, not 4\)"):
        registry.run("unwrapping", name, phase, magnitude=np.ones_like(phase),
                     echo_times_s=(4.0, 8.0))
    with pytest.raises(ValueError, match="look like milliseconds"):
        romeo_unwrap(phase, echo_times_s=[4, 8])
    with pytest.raises(ValueError, match="look like milliseconds"):
        mcpc3ds(phase, np.ones_like(phase), [4, 8], voxel_size_mm=(1, 1, 1))
