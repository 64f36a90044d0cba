"""Hybrid training data: determinism, shapes, physical consistency, workers."""

import numpy as np
import pytest
import torch

from qsmprep.qsm.kernels import dipole_convolve
from qsmprep.sim.hybrid import HybridDataset, hybrid_sample

SMALL = dict(patch_size=24, margin=8)


def test_same_seed_and_index_give_the_same_sample():
    a = hybrid_sample(3, seed=7, **SMALL)
    b = hybrid_sample(3, seed=7, **SMALL)
    c = hybrid_sample(4, seed=7, **SMALL)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["chi"], c["chi"])
    assert a["chi"].shape == a["mask"].shape == a["total_field"].shape == (24, 24, 24)
    assert a["chi"].dtype == np.float32 and a["mask"].any()  # patches centred in the brain
    assert (a["chi"][a["mask"] == 0] == 0).all()
    assert abs(np.linalg.norm(a["b0_dir"]) - 1) < 1e-6
    assert np.degrees(np.arccos(a["b0_dir"][2])) <= 30.0 + 1e-4


@pytest.mark.parametrize("margin", [0, 12])
def test_local_field_is_the_dipole_field_of_the_patch_chi(margin):
    # noise-free: the local field of a patch is exactly D * chi of the
    # returned chi (the sources in the margin count as background), so a
    # dipole inversion of the patch can recover it
    s = hybrid_sample(1, seed=0, patch_size=32, margin=margin, noise_ppm=(0, 0),
                      background_poly_ppm=(0, 0), pad_factor=2.0,
                      voxel_size_range_mm=(0.8, 1.3))
    # the same padded grid as the region's, so the wrap-around images agree
    ref = dipole_convolve(s["chi"], s["voxel_size_mm"], s["b0_dir"],
                          pad_factor=2.0 * (32 + 2 * margin) / 32)
    err = np.linalg.norm(s["local_field"] - ref) / np.linalg.norm(ref)
    assert err < 2e-3
    assert not np.allclose(s["voxel_size_mm"], 1.0)
    # the total field is the same world whatever is called local
    r = hybrid_sample(1, seed=0, patch_size=32, margin=margin, noise_ppm=(0, 0),
                      background_poly_ppm=(0, 0), pad_factor=2.0,
                      voxel_size_range_mm=(0.8, 1.3), local_sources="region")
    np.testing.assert_allclose(r["total_field"], s["total_field"], atol=1e-4)
    if margin:  # brain chi in the margin acts on the patch: not D * chi of the patch
        err = np.linalg.norm(r["local_field"] - ref) / np.linalg.norm(ref)
        assert err > 0.05


def test_local_sources_is_checked():
    with pytest.raises(ValueError, match="local_sources"):
        hybrid_sample(0, local_sources="brain", **SMALL)


def test_echoes_and_whole_volume():
    s = hybrid_sample(2, seed=0, echo_times_s=[0.004, 0.008], **SMALL)
    assert s["phase"].shape == (24, 24, 24, 2) and np.abs(s["phase"]).max() <= np.pi
    w = hybrid_sample(0, seed=0, patch_size=None, voxel_size_mm=4.0)
    assert w["chi"].shape == (41, 51, 51) and 0.1 < w["mask"].mean() < 0.5


def test_dataset_stream_is_independent_of_workers():
    data = HybridDataset(seed=5, length=4, **SMALL)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=2)
    got = {int(s["index"]): s for s in loader}
    assert sorted(got) == [0, 1, 2, 3]
    np.testing.assert_array_equal(got[2]["chi"].numpy(), data.sample(2)["chi"])
    resumed = HybridDataset(seed=5, length=2, start=2, **SMALL)
    np.testing.assert_array_equal(next(iter(resumed))["chi"], data.sample(2)["chi"])


def test_background_field_is_harmonic_in_the_brain():
    """The field of the sources outside the brain is harmonic inside it, so
    V-SHARP removes it: alone it leaves a small fraction of the local field.
    Computed from the voxelised sources (no anti-aliasing, sources touching
    the brain) it did not: the FFT field of sharp ~10 ppm edges rings into
    the brain, and a background-removal network trained on it learns to
    remove what no real background contains."""
    from qsmprep.qsm.bgremove import vsharp

    def residual(**options):
        s = hybrid_sample(3, seed=0, patch_size=None, voxel_size_mm=1.5, noise_ppm=(0, 0),
                          background_poly_ppm=(0, 0), **options)
        mask, local = s["mask"] > 0, s["local_field"]
        left, covered = vsharp(s["total_field"] - local, mask, s["voxel_size_mm"],
                               max_radius_mm=9.0)
        return np.linalg.norm(left[covered]) / np.linalg.norm(local[covered])

    assert residual() < 0.25
    assert residual(background_sigma_mm=0, background_clearance_mm=0) > 0.6


def test_texture_ranges_reach_the_sample():
    """Texture off (all ranges zero): the brain's chi takes only the label
    table's and the random shapes' values; with the default ranges it varies
    continuously, and a stronger floor gives a rougher map."""
    off = dict(texture_floor_ppm=(0.0, 0.0), texture_relative=(0.0, 0.0))
    flat = hybrid_sample(1, seed=0, **off, **SMALL)
    assert len(np.unique(flat["chi"][flat["mask"] > 0])) < 40
    rough = hybrid_sample(1, seed=0, **SMALL)
    assert len(np.unique(rough["chi"][rough["mask"] > 0])) > 1000
    strong = hybrid_sample(1, seed=0, texture_floor_ppm=(0.05, 0.05), **SMALL)
    tv = [np.abs(np.diff(s["chi"], axis=0))[(s["mask"][1:] * s["mask"][:-1]) > 0].mean()
          for s in (flat, rough, strong)]
    assert tv[0] < tv[1] < tv[2]


def test_lesions_add_the_benchmark_bleeds_and_calcifications():
    """``lesions=True`` stamps the phantoms' lesion model into the brain after
    the random shapes: the brain's chi differs from the same sample without
    lesions only where a bleed (0.4-1.2 ppm) or calcification (-3 to -0.2 ppm)
    now is, and there is at least one of each."""
    flat = dict(patch_size=None, voxel_size_mm=3.0, texture_floor_ppm=(0.0, 0.0),
                texture_relative=(0.0, 0.0), noise_ppm=(0.0, 0.0))
    plain = hybrid_sample(5, seed=0, **flat)
    les = hybrid_sample(5, seed=0, lesions=True, **flat)
    np.testing.assert_array_equal(plain["mask"], les["mask"])
    changed = les["chi"] != plain["chi"]
    new = les["chi"][changed]
    assert changed.any() and (les["mask"][changed] > 0).all()
    bleed, calc = (new >= 0.4) & (new <= 1.2), (new >= -3.0) & (new <= -0.2)
    assert (bleed | calc).all()
    assert len(np.unique(new[bleed])) >= 1 and len(np.unique(new[calc])) >= 1
