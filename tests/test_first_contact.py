"""What a newcomer meets first: ``--help``, the README's Python snippet, the
message for an unpaired echo, and a failed run that leaves nothing behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import write_gre
from qsmprep.cli.parser import GROUPS, build_parser
from qsmprep.cli.run import main
from qsmprep.config import DEFAULT_METHODS, PIPELINES, Execution, Workflow
from qsmprep.qsm import registry
from qsmprep.qsm.registry import STAGES
from qsmprep.bids import QSMPrepInputError
from qsmprep.bids.discover import collect_data

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------- --help

@pytest.fixture(scope="module")
def help_text():
    return build_parser().format_help()


def test_help_groups_follow_fmriprep(help_text):
    """Every option sits in one of the fMRIPrep-style groups, which appear in order."""
    parser = build_parser()
    titles = [g.title for g in parser._action_groups]
    assert [t for t in titles if t in GROUPS.values()] == list(GROUPS.values())
    for group in parser._action_groups:
        if group.title in ("positional arguments", "options", "optional arguments"):
            flags = [a.option_strings for a in group._group_actions if a.option_strings]
            assert all(f[0] in ("-h", "--version") for f in flags), (
                f"options outside the named groups: {flags}; put them in one of "
                f"{list(GROUPS.values())}")
    positions = [help_text.index(f"\n{title}:") for title in GROUPS.values()]
    assert positions == sorted(positions)


def test_help_shows_every_stage_choice_and_default_from_the_registry(help_text):
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    for stage in STAGES:
        action = actions[stage]
        assert list(action.choices) == registry.names(stage)
        assert f"(default: {DEFAULT_METHODS[stage]}" in action.help
        flag = f"--{stage.replace('_', '-')} {{{','.join(registry.names(stage))}}}"
        assert flag in " ".join(help_text.split()), flag
    # the default background removal passes the total field on: the help says what
    # an inversion that needs a local field gets instead
    assert ("(default: none, the total field to tfi; pdf with an inversion that needs a local "
            "field)") in actions["bf_removal"].help
    assert f"(default: {Workflow().phase_offset})" in actions["phase_offset"].help
    assert f"(default: {Execution().device})" in actions["device"].help
    assert "--pipeline {" + ",".join(PIPELINES) + "}" in help_text


def test_help_has_no_dates(help_text):
    assert not re.search(r"\b(19|20)\d\d-\d\d-\d\d\b", help_text), help_text


# ------------------------------------------------------------ README snippet

def _readme_python_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_snippet_runs_and_says_shapes_and_units():
    """The README's Python API block runs as written and gives the B0 it simulates."""
    blocks = _readme_python_blocks()
    assert len(blocks) == 1
    code = blocks[0]
    assert "echoes on the last axis" in code and "(X, Y, Z, E)" in code
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own README
    shape = scope["b0_true_hz"].shape
    assert scope["phase_rad"].shape == shape + (len(scope["echo_times_s"]),)
    assert scope["unwrapped_rad"].shape == scope["phase_rad"].shape
    assert scope["b0_hz"].shape == scope["quality"].shape == scope["field_ppm"].shape == shape
    # the simulated field wraps (more than half a cycle at the last echo) and comes back
    assert abs(scope["phase_rad"]).max() > 3.0
    assert abs(scope["b0_hz"] - scope["b0_true_hz"]).max() < 0.01
    assert abs(scope["field_ppm"] - scope["b0_true_hz"] / (42.577478 * 3.0)).max() < 1e-4


# --------------------------------------------------------- unpaired echoes

def test_missing_phase_echo_is_named(tmp_path):
    files = write_gre(tmp_path / "bids")  # echoes 0.004, 0.008, 0.012 s
    files["phase"][2].unlink()
    with pytest.raises(QSMPrepInputError) as err:
        collect_data(tmp_path / "bids")
    assert str(err.value).startswith(
        f"echo 3 (0.012 s) has a magnitude but no phase: {files['mag'][2]}")


def test_missing_magnitude_echo_is_named(tmp_path):
    files = write_gre(tmp_path / "bids")
    files["mag"][1].unlink()
    with pytest.raises(QSMPrepInputError) as err:
        collect_data(tmp_path / "bids")
    assert str(err.value).startswith(
        f"echo 2 (0.008 s) has a phase but no magnitude: {files['phase'][1]}")


def test_echo_times_that_differ_name_both_files(tmp_path):
    """Same echoes, but one magnitude sidecar gives another EchoTime: both sides named."""
    files = write_gre(tmp_path / "bids")
    sidecar = Path(str(files["mag"][2]).replace(".nii.gz", ".json"))
    sidecar.write_text(sidecar.read_text().replace("0.012", "0.0125"))
    with pytest.raises(QSMPrepInputError) as err:
        collect_data(tmp_path / "bids")
    msg = str(err.value)
    assert f"echo 3 (0.012 s) has a phase but no magnitude: {files['phase'][2]}" in msg
    assert f"echo 3 (0.0125 s) has a magnitude but no phase: {files['mag'][2]}" in msg


# ---------------------------------------------- a failed run creates nothing

def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_unknown_participant_creates_no_folder(tmp_path, capsys, monkeypatch):
    """The command as a newcomer types it: relative paths, the default ./work."""
    write_gre(tmp_path / "bids")
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    code = main(["bids", "out", "participant", "--participant-label", "02"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1] == ("qsmprep: error: No subject matches --participant-label 02 in "
                       f"{tmp_path / 'bids'}; subjects found: 01")
    assert _tree(tmp_path) == before  # no ./work, no out/, nothing in the dataset


@pytest.mark.parametrize("case", ["output_inside_input", "work_inside_input",
                                  "missing_phase_echo", "no_cuda"])
def test_input_errors_create_nothing(tmp_path, capsys, case):
    bids = tmp_path / "bids"
    files = write_gre(bids)
    out, work = tmp_path / "out", tmp_path / "work"
    extra = []
    if case == "output_inside_input":
        out = bids / "qsm"
    elif case == "work_inside_input":
        work = bids / "work"
    elif case == "missing_phase_echo":
        files["phase"][2].unlink()
    else:
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is visible: --device cuda is valid here")
        extra = ["--device", "cuda"]
    before = _tree(tmp_path)
    code = main([str(bids), str(out), "participant", "-w", str(work), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("qsmprep: error: ")
    assert _tree(tmp_path) == before


def test_warnings_of_the_checks_reach_the_work_folder(tmp_path):
    """Warnings raised while checking the input are held until the folders
    exist, then written to the run's warnings log (which feeds the report):
    here the thin-slab warning of the 12 mm synthetic volume."""
    bids = tmp_path / "bids"
    write_gre(bids)
    work = tmp_path / "work"
    code = main([str(bids), str(tmp_path / "out"), "participant", "-w", str(work),
                 "--boilerplate-only", "--device", "cpu", "--pipeline", "classical"])
    assert code == 0
    logs = list(work.glob("warnings-*.log"))
    assert len(logs) == 1
    assert "is a thin slab" in logs[0].read_text()


@pytest.mark.parametrize("toml, expected", [
    ('[workflow]\ninversion = "foo"\n', "sets inversion = 'foo', which is not a registered "
                                         "method; the choices are: " + ", ".join(
                                             registry.names("inversion"))),
    ('[workflow]\ninvertion = "tkd"\n', "Unknown key(s) ['invertion'] in configuration section"),
    ('[workflow\n', "Expected ']'"),
    ('[workflow]\npipeline = "fast"\n', "Unknown pipeline 'fast'"),
])
def test_a_broken_settings_file_is_a_one_line_error(tmp_path, capsys, toml, expected):
    """Not a traceback (and nothing written): the file, the problem, the choices."""
    from qsmprep.cli.parser import parse_args

    path = tmp_path / "settings.toml"
    path.write_text(toml)
    with pytest.raises(SystemExit) as exit_:
        parse_args([str(tmp_path / "bids"), str(tmp_path / "out"), "participant",
                    "--config-file", str(path)])
    message = str(exit_.value.code)
    assert message.startswith("qsmprep: error: ") and expected in message
    assert "\n" not in message
