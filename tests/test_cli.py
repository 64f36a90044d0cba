"""Command line and settings: parsing, registry choices, TOML round trip, exit codes."""

from __future__ import annotations

import json

import pytest

from qsmprep.cli.parser import build_parser, parse_args
from qsmprep.cli.run import main
from qsmprep.config import (
    DEFAULT_METHODS, LOCAL_FIELD_BF_REMOVAL, PIPELINE_DESCRIPTIONS, PIPELINES, Config,
)
from qsmprep.qsm import registry


def _args(tmp_path, *extra):
    return [str(tmp_path / "bids"), str(tmp_path / "out"), "participant", *extra]


@pytest.mark.parametrize("label", ["01", "sub-01"])
def test_participant_label_with_or_without_prefix(tmp_path, label):
    config = parse_args(_args(tmp_path, "--participant-label", label, "02",
                              "--session-label", "ses-pre"))
    assert config.execution.participant_label == ["01", "02"]
    assert config.execution.session_label == ["pre"]


def test_bad_label_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(_args(tmp_path, "--participant-label", "sub-0_1"))
    assert "not a BIDS label" in capsys.readouterr().err


def test_method_choices_come_from_the_registry(tmp_path):
    parser = build_parser()
    for stage in registry.STAGES:
        action = next(a for a in parser._actions if a.dest == stage)
        assert sorted(action.choices) == registry.names(stage)
        assert DEFAULT_METHODS[stage] in action.choices
    config = parse_args(_args(tmp_path, "--inversion", "tkd", "--bf-removal", "vsharp"))
    assert config.workflow.inversion == "tkd" and config.workflow.unwrapping == "romeo"
    assert config.workflow.echo_combination == "romeo"
    config = parse_args(_args(tmp_path, "--echo-combination", "nonlinear"))
    assert config.workflow.echo_combination == "nonlinear"
    with pytest.raises(SystemExit):
        parse_args(_args(tmp_path, "--inversion", "no-such-method"))


def test_pipelines_name_registered_methods_and_tfi_is_the_default():
    assert set(PIPELINE_DESCRIPTIONS) == set(PIPELINES)
    for methods in PIPELINES.values():
        assert all(method in registry.names(stage) for stage, method in methods.items())
    assert PIPELINES["tfi"] == {"bf_removal": "none", "inversion": "tfi"}
    assert all(DEFAULT_METHODS[s] == m for s, m in PIPELINES["tfi"].items())
    # the former default and the classical chain stay one flag away
    assert PIPELINES["nextqsm"] == {"bf_removal": "nextqsm", "inversion": "nextqsm"}
    assert PIPELINES["classical"] == {"bf_removal": "pdf", "inversion": "ilsqr"}


def test_pipeline_sets_its_stages_and_keeps_the_other_defaults(tmp_path):
    wf = parse_args(_args(tmp_path, "--pipeline", "classical")).workflow
    assert (wf.bf_removal, wf.inversion, wf.pipeline) == ("pdf", "ilsqr", "classical")
    assert all(wf.method(s) == DEFAULT_METHODS[s] for s in registry.STAGES
               if s not in ("bf_removal", "inversion"))
    wf = parse_args(_args(tmp_path, "--pipeline", "ir2qsm")).workflow
    assert (wf.bf_removal, wf.inversion) == ("vsharp", "ir2qsm")
    assert parse_args(_args(tmp_path)).workflow.pipeline == ""


def test_an_inversion_that_needs_a_local_field_gets_one_by_default(tmp_path):
    # the default passes the total field on (for TFI): --inversion tv alone means PDF + TV
    wf = parse_args(_args(tmp_path, "--inversion", "tv")).workflow
    assert (wf.bf_removal, wf.inversion) == (LOCAL_FIELD_BF_REMOVAL, "tv") == ("pdf", "tv")
    wf = parse_args(_args(tmp_path, "--pipeline", "tfi", "--inversion", "tkd")).workflow
    assert (wf.bf_removal, wf.inversion) == ("pdf", "tkd")
    # a background removal given on the command line is kept (check_methods refuses it later)
    wf = parse_args(_args(tmp_path, "--bf-removal", "none", "--inversion", "tv")).workflow
    assert (wf.bf_removal, wf.inversion) == ("none", "tv")
    wf = parse_args(_args(tmp_path, "--bf-removal", "vsharp")).workflow
    assert (wf.bf_removal, wf.inversion) == ("vsharp", "tfi")


def test_stage_option_overrides_the_pipeline(tmp_path):
    wf = parse_args(_args(tmp_path, "--inversion", "tv", "--pipeline", "classical")).workflow
    assert (wf.bf_removal, wf.inversion, wf.pipeline) == ("pdf", "tv", "classical")


def test_unknown_pipeline_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(_args(tmp_path, "--pipeline", "fastest"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "invalid choice: 'fastest'" in err and "nextqsm" in err


def test_help_lists_the_pipelines(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a description
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--pipeline {" + ",".join(PIPELINES) + "}" in out
    for name, description in PIPELINE_DESCRIPTIONS.items():
        assert f"{name} (" in out and description in out
    assert "tfi (--bf-removal none, --inversion tfi) = the stage defaults" in out
    assert "nextqsm (--bf-removal nextqsm, --inversion nextqsm):" in out


def test_pipeline_in_config_file_and_its_precedence(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text('[workflow]\npipeline = "nextqsm"\ninversion = "tkd"\n')
    wf = parse_args(_args(tmp_path, "--config-file", str(toml))).workflow
    assert (wf.pipeline, wf.bf_removal, wf.inversion) == ("nextqsm", "nextqsm", "tkd")
    wf = parse_args(_args(tmp_path, "--config-file", str(toml), "--pipeline", "ir2qsm")).workflow
    assert (wf.pipeline, wf.bf_removal, wf.inversion) == ("ir2qsm", "vsharp", "ir2qsm")
    saved = parse_args(_args(tmp_path, "--pipeline", "nextqsm", "--inversion", "tv"))
    assert Config.from_toml(saved.to_toml(tmp_path / "saved.toml")) == saved
    toml.write_text('[workflow]\npipeline = "fastest"\n')
    with pytest.raises(ValueError, match="Unknown pipeline 'fastest'"):
        Config.from_toml(toml)


def test_defaults_and_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = parse_args(["bids", "out", "group"])
    ex = config.execution
    assert ex.bids_dir == str(tmp_path / "bids") and ex.output_dir == str(tmp_path / "out")
    assert ex.work_dir == str(tmp_path / "work") and ex.analysis_level == "group"
    assert (ex.device, ex.skip_bids_validation, ex.output_intermediates) == ("auto", False, False)
    assert config.nipype.plugin == "MultiProc"


def test_config_toml_round_trip(tmp_path):
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"acquisition": "fast"}))
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: LegacyMultiProc\nplugin_args:\n  n_procs: 3\n")
    config = parse_args(_args(
        tmp_path, "--participant-label", "01", "--bids-filter-file", str(filters),
        "--use-plugin", str(plugin), "--nprocs", "4", "--omp-nthreads", "2", "--mem", "6.5",
        "--device", "cpu", "--inversion", "tkd", "--output-intermediates", "-vv",
        "--stop-on-first-crash", "-w", str(tmp_path / "w"),
    ))
    config.workflow.params = {"inversion": {"threshold": 0.2}}
    path = config.to_toml(tmp_path / "cfg" / "qsmprep.toml")
    again = Config.from_toml(path)
    assert again == config
    assert again.execution.bids_filters == {"acquisition": "fast"}
    assert again.nipype.plugin_settings() == {
        "plugin": "LegacyMultiProc",
        "plugin_args": {"n_procs": 3, "memory_gb": 6.5, "raise_insufficient": False},
    }
    assert again.nipype.resolved() == (4, 2)


def test_config_file_supplies_defaults_and_command_line_wins(tmp_path):
    base = parse_args(_args(tmp_path, "--inversion", "tkd", "--nprocs", "3",
                            "--participant-label", "07"))
    base.workflow.params = {"bf_removal": {"max_radius_mm": 6.0}}
    toml = base.to_toml(tmp_path / "base.toml")
    config = parse_args(_args(tmp_path, "--config-file", str(toml), "--nprocs", "5"))
    assert config.workflow.inversion == "tkd"
    assert config.workflow.params == {"bf_removal": {"max_radius_mm": 6.0}}
    assert config.execution.participant_label == ["07"]
    assert config.nipype.nprocs == 5


@pytest.mark.parametrize("value, expected", [('"-1"', "-1"), ("-1", "-1"), ("1", "1"),
                                             ('"auto"', "auto")])
def test_phase_sign_in_config_file_is_checked_and_normalised(tmp_path, value, expected):
    """A settings file may write the sign as a number; it is stored as the option's text."""
    toml = tmp_path / "c.toml"
    toml.write_text(f"[workflow]\nphase_sign = {value}\n")
    assert parse_args(_args(tmp_path, "--config-file", str(toml))).workflow.phase_sign \
        == expected


def test_bad_phase_sign_in_config_file_is_a_one_line_error(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[workflow]\nphase_sign = "negative"\n')
    with pytest.raises(SystemExit) as err:
        parse_args(_args(tmp_path, "--config-file", str(toml)))
    assert str(err.value) == (f"qsmprep: error: --config-file {toml} sets phase_sign = "
                              "'negative'; choose auto, 1 or -1")


def test_unknown_config_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[workflow]\ninvertion = 'tkd'\n")
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['invertion'\]"):
        Config.from_toml(bad)


def test_input_error_exits_nonzero_with_one_line(tmp_path, capsys, synthetic_bids):
    code = main(_args(tmp_path, "--participant-label", "42", "-w", str(tmp_path / "w")))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("qsmprep: error: No subject matches --participant-label 42")
    assert not (tmp_path / "out").exists()


def test_output_inside_dataset_refused_before_any_write(tmp_path, capsys, synthetic_bids):
    code = main([str(synthetic_bids), str(synthetic_bids / "qsm"), "participant",
                 "-w", str(tmp_path / "w")])
    assert code == 1 and "inside the input dataset" in capsys.readouterr().err
    assert not (synthetic_bids / "qsm").exists()


def test_boilerplate_only_writes_citations_and_settings(tmp_path, synthetic_bids):
    out = tmp_path / "out"
    code = main([str(synthetic_bids), str(out), "participant", "-w", str(tmp_path / "w"),
                 "--boilerplate-only", "--device", "cpu", "--inversion", "tkd"])
    assert code == 0
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "thresholded k-space division" in citation.lower()
    assert "@shmueli2009tkd" in citation and "Shmueli et al. (2009)" in citation
    assert "@article{shmueli2009tkd," in (out / "logs" / "CITATION.bib").read_text()
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "qsmprep"
    (toml,) = (out / "sub-01" / "log").glob("*/qsmprep.toml")
    saved = Config.from_toml(toml)
    assert saved.workflow.inversion == "tkd" and saved.execution.device == "cpu"
    assert list((tmp_path / "w").glob("config-*.toml"))
    assert not (out / "sub-01" / "anat").exists()


def test_methods_text_of_a_pipeline_describes_the_methods_used(tmp_path, synthetic_bids):
    out = tmp_path / "out"
    assert main([str(synthetic_bids), str(out), "participant", "-w", str(tmp_path / "w"),
                 "--boilerplate-only", "--device", "cpu", "--pipeline", "nextqsm",
                 "--inversion", "tv"]) == 0
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "NeXtQSM background-removal U-Net" in citation
    assert "total-variation" in citation and "variational network" not in citation
    # a conference paper's reference names its proceedings (was an empty "**")
    assert "*Medical Image Computing and Computer-Assisted Intervention (MICCAI 2015)*" in citation
    assert "**" not in citation
    # BibTeX dashes become typographic ones (the NeXtQSM title has "---")
    assert "NeXtQSM—A complete deep learning pipeline" in citation and "---" not in citation
    (toml,) = (out / "sub-01" / "log").glob("*/qsmprep.toml")
    assert 'pipeline = "nextqsm"' in toml.read_text()


def test_dl_precision_set_in_the_config_file_reaches_the_methods_text(tmp_path,
                                                                      synthetic_bids):
    toml = tmp_path / "p.toml"
    toml.write_text('[workflow]\npipeline = "nextqsm"\n\n'
                    '[workflow.params.inversion]\nprecision = "bf16"\n')
    out = tmp_path / "out"
    assert main([str(synthetic_bids), str(out), "participant", "-w", str(tmp_path / "w"),
                 "--boilerplate-only", "--device", "cpu", "--config-file", str(toml)]) == 0
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "(device: cpu, precision: fp32)" in citation  # background removal: the default
    assert "(device: cpu, precision: bf16)" in citation  # inversion: as configured


def test_group_level_without_outputs_fails_clearly(tmp_path, capsys):
    (tmp_path / "bids").mkdir()
    assert main(_args(tmp_path)[:2] + ["group"]) == 1
    assert "run the participant level first" in capsys.readouterr().err


def test_mask_and_derivatives_options_round_trip_through_toml(tmp_path, capsys):
    mask = tmp_path / "mask.nii.gz"
    mask.write_bytes(b"")
    (tmp_path / "qsm1").mkdir()
    (tmp_path / "other").mkdir()
    config = parse_args(_args(tmp_path, "--mask", str(mask)))
    assert config.execution.mask_file == str(mask) and config.execution.derivatives == {}
    config = parse_args(_args(tmp_path, "--derivatives", f"masks={tmp_path / 'qsm1'}",
                              str(tmp_path / "other"), "--derivatives",
                              f"third={tmp_path}"))
    assert config.execution.derivatives == {"masks": str(tmp_path / "qsm1"),
                                            "other": str(tmp_path / "other"),
                                            "third": str(tmp_path)}
    config.execution.mask_file = str(mask)
    again = Config.from_toml(config.to_toml(tmp_path / "c.toml"))
    assert again == config and again.execution.derivatives["masks"] == str(tmp_path / "qsm1")
    assert parse_args(_args(tmp_path, "--config-file", str(tmp_path / "c.toml"))
                      ).execution.mask_file == str(mask)
    for bad, why in ((f"raw={tmp_path}", "names the input dataset"),
                     (f"x={tmp_path / 'missing'}", "folder not found")):
        with pytest.raises(SystemExit):
            parse_args(_args(tmp_path, "--derivatives", bad))
        assert why in capsys.readouterr().err
    with pytest.raises(SystemExit, match="names must differ"):
        parse_args(_args(tmp_path, "--derivatives", f"a={tmp_path}", f"a={tmp_path / 'qsm1'}"))
    with pytest.raises(SystemExit):
        parse_args(_args(tmp_path, "--mask", str(tmp_path / "nope.nii.gz")))
    assert "File not found" in capsys.readouterr().err


def test_mask_on_another_grid_stops_before_any_work(tmp_path, capsys, synthetic_bids):
    import nibabel as nb
    import numpy as np

    mask = tmp_path / "t1_mask.nii.gz"
    nb.Nifti1Image(np.ones((20, 20, 20), np.uint8), np.eye(4)).to_filename(mask)
    code = main([str(synthetic_bids), str(tmp_path / "out"), "participant",
                 "-w", str(tmp_path / "w"), "--mask", str(mask)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1  # (the synthetic run is a thin slab: a warning comes first)
    assert err[-1].startswith(f"qsmprep: error: The brain mask {mask} is not on the voxel grid")
    assert "antsApplyTransforms" in err[-1]
    assert not list((tmp_path / "w").glob("config-*.toml")) and not (tmp_path / "out").exists()
