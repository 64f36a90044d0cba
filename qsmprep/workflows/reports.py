"""Reportlets of one run, written into ``out/sub-<label>/figures/``.

The per-subject HTML (``out/sub-<label>.html``) is assembled from these files
by :func:`qsmprep.reports.core.generate_report` once the workflow has run.
"""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from ..interfaces.bids import DerivativesDataSink
from ..interfaces.reports import QSMReportlet, RunSummary
from ..qsm import registry
from ..qsm.units import b0_angle_deg, voxel_size_from_affine

#: reportlet kind -> inputnode fields feeding it (in_file, extra inputs)
REPORTLETS = {
    "magnitude": ("magnitude", {"mask_file": "mask"}),
    "phase": ("unwrapped", {"wrapped_file": "phase", "mask_file": "mask"}),
    "quality": ("quality", {"mask_file": "mask"}),
    "fieldmap": ("fieldmap", {"mask_file": "mask"}),
    "localfield": ("local_field", {"mask_file": "mask"}),
    "chi": ("chi", {"mask_file": "mask", "csf_file": "csf"}),
}


def init_qsm_reports_wf(config, run, *, methods, name="qsm_reports_wf"):
    """Draw the run's reportlets and its summary into the figures folder.

    ::

        inputnode ─┬─ magnitude ───────────────► QSMReportlet(magnitude) ─► ds_report_magnitude
                   ├─ phase, unwrapped ────────► QSMReportlet(phase) ─────► ds_report_phase
                   ├─ quality (ROMEO only) ────► QSMReportlet(quality) ───► ds_report_quality
                   ├─ fieldmap / local_field / chi ► QSMReportlet(...) ───► ds_report_...
                   ├─ csf (the ventricular CSF core, outlined on chi)
                   └─ mask (contours, windows, slice range of every reportlet)
        RunSummary(info) ─► ds_report_summary

    Parameters
    ----------
    config : :class:`qsmprep.config.Config`
    run : :class:`qsmprep.bids.runs.QSMRun`
    methods : dict
        stage -> method name, as chosen for this run.
    """
    wf = Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        ["magnitude", "phase", "unwrapped", "quality", "mask", "fieldmap", "local_field",
         "chi", "csf", "interpretation"]), name="inputnode")
    kinds = dict(REPORTLETS)
    if "quality" not in registry.get("unwrapping", methods["unwrapping"]).provides:
        kinds.pop("quality")

    def sink(desc, extension):
        return pe.Node(
            DerivativesDataSink(
                base_directory=config.execution.output_dir, source_file=run.phase[0],
                datatype="figures", desc=desc, suffix=run.suffix, extension=extension,
                dismiss_entities=["echo", "part"],
            ),
            name=f"ds_report_{desc}", run_without_submitting=True,
        )

    for kind, (in_field, extra) in kinds.items():
        draw = pe.Node(QSMReportlet(kind=kind), name=f"report_{kind}")
        wf.connect(inputnode, in_field, draw, "in_file")
        for trait, field in extra.items():
            wf.connect(inputnode, field, draw, trait)
        ds = sink(kind, ".svg")
        wf.connect(draw, "out_report", ds, "in_file")

    summary = pe.Node(RunSummary(info=run_summary(config, run, methods)), name="summary")
    wf.connect(inputnode, "interpretation", summary, "interpretation")
    wf.connect(summary, "out_report", sink("summary", ".json"), "in_file")
    return wf


def run_summary(config, run, methods):
    """The acquisition and processing summary of one run, for the report."""
    import nibabel as nb

    img = nb.load(run.phase[0])
    entities = run.entity_dict
    summary = {
        "subject": run.subject,
        "session": entities.get("session"),
        "acquisition": entities.get("acquisition"),
        "reconstruction": entities.get("reconstruction"),
        "run": entities.get("run"),
        "echo_times_s": list(run.sorted_echo_times_s),
        "field_strength_t": run.field_strength_t,
        "voxel_size_mm": list(voxel_size_from_affine(img.affine)),
        "matrix": list(img.shape[:3]),
        "b0_angle_deg": round(b0_angle_deg(run.b0_dir), 2),
        "phase_units": run.phase_units or "inferred from the range",
        "methods": dict(methods),
        "device": config.execution.device,
    }
    return {key: value for key, value in summary.items() if value is not None}
