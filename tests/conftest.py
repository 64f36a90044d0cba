"""Shared fixtures: a qsm-forward BIDS dataset and small synthetic GRE trees."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

#: grid of the qsm-forward dataset used by the end-to-end tests
QSM_FORWARD_RESOLUTION = (64, 64, 64)


@pytest.fixture(scope="session")
def qsm_forward_bids(tmp_path_factory):
    """A BIDS dataset simulated by ``qsm-forward simple`` (4 echoes, 7 T, with
    phase offset and shim field) and its ground-truth derivatives."""
    # the console script sits beside this interpreter even when its venv is not on PATH
    beside = Path(sys.executable).parent / "qsm-forward"
    exe = str(beside) if beside.is_file() else shutil.which("qsm-forward")
    if exe is None:
        pytest.skip("qsm-forward is not installed (pip install '.[test]')")
    root = tmp_path_factory.mktemp("qsmforward") / "bids"
    subprocess.run(
        [exe, "simple", str(root), "--resolution",
         *map(str, QSM_FORWARD_RESOLUTION)],
        check=True, capture_output=True,
    )
    return root


def write_dataset_description(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "synthetic", "BIDSVersion": "1.9.0"})
    )


def write_gre(root, subject="01", *, echo_times_s=(0.004, 0.008, 0.012), shape=(12, 10, 8),
              affine=None, entities="", suffix="MEGRE", four_d=False, meta=None,
              phase_meta=None, parts=("mag", "phase"), seed=0):
    """Write one synthetic multi-echo GRE run and return its files by part.

    The phase is a smooth field wrapped to -pi..pi (``Units: rad``), the
    magnitude a decaying ball. ``entities`` is inserted after ``sub-<s>``
    (e.g. ``"_ses-1_run-2"``); ``meta``/``phase_meta`` update the sidecars.
    """
    write_dataset_description(root)
    affine = np.diag([1.0, 1.0, 1.5, 1.0]) if affine is None else affine
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    ball = (np.sum(grid**2, axis=0) < 0.8).astype(np.float32)
    field_hz = 40 * grid[0] + 25 * grid[1] ** 2
    anat = root / f"sub-{subject}" / (entities.split("_")[1] if "_ses-" in entities else "")
    anat = anat / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    files = {p: [] for p in parts}
    vols = {"mag": [], "phase": []}
    for te in echo_times_s:
        vols["mag"].append(ball * np.exp(-te / 0.03) + 0.01 * rng.random(shape))
        vols["phase"].append(np.angle(np.exp(2j * np.pi * field_hz * te)))
    for part in parts:
        base = {"EchoTime": None, "MagneticFieldStrength": 3}
        extra = (phase_meta or {}) if part == "phase" else {}
        sidecar = {**base, **(meta or {}), **extra}
        if part == "phase":
            sidecar.setdefault("Units", "rad")
        if four_d:
            name = f"sub-{subject}{entities}_part-{part}_{suffix}"
            data = np.stack(vols[part], axis=-1).astype(np.float32)
            _save(anat / name, data, affine, {**sidecar, "EchoTime": sidecar["EchoTime"]
                                              or list(echo_times_s)})
            files[part].append(anat / f"{name}.nii.gz")
            continue
        for i, te in enumerate(echo_times_s, start=1):
            name = f"sub-{subject}{entities}_echo-{i}_part-{part}_{suffix}"
            _save(anat / name, vols[part][i - 1].astype(np.float32), affine,
                  {**sidecar, "EchoTime": sidecar["EchoTime"] or te})
            files[part].append(anat / f"{name}.nii.gz")
    return files


def _save(stem, data, affine, sidecar):
    nb.Nifti1Image(data, affine).to_filename(f"{stem}.nii.gz")
    Path(f"{stem}.json").write_text(json.dumps({k: v for k, v in sidecar.items()
                                                if v is not None}))


@pytest.fixture
def synthetic_bids(tmp_path):
    """A one-subject, three-echo synthetic dataset; returns its root."""
    root = tmp_path / "bids"
    write_gre(root)
    return root
