#!/opt/qsmprep/bin/python
"""Entrypoint of the qsmprep images, installed as ``/usr/local/bin/qsmprep``.

Before handing over to the real ``qsmprep`` (``/opt/qsmprep/bin/qsmprep``) it

- pins the thread pools of the numerical libraries (OpenMP, OpenBLAS, MKL, numexpr,
  numba, torch) to ``--omp-nthreads`` (or qsmprep's default, min(8, --nprocs or the CPUs
  this container may use)), so that ``--nprocs`` processes do not each start one thread
  per core; variables the user set (``docker run -e OMP_NUM_THREADS=...``) are kept;
- gives a user without a writable home (``docker run --user $(id -u):$(id -g)``) a
  private one in /tmp, for the caches of matplotlib, numba and Nipype;
- prints the device (GPU or CPU), versions and thread settings to stderr, except for
  ``--help``/``--version``.
"""

from __future__ import annotations

import os
import sys
import tempfile

REAL_QSMPREP = os.environ.get("QSMPREP_REAL", "/opt/qsmprep/bin/qsmprep")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "NUMBA_NUM_THREADS")


def _option(argv, names):
    """Value of the last ``--name N`` / ``--name=N`` in argv (None when absent)."""
    value = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    return value


def available_cpus():
    """CPUs this process may run on (cgroup/affinity aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_count(argv, cpus=None):
    """Threads per process as qsmprep will use them: ``--omp-nthreads`` capped at
    ``--nprocs``, else min(8, nprocs) (qsmprep.config.Nipype.resolved)."""
    cpus = cpus or available_cpus()

    def positive(text):
        try:
            n = int(text)
        except (TypeError, ValueError):
            return None
        return n if n > 0 else None

    nprocs = positive(_option(argv, ("--nprocs", "--nthreads"))) or cpus
    omp = positive(_option(argv, ("--omp-nthreads",))) or min(8, nprocs)
    return min(omp, nprocs)


def thread_environment(argv, environ, cpus=None):
    """The thread variables to add to ``environ`` (those it already sets are kept)."""
    n = str(thread_count(argv, cpus))
    return {name: n for name in THREAD_VARS if not environ.get(name)}


def _writable_home(environ):
    home = environ.get("HOME", "")
    if home and os.path.isdir(home) and os.access(home, os.W_OK):
        return {}
    return {"HOME": tempfile.mkdtemp(prefix="qsmprep-home-")}


def banner(environ):
    """Lines describing the run environment (device, versions, threads)."""
    lines = []
    try:
        import torch

        if torch.cuda.is_available():
            device = (f"GPU: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, "
                      f"{torch.cuda.device_count()} visible)")
        else:
            device = "CPU only (no CUDA GPU visible to torch)"
        torch_version = torch.__version__
    except Exception as err:  # noqa: BLE001 - the banner must never stop a run
        device, torch_version = f"unknown ({err})", "not importable"
    try:
        from qsmprep.__about__ import __version__
    except Exception:  # noqa: BLE001
        __version__ = "unknown"
    threads = ", ".join(f"{k}={environ.get(k, '')}" for k in THREAD_VARS)
    lines.append(f"qsmprep {__version__} (container); Python {sys.version.split()[0]}, "
                 f"torch {torch_version}")
    lines.append(f"device: {device}; {available_cpus()} CPU(s) available")
    lines.append(f"threads: {threads}")
    lines.append(f"TEMPLATEFLOW_HOME={environ.get('TEMPLATEFLOW_HOME', '')}, "
                 f"HOME={environ.get('HOME', '')}, user {os.getuid()}:{os.getgid()}")
    return [f"qsmprep-container | {line}" for line in lines]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ
    environ.update(thread_environment(argv, environ))
    environ.update(_writable_home(environ))
    quiet = not argv or any(a in ("-h", "--help", "--version") for a in argv)
    if not quiet and environ.get("QSMPREP_NO_BANNER", "") in ("", "0"):
        for line in banner(environ):
            print(line, file=sys.stderr)
        sys.stderr.flush()
    os.execv(REAL_QSMPREP, [REAL_QSMPREP, *argv])


if __name__ == "__main__":
    main()
