import numpy as np
import pytest

from qsmprep.qsm import registry

from _data import save_volumes
from _qsm_phantom import csf_head


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

    brain, ventricles, magnitude, te = csf_head(3.0)
    found, problem = csf_mask(magnitude, brain, echo_times_s=te, depth_mm=6.0)
    assert problem is None and found.sum() > 0 and np.mean(ventricles[found]) > 0.95
    chi = np.where(ventricles, 0.05, 0.0) + np.where(brain & ~ventricles, -0.02, 0.0) + 0.3
    out = registry.run("referencing", "csf", chi.astype(np.float32), brain, magnitude=magnitude,
                       echo_times_s=te, depth_mm=6.0)
    assert np.median(out[ventricles]) == pytest.approx(0.0, abs=1e-6)
    assert np.median(out[brain & ~ventricles]) == pytest.approx(-0.07, abs=1e-6)
    with pytest.raises(ValueError, match="magnitude"):
        registry.run("referencing", "csf", chi, brain)


def test_csf_reference_uses_the_core_of_the_ventricles_not_their_partial_volume_rim():
    """At the acquired resolution the ventricles' outer voxels carry the blurred
    chi of the tissue around them; the reference is taken two voxels in, where
    CSF is 0, so the tissue keeps its true value (a rim-biased median would
    shift every voxel of the map)."""
    from scipy.ndimage import gaussian_filter

    from qsmprep.qsm.reference import csf_core, csf_mask

    brain, ventricles, magnitude, te = csf_head(3.0)
    chi_model = np.where(brain & ~ventricles, 0.04, 0.0)     # CSF 0, tissue +0.04 ppm
    blurred = gaussian_filter(chi_model, 0.7)                 # the acquisition's partial volume
    chi = np.where(brain, blurred, 0.0).astype(np.float32)
    found, _ = csf_mask(magnitude, brain, echo_times_s=te, depth_mm=6.0, core_voxels=0)
    core, _ = csf_mask(magnitude, brain, echo_times_s=te, depth_mm=6.0)
    assert core.sum() >= 100 and not np.any(core & ~found) and core.sum() < found.sum()
    assert np.median(chi[found]) > 0.004   # the rim's partial volume
    deep_tissue = brain & ~ventricles & (blurred > 0.0399)
    out = registry.run("referencing", "csf", chi, brain, magnitude=magnitude, echo_times_s=te,
                       depth_mm=6.0)
    assert np.median(out[deep_tissue]) == pytest.approx(0.04, abs=0.0015)
    rim = registry.run("referencing", "csf", chi, brain, magnitude=magnitude, echo_times_s=te,
                       depth_mm=6.0, core_voxels=0)
    assert np.median(rim[deep_tissue]) < 0.04 - 0.004
    # a CSF region too small for two erosions keeps what one (or none) leaves
    small = np.zeros((20, 20, 20), bool)
    small[5:12, 5:12, 5:12] = True            # 343 voxels: 2 erosions leave 27, 1 leaves 125
    assert csf_core(small, 2, 100).sum() == 125 and csf_core(small, 2, 400).sum() == 343


def test_csf_reference_without_ventricles_falls_back_to_the_mean_and_says_so(caplog):
    """Bright deep voxels that decay like tissue (no ventricles in the field of
    view) are not CSF: the map is referenced to the whole-brain mean, with a
    warning naming the run's file, instead of to an arbitrary bright region."""
    from qsmprep.qsm.reference import csf_mask

    brain, ventricles, magnitude, te = csf_head(20.0)
    found, problem = csf_mask(magnitude, brain, echo_times_s=te, depth_mm=6.0)
    assert not found.any() and "R2*" in problem
    chi = (np.where(ventricles, 0.05, 0.0) + np.where(brain, 0.3, 0.0)).astype(np.float32)
    with caplog.at_level("WARNING", logger="qsmprep"):
        out = registry.run("referencing", "csf", chi, brain, magnitude=magnitude,
                           echo_times_s=te, depth_mm=6.0, source="sub-01_part-mag_MEGRE.nii.gz")
    assert abs(out[brain].mean()) < 1e-6
    assert "sub-01_part-mag_MEGRE.nii.gz" in caplog.text and "whole-brain mean" in caplog.text
    # the run's search result (the csf_core node's) is used as it is, without searching
    # again (there is no magnitude to search in here): the same fall-back and its reason
    caplog.clear()
    with caplog.at_level("WARNING", logger="qsmprep"):
        given = registry.run("referencing", "csf", chi, brain, csf_region=(found, problem))
    np.testing.assert_array_equal(given, out)
    assert problem in caplog.text and "whole-brain mean" in caplog.text
    # a mask with no deep voxels (a thin slab) cannot hold ventricles either
    slab = np.zeros(brain.shape, bool)
    slab[:, :, 20:23] = brain[:, :, 20:23]
    assert csf_mask(magnitude, slab, echo_times_s=te)[1] is not None
    # nor a magnitude without contrast (phase-only data: 1 everywhere), whose tied
    # "brightest 5 %" would be every deep voxel, decaying with R2* 0
    found, problem = csf_mask(np.ones_like(magnitude), brain, echo_times_s=te, depth_mm=6.0)
    assert not found.any() and "no contrast" in problem


def test_reference_step_hands_its_fallback_warning_to_the_chimap_sidecar(tmp_path):
    """The workflow's referencing step (the real Nipype interface) returns what
    the method warned about, and the Chimap sidecar gets it."""
    import nibabel as nb

    from qsmprep.interfaces.reference import Reference
    from qsmprep.workflows.outputs import _merge_meta

    brain, ventricles, magnitude, te = csf_head(20.0)
    files = save_volumes(tmp_path, np.eye(4), chi=np.where(brain, 0.3, 0.0), mask=brain,
                         mag=magnitude)
    source = "/data/sub-07/anat/sub-07_echo-1_part-mag_MEGRE.nii.gz"
    result = Reference(method="csf", params={"depth_mm": 6.0}, chi=files["chi"],
                       mask=files["mask"], magnitude=files["mag"], echo_times_s=list(te),
                       source=source).run(cwd=str(tmp_path))
    warnings = result.outputs.warnings
    assert len(warnings) == 1 and source in warnings[0] and "whole-brain mean" in warnings[0]
    out = np.asanyarray(nb.load(result.outputs.chi).dataobj)
    assert abs(out[brain].mean()) < 1e-5
    meta = _merge_meta({"Units": "ppm"}, {"PhaseSign": 1}, warnings)
    assert meta["ReferencingWarnings"] == warnings and meta["Units"] == "ppm"
    assert "ReferencingWarnings" not in _merge_meta({"Units": "ppm"}, {}, [])


def test_reference_values_let_a_map_move_to_the_other_reference(tmp_path):
    """The Chimap sidecar's ``ReferenceValues``: subtracting its ventricular CSF
    median from the whole-brain-referenced map gives ``--referencing csf``'s
    map, and its whole-brain mean does the reverse; the real interfaces (the
    run's one CSF search, CSFCore, handed to Reference) give the same values,
    with ``--referencing csf``'s own settings, and the sidecar gets them."""
    import nibabel as nb

    from qsmprep.interfaces.reference import CSFCore, Reference
    from qsmprep.qsm.reference import csf_mask, reference_values
    from qsmprep.workflows.outputs import _merge_meta
    from qsmprep.qsm.reference import csf_search_params

    brain, ventricles, magnitude, te = csf_head(3.0)
    rng = np.random.default_rng(1)
    raw = (np.where(ventricles, 0.05, -0.02) + 0.3 + rng.normal(0, 0.01, brain.shape)) * brain
    raw = raw.astype(np.float32)
    by_mean = registry.run("referencing", "mean", raw, brain)
    vox = (2.0, 2.0, 2.0)  # the phantom's ventricles at the size the defaults look for
    by_csf = registry.run("referencing", "csf", raw, brain, magnitude=magnitude, echo_times_s=te,
                          voxel_size_mm=vox)
    region = csf_mask(magnitude, brain, vox, echo_times_s=te)
    values = reference_values(by_mean, brain, region)
    assert values["WholeBrainMean"] == pytest.approx(0.0, abs=1e-6)
    assert str(values["WholeBrainMean"]) != "-0.0"    # a rounded -1e-9 is written as 0.0
    assert values["VentricularCSFVoxels"] == region[0].sum() > 0 and values["Units"] == "ppm"
    # the ventricles are 0.07 ppm above the rest: the CSF median sits near there
    assert 0.04 < values["VentricularCSFMedian"] < 0.08
    np.testing.assert_allclose((by_mean - values["VentricularCSFMedian"]) * brain, by_csf,
                               atol=2e-6)
    back = reference_values(by_csf, brain, region)
    assert back["VentricularCSFMedian"] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose((by_csf - back["WholeBrainMean"]) * brain, by_mean, atol=2e-6)
    # without a magnitude (phase-only data) there is no CSF value, and the note says why
    alone = reference_values(by_mean, brain)
    assert alone["VentricularCSFMedian"] is None and "no magnitude" in alone["VentricularCSFNote"]
    flat = reference_values(by_mean, brain, csf_mask(np.ones_like(magnitude), brain, vox))
    assert flat["VentricularCSFMedian"] is None and "no contrast" in flat["VentricularCSFNote"]

    files = save_volumes(tmp_path, np.diag([*vox, 1.0]), chi=raw, mask=brain, mag=magnitude)
    core = CSFCore(magnitude=files["mag"], mask=files["mask"],
                   echo_times_s=list(te)).run(cwd=str(tmp_path)).outputs
    assert core.csf_note == ""
    np.testing.assert_array_equal(np.asanyarray(nb.load(core.csf).dataobj) > 0, region[0])
    result = Reference(method="mean", chi=files["chi"], mask=files["mask"],
                       magnitude=files["mag"], echo_times_s=list(te), csf=core.csf,
                       csf_note=core.csf_note).run(cwd=str(tmp_path))
    assert result.outputs.reference_values == pytest.approx(values, abs=1e-6)
    meta = _merge_meta({"Units": "ppm"}, {}, [], None, result.outputs.reference_values)
    assert meta["ReferenceValues"] == result.outputs.reference_values
    # a --referencing csf run with its own settings: the one search uses them, so the
    # written map's CSF median is 0 and the sidecar says so
    settings = {"depth_mm": 6.0, "core_voxels": 1}
    params = csf_search_params("csf", {**settings, "source": "x"})
    assert params == settings
    core = CSFCore(magnitude=files["mag"], mask=files["mask"], echo_times_s=list(te),
                   params=params).run(cwd=str(tmp_path)).outputs
    result = Reference(method="csf", params=settings, chi=files["chi"], mask=files["mask"],
                       magnitude=files["mag"], echo_times_s=list(te), csf=core.csf,
                       csf_note=core.csf_note).run(cwd=str(tmp_path))
    own = result.outputs.reference_values
    assert own["VentricularCSFMedian"] == pytest.approx(0.0, abs=1e-6)
    assert own["VentricularCSFVoxels"] == csf_mask(magnitude, brain, vox, echo_times_s=te,
                                                   **settings)[0].sum() != region[0].sum()
    assert csf_search_params("mean", settings) == {}
    # used directly, without the run's core, the interface searches once with the
    # method's own settings, for the map and the values alike
    direct = Reference(method="csf", params=settings, chi=files["chi"], mask=files["mask"],
                       magnitude=files["mag"], echo_times_s=list(te)).run(cwd=str(tmp_path))
    assert direct.outputs.reference_values == pytest.approx(own, abs=1e-6)
    np.testing.assert_allclose(np.asanyarray(nb.load(direct.outputs.chi).dataobj),
                               np.asanyarray(nb.load(result.outputs.chi).dataobj), atol=1e-7)