"""``qsmprep`` command: parse, check the input, build and run the workflow."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from ..execution import resolve_device

LOGGER = logging.getLogger("qsmprep")


#: process id and work folder of the running ``qsmprep`` command
_RUNNING = {}


def _interrupt(signum, frame):
    """SIGTERM/SIGINT: end this run's workers, say how to resume, exit 128 + signum.

    The process exits from the handler rather than unwinding an exception
    through Nipype's scheduler, which can deadlock on the process pool's locks.
    Nothing partial is left under a final name: every file is written under a
    temporary name and renamed; a half-finished step is redone on restart.
    Workers (forked, they inherit this handler) that get the signal just exit.
    """
    if os.getpid() == _RUNNING.get("pid"):
        import multiprocessing

        for child in multiprocessing.active_children():  # the workers of this run:
            child.kill()  # SIGKILL, as they may be deep in compiled code for a while
        sys.stderr.write(
            f"qsmprep: error: interrupted by {signal.Signals(signum).name}; finished steps "
            f"are kept in {_RUNNING['work_dir']}: run the same command again to resume\n")
        sys.stderr.flush()
    os._exit(128 + signum)


def main(argv=None):
    """Entry point of the ``qsmprep`` console script; returns the exit code
    (0 success, 1 input error, no space or failed processing, 128 + signal
    number when interrupted by SIGTERM/SIGINT)."""
    from .parser import parse_args

    config = parse_args(argv)  # before the imports below: --help and --version stay fast
    from ..bids import QSMPrepInputError
    from ..utils.files import OutputSpaceError

    _setup_logging(config.execution.verbosity)
    _RUNNING.update(pid=os.getpid(), work_dir=config.execution.work_dir)
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if config.execution.analysis_level == "group":
            return _run_group(config)
        return _run_participant(config)
    except (QSMPrepInputError, OutputSpaceError) as err:
        print(f"qsmprep: error: {err}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_participant(config):
    """Check the input, build the graph, then (only then) create the work and
    output folders and run it. A run that stops on an input error creates
    nothing: the warnings of the checks are held in memory until the work
    folder exists."""
    import logging.handlers
    import time

    from ..bids.discover import (check_methods, check_output_dir, check_writable_dir,
                                 collect_data, warn_method_cautions)
    from ..bids.masks import attach_masks
    from ..dl.policy import check_learned_voxel_sizes
    from ..utils.runinfo import record_warnings
    from ..workflows.outputs import write_derivatives_description
    from .workflow import build_workflow, write_boilerplate

    ex = config.execution
    started = time.time()
    held = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
    held.setLevel(logging.WARNING)
    LOGGER.addHandler(held)
    try:
        check_output_dir(ex.bids_dir, ex.output_dir)
        check_work_dir(ex.bids_dir, ex.work_dir)
        check_writable_dir(ex.output_dir, "output folder")
        check_writable_dir(ex.work_dir, "work folder")
        data = collect_data(
            ex.bids_dir,
            participant_label=ex.participant_label,
            session_label=ex.session_label,
            bids_filters=ex.bids_filters,
            validate=not ex.skip_bids_validation,
        )
        if not ex.reports_only:  # user-supplied masks: found and checked before any work
            data = attach_masks(data, mask_file=ex.mask_file or None,
                                derivatives=ex.derivatives)
        check_methods(data, config.workflow)
        check_learned_voxel_sizes(data, config.workflow)
        warn_method_cautions(data, config.workflow)
        if not ex.reports_only:  # templates of --regions/--output-spaces, on disk
            from ..workflows.regions import check_templates

            check_templates(config)
        if ex.reports_only:
            from ..reports.core import reports_only

            failed = reports_only(ex.output_dir, list(data))
            if failed:
                print(f"qsmprep: error: {failed} report(s) could not be built; see the log "
                      "above", file=sys.stderr)
            return 1 if failed else 0
        ex.device = resolve_device(ex.device)
        _configure_nipype(config)
        workflow = build_workflow(config, data)  # in memory: writes nothing
        # the input is valid and the graph built: from here on, folders are made
        held.setTarget(record_warnings(_warnings_file(config)))
        held.flush()
    finally:
        LOGGER.removeHandler(held)
        held.close()

    config.to_toml(Path(ex.work_dir) / f"config-{ex.run_uuid}.toml")
    for subject in data:
        config.to_toml(ex.log_dir(subject) / "qsmprep.toml")
    write_derivatives_description(ex.bids_dir, ex.output_dir, derivatives=ex.derivatives)
    write_boilerplate(workflow, ex.output_dir)
    if ex.boilerplate_only:
        return 0

    settings = config.nipype.plugin_settings()
    LOGGER.info("Running with the %s plugin %s; work folder %s", settings["plugin"],
                settings["plugin_args"], ex.work_dir)
    try:
        workflow.run(**settings)
    except Exception as err:  # Nipype raises RuntimeError, plugins may raise others
        _write_reports(config, data, started)
        print(failure_summary(config, data, err), file=sys.stderr)
        return 1
    if settings["plugin"].endswith("Graph"):  # SLURMGraph, SGEGraph, PBSGraph, ...
        # these plugins submit the whole graph as scheduler jobs and return at once
        LOGGER.info("The workflow was submitted to the scheduler (%s): outputs appear in %s "
                    "as the jobs finish; then run the same command with --reports-only "
                    "to write the reports", settings["plugin"], ex.output_dir)
        return 0
    _write_reports(config, data, started)
    LOGGER.info("qsmprep finished; outputs in %s", ex.output_dir)
    return 0


def check_work_dir(bids_dir, work_dir):
    """Refuse a work folder inside the input dataset (qsmprep never writes there)."""
    from ..bids import QSMPrepInputError

    if Path(work_dir).resolve().is_relative_to(Path(bids_dir).resolve()):
        raise QSMPrepInputError(
            f"The work folder {work_dir} is inside the input dataset; qsmprep never "
            "writes into it: give -w a folder outside the dataset"
        )


def failure_summary(config, data, err):
    """What to print when processing failed: one line giving the failed subjects
    and the first reason, then one line per crash file."""
    ex = config.execution
    crashes = {s: sorted(ex.log_dir(s).glob("crash-*")) for s in data}
    failed = [s for s in data if crashes[s]]
    if not failed:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        logs = ", ".join(str(ex.log_dir(s)) for s in data)
        return f"qsmprep: error: processing failed ({reason}); crash files are in {logs}"
    lines = [
        f"qsmprep: error: {len(failed)} of {len(data)} subject(s) failed "
        f"({', '.join(f'sub-{s}' for s in failed)}): {_crash_reason(crashes[failed[0]][0])}"
    ]
    lines += [f"  sub-{s}: {path}" for s in failed for path in crashes[s]]
    return "\n".join(lines)


def _crash_reason(path):
    """The exception line of a Nipype crash file (its last non-empty line)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"see {path}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else f"see {path}"


def _write_reports(config, data, started=None):
    """One HTML report per subject (also after a failure: it lists the crashes),
    with each run's step timings and warnings added to its summary."""
    from ..reports.core import generate_report

    for subject in data:
        try:
            _add_run_info(config, subject, data[subject], started)
            path = generate_report(config.execution.output_dir, subject,
                                   config.execution.run_uuid)
            LOGGER.info("Report of sub-%s: %s", subject, path)
        except Exception:  # a broken report must not hide the processing result
            LOGGER.exception("Could not build the report of sub-%s", subject)


def _add_run_info(config, subject, runs, started):
    """Step timings, reused steps and this subject's warnings into each run summary."""
    import json

    from ..reports.core import figure_name
    from ..bids.runs import ENTITY_KEYS
    from ..utils.files import write_text
    from ..utils.runinfo import step_timings, subject_warnings
    from ..workflows.base import run_work_dir

    ex = config.execution
    warnings = subject_warnings(_warnings_file(config), subject)
    for run in runs:
        entities = {ENTITY_KEYS.get(k, k): v for k, v in run.entity_dict.items()}
        summary = (Path(ex.output_dir) / f"sub-{subject}" / "figures"
                   / figure_name({**entities, "sub": subject}, "summary", ".json"))
        if not summary.is_file():  # the run failed before its summary was written
            continue
        timings, reused = step_timings(run_work_dir(ex.work_dir, subject, run), since=started)
        info = json.loads(summary.read_text())
        info["timings_s"] = timings
        info["warnings"] = warnings + (
            [f"{len(reused)} step(s) reused from the work folder: {', '.join(reused)}"]
            if reused else [])
        write_text(summary, json.dumps(info, indent=2))


def _warnings_file(config):
    return Path(config.execution.work_dir) / f"warnings-{config.execution.run_uuid}.log"


def _run_group(config):
    from ..workflows.group import write_group_outputs

    try:
        paths = write_group_outputs(config.execution.output_dir,
                                    nprocs=config.nipype.resolved()[0])
    except FileNotFoundError as err:
        print(f"qsmprep: error: {err}", file=sys.stderr)
        return 1
    LOGGER.info("Group table of all processed runs written to %s; regions %s; report %s",
                paths["runs"], paths["regions"], paths["report"])
    return 0


def _configure_nipype(config):
    from nipype import config as ncfg
    from nipype import logging as nlogging

    level = {0: "WARNING", 1: "INFO"}.get(config.execution.verbosity, "DEBUG")
    ncfg.update_config({
        "logging": {"workflow_level": level, "interface_level": level,
                    "utils_level": level},
        "execution": {
            "crashfile_format": config.nipype.crashfile_format,
            "stop_on_first_crash": config.execution.stop_on_first_crash,
            "check_version": False,
            "remove_node_directories": False,
            "poll_sleep_duration": 0.2,
        },
        "monitoring": {"enabled": False},
    })
    nlogging.update_logging(ncfg)


def _setup_logging(verbosity):
    level = logging.INFO if verbosity < 2 else logging.DEBUG
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s | %(name)s | %(levelname)s | %(message)s",
                                           "%H:%M:%S"))
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
