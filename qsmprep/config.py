"""Settings of one qsmprep run, in four sections (as in fMRIPrep).

``environment``
    facts about the software and machine (versions, cores), recorded only;
``execution``
    what to run on and where to write (paths, labels, filters, device);
``workflow``
    the method chosen for each stage and its parameters;
``nipype``
    how Nipype runs the graph (plugin, processes, threads, memory).

The whole object is written as TOML into the work directory and into
``<output_dir>/sub-<label>/log/<run-uuid>/qsmprep.toml``, and a TOML file
written this way can be given back with ``--config-file``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from uuid import uuid4

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .__about__ import __version__

#: Default method of each stage (names in :mod:`qsmprep.qsm.registry`).
#: Background removal and inversion are total field inversion's (the named
#: pipeline ``tfi``): on the independent benchmark (heads our simulator never
#: made, docs/benchmarks.md) it had the lowest whole-pipeline NRMSE on every
#: head, below NeXtQSM (the default before it) and V-SHARP + TV; the reasons and
#: numbers are in docs/methods.md ("Default pipeline"), the history in CHANGELOG.md.
#: The reference is the ventricular CSF core since rule R31-6 (raw XSIM >= 0.70 on
#: every decision head; the brain mean without ventricles in view, with a warning).
DEFAULT_METHODS = {
    "unwrapping": "romeo",
    "echo_combination": "romeo",
    "masking": "bet",
    "bf_removal": "none",
    "inversion": "tfi",
    "referencing": "csf",
}

#: Named pipelines (``--pipeline``): stage -> method for the stages a preset
#: sets; the other stages keep :data:`DEFAULT_METHODS`.
PIPELINES = {
    "tfi": {s: DEFAULT_METHODS[s] for s in ("bf_removal", "inversion")},
    "nextqsm": {"bf_removal": "nextqsm", "inversion": "nextqsm"},
    "classical": {"bf_removal": "pdf", "inversion": "ilsqr"},
    # V-SHARP, not the default PDF: IR2QSM has no noise weights, and after the
    # N_std-weighted PDF the unweighted inversions amplify the noisy rim
    # (whole pipeline 114-123 % NRMSE, docs/methods.md)
    "ir2qsm": {"bf_removal": "vsharp", "inversion": "ir2qsm"},
}

#: Background removal of a run whose inversion needs a local field while the
#: background removal was left at a default that passes the total field on
#: (``--inversion tv`` alone): the classical chain's.
LOCAL_FIELD_BF_REMOVAL = PIPELINES["classical"]["bf_removal"]

#: One line per named pipeline, for ``--help`` and the documentation (no dates:
#: the history of the defaults is in CHANGELOG.md).
PIPELINE_DESCRIPTIONS = {
    "tfi": "total field inversion: no separate background removal, background sources "
           "fitted with the brain's susceptibility (MEDI prior, edge field not trusted); no trained weights",
    "nextqsm": "NeXtQSM's learned background removal + variational-network inversion, "
               "trained on simulated adult human heads",
    "classical": "N_std-weighted PDF background removal + iLSQR inversion; no trained "
                 "weights: the choice for phantoms, animals and other organs",
    "ir2qsm": "V-SHARP background removal + IR2QSM learned inversion",
}


def pipeline_methods(name):
    """Stage -> method of the named pipeline, or a ValueError naming the choices."""
    if name not in PIPELINES:
        raise ValueError(f"Unknown pipeline {name!r}; expected one of {sorted(PIPELINES)}")
    return dict(PIPELINES[name])


def new_run_uuid():
    """A sortable unique run identifier: ``YYYYmmdd-HHMMSS_<uuid4>``."""
    return f"{datetime.now():%Y%m%d-%H%M%S}_{uuid4()}"


@dataclass
class Environment:
    version: str = __version__
    python: str = sys.version.split()[0]
    cpu_count: int = os.cpu_count() or 1


@dataclass
class Execution:
    bids_dir: str = ""
    output_dir: str = ""
    analysis_level: str = "participant"
    work_dir: str = ""
    participant_label: list = field(default_factory=list)
    session_label: list = field(default_factory=list)
    bids_filters: dict = field(default_factory=dict)
    skip_bids_validation: bool = False
    #: user-supplied brain mask for every run (--mask); "" when none
    mask_file: str = ""
    #: derivatives datasets searched for each run's brain mask (--derivatives), name -> path
    derivatives: dict = field(default_factory=dict)
    stop_on_first_crash: bool = False
    output_intermediates: bool = False
    boilerplate_only: bool = False
    reports_only: bool = False
    device: str = "auto"
    verbosity: int = 0
    run_uuid: str = field(default_factory=new_run_uuid)

    def log_dir(self, subject):
        """Folder for this run's crash files and settings of one subject."""
        return Path(self.output_dir) / f"sub-{subject}" / "log" / self.run_uuid


#: values of ``--phase-sign`` / ``[workflow] phase_sign``
PHASE_SIGNS = ("auto", "1", "-1")


def phase_sign_setting(value):
    """``--phase-sign`` as one of :data:`PHASE_SIGNS` (a TOML file may give 1 or -1)."""
    text = str(value).strip().lower()
    text = {"+1": "1", "1.0": "1", "-1.0": "-1"}.get(text, text)
    if text not in PHASE_SIGNS:
        raise ValueError(f"phase_sign = {value!r} in the settings; expected one of "
                         f"{', '.join(PHASE_SIGNS)}")
    return text


@dataclass
class Workflow:
    #: "mcpc3ds": remove the echo-independent phase offset before unwrapping
    #: (multi-echo only); "none": keep the phase as acquired
    phase_offset: str = "mcpc3ds"
    #: sign of the stored phase: "auto" (checked on the field of the air around
    #: the head; negated with a warning only when clearly inverted), "1" (as
    #: stored) or "-1" (negate); see docs/usage.md
    phase_sign: str = "auto"
    unwrapping: str = DEFAULT_METHODS["unwrapping"]
    echo_combination: str = DEFAULT_METHODS["echo_combination"]
    masking: str = DEFAULT_METHODS["masking"]
    bf_removal: str = DEFAULT_METHODS["bf_removal"]
    inversion: str = DEFAULT_METHODS["inversion"]
    referencing: str = DEFAULT_METHODS["referencing"]
    #: named pipeline (:data:`PIPELINES`) the stage methods started from, "" when
    #: none; the stage fields above, not this name, are what runs
    pipeline: str = ""
    #: stage -> {parameter: value}, overriding the registry defaults
    params: dict = field(default_factory=dict)
    #: deep grey matter regions (--regions): register each run to the embedded
    #: QSMChallenge template and write *_desc-regions_stats.tsv and _dseg
    regions: bool = False
    #: atlas of the regions (--regions-atlas): "QSMChallenge" (embedded) or a TemplateFlow
    #: atlas on disk, "MASSP20" or "<template>:atlas-<label>[:desc-<label>][:res-<label>]"
    regions_atlas: str = "QSMChallenge"
    #: --output-spaces (fMRIPrep syntax): "native" and/or template spaces
    #: ("MNI152NLin2009cAsym:res-2", "QSMChallenge"); chi is resampled to each template
    output_spaces: list = field(default_factory=lambda: ["native"])
    #: iteration schedule of the ANTs registration (qsmprep.regions.registration.PRESETS)
    registration: str = "default"
    #: register to TemplateFlow templates through the subject's T1w when the dataset has one
    t1w_intermediate: bool = True

    def method(self, stage):
        """Name of the method chosen for ``stage``."""
        return getattr(self, stage)

    def use_pipeline(self, name):
        """Set the stage methods of the named pipeline and record its name."""
        for stage, method in pipeline_methods(name).items():
            setattr(self, stage, method)
        self.pipeline = name

    def stage_params(self, stage):
        """User parameters of ``stage`` (a copy; empty when none)."""
        return dict(self.params.get(stage, {}))


@dataclass
class Nipype:
    plugin: str = "MultiProc"
    plugin_args: dict = field(default_factory=dict)
    nprocs: int = 0  # 0: all cores
    omp_nthreads: int = 0  # 0: min(8, nprocs)
    mem_gb: float = 0.0  # 0: no limit given
    crashfile_format: str = "txt"

    def resolved(self):
        """(nprocs, omp_nthreads) with the 0 = automatic values filled in."""
        nprocs = self.nprocs or (os.cpu_count() or 1)
        omp = self.omp_nthreads or min(8, nprocs)
        return nprocs, min(omp, nprocs)

    def plugin_settings(self):
        """``plugin`` and ``plugin_args`` for :meth:`nipype.Workflow.run`."""
        args = dict(self.plugin_args)
        if self.plugin in ("MultiProc", "LegacyMultiProc"):
            args.setdefault("n_procs", self.resolved()[0])
            if self.mem_gb:
                args.setdefault("memory_gb", self.mem_gb)
            args.setdefault("raise_insufficient", False)
        return {"plugin": self.plugin, "plugin_args": args}


_SECTIONS = {"environment": Environment, "execution": Execution,
             "workflow": Workflow, "nipype": Nipype}


@dataclass
class Config:
    """All settings of a run; see the module docstring."""

    environment: Environment = field(default_factory=Environment)
    execution: Execution = field(default_factory=Execution)
    workflow: Workflow = field(default_factory=Workflow)
    nipype: Nipype = field(default_factory=Nipype)

    def to_dict(self):
        return asdict(self)

    def to_toml(self, path):
        """Write the settings as TOML to ``path`` (folders are created)."""
        from .utils.files import write_text

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text(path, tomli_w.dumps(_drop_none(self.to_dict())))

    @classmethod
    def from_dict(cls, data):
        """Build from nested dicts; unknown sections or keys are an error."""
        unknown = set(data) - set(_SECTIONS)
        if unknown:
            raise ValueError(
                f"Unknown configuration section(s) {sorted(unknown)}; "
                f"expected {sorted(_SECTIONS)}"
            )
        kwargs = {}
        for name, section in _SECTIONS.items():
            values = dict(data.get(name, {}))
            known = {f.name for f in fields(section)}
            bad = set(values) - known
            if bad:
                raise ValueError(
                    f"Unknown key(s) {sorted(bad)} in configuration section [{name}]; "
                    f"expected some of {sorted(known)}"
                )
            if name == "workflow" and values.get("pipeline"):  # stage keys win
                values = {**pipeline_methods(values["pipeline"]), **values}
            kwargs[name] = section(**values)
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path):
        """Read settings written by :meth:`to_toml` (or by hand)."""
        with open(path, "rb") as f:
            return cls.from_dict(tomllib.load(f))


def _drop_none(value):
    """TOML has no null: leave out keys whose value is None."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value
