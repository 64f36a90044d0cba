"""How a registry method runs: device, memory, threads, context, out-of-memory fallback.

The interfaces (:mod:`qsmprep.interfaces.qsm`) read files, make one call
:meth:`Execution.run` and write files; every decision about *how* the method
runs is here, in one place:

device
    the torch device of methods that take a ``device`` keyword
    (``--device``; "auto" is resolved once per run by :func:`resolve_device`).
memory (tiling)
    ``--mem`` becomes ``max_voxels``, the largest input of one network pass
    (:func:`max_voxels_for`); larger inputs are run in tiles by
    :func:`qsmprep.dl.inference.run_network`.
threads
    BLAS/OpenMP, ``scipy.fft``, numba and torch are limited to the node's
    threads while the method runs (:func:`threads`).
context keywords
    values a method may take besides its stage signature
    (:data:`CONTEXT_KEYWORDS`: voxel size, device, max_voxels, magnitude,
    N_std, echo times, the run's CSF core, the run's file). A method receives one only when its
    signature has a keyword of that name and the user did not set it as a parameter
    (:func:`passed_keywords`); a value read from a file is wrapped in
    :class:`Lazy` and only read when it is passed.
out-of-memory fallback
    a method on a CUDA device that runs out of GPU memory even in tiles is run
    again on the CPU, with a warning.

The workflow's methods text asks :func:`passed_keywords` too, so that what
the text states (e.g. the N_std weighting) is what the run passes.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

LOGGER = logging.getLogger("qsmprep")

#: memory budgeted per voxel of a deep-learning network's input (bytes): its
#: activations (tens of float32 channels at full resolution plus the coarser
#: levels); ``--mem`` divided by this caps the voxels of one inference pass
DL_BYTES_PER_VOXEL = 1024

#: keyword giving a method the noise map N_std (data weights 1/N_std)
NOISE_STD = "noise_std_ppm"

#: every context keyword a method may receive, and what it holds
CONTEXT_KEYWORDS = {
    "voxel_size_mm": "voxel size of the input grid, mm",
    "device": "torch device (execution: --device)",
    "max_voxels": "largest input of one network pass (execution: --mem)",
    "magnitude": "magnitude (root-sum-of-squares over echoes where a 3-D one is needed)",
    "magnitude_echoes": "the magnitude of every echo (X, Y, Z, E), echoes last",
    NOISE_STD: "N_std, the noise map of the field (ppm): data weights 1/N_std",
    "noise_std_absolute": "whether N_std has an absolute level (False: one echo, relative "
                          "values only)",
    "echo_times_s": "echo times of the magnitude's echoes (s)",
    "csf_region": "the run's ventricular CSF core, found once for the run (the csf_core "
                  "node), as (core, problem): qsmprep.qsm.reference.csf_mask's return",
    "source": "the run's input file, named in the method's warnings",
}


def max_voxels_for(mem_gb):
    """Largest network input (voxels) for ``mem_gb`` GB, or None without a limit."""
    return int(mem_gb * 2**30 / DL_BYTES_PER_VOXEL) if mem_gb > 0 else None


class Lazy:
    """A context value computed (e.g. read from a file) only when the method
    takes it, and at most once (two values derived from one file read it once)."""

    def __init__(self, compute):
        self.compute = compute

    def get(self):
        if self.compute is not None:
            self.value, self.compute = self.compute(), None
        return self.value


def _signature_keywords(stage, name):
    """Keyword names that method ``name`` of ``stage`` accepts (its function's signature)."""
    from .qsm import registry

    return set(inspect.signature(registry.get(stage, name).func).parameters)


def passed_keywords(stage, name, available, params=None):
    """The context keywords (of ``available``) that method ``name`` of ``stage``
    receives: those its signature takes, less those the user set in ``params``.

    This is the one rule :meth:`Execution.run` applies; the methods text uses
    it to state what the run passes.
    """
    unknown = set(available) - set(CONTEXT_KEYWORDS)
    if unknown:
        raise ValueError(f"Unknown context keyword(s) {sorted(unknown)}; declare them in "
                         "qsmprep.execution.CONTEXT_KEYWORDS")
    accepted = _signature_keywords(stage, name)
    return {k for k in available if k in accepted and k not in (params or {})}


def is_cuda_oom(err):
    """Whether ``err`` is torch's CUDA out-of-memory error (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(err, torch.cuda.OutOfMemoryError)


@contextmanager
def threads(n):
    """Limit BLAS/OpenMP, scipy.fft, numba and torch to ``n`` threads."""
    from threadpoolctl import threadpool_limits

    from .qsm import fft

    old_workers = fft.set_workers(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    if "numba" in sys.modules:
        numba = sys.modules["numba"]
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        with threadpool_limits(n):
            yield
    finally:
        fft.set_workers(old_workers)


def resolve_device(choice):
    """The torch device name for ``--device``: "auto" becomes "cuda" when a
    GPU is visible, else "cpu"; "cuda" without a GPU is an input error.

    This runs in the CLI's process, and Nipype's MultiProc workers are forked
    from it. torch's default check asks the CUDA runtime, which then cannot
    start in a forked child ("Cannot re-initialize CUDA in forked
    subprocess"), so the check is made through NVML
    (``PYTORCH_NVML_BASED_CUDA_CHECK=1``, set for the process unless the user
    set it), which leaves the workers free to use the GPU."""
    from .bids import QSMPrepInputError

    if choice == "cpu":
        return "cpu"
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if choice == "cuda":
        raise QSMPrepInputError(
            "--device cuda was requested but torch finds no CUDA GPU; use --device cpu or auto"
        )
    return "cpu"


@dataclass(frozen=True)
class Execution:
    """How one step runs its registry method.

    Parameters
    ----------
    device : str
        torch device ("cpu", "cuda", ...), given to methods that take ``device``.
    num_threads : int or None
        thread limit while the method runs; None leaves the thread pools as they are.
    mem_gb : float
        memory for the step (GB, ``--mem``); 0 means no limit (no ``max_voxels``).
    """

    device: str = "cpu"
    num_threads: int | None = None
    mem_gb: float = 0.0

    @property
    def max_voxels(self):
        return max_voxels_for(self.mem_gb)

    def context_for(self, stage, name, context=None, params=None):
        """The context keyword values method ``name`` of ``stage`` receives:
        ``context`` (data the caller knows: voxel size, magnitude, N_std) plus
        this execution's ``device`` and ``max_voxels``, kept by
        :func:`passed_keywords`, :class:`Lazy` values computed, None dropped."""
        available = {"device": self.device, "max_voxels": self.max_voxels, **(context or {})}
        keep = passed_keywords(stage, name, available, params)
        values = {k: v.get() if isinstance(v, Lazy) else v
                  for k, v in available.items() if k in keep}
        return {k: v for k, v in values.items() if v is not None}

    def run(self, stage, name, *args, params=None, context=None, **stage_kwargs):
        """``registry.run(stage, name, *args, **stage_kwargs, **context, **params)``
        with the context of :meth:`context_for`, under the thread limit; a CUDA
        out-of-memory is retried on the CPU with a warning."""
        from .qsm import registry

        params = dict(params or {})
        extra = self.context_for(stage, name, context, params)
        with threads(self.num_threads) if self.num_threads else nullcontext():
            try:
                return registry.run(stage, name, *args, **stage_kwargs, **extra, **params)
            except Exception as err:
                if not (is_cuda_oom(err) and str(extra.get("device", "")).startswith("cuda")):
                    raise
            import torch

            torch.cuda.empty_cache()
            LOGGER.warning("%s '%s' ran out of GPU memory even in tiles; running it on the "
                           "CPU (slower). Free the GPU or lower --mem to tile more finely.",
                           stage, name)
            extra["device"] = "cpu"
            return registry.run(stage, name, *args, **stage_kwargs, **extra, **params)
