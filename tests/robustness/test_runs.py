"""Runs that go wrong: a full disk, two jobs sharing one output folder,
SIGTERM and restart, a failing subject among others.

A full disk is simulated portably, without root or a tmpfs mount: the
writing code runs in a subprocess whose file-size limit (``RLIMIT_FSIZE``)
is tiny and which ignores ``SIGXFSZ``, so a write past the limit fails with
``EFBIG`` exactly where ``ENOSPC`` would. The CLI tests run ``qsmprep`` on
24^3 volumes (marked slow: ~2 min together).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from _chain import centered_affine, sphere_signal, write_run

from qsmprep.workflows.outputs import write_derivatives_description

TE = (0.004, 0.008, 0.012)
SHAPE = (24, 24, 24)
AFFINE = centered_affine(np.diag([2.5, 2.5, 2.5]), SHAPE)
QSM_WF = Path("qsmprep_wf") / "sub_01_wf" / "qsm_MEGRE_wf"


#: environment of a size-limited child: a short write under RLIMIT_FSIZE is not an
#: error for CPython's bytecode cache, which would leave truncated .pyc files behind
#: (EOFError "marshal data too short" in every later import), so it writes none
LIMITED_ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def _limit_file_size(limit_bytes):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return preexec


def _python(code, limit_bytes):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, preexec_fn=_limit_file_size(limit_bytes), timeout=120,
                          env=LIMITED_ENV)


def _no_temporaries(root):
    return [p for p in Path(root).rglob("*") if p.name.startswith(".tmp-")
            or ".qsmprep-staging" in p.parts and p.is_file()]


# --------------------------------------------------------------------------
# full disk
# --------------------------------------------------------------------------
def test_disk_full_keeps_previous_outputs(tmp_path):
    out = tmp_path / "out"
    write_derivatives_description(tmp_path, out)
    previous_desc = (out / "dataset_description.json").read_text()
    image = out / "sub-01_Chimap.nii.gz"
    ref = nb.Nifti1Image(np.zeros(SHAPE, np.float32), AFFINE)
    nb.save(ref, image)
    previous_image = image.read_bytes()
    proc = _python(f"""
        import sys
        import numpy as np, nibabel as nb
        from qsmprep.utils.files import OutputSpaceError
        from qsmprep.utils.images import save_like
        from qsmprep.workflows.outputs import write_derivatives_description
        ref = nb.load({str(image)!r})
        for write in (lambda: save_like(np.random.rand(*ref.shape), ref, {str(image)!r}),
                      lambda: write_derivatives_description({str(tmp_path)!r}, {str(out)!r})):
            try:
                write()
            except OutputSpaceError as err:
                print(err)
        """, limit_bytes=300)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 2, proc.stderr
    assert "No space to write" in lines[0] and str(image) in lines[0]
    assert "dataset_description.json" in lines[1] and "intact" in lines[1]
    assert image.read_bytes() == previous_image
    assert (out / "dataset_description.json").read_text() == previous_desc
    assert not _no_temporaries(out)


def test_disk_full_in_the_derivatives_sink(tmp_path):
    """The sink stages every file and renames it into place: a full disk
    leaves the previous output and no staged file."""
    from conftest import write_gre

    bids = tmp_path / "bids"
    files = write_gre(bids, shape=SHAPE)
    out = tmp_path / "out"
    chimap = out / "sub-01" / "anat" / "sub-01_Chimap.nii.gz"
    chimap.parent.mkdir(parents=True)
    chimap.write_bytes(b"previous run")
    source = nb.load(files["phase"][0])
    nb.save(nb.Nifti1Image(np.random.rand(*SHAPE).astype(np.float32), source.affine),
            tmp_path / "chi.nii.gz")
    proc = _python(f"""
        from qsmprep.interfaces.bids import DerivativesDataSink
        from qsmprep.utils.files import OutputSpaceError
        sink = DerivativesDataSink(base_directory={str(out)!r},
                                   source_file={str(files["phase"][0])!r},
                                   in_file={str(tmp_path / "chi.nii.gz")!r}, suffix="Chimap",
                                   dismiss_entities=["echo", "part"], compress=True,
                                   check_hdr=False)
        try:
            sink.run(cwd={str(tmp_path)!r})
        except OutputSpaceError as err:
            print(err)
        """, limit_bytes=2000)
    assert f"No space to write the outputs into {out}" in proc.stdout, proc.stderr[-2000:]
    assert chimap.read_bytes() == b"previous run"
    assert not _no_temporaries(out)


# --------------------------------------------------------------------------
# concurrent writers of the shared files
# --------------------------------------------------------------------------
def _write_many(args):
    bids, out, n = args
    from qsmprep.config import Config

    config = Config()
    for _ in range(n):
        write_derivatives_description(bids, out)
        config.to_toml(Path(out) / "logs" / "qsmprep.toml")
    return True


def test_concurrent_writers_never_expose_a_partial_file(tmp_path):
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    ctx = multiprocessing.get_context("fork")  # workers inherit the imports
    with ctx.Pool(2) as pool:
        pending = pool.map_async(_write_many, [(tmp_path, out, 50)] * 2)
        reads = 0
        while not pending.ready():
            desc = out / "dataset_description.json"
            if desc.exists():
                assert json.loads(desc.read_text())["DatasetType"] == "derivative"
                reads += 1
        assert all(pending.get(timeout=120))
    assert reads > 0 and not _no_temporaries(out)


# --------------------------------------------------------------------------
# the qsmprep command
# --------------------------------------------------------------------------
def _qsmprep(bids, out, work, *args, wait=True, preexec_fn=None):
    cmd = [sys.executable, "-m", "qsmprep.cli.run", str(bids), str(out), "participant",
           "-w", str(work), "--nprocs", "2", "--device", "cpu", *map(str, args)]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, preexec_fn=preexec_fn,
                              timeout=600, env=LIMITED_ENV if preexec_fn else None)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _live_processes(pgid):
    """Processes of group ``pgid`` that are not zombies (Linux /proc)."""
    live = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(stat_file.parent.name)
    return live


def _error_lines(proc_stderr):
    lines = proc_stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("qsmprep: error:"))
    return lines[start:]


@pytest.fixture(scope="module")
def bids(tmp_path_factory):
    """sub-01 and sub-02: good three-echo runs; sub-03: magnitude all zero."""
    root = tmp_path_factory.mktemp("cli") / "bids"
    sig = sphere_signal(AFFINE, SHAPE, TE)[0]
    write_run(root, sig, AFFINE, TE, subject="01")
    write_run(root, sig, AFFINE, TE, subject="02")
    write_run(root, sig, AFFINE, TE, subject="03",
              encode=lambda part, vol: vol * 0 if part == "mag" else vol)
    return root


@pytest.mark.slow
def test_disk_full_cli_one_line_and_exit_code(bids, tmp_path):
    out = tmp_path / "out"
    write_derivatives_description(bids, out)
    before = (out / "dataset_description.json").read_text()
    proc = _qsmprep(bids, out, tmp_path / "work", "--participant-label", "01",
                    "--boilerplate-only", preexec_fn=_limit_file_size(200))
    assert proc.returncode == 1
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "No space to write" in lines[0], proc.stderr[-2000:]
    assert (out / "dataset_description.json").read_text() == before
    assert not _no_temporaries(out)


@pytest.fixture(scope="module")
def concurrent(bids, tmp_path_factory):
    """Two jobs at the same time into one output folder: sub-01, and sub-02
    with sub-03 (which fails)."""
    tmp = tmp_path_factory.mktemp("concurrent")
    procs = [_qsmprep(bids, tmp / "out", tmp / f"work{i}", "--participant-label", *labels,
                      wait=False) for i, labels in enumerate((["01"], ["02", "03"]))]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    return tmp / "out", [p.returncode for p in procs], errors


@pytest.mark.slow
def test_two_jobs_share_one_output_folder(concurrent):
    out, codes, errors = concurrent
    assert codes[0] == 0, errors[0]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    for s in ("01", "02"):
        for name in ("Chimap", "desc-brain_mask", "fieldmap", "desc-local_fieldmap"):
            img = nb.load(out / f"sub-{s}" / "anat" / f"sub-{s}_{name}.nii.gz")
            assert np.isfinite(img.get_fdata()).all() and img.shape == SHAPE
    # same data for both subjects: the jobs did not mix their files
    a, b = (nb.load(out / f"sub-{s}" / "anat" / f"sub-{s}_Chimap.nii.gz").get_fdata()
            for s in ("01", "02"))
    np.testing.assert_array_equal(a, b)
    assert not (out / "sub-03" / "anat").exists()
    assert not _no_temporaries(out)


@pytest.mark.slow
def test_failed_subject_summary_and_exit_code(concurrent):
    out, codes, errors = concurrent
    assert codes[1] == 1
    lines = _error_lines(errors[1])
    assert lines[0].startswith("qsmprep: error: 1 of 2 subject(s) failed (sub-03): ")
    assert "magnitude is zero everywhere" in lines[0] and "sub-03_echo-1_part-mag" in lines[0]
    crash = Path(lines[1].split("sub-03: ")[1])
    assert len(lines) == 2 and crash.is_file() and crash.parent.parent.name == "log"
    assert crash.is_relative_to(out / "sub-03")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_kill_then_restart_resumes_with_identical_outputs(bids, concurrent, tmp_path, signum):
    """SIGTERM to the main process (as ``kill <pid>``): workers stopped, one
    line, exit 143. SIGKILL to the whole job (as a scheduler does): nothing
    can run, but a restart still resumes and no partial file is visible."""
    out, work = tmp_path / "out", tmp_path / "work"
    marker = work / QSM_WF / "load" / "result_load.pklz"
    proc = _qsmprep(bids, out, work, "--participant-label", "01", wait=False)
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists() and proc.poll() is None, "the run ended before the signal"
    if signum == signal.SIGTERM:
        os.kill(proc.pid, signum)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signum
        assert _error_lines(err) == [
            f"qsmprep: error: interrupted by SIGTERM; finished steps are kept in {work}: "
            "run the same command again to resume"]
        time.sleep(0.5)
        assert not _live_processes(proc.pid)  # no worker left running
    else:
        os.killpg(proc.pid, signum)
        proc.communicate(timeout=60)
    assert not (out / "sub-01" / "anat" / "sub-01_Chimap.nii.gz").exists()
    for path in out.rglob("*.nii.gz"):  # whatever is visible is complete
        assert np.isfinite(nb.load(path).get_fdata()).all()
    cached = {p: p.stat().st_mtime_ns for p in (work / QSM_WF).glob("*/result_*.pklz")}
    assert marker in cached

    proc = _qsmprep(bids, out, work, "--participant-label", "01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path, mtime in cached.items():
        assert path.stat().st_mtime_ns == mtime, f"{path.parent.name} was recomputed"
    baseline = concurrent[0] / "sub-01" / "anat"
    differ = [name for name in ("fieldmap", "desc-brain_mask", "desc-local_fieldmap", "Chimap")
              if not np.array_equal(
                  nb.load(out / "sub-01" / "anat" / f"sub-01_{name}.nii.gz").get_fdata(),
                  nb.load(baseline / f"sub-01_{name}.nii.gz").get_fdata())]
    assert not differ, f"differ from the uninterrupted run: {differ}"
