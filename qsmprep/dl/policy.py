"""Where the shipped networks may be trusted: a warning for learned methods
on voxel sizes they were not trained or validated on. Reads only NIfTI
headers; imports no torch."""

from __future__ import annotations

import logging

import nibabel as nb
import numpy as np

from ..qsm.units import voxel_size_from_affine
from . import LEARNED_METHODS, VALIDATED_VOXEL_SIZE_MM

LOGGER = logging.getLogger("qsmprep")


def check_learned_voxel_size(run, label, workflow):
    """Warn when a learned method runs on voxels outside the sizes its networks
    were trained or validated on (:data:`qsmprep.dl.VALIDATED_VOXEL_SIZE_MM`)."""
    learned = [m for m in dict.fromkeys((workflow.bf_removal, workflow.inversion))
               if m in LEARNED_METHODS]
    if not learned:
        return
    vox = np.asarray(voxel_size_from_affine(nb.load(run.phase[0]).affine))
    low, high = VALIDATED_VOXEL_SIZE_MM
    if vox.min() < low or vox.max() > high:
        LOGGER.warning(
            "%s has %s mm voxels, outside the %g-%g mm on which the %s network(s) were "
            "trained and validated: the map is unvalidated there. Prefer --pipeline classical "
            "(PDF + iLSQR) for such data, or compare both", label,
            " x ".join(f"{v:.3g}" for v in vox), low, high, " and ".join(learned))


def check_learned_voxel_sizes(data, workflow):
    """:func:`check_learned_voxel_size` for every run of ``data``
    (``{subject: [QSMRun, ...]}``)."""
    for runs in data.values():
        for run in runs:
            check_learned_voxel_size(run, run.label, workflow)
