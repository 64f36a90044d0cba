"""Top-level workflows: all subjects, and one subject."""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path

from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from ..__about__ import __version__
from .qsm import init_qsm_wf, qsm_wf_name, safe_name

#: name of the top-level workflow (its folder in the work directory)
TOP_WF_NAME = "qsmprep_wf"


def init_qsmprep_wf(config, data):
    """One :func:`init_single_subject_wf` per subject of ``data``
    (``{subject: [QSMRun, ...]}`` from :func:`qsmprep.bids.discover.collect_data`).

    Crash files of each subject go to ``<output_dir>/sub-<label>/log/<run-uuid>/``.
    """
    wf = Workflow(name=TOP_WF_NAME)
    wf.base_dir = config.execution.work_dir
    for subject, runs in data.items():
        single = init_single_subject_wf(config, subject, runs)
        single.config["execution"]["crashdump_dir"] = str(config.execution.log_dir(subject))
        for node in iter_nodes(single):
            node.config = deepcopy(single.config)
        wf.add_nodes([single])
    return wf


def init_single_subject_wf(config, subject, runs):
    """One :func:`~qsmprep.workflows.qsm.init_qsm_wf` per run of a subject."""
    wf = Workflow(name=subject_wf_name(subject))
    wf.__desc__ = f"""
Results included in this manuscript come from processing performed using
*qsmprep* {__version__}, which is based on *Nipype*
[@gorgolewski2011nipype] and reads the input with *PyBIDS*
[@yarkoni2019pybids] from a dataset organised according to the Brain
Imaging Data Structure [@gorgolewski2016bids].
"""
    for run in runs:
        wf.add_nodes([init_qsm_wf(config, run)])
    return wf


def subject_wf_name(subject):
    """Name of the :func:`init_single_subject_wf` of ``subject`` (e.g. ``sub_01_wf``)."""
    return f"sub_{safe_name(subject)}_wf"


def run_work_dir(work_dir, subject, run):
    """Folder of ``run``'s :func:`~qsmprep.workflows.qsm.init_qsm_wf` in the work
    directory: ``<work_dir>/qsmprep_wf/sub_<s>_wf/qsm_<run>_wf``."""
    return Path(work_dir) / TOP_WF_NAME / subject_wf_name(subject) / qsm_wf_name(run)


def iter_nodes(workflow):
    """Every node of ``workflow``, nested workflows' included (not the
    workflows themselves), through Nipype's public ``list_node_names`` and
    ``get_node``."""
    for name in workflow.list_node_names():
        yield workflow.get_node(name)
