"""BIDS discovery and input validation: every error names the file and the fix."""

from __future__ import annotations

import json
import logging

import nibabel as nb
import numpy as np
import pytest
from conftest import write_dataset_description, write_gre

from qsmprep.qsm.units import GAMMA_BAR_MHZ_PER_T
from qsmprep.bids import QSMPrepInputError
from qsmprep.bids.discover import check_output_dir, collect_data
from qsmprep.utils.images import load_stack, phase_in_rad, zero_nonfinite


def _runs(root, **kwargs):
    data = collect_data(root, validate=False, **kwargs)
    return [run for runs in data.values() for run in runs]


def test_echoes_ordered_by_echo_time_not_file_name(tmp_path):
    # echo-1 is acquired last: processing order must follow EchoTime
    files = write_gre(tmp_path, echo_times_s=(0.012, 0.004, 0.008))
    (run,) = _runs(tmp_path)
    assert run.echo_times_s == (0.004, 0.008, 0.012)
    assert [p.split("_")[1] for p in map(lambda f: f.rsplit("/", 1)[1], run.phase)] == [
        "echo-2", "echo-3", "echo-1"]
    assert run.phase[0] == str(files["phase"][1])


def test_runs_grouped_by_session_acquisition_run_and_suffix(tmp_path):
    write_gre(tmp_path, entities="_ses-a_run-1")
    write_gre(tmp_path, entities="_ses-a_run-2")
    write_gre(tmp_path, entities="_ses-b_acq-fast")
    write_gre(tmp_path, subject="02", suffix="T2starw")
    data = collect_data(tmp_path, validate=False)
    assert sorted(r.name for r in data["01"]) == ["ses-a_run-1", "ses-a_run-2", "ses-b_acq-fast"]
    assert [r.suffix for r in data["02"]] == ["T2starw"]
    only_b = collect_data(tmp_path, session_label=["b"], participant_label=["01"],
                          validate=False)
    assert [r.name for r in only_b["01"]] == ["ses-b_acq-fast"]
    filtered = collect_data(tmp_path, bids_filters={"acquisition": "fast"}, validate=False)
    assert list(filtered) == ["01"]


def test_string_metadata_and_imaging_frequency(tmp_path):
    write_gre(tmp_path, echo_times_s=(0.004, 0.008),
              meta={"MagneticFieldStrength": None, "ImagingFrequency": "123.2"},
              phase_meta={"Units": "rad"})
    for f in tmp_path.rglob("*.json"):
        if "echo-" in f.name:
            meta = json.loads(f.read_text())
            meta["EchoTime"] = str(meta["EchoTime"])
            f.write_text(json.dumps(meta))
    (run,) = _runs(tmp_path)
    assert run.echo_times_s == (0.004, 0.008)
    assert run.field_strength_t == pytest.approx(123.2 / GAMMA_BAR_MHZ_PER_T)


def test_four_d_input_with_echo_time_list(tmp_path):
    write_gre(tmp_path, four_d=True, echo_times_s=(0.008, 0.004, 0.012),
              meta={"EchoTime": ["0.008", "0.004", "0.012"]})
    (run,) = _runs(tmp_path)
    assert len(run.phase) == 1 and run.echo_times_s == (0.008, 0.004, 0.012)
    assert run.sorted_echo_times_s == (0.004, 0.008, 0.012)
    data, tes, _ = load_stack(run.phase, run.echo_times_s)
    truth, _, _ = load_stack(run.phase, [0, 1, 2])
    assert tes == [0.004, 0.008, 0.012]
    np.testing.assert_array_equal(data[..., 0], truth[..., 1])  # volume of TE 4 ms first


def test_load_stack_sorts_into_one_array_and_names_an_echo_on_another_grid(tmp_path):
    """``load_stack`` reads each volume into its echo-time slot of one 4-D
    array (3-D and 4-D files mixed); an echo on another grid (a caller that
    skipped discovery's check) is an error naming that file."""
    vols = [np.full((4, 5, 6), v, np.float32) for v in (1.0, 2.0, 3.0)]
    one, two = tmp_path / "e1.nii.gz", tmp_path / "e23.nii.gz"
    nb.save(nb.Nifti1Image(vols[0], np.eye(4)), one)
    nb.save(nb.Nifti1Image(np.stack(vols[1:], axis=-1), np.eye(4)), two)
    data, tes, _ = load_stack([one, two], [0.012, 0.004, 0.008])
    assert tes == [0.004, 0.008, 0.012] and data.shape == (4, 5, 6, 3)
    assert [float(data[0, 0, 0, e]) for e in range(3)] == [2.0, 3.0, 1.0]
    # Fortran order, as nibabel reads the app's work files: a C-ordered stack made sums over
    # the echoes round differently in-process than in the app (BET's mask moved 5217 voxels)
    assert data.flags.f_contiguous
    phase, _ = phase_in_rad(np.asfortranarray(data * 1000.0), "arbitrary", "p.nii.gz")
    assert phase.flags.f_contiguous
    other = tmp_path / "e4.nii.gz"
    nb.save(nb.Nifti1Image(np.zeros((4, 5, 7), np.float32), np.eye(4)), other)
    with pytest.raises(ValueError, match=r"e4\.nii\.gz has a grid of \(4, 5, 7\)"):
        load_stack([one, other], [0.004, 0.008])
    with pytest.raises(ValueError, match="2 echo times given for 3 volumes"):
        load_stack([one, two], [0.004, 0.008])


def test_b0_direction_from_affine_unless_sidecar_gives_it(tmp_path):
    angle = np.radians(20)
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                    [0, np.sin(angle), np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rot
    write_gre(tmp_path / "a", affine=affine)
    (run,) = _runs(tmp_path / "a")
    np.testing.assert_allclose(run.b0_dir, [0, np.sin(angle), np.cos(angle)], atol=1e-6)
    assert run.b0_dir_sidecar is None and not run.b0_dir_source.startswith("sidecar")
    write_gre(tmp_path / "b", affine=affine, phase_meta={"B0_dir": [0, 0, 2]})
    (run,) = _runs(tmp_path / "b")
    # the sidecar's B0_dir (normalised) wins over the affine, and says so
    assert run.b0_dir == run.b0_dir_sidecar == (0, 0, 1)
    assert run.b0_dir_source == "sidecar B0_dir"


def test_b0_direction_from_the_scanner_qform_when_a_rotated_sform_disagrees(tmp_path, caplog):
    # issue 24: a sform rotated 20 deg (registration/resampling) beside the scanner
    # qform must not tilt the dipole kernel; the choice is logged and recorded
    from qsmprep.workflows.qsm import input_interpretation

    angle = np.radians(20)
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                    [0, np.sin(angle), np.cos(angle)]])
    qform = np.diag([1.0, 1.0, 1.5, 1.0])
    sform = qform.copy()
    sform[:3, :3] = rot @ qform[:3, :3]
    files = write_gre(tmp_path, affine=qform)
    for path in files["phase"] + files["mag"]:
        img = nb.load(path)
        img.set_qform(qform, code=1)
        img.set_sform(sform, code=2)
        img.to_filename(path)
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        (run,) = _runs(tmp_path)
    np.testing.assert_allclose(run.b0_dir, [0, 0, 1], atol=1e-6)
    assert files["phase"][0].name in caplog.text
    assert "the qform is used for the B0 direction" in caplog.text
    source = input_interpretation(run)["B0DirectionSource"]
    assert source.startswith("qform of the header (qform_code 1") and "sform_code 2" in source


@pytest.mark.parametrize("voxel_mm, pipeline, warned", [
    ((0.5, 0.5, 1.0), "nextqsm", True),  # NeXtQSM on sub-0.8 mm voxels
    ((1.0, 1.0, 3.0), "ir2qsm", True),  # a learned inversion on thick slices
    ((0.5, 0.5, 1.0), "classical", False),  # no learned method: nothing to warn about
    ((0.5, 0.5, 1.0), None, False),  # nor with the default (total field inversion)
    ((1.0, 1.0, 1.5), "nextqsm", False),  # inside the trained/validated sizes
])
def test_learned_methods_warn_on_voxels_they_were_not_trained_for(tmp_path, caplog, voxel_mm,
                                                                  pipeline, warned):
    from qsmprep.config import DEFAULT_METHODS, Workflow, pipeline_methods
    from qsmprep.dl.policy import check_learned_voxel_sizes

    write_gre(tmp_path, affine=np.diag([*voxel_mm, 1.0]))
    data = collect_data(tmp_path, validate=False)
    methods = {**DEFAULT_METHODS, **(pipeline_methods(pipeline) if pipeline else {})}
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        check_learned_voxel_sizes(data, Workflow(**methods))
    messages = [r.getMessage() for r in caplog.records if "network(s)" in r.getMessage()]
    assert bool(messages) == warned, messages
    if warned:  # names the subject (so the report lists it), the sizes and the way out
        assert "sub-01" in messages[0] and "--pipeline classical" in messages[0]
        assert " x ".join(f"{v:.3g}" for v in voxel_mm) in messages[0]


@pytest.mark.parametrize("unwrapping, warned", [("laplacian", True), ("romeo", False)])
def test_a_method_with_a_caution_warns_every_run_that_chooses_it(tmp_path, caplog, unwrapping,
                                                                   warned):
    """``--unwrapping laplacian`` carries a caution in the registry (what it
    scored, and the way out): each run is warned, by name, so that its report
    lists it; the default methods carry none."""
    from qsmprep.bids.discover import warn_method_cautions
    from qsmprep.config import DEFAULT_METHODS, Workflow

    write_gre(tmp_path)
    data = collect_data(tmp_path, validate=False)
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        warn_method_cautions(data, Workflow(**{**DEFAULT_METHODS, "unwrapping": unwrapping}))
    messages = [r.getMessage() for r in caplog.records if "--unwrapping" in r.getMessage()]
    assert len(messages) == int(warned), messages
    if warned:
        assert "sub-01" in messages[0] and "--unwrapping laplacian was chosen" in messages[0]
        assert "--unwrapping romeo" in messages[0] and "NRMSE" in messages[0]


# --------------------------------------------------------------------------
# validation errors
# --------------------------------------------------------------------------
def _error(root, **kwargs):
    with pytest.raises(QSMPrepInputError) as info:
        collect_data(root, validate=False, **kwargs)
    return str(info.value)


def test_no_phase_images(tmp_path):
    write_gre(tmp_path, parts=("mag",))
    msg = _error(tmp_path)
    assert "No phase images" in msg and "part-phase" in msg and "sub-01" in msg


def test_missing_echo_time(tmp_path):
    files = write_gre(tmp_path)
    sidecar = files["phase"][1].with_name(files["phase"][1].name.replace(".nii.gz", ".json"))
    meta = json.loads(sidecar.read_text())
    del meta["EchoTime"]
    sidecar.write_text(json.dumps(meta))
    msg = _error(tmp_path)
    assert "EchoTime" in msg and files["phase"][1].name in msg and "seconds" in msg


def test_echo_time_in_milliseconds(tmp_path):
    write_gre(tmp_path, meta={"EchoTime": 4})
    assert "not in seconds" in _error(tmp_path)


def test_missing_field_strength(tmp_path):
    write_gre(tmp_path, meta={"MagneticFieldStrength": None})
    msg = _error(tmp_path)
    assert "MagneticFieldStrength" in msg and "ImagingFrequency" in msg


def test_echoes_with_different_shapes(tmp_path):
    files = write_gre(tmp_path)
    nb.Nifti1Image(np.zeros((12, 10, 9), np.float32), np.diag([1, 1, 1.5, 1])).to_filename(
        files["phase"][2])
    msg = _error(tmp_path)
    assert files["phase"][2].name in msg and "(12, 10, 9)" in msg and "phase echoes" in msg


def test_echoes_with_different_affines(tmp_path):
    files = write_gre(tmp_path)
    img = nb.load(files["phase"][1])
    nb.Nifti1Image(img.get_fdata(dtype=np.float32), np.diag([1, 1, 2, 1])).to_filename(
        files["phase"][1])
    msg = _error(tmp_path)
    assert files["phase"][1].name in msg and "affines" in msg


def test_magnitude_and_phase_grids_differ(tmp_path):
    files = write_gre(tmp_path)
    for f in files["mag"]:
        nb.Nifti1Image(np.ones((12, 10, 7), np.float32), np.diag([1, 1, 1.5, 1])).to_filename(f)
    msg = _error(tmp_path)
    assert "magnitude and phase" in msg and files["mag"][0].name in msg


def test_four_d_echo_count_mismatch(tmp_path):
    files = write_gre(tmp_path, four_d=True, meta={"EchoTime": [0.004, 0.008]})
    msg = _error(tmp_path)
    assert files["phase"][0].name in msg and "3 echo volume(s)" in msg and "2 EchoTime" in msg


def test_no_subject_matches_participant_label(synthetic_bids):
    msg = _error(synthetic_bids, participant_label=["99"])
    assert "--participant-label 99" in msg and "subjects found: 01" in msg


def test_selected_subject_without_gre_data(tmp_path):
    write_gre(tmp_path)
    write_dataset_description(tmp_path)
    (tmp_path / "sub-02" / "anat").mkdir(parents=True)
    (tmp_path / "sub-02" / "anat" / "sub-02_T1w.nii.gz").write_bytes(b"")
    assert "sub-02 has no MEGRE or T2starw" in _error(tmp_path, participant_label=["02"])


def test_validation_hint_for_files_pybids_left_out(tmp_path):
    write_gre(tmp_path, four_d=True)  # MEGRE without echo- entity is not valid BIDS
    with pytest.raises(QSMPrepInputError, match="add --skip-bids-validation"):
        collect_data(tmp_path, participant_label=["01"], validate=True)
    assert _runs(tmp_path, participant_label=["01"])


def test_unknown_filter_entity(synthetic_bids):
    assert "cannot be used" in _error(synthetic_bids, bids_filters={"acquisitoin": "x"})


def test_unsupported_phase_units(tmp_path):
    write_gre(tmp_path, phase_meta={"Units": "degrees"})
    assert "'degrees'" in _error(tmp_path)


def test_not_a_bids_dataset(tmp_path):
    assert "dataset_description.json" in _error(tmp_path)


def test_output_inside_input_dataset_refused(tmp_path):
    check_output_dir(tmp_path / "bids", tmp_path / "bids" / "derivatives" / "qsmprep")
    check_output_dir(tmp_path / "bids", tmp_path / "out")
    for bad in (tmp_path / "bids", tmp_path / "bids" / "sub-01", tmp_path / "bids" / "derivatives",
                tmp_path):
        with pytest.raises(QSMPrepInputError, match="(inside|contains) the input dataset"):
            check_output_dir(tmp_path / "bids", bad)


# --------------------------------------------------------------------------
# loading: phase units and non-finite voxels
# --------------------------------------------------------------------------
def test_arbitrary_phase_rescaled_to_rad():
    raw = np.linspace(-4096, 4094, 1000, dtype=np.float32).reshape(10, 10, 10)
    phase, units = phase_in_rad(raw, "arbitrary", "x.nii")
    assert units == "arbitrary"
    assert phase.min() == pytest.approx(-np.pi) and phase.max() == pytest.approx(np.pi)


def test_missing_units_inferred_from_range_with_warning(caplog):
    in_rad = np.linspace(-3.1, 3.1, 27, dtype=np.float32).reshape(3, 3, 3)
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        phase, units = phase_in_rad(in_rad, None, "sub-01_echo-1_part-phase_MEGRE.nii")
    assert units == "rad" and np.array_equal(phase, in_rad)
    assert "no Units" in caplog.text and "sub-01_echo-1_part-phase_MEGRE.nii" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        phase, units = phase_in_rad(in_rad * 1000, None, "p.nii")
    assert units == "arbitrary" and phase.max() == pytest.approx(np.pi)
    assert "rescaled" in caplog.text


def test_nan_and_inf_voxels_zeroed_and_masked_with_warning(caplog):
    phase = np.ones((4, 4, 4, 2), np.float32)
    mag = np.ones((4, 4, 4, 2), np.float32)
    phase[1, 1, 1, 1] = np.nan
    mag[2, 2, 2, 0] = np.inf
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        valid = zero_nonfinite([phase, mag], ["phase.nii", "mag.nii"])
    assert np.isfinite(phase).all() and phase[1, 1, 1, 1] == 0 and mag[2, 2, 2, 0] == 0
    assert not valid[1, 1, 1] and not valid[2, 2, 2] and valid.sum() == 62
    assert "phase.nii: 1 NaN/Inf" in caplog.text and "mag.nii: 1 NaN/Inf" in caplog.text


# --- user-supplied brain masks: --mask FILE, --derivatives NAME=PATH ---------------------

from qsmprep.bids.masks import attach_masks  # noqa: E402

GRID = np.diag([1.0, 1.0, 1.5, 1.0])  # write_gre's default affine, shape (12, 10, 8)


def _write_mask(path, data=None, affine=GRID, shape=(12, 10, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = np.zeros(shape, np.uint8)
        data[3:9, 3:7, 2:6] = 1
    nb.Nifti1Image(data, affine).to_filename(path)
    return path


def _derivatives(root):
    write_dataset_description(root)
    return root


def test_derivatives_masks_found_with_pybids_per_run(tmp_path):
    bids = tmp_path / "bids"
    write_gre(bids, entities="_ses-a_run-1")
    write_gre(bids, entities="_ses-a_run-2")
    write_gre(bids, entities="_ses-b_acq-fast")
    deriv = _derivatives(tmp_path / "masks")
    anat = deriv / "sub-01" / "ses-a" / "anat"
    run1 = _write_mask(anat / "sub-01_ses-a_run-1_desc-brain_mask.nii.gz")
    _write_mask(anat / "sub-01_ses-a_run-1_desc-csf_mask.nii.gz")  # not a brain mask
    _write_mask(anat / "sub-01_ses-a_mask.nii.gz")  # no run-: not run 1's nor run 2's
    run2 = _write_mask(anat / "sub-01_ses-a_run-2_mask.nii.gz")  # no desc: accepted
    _write_mask(anat / "sub-01_ses-a_run-2_label-CSF_mask.nii.gz")  # a tissue label: not one
    _write_mask(anat / "sub-01_ses-a_run-2_label-CSF_desc-ventricles_mask.nii.gz")  # qsmprep's
    _write_mask(anat / "sub-01_ses-a_run-2_space-MNI_desc-brain_mask.nii.gz")  # not native
    fast = _write_mask(deriv / "sub-01" / "ses-b" / "anat" / "sub-01_ses-b_acq-fast_desc-"
                       "brain_mask.nii.gz")
    data = attach_masks(collect_data(bids, validate=False), derivatives={"masks": str(deriv)})
    got = {r.name: (r.mask, r.mask_source) for r in data["01"]}
    assert got["ses-a_run-1"] == (str(run1), "bids:masks:sub-01/ses-a/anat/" + run1.name)
    assert got["ses-a_run-2"][0] == str(run2)
    assert got["ses-b_acq-fast"][0] == str(fast)
    twin = _write_mask(anat / "sub-01_ses-a_run-1_desc-brain_mask.nii")  # same name, .nii
    with pytest.raises(QSMPrepInputError, match="Several brain masks for sub-01 ses-a_run-1"):
        attach_masks(collect_data(bids, validate=False), derivatives={"masks": str(deriv)})
    assert twin.exists()


def test_derivatives_masks_missing_for_some_or_all_runs(tmp_path, caplog):
    bids = tmp_path / "bids"
    write_gre(bids)
    write_gre(bids, subject="02")
    deriv = _derivatives(tmp_path / "masks")
    data = collect_data(bids, validate=False)
    with pytest.raises(QSMPrepInputError, match=r"No brain mask for any run.*"
                       r"sub-01/anat/sub-01_desc-brain_mask\.nii\.gz"):
        attach_masks(data, derivatives={"masks": str(deriv)})
    _write_mask(deriv / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz")
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        out = attach_masks(data, derivatives={"masks": str(deriv)})
    assert out["01"][0].mask and out["02"][0].mask is None
    assert "sub-02 MEGRE: no brain mask in the --derivatives" in caplog.text
    (deriv / "dataset_description.json").unlink()
    with pytest.raises(QSMPrepInputError, match="no dataset_description.json"):
        attach_masks(data, derivatives={"masks": str(deriv)})


def test_mask_on_another_grid_is_refused_with_the_fix(tmp_path):
    bids = tmp_path / "bids"
    write_gre(bids)
    data = collect_data(bids, validate=False)
    ref = data["01"][0].magnitude[0]
    small = _write_mask(tmp_path / "t1_mask.nii.gz", shape=(24, 20, 16),
                        affine=np.diag([0.5, 0.5, 0.75, 1.0]))
    with pytest.raises(QSMPrepInputError) as err:
        attach_masks(data, mask_file=str(small))
    msg = str(err.value)
    assert f"The brain mask {small} is not on the voxel grid of {ref}" in msg
    assert "shape (24, 20, 16) vs (12, 10, 8)" in msg
    assert "mask affine [[0.5, 0.0, 0.0, 0.0]" in msg and "GRE affine [[1.0, 0.0" in msg
    assert f"antsApplyTransforms -d 3 -i {small} -r {ref}" in msg and "flirt" in msg
    shifted = GRID.copy()
    shifted[0, 3] = 0.01  # 10 micrometres: more than 1e-3 mm
    moved = _write_mask(tmp_path / "moved_mask.nii.gz", affine=shifted)
    with pytest.raises(QSMPrepInputError, match=r"same shape \(12, 10, 8\) but affines "
                       r"differing by up to 0\.01"):
        attach_masks(data, mask_file=str(moved))
    shifted[0, 3] = 5e-4  # within tolerance
    ok = _write_mask(tmp_path / "ok_mask.nii.gz", affine=shifted)
    assert attach_masks(data, mask_file=str(ok))["01"][0].mask == str(ok)


def test_mask_shared_by_runs_on_different_grids_and_mask_content_checks(tmp_path, caplog):
    bids = tmp_path / "bids"
    write_gre(bids, entities="_run-1")
    write_gre(bids, entities="_run-2", shape=(12, 10, 9))
    data = collect_data(bids, validate=False)
    mask = _write_mask(tmp_path / "mask.nii.gz")
    with pytest.raises(QSMPrepInputError, match="one mask for all 2 runs"):
        attach_masks(data, mask_file=str(mask))
    with pytest.raises(QSMPrepInputError, match="either --mask"):
        attach_masks(data, mask_file=str(mask), derivatives={"d": str(tmp_path)})
    one = {"01": data["01"][:1]}
    prob = np.zeros((12, 10, 8), np.float32)
    prob[3:9, 3:7, 2:6] = 0.7
    prob[0, 0, 0] = 0.3
    with caplog.at_level(logging.WARNING, logger="qsmprep"):
        attach_masks(one, mask_file=str(_write_mask(tmp_path / "prob.nii.gz", prob)))
    assert "is not binary (values 0 to 0.7" in caplog.text and "thresholded at 0.5: 96" \
        in caplog.text
    empty = _write_mask(tmp_path / "empty.nii.gz", np.zeros((12, 10, 8), np.float32) + 0.2)
    with pytest.raises(QSMPrepInputError, match=f"The brain mask {empty} is empty"):
        attach_masks(one, mask_file=str(empty))
