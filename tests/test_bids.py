"""BIDS discovery and input validation: every error names the file and the fix."""

from __future__ import annotations

import json
import logging

import nibabel as nb
import numpy as np
import pytest
from conftest import write_dataset_description, write_gre

from qsmprep.qsm.units import GAMMA_BAR_MHZ_PER_T
from qsmprep.utils.bids import QSMPrepInputError, check_output_dir, collect_data
from qsmprep.utils.images import load_stack, phase_in_rad, zero_nonfinite


def _runs(root, **kwargs):
    data = collect_data(root, validate=False, **kwargs)
    return [run for runs in data.values() for run in runs]


def test_echoes_ordered_by_echo_time_not_file_name(tmp_path):
    # echo-1 is acquired last: processing order must follow EchoTime
    files = write_gre(tmp_path, echo_times=(0.012, 0.004, 0.008))
    (run,) = _runs(tmp_path)
    assert run.echo_times == (0.004, 0.008, 0.012)
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
    write_gre(tmp_path, echo_times=(0.004, 0.008),
              meta={"MagneticFieldStrength": None, "ImagingFrequency": "123.2"},
              phase_meta={"Units": "rad"})
    for f in tmp_path.rglob("*.json"):
        if "echo-" in f.name:
            meta = json.loads(f.read_text())
            meta["EchoTime"] = str(meta["EchoTime"])
            f.write_text(json.dumps(meta))
    (run,) = _runs(tmp_path)
    assert run.echo_times == (0.004, 0.008)
    assert run.field_strength == pytest.approx(123.2 / GAMMA_BAR_MHZ_PER_T)


def test_four_d_input_with_echo_time_list(tmp_path):
    write_gre(tmp_path, four_d=True, echo_times=(0.008, 0.004, 0.012),
              meta={"EchoTime": ["0.008", "0.004", "0.012"]})
    (run,) = _runs(tmp_path)
    assert len(run.phase) == 1 and run.echo_times == (0.008, 0.004, 0.012)
    assert run.sorted_echo_times == (0.004, 0.008, 0.012)
    data, tes, _ = load_stack(run.phase, run.echo_times)
    truth, _, _ = load_stack(run.phase, [0, 1, 2])
    assert tes == [0.004, 0.008, 0.012]
    np.testing.assert_array_equal(data[..., 0], truth[..., 1])  # volume of TE 4 ms first


def test_b0_direction_from_affine_unless_sidecar_gives_it(tmp_path):
    angle = np.radians(20)
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                    [0, np.sin(angle), np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rot
    write_gre(tmp_path / "a", affine=affine)
    (run,) = _runs(tmp_path / "a")
    np.testing.assert_allclose(run.b0_direction, [0, np.sin(angle), np.cos(angle)], atol=1e-6)
    write_gre(tmp_path / "b", affine=affine, phase_meta={"B0_dir": [0, 0, 2]})
    (run,) = _runs(tmp_path / "b")
    assert run.b0_direction == (0, 0, 1)


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
