"""Template registration and deep grey matter regions (qsmprep.regions, init_regions_wf).

The subjects are the packaged Challenge 2.0 head deformed by a known affine +
smooth warp (qsmprep.sim.deform) with their own GRE contrast, bias field and
noise; the labels are known, so the warped atlas is scored by Dice. The
registration runs with the ``fast`` preset on a 2 mm grid to stay quick.
"""

from __future__ import annotations

import csv
import json
import socket

import nibabel as nb
import numpy as np
import pytest

from qsmprep.config import Config
from qsmprep.regions.make_atlas import DEEP_GM
from qsmprep.regions.stats import dice, region_stats, robust_z
from qsmprep.regions.templates import (
    TemplateNotFoundError,
    embedded_atlas,
    find_template,
    parse_space,
)
from qsmprep.sim.deform import deformed_head, random_transform
from qsmprep.sim.phantoms import chi_reference

BIG = ("caudate", "putamen", "thalamus")
#: the tests on ``registered_run`` share one real ANTs registration (fast preset, 2 mm,
#: ~35 s of CPU in all): marked slow, as it may pass 30 s on a busy 2-core machine
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def registered_run(tmp_path_factory):
    """init_regions_wf run for real (Nipype, ANTs) on a deformed 2 mm head."""
    from qsmprep.workflows.regions import init_regions_wf

    tmp = tmp_path_factory.mktemp("regions")
    head = deformed_head(2.0, random_transform(np.random.default_rng(7)), rng=7)
    bids = tmp / "bids" / "sub-01" / "anat"
    bids.mkdir(parents=True)
    phase = bids / "sub-01_part-phase_MEGRE.nii.gz"
    mag_file, chi_file, mask_file = tmp / "mag.nii.gz", tmp / "chi.nii.gz", tmp / "mask.nii.gz"
    nb.save(nb.Nifti1Image(np.zeros(head.labels.shape, np.float32), head.affine), phase)
    nb.save(nb.Nifti1Image(np.stack([head.magnitude, 0.8 * head.magnitude], -1),
                           head.affine), mag_file)
    nb.save(nb.Nifti1Image(head.chi_ppm, head.affine), chi_file)
    nb.save(nb.Nifti1Image(head.brain.astype(np.uint8), head.affine), mask_file)

    config = Config()
    config.execution.output_dir = str(tmp / "out")
    config.workflow.regions = True
    config.workflow.output_spaces = ["native", "QSMChallenge"]
    config.workflow.registration = "fast"
    config.nipype.omp_nthreads = 2

    class Run:  # the only attribute init_regions_wf reads of a QSMRun
        pass

    run = Run()
    run.phase = [str(phase)]
    run.suffix = "MEGRE"
    wf = init_regions_wf(config, run, referencing="mean")
    wf.base_dir = str(tmp / "work")
    wf.inputs.inputnode.magnitude = str(mag_file)
    wf.inputs.inputnode.chi = str(chi_file)
    wf.inputs.inputnode.mask = str(mask_file)
    wf.run(plugin="Linear")
    return head, tmp / "out" / "sub-01" / "anat"


@slow
def test_warped_atlas_reaches_dice_targets_on_a_deformed_head(registered_run):
    head, anat = registered_run
    labels = np.asanyarray(nb.load(anat / "sub-01_desc-regions_dseg.nii.gz").dataobj)
    assert labels.shape == head.labels.shape
    for value, (name, _) in DEEP_GM.items():
        score = dice(labels == value, (head.labels == value) & head.brain)
        assert score >= (0.75 if name in BIG else 0.5), (name, score)


@slow
def test_regional_means_match_the_truth_where_the_map_is_exact(registered_run):
    head, anat = registered_run
    with open(anat / "sub-01_desc-regions_stats.tsv") as f:
        rows = {r["region"]: r for r in csv.DictReader(f, delimiter="\t")}
    assert list(rows) == [n for n, _ in DEEP_GM.values()]
    truth = chi_reference()
    for value, (name, _) in DEEP_GM.items():
        if name in BIG:
            assert abs(float(rows[name]["mean_ppm"]) - truth[value]) < 0.01, name
        assert int(rows[name]["voxels"]) > 0
        assert float(rows[name]["p5_ppm"]) <= float(rows[name]["median_ppm"]) \
            <= float(rows[name]["p95_ppm"])
    meta = json.loads((anat / "sub-01_desc-regions_stats.json").read_text())
    assert meta["ReferenceRegion"].startswith("whole brain")
    lut = (anat / "sub-01_desc-regions_dseg.tsv").read_text().splitlines()
    assert lut[0] == "index\tname\tabbreviation" and len(lut) == 8


@slow
def test_transforms_and_template_space_chimap_are_written(registered_run):
    head, anat = registered_run
    for name in ("sub-01_from-GRE_to-QSMChallenge_mode-image_xfm.h5",
                 "sub-01_from-QSMChallenge_to-GRE_mode-image_xfm.h5"):
        assert (anat / name).stat().st_size > 1000
    chi_tpl = nb.load(anat / "sub-01_space-QSMChallenge_Chimap.nii.gz")
    tpl_labels = np.asanyarray(nb.load(embedded_atlas()["dseg"]).dataobj)
    assert chi_tpl.shape == tpl_labels.shape
    chi = np.asanyarray(chi_tpl.dataobj)
    truth = chi_reference()
    # chi warped into the template lands on the template's own nuclei
    for value, (name, _) in DEEP_GM.items():
        if name in BIG:
            assert abs(np.median(chi[tpl_labels == value]) - truth[value]) < 0.01, name


def test_region_stats_against_hand_computed_values():
    chi = np.array([[[0.1, 0.2, 0.3, 0.4, 9.0, np.nan]]])
    labels = np.array([[[1, 1, 1, 1, 1, 1]]])
    mask = np.array([[[1, 1, 1, 1, 0, 1]]], bool)
    (row, empty) = region_stats(chi, labels, {1: "a", 2: "b"}, mask=mask)
    assert row["voxels"] == 4 and row["mean_ppm"] == pytest.approx(0.25)
    assert row["median_ppm"] == pytest.approx(0.25)
    assert row["std_ppm"] == pytest.approx(np.std([0.1, 0.2, 0.3, 0.4]))
    assert row["p5_ppm"] == pytest.approx(0.115) and row["p95_ppm"] == pytest.approx(0.385)
    assert empty["voxels"] == 0 and np.isnan(empty["mean_ppm"])
    with pytest.raises(ValueError, match="differ in shape"):
        region_stats(chi, labels[..., :3], {1: "a"})


def test_robust_z_flags_only_the_outlier():
    values = np.r_[np.linspace(0.09, 0.11, 20), 0.3]
    z = robust_z(values)
    assert np.abs(z[:-1]).max() < 3.5 < z[-1]


def test_output_space_syntax():
    assert str(parse_space("MNI152NLin2009cAsym:res-2")) == "MNI152NLin2009cAsym:res-2"
    assert parse_space("native").is_native
    for bad in ("MNI:foo-1", "native:res-2", "bad name", ""):
        with pytest.raises(ValueError):
            parse_space(bad)


def test_templateflow_templates_are_found_on_disk_and_never_downloaded(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path))
    with pytest.raises(TemplateNotFoundError, match="never downloads"):
        find_template("MNI152NLin2009cAsym")
    folder = tmp_path / "tpl-MNI152NLin2009cAsym"
    folder.mkdir()
    # a DataLad pointer (an unfetched file) is not a template
    (folder / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz").write_text("annex pointer")
    with pytest.raises(TemplateNotFoundError):
        find_template("MNI152NLin2009cAsym:res-1")
    img = nb.Nifti1Image(np.random.default_rng(0).random((12, 12, 12)).astype(np.float32),
                         np.eye(4))
    nb.save(img, folder / "tpl-MNI152NLin2009cAsym_res-02_T1w.nii.gz")
    nb.save(img, folder / "tpl-MNI152NLin2009cAsym_res-02_desc-brain_T1w.nii.gz")
    found = find_template("MNI152NLin2009cAsym:res-2")
    assert found.name == "tpl-MNI152NLin2009cAsym_res-02_T1w.nii.gz"
    assert find_template("QSMChallenge") == embedded_atlas()["template"]


def test_missing_template_is_an_input_error_before_any_work(tmp_path, monkeypatch):
    from qsmprep.bids import QSMPrepInputError
    from qsmprep.workflows.regions import check_templates

    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path))
    config = Config()
    config.workflow.output_spaces = ["native", "MNI152NLin2009cAsym:res-1"]
    with pytest.raises(QSMPrepInputError, match="TEMPLATEFLOW_HOME"):
        check_templates(config)
    config.workflow.output_spaces = ["native"]
    config.workflow.registration = "slowest"
    with pytest.raises(QSMPrepInputError, match="registration preset"):
        check_templates(config)


def test_embedded_atlas_is_small_and_labels_every_deep_nucleus():
    atlas = embedded_atlas()
    assert sum(p.stat().st_size for p in atlas.values()) < 3 * 2**20
    labels = np.asanyarray(nb.load(atlas["dseg"]).dataobj)
    template = nb.load(atlas["template"])
    assert labels.shape == template.shape
    assert set(np.unique(labels)) == {0, *DEEP_GM}
    mag = np.asanyarray(template.dataobj, dtype=float)
    # GRE-like contrast: iron-rich pallidum darker than the caudate (shorter T2*)
    assert mag[labels == 2].mean() < mag[labels == 1].mean()


def test_qsm_workflow_gets_regions_and_template_spaces_only_when_asked(tmp_path):
    from conftest import write_gre

    from qsmprep.cli.parser import parse_args
    from qsmprep.bids.discover import collect_data
    from qsmprep.workflows.base import init_qsmprep_wf

    bids = tmp_path / "bids"
    write_gre(bids, "01")
    data = collect_data(bids, validate=False)
    base = [str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work")]
    plain = init_qsmprep_wf(parse_args(base), data)
    assert not any("regions_wf" in n for n in plain.list_node_names())

    config = parse_args(base + ["--regions", "--output-spaces", "native", "QSMChallenge",
                                "QSMChallenge"])
    assert config.workflow.output_spaces == ["native", "QSMChallenge"]
    names = set(init_qsmprep_wf(config, data).list_node_names())
    run = "sub_01_wf.qsm_MEGRE_wf.regions_wf"
    for node in ("gre_reference", "register_QSMChallenge", "labels_to_native", "region_stats",
                 "ds_regions_stats", "ds_regions_dseg", "ds_regions_lut",
                 "ds_xfm_QSMChallenge_forward_xfm", "ds_xfm_QSMChallenge_inverse_xfm",
                 "chi_to_QSMChallenge", "ds_chimap_QSMChallenge"):
        assert f"{run}.{node}" in names, node
    # one registration serves both the regions and the QSMChallenge output space
    assert sum("register_" in n for n in names) == 1

    with pytest.raises(SystemExit):
        parse_args(base + ["--output-spaces", "MNI152NLin2009cAsym:foo-2"])


@slow
def test_registration_and_regions_reportlets_are_drawn(registered_run):
    head, anat = registered_run
    figures = anat.parent / "figures"
    for kind, colours in (("registration", ("#ffd700", "#00e5ff")),
                          ("regions", ("#1f77b4", "#2ca02c", "#17becf"))):
        svg = (figures / f"sub-01_desc-{kind}_MEGRE.svg").read_text()
        assert svg.lstrip().startswith(("<?xml", "<svg"))
        for colour in colours:  # the overlay contours are drawn, in their colours
            assert colour in svg, (kind, colour)


def test_find_t1w_prefers_the_same_session(tmp_path):
    from qsmprep.workflows.regions import find_t1w

    for rel in ("sub-01/ses-1/anat/sub-01_ses-1_acq-mp2rage_T1w.nii.gz",
                "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
                "sub-01/ses-1/anat/sub-01_ses-1_T1map.nii.gz",
                "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert find_t1w(tmp_path, "01", "1").name == "sub-01_ses-1_T1w.nii.gz"
    assert find_t1w(tmp_path, "01", "2").name == "sub-01_ses-2_T1w.nii.gz"
    assert find_t1w(tmp_path, "01", "3") is None
    assert find_t1w(tmp_path, "02") is None


@slow
def test_registration_through_the_t1w_composes_into_one_transform(tmp_path):
    """GRE -> T1w (rigid) -> a T1w template: one .h5 each way, labels land on the GRE."""
    from qsmprep.regions.registration import apply_transform, register_via_intermediate
    from qsmprep.sim.deform import IDENTITY, T1W_CONTRAST

    rng = np.random.default_rng(11)
    anatomy = random_transform(rng)
    t1w = deformed_head(3.0, anatomy, rng=1, contrast=T1W_CONTRAST, bias=0.05)
    moved = dict(anatomy, shift_mm=anatomy["shift_mm"] + np.array([5.0, -4.0, 3.0]))
    gre = deformed_head(3.0, moved, rng=2)  # same head, moved between the scans
    template = deformed_head(3.0, IDENTITY, rng=3, contrast=T1W_CONTRAST, bias=0, noise=0)
    files = {}
    for name, img in (("t1w", t1w.magnitude), ("gre", gre.magnitude),
                      ("tpl", template.magnitude), ("labels", template.labels)):
        files[name] = tmp_path / f"{name}.nii.gz"
        affine = {"t1w": t1w.affine, "gre": gre.affine}.get(name, template.affine)
        nb.save(nb.Nifti1Image(img.astype(np.float32), affine), files[name])
    fwd, inv = register_via_intermediate(files["gre"], files["t1w"], files["tpl"],
                                         tmp_path / "fwd.h5", tmp_path / "inv.h5",
                                         preset="fast", threads=2)
    labels = np.rint(apply_transform(files["labels"], files["gre"], inv, None,
                                     interpolation="label").numpy())
    for value, (name, _) in DEEP_GM.items():
        if name in BIG:
            assert dice(labels == value, gre.labels == value) >= 0.75, name
    # the forward transform brings GRE-space images (here its true labels) onto the template
    nb.save(nb.Nifti1Image(gre.labels, gre.affine), tmp_path / "gre_labels.nii.gz")
    warped = np.rint(apply_transform(tmp_path / "gre_labels.nii.gz", files["tpl"], fwd, None,
                                     interpolation="label").numpy())
    for value, (name, _) in DEEP_GM.items():
        if name in BIG:
            assert dice(warped == value, template.labels == value) >= 0.75, name


def test_no_code_path_can_call_the_templateflow_client():
    """templateflow.api.get downloads missing files: qsmprep must find templates on disk
    only (qsmprep.regions.templates), so no module calls the client, and only the outputs'
    sink imports it, to stand in for its template list while niworkflows is imported."""
    import ast
    import re
    from pathlib import Path

    import qsmprep

    def client_calls(text):
        """Calls of ``<templateflow | tf | tf_api | api>.<function>(...)`` in the code
        (not in strings: error messages tell the user how to fetch a template)."""
        return [node.func.attr for node in ast.walk(ast.parse(text))
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("get", "ls", "templates", "get_metadata",
                                       "get_citations")
                and (isinstance(node.func.value, ast.Name)
                     and node.func.value.id in ("templateflow", "tf", "tf_api", "api")
                     or isinstance(node.func.value, ast.Attribute)
                     and node.func.value.attr == "api")]

    root = Path(qsmprep.__file__).parent
    uses = re.compile(r"^\s*(from\s+templateflow|import\s+templateflow)", re.M)
    sources = {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*.py")}
    assert [name for name, text in sources.items() if uses.search(text)] == [
        "interfaces/bids.py"]
    assert not {name: found for name, text in sources.items() if (found := client_calls(text))}
    assert client_calls("x = tf_api.get('MNI')\ny = tf.api.ls('MNI')") == ["get", "ls"]


def test_templateflow_space_goes_through_the_t1w_to_the_t1w_template(tmp_path, monkeypatch):
    from conftest import write_gre

    from qsmprep.cli.parser import parse_args
    from qsmprep.bids.discover import collect_data
    from qsmprep.workflows.base import init_qsmprep_wf

    home = tmp_path / "tf" / "tpl-MNI152NLin2009cAsym"
    home.mkdir(parents=True)
    img = nb.Nifti1Image(np.random.default_rng(0).random((12, 12, 12)).astype(np.float32),
                         np.eye(4))
    for suffix in ("T1w", "T2w"):
        nb.save(img, home / f"tpl-MNI152NLin2009cAsym_res-02_{suffix}.nii.gz")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "tf"))
    bids = tmp_path / "bids"
    write_gre(bids, "01")
    write_gre(bids, "02")
    nb.save(img, bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    config = parse_args([str(bids), str(tmp_path / "out"), "participant", "-w",
                         str(tmp_path / "work"), "--output-spaces", "MNI152NLin2009cAsym:res-2",
                         "--skip-bids-validation"])
    wf = init_qsmprep_wf(config, collect_data(bids, validate=False))
    regs = {s: wf.get_node(f"sub_{s}_wf.qsm_MEGRE_wf.regions_wf.register_MNI152NLin2009cAsym")
            for s in ("01", "02")}
    assert regs["01"].inputs.intermediate.endswith("sub-01_T1w.nii.gz")
    assert regs["01"].inputs.template.endswith("_T1w.nii.gz")
    assert not isinstance(regs["02"].inputs.intermediate, str)  # no T1w: from the GRE
    assert regs["02"].inputs.template.endswith("_T2w.nii.gz")
    assert "T1-weighted" in wf.get_node("sub_01_wf.qsm_MEGRE_wf.regions_wf").__desc__


@pytest.mark.parametrize("out_name", ["grid.nii", "grid.nii.gz"])
def test_template_on_grid_copy_is_readable_whatever_the_extension(tmp_path, out_name):
    """A template already as fine as the run is copied, not resampled; copied
    byte for byte under a ``.nii`` name, a gzipped template is a file ITK cannot
    read (antsRegistration then fails with "Fixed Image has not been set")."""
    import ants

    from qsmprep.regions.registration import template_on_grid

    data = np.random.default_rng(0).random((9, 8, 7)).astype(np.float32)
    template = tmp_path / "tpl.nii.gz"
    nb.save(nb.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), template)
    out = template_on_grid(template, 1.0, tmp_path / out_name)
    np.testing.assert_array_equal(ants.image_read(str(out)).numpy(), data)


@pytest.mark.parametrize("env", [{"TEMPLATEFLOW_HOME": "tf-home"}, {"XDG_CACHE_HOME": "xdg"}, {}])
def test_templateflow_home_is_where_templateflow_looks(tmp_path, monkeypatch, env):
    from templateflow.conf.env import get_templateflow_home

    from qsmprep.regions.templates import templateflow_home

    monkeypatch.delenv("TEMPLATEFLOW_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(tmp_path / value))
    assert templateflow_home() == get_templateflow_home()
    if env:
        assert str(templateflow_home()).startswith(str(tmp_path))
