"""Synthetic participant-level outputs, for testing and timing the group level.

Writes, per run, what ``qsmprep ... participant --regions`` writes for the
group level to read: ``*_Chimap.nii.gz`` + ``.json`` (with ``QSMMethods``),
``*_desc-brain_mask.nii.gz`` and ``*_desc-regions_stats.tsv`` + ``.json``. The
regional means are drawn around the Challenge 2.0 reference values, so the
group statistics have a known truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np

from ..regions.make_atlas import DEEP_GM
from .phantoms import chi_reference

SETTINGS = {"SoftwareVersion": "0.0.0-synthetic",
            "QSMMethods": {"inversion": {"Name": "tv", "Parameters": {"lambda": 0.0005}},
                           "referencing": {"Name": "mean", "Parameters": {}}}}


def write_synthetic_outputs(output_dir, n_subjects, *, runs_per_subject=1, shape=(24, 24, 16),
                            rng=0, outliers=(), changed_settings=()):
    """Write ``n_subjects`` × ``runs_per_subject`` runs into ``output_dir``.

    ``outliers``: run ids (``sub-003_run-1``) whose caudate mean is raised by
    0.2 ppm; ``changed_settings``: run ids processed with another inversion
    parameter. Returns the run ids.
    """
    rng = np.random.default_rng(rng)
    output_dir = Path(output_dir)
    truth = chi_reference()
    ids = []
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    for s in range(1, n_subjects + 1):
        anat = output_dir / f"sub-{s:03d}" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        for r in range(1, runs_per_subject + 1):
            run_id = f"sub-{s:03d}_run-{r}"
            ids.append(run_id)
            chi = np.zeros(shape, np.float32)  # a noisy "brain" box in an empty field of view
            box = tuple(slice(n // 4, n - n // 4) for n in shape)
            chi[box] = 0.05 * rng.standard_normal(chi[box].shape)
            nb.save(nb.Nifti1Image(chi, affine), anat / f"{run_id}_Chimap.nii.gz")
            nb.save(nb.Nifti1Image(np.ones(shape, np.uint8), affine),
                    anat / f"{run_id}_desc-brain_mask.nii.gz")
            meta = json.loads(json.dumps(SETTINGS))
            if run_id in changed_settings:
                meta["QSMMethods"]["inversion"]["Parameters"]["lambda"] = 0.001
            (anat / f"{run_id}_Chimap.json").write_text(json.dumps(meta))
            lines = ["region\tlabel\tvoxels\tmean_ppm\tmedian_ppm\tstd_ppm\tp5_ppm\tp95_ppm"]
            for label, (name, _) in DEEP_GM.items():
                mean = truth[label] + rng.uniform(-0.005, 0.005)  # bounded: no chance outlier
                if run_id in outliers and name == "caudate":
                    mean += 0.2
                lines.append(f"{name}\t{label}\t500\t{mean:.6g}\t{mean:.6g}\t0.02\t"
                             f"{mean - 0.03:.6g}\t{mean + 0.03:.6g}")
            (anat / f"{run_id}_desc-regions_stats.tsv").write_text("\n".join(lines) + "\n")
            (anat / f"{run_id}_desc-regions_stats.json").write_text(json.dumps(
                {"ReferenceRegion": "whole brain", "Atlas": "QSMChallenge",
                 "Registration": "synthetic"}))
    return ids
