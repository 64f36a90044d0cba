"""BIDS derivatives of qsmprep: per-run files, dataset description, citations.

Per run (see docs/outputs.md)::

    sub-<s>[_ses-<s>][_acq-<a>][_rec-<r>][_run-<n>]_Chimap.nii.gz          chi, ppm
    ..._desc-brain_mask.nii.gz                                           mask of the Chimap
    ..._label-CSF_desc-ventricles_mask.nii.gz                            the CSF core found
    ..._fieldmap.nii.gz                                                  B0, Hz
    ..._desc-local_fieldmap.nii.gz                                       local field, ppm
    ..._part-phase_desc-unwrapped_MEGRE.nii.gz  (--output-intermediates) rad
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from ..__about__ import __url__, __version__
from ..interfaces.bids import STAGING, DerivativesDataSink
from ..reports.citations import cited_bib, cited_keys, format_reference, parse_bib
from ..utils.files import write_text

#: files and folders of the output directory that are not BIDS
BIDSIGNORE = ("logs/", "group/", "*.html", "sub-*/log/", "sub-*/figures/", f"{STAGING}/")


def init_qsm_derivatives_wf(config, run, *, methods, name="ds_qsm_wf"):
    """Write the results of one run into the output folder.

    ``methods`` maps each stage to :func:`qsmprep.workflows.qsm.method_record`.
    Inputs (``inputnode``): ``chi`` (ppm), ``mask``, ``fieldmap`` (Hz),
    ``local_field`` (ppm), ``interpretation`` (how the input was read, from
    :func:`qsmprep.workflows.qsm.merge_interpretation`: added to the sidecars
    of the Chimap and the field maps), ``inversion_warnings`` and ``chi_warnings``
    (what the inversion and the referencing step warned about, e.g. TFI's lambda
    outside its range or a fall-back to another reference region: the Chimap
    sidecar's ``InversionWarnings`` and ``ReferencingWarnings`` when there are
    any), ``reference_values`` (the Chimap's whole-brain mean and ventricular CSF
    median: its ``ReferenceValues``), ``csf`` (the run's ventricular CSF core,
    empty where none was found) and, when connected, ``unwrapped`` (rad).
    """
    wf = Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(["chi", "mask", "fieldmap", "local_field", "unwrapped",
                               "interpretation", "inversion_warnings", "chi_warnings",
                               "reference_values", "csf"]),
        name="inputnode",
    )
    bids_dir = Path(config.execution.bids_dir)
    common = {
        "Sources": [bids_uri(p, bids_dir) for p in run.sources],
        # nominal, as in the input sidecar; the value used is MagneticFieldStrengthUsed
        "MagneticFieldStrength": run.nominal_field_strength_t or run.field_strength_t,
        "EchoTime": list(run.sorted_echo_times_s),
        "B0Direction": list(run.b0_dir),
    }
    chi_meta = {
        **common,
        "Units": "ppm",
        "Description": "Magnetic susceptibility relative to the mean of the reference "
        "region, in ppm",
        "QSMMethods": methods,
        "SoftwareName": "qsmprep",
        "SoftwareVersion": __version__,
    }
    outputs = {
        # name: (input field, entities, sidecar)
        "chimap": ("chi", {"suffix": "Chimap"}, chi_meta),
        "mask": ("mask", {"suffix": "mask", "desc": "brain"},
                 {"Type": "Brain", "Description": "Voxels where the local field and the "
                  "Chimap are defined", "Sources": common["Sources"]}),
        "csf": ("csf", {"suffix": "mask", "label": "CSF", "desc": "ventricles"},
                {"Type": "CSF", "Description": "The ventricular CSF core found in the "
                 "magnitude (the brightest deep voxels of the last echo, with CSF's R2*, two "
                 "voxels in from their edge): the voxels of the Chimap sidecar's "
                 "ReferenceValues.VentricularCSFMedian, of --referencing csf and of total "
                 "field inversion's CSF term. Empty where none was found "
                 "(ReferenceValues.VentricularCSFNote says why)",
                 "Sources": common["Sources"]}),
        "fieldmap": ("fieldmap", {"suffix": "fieldmap"},
                     {**common, "Units": "Hz", "Description": "B0 field map (echo "
                      "combination of the unwrapped phase)"}),
        "local_field": ("local_field", {"suffix": "fieldmap", "desc": "local"},
                        {**common, "Units": "ppm", "Description": _local_field_description(
                            config.workflow),
                         "BackgroundFieldRemoval": methods["bf_removal"]}),
    }
    if config.execution.output_intermediates:
        outputs["unwrapped"] = (
            "unwrapped", {"suffix": run.suffix, "part": "phase", "desc": "unwrapped"},
            {**common, "Units": "rad", "Description": "Unwrapped phase of every echo, "
             "echoes in order of EchoTime", "PhaseUnwrapping": methods["unwrapping"]},
        )
    for key, (field, entities, meta) in outputs.items():
        dismiss = ["echo"] + ([] if "part" in entities else ["part"])
        sink = pe.Node(
            DerivativesDataSink(
                base_directory=config.execution.output_dir,
                source_file=run.phase[0],
                dismiss_entities=dismiss,
                compress=True,
                check_hdr=False,
                meta_dict=meta,
                **entities,
            ),
            name=f"ds_{key}",
            run_without_submitting=True,
        )
        wf.connect(inputnode, field, sink, "in_file")
        if key not in ("mask", "csf"):  # the maps from the phase carry its interpretation
            merge = pe.Node(niu.Function(function=_merge_meta,
                                         input_names=["meta", "extra", "warnings",
                                                      "inversion_warnings",
                                                      "reference_values"],
                                         output_names=["meta"]), name=f"meta_{key}",
                            run_without_submitting=True)
            merge.inputs.meta = meta
            wf.connect([(inputnode, merge, [("interpretation", "extra")]),
                        (merge, sink, [("meta", "meta_dict")])])
            if key == "chimap":
                wf.connect([(inputnode, merge, [("chi_warnings", "warnings"),
                                                ("inversion_warnings", "inversion_warnings"),
                                                ("reference_values", "reference_values")])])
    return wf


def _local_field_description(workflow):
    """The local field sidecar's Description: how the background was removed."""
    from ..qsm import registry

    if registry.passes_total_field(workflow.bf_removal):
        return ("Local field: the total field less the field of the background sources "
                f"that the inversion ({workflow.inversion}) fitted; no separate background "
                "field removal. Near the mask's edge (the outer band whose field the fit "
                "gave no weight, edge_mm, 3 mm by default) it keeps the unreliable edge "
                "phase: do not invert it with another method (TV on it gave 264 % NRMSE "
                "on the independent 1.5 mm head, docs/outputs.md)")
    return "Local field after background field removal"


def _merge_meta(meta, extra, warnings=None, inversion_warnings=None, reference_values=None):
    """``meta`` updated with ``extra`` (the input interpretation) and, when
    there are any, the inversion's and the referencing step's warnings
    (``InversionWarnings``, ``ReferencingWarnings``) and the map's values over
    the reference regions (``ReferenceValues``)."""
    out = {**meta, **(extra or {})}
    if reference_values:
        out["ReferenceValues"] = dict(reference_values)
    if inversion_warnings:
        out["InversionWarnings"] = list(inversion_warnings)
    if warnings:
        out["ReferencingWarnings"] = list(warnings)
    return out


def bids_uri(path, bids_dir):
    """``bids:raw:<relative path>`` for a file of the input dataset."""
    return f"bids:raw:{Path(path).absolute().relative_to(Path(bids_dir).absolute()).as_posix()}"


def write_derivatives_description(bids_dir, output_dir, derivatives=None):
    """``dataset_description.json`` and ``.bidsignore`` of the output folder.

    ``derivatives`` (``{name: path}``, from ``--derivatives``) are added to
    ``DatasetLinks`` so that ``bids:<name>:...`` URIs in sidecars resolve."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    source = {}
    src_desc = Path(bids_dir) / "dataset_description.json"
    if src_desc.is_file():
        source = json.loads(src_desc.read_text())
    source_dataset = {"URL": Path(bids_dir).absolute().as_uri()}
    if source.get("DatasetDOI"):
        source_dataset["DOI"] = source["DatasetDOI"]
    desc = {
        "Name": "qsmprep outputs",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "qsmprep", "Version": __version__, "CodeURL": __url__}],
        "SourceDatasets": [source_dataset],
        "DatasetLinks": {"raw": Path(bids_dir).absolute().as_uri(),
                         **{name: Path(path).absolute().as_uri()
                            for name, path in (derivatives or {}).items()}},
        "HowToAcknowledge": "Please cite the methods listed in logs/CITATION.md.",
    }
    write_text(output_dir / "dataset_description.json", json.dumps(desc, indent=2) + "\n")
    write_text(output_dir / ".bidsignore", "\n".join(BIDSIGNORE) + "\n")


def write_citations(boilerplate, output_dir):
    """``logs/CITATION.md`` (methods text + references) and ``logs/CITATION.bib``.

    ``boilerplate`` is markdown citing works as ``[@key]``; the references are
    taken from the package's ``data/boilerplate.bib``.
    """
    logs = Path(output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    entries = parse_bib((resources.files("qsmprep") / "data" / "boilerplate.bib").read_text())
    keys = cited_keys(boilerplate)
    refs = [f"- {format_reference(entries[k], markdown=True)}" if k in entries else f"- {k}"
            for k in keys]
    text = boilerplate.strip() + "\n\n### References\n\n" + "\n".join(refs) + "\n"
    write_text(logs / "CITATION.md", text)
    write_text(logs / "CITATION.bib", cited_bib(keys, entries))
    return logs / "CITATION.md"
