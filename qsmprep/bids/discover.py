"""Finding the multi-echo GRE runs of a BIDS dataset with pybids, and the
checks made before any work: the output and work folders, ``.bidsignore``,
the method settings each run can use."""

from __future__ import annotations

import logging
from pathlib import Path

from ..qsm import registry
from . import QSMPrepInputError
from .metadata import check_run
from .runs import _NIFTI, GRE_SUFFIXES, RUN_ENTITIES, _make_run

LOGGER = logging.getLogger("qsmprep")


def check_output_dir(bids_dir, output_dir):
    """Refuse an output folder that would write into the input dataset.

    Allowed: anywhere outside ``bids_dir``, or under ``bids_dir/derivatives/``.
    """
    bids_dir = Path(bids_dir).resolve()
    output_dir = Path(output_dir).resolve()
    if output_dir == bids_dir or bids_dir.is_relative_to(output_dir):
        raise QSMPrepInputError(
            f"The output folder {output_dir} contains the input dataset {bids_dir}; "
            f"choose a folder outside it, e.g. {bids_dir}/derivatives/qsmprep"
        )
    if output_dir.is_relative_to(bids_dir):
        rel = output_dir.relative_to(bids_dir)
        if rel.parts[0] != "derivatives" or len(rel.parts) < 2:
            raise QSMPrepInputError(
                f"The output folder {output_dir} is inside the input dataset; qsmprep "
                f"never writes into it. Use {bids_dir}/derivatives/qsmprep or a "
                "folder outside the dataset."
            )


def check_writable_dir(folder, what="output folder"):
    """Check, without writing anything, that ``folder`` can be written (or created):
    the folder, or else its nearest existing parent, must be writable by this user.
    :class:`QSMPrepInputError` naming the folder and the fix otherwise (a read-only
    mount, a container user without permission)."""
    import os

    folder = Path(folder).absolute()
    existing = folder
    while not os.path.exists(existing) and existing != existing.parent:  # never raises
        existing = existing.parent
    if os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK):
        return
    where = "" if existing == folder else f" (its parent {existing} cannot be written)"
    raise QSMPrepInputError(
        f"The {what} {folder} is not writable{where}: give a folder this user "
        f"(uid {os.getuid()}) may write to; in a container, mount it without ':ro' and "
        "run as the folder's owner (docker run --user $(id -u):$(id -g) ...)"
    )


def collect_data(bids_dir, *, participant_label=(), session_label=(), bids_filters=None,
                 validate=True):
    """All GRE runs to process, as ``{subject: [QSMRun, ...]}``.

    Raises :class:`QSMPrepInputError` when a requested subject does not exist,
    when nothing can be processed, or when a run fails :func:`check_run`.
    """
    from bids import BIDSLayout

    bids_dir = Path(bids_dir)
    if not (bids_dir / "dataset_description.json").is_file():
        raise QSMPrepInputError(
            f"{bids_dir} is not a BIDS dataset: it has no dataset_description.json; "
            f"check the path, or create {bids_dir}/dataset_description.json with at least "
            '{"Name": "<dataset name>", "BIDSVersion": "1.9.0"}'
        )
    try:
        layout = BIDSLayout(str(bids_dir), validate=validate)
    except Exception as err:  # pybids raises several types for a broken dataset
        raise QSMPrepInputError(
            f"pybids could not index the dataset {bids_dir}: {err}") from err

    available = layout.get_subjects()
    if participant_label:
        missing = sorted(set(participant_label) - set(available))
        if missing:
            raise QSMPrepInputError(
                f"No subject matches --participant-label {' '.join(missing)} in {bids_dir}; "
                f"subjects found: {', '.join(sorted(available)) or 'none'}"
            )
        subjects = list(participant_label)
    else:
        subjects = sorted(available)

    data = {}
    for subject in subjects:
        runs = collect_runs(layout, subject, session_label=session_label,
                            bids_filters=bids_filters)
        if runs:
            data[subject] = runs
        elif participant_label:
            raise QSMPrepInputError(_no_data_message(bids_dir, subject, session_label,
                                                     validate))
        else:
            LOGGER.warning("sub-%s has no multi-echo GRE (MEGRE/T2starw) images; skipped",
                           subject)
    if not data:
        raise QSMPrepInputError(
            f"No multi-echo GRE images (anat/*_MEGRE or *_T2starw with part-phase) in "
            f"{bids_dir} for the subjects and filters given"
        )
    return data


def _no_data_message(bids_dir, subject, session_label, validate):
    where = f" in session(s) {', '.join(session_label)}" if session_label else ""
    msg = (
        f"sub-{subject} has no MEGRE or T2starw images{where} in {bids_dir}; "
        "expected e.g. sub-{0}/anat/sub-{0}_echo-1_part-phase_MEGRE.nii.gz".format(subject)
    )
    ignored = sorted(Path(bids_dir, f"sub-{subject}").glob("**/anat/*_part-phase_*.nii*"))
    if validate and ignored:
        msg += (
            f". BIDS validation left out {ignored[0].name}"
            f"{f' and {len(ignored) - 1} more' if len(ignored) > 1 else ''} (e.g. a 4-D "
            "MEGRE file without echo- entity); rename it or add --skip-bids-validation"
        )
    return msg


def collect_runs(layout, subject, *, session_label=(), bids_filters=None):
    """The checked :class:`QSMRun` of one subject, grouped by ses/acq/rec/run."""
    query = {"subject": subject, "datatype": "anat", "suffix": list(GRE_SUFFIXES),
             "extension": list(_NIFTI), **(bids_filters or {})}
    if session_label:
        query["session"] = list(session_label)
    try:
        found = layout.get(**query)
    except ValueError as err:  # an entity pybids does not know, from --bids-filter-file
        raise QSMPrepInputError(
            f"The BIDS filters {bids_filters} cannot be used: {err}. Use pybids entity "
            "names, e.g. {\"acquisition\": \"highres\"}"
        ) from None
    patterns = bidsignore_patterns(layout.root)
    kept = [f for f in found if not is_bidsignored(f.path, layout.root, patterns)]
    if len(kept) < len(found):
        LOGGER.info("sub-%s: %d file(s) left out by %s/.bidsignore", subject,
                    len(found) - len(kept), layout.root)
    groups = {}
    for f in kept:
        ents = f.get_entities()
        key = tuple((k, str(ents[k])) for k in RUN_ENTITIES if k in ents)
        key += (("suffix", ents["suffix"]),)
        groups.setdefault(key, []).append((f.path, ents, f.get_metadata()))
    runs = []
    for key, files in sorted(groups.items()):
        run = _make_run(subject, key, files)
        check_run(run)
        runs.append(run)
    return runs


def bidsignore_patterns(bids_dir):
    """The patterns of ``<bids_dir>/.bidsignore`` (none when it does not exist).

    pybids (0.22) does not read ``.bidsignore``: its indexer only takes
    ``ignore=`` paths or regular expressions, which replace its own defaults
    and would need the gitignore-style patterns translated (a ``*`` that stops
    at ``/`` in a name pattern but not in a path pattern). So the files pybids
    found are filtered here, after the query (:func:`is_bidsignored`).
    """
    path = Path(bids_dir) / ".bidsignore"
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def is_bidsignored(path, bids_dir, patterns):
    """Whether ``path`` matches a ``.bidsignore`` pattern (gitignore-style: a
    pattern without ``/`` matches any file or folder name, one with ``/`` the
    path from the dataset root, a trailing ``/`` a folder and all it holds)."""
    from fnmatch import fnmatchcase

    rel = Path(path).absolute().relative_to(Path(bids_dir).absolute()).parts
    for pattern in patterns:
        pat = pattern.strip("/")
        if "/" in pat or pattern.startswith("/"):
            if any(fnmatchcase("/".join(rel[:n]), pat) for n in range(1, len(rel) + 1)):
                return True
        elif any(fnmatchcase(part, pat) for part in rel):
            return True
    return False


def warn_method_cautions(data, workflow):
    """Warn every run of ``data`` about each method ``workflow`` chooses that
    carries a caution in the registry (``caution`` in
    ``qsmprep/data/methods.toml``: what is known to go wrong with it). The
    warning names the run, so the subject's report lists it."""
    for stage in registry.STAGES:
        name = getattr(workflow, stage, None)
        if name not in registry.names(stage):
            continue
        caution = registry.get(stage, name).caution
        if not caution:
            continue
        for runs in data.values():
            for run in runs:
                LOGGER.warning("%s: %s %s was chosen, and the method table cautions: %s",
                               run.label, registry.option(stage), name, caution)


def check_methods(data, workflow):
    """Refuse method settings that some runs of ``data`` cannot use.

    Phase-only runs (no magnitude) need the phase-quality mask, which ROMEO's
    quality map provides; bipolar phase-offset correction needs >= 3 echoes;
    the nonlinear echo combination needs >= 2 echoes. (Learned methods on
    voxels they were not trained for get a warning from
    :func:`qsmprep.dl.policy.check_learned_voxel_sizes`.)
    """
    if registry.background_left_in(workflow.bf_removal, workflow.inversion):
        fitters = [n for n in registry.names("inversion") if registry.fits_background(n)]
        raise QSMPrepInputError(
            f"--bf-removal {workflow.bf_removal} passes the total field, background included, "
            f"to the inversion, and --inversion {workflow.inversion} would turn the background "
            "into susceptibility; only --inversion " + " or ".join(fitters) + " fits the "
            "background sources itself: choose one of those, or a background-removal method "
            "(e.g. --bf-removal pdf)"
        )
    for runs in data.values():
        for run in runs:
            label = run.label
            if not run.magnitude and run.mask is None and (
                    workflow.masking != "quality" or workflow.unwrapping != "romeo"):
                raise QSMPrepInputError(
                    f"{label} has no magnitude images: process it with --masking quality "
                    "--unwrapping romeo (a phase-quality mask), or add the part-mag files"
                )
            if workflow.echo_combination == "nonlinear" and len(run.echo_times_s) < 2:
                raise QSMPrepInputError(
                    f"{label} has one echo but the nonlinear echo combination fits a phase "
                    "offset and the field, which needs 2 echoes or more; use "
                    "--echo-combination romeo (or linear) for single-echo data"
                )
            bipolar = workflow.stage_params("phase_offset").get("bipolar", False)
            if (bipolar and workflow.phase_offset == "mcpc3ds"
                    and len(run.echo_times_s) < 3):
                raise QSMPrepInputError(
                    f"{label} has {len(run.echo_times_s)} echo(es) but the bipolar phase-offset "
                    "correction needs 3 or more; set bipolar = false under "
                    "[workflow.params.phase_offset] or use --phase-offset none"
                )

