"""Building the Nipype graph of a run and its methods boilerplate."""

from __future__ import annotations

import logging

from ..workflows.base import init_qsmprep_wf
from ..workflows.outputs import write_citations
from ..workflows.qsm import PIPELINE_STAGES

LOGGER = logging.getLogger("qsmprep")


def build_workflow(config, data):
    """The Nipype workflow for ``data`` (``{subject: [QSMRun, ...]}``)."""
    n_runs = sum(len(runs) for runs in data.values())
    LOGGER.info(
        "Building the workflow: %d subject(s), %d run(s); methods: %s",
        len(data), n_runs,
        ", ".join(f"{s}={config.workflow.method(s)}" for s in PIPELINE_STAGES),
    )
    return init_qsmprep_wf(config, data)


def write_boilerplate(workflow, output_dir):
    """``logs/CITATION.md`` and ``.bib`` from the workflow descriptions."""
    path = write_citations(workflow.visit_desc(), output_dir)
    LOGGER.info("Methods boilerplate written to %s", path)
    return path
