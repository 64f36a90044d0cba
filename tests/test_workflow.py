"""The Nipype graph, the derivatives sink and the group table (no heavy compute)."""

from __future__ import annotations

import csv
import json

import nibabel as nb
import numpy as np
import pytest
from conftest import write_gre

from qsmprep.config import Config
from qsmprep.interfaces.bids import STAGING, DerivativesDataSink
from qsmprep.bids.discover import collect_data
from qsmprep.regions.templates import templateflow_templates
from qsmprep.workflows.base import init_qsmprep_wf
from qsmprep.workflows.group import write_group_table
from qsmprep.workflows.qsm import method_description, method_record


def _config(tmp_path, bids, **workflow):
    config = Config()
    config.execution.bids_dir = str(bids)
    config.execution.output_dir = str(tmp_path / "out")
    config.execution.work_dir = str(tmp_path / "work")
    config.execution.device = "cpu"
    for key, value in workflow.items():
        setattr(config.workflow, key, value)
    return config


def _qsm_wf(config, bids):
    """The QSM workflow of the one run of subject 01 in ``bids`` (built, not run)."""
    wf = init_qsmprep_wf(config, collect_data(bids, validate=False))
    return wf.get_node("sub_01_wf").get_node("qsm_MEGRE_wf")


def _node_names(wf):
    return {f"qsmprep_wf.{name}" for name in wf.list_node_names()}


def test_one_subject_workflow_per_subject_and_one_qsm_workflow_per_run(tmp_path):
    bids = tmp_path / "bids"
    write_gre(bids, "01", entities="_run-1")
    write_gre(bids, "01", entities="_run-2")
    write_gre(bids, "02", echo_times_s=(0.005,))
    config = _config(tmp_path, bids)
    wf = init_qsmprep_wf(config, collect_data(bids, validate=False))
    names = _node_names(wf)
    for run in ("sub_01_wf.qsm_run_1_wf", "sub_01_wf.qsm_run_2_wf", "sub_02_wf.qsm_MEGRE_wf"):
        for node in ("load", "unwrap", "echo_combine", "total_field", "mask", "bf_removal",
                     "inversion", "referencing", "ds_qsm_wf.ds_chimap", "ds_qsm_wf.ds_mask",
                     "ds_qsm_wf.ds_fieldmap", "ds_qsm_wf.ds_local_field"):
            assert f"qsmprep_wf.{run}.{node}" in names
    # the phase offset needs two echoes; sub-02 has one
    assert "qsmprep_wf.sub_01_wf.qsm_run_1_wf.phase_offset" in names
    assert "qsmprep_wf.sub_02_wf.qsm_MEGRE_wf.phase_offset" not in names
    assert not any("ds_unwrapped" in n for n in names)
    # TFI scales its lambda to N_std's level only where the echo fit could estimate it
    for sub, run, absolute in (("01", "qsm_run_1_wf", True), ("02", "qsm_MEGRE_wf", False)):
        node = wf.get_node(f"sub_{sub}_wf").get_node(run).get_node("inversion")
        assert node.inputs.noise_std_absolute is absolute
    # crash files of each subject go to its own log folder of this run
    for sub in ("01", "02"):
        node = wf.get_node(f"sub_{sub}_wf").get_node("qsm_MEGRE_wf" if sub == "02"
                                                    else "qsm_run_1_wf").get_node("unwrap")
        assert node.config["execution"]["crashdump_dir"] == str(
            tmp_path / "out" / f"sub-{sub}" / "log" / config.execution.run_uuid)


def test_options_change_the_graph(tmp_path, synthetic_bids):
    config = _config(tmp_path, synthetic_bids, phase_offset="none", inversion="tkd")
    config.execution.output_intermediates = True
    config.workflow.params = {"inversion": {"threshold": 0.2}}
    wf = init_qsmprep_wf(config, collect_data(synthetic_bids, validate=False))
    names = _node_names(wf)
    assert not any(n.endswith("phase_offset") for n in names)
    assert any(n.endswith("ds_qsm_wf.ds_unwrapped") for n in names)
    qsm = wf.get_node("sub_01_wf").get_node("qsm_MEGRE_wf")
    inversion = qsm.get_node("inversion")
    assert inversion.inputs.method == "tkd" and inversion.inputs.params == {"threshold": 0.2}
    assert "threshold 0.2" in wf.visit_desc()
    # a two-step chain gets BET's mask unclosed; the default (TFI) gets it closed
    assert qsm.get_node("mask").inputs.params == {}
    default = _qsm_wf(_config(tmp_path, synthetic_bids), synthetic_bids)
    mask = default.get_node("mask")
    assert mask.inputs.method == "bet" and mask.inputs.params == {"close_mm": 4.0}
    assert "radius 4.0 mm" in default.visit_desc()


def test_dl_sidecar_and_methods_text_record_the_device_the_run_used(tmp_path, synthetic_bids):
    config = _config(tmp_path, synthetic_bids, bf_removal="nextqsm", inversion="nextqsm")
    config.workflow.params = {"inversion": {"precision": "bf16"}}
    qsm = _qsm_wf(config, synthetic_bids)
    methods = qsm.get_node("ds_qsm_wf").get_node("ds_chimap").inputs.meta_dict["QSMMethods"]
    assert methods["bf_removal"]["Parameters"]["device"] == "cpu"  # not the default "auto"
    assert methods["inversion"]["Parameters"] == {"device": "cpu", "max_voxels": None,
                                                  "precision": "bf16"}
    assert "device" not in methods["referencing"]["Parameters"]  # takes no device
    assert "(device: cpu, precision: bf16)" in qsm.visit_desc()
    # the nodes get the device as context (so a CUDA out-of-memory can fall back to the CPU)
    assert qsm.get_node("inversion").inputs.params == {"precision": "bf16"}


def test_method_description_and_record_use_parameters_actually_run():
    record = method_record("inversion", "tkd", {"threshold": 0.25})
    assert record["Name"] == "tkd" and record["Parameters"]["threshold"] == 0.25
    assert set(record["Parameters"]) >= {"threshold"}
    text = method_description("inversion", "tkd", {"threshold": 0.25})
    assert "0.25" in text and text.endswith("[@shmueli2009tkd; @wharton2010tkd].")
    assert "{" not in text
    # a method with a caution in the table carries it into the sidecar's record
    assert "Caution" not in record
    laplacian = method_record("unwrapping", "laplacian")
    assert "NRMSE" in laplacian["Caution"] and "--unwrapping romeo" in laplacian["Caution"]


def test_sink_writes_bids_names_and_sidecar_atomically(tmp_path, synthetic_bids):
    source = sorted(synthetic_bids.rglob("*_echo-1_part-phase_MEGRE.nii.gz"))[0]
    data = tmp_path / "chi.nii.gz"
    nb.Nifti1Image(np.ones((12, 10, 8), np.float32), nb.load(source).affine).to_filename(data)
    out = tmp_path / "out"
    cases = {
        "sub-01_Chimap.nii.gz": {"suffix": "Chimap"},
        "sub-01_desc-brain_mask.nii.gz": {"suffix": "mask", "desc": "brain"},
        "sub-01_desc-local_fieldmap.nii.gz": {"suffix": "fieldmap", "desc": "local"},
        "sub-01_part-phase_desc-unwrapped_MEGRE.nii.gz": {"suffix": "MEGRE", "part": "phase",
                                                          "desc": "unwrapped"},
    }
    for expected, entities in cases.items():
        dismiss = ["echo"] + ([] if "part" in entities else ["part"])
        sink = DerivativesDataSink(base_directory=str(out), source_file=str(source),
                                   in_file=str(data), dismiss_entities=dismiss, compress=True,
                                   check_hdr=False, meta_dict={"Units": "ppm"}, **entities)
        result = sink.run()
        assert result.outputs.out_file == str(out / "sub-01" / "anat" / expected)
        meta = json.loads((out / "sub-01" / "anat" / expected.replace(".nii.gz", ".json"))
                          .read_text())
        assert meta["Units"] == "ppm"
        written = nb.load(result.outputs.out_file)
        np.testing.assert_array_equal(written.affine, nb.load(source).affine)
    assert not any((out / STAGING).iterdir())


def test_niworkflows_standard_spaces_are_templateflows_templates(tmp_path):
    # the sink's import reads the template list from the home's folders instead of letting
    # templateflow index every file of it (7 s a process): the list must be templateflow's own
    import niworkflows.interfaces.bids as niworkflows_bids
    import templateflow.api as tf_api

    assert niworkflows_bids.STANDARD_SPACES == tf_api.templates()
    assert "MNI152NLin2009cAsym" in niworkflows_bids.STANDARD_SPACES
    assert "templates" not in vars(tf_api)  # templateflow's function is back
    # what counts as a template: a tpl-<letters and digits> folder with a file not hidden
    for folder, files in {"tpl-A1": ["tpl-A1_T1w.nii.gz"], "tpl-Empty": [],
                          "tpl-B_x": ["a.json"], "tpl-Hid": [".git/config"], "other": ["b"],
                          "tpl-C": ["sub/c.json"]}.items():
        (tmp_path / folder).mkdir()
        for name in files:
            (tmp_path / folder / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / folder / name).write_text("{}")
    (tmp_path / "tpl-Link").mkdir()  # DataLad's links to files not fetched yet
    (tmp_path / "tpl-Link" / "tpl-Link_T1w.nii.gz").symlink_to(tmp_path / "not-fetched")
    assert templateflow_templates(tmp_path) == ["A1", "B", "C", "Link"]


def test_group_table_lists_every_run(tmp_path):
    out = tmp_path / "out"
    for sub, ses, value in (("01", "a", 0.1), ("01", "b", 0.2), ("02", None, -0.05)):
        stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
        anat = out / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        chi = np.full((4, 4, 4), value, np.float32)
        mask = np.zeros((4, 4, 4), np.uint8)
        mask[1:3, 1:3, 1:3] = 1
        chi[~mask.astype(bool)] = 5.0  # outside the mask: must not count
        nb.Nifti1Image(chi, np.eye(4)).to_filename(anat / f"{stem}_Chimap.nii.gz")
        nb.Nifti1Image(mask, np.eye(4)).to_filename(anat / f"{stem}_desc-brain_mask.nii.gz")
        (anat / f"{stem}_Chimap.json").write_text(json.dumps({
            "MagneticFieldStrength": 3, "EchoTime": [0.004, 0.008],
            "QSMMethods": {"inversion": {"Name": "tv", "Parameters": {}},
                           "echo_combination": {"Name": "nonlinear", "Parameters": {}}}}))
    tsv = write_group_table(out)
    with open(tsv) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [(r["subject"], r["session"]) for r in rows] == [("01", "a"), ("01", "b"),
                                                            ("02", "n/a")]
    assert [float(r["chi_mean_ppm"]) for r in rows] == [0.1, 0.2, -0.05]
    assert rows[0]["mask_voxels"] == "8" and rows[0]["n_echoes"] == "2"
    assert rows[2]["inversion"] == "tv" and rows[2]["chimap"] == "sub-02/anat/sub-02_Chimap.nii.gz"
    assert rows[2]["echo_combination"] == "nonlinear" and rows[2]["masking"] == "n/a"


def test_load_echoes_sorts_rescales_and_masks_nonfinite(tmp_path, monkeypatch, caplog):
    from qsmprep.interfaces.qsm import LoadEchoes

    files = write_gre(tmp_path / "bids", echo_times_s=(0.012, 0.004, 0.008))
    img = nb.load(files["phase"][2])
    arbitrary = img.get_fdata(dtype=np.float32) * 1000  # scanner-like integers
    arbitrary[3, 3, 3] = np.nan
    nb.Nifti1Image(arbitrary, img.affine).to_filename(files["phase"][2])
    monkeypatch.chdir(tmp_path)
    result = LoadEchoes(
        magnitude=[str(f) for f in files["mag"]], magnitude_echo_times_s=[0.012, 0.004, 0.008],
        phase=[str(f) for f in files["phase"]], echo_times_s=[0.012, 0.004, 0.008],
        phase_units="arbitrary",
    ).run()
    assert result.outputs.echo_times_s == [0.004, 0.008, 0.012]
    phase = nb.load(result.outputs.phase).get_fdata()
    valid = nb.load(result.outputs.valid).get_fdata() > 0
    assert phase.shape == (12, 10, 8, 3) and np.isfinite(phase).all()
    # x1000 of a wrapped phase: its 2pi wraps show milliradians (divided by 1000)
    assert phase.min() == pytest.approx(np.nanmin(arbitrary) / 1000, abs=1e-5)
    assert phase.max() <= np.pi + 1e-5
    assert not valid[3, 3, 3] and valid.sum() == valid.size - 1
    assert "NaN/Inf" in caplog.text
    # echo of 4 ms (stored second) comes first: the magnitude decays with TE
    mag = nb.load(result.outputs.magnitude).get_fdata()
    inside = mag[..., 0] > 0.5
    assert (mag[inside][:, 0] > mag[inside][:, 1]).all() and (mag[inside][:, 1] > mag[inside][:, 2]).all()


def _run_graph(wf):
    """Run ``wf`` in this process (Linear plugin); its executed nodes by short name."""
    graph = wf.run(plugin="Linear")
    return {node.name: node for node in graph.nodes()}


def test_echo_combination_noise_map_reaches_pdf_and_medi(tmp_path, synthetic_bids, monkeypatch):
    import dataclasses
    import functools

    from qsmprep.qsm import registry

    seen = {}
    for stage, name in (("bf_removal", "pdf"), ("inversion", "medi")):
        method = registry.get(stage, name)

        def spy(*args, _func=method.func, _key=name, **kwargs):
            seen[_key] = kwargs.get("noise_std_ppm")
            return _func(*args, **kwargs)

        functools.update_wrapper(spy, method.func)  # keeps the signature (noise_std_ppm)
        monkeypatch.setitem(registry._REGISTRY[stage], name,
                            dataclasses.replace(method, target=spy))
    config = _config(tmp_path, synthetic_bids, echo_combination="nonlinear", masking="magnitude",
                     bf_removal="pdf", inversion="medi")
    config.workflow.params = {"inversion": {"max_outer": 2, "cg_iter": 10}}
    wf = init_qsmprep_wf(config, collect_data(synthetic_bids, validate=False))
    desc = wf.visit_desc()
    assert "nonlinear fit of the complex multi-echo signal" in desc and "@liu2013nonlinear" in desc
    assert "N_std, converted to ppm, weighted the data term of the background field " \
           "removal (pdf) and the dipole inversion (medi)" in desc
    nodes = _run_graph(wf)
    assert nodes["echo_combine"].result.inputs["method"] == "nonlinear"
    noise_hz = nb.load(nodes["echo_combine"].result.outputs.noise_std).get_fdata()
    noise_ppm = nodes["total_field"].result.outputs.noise_std
    for node in ("bf_removal", "inversion"):
        assert nodes[node].result.inputs["noise_std"] == noise_ppm
    mask = nb.load(nodes["mask"].result.outputs.mask).get_fdata() > 0
    expected = nb.load(noise_ppm).get_fdata(dtype=np.float32)
    np.testing.assert_allclose(expected, noise_hz / (42.57747892 * 3), rtol=1e-5)
    assert (expected[mask] > 0).all()
    for name in ("pdf", "medi"):
        np.testing.assert_array_equal(seen[name], expected)
    sidecar = json.loads(next((tmp_path / "out").rglob("*_Chimap.json")).read_text())
    assert sidecar["QSMMethods"]["echo_combination"]["Name"] == "nonlinear"
    assert sidecar["QSMMethods"]["echo_combination"]["Parameters"]["max_iter"] == 30


def test_default_graph_passes_romeo_noise_map(tmp_path, synthetic_bids):
    qsm = _qsm_wf(_config(tmp_path, synthetic_bids), synthetic_bids)
    assert qsm.get_node("echo_combine").inputs.method == "romeo"
    edges = {(u.name, v.name): d["connect"] for u, v, d in qsm._graph.edges(data=True)}
    assert ("noise_std", "noise_std") in edges[("echo_combine", "total_field")]
    assert ("noise_std", "noise_std") in edges[("total_field", "bf_removal")]
    assert ("noise_std", "noise_std") in edges[("total_field", "inversion")]
    # the default TFI fits the background itself: the local field written and shown is
    # its own, not the total field the background stage passed on
    for sink in ("ds_qsm_wf", "qsm_reports_wf", "outputnode"):
        local = [(u, c) for (u, v), cs in edges.items() if v == sink for c in cs
                 if c[1].endswith("local_field")]
        assert local == [("inversion", ("local_field", local[0][1][1]))], (sink, local)
    desc = qsm.visit_desc()
    assert "magnitude- and echo-time-weighted average" in desc and "N_std" in desc
    assert "weighted the data term" in desc  # the default TFI takes N_std
    # NeXtQSM takes no N_std: its methods text must not claim a weighting
    for chain, weighted in ((dict(bf_removal="nextqsm", inversion="nextqsm"), False),
                            (dict(bf_removal="pdf", inversion="ilsqr"), True)):  # both take N_std
        other = _qsm_wf(_config(tmp_path, synthetic_bids, **chain), synthetic_bids)
        assert ("weighted the data term" in other.visit_desc()) is weighted, chain


def test_the_csf_core_is_found_once_per_run(tmp_path, synthetic_bids):
    """One node finds the run's ventricular CSF core, in bf_removal's mask (the
    mask TFI and the referencing get), and hands it to both: TFI's CSF term,
    ``--referencing csf`` and the Chimap's ReferenceValues use the same voxels,
    searched for once. It searches with ``--referencing csf``'s settings when
    that is the method, so the CSF median of such a map is 0."""
    from qsmprep.interfaces.reference import CSFCore

    qsm = _qsm_wf(_config(tmp_path, synthetic_bids), synthetic_bids)
    searches = [n for n in qsm._graph.nodes
                if isinstance(getattr(n, "interface", None), CSFCore)]
    assert [n.name for n in searches] == ["csf_core"]
    edges = {(u.name, v.name): d["connect"] for u, v, d in qsm._graph.edges(data=True)}
    for step in ("inversion", "referencing"):
        assert edges[("csf_core", step)] == [("csf", "csf"), ("csf_note", "csf_note")]
    assert edges[("bf_removal", "csf_core")] == [("mask", "mask")]
    assert qsm.get_node("csf_core").inputs.params == {}
    config = _config(tmp_path, synthetic_bids, referencing="csf")
    config.workflow.params["referencing"] = {"depth_mm": 8.0, "core_voxels": 1}
    assert _qsm_wf(config, synthetic_bids).get_node("csf_core").inputs.params == {
        "depth_mm": 8.0, "core_voxels": 1}


def test_only_a_quality_mask_waits_for_the_unwrapping(tmp_path, synthetic_bids):
    from qsmprep.qsm import registry

    def qsm_graph(**workflow):
        return _qsm_wf(_config(tmp_path, synthetic_bids, **workflow), synthetic_bids)

    def upstream(qsm, node):
        import networkx as nx

        return {n.name for n in nx.ancestors(qsm._graph, qsm.get_node(node))}

    # BET (the default) and the magnitude mask depend on the loaded images only, so
    # Nipype can run them beside MCPC-3D-S and the unwrapping
    for masking in ("bet", "magnitude"):
        assert not registry.masks_from_quality(masking)
        assert {"unwrap", "phase_offset"}.isdisjoint(upstream(qsm_graph(masking=masking),
                                                              "mask"))
    # the two quality masks get the unwrapping's quality map, and run for real
    qsm = qsm_graph(masking="quality")
    edges = {(u.name, v.name): d["connect"] for u, v, d in qsm._graph.edges(data=True)}
    assert edges[("unwrap", "mask")] == [("quality", "quality")]
    config = _config(tmp_path, synthetic_bids, masking="magnitude+quality", bf_removal="pdf",
                     inversion="tkd")
    nodes = _run_graph(init_qsmprep_wf(config, collect_data(synthetic_bids, validate=False)))
    quality_file = nodes["unwrap"].result.outputs.quality
    assert nodes["mask"].result.inputs["quality"] == quality_file
    load = nodes["load"].result.outputs
    magnitude = nb.load(load.magnitude)
    expected = registry.run(
        "masking", "magnitude+quality",
        np.sqrt((magnitude.get_fdata(dtype=np.float32) ** 2).sum(-1)),
        quality=nb.load(quality_file).get_fdata(dtype=np.float32),
        voxel_size_mm=magnitude.header.get_zooms()[:3])
    expected = np.asarray(expected, bool) & (nb.load(load.valid).get_fdata() > 0)
    written = nb.load(nodes["mask"].result.outputs.mask).get_fdata() > 0
    assert expected.any()
    np.testing.assert_array_equal(written, expected)


def test_user_mask_replaces_the_masking_stage_in_a_real_run(tmp_path, synthetic_bids):
    from qsmprep.cli.run import main

    ref = next(synthetic_bids.rglob("*_echo-1_part-mag_MEGRE.nii.gz"))
    given = np.zeros((12, 10, 8), np.float32)
    given[2:10, 2:8, 2:6] = 0.9  # probabilistic-looking: thresholded at 0.5
    given[2, 2, 2] = 0.2
    mask_file = tmp_path / "my_mask.nii.gz"
    nb.Nifti1Image(given, nb.load(ref).affine).to_filename(mask_file)
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: Linear\n")
    out = tmp_path / "out"
    code = main([str(synthetic_bids), str(out), "participant", "-w", str(tmp_path / "work"),
                 "--mask", str(mask_file), "--bf-removal", "pdf", "--inversion", "tkd",
                 "--device", "cpu", "--use-plugin", str(plugin)])
    assert code == 0
    anat = out / "sub-01" / "anat"
    written = nb.load(anat / "sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    np.testing.assert_array_equal(written, given >= 0.5)
    record = json.loads((anat / "sub-01_Chimap.json").read_text())["QSMMethods"]["masking"]
    assert record["Name"] == "user-supplied" and record["File"] == str(mask_file)
    assert record["Description"] == f"user-supplied mask from {mask_file}"
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "user-supplied mask from `my_mask.nii.gz`" in citation
    summary = json.loads(next((out / "sub-01" / "figures").glob("*desc-summary*.json"))
                         .read_text())
    assert summary["methods"]["masking"] == f"user-supplied mask from {mask_file}"
    (saved,) = (out / "sub-01" / "log").glob("*/qsmprep.toml")
    assert Config.from_toml(saved).execution.mask_file == str(mask_file)
    assert "user-supplied mask" in (out / "sub-01.html").read_text()


def test_every_file_qsmprep_writes_is_written_atomically():
    """Outputs, reports, checkpoints and shipped weights are written under a
    temporary name and renamed (``qsmprep.utils.files.atomic_write``, or the
    sink's staging folder), so a killed run never leaves a half-written file
    where a complete one is expected. A direct write to a final path is a
    regression; ``qsmprep.sim`` (demo and package input data) and logs
    appended line by line (marked ``# log``) are exempt."""
    import re
    from pathlib import Path

    import qsmprep

    write = re.compile(r"\.write_text\(|\.write_bytes\(|\.to_filename\(|torch\.save\(|nib\.save\(|"
                       r"np\.save|open\([^)]*['\"][wa]b?['\"]")
    root = Path(qsmprep.__file__).parent
    direct = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("sim/") or rel == "utils/files.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if write.search(line) and not re.search(r"\btmp\b|\bbuf\b|# log$", line):
                direct.append(f"{rel}:{number}: {line.strip()}")
    assert not direct, "direct writes to final paths:\n" + "\n".join(direct)
