"""The QSM workflow of one multi-echo GRE run.

load → unwrap → echo combination (B0 and its noise map N_std, Hz) → total
field (ppm) → mask → background removal → dipole inversion → referencing →
BIDS derivatives. N_std (in ppm after the total-field step) weights the data
term of the background removal and inversion methods that take it (PDF,
LSQR, iLSQR, MEDI): :func:`qsmprep.execution.passed_keywords` decides, both
for the run and for the methods text.
"""

from __future__ import annotations

import inspect

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from ..config import phase_sign_setting
from ..execution import NOISE_STD, passed_keywords
from ..interfaces.qsm import (
    BackgroundRemoval,
    EchoCombine,
    Inversion,
    LoadEchoes,
    Mask,
    PhaseOffset,
    PhaseSign,
    TotalField,
    Unwrap,
)
from ..interfaces.reference import CSFCore, Reference
from ..qsm import registry
from ..qsm.echo import noise_level_known
from ..qsm.reference import csf_search_params
from .outputs import init_qsm_derivatives_wf
from .regions import init_regions_wf, needs_registration
from .reports import init_qsm_reports_wf

#: processing order of the registry stages
PIPELINE_STAGES = ("unwrapping", "echo_combination", "masking", "bf_removal", "inversion",
                   "referencing")
#: stages whose node is given the noise map N_std (ppm) by the graph
NOISE_STD_STAGES = ("bf_removal", "inversion")
#: fields of init_qsm_wf's inputnode: the run's files and echo times, pre-set from the run
INPUT_FIELDS = ("magnitude", "phase", "magnitude_echo_times_s", "echo_times_s")
#: fields of init_qsm_wf's outputnode
OUTPUT_FIELDS = ("chi", "mask", "local_field", "total_field", "noise_std", "fieldmap",
                 "magnitude", "unwrapped", "quality", "echo_times_s", "interpretation")


def safe_name(text):
    """``text`` with every character that is not a letter or digit replaced by
    ``_``: a valid Nipype node name (e.g. ``ses-1_run-2`` -> ``ses_1_run_2``)."""
    return "".join(c if c.isalnum() else "_" for c in text)


def qsm_wf_name(run):
    """Name of the :func:`init_qsm_wf` of ``run`` (e.g. ``qsm_run_1_wf``)."""
    return f"qsm_{safe_name(run.name)}_wf"


def method_record(stage, name, params=None):
    """The method of a stage and every parameter it runs with (defaults
    updated by ``params``), for sidecars and the methods text, with its
    ``Caution`` when the method table gives one (what is known to go wrong
    with it: the sidecar says so beside the map)."""
    method = registry.get(stage, name)
    record = {"Name": name, "Parameters": {**method.defaults, **(params or {})}}
    if method.caution:
        record["Caution"] = method.caution
    return record


def phase_offset_record(params=None):
    """Like :func:`method_record` for the MCPC-3D-S phase-offset step."""
    from ..qsm.unwrap import mcpc3ds

    defaults = {
        k: p.default for k, p in inspect.signature(mcpc3ds).parameters.items()
        if p.kind is p.KEYWORD_ONLY and p.default is not p.empty
    }
    return {"Name": "mcpc3ds", "Parameters": {**defaults, **(params or {})}}


def receives_noise_std(stage, name, params=None):
    """Whether method ``name`` of ``stage`` is given the noise map N_std in this
    graph: its node is connected to N_std (:data:`NOISE_STD_STAGES`) and
    :func:`qsmprep.execution.passed_keywords`, the rule the run applies,
    passes it."""
    return stage in NOISE_STD_STAGES and NOISE_STD in passed_keywords(
        stage, name, (NOISE_STD,), params)


def user_mask_record(source):
    """The ``masking`` record of a run whose brain mask the user gave."""
    return {"Name": "user-supplied", "Parameters": {"threshold": 0.5}, "File": source,
            "Description": f"user-supplied mask from {source}"}


def method_description(stage, name, params=None):
    """The method's sentence for the boilerplate, parameters filled in and
    citations appended as ``[@key]``."""
    method = registry.get(stage, name)
    used = method_record(stage, name, params)["Parameters"]
    text = method.description or f"{stage.replace('_', ' ').capitalize()}: {method.summary}."
    try:
        text = text.format(**used)
    except (KeyError, IndexError, ValueError):
        pass  # a placeholder without a parameter: keep the sentence as written
    if method.citations:
        text = text.rstrip(".") + " [" + "; ".join(f"@{c}" for c in method.citations) + "]."
    return text


def input_interpretation(run):
    """How the input of ``run`` was read, as known before processing (the phase
    scale and sign are added at run time, :func:`merge_interpretation`)."""
    info = {"MagneticFieldStrengthUsed": run.field_strength_t,
            "FieldStrengthSource": run.field_strength_source}
    if run.imaging_frequency_mhz is not None:
        info["ImagingFrequency"] = run.imaging_frequency_mhz
    if run.nominal_field_strength_t is not None:
        info["MagneticFieldStrengthNominal"] = run.nominal_field_strength_t
    info["B0DirectionSource"] = run.b0_dir_source
    info["EchoTimesUsed"] = list(run.sorted_echo_times_s)
    return info


def merge_interpretation(static, phase_scaling, phase_sign):
    """The sidecar fields of the input interpretation: ``static``
    (:func:`input_interpretation`), the phase scaling of the load step and the
    phase sign record of the sign check."""
    names = {"units": "Units", "declared_units": "DeclaredUnits", "convention": "Convention",
             "description": "Description", "stored_range": "StoredRange",
             "rad_per_unit": "RadiansPerUnit", "verified": "VerifiedByWraps",
             "max_jump_periods": "MaxJumpPeriods", "header_scaling": "HeaderScaling"}
    out = dict(static)
    out["PhaseScaling"] = {names.get(k, k): v for k, v in (phase_scaling or {}).items()}
    out.update(phase_sign or {})
    return out


def init_qsm_wf(config, run, *, name=None):
    """Workflow computing the susceptibility map of one :class:`~qsmprep.bids.runs.QSMRun`.

    ::

        inputnode ─► load ─► [phase_offset (MCPC-3D-S)] ─► unwrap ─► echo_combine
                      │                                       │ quality* │ B0, N_std (Hz)
                      └─ magnitude, valid ──────────────────► mask ─► phase_sign ─► total_field
                                                               │                         │
                                                               ▼                         │ ppm
                                                           bf_removal ◄─ field, N_std ───┤
                                                               │ local field, mask       │
                                                               ▼                         │
                                   ds_qsm_wf ◄─ referencing ◄─ inversion ◄─ N_std ───────┘
                            qsm_reports_wf ◄─ every map above (SVG reportlets)
                                outputnode ◄─ chi, mask, fields, N_std, magnitude, ...

    ``csf_core`` (not drawn) finds the run's ventricular CSF core once, in the
    magnitude within bf_removal's mask: inversion (TFI's CSF term) and
    referencing (``--referencing csf``, the Chimap's ``ReferenceValues``) take it.

    ``quality*``: only for a masking method that takes the unwrapping's quality
    map (:func:`~qsmprep.qsm.registry.masks_from_quality`); any other mask runs
    beside the phase steps.

    ``echo_combination`` is a registry stage (romeo | linear | nonlinear); every
    method gives the B0 map and its noise map N_std, which background removal
    and inversion receive and use when their method takes ``noise_std_ppm``.

    Inputs (``inputnode``), pre-set from ``run``; a parent workflow may connect
    them instead (files of the same acquisition: same echoes and grid, since
    the graph, the sidecars and the methods text are built from ``run``):

    ``magnitude``, ``phase``
        lists of NIfTI files (one 3-D file per echo, or one 4-D file);
        ``magnitude`` is empty for a phase-only run, and with
        ``run.complex_parts`` they are the part-real and part-imag files
    ``magnitude_echo_times_s``, ``echo_times_s``
        echo times (s) of the volumes in the order the files stack them

    Outputs (``outputnode``):

    ``chi``
        susceptibility (ppm), referenced, zero outside ``mask`` (the Chimap)
    ``mask``
        brain mask where the local field and ``chi`` are defined
    ``local_field``, ``total_field``
        local and total field, ppm; the local field is the background
        removal's, or the inversion's when the background removal passes the
        total field on (total field inversion: the field less its fitted
        background sources)
    ``noise_std``
        N_std, the noise map of the total field, ppm
    ``fieldmap``
        B0 map (Hz) in qsmprep's phase sign convention
    ``magnitude``, ``unwrapped``
        4-D magnitude and unwrapped phase (rad), echoes sorted by echo time
    ``quality``
        unwrapping quality (0..1), when the method gives one (ROMEO)
    ``echo_times_s``
        sorted echo times, s
    ``interpretation``
        how the input was read (field strength, B0 direction, phase scale and
        sign), as written to the sidecars

    The derivatives (``ds_qsm_wf``), reportlets (``qsm_reports_wf``) and, with
    ``--regions``/template ``--output-spaces``, the regional statistics
    (``regions_wf``) are written inside this workflow.

    Parameters
    ----------
    config : :class:`qsmprep.config.Config`
        the run's settings (methods, parameters, threads, device, outputs)
    run : :class:`qsmprep.bids.runs.QSMRun`
        the checked input files and metadata
    name : str, optional
        workflow name; :func:`qsm_wf_name` of ``run`` by default
    """
    wf = Workflow(name=name or qsm_wf_name(run))
    methods = {s: config.workflow.method(s) for s in PIPELINE_STAGES}
    params = {s: config.workflow.stage_params(s) for s in PIPELINE_STAGES}
    params["masking"] = registry.masking_params(methods["masking"], methods["inversion"],
                                                params["masking"])
    if config.execution.mask_file and not run.mask:
        raise ValueError(
            f"--mask {config.execution.mask_file} is set but run {run.name} has no mask: "
            "pass the data through qsmprep.bids.masks.attach_masks first")
    _, omp = config.nipype.resolved()
    device = config.execution.device
    # parameters as run, for the methods text and the sidecars: with the device the run
    # resolved (the nodes get it as context, so that a CUDA out-of-memory can fall back)
    run_params = {s: {**params[s], "device": device}
                  if "device" in registry.get(s, methods[s]).defaults else params[s]
                  for s in PIPELINE_STAGES}
    wf.__desc__ = _describe(methods, run_params, config.workflow.phase_offset == "mcpc3ds",
                            user_mask=run.mask_source,
                            phase_sign=phase_sign_setting(config.workflow.phase_sign),
                            field_source=run.field_strength_source)
    b0_dir = list(run.b0_dir)

    def stage_node(interface, stage, node_name, heavy=True):
        node = pe.Node(
            interface(method=methods[stage], params=params[stage],
                      num_threads=omp if heavy else 1, device=device,
                      mem_gb=config.nipype.mem_gb),
            name=node_name, n_procs=omp if heavy else 1,
        )
        return node

    inputnode = pe.Node(niu.IdentityInterface(list(INPUT_FIELDS)), name="inputnode")
    inputnode.inputs.magnitude = list(run.magnitude)
    inputnode.inputs.phase = list(run.phase)
    inputnode.inputs.magnitude_echo_times_s = list(run.magnitude_echo_times_s)
    inputnode.inputs.echo_times_s = list(run.echo_times_s)
    outputnode = pe.Node(niu.IdentityInterface(list(OUTPUT_FIELDS)), name="outputnode")
    load = pe.Node(LoadEchoes(phase_units=run.phase_units, complex_parts=run.complex_parts),
                   name="load")
    unwrap = stage_node(Unwrap, "unwrapping", "unwrap")
    combine = pe.Node(EchoCombine(method=methods["echo_combination"],
                                  params=params["echo_combination"]), name="echo_combine")
    sign = pe.Node(PhaseSign(b0_dir=b0_dir,
                             phase_sign=phase_sign_setting(config.workflow.phase_sign),
                             source=str(run.phase[0])), name="phase_sign")
    interpretation = pe.Node(niu.Function(
        function=merge_interpretation, input_names=["static", "phase_scaling", "phase_sign"],
        output_names=["interpretation"]), name="interpretation")
    interpretation.inputs.static = input_interpretation(run)
    total = pe.Node(TotalField(field_strength_t=run.field_strength_t), name="total_field")
    mask = stage_node(Mask, "masking", "mask", heavy=False)
    bfr = stage_node(BackgroundRemoval, "bf_removal", "bf_removal")
    bfr.inputs.b0_dir = b0_dir
    invert = stage_node(Inversion, "inversion", "inversion")
    invert.inputs.b0_dir = b0_dir
    invert.inputs.noise_std_absolute = noise_level_known(methods["echo_combination"],
                                                         len(run.echo_times_s))
    reference = stage_node(Reference, "referencing", "referencing", heavy=False)
    csf_core = pe.Node(CSFCore(params=csf_search_params(methods["referencing"],
                                                        params["referencing"])),
                       name="csf_core")
    reference.inputs.source = str(run.magnitude[0] if run.magnitude else run.phase[0])
    invert.inputs.source = reference.inputs.source
    # the local field written and shown: the background removal's, or, when that
    # passes the total field on, the one the inversion gives (total field inversion)
    local_source = (invert if registry.passes_total_field(methods["bf_removal"])
                    and registry.gives_local_field(methods["inversion"]) else bfr)

    records = {s: method_record(s, methods[s], run_params[s]) for s in methods}
    if run.mask:
        mask.inputs.mask_file = run.mask
        records["masking"] = user_mask_record(run.mask_source)
    correct_offset = config.workflow.phase_offset == "mcpc3ds" and len(run.echo_times_s) > 1
    if correct_offset:
        offset_params = config.workflow.stage_params("phase_offset")
        records["phase_offset"] = phase_offset_record(offset_params)
    outputs = init_qsm_derivatives_wf(config, run, methods=records)

    wf.connect([(inputnode, load, [(f, f) for f in INPUT_FIELDS])])
    if correct_offset:
        offset = pe.Node(PhaseOffset(params=offset_params), name="phase_offset")
        wf.connect([
            (load, offset, [("phase", "phase"), ("magnitude", "magnitude"),
                            ("echo_times_s", "echo_times_s")]),
            (offset, unwrap, [("phase", "phase")]),
        ])  # fmt: skip
    else:
        wf.connect(load, "phase", unwrap, "phase")
    wf.connect([
        (load, unwrap, [("magnitude", "magnitude"), ("valid", "valid"),
                        ("echo_times_s", "echo_times_s")]),
        (load, combine, [("magnitude", "magnitude"), ("echo_times_s", "echo_times_s")]),
        (unwrap, combine, [("unwrapped", "unwrapped")]),
        (combine, sign, [("fieldmap", "fieldmap")]),
        (load, sign, [("magnitude", "magnitude")]),
        (mask, sign, [("mask", "mask")]),
        (sign, total, [("fieldmap", "fieldmap")]),
        (combine, total, [("noise_std", "noise_std")]),
        (load, interpretation, [("phase_scaling", "phase_scaling")]),
        (sign, interpretation, [("record", "phase_sign")]),
        (interpretation, outputs, [("interpretation", "inputnode.interpretation")]),
        (load, mask, [("magnitude", "magnitude"), ("valid", "valid")]),
        (total, bfr, [("total_field", "total_field"), ("noise_std", "noise_std")]),
        (total, invert, [("noise_std", "noise_std")]),
        (mask, bfr, [("mask", "mask")]),
        (bfr, invert, [("local_field", "local_field"), ("mask", "mask")]),
        (invert, reference, [("chi", "chi")]),
        (load, invert, [("magnitude", "magnitude"), ("echo_times_s", "echo_times_s")]),
        (load, reference, [("magnitude", "magnitude"), ("echo_times_s", "echo_times_s")]),
        (load, csf_core, [("magnitude", "magnitude"), ("echo_times_s", "echo_times_s")]),
        (bfr, csf_core, [("mask", "mask")]),
        (csf_core, invert, [("csf", "csf"), ("csf_note", "csf_note")]),
        (csf_core, reference, [("csf", "csf"), ("csf_note", "csf_note")]),
        (csf_core, outputs, [("csf", "inputnode.csf")]),
        (reference, outputs, [("warnings", "inputnode.chi_warnings"),
                              ("reference_values", "inputnode.reference_values")]),
        (invert, outputs, [("warnings", "inputnode.inversion_warnings")]),
        (bfr, reference, [("mask", "mask")]),
        (reference, outputs, [("chi", "inputnode.chi")]),
        (bfr, outputs, [("mask", "inputnode.mask")]),
        (local_source, outputs, [("local_field", "inputnode.local_field")]),
        (sign, outputs, [("fieldmap", "inputnode.fieldmap")]),
        (reference, outputnode, [("chi", "chi")]),
        (bfr, outputnode, [("mask", "mask")]),
        (local_source, outputnode, [("local_field", "local_field")]),
        (total, outputnode, [("total_field", "total_field"), ("noise_std", "noise_std")]),
        (sign, outputnode, [("fieldmap", "fieldmap")]),
        (load, outputnode, [("magnitude", "magnitude"), ("echo_times_s", "echo_times_s")]),
        (unwrap, outputnode, [("unwrapped", "unwrapped"), ("quality", "quality")]),
        (interpretation, outputnode, [("interpretation", "interpretation")]),
    ])  # fmt: skip
    if registry.masks_from_quality(methods["masking"]) and not run.mask:
        # only then does the mask wait for the unwrapping (BET runs beside it)
        wf.connect(unwrap, "quality", mask, "quality")
    if config.execution.output_intermediates:
        wf.connect(unwrap, "unwrapped", outputs, "inputnode.unwrapped")

    if needs_registration(config):
        regions = init_regions_wf(config, run, referencing=methods["referencing"])
        wf.connect([
            (load, regions, [("magnitude", "inputnode.magnitude")]),
            (reference, regions, [("chi", "inputnode.chi")]),
            (bfr, regions, [("mask", "inputnode.mask")]),
        ])  # fmt: skip

    summary_methods = dict(methods)
    if run.mask:
        summary_methods["masking"] = records["masking"]["Description"]
    reports = init_qsm_reports_wf(config, run, methods=summary_methods)
    wf.connect([
        (load, reports, [("magnitude", "inputnode.magnitude"), ("phase", "inputnode.phase")]),
        (unwrap, reports, [("unwrapped", "inputnode.unwrapped"),
                           ("quality", "inputnode.quality")]),
        (sign, reports, [("fieldmap", "inputnode.fieldmap")]),
        (interpretation, reports, [("interpretation", "inputnode.interpretation")]),
        (bfr, reports, [("mask", "inputnode.mask")]),
        (local_source, reports, [("local_field", "inputnode.local_field")]),
        (reference, reports, [("chi", "inputnode.chi")]),
        (csf_core, reports, [("csf", "inputnode.csf")]),
    ])  # fmt: skip
    return wf


def noise_weighting_sentence(methods, params):
    """The methods text's sentence on the N_std weighting: it names each stage
    (of :data:`NOISE_STD_STAGES`) whose method :func:`receives_noise_std`, and
    is empty when none does. ``methods``/``params``: stage -> name / parameters."""
    weighted = [f"{_STAGE_NAMES[s]} ({methods[s]})" for s in NOISE_STD_STAGES
                if receives_noise_std(s, methods[s], params.get(s))]
    if not weighted:
        return ""
    return (f"The noise map N_std, converted to ppm, weighted the data term of the "
            f"{' and the '.join(weighted)} (weights 1/N_std, scaled to mean 1 in the mask).")


def _describe(methods, params, correct_offset, user_mask=None, phase_sign="auto",
              field_source="MagneticFieldStrength"):
    text = {s: method_description(s, methods[s], params[s]) for s in PIPELINE_STAGES}
    if user_mask:
        name = user_mask.rsplit("/", 1)[-1]
        text["masking"] = (
            f"The brain mask was not computed: a user-supplied mask from `{name}` was used "
            "(binarised at 0.5), less any voxel with non-finite input.")
    rest = " ".join(text[s] for s in PIPELINE_STAGES[2:])
    offset = (
        "For multi-echo data, the echo-independent phase offset was estimated with\n"
        "MCPC-3D-S and removed from every echo [@eckstein2018mcpc3ds]. "
        if correct_offset else ""
    )
    weights = noise_weighting_sentence(methods, params)
    weights = f" {weights}" if weights else ""
    return f"""
#### Susceptibility mapping

For each multi-echo gradient-echo run, magnitude and phase echoes were
stacked in order of echo time and the phase was expressed in radians
(images stored in arbitrary units were rescaled to the range −π to π,
with the scale checked against the phase's 2π wraps).
{_SIGN_TEXT[phase_sign]} {_FIELD_TEXT[field_source]}
The direction of the main magnetic field relative to the voxel axes was
taken from the image orientation (or from the `B0_dir` sidecar field when
present), so that oblique acquisitions were modelled without resampling.
{offset}{text["unwrapping"]} {text["echo_combination"]} The B0 map was converted to
a total field in ppm of the main field.{weights} {rest}
"""


_SIGN_TEXT = {
    "auto": "The sign of the phase was checked against the field expected from the air "
    "around and inside the head, and the phase was negated when that field came out "
    "clearly inverted.",
    "1": "The phase was used with its stored sign.",
    "-1": "The phase was negated (its sign convention is opposite to qsmprep's).",
}
_FIELD_TEXT = {
    "ImagingFrequency": "The main field strength was computed from the imaging frequency "
    "(f / γ̄), not taken from its nominal value.",
    "MagneticFieldStrength": "The main field strength was its nominal value "
    "(MagneticFieldStrength).",
}
_STAGE_NAMES = {"bf_removal": "background field removal", "inversion": "dipole inversion"}
