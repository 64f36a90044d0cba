"""Top-level workflows: all subjects, and one subject."""

from __future__ import annotations

from copy import deepcopy

from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from ..__about__ import __version__
from .qsm import init_qsm_wf, _safe


def init_qsmprep_wf(config, data):
    """One :func:`init_single_subject_wf` per subject of ``data``
    (``{subject: [QSMRun, ...]}`` from :func:`qsmprep.bids.discover.collect_data`).

    Crash files of each subject go to ``<output_dir>/sub-<label>/log/<run-uuid>/``.
    """
    wf = Workflow(name="qsmprep_wf")
    wf.base_dir = config.execution.work_dir
    for subject, runs in data.items():
        single = init_single_subject_wf(config, subject, runs)
        single.config["execution"]["crashdump_dir"] = str(config.execution.log_dir(subject))
        for node in single._get_all_nodes():
            node.config = deepcopy(single.config)
        wf.add_nodes([single])
    return wf


def init_single_subject_wf(config, subject, runs):
    """One :func:`~qsmprep.workflows.qsm.init_qsm_wf` per run of a subject."""
    wf = Workflow(name=f"sub_{_safe(subject)}_wf")
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
