"""TemplateFlow atlases as the regions atlas (--regions-atlas; qsmprep.regions.atlases).

A small TemplateFlow tree is written into a temporary ``TEMPLATEFLOW_HOME``:
``tpl-MNI152NLin2009cAsym`` with a 4 mm template image and a MASSP20-like
``atlas-MASSP20`` dseg at 2 mm, both made from the embedded QSMChallenge atlas
(its nuclei split into MASSP's left/right labels and subdivisions, with
MASSP's indices and names), the lookup table at the folder's top, as
TemplateFlow stores it, and a 0-byte res-01 placeholder like an unfetched file.
The end-to-end test runs init_regions_wf for real (Nipype, ANTs ``fast``
preset) on a deformed 4 mm head, a few seconds.
"""

from __future__ import annotations

import csv
import json
import socket

import nibabel as nb
import numpy as np
import pytest

from qsmprep.config import Config
from qsmprep.regions.atlases import (
    AtlasNotFoundError,
    find_atlas,
    merge_regions,
    parse_atlas,
    region_for,
    remap_labels,
)
from qsmprep.regions.make_atlas import DEEP_GM
from qsmprep.regions.stats import dice
from qsmprep.regions.templates import embedded_atlas

TPL = "MNI152NLin2009cAsym"
#: MASSP20's lookup table (TemplateFlow), the rows the test atlas uses and a few more
MASSP_ROWS = [(1, "left-caudate"), (2, "right-caudate"), (3, "left-subthalamic-nuclei"),
              (4, "right-subthalamic-nuclei"), (5, "left-substantia-nigra"),
              (6, "right-substantia-nigra"), (7, "left-red-nucleus"), (8, "right-red-nucleus"),
              (9, "left-globus-pallidus-interna"), (10, "right-globus-pallidus-interna"),
              (11, "left-globus-pallidus-externa"), (12, "right-globus-pallidus-externa"),
              (13, "left-thalamus"), (14, "right-thalamus"), (15, "left-lateral-ventricle"),
              (17, "third-ventricle"), (38, "left-putamen"), (39, "right-putamen"),
              (46, "left-dentate-gyrus"), (47, "right-dentate-gyrus")]
#: qsmprep region -> the MASSP labels of the test atlas (left, right[, second subdivision])
MERGED = {"caudate": (1, 2), "substantia_nigra_stn": (3, 4, 5, 6), "red_nucleus": (7, 8),
          "globus_pallidus": (9, 10, 11, 12), "thalamus": (13, 14), "putamen": (38, 39)}
BIG = ("caudate", "putamen", "thalamus")
#: regions the test atlas splits into two subdivisions as well as two hemispheres
MERGED_SUBDIVISIONS = ("globus_pallidus", "substantia_nigra_stn")


def _massp_like(labels, affine):
    """The embedded labels (index = DEEP_GM) as MASSP20 labels: left (world x < 0) and
    right; the pallidum split into interna (medial half) and externa, SN+STN into the
    STN (upper half) and SN; the dentate voxels named with MASSP's hippocampal
    "dentate-gyrus" label, which must not be taken for the dentate nucleus."""
    ijk = np.indices(labels.shape).reshape(3, -1)
    x, _, z = (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape((3,) + labels.shape)
    left = x < 0
    out = np.zeros(labels.shape, np.uint8)
    ours = {name: k for k, (name, _) in DEEP_GM.items()}

    def put(region, first, labels_first, labels_second=(0, 0)):
        """``region``'s voxels where ``first`` get ``labels_first`` (left, right), the
        others ``labels_second``."""
        sel = labels == ours[region]
        for part, (lab_left, lab_right) in ((first, labels_first), (~first, labels_second)):
            out[sel & part & left] = lab_left
            out[sel & part & ~left] = lab_right

    every = np.ones(labels.shape, bool)
    put("caudate", every, (1, 2))
    put("red_nucleus", every, (7, 8))
    put("thalamus", every, (13, 14))
    put("putamen", every, (38, 39))
    put("dentate_nucleus", every, (46, 47))
    gp = labels == ours["globus_pallidus"]
    put("globus_pallidus", np.abs(x) < np.median(np.abs(x[gp])), (9, 10), (11, 12))
    sn = labels == ours["substantia_nigra_stn"]
    put("substantia_nigra_stn", z > np.median(z[sn]), (3, 4), (5, 6))
    return out


@pytest.fixture(scope="module")
def templateflow_home(tmp_path_factory):
    """A TemplateFlow tree with a small MNI152NLin2009cAsym and a MASSP20-like atlas."""
    import ants

    home = tmp_path_factory.mktemp("templateflow")
    folder = home / f"tpl-{TPL}"
    folder.mkdir()
    atlas = embedded_atlas()
    template = ants.resample_image(ants.image_read(str(atlas["template"])), (4.0,) * 3,
                                   use_voxels=False, interp_type=0)
    ants.image_write(template, str(folder / f"tpl-{TPL}_res-04_T2w.nii.gz"))
    dseg = ants.resample_image(ants.image_read(str(atlas["dseg"])), (2.0,) * 3,
                               use_voxels=False, interp_type=1)
    ants.image_write(dseg, str(home / "dseg.nii.gz"))
    img = nb.load(home / "dseg.nii.gz")
    labels = np.rint(np.asanyarray(img.dataobj)).astype(np.uint8)
    nb.save(nb.Nifti1Image(_massp_like(labels, img.affine), img.affine),
            folder / f"tpl-{TPL}_res-02_atlas-MASSP20_dseg.nii.gz")
    (home / "dseg.nii.gz").unlink()
    (folder / f"tpl-{TPL}_res-01_atlas-MASSP20_dseg.nii.gz").write_bytes(b"")  # unfetched
    (folder / f"tpl-{TPL}_atlas-MASSP20_dseg.tsv").write_text(
        "index\tname\n" + "".join(f"{i}\t{n}\n" for i, n in MASSP_ROWS))
    return home


def test_atlas_labels_take_qsmprep_region_names_where_they_are_the_same_structure():
    massp = {"left-caudate": "caudate", "right-putamen": "putamen",
             "left-globus-pallidus-externa": "globus_pallidus",
             "right-globus-pallidus-interna": "globus_pallidus",
             "left-substantia-nigra": "substantia_nigra_stn",
             "right-subthalamic-nuclei": "substantia_nigra_stn",
             "left-red-nucleus": "red_nucleus", "right-thalamus": "thalamus",
             # not the cerebellar dentate nucleus, nor a deep grey nucleus of ours
             "left-dentate-gyrus": None, "right-nucleus-accumbens": None,
             "left-lateral-habenula": None, "third-ventricle": None}
    cit168 = {"Pu": "putamen", "Ca": "caudate", "GPe": "globus_pallidus",
              "SNc": "substantia_nigra_stn", "STN": "substantia_nigra_stn",
              "RN": "red_nucleus", "NAC": None, "VTA": None}
    aseg = {"Left-Thalamus-Proper": "thalamus", "Right-Pallidum": "globus_pallidus",
            "Left-Hippocampus": None}
    for table in (massp, cit168, aseg):
        for name, region in table.items():
            assert region_for(name) == region, name


def test_merged_regions_keep_the_embedded_indices_and_every_other_label():
    regions, mapping = merge_regions(MASSP_ROWS)
    names = [name for _, name, _ in regions]
    assert names[:6] == ["caudate", "globus_pallidus", "putamen", "red_nucleus",
                         "substantia_nigra_stn", "thalamus"]
    assert names[6:] == ["left-lateral-ventricle", "third-ventricle", "left-dentate-gyrus",
                         "right-dentate-gyrus"]
    ours = {name: k for k, (name, _) in DEEP_GM.items()}
    for index, name, source in regions[:6]:
        assert index == ours[name]
        assert sorted(source) == sorted(n for i, n in MASSP_ROWS if i in MERGED[name])
    assert [i for i, _, _ in regions[6:]] == [8, 9, 10, 11]
    labels = np.array([0, 1, 2, 9, 12, 46, 99])  # 99: not in the lookup table
    assert remap_labels(labels, mapping).tolist() == [0, 1, 1, 2, 2, 10, 0]


def test_atlas_syntax():
    assert parse_atlas("QSMChallenge") == ("QSMChallenge", {})
    assert parse_atlas("MASSP20") == (TPL, {"atlas": "MASSP20"})
    assert parse_atlas(f"{TPL}:atlas-HOSPA:desc-th25:res-2") == (
        TPL, {"atlas": "HOSPA", "desc": "th25", "res": "2"})
    for bad in ("", "MASSP 20", f"{TPL}:res-2", f"{TPL}:atlas-MASSP20:foo-1", "a:atlas-"):
        with pytest.raises(ValueError):
            parse_atlas(bad)


def test_templateflow_atlas_is_found_on_disk_and_never_downloaded(templateflow_home,
                                                                  monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(templateflow_home))
    atlas = find_atlas("MASSP20")  # the res-01 placeholder is passed over
    assert atlas.space == TPL and atlas.dseg.name == f"tpl-{TPL}_res-02_atlas-MASSP20_dseg.nii.gz"
    assert atlas.lut.name == f"tpl-{TPL}_atlas-MASSP20_dseg.tsv"
    assert find_atlas(f"{TPL}:atlas-MASSP20:res-2") == atlas
    with pytest.raises(AtlasNotFoundError, match="only unfetched placeholders"):
        find_atlas(f"{TPL}:atlas-MASSP20:res-1")
    with pytest.raises(AtlasNotFoundError, match=r"never downloads.*api.get\('MNI152NLin2009cAsym"
                       r"', atlas='CIT168'") as err:
        find_atlas("CIT168")
    assert str(templateflow_home / f"tpl-{TPL}") in str(err.value)
    assert "atlases there: MASSP20" in str(err.value)

    # a dseg without its lookup table; two versions (desc) of one atlas
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path))
    folder = tmp_path / f"tpl-{TPL}"
    folder.mkdir()
    img = nb.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4))
    nb.save(img, folder / f"tpl-{TPL}_res-02_atlas-HOSPA_desc-th25_dseg.nii.gz")
    with pytest.raises(AtlasNotFoundError, match="has no lookup table"):
        find_atlas(f"{TPL}:atlas-HOSPA")
    nb.save(img, folder / f"tpl-{TPL}_res-02_atlas-HOSPA_desc-th50_dseg.nii.gz")
    with pytest.raises(AtlasNotFoundError, match="several versions of atlas-HOSPA"):
        find_atlas(f"{TPL}:atlas-HOSPA")
    (folder / f"tpl-{TPL}_atlas-HOSPA_dseg.tsv").write_text("label\tregion\n1\tx\n")
    with pytest.raises(AtlasNotFoundError, match="expected the BIDS columns index and name"):
        find_atlas(f"{TPL}:atlas-HOSPA:desc-th50")
    (folder / f"tpl-{TPL}_atlas-HOSPA_dseg.tsv").write_text("index\tname\n1\tLeft-Putamen\n")
    assert find_atlas(f"{TPL}:atlas-HOSPA:desc-th50").dseg.name.endswith("th50_dseg.nii.gz")
    assert find_atlas("QSMChallenge").dseg == embedded_atlas()["dseg"]


def test_missing_atlas_or_its_template_is_an_input_error_before_any_work(templateflow_home,
                                                                        tmp_path, monkeypatch):
    from qsmprep.bids import QSMPrepInputError
    from qsmprep.workflows.regions import check_templates

    config = Config()
    config.workflow.regions = True
    config.workflow.regions_atlas = "CIT168"
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(templateflow_home))
    with pytest.raises(QSMPrepInputError, match="--regions-atlas cannot be used as given"):
        check_templates(config)
    config.workflow.regions_atlas = "MASSP20"
    check_templates(config)
    # the atlas without its template image
    folder = tmp_path / f"tpl-{TPL}"
    folder.mkdir()
    for path in (templateflow_home / f"tpl-{TPL}").glob("*MASSP20*"):
        (folder / path.name).write_bytes(path.read_bytes())
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path))
    with pytest.raises(QSMPrepInputError, match=f"Template {TPL} not found"):
        check_templates(config)


def test_regions_atlas_option_builds_the_registration_to_its_template(templateflow_home,
                                                                      tmp_path, monkeypatch):
    from conftest import write_gre

    from qsmprep.cli.parser import parse_args
    from qsmprep.bids.discover import collect_data
    from qsmprep.workflows.base import init_qsmprep_wf

    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(templateflow_home))
    bids = tmp_path / "bids"
    write_gre(bids, "01")
    data = collect_data(bids, validate=False)
    base = [str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work")]
    config = parse_args(base + ["--regions-atlas", "MASSP20", "--output-spaces", "native",
                                "QSMChallenge"])
    assert config.workflow.regions and config.workflow.regions_atlas == "MASSP20"
    wf = init_qsmprep_wf(config, data)
    names = set(wf.list_node_names())
    run = "sub_01_wf.qsm_MEGRE_wf.regions_wf"
    for node in ("prepare_atlas", f"register_{TPL}", "register_QSMChallenge",
                 "labels_to_native", "ds_regions_lut", f"ds_xfm_{TPL}_inverse_xfm"):
        assert f"{run}.{node}" in names, node
    desc = wf.get_node(run).__desc__
    assert "MASSP20 atlas [@bazin2020massp]" in desc and "[@ciric2022templateflow]" in desc
    with pytest.raises(SystemExit):
        parse_args(base + ["--regions-atlas", f"{TPL}:res-1"])


@pytest.fixture(scope="module")
def atlas_run(templateflow_home, tmp_path_factory):
    """init_regions_wf with --regions-atlas MASSP20, run for real on a deformed 4 mm head."""
    from qsmprep.sim.deform import deformed_head, random_transform
    from qsmprep.workflows.regions import init_regions_wf

    mp = pytest.MonkeyPatch()
    mp.setenv("TEMPLATEFLOW_HOME", str(templateflow_home))
    tmp = tmp_path_factory.mktemp("atlas_run")
    head = deformed_head(4.0, random_transform(np.random.default_rng(7)), rng=7)
    bids = tmp / "bids" / "sub-01" / "anat"
    bids.mkdir(parents=True)
    phase = bids / "sub-01_part-phase_MEGRE.nii.gz"
    files = {k: tmp / f"{k}.nii.gz" for k in ("mag", "chi", "mask")}
    nb.save(nb.Nifti1Image(np.zeros(head.labels.shape, np.float32), head.affine), phase)
    nb.save(nb.Nifti1Image(head.magnitude, head.affine), files["mag"])
    nb.save(nb.Nifti1Image(head.chi_ppm, head.affine), files["chi"])
    nb.save(nb.Nifti1Image(head.brain.astype(np.uint8), head.affine), files["mask"])

    config = Config()
    config.execution.output_dir = str(tmp / "out")
    config.workflow.regions = True
    config.workflow.regions_atlas = "MASSP20"
    config.workflow.registration = "fast"
    config.nipype.omp_nthreads = 2

    class Run:  # the only attributes init_regions_wf reads of a QSMRun
        suffix = "MEGRE"

    run = Run()
    run.phase = [str(phase)]
    try:
        wf = init_regions_wf(config, run, referencing="mean")
        wf.base_dir = str(tmp / "work")
        wf.inputs.inputnode.magnitude = str(files["mag"])
        wf.inputs.inputnode.chi = str(files["chi"])
        wf.inputs.inputnode.mask = str(files["mask"])
        wf.run(plugin="Linear")
    finally:
        mp.undo()
    return head, tmp / "out" / "sub-01" / "anat"


def test_templateflow_atlas_regions_end_to_end(atlas_run):
    """Registration to the atlas' template, its labels merged into qsmprep's regions on
    the subject: the regions overlap the truth (Dice >= 0.75 for the large nuclei and
    those split in four, where a hemisphere or subdivision left out would cap it near
    0.67; >= 0.5 for the small ones, a few 4 mm voxels), their means are within 0.01
    ppm of the truth where chi is exact, and other structures keep their own names."""
    from qsmprep.sim.phantoms import chi_reference

    head, anat = atlas_run
    with open(anat / "sub-01_desc-regions_stats.tsv") as f:
        rows = {r["region"]: r for r in csv.DictReader(f, delimiter="\t")}
    assert list(rows)[:6] == ["caudate", "globus_pallidus", "putamen", "red_nucleus",
                              "substantia_nigra_stn", "thalamus"]
    assert "dentate_nucleus" not in rows
    labels = np.asanyarray(nb.load(anat / "sub-01_desc-regions_dseg.nii.gz").dataobj)
    truth_chi = chi_reference()
    for value, (name, _) in DEEP_GM.items():
        truth = (head.labels == value) & head.brain
        if name == "dentate_nucleus":  # the test atlas' "dentate-gyrus" labels
            found = np.isin(labels, [int(rows["left-dentate-gyrus"]["label"]),
                                     int(rows["right-dentate-gyrus"]["label"])])
        else:
            assert int(rows[name]["label"]) == value
            found = labels == value
        score = dice(found, truth)
        assert score >= (0.75 if name in BIG + MERGED_SUBDIVISIONS else 0.5), (name, score)
        if name in BIG:
            assert abs(float(rows[name]["mean_ppm"]) - truth_chi[value]) < 0.01, name
    for side in ("left", "right"):
        assert int(rows[f"{side}-dentate-gyrus"]["voxels"]) > 0
    # a label of the lookup table absent from the image: listed, no voxels
    assert rows["third-ventricle"]["voxels"] == "0" and rows["third-ventricle"]["mean_ppm"] == "n/a"

    with open(anat / "sub-01_desc-regions_dseg.tsv") as f:
        lut = {r["name"]: r for r in csv.DictReader(f, delimiter="\t")}
    assert lut["caudate"]["atlas_labels"] == "left-caudate+right-caudate"
    assert lut["globus_pallidus"]["atlas_labels"].count("+") == 3
    meta = json.loads((anat / "sub-01_desc-regions_stats.json").read_text())
    assert meta["Atlas"].startswith(f"MASSP20 in {TPL}")
    for name in (f"sub-01_from-GRE_to-{TPL}_mode-image_xfm.h5",
                 f"sub-01_from-{TPL}_to-GRE_mode-image_xfm.h5"):
        assert (anat / name).stat().st_size > 1000
    assert not list(anat.glob("*QSMChallenge*"))
