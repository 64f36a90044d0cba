"""Group level: a table of every run already processed in the output folder.

``qsmprep bids_dir output_dir group`` reads the ``*_Chimap.json`` sidecars
and maps written by participant-level runs and lists them in
``group/qsmprep_runs.tsv``, one row per run, with the methods used and the
mean and standard deviation of chi (ppm) inside the run's brain mask.
Region-of-interest statistics and a group report come later.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nb
import numpy as np

from ..utils.files import atomic_write, write_text
from .qsm import PIPELINE_STAGES

#: one column per pipeline stage: the method name from the sidecar's QSMMethods
COLUMNS = ("subject", "session", "acquisition", "reconstruction", "run", "chimap",
           "magnetic_field_strength_t", "n_echoes", *PIPELINE_STAGES,
           "mask_voxels", "chi_mean_ppm", "chi_std_ppm")

_SHORT = {"sub": "subject", "ses": "session", "acq": "acquisition",
          "rec": "reconstruction", "run": "run"}


def write_group_table(output_dir):
    """Write ``group/qsmprep_runs.tsv`` (+ ``.json`` column descriptions).

    Returns the TSV path; raises ``FileNotFoundError`` when no participant
    level output is found.
    """
    output_dir = Path(output_dir)
    sidecars = sorted(output_dir.glob("sub-*/**/anat/*_Chimap.json"))
    if not sidecars:
        raise FileNotFoundError(
            f"No *_Chimap.json in {output_dir}; run the participant level first"
        )
    rows = [_row(path, output_dir) for path in sidecars]
    group = output_dir / "group"
    group.mkdir(exist_ok=True)
    tsv = group / "qsmprep_runs.tsv"

    def write_rows(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(tsv, write_rows)
    write_text(group / "qsmprep_runs.json", json.dumps({
        "chimap": {"Description": "Chimap path relative to the output folder"},
        "magnetic_field_strength_t": {"Units": "T"},
        "mask_voxels": {"Description": "voxels in the run's desc-brain_mask"},
        "chi_mean_ppm": {"Description": "mean chi inside the brain mask", "Units": "ppm"},
        "chi_std_ppm": {"Description": "standard deviation of chi inside the brain mask",
                        "Units": "ppm"},
    }, indent=2) + "\n")
    return tsv


def _row(sidecar, output_dir):
    meta = json.loads(sidecar.read_text())
    chimap = sidecar.with_name(sidecar.name.replace(".json", ".nii.gz"))
    mask_path = sidecar.with_name(sidecar.name.replace("_Chimap.json", "_desc-brain_mask.nii.gz"))
    entities = dict(part.split("-", 1) for part in sidecar.name.split("_")[:-1])
    row = {_SHORT[k]: v for k, v in entities.items() if k in _SHORT}
    methods = meta.get("QSMMethods", {})
    row.update({stage: methods.get(stage, {}).get("Name", "n/a") for stage in PIPELINE_STAGES})
    row.update(
        chimap=chimap.relative_to(output_dir).as_posix(),
        magnetic_field_strength_t=meta.get("MagneticFieldStrength", ""),
        n_echoes=len(meta.get("EchoTime", [])),
    )
    if chimap.is_file() and mask_path.is_file():
        chi = np.asanyarray(nb.load(chimap).dataobj, dtype=np.float64)
        mask = np.asanyarray(nb.load(mask_path).dataobj) > 0
        row.update(mask_voxels=int(mask.sum()),
                   chi_mean_ppm=f"{chi[mask].mean():.6g}" if mask.any() else "n/a",
                   chi_std_ppm=f"{chi[mask].std():.6g}" if mask.any() else "n/a")
    return {c: row.get(c, "n/a") for c in COLUMNS}
