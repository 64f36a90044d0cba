"""qsmprep.execution (how a method runs), the methods text's N_std sentence,
and init_qsm_wf nested in another workflow through its inputnode/outputnode."""

from __future__ import annotations

import json

import nibabel as nb
import numpy as np
import pytest
from conftest import write_gre
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qsmprep.config import Config
from qsmprep.execution import NOISE_STD, Execution, Lazy, passed_keywords
from qsmprep.qsm import registry
from qsmprep.bids.discover import collect_data
from qsmprep.workflows.qsm import (
    INPUT_FIELDS,
    OUTPUT_FIELDS,
    init_qsm_wf,
    noise_weighting_sentence,
)


def _never():
    raise AssertionError("a context value was read for a method that does not take it")


def test_context_is_given_only_to_methods_that_take_it_and_read_only_then():
    ex = Execution(device="cuda", mem_gb=1.0)
    context = {"magnitude": Lazy(_never), NOISE_STD: Lazy(_never)}
    assert ex.context_for("inversion", "tkd", context) == {}  # takes neither nor device
    medi = ex.context_for("inversion", "medi",
                          {"magnitude": Lazy(lambda: "rss"), NOISE_STD: Lazy(lambda: "nstd")})
    assert medi == {"device": "cuda", "magnitude": "rss", NOISE_STD: "nstd"}  # no max_voxels
    assert ex.context_for("inversion", "nextqsm", context) == {"device": "cuda",
                                                              "max_voxels": 2**30 // 1024}
    # two values derived from one lazily read file (TFI takes the magnitude of every
    # echo and their root-sum-of-squares) read it once
    reads = []
    echoes = Lazy(lambda: reads.append(1) or np.ones((2, 2, 2, 3), np.float32))
    rss = Lazy(lambda: np.sqrt(np.sum(echoes.get() ** 2, axis=-1)))
    tfi = ex.context_for("inversion", "tfi", {"magnitude": rss, "magnitude_echoes": echoes})
    assert tfi["magnitude_echoes"].shape == (2, 2, 2, 3) and np.allclose(tfi["magnitude"], 3**0.5)
    assert reads == [1]
    # a parameter the user set wins over the context; None (no --mem) is not passed
    assert Execution().context_for("inversion", "nextqsm", params={"device": "cpu"}) == {}
    # a keyword under a name the execution does not declare (here the old, unit-less one)
    with pytest.raises(ValueError, match=r"Unknown context keyword.*\['noise_std'\]"):
        passed_keywords("inversion", "medi", ["noise_std"])


def test_methods_text_states_the_noise_weighting_exactly_when_it_is_passed():
    weighted = set()
    for stage, other in (("bf_removal", ("inversion", "tkd")), ("inversion", ("bf_removal",
                                                                             "vsharp"))):
        for name in registry.names(stage):
            passed = NOISE_STD in Execution().context_for(stage, name, {NOISE_STD: np.ones(1)})
            sentence = noise_weighting_sentence({stage: name, other[0]: other[1]}, {})
            assert (f"({name})" in sentence) == passed, (stage, name, sentence)
            if passed:
                weighted.add(name)
    # docs/methods.md: "`noise_std_ppm` for PDF/LSQR/iLSQR/MEDI/TFI"; a renamed keyword in one of
    # their signatures would silently drop the weighting (and the sentence) otherwise
    assert weighted == {"pdf", "lsqr", "ilsqr", "medi", "tfi"}


def test_qsm_wf_nests_in_a_parent_through_inputnode_and_outputnode(tmp_path):
    bids = tmp_path / "bids"
    write_gre(bids, shape=(12, 10, 8))
    (run,) = collect_data(bids, validate=False)["01"]
    config = Config()
    config.execution.bids_dir = str(bids)
    config.execution.output_dir = str(tmp_path / "out")
    config.execution.device = "cpu"
    for stage, method in (("unwrapping", "laplacian"), ("echo_combination", "linear"),
                          ("masking", "magnitude"), ("bf_removal", "pdf"),
                          ("inversion", "tkd"), ("referencing", "mean")):
        setattr(config.workflow, stage, method)
    config.workflow.phase_offset = "none"
    config.workflow.params = {"bf_removal": {"max_iter": 5}}
    qsm = init_qsm_wf(config, run)
    assert set(qsm.get_node("inputnode").inputs.copyable_trait_names()) == set(INPUT_FIELDS)
    assert qsm.get_node("inputnode").inputs.echo_times_s == list(run.echo_times_s)

    def copy_phase(phase):  # stands for a conversion step of a parent pipeline
        return list(phase)

    def mean_in_mask(chi, mask):
        import nibabel as nb

        return float(nb.load(chi).get_fdata()[nb.load(mask).get_fdata() > 0].mean())

    parent = pe.Workflow(name="parent_wf", base_dir=str(tmp_path / "work"))
    parent.config["execution"]["crashdump_dir"] = str(tmp_path / "crash")
    convert = pe.Node(niu.Function(function=copy_phase, input_names=["phase"],
                                   output_names=["phase"]), name="convert")
    convert.inputs.phase = [str(p) for p in run.phase]
    stats = pe.Node(niu.Function(function=mean_in_mask, input_names=["chi", "mask"],
                                 output_names=["mean"]), name="stats")
    parent.connect([
        (convert, qsm, [("phase", "inputnode.phase")]),
        (qsm, stats, [("outputnode.chi", "chi"), ("outputnode.mask", "mask")]),
    ])  # fmt: skip
    with pytest.raises(Exception, match="no_such"):  # the fields are checked on connect
        parent.connect(qsm, "outputnode.no_such", stats, "chi")
    assert {f"{qsm.name}.{n}" for n in ("inputnode", "outputnode", "load", "inversion")} <= set(
        parent.list_node_names())
    assert set(qsm.get_node("outputnode").outputs.copyable_trait_names()) == set(OUTPUT_FIELDS)

    nodes = {n.name: n for n in parent.run(plugin="Linear").nodes()}
    # the phase came through the parent's node and the inputnode; chi out of the outputnode
    assert nodes["load"].result.inputs["phase"] == nodes["convert"].result.outputs.phase
    chimap = next((tmp_path / "out").rglob("*_Chimap.nii.gz"))
    brain = next((tmp_path / "out").rglob("*_desc-brain_mask.nii.gz"))
    expected = nb.load(chimap).get_fdata()[nb.load(brain).get_fdata() > 0].mean()
    assert nodes["stats"].result.outputs.mean == pytest.approx(expected, abs=1e-6)
    assert abs(expected) < 1e-4  # mean referencing: zero mean in the mask
    sidecar = json.loads(chimap.with_name(chimap.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["QSMMethods"]["inversion"]["Name"] == "tkd"


def test_run_work_dir_is_the_folder_nipype_gives_the_run(tmp_path):
    from qsmprep.workflows.base import init_qsmprep_wf, iter_nodes, run_work_dir

    bids = tmp_path / "bids"
    write_gre(bids, "01", entities="_run-1")
    config = Config()
    config.execution.bids_dir = str(bids)
    config.execution.output_dir = str(tmp_path / "out")
    config.execution.work_dir = str(tmp_path / "work")
    (run,) = collect_data(bids, validate=False)["01"]
    wf = init_qsmprep_wf(config, {"01": [run]})
    # Nipype puts a node's folder at base_dir / its dotted path
    load = wf.get_node("sub_01_wf.qsm_run_1_wf.load")
    assert load is not None and load in set(iter_nodes(wf))
    assert run_work_dir(config.execution.work_dir, "01", run) == (
        tmp_path / "work" / wf.name / "sub_01_wf" / "qsm_run_1_wf")

