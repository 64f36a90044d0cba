"""Regenerate the head-phantom package data in ``qsmprep/data/phantom/``.

Reads the QSM Challenge 2.0 head model (0.64 mm, via neuropoly's
susceptibility-separation phantom, MIT) and writes, at 1 mm isotropic:

* ``challenge_head_1mm_dseg.nii.gz``  label map (uint8), majority label of
  the 0.64 mm voxels under each 1 mm voxel (one-hot partial volumes,
  anti-aliased, argmax);
* ``challenge_head_1mm_brainmask.nii.gz``  brain mask (uint8, partial volume
  >= 0.5);
* ``chi_reference.json``  the reference chi (ppm) per label from
  ``SusceptibilityValues.mat``;
* ``LICENSE``  copied from the source.

Run: ``python -m qsmprep.sim.make_package_data [/work/shared/data/challenge2-head]``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.io
from scipy import ndimage

SOURCE = Path("/work/shared/data/challenge2-head")
TARGET = Path(__file__).resolve().parents[1] / "data" / "phantom"
VOXEL_MM = 1.0


def _output_grid(src_shape, src_vox, dst_vox):
    """Shape of the grid covering the same field of view, and the source
    index coordinate of each output voxel centre (per axis)."""
    shape = [int(round(n * s / dst_vox)) for n, s in zip(src_shape, src_vox)]
    coords = [-0.5 + (np.arange(m) + 0.5) * dst_vox / s for m, s in zip(shape, src_vox)]
    return shape, coords


def _resample_fraction(binary, coords, sigma):
    """Partial-volume fraction of a binary source map on the output grid."""
    smooth = ndimage.gaussian_filter(binary.astype(np.float32), sigma)
    grid = np.meshgrid(*coords, indexing="ij")
    return ndimage.map_coordinates(smooth, grid, order=1, mode="nearest")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    source = Path(argv[0]) if argv else SOURCE
    seg_img = nib.load(source / "SegmentedModel.nii.gz")
    seg = np.asarray(seg_img.dataobj).astype(np.uint8)
    brain = np.asarray(nib.load(source / "BrainMask.nii.gz").dataobj) > 0
    src_vox = [float(v) for v in seg_img.header.get_zooms()[:3]]
    shape, coords = _output_grid(seg.shape, src_vox, VOXEL_MM)
    # anti-alias: Gaussian whose FWHM is the output/input voxel ratio
    sigma = [max(VOXEL_MM / s, 1.0) / 2.355 for s in src_vox]

    labels = [int(v) for v in np.unique(seg) if v != 0]
    best = np.zeros(shape, np.float32)
    dseg = np.zeros(shape, np.uint8)
    for lab in labels:
        frac = _resample_fraction(seg == lab, coords, sigma)
        win = frac > best
        dseg[win], best[win] = lab, frac[win]
    mask = (_resample_fraction(brain, coords, sigma) >= 0.5).astype(np.uint8)

    # the output voxel j sits at source index -0.5 + (j + 0.5) * dst / src
    scale = np.diag([VOXEL_MM / s for s in src_vox] + [1.0])
    scale[:3, 3] = [-0.5 + 0.5 * VOXEL_MM / s for s in src_vox]
    affine = seg_img.affine @ scale

    TARGET.mkdir(parents=True, exist_ok=True)
    for name, data in (("dseg", dseg), ("brainmask", mask)):
        img = nib.Nifti1Image(data, affine)
        img.header.set_data_dtype(np.uint8)
        img.header.set_xyzt_units("mm")
        nib.save(img, TARGET / f"challenge_head_1mm_{name}.nii.gz")

    mat = scipy.io.loadmat(source / "SusceptibilityValues.mat", squeeze_me=True,
                           struct_as_record=False)
    table = {
        str(i + 1): {"name": str(entry.name), "chiref_ppm": float(entry.chiref)}
        for i, entry in enumerate(mat["label"])
    }
    (TARGET / "chi_reference.json").write_text(json.dumps(table, indent=2) + "\n")
    shutil.copyfile(source / "LICENSE", TARGET / "LICENSE")
    print(f"wrote {TARGET} ({shape}, labels {labels})")


if __name__ == "__main__":
    main()
