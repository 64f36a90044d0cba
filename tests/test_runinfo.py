"""Run information for the report: warnings per subject and step timings."""

import logging
import os
import time

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qsmprep.utils.runinfo import record_warnings, step_timings, subject_warnings


def test_warnings_are_recorded_one_per_line_and_split_by_subject(tmp_path):
    path = tmp_path / "warnings.log"
    handler = record_warnings(path, logger_name="qsmprep.test_runinfo")
    log = logging.getLogger("qsmprep.test_runinfo")
    log.setLevel(logging.INFO)
    try:
        log.info("sub-01: not a warning")
        log.warning("/data/sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz: no Units;\n"
                    "  taken as rad")
        log.warning("/data/sub-02/anat/x.nii.gz: NaN voxels zeroed")
        log.warning("/data/sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz: no Units;\n"
                    "  taken as rad")
    finally:
        log.removeHandler(handler)
        handler.close()
    one = subject_warnings(path, "01")
    assert one == ["/data/sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz: no Units; "
                   "taken as rad"]
    assert subject_warnings(path, "02") == ["/data/sub-02/anat/x.nii.gz: NaN voxels zeroed"]
    assert subject_warnings(path, "03") == []
    assert subject_warnings(tmp_path / "missing.log", "01") == []


def _sleep(seconds):
    import time

    time.sleep(seconds)
    return seconds


def test_step_timings_come_from_nipype_results_and_flag_reused_steps(tmp_path):
    wf = pe.Workflow(name="run_wf", base_dir=str(tmp_path))
    fast = pe.Node(niu.Function(function=_sleep, input_names=["seconds"],
                                output_names=["out"]), name="fast")
    fast.inputs.seconds = 0.0
    slow = pe.Node(niu.Function(function=_sleep, input_names=["seconds"],
                                output_names=["out"]), name="slow")
    slow.inputs.seconds = 0.5
    wf.add_nodes([fast, slow])
    wf.run()
    timings, reused = step_timings(tmp_path / "run_wf", since=0)
    assert set(timings) == {"fast", "slow"} and reused == []
    assert timings["slow"] >= 0.45 > timings["fast"]

    later = time.time() + 1
    os.utime(tmp_path / "run_wf" / "fast" / "result_fast.pklz", (later - 100, later - 100))
    _, reused = step_timings(tmp_path / "run_wf", since=later - 50)
    assert reused == ["fast"]
