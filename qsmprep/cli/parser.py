"""Command-line interface of qsmprep (BIDS App conventions, as fMRIPrep)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..__about__ import __version__
from ..config import (
    DEFAULT_METHODS,
    LOCAL_FIELD_BF_REMOVAL,
    PHASE_SIGNS,
    PIPELINE_DESCRIPTIONS,
    PIPELINES,
    Config,
    Execution,
    Nipype,
    Workflow,
    phase_sign_setting,
)
from ..qsm.registry import STAGES, option
from .dmqsm_options import add_options as add_dmqsm_options
from .dmqsm_options import apply_options as apply_dmqsm_options

_STAGE_TITLES = {"unwrapping": "phase unwrapping",
                 "echo_combination": "echo combination (B0 map and its noise map N_std)",
                 "bf_removal": "background field removal",
                 "inversion": "dipole inversion", "masking": "brain masking",
                 "referencing": "susceptibility referencing"}


#: the stages in processing order (their options are listed so in ``--help``)
_PROCESSING_ORDER = ("unwrapping", "echo_combination", "masking", "bf_removal", "inversion",
                     "referencing")


def _processing_rank(stage):
    return _PROCESSING_ORDER.index(stage) if stage in _PROCESSING_ORDER else len(STAGES)


def _label(value):
    """A participant or session label, with or without its ``sub-``/``ses-`` prefix."""
    for prefix in ("sub-", "ses-"):
        if value.startswith(prefix):
            value = value[len(prefix):]
    if not value or not value.isalnum():
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a BIDS label (letters and digits only, e.g. 01 or sub-01)"
        )
    return value


def _existing_file(value):
    path = Path(value).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"File not found: {value}")
    return path.absolute()


def _derivatives(value):
    """``NAME=PATH`` (or a bare ``PATH``, named after its folder) of an existing folder."""
    name, sep, path = value.partition("=")
    if not sep:
        name, path = Path(value).expanduser().absolute().name, value
    path = Path(path).expanduser()
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected NAME=PATH with a name of letters, digits, - and _")
    if name == "raw":
        raise argparse.ArgumentTypeError(
            f"{value!r}: 'raw' names the input dataset (bids:raw:...); choose another name")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r}: folder not found: {path}")
    return name, str(path.absolute())


def _default_pipeline():
    """The named pipeline whose methods are the stage defaults, or None."""
    for name, methods in PIPELINES.items():
        if all(DEFAULT_METHODS[stage] == method for stage, method in methods.items()):
            return name
    return None


def _default_pipeline_note():
    default = _default_pipeline()
    return f" are those of {default}" if default else ""


def _output_space(value):
    """One ``--output-spaces`` entry, checked for syntax (templates are found later)."""
    from ..regions.templates import parse_space

    try:
        return str(parse_space(value))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _regions_atlas(value):
    """``--regions-atlas``, checked for syntax (the files are found later)."""
    from ..regions.atlases import parse_atlas

    try:
        parse_atlas(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value.strip()


def _pipelines_help():
    """``--pipeline`` help: each named pipeline with its stage methods and description."""
    default = _default_pipeline()
    return "; ".join(
        f"{name} ({', '.join(f'{option(s)} {m}' for s, m in methods.items())})"
        f"{' = the stage defaults' if name == default else ''}: {PIPELINE_DESCRIPTIONS[name]}"
        for name, methods in PIPELINES.items())


def _positive_int(value):
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return n


#: Titles of the option groups of ``--help``, in fMRIPrep's order and wording.
GROUPS = {
    "bids": "Options for filtering BIDS queries",
    "performance": "Options to handle performance",
    "subset": "Options for performing only a subset of the workflow",
    "workflow": "Workflow configuration",
    "outputs": "Options for modulating outputs",
    "other": "Other options",
}


def build_parser():
    """The argparse parser; option defaults are None so that a ``--config-file``
    can supply them (see :func:`parse_args`). The defaults shown in ``--help``
    come from :mod:`qsmprep.config` and the choices from the method registry."""
    from ..qsm import registry

    ex, wf, ny = Execution(), Workflow(), Nipype()
    p = argparse.ArgumentParser(
        prog="qsmprep",
        description="qsmprep: quantitative susceptibility mapping (QSM) from multi-echo "
        "gradient-echo (GRE) MRI. It reads the magnitude and phase images of a BIDS "
        "dataset and writes susceptibility maps (ppm), field maps and an HTML report "
        "as BIDS derivatives.",
        epilog="Example: qsmprep /data/bids /data/bids/derivatives/qsmprep participant "
        "--participant-label 01. Documentation: docs/usage.md; every error message: "
        "docs/troubleshooting.md.",
    )
    p.add_argument("bids_dir", type=Path, help="root folder of the input BIDS dataset")
    p.add_argument("output_dir", type=Path, help="folder for the BIDS derivatives")
    p.add_argument("analysis_level", choices=["participant", "group"],
                   help="participant: one QSM per run; group: a table of all runs "
                   "already processed in output_dir")
    p.add_argument("--version", action="version", version=f"qsmprep {__version__}")

    g = p.add_argument_group(GROUPS["bids"])
    g.add_argument("--participant-label", "--participant_label", nargs="+", type=_label,
                   metavar="LABEL", help="subjects to process (with or without 'sub-') "
                   "(default: all subjects with GRE images)")
    g.add_argument("--session-label", nargs="+", type=_label, metavar="LABEL",
                   help="sessions to process (with or without 'ses-') (default: all)")
    g.add_argument("--bids-filter-file", type=_existing_file, metavar="FILE",
                   help="JSON file of pybids entity filters applied to the MEGRE/T2starw "
                   'query, e.g. {"acquisition": "highres"}')
    g.add_argument("--skip-bids-validation", action="store_true", default=None,
                   help="index the dataset without checking file names against BIDS, "
                   "e.g. for 4-D MEGRE files (qsmprep's own checks of echoes and metadata "
                   "always run)")
    g.add_argument("--derivatives", nargs="+", action="append", type=_derivatives,
                   metavar="NAME=PATH",
                   help="BIDS derivatives dataset(s) searched (pybids) for each run's brain "
                   "mask, sub-X/[ses-Y/]anat/sub-X[_ses-Y][_acq-..][_run-..]"
                   "[_desc-brain]_mask.nii.gz (e.g. an earlier qsmprep output); the mask "
                   "replaces the masking method for the runs that have one; repeatable")

    g = p.add_argument_group(GROUPS["performance"])
    g.add_argument("--nprocs", "--nthreads", type=_positive_int, metavar="N",
                   help="processes run at the same time (default: all cores)")
    g.add_argument("--omp-nthreads", type=_positive_int, metavar="N",
                   help="threads per process (default: min(8, nprocs))")
    g.add_argument("--mem", "--mem-gb", dest="mem_gb", type=float, metavar="GB",
                   help="memory limit for the scheduler, in GB; also sizes the tiles of "
                   "deep-learning steps (default: no limit)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="torch device of the methods that run in torch: total field "
                   "inversion (the default), the iterative background removals and "
                   "inversions (PDF, iSMV, LBV, TV, iLSQR, RTS, MEDI, ...) and the "
                   "deep-learning methods; auto: CUDA when a GPU is visible "
                   f"(default: {ex.device})")
    g.add_argument("--use-plugin", type=_existing_file, metavar="FILE",
                   help="YAML file with a Nipype 'plugin' and its 'plugin_args' "
                   f"(default: {ny.plugin})")

    g = p.add_argument_group(GROUPS["subset"])
    g.add_argument("--boilerplate-only", "--boilerplate_only", action="store_true",
                   default=None, help="check the input, write logs/CITATION.md and stop")
    g.add_argument("--reports-only", action="store_true", default=None,
                   help="only rebuild the HTML reports (sub-<label>.html) from existing "
                   "outputs; nothing is recomputed")

    g = p.add_argument_group(
        GROUPS["workflow"],
        "The method of each processing stage, by name (qsmprep.qsm.registry). Order: "
        "phase offset, unwrapping, echo combination, phase sign check, masking, background "
        "field removal, dipole inversion, referencing.")
    g.add_argument("--pipeline", choices=list(PIPELINES),
                   help="a named pipeline: sets the methods of the stages it names; a stage "
                   "option (e.g. --inversion tv) overrides it for that stage, and the other "
                   f"stages keep their defaults. {_pipelines_help()} (default: none; the "
                   f"stage defaults below{_default_pipeline_note()})")
    g.add_argument("--phase-offset", choices=["mcpc3ds", "none"],
                   help="removal of the echo-independent phase offset before unwrapping "
                   f"(MCPC-3D-S; skipped for single-echo data) (default: {wf.phase_offset})")
    g.add_argument("--phase-sign", choices=list(PHASE_SIGNS),
                   help="sign of the stored phase: auto checks it on the field of the air "
                   "around the head and negates it (with a warning) only when clearly "
                   f"inverted; 1 keeps it, -1 negates it (default: {wf.phase_sign})")
    for stage in sorted(STAGES, key=_processing_rank):
        default = DEFAULT_METHODS[stage]
        if stage == "bf_removal" and registry.passes_total_field(default):
            default += (f", the total field to {DEFAULT_METHODS['inversion']}; "
                        f"{LOCAL_FIELD_BF_REMOVAL} with an inversion that needs a local field")
        g.add_argument(option(stage), dest=stage, choices=registry.names(stage),
                       help=f"{_STAGE_TITLES[stage]} method (default: {default})")
    g.add_argument("--mask", type=_existing_file, metavar="FILE",
                   help="a brain mask (NIfTI, on the GRE grid) used instead of the masking "
                   "method, for every run processed (meant for a single run)")
    # group studies (docs/usage.md, "Group studies: regions and template space")
    g.add_argument("--regions", action="store_true", default=None,
                   help="register each run to the embedded QSMChallenge template (ANTs) and "
                   "write deep grey matter statistics (*_desc-regions_stats.tsv) and labels "
                   "(*_desc-regions_dseg.nii.gz) in native space (default: off)")
    g.add_argument("--regions-atlas", type=_regions_atlas, metavar="ATLAS",
                   help="atlas of --regions (implies it): QSMChallenge (embedded) or a "
                   "TemplateFlow atlas already under $TEMPLATEFLOW_HOME, e.g. MASSP20 (in "
                   "MNI152NLin2009cAsym) or <template>:atlas-<label>[:desc-<label>]"
                   "[:res-<label>]; its caudate, putamen, pallidum, thalamus, substantia "
                   "nigra, red nucleus and dentate labels take qsmprep's region names "
                   "(default: QSMChallenge)")
    g.add_argument("--output-spaces", nargs="+", type=_output_space, metavar="SPACE",
                   help="spaces of the Chimap (fMRIPrep syntax): native and/or templates, "
                   "e.g. QSMChallenge or MNI152NLin2009cAsym:res-1 (TemplateFlow templates "
                   "must already be under $TEMPLATEFLOW_HOME: nothing is downloaded) "
                   "(default: native)")

    g = p.add_argument_group(GROUPS["outputs"])
    g.add_argument("--output-intermediates", action="store_true", default=None,
                   help="also write the unwrapped phase (rad) of every echo")

    g = p.add_argument_group(GROUPS["other"])
    g.add_argument("-w", "--work-dir", type=Path, metavar="DIR",
                   help="Nipype work folder (cache; re-running resumes from it) "
                   "(default: ./work)")
    g.add_argument("--config-file", type=_existing_file, metavar="FILE",
                   help="TOML settings (as written in the work folder); command-line "
                   "options override it")
    g.add_argument("--stop-on-first-crash", action="store_true", default=None,
                   help="stop at the first node that fails")
    g.add_argument("-v", "--verbose", dest="verbosity", action="count",
                   help="more log output (-vv for debug)")
    add_dmqsm_options(p)
    return p


def parse_args(argv=None):
    """Parse the command line into a :class:`~qsmprep.config.Config`.

    Precedence: command line > ``--config-file`` > built-in defaults. For the
    stage methods: a stage option (``--inversion``) > ``--pipeline`` > the config
    file's stage keys > its ``pipeline`` key > :data:`~qsmprep.config.DEFAULT_METHODS`.
    """
    opts = build_parser().parse_args(argv)
    config = _read_config(opts.config_file) if opts.config_file else Config()

    ex = config.execution
    ex.bids_dir = str(opts.bids_dir.expanduser().absolute())
    ex.output_dir = str(opts.output_dir.expanduser().absolute())
    ex.analysis_level = opts.analysis_level
    if opts.work_dir is not None:
        ex.work_dir = str(opts.work_dir.expanduser().absolute())
    if not ex.work_dir:
        ex.work_dir = str(Path("work").absolute())
    for name in ("participant_label", "session_label", "skip_bids_validation",
                 "stop_on_first_crash", "output_intermediates", "boilerplate_only",
                 "reports_only",
                 "device", "verbosity"):
        value = getattr(opts, name)
        if value is not None:
            setattr(ex, name, value)
    if opts.bids_filter_file is not None:
        ex.bids_filters = _read_filters(opts.bids_filter_file)
    if opts.mask is not None:
        ex.mask_file = str(opts.mask)
    if opts.derivatives:
        pairs = [pair for group in opts.derivatives for pair in group]
        names = [name for name, _ in pairs]
        if len(set(names)) < len(names):
            raise SystemExit("qsmprep: error: --derivatives names must differ, got "
                             f"{', '.join(names)}; write NAME=PATH")
        ex.derivatives = dict(pairs)

    if opts.regions is not None:
        config.workflow.regions = opts.regions
    if opts.regions_atlas is not None:
        config.workflow.regions_atlas = opts.regions_atlas
        config.workflow.regions = True
    if opts.output_spaces is not None:
        config.workflow.output_spaces = list(dict.fromkeys(opts.output_spaces))
    if opts.pipeline is not None:
        config.workflow.use_pipeline(opts.pipeline)
    for name in STAGES + ("phase_offset", "phase_sign"):
        if getattr(opts, name) is not None:
            setattr(config.workflow, name, getattr(opts, name))
    apply_dmqsm_options(opts, config)

    _check_methods(config.workflow, opts.config_file)
    if opts.bf_removal is None:
        _local_field_for(config.workflow)
    ny = config.nipype
    for name, dest in (("nprocs", "nprocs"), ("omp_nthreads", "omp_nthreads"),
                       ("mem_gb", "mem_gb")):
        if getattr(opts, name) is not None:
            setattr(ny, dest, getattr(opts, name))
    if opts.use_plugin is not None:
        ny.plugin, ny.plugin_args = _read_plugin(opts.use_plugin)
    return config


def _local_field_for(workflow):
    """When the inversion needs a local field but the background removal (not
    given on the command line) passes the total field on, use
    :data:`~qsmprep.config.LOCAL_FIELD_BF_REMOVAL`: ``--inversion tv`` alone
    means PDF + TV, not an error. ``--bf-removal none --inversion tv`` stays one
    (:func:`qsmprep.bids.discover.check_methods`)."""
    from ..qsm import registry

    if registry.background_left_in(workflow.bf_removal, workflow.inversion):
        workflow.bf_removal = LOCAL_FIELD_BF_REMOVAL


def _read_config(path):
    """The settings of a ``--config-file``; a broken file is a one-line error."""
    from ..config import tomllib

    try:
        return Config.from_toml(path)
    except (ValueError, TypeError, tomllib.TOMLDecodeError) as err:
        raise SystemExit(f"qsmprep: error: cannot read --config-file {path}: {err}") from None


def _check_methods(workflow, config_file):
    """Every stage's method is registered (a settings file can name any)."""
    from ..qsm import registry

    for stage in STAGES:
        name = workflow.method(stage)
        if name not in registry.names(stage):
            raise SystemExit(
                f"qsmprep: error: --config-file {config_file} sets {stage} = {name!r}, "
                "which is not a registered method; the choices are: "
                f"{', '.join(registry.names(stage))}")
    if workflow.phase_offset not in ("mcpc3ds", "none"):
        raise SystemExit(
            f"qsmprep: error: --config-file {config_file} sets phase_offset = "
            f"{workflow.phase_offset!r}; choose mcpc3ds or none")
    try:  # a settings file may give 1 or -1 as numbers: stored as the option's text
        workflow.phase_sign = phase_sign_setting(workflow.phase_sign)
    except ValueError:
        raise SystemExit(
            f"qsmprep: error: --config-file {config_file} sets phase_sign = "
            f"{workflow.phase_sign!r}; choose auto, 1 or -1") from None


def _read_filters(path):
    try:
        filters = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"qsmprep: error: {path} is not valid JSON ({err})") from None
    if not isinstance(filters, dict):
        raise SystemExit(
            f"qsmprep: error: {path} must hold a JSON object of BIDS entities, "
            'e.g. {"acquisition": "highres"}'
        )
    return filters


def _read_plugin(path):
    import yaml

    settings = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(settings, dict) or "plugin" not in settings:
        raise SystemExit(
            f"qsmprep: error: {path} must be YAML with a 'plugin' key "
            "(and optionally 'plugin_args'), e.g. 'plugin: Linear'"
        )
    return str(settings["plugin"]), dict(settings.get("plugin_args") or {})
