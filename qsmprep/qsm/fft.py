"""One FFT helper for the whole package: scipy.fft with worker threads.

All k-space work in :mod:`qsmprep.qsm` goes through :func:`fftn` /
:func:`ifftn` so that the number of threads and the padding policy are set in
one place. Iterative solvers that should also run on CUDA use torch instead
(see :mod:`qsmprep.qsm.torch_ops`).
"""

from __future__ import annotations

import os

import numpy as np
import scipy.fft as sfft

_WORKERS = None


def set_workers(n):
    """Set the number of threads used by FFTs (None: all cores).

    Returns the previous setting, so that a caller can restore it.
    """
    global _WORKERS
    previous = _WORKERS
    _WORKERS = None if n is None else max(1, int(n))
    return previous


def workers():
    """Number of FFT worker threads in use."""
    return _WORKERS if _WORKERS is not None else (os.cpu_count() or 1)


def fftn(x, axes=(0, 1, 2)):
    """Complex FFT over the spatial axes (complex64 in, complex64 out)."""
    return sfft.fftn(x, axes=axes, workers=workers())


def ifftn(x, axes=(0, 1, 2)):
    """Inverse complex FFT over the spatial axes."""
    return sfft.ifftn(x, axes=axes, workers=workers())


def rfftn(x):
    """Real FFT over the three spatial axes (float32 in, complex64 out; the last
    axis halved)."""
    return sfft.rfftn(x, axes=(0, 1, 2), workers=workers())


def irfftn(x, shape):
    """Inverse of :func:`rfftn` onto the spatial ``shape``."""
    return sfft.irfftn(x, s=tuple(shape), axes=(0, 1, 2), workers=workers())


def fast_shape(shape, *, factor=1.0, margin=0, even_last=False):
    """Padded shape: each axis at least ``factor * n + margin``, rounded up to
    a size FFTs handle fast (products of small primes); with ``even_last`` the
    last axis to an even one: real FFTs halve it, and torch's (MKL) real FFT
    of an odd length took 1.06-1.31 times as long (benchmarks/fft_sizes.py).
    TFI pads that way; the other methods keep the padding their published
    tables and the learned methods' weights were made with (the TV-ADMM start
    of IR2QSM and U-Net changes with it, and so do their check scores)."""
    sizes = [sfft.next_fast_len(int(np.ceil(n * factor)) + int(margin)) for n in shape]
    while even_last and sizes[-1] % 2:
        sizes[-1] = sfft.next_fast_len(sizes[-1] + 1)
    return tuple(sizes)


def pad(x, shape):
    """Zero-pad ``x`` (spatial axes first) to ``shape``, data centred.

    Returns the padded array and the slices that crop it back.
    """
    x = np.asarray(x)
    before = [(s - n) // 2 for n, s in zip(x.shape[:3], shape)]
    widths = [(b, s - n - b) for b, n, s in zip(before, x.shape[:3], shape)]
    widths += [(0, 0)] * (x.ndim - 3)
    slices = tuple(slice(b, b + n) for b, n in zip(before, x.shape[:3]))
    return np.pad(x, widths), slices
