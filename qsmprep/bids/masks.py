"""User-supplied brain masks: ``--mask FILE`` and ``--derivatives NAME=PATH``,
found and checked against the run's grid before any processing."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import QSMPrepInputError
from .metadata import read_header
from .runs import _NIFTI, ENTITY_KEYS, RUN_ENTITIES

LOGGER = logging.getLogger("qsmprep")

#: affine tolerance (mm) between a user-supplied mask and the GRE grid
MASK_AFFINE_ATOL_MM = 1e-3


def attach_masks(data, *, mask_file=None, derivatives=None):
    """``data`` (``{subject: [QSMRun, ...]}``) with each run's user-supplied
    brain mask set (:attr:`QSMRun.mask`), checked before any processing.

    ``mask_file``: one NIfTI for every run. ``derivatives``: ``{name: path}``
    of BIDS derivatives datasets searched in order (pybids, no validation)
    for ``sub-X/[ses-Y/]anat/sub-X[_ses-Y][_acq][_rec][_run][_desc-brain]_mask
    .nii[.gz]`` with the run's entities, e.g. the masks qsmprep writes. A run
    without a mask there keeps the masking method (with a warning); none found
    for any run is an error. Every mask must lie on the run's grid
    (:func:`check_mask`).
    """
    derivatives = dict(derivatives or {})
    if not mask_file and not derivatives:
        return data
    if mask_file and derivatives:
        raise QSMPrepInputError(
            f"Give either --mask ({mask_file}) or --derivatives "
            f"({', '.join(f'{k}={v}' for k, v in derivatives.items())}), not both")
    runs = [run for subject_runs in data.values() for run in subject_runs]
    found = {}
    if mask_file:
        path = str(Path(mask_file).absolute())
        if not Path(path).is_file():
            raise QSMPrepInputError(f"--mask {mask_file}: file not found")
        for run in runs:
            found[id(run)] = (path, path)
        if len(runs) > 1:
            LOGGER.warning("--mask %s is used for all %d runs (%s); use --derivatives for "
                           "one mask per run", path, len(runs),
                           ", ".join(f"sub-{r.subject} {r.name}" for r in runs))
    else:
        layouts = [(name, _derivatives_layout(name, root)) for name, root in derivatives.items()]
        for run in runs:
            for name, layout in layouts:
                hit = find_derivative_mask(layout, run, name)
                if hit:
                    found[id(run)] = hit
                    break
        if not found:
            raise QSMPrepInputError(
                "No brain mask for any run in --derivatives "
                f"{', '.join(f'{k}={v}' for k, v in derivatives.items())}: expected e.g. "
                f"{_expected_mask_name(runs[0])}; check the names (sub-/ses-/acq-/rec-/run- "
                "as in the GRE files, suffix _mask, optional desc-brain)")
        for run in runs:
            if id(run) not in found:
                LOGGER.warning(
                    "sub-%s %s: no brain mask in the --derivatives datasets (expected %s); "
                    "it is computed with the masking method", run.subject, run.name,
                    _expected_mask_name(run))
    out = {}
    for subject, subject_runs in data.items():
        out[subject] = []
        for run in subject_runs:
            if id(run) in found:
                path, source = found[id(run)]
                check_mask(path, run, shared_by=len(runs) if mask_file else 1)
                run = replace(run, mask=path, mask_source=source)
            out[subject].append(run)
    return out


def _derivatives_layout(name, root):
    from bids import BIDSLayout

    root = Path(root)
    if not root.is_dir():
        raise QSMPrepInputError(f"--derivatives {name}={root}: this derivatives folder "
                                "does not exist")
    if not (root / "dataset_description.json").is_file():
        raise QSMPrepInputError(
            f"--derivatives {name}={root} is not a BIDS derivatives dataset: it has no "
            f"dataset_description.json; add one, e.g. {{\"Name\": \"{name}\", "
            '"BIDSVersion": "1.9.0", "DatasetType": "derivative"}')
    try:
        return BIDSLayout(str(root), validate=False, config=["bids", "derivatives"])
    except Exception as err:  # pybids raises several types for a broken dataset
        raise QSMPrepInputError(f"pybids could not index --derivatives {name}={root}: "
                                f"{err}") from err


def find_derivative_mask(layout, run, name="derivatives"):
    """``(path, bids_uri)`` of the brain mask of ``run`` in a derivatives
    layout, or None. Candidates: ``anat`` files with suffix ``mask`` and
    exactly the run's session/acquisition/reconstruction/run entities, and
    ``desc-brain`` or no ``desc`` (other ``desc`` values, e.g. a CSF mask, are
    not brain masks, nor is one with a ``label`` other than ``brain``, e.g.
    qsmprep's own ``label-CSF_desc-ventricles_mask``). One without ``space``
    (native) is preferred to one in a named space, then ``desc-brain`` to no
    ``desc``. Two equally good candidates are an error."""
    found = layout.get(subject=run.subject, datatype="anat", suffix="mask",
                       extension=list(_NIFTI))
    wanted = run.entity_dict
    ranked = []
    for f in found:
        ents = f.get_entities()
        if any(_entity_str(ents.get(k)) != wanted.get(k) for k in RUN_ENTITIES):
            continue
        desc = ents.get("desc")
        if desc not in (None, "brain") or _entity_str(ents.get("label")) not in (None, "brain"):
            continue
        ranked.append((("space" in ents, desc != "brain"), f.path))
    if not ranked:
        return None
    ranked.sort()
    best = [p for rank, p in ranked if rank == ranked[0][0]]
    if len(best) > 1:
        raise QSMPrepInputError(
            f"Several brain masks for sub-{run.subject} {run.name} in --derivatives {name}: "
            f"{', '.join(Path(p).name for p in best)}; keep one, or tell them apart "
            "(desc-brain is preferred)")
    path = best[0]
    rel = Path(path).absolute().relative_to(Path(layout.root).absolute()).as_posix()
    return str(Path(path).absolute()), f"bids:{name}:{rel}"


def _entity_str(value):
    return None if value is None else str(value)


def _expected_mask_name(run):
    ents = run.entity_dict
    stem = f"sub-{run.subject}" + "".join(
        f"_{ENTITY_KEYS[k]}-{ents[k]}" for k in RUN_ENTITIES if k in ents)
    folder = f"sub-{run.subject}/" + (f"ses-{ents['session']}/" if "session" in ents else "")
    return f"{folder}anat/{stem}_desc-brain_mask.nii.gz"


def mask_grid_error(mask_path, mask_img, ref_path, ref_img, *, shared_by=1):
    """The message for a mask whose grid is not the GRE grid, or None."""
    mshape, rshape = tuple(mask_img.shape), tuple(ref_img.shape[:3])
    extra = mshape[3:]
    same_shape = mshape[:3] == rshape and int(np.prod(extra, dtype=int)) == 1
    diff = float(np.abs(mask_img.affine - ref_img.affine).max())
    if same_shape and diff <= MASK_AFFINE_ATOL_MM:
        return None
    what = (f"shape {mshape} vs {rshape}" if not same_shape else
            f"same shape {rshape} but affines differing by up to {diff:.3g} (> "
            f"{MASK_AFFINE_ATOL_MM:g} mm)")
    shared = (f" (--mask gives one mask for all {shared_by} runs: select one run with "
              "--participant-label/--session-label/--bids-filter-file, or give one mask "
              "per run with --derivatives)" if shared_by > 1 else "")
    return (
        f"The brain mask {mask_path} is not on the voxel grid of {ref_path}: {what}; mask "
        f"affine {_affine_str(mask_img.affine)}, GRE affine {_affine_str(ref_img.affine)}"
        f"{shared}. Resample the mask to the GRE grid (nearest neighbour), e.g. "
        f"antsApplyTransforms -d 3 -i {mask_path} -r {ref_path} -o mask_gre.nii.gz "
        f"-n NearestNeighbor (ANTs) or flirt -in {mask_path} -ref {ref_path} -out "
        "mask_gre.nii.gz -applyxfm -usesqform -interp nearestneighbour (FSL), and give "
        "mask_gre.nii.gz"
    )


def _affine_str(affine):
    return str(np.round(np.asarray(affine)[:3], 3).tolist())


def binarize_mask(values):
    """``(bool mask, was_binary)``: values >= 0.5 (NaN counts as 0); a mask
    holding anything but 0 and 1 (e.g. probabilistic) is not binary."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0)
    binary = bool(np.isin(values, (0.0, 1.0)).all())
    return values >= 0.5, binary


def check_mask(path, run, *, shared_by=1):
    """Check a user-supplied mask against ``run`` before processing: same
    shape and affine (within :data:`MASK_AFFINE_ATOL_MM`) as its magnitude
    (phase when there is none), not empty; a non-binary mask gets a warning
    that it is thresholded at 0.5."""
    ref_path = (run.magnitude or run.phase)[0]
    mask_img = read_header(path)
    error = mask_grid_error(path, mask_img, ref_path, read_header(ref_path),
                            shared_by=shared_by)
    if error:
        raise QSMPrepInputError(error)
    values = np.asanyarray(mask_img.dataobj, dtype=np.float32)
    mask, binary = binarize_mask(values)
    if not binary:
        LOGGER.warning(
            "The brain mask %s is not binary (values %.3g to %.3g, e.g. probabilistic); it "
            "is thresholded at 0.5: %d voxels", path, float(np.nanmin(values)),
            float(np.nanmax(values)), int(mask.sum()))
    if not mask.any():
        raise QSMPrepInputError(
            f"The brain mask {path} is empty (no voxel >= 0.5); give a mask with the brain "
            "set to 1, or leave out --mask/--derivatives to compute one")

