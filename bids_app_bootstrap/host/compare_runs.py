#!/usr/bin/env python3
"""Compare two qsmprep output folders (host run, container run) of the same dataset.

The Chimap, local field and B0 map must agree to float tolerance inside the brain mask
(which must be identical), and the sidecars must record the same methods. Tolerance:
1e-4 ppm (susceptibility, local field) / 1e-3 Hz (B0) absolute: float32 round-off of the
same computation with other builds of numpy/scipy/BLAS (the container installs its own
from PyPI), two orders of magnitude below the noise of a QSM (~0.01 ppm).
Exit code 1 with the differences otherwise.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nibabel as nb
import numpy as np

TOLERANCE = {"Chimap": 1e-4, "desc-local_fieldmap": 1e-4, "fieldmap": 1e-3}
VOLATILE = {"Sources", "RawSources", "SoftwareVersions", "GeneratedBy", "QSMMethods"}


def _one(folder, pattern, exclude=None):
    files = sorted(f for f in Path(folder).glob(pattern) if not exclude or exclude not in f.name)
    if len(files) != 1:
        raise SystemExit(f"compare_runs: expected one {pattern} in {folder}, found {files}")
    return files[0]


def _figures(report):
    """The figure files an HTML report shows (img src), sorted."""
    return sorted(set(re.findall(r'<img[^>]*src="\./([^"]+)"', report.read_text(errors="replace"))))


def compare(host, container):
    failures = []
    mask_h = _one(host, "sub-*/anat/*_desc-brain_mask.nii.gz")
    mask_c = _one(container, "sub-*/anat/*_desc-brain_mask.nii.gz")
    mask = np.asarray(nb.load(mask_h).dataobj) > 0
    if not np.array_equal(mask, np.asarray(nb.load(mask_c).dataobj) > 0):
        failures.append("brain masks differ")
    for suffix, tol in TOLERANCE.items():
        pattern = f"sub-*/anat/*_{suffix}.nii.gz"
        exclude = "desc-" if suffix == "fieldmap" else None  # B0, not the local field
        a = nb.load(_one(host, pattern, exclude))
        b = nb.load(_one(container, pattern, exclude))
        if a.shape != b.shape or not np.allclose(a.affine, b.affine):
            failures.append(f"{suffix}: grids differ")
            continue
        da, db = a.get_fdata(), b.get_fdata()
        diff = np.abs(da - db)[mask]
        scale = np.abs(da[mask]).max()
        line = (f"{suffix}: max |host - container| in the mask {diff.max():.3g} "
                f"(tolerance {tol:g}; max |value| {scale:.3g})")
        print(line)
        if not np.isfinite(db).all() or diff.max() > tol:
            failures.append(line)
    side_h = json.loads(_one(host, "sub-*/anat/*_Chimap.json").read_text())
    side_c = json.loads(_one(container, "sub-*/anat/*_Chimap.json").read_text())
    if side_h.get("QSMMethods") != side_c.get("QSMMethods"):
        failures.append("Chimap sidecars record different methods")
    for key in set(side_h) - VOLATILE:
        if side_h[key] != side_c.get(key):
            failures.append(f"Chimap sidecar {key}: {side_h[key]!r} vs {side_c.get(key)!r}")
    report = _one(container, "sub-*.html")
    figures = _figures(report)
    missing = [f for f in figures if not (report.parent / f).is_file()
               or (report.parent / f).stat().st_size == 0]
    if not figures or missing:
        failures.append(f"{report}: figures missing or empty: {missing or 'none referenced'}")
    if figures != _figures(_one(host, "sub-*.html")):
        failures.append(f"{report} shows other figures than the host run's report")
    print(f"sidecar fields compared: {sorted(set(side_h) - VOLATILE)}; report {report.name} "
          f"{report.stat().st_size} bytes, {len(figures)} figures")
    for line in failures:
        print(f"compare_runs: FAIL {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(compare(*sys.argv[1:3]))
