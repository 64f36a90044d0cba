"""Test helpers: where the shared real data lives, and a multi-echo GRE simulator."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


def shared_data_dir():
    """Directory of the shared test data (``romeo-invivo/``, ``challenge2-head/``).

    ``$QSMPREP_SHARED_DATA`` if set, else ``shared/data`` beside the repository
    (``<repo>/../shared/data``) or inside it. Skips the calling test, with the
    reason, when none exists.
    """
    here = Path(__file__).resolve()
    candidates = [Path(os.environ["QSMPREP_SHARED_DATA"])] if "QSMPREP_SHARED_DATA" in os.environ else []
    candidates += [here.parents[2] / "shared" / "data", here.parents[1] / "shared" / "data"]
    for path in candidates:
        if path.is_dir():
            return path
    pytest.skip(
        "shared test data not found (set QSMPREP_SHARED_DATA or put shared/data beside the "
        f"repository); looked in: {', '.join(map(str, candidates))}"
    )


def save_volumes(folder, affine, **volumes):
    """Write each array of ``volumes`` as ``folder/<name>.nii.gz`` (float32, with
    ``affine``); returns ``{name: path}`` (str), for the Nipype interfaces."""
    import nibabel as nb

    files = {}
    for name, data in volumes.items():
        files[name] = str(Path(folder) / f"{name}.nii.gz")
        nb.save(nb.Nifti1Image(np.asarray(data, np.float32), affine), files[name])
    return files


def smooth_field_hz(shape, *, amplitude_hz=150.0, seed=0):
    """A smooth B0 field (Hz): a quadratic plus Gaussian blobs, median 0."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape],
                          indexing="ij", sparse=True)
    field = 0.6 * x**2 - 0.5 * y * z + 0.4 * z + 0.3 * x * y
    for _ in range(5):
        c = rng.uniform(-0.5, 0.5, 3)
        s = rng.uniform(0.15, 0.3)
        field = field + rng.uniform(-0.5, 0.5) * np.exp(
            -((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    field = amplitude_hz * field / np.abs(field).max()
    return (field - np.median(field)).astype(np.float32)


def simulate_multi_echo(shape=(64, 64, 64), echo_times_s=(0.005, 0.010, 0.015, 0.020), *,
                        amplitude_hz=150.0, snr=40.0, t2star_s=0.04, seed=0):
    """Multi-echo GRE of a sphere in a smooth B0 field, complex Gaussian noise.

    Returns ``(phase, magnitude, field_hz, mask)``: wrapped phase (rad) and
    magnitude (X, Y, Z, E), the true field (Hz) and the object mask. ``snr`` is
    the first echo's signal over the noise std per channel.
    """
    rng = np.random.default_rng(seed)
    field = smooth_field_hz(shape, amplitude_hz=amplitude_hz, seed=seed)
    grid = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    mask = sum(g**2 for g in grid) < (0.44 * min(shape)) ** 2
    te = np.asarray(echo_times_s, dtype=np.float32)
    rho = mask[..., None] * np.exp(-(te - te[0]) / t2star_s)
    signal = rho * np.exp(2j * np.pi * field[..., None] * te)
    noise = (rng.standard_normal(signal.shape) + 1j * rng.standard_normal(signal.shape)) / snr
    s = signal + noise
    return (np.angle(s).astype(np.float32), np.abs(s).astype(np.float32), field, mask)
