"""Container and cluster files: Dockerfile lint, CircleCI schema, the bootstrap scripts
the images run, and the Nipype plugin files of docs/hpc.md through qsmprep's real
``--use-plugin`` path (the "graph-plugin test").

No docker here: building and running the image is ``make test-container``
(bids_app_bootstrap/host/test_container.sh).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qsmprep.cli.parser import parse_args
from qsmprep.cli.run import main as qsmprep_main
from qsmprep.bids import QSMPrepInputError
from qsmprep.bids.discover import check_writable_dir

REPO = Path(__file__).resolve().parents[1]
BOOT = REPO / "bids_app_bootstrap"
PLUGIN_DIR = BOOT / "plugins"


def _tool(name):
    """A console script of the test extra: on PATH or next to this Python."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' (pyproject.toml)")
    return path


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_boot_{name}", BOOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- linters ------------------------------------------------------------------------------

def test_dockerfile_is_hadolint_clean():
    """hadolint at its strictest threshold (info): any finding fails, ignored rules are
    only the ones with a justifying comment in the Dockerfile."""
    run = subprocess.run([_tool("hadolint"), "--failure-threshold", "info", "Dockerfile"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    text = (REPO / "Dockerfile").read_text()
    for match in re.finditer(r"# hadolint ignore=(\S+)", text):
        before = text[:match.start()].splitlines()[-3:]
        assert any(rule in line for line in before for rule in match.group(1).split(",")) \
            or "hadolint ignore" in " ".join(before), f"{match.group(0)} lacks a reason"


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint is live: an unpinned `pip install` and a root image fail it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm-slim\nRUN pip install numpy\n")
    run = subprocess.run([_tool("hadolint"), str(bad)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode != 0 and "DL3013" in run.stdout


def _stages(dockerfile):
    """{stage name: its text} of a multi-stage Dockerfile."""
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", dockerfile, flags=re.M | re.I)
    return dict(zip(parts[1::2], parts[2::2]))


def test_build_time_secrets_and_wheels_never_reach_a_layer():
    """The CA bundle is a BuildKit secret and local wheels a bind mount: only RUN
    --mount uses them, the runtime image copies nothing from the `wheels` stage, and
    the build context / git keep work folders, venvs and wheels out."""
    text = (REPO / "Dockerfile").read_text()
    stages = _stages(text)
    assert list(stages)[-1] == "runtime" and {"base", "wheels", "builder", "test"} <= set(stages)
    for name, body in stages.items():
        for line in body.splitlines():
            if "from=wheels" in line or "pip_cert" in line:
                assert "--mount=type=" in line, f"{name}: {line}"
        if name != "wheels":
            assert not re.search(r"^COPY\b.*\.docker-wheel", body, re.M), name
    runtime = stages["runtime"]
    assert "COPY --from=wheels" not in runtime and "/run/secrets" not in runtime
    assert re.search(r"^USER\s+(?!0\b|root\b)\S+", runtime, re.M)  # not root
    assert 'ENTRYPOINT ["qsmprep"]' in runtime
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M)  # a public default
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "work", "demo", "out"} <= set(ignored)
    assert ".docker-wheels" not in ignored  # the wheels stage reads it
    gitignore = (REPO / ".gitignore").read_text().split()
    assert {".docker-wheels/", ".container-test/", "*.sif", "*.tar"} <= set(gitignore)


def _check_circleci(path):
    return subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.circle-ci", str(path)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY":
             "http://127.0.0.1:9"},  # the schema is vendored: no network needed
    )


def test_circleci_config_passes_the_schema():
    run = _check_circleci(REPO / ".circleci" / "config.yml")
    assert run.returncode == 0, run.stdout + run.stderr


def test_circleci_schema_check_rejects_a_broken_config(tmp_path):
    config = yaml.safe_load((REPO / ".circleci" / "config.yml").read_text())
    job = next(iter(config["jobs"].values()))
    job["steps"] = "checkout"  # must be a list
    broken = tmp_path / "config.yml"
    broken.write_text(yaml.safe_dump(config))
    assert _check_circleci(broken).returncode != 0


def test_circleci_builds_tests_demos_and_pushes_on_tags():
    config = yaml.safe_load((REPO / ".circleci" / "config.yml").read_text())
    text = json.dumps(config)
    assert "--target test" in text and "qsmprep-demo-data" in text
    assert any("store_artifacts" in step for job in config["jobs"].values()
               for step in job["steps"] if isinstance(step, dict))
    jobs = [j for wf in config["workflows"].values() if isinstance(wf, dict)
            for j in wf.get("jobs", [])]
    deploy = [j for j in jobs if isinstance(j, dict) and "deploy" in j]
    assert deploy and deploy[0]["deploy"]["filters"]["tags"]["only"]


# -- bootstrap scripts --------------------------------------------------------------------

@pytest.mark.parametrize("argv,cpus,expected", [
    ([], 2, 2),                                        # min(8, nprocs = all CPUs)
    ([], 32, 8),                                       # capped at 8, as qsmprep
    (["--nprocs", "4"], 32, 4),
    (["--omp-nthreads", "3", "--nprocs", "6"], 32, 3),
    (["--omp-nthreads=6", "--nthreads", "2"], 32, 2),  # never more than --nprocs
    (["--omp-nthreads", "bad"], 4, 4),                 # qsmprep itself rejects it
])
def test_entrypoint_threads_follow_omp_nthreads(argv, cpus, expected):
    entry = _load("entrypoint")
    assert entry.thread_count(argv, cpus) == expected


def test_entrypoint_threads_agree_with_qsmprep(tmp_path):
    """The wrapper's rule is qsmprep's own (Nipype.resolved) for the same options."""
    entry = _load("entrypoint")
    for extra in ([], ["--nprocs", "3"], ["--nprocs", "5", "--omp-nthreads", "2"]):
        config = parse_args([str(tmp_path), str(tmp_path / "o"), "participant", *extra])
        assert entry.thread_count(extra, os.cpu_count()) == config.nipype.resolved()[1]


def test_entrypoint_keeps_user_thread_settings():
    entry = _load("entrypoint")
    env = entry.thread_environment(["--omp-nthreads", "2"], {"OMP_NUM_THREADS": "5"}, 8)
    assert "OMP_NUM_THREADS" not in env and env["MKL_NUM_THREADS"] == "2"


def test_entrypoint_prints_environment_and_runs_qsmprep(tmp_path):
    """The real wrapper script, handing over to this venv's qsmprep."""
    real = shutil.which("qsmprep") or str(Path(sys.executable).parent / "qsmprep")
    env = {**os.environ, "QSMPREP_REAL": real, "HOME": str(tmp_path / "missing")}
    env.pop("OMP_NUM_THREADS", None)
    run = subprocess.run([sys.executable, str(BOOT / "entrypoint.py"), str(tmp_path / "nope"),
                          str(tmp_path / "out"), "participant", "--omp-nthreads", "1",
                          "-w", str(tmp_path / "work")],
                         env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 1
    assert "qsmprep-container | device: " in run.stderr
    assert "OMP_NUM_THREADS=1" in run.stderr
    assert "is not a BIDS dataset" in run.stderr  # qsmprep's own error, after the banner
    quiet = subprocess.run([sys.executable, str(BOOT / "entrypoint.py"), "--version"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0 and "qsmprep-container" not in quiet.stderr
    assert quiet.stdout.startswith("qsmprep ")


def test_verify_weights_accepts_shipped_and_rejects_changed(tmp_path, capsys):
    verify = _load("verify_weights")
    assert verify.main() == 0
    models = tmp_path / "models"
    shutil.copytree(REPO / "qsmprep" / "data" / "models", models)
    data = bytearray((models / "unet.pt").read_bytes())
    data[-100] ^= 0xFF
    (models / "unet.pt").write_bytes(bytes(data))
    capsys.readouterr()
    assert verify.main(models) == 1
    err = capsys.readouterr().err
    assert "FAILED unet.pt" in err and "sha256" in err and "nextqsm.pt" not in err


def test_prefetch_templates_offline(tmp_path, monkeypatch):
    """An empty template list gives TemplateFlow's skeleton, with no network; in it,
    every line of the image's templates.txt matches files (api.ls, which does not
    download), and those files are what qsmprep looks up for MNI152NLin2009cAsym and
    --regions-atlas MASSP20."""
    import nibabel as nb
    import numpy as np

    from qsmprep.regions.atlases import find_atlas
    from qsmprep.regions.templates import find_template

    home = tmp_path / "tf"
    empty = tmp_path / "none.txt"
    empty.write_text("# nothing\n")
    env = {**os.environ, "TEMPLATEFLOW_HOME": str(home), "TEMPLATEFLOW_AUTOUPDATE": "0",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    # one process (TemplateFlow reads its home on import): the script's main, then api.ls
    run = subprocess.run(
        [sys.executable, "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); "
         "import prefetch_templates as p; code = p.main(sys.argv[2]); "
         "from templateflow import api; "
         "print(json.dumps([[str(f) for f in api.ls(n, **kw)] "
         "for n, kw in p.read_templates(sys.argv[3])])); sys.exit(code)",
         str(BOOT), str(empty), str(BOOT / "templates.txt")],
        env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "prefetch_templates: TemplateFlow home" in run.stdout
    assert (home / "tpl-MNI152NLin2009cAsym" / "template_description.json").is_file()
    per_line = json.loads(run.stdout.splitlines()[-1])
    assert per_line and all(per_line), per_line  # every line matches some files
    # the listed files, as the build fetches them (real images), in a TemplateFlow tree
    fetched = tmp_path / "fetched"
    img = nb.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4))
    for path in map(Path, sum(per_line, [])):
        dest = fetched / path.relative_to(home)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.name.endswith(".nii.gz"):
            nb.save(img, dest)
        else:
            assert path.stat().st_size > 0, path  # the skeleton holds the real tables
            shutil.copyfile(path, dest)
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(fetched))
    assert find_template("MNI152NLin2009cAsym").name.endswith("_res-01_T2w.nii.gz")
    assert find_template("MNI152NLin2009cAsym", ("T1w",)).name.endswith("_res-01_T1w.nii.gz")
    atlas = find_atlas("MASSP20")
    assert atlas.dseg.parent.parent == fetched and "left-caudate" in atlas.lut.read_text()


def test_templates_file_parsing(tmp_path):
    prefetch = _load("prefetch_templates")
    listed = tmp_path / "t.txt"
    listed.write_text("# comment\nMNI152NLin2009cAsym resolution=1 suffix=T1w desc=None # x\n\n")
    assert prefetch.read_templates(listed) == [
        ("MNI152NLin2009cAsym", {"resolution": 1, "suffix": "T1w", "desc": None})]
    listed.write_text("MNI152NLin2009cAsym resolution\n")
    with pytest.raises(SystemExit, match="t.txt:1: expected key=value"):
        prefetch.read_templates(listed)


def _check_as_other_user(folder):
    """check_writable_dir(folder) in a forked child that drops root to nobody (root may
    write anywhere); the error message, or "" when the folder is writable."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        message = ""
        try:
            os.setgid(65534)
            os.setuid(65534)
            check_writable_dir(folder)
        except QSMPrepInputError as err:
            message = str(err)
        except BaseException as err:  # noqa: BLE001 - report anything to the parent
            message = f"unexpected {type(err).__name__}: {err}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        message = fh.read()
    os.waitpid(pid, 0)
    return message


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    """A read-only output folder (or the parent it would be made in) is refused before
    any work, naming the folder; checked as another user when the tests run as root."""
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="qsmprep-ro-"))  # traversable by the other user
    top.chmod(0o755)
    locked = top / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for target in (locked, locked / "derivatives" / "qsmprep"):
            if os.getuid() == 0:
                message = _check_as_other_user(target)
            else:
                with pytest.raises(QSMPrepInputError) as err:
                    check_writable_dir(target)
                message = str(err.value)
            assert f"{target} is not writable" in message and "--user" in message, message
        check_writable_dir(tmp_path / "new" / "out")  # creatable: fine, nothing made
        assert not (tmp_path / "new").exists()
    finally:
        locked.chmod(0o755)
        shutil.rmtree(top)


# -- graph-plugin test ----------------------------------------------------------------------

def _doc_plugin_blocks():
    """The ```yaml blocks of docs/hpc.md that are plugin files (have a 'plugin' key)."""
    text = (REPO / "docs" / "hpc.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    return [b for b in blocks if isinstance(b, dict) and "plugin" in b]


PLUGIN_FILES = sorted(PLUGIN_DIR.glob("*.yml"))


def test_docs_show_every_plugin_file():
    """docs/hpc.md shows exactly the shipped plugin files (same settings)."""
    shipped = [yaml.safe_load(p.read_text()) for p in PLUGIN_FILES]
    documented = _doc_plugin_blocks()
    assert sorted(map(json.dumps, documented)) == sorted(map(json.dumps, shipped))
    assert {s["plugin"] for s in shipped} >= {"MultiProc", "SLURMGraph", "SGEGraph",
                                             "PBSGraph"}


#: stand-ins for the submit commands: each records its arguments and answers like the
#: real one, so the job ids captured by Nipype's submit script can be followed
_RECORDERS = {
    "sbatch": 'echo "Submitted batch job $n"',
    "qsub": 'echo "Your job $n (\\"x\\") has been submitted"',
}


def _recorder_bin(tmp_path, answer):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name in ("sbatch", "qsub"):
        script = bindir / name
        script.write_text(
            "#!/bin/sh\n"
            f'log="{tmp_path}/submitted.txt"\n'
            'n=$(( $(cat "$log" 2>/dev/null | wc -l) + 1001 ))\n'
            'echo "$n $*" >> "$log"\n'
            + (answer or _RECORDERS[name]) + "\n")
        script.chmod(0o755)
    return bindir


@pytest.mark.parametrize("plugin_file", PLUGIN_FILES, ids=lambda p: p.stem)
def test_plugin_file_builds_and_submits_the_graph(plugin_file, synthetic_bids, tmp_path,
                                                  monkeypatch, caplog):
    """Each plugin file through qsmprep's real path (--use-plugin -> config -> Nipype):
    Graph plugins write one job script per node of the real graph and submit them in
    dependency order to a recording sbatch/qsub (no scheduler here); the first job's
    script is then run as the scheduler would and computes its node."""
    settings = yaml.safe_load(plugin_file.read_text())
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [str(synthetic_bids), str(out), "participant", "-w", str(work),
            "--skip-bids-validation", "--use-plugin", str(plugin_file)]
    config = parse_args(argv)
    assert config.nipype.plugin_settings()["plugin"] == settings["plugin"]
    from nipype.pipeline import plugins

    plugin_class = getattr(plugins, f"{settings['plugin']}Plugin")
    plugin_class(plugin_args=config.nipype.plugin_settings()["plugin_args"])  # accepted
    if not settings["plugin"].endswith("Graph"):
        assert config.nipype.plugin_settings()["plugin_args"] == {
            **settings.get("plugin_args", {})}
        return

    answer = 'echo "$n.pbs-server"' if settings["plugin"] == "PBSGraph" else None
    monkeypatch.setenv("PATH", f"{_recorder_bin(tmp_path, answer)}:{os.environ['PATH']}")
    caplog.set_level("INFO", logger="qsmprep")
    assert qsmprep_main(argv) == 0
    assert "submitted to the scheduler" in caplog.text and "--reports-only" in caplog.text
    assert not list(out.glob("sub-*.html"))  # nothing computed yet: no report

    batch = work / "qsmprep_wf" / "batch"
    pyfiles = sorted(batch.glob("*.pyscript")) or sorted(batch.glob("*.py"))
    scripts = sorted(batch.glob("batchscript_*.sh"))
    submitted = (tmp_path / "submitted.txt").read_text().splitlines()
    assert len(scripts) == len(submitted) == len(pyfiles) >= 10  # every node of the run
    args = settings["plugin_args"].get("sbatch_args") or settings["plugin_args"]["qsub_args"]
    ids = [int(line.split()[0]) for line in submitted]
    n_deps = 0
    for job_id, line in zip(ids, submitted):
        assert args in line, line
        deps = re.search(r"(?:--dependency=afterok:|-hold_jid ?|depend=afterok:)(\S+)", line)
        if deps:
            n_deps += 1
            parents = [int(d.split(".")[0]) for d in re.split("[:,]", deps.group(1)) if d]
            assert parents and all(p in ids and p < job_id for p in parents), line
    assert ids[0] == 1001 and "depend" not in submitted[0] and n_deps >= len(ids) - 2

    first = Path(submitted[0].split()[-1])  # the batch script of the first job
    assert first.is_file() and sys.executable in first.read_text()
    run = subprocess.run(["bash", str(first)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stdout + run.stderr
    assert list(work.glob("qsmprep_wf/**/result_*.pklz"))  # the node ran and kept a result


# -- SLURM array job ----------------------------------------------------------------------

def test_docs_show_the_slurm_array_script():
    text = (REPO / "docs" / "hpc.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert (BOOT / "slurm_array.sh").read_text() in blocks


def test_slurm_array_task_runs_its_participant(tmp_path):
    """Task N runs participant N of participants.tsv through `apptainer run --cleanenv`
    with the task's CPUs and memory (a recording apptainer stands in: none here)."""
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\nsub-02\t41\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "apptainer").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/call.txt\n')
    (bindir / "apptainer").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "BIDS": str(bids),
           "OUT": str(tmp_path / "out"), "SIF": "/c/qsmprep.sif",
           "SCRATCH": str(tmp_path / "scratch"), "SLURM_ARRAY_TASK_ID": "2",
           "SLURM_CPUS_PER_TASK": "6", "SLURM_MEM_PER_NODE": "16384"}
    run = subprocess.run(["bash", str(BOOT / "slurm_array.sh")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    call = (tmp_path / "call.txt").read_text().split()
    assert call[:2] == ["run", "--cleanenv"] and "/c/qsmprep.sif" in call
    assert f"{bids}:/data:ro" in call and f"{tmp_path}/scratch/qsmprep_work/sub-02:/work" in call
    tail = call[call.index("/c/qsmprep.sif") + 1:]
    assert tail == ["/data", "/out", "participant", "--participant-label", "sub-02", "-w",
                    "/work", "--nprocs", "6", "--omp-nthreads", "6", "--mem", "16"]
    env["SLURM_ARRAY_TASK_ID"] = "3"  # past the end of the table: a clear error
    run = subprocess.run(["bash", str(BOOT / "slurm_array.sh")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "no participant on line 4" in run.stderr
