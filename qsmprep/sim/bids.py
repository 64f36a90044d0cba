"""Write simulated acquisitions as a BIDS dataset with ground-truth derivatives.

Raw data (BIDS 1.9 MEGRE)::

    dataset_description.json  participants.tsv  README
    sub-<id>/[ses-<id>/]anat/sub-<id>[_ses-<id>]_echo-<n>_part-{mag,phase}_MEGRE.nii.gz + .json

Sidecars carry EchoTime (s), MagneticFieldStrength (T), ImagingFrequency
(MHz), Units "rad" (phase) and B0_dir (voxel axes) when oblique. Ground
truth in ``derivatives/qsmprep-sim/``: ``_Chimap`` (ppm),
``_desc-total_fieldmap`` and ``_desc-local_fieldmap`` (ppm),
``_desc-brain_mask`` and ``_dseg`` (+ ``dseg.tsv``).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from ..__about__ import __version__
from ..qsm.units import GAMMA_BAR_MHZ_PER_T
from .phantoms import LABELS

DERIVATIVES = "qsmprep-sim"


def _save(data, affine, path, sidecar=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    if sidecar is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(
            json.dumps(sidecar, indent=2) + "\n")
    return path


def _write_json(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def write_dataset_description(bids_dir, *, phantom="challenge"):
    """Top-level and derivative dataset_description.json, README, dseg.tsv."""
    bids_dir = Path(bids_dir)
    generated = [{"Name": "qsmprep-sim", "Version": __version__,
                  "Description": f"qsmprep simulator, {phantom} head phantom"}]
    _write_json(bids_dir / "dataset_description.json", {
        "Name": f"qsmprep simulated multi-echo GRE ({phantom} phantom)",
        "BIDSVersion": "1.9.0", "DatasetType": "raw", "GeneratedBy": generated,
        "License": "MIT (phantom anatomy: QSM Challenge 2.0 via NeuroPoly)"
                   if phantom == "challenge" else "CC0 (anatomy: MNI152 ICBM 2009a via nilearn)",
    })
    (bids_dir / "README").write_text(
        "Simulated multi-echo gradient-echo data from qsmprep-sim. Ground truth "
        f"(susceptibility, fields, masks, labels) is in derivatives/{DERIVATIVES}/.\n")
    deriv = bids_dir / "derivatives" / DERIVATIVES
    _write_json(deriv / "dataset_description.json", {
        "Name": "qsmprep-sim ground truth", "BIDSVersion": "1.9.0",
        "DatasetType": "derivative", "GeneratedBy": generated,
    })
    rows = ["index\tname"] + [f"{k}\t{v}" for k, v in LABELS.items()]
    (deriv / "dseg.tsv").write_text("\n".join(rows) + "\n")


def write_participants(bids_dir, subjects):
    """participants.tsv listing ``subjects`` (labels without 'sub-')."""
    rows = ["participant_id"] + [f"sub-{s}" for s in subjects]
    Path(bids_dir, "participants.tsv").write_text("\n".join(rows) + "\n")


def write_acquisition(bids_dir, acq, subject, session=None):
    """Write one :class:`~qsmprep.sim.acquisition.Acquisition` of ``subject``
    (and ``session``) as MEGRE echoes plus ground truth; returns the paths."""
    bids_dir = Path(bids_dir)
    prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    rel = Path(f"sub-{subject}", *( [f"ses-{session}"] if session else []), "anat")
    raw, deriv = bids_dir / rel, bids_dir / "derivatives" / DERIVATIVES / rel
    common = {
        "MagneticFieldStrength": acq.field_strength_t,
        "ImagingFrequency": round(acq.field_strength_t * GAMMA_BAR_MHZ_PER_T, 6),
        "EchoTrainLength": len(acq.echo_times_s),
        "MRAcquisitionType": "3D", "PulseSequenceType": "Gradient Echo",
        "Manufacturer": "qsmprep-sim",
    }
    if not np.allclose(acq.b0_dir, (0, 0, 1)):
        common["B0_dir"] = [float(v) for v in acq.b0_dir]
    paths = []
    for n, te in enumerate(acq.echo_times_s, start=1):
        for part, data in (("mag", acq.magnitude), ("phase", acq.phase)):
            sidecar = dict(common, EchoTime=te)
            if part == "phase":
                sidecar["Units"] = "rad"
            name = f"{prefix}_echo-{n}_part-{part}_MEGRE.nii.gz"
            paths.append(_save(data[..., n - 1], acq.affine, raw / name, sidecar))
    truth = (
        ("Chimap", acq.chi_ppm, {"Units": "ppm", "Description": "true susceptibility, relative to water"}),
        ("desc-total_fieldmap", acq.total_field_ppm, {"Units": "ppm", "Description": "total field encoded in the phase (after shim)"}),
        ("desc-local_fieldmap", acq.local_field_ppm, {"Units": "ppm", "Description": "field of chi inside the brain mask"}),
        ("desc-brain_mask", acq.brain_mask.astype(np.uint8), {"Type": "Brain"}),
        ("dseg", acq.labels.astype(np.uint8), {"Description": "phantom labels, see dseg.tsv"}),
    )
    for suffix, data, sidecar in truth:
        paths.append(_save(data, acq.affine, deriv / f"{prefix}_{suffix}.nii.gz",
                           dict(sidecar, B0_dir=[float(v) for v in acq.b0_dir])))
    return paths
