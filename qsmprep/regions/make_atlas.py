"""Rebuild the embedded default atlas in ``qsmprep/data/atlas/``.

Reads the QSM Challenge 2.0 head model (0.64 mm ``SegmentedModel.nii.gz``, via
NeuroPoly's susceptibility-separation phantom, MIT licence) and writes, at
1.5 mm isotropic (:data:`VOXEL_MM`):

* ``tpl-QSMChallenge_res-1p5_T2starw.nii.gz``: a GRE-magnitude-like template,
  the mean over echoes (:data:`TEMPLATE_ECHO_TIMES_S`) of ``M0 exp(-R2* TE)``
  with per-tissue proton density and R2* at 3 T (typical literature values,
  the table of :mod:`qsmprep.sim.phantoms`), anti-aliased to 1.5 mm;
* ``tpl-QSMChallenge_res-1p5_atlas-DeepGM_dseg.nii.gz``: the seven deep grey
  matter labels (majority label of the partial volumes), uint8;
* ``tpl-QSMChallenge_atlas-DeepGM_dseg.tsv``: the lookup table;
* ``LICENSE``: copied from the source.

Run: ``python -m qsmprep.regions.make_atlas [/work/shared/data/challenge2-head]``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from ..sim.make_package_data import _output_grid, _resample_fraction
from ..utils.files import atomic_write, write_text
from ..sim.phantoms import _M0, _R2STAR_3T

SOURCE = Path("/work/shared/data/challenge2-head")
TARGET = Path(__file__).resolve().parents[1] / "data" / "atlas"
VOXEL_MM = 1.5
#: echo times (s) whose mean magnitude the template shows (a typical 3 T MEGRE)
TEMPLATE_ECHO_TIMES_S = (0.005, 0.010, 0.015, 0.020, 0.025)
#: label (as in the Challenge 2.0 SegmentedModel) -> (name, abbreviation)
DEEP_GM = {
    1: ("caudate", "Ca"),
    2: ("globus_pallidus", "GP"),
    3: ("putamen", "Pu"),
    4: ("red_nucleus", "RN"),
    5: ("dentate_nucleus", "DN"),
    6: ("substantia_nigra_stn", "SN"),
    7: ("thalamus", "Th"),
}
TEMPLATE = "tpl-QSMChallenge_res-1p5_T2starw.nii.gz"
DSEG = "tpl-QSMChallenge_res-1p5_atlas-DeepGM_dseg.nii.gz"
LUT = "tpl-QSMChallenge_atlas-DeepGM_dseg.tsv"


def tissue_magnitude(labels):
    """Mean GRE magnitude over :data:`TEMPLATE_ECHO_TIMES_S` per label (0 in air)."""
    te = np.asarray(TEMPLATE_ECHO_TIMES_S)
    lut = np.zeros(int(labels.max()) + 1, np.float32)
    for lab in range(lut.size):
        lut[lab] = _M0.get(lab, 0.0) * np.exp(-_R2STAR_3T.get(lab, 0.0) * te).mean()
    return lut[labels]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    source = Path(argv[0]) if argv else SOURCE
    target = Path(argv[1]) if len(argv) > 1 else TARGET
    seg_img = nib.load(source / "SegmentedModel.nii.gz")
    seg = np.asarray(seg_img.dataobj).astype(np.uint8)
    src_vox = [float(v) for v in seg_img.header.get_zooms()[:3]]
    shape, coords = _output_grid(seg.shape, src_vox, VOXEL_MM)
    sigma = [max(VOXEL_MM / s, 1.0) / 2.355 for s in src_vox]

    from scipy import ndimage

    magnitude = ndimage.map_coordinates(
        ndimage.gaussian_filter(tissue_magnitude(seg), sigma),
        np.meshgrid(*coords, indexing="ij"), order=1, mode="nearest")
    best = np.zeros(shape, np.float32)
    dseg = np.zeros(shape, np.uint8)
    for lab in [int(v) for v in np.unique(seg) if v != 0]:
        frac = _resample_fraction(seg == lab, coords, sigma)
        win = frac > best
        dseg[win], best[win] = lab, frac[win]
    dseg[~np.isin(dseg, list(DEEP_GM))] = 0

    scale = np.diag([VOXEL_MM / s for s in src_vox] + [1.0])
    scale[:3, 3] = [-0.5 + 0.5 * VOXEL_MM / s for s in src_vox]
    affine = seg_img.affine @ scale
    # centre the head on the world origin (templates are centred; helps initialisation)
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
    affine[:3, 3] -= centre

    target.mkdir(parents=True, exist_ok=True)
    mag = np.round(magnitude * 1000).astype(np.int16)  # arbitrary units, 0..~900
    for name, data in ((TEMPLATE, mag), (DSEG, dseg)):
        img = nib.Nifti1Image(data, affine)
        img.header.set_data_dtype(data.dtype)
        img.header.set_xyzt_units("mm")
        img.header.set_sform(affine, code=4)  # MNI-like "template" code
        img.header.set_qform(affine, code=4)
        atomic_write(target / name, lambda tmp, img=img: nib.save(img, tmp))
    rows = ["index\tname\tabbreviation"] + [f"{k}\t{n}\t{a}" for k, (n, a) in DEEP_GM.items()]
    write_text(target / LUT, "\n".join(rows) + "\n")
    shutil.copyfile(source / "LICENSE", target / "LICENSE")
    print(f"wrote {target} ({shape}, {VOXEL_MM} mm)")


if __name__ == "__main__":
    main()
