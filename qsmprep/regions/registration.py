"""Registration of a subject's GRE magnitude to a template with ANTs (antspyx).

Three stages, as fMRIPrep and ``antsRegistrationSyN.sh`` do: rigid, affine
(Mattes mutual information, initialised by aligning the centres of mass)
and SyN (Avants et al., Med Image Anal 2008;12:26-41; mutual information,
as the subject's GRE contrast and the template's only roughly agree). The
transforms are written as ITK composite HDF5 files, the BIDS derivative
format of fMRIPrep (``*_from-GRE_to-<space>_mode-image_xfm.h5`` and its
inverse).

The iteration schedules are named presets (:data:`PRESETS`): ``default``
for processing, ``fast`` for tests and quick looks. Nothing here reads BIDS
or Nipype; images in, files out.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Preset:
    """Iterations per resolution level of each stage (coarse to fine)."""

    linear_iterations: tuple
    linear_shrink: tuple
    linear_smooth_vox: tuple
    syn_iterations: tuple
    syn_shrink: tuple
    syn_smooth_vox: tuple


#: ``default``: chosen so that a 1 mm head registers in under 3 min on 2 cores
#: (benchmarks/registration.py) while the deep nuclei reach the Dice targets on
#: deformed heads (tests/test_regions.py); ``fast``: a coarse schedule for tests
PRESETS = {
    "default": Preset((1000, 500, 250, 0), (8, 4, 2, 1), (3, 2, 1, 0),
                      (100, 50, 20), (4, 2, 1), (2, 1, 0)),
    "fast": Preset((100, 50), (4, 2), (2, 1), (30, 0), (2, 1), (1, 0)),
}


def _levels(values):
    return "x".join(str(v) for v in values)


def registration_args(fixed, moving, out_prefix, preset="default", *, seed=1,
                      fixed_mask=None, moving_mask=None):
    """Command-line arguments of ``antsRegistration`` (files in, ``out_prefix``
    ``Composite.h5`` and ``InverseComposite.h5`` out)."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    lin = [f"--convergence", f"[{_levels(p.linear_iterations)},1e-6,10]",
           "--shrink-factors", _levels(p.linear_shrink),
           "--smoothing-sigmas", _levels(p.linear_smooth_vox) + "vox"]
    mi = f"MI[{fixed},{moving},1,32,Regular,0.25]"
    args = [
        "--dimensionality", "3", "--float", "1",
        "--collapse-output-transforms", "1",
        "--write-composite-transform", "1",
        "--output", f"[{out_prefix}]",
        "--interpolation", "Linear",
        "--winsorize-image-intensities", "[0.005,0.995]",
        "--use-histogram-matching", "0",
        "--initial-moving-transform", f"[{fixed},{moving},1]",
        "--random-seed", str(seed),
        "--transform", "Rigid[0.1]", "--metric", mi, *lin,
        "--transform", "Affine[0.1]", "--metric", mi, *lin,
        "--transform", "SyN[0.1,3,0]",
        "--metric", f"MI[{fixed},{moving},1,32]",
        "--convergence", f"[{_levels(p.syn_iterations)},1e-6,10]",
        "--shrink-factors", _levels(p.syn_shrink),
        "--smoothing-sigmas", _levels(p.syn_smooth_vox) + "vox",
    ]
    if fixed_mask or moving_mask:
        args += ["--masks", f"[{fixed_mask or 'NULL'},{moving_mask or 'NULL'}]"]
    return args


def register(moving_file, fixed_file, forward_xfm, inverse_xfm, *, preset="default",
             threads=1, seed=1, fixed_mask=None, moving_mask=None):
    """Register ``moving_file`` (subject) to ``fixed_file`` (template).

    Writes ``forward_xfm`` (subject → template: resamples subject images into
    the template's grid, as ``antsApplyTransforms -t forward_xfm``) and
    ``inverse_xfm`` (template → subject). Returns the two paths.
    """
    import ants

    _threads(threads)
    with tempfile.TemporaryDirectory(prefix="qsmprep-reg-") as tmp:
        prefix = str(Path(tmp) / "reg_")
        args = registration_args(str(fixed_file), str(moving_file), prefix, preset,
                                 seed=seed, fixed_mask=fixed_mask, moving_mask=moving_mask)
        from ants.internal import get_lib_fn, process_arguments

        code = get_lib_fn("antsRegistration")(process_arguments(args))
        if code != 0:
            raise RuntimeError(f"ANTs registration of {moving_file} to {fixed_file} failed "
                               f"(antsRegistration exit {code})")
        for name, dest in (("Composite.h5", forward_xfm), ("InverseComposite.h5", inverse_xfm)):
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(prefix + name, dest)
    return Path(forward_xfm), Path(inverse_xfm)


def apply_transform(moving_file, reference_file, transform, out_file, *,
                    interpolation="linear", threads=1):
    """Resample ``moving_file`` onto the grid of ``reference_file`` through
    ``transform`` (an ``.h5`` from :func:`register`).

    ``interpolation``: ``linear``, ``lanczos`` (windowed sinc, for maps),
    ``nearest`` or ``label`` (ANTs' GenericLabel: a Gaussian-weighted
    majority vote of the labels, for label maps).
    """
    import ants

    _threads(threads)
    names = {"linear": "linear", "lanczos": "lanczosWindowedSinc",
             "nearest": "nearestNeighbor", "label": "genericLabel"}
    if interpolation not in names:
        raise ValueError(f"apply_transform: unknown interpolation {interpolation!r}; "
                         f"expected one of {sorted(names)}")
    moving = ants.image_read(str(moving_file))
    reference = ants.image_read(str(reference_file))
    out = ants.apply_transforms(reference, moving, [str(transform)],
                                interpolator=names[interpolation])
    return out


def _threads(n):
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, int(n)))


def template_on_grid(template_file, voxel_size_mm, out_file, *, interpolation="linear"):
    """``template_file`` resampled to isotropic ``voxel_size_mm`` (same field of
    view), written to ``out_file``; a copy when it is already as fine (written
    anew when ``out_file`` has another extension: a gzipped file named ``.nii``
    is one ITK cannot read)."""
    import ants

    img = ants.image_read(str(template_file))
    if min(img.spacing) >= voxel_size_mm - 1e-3:
        if str(template_file).endswith(".gz") == str(out_file).endswith(".gz"):
            shutil.copyfile(template_file, out_file)
        else:
            ants.image_write(img, str(out_file))
        return Path(out_file)
    interp = {"linear": 0, "nearest": 1, "label": 1}[interpolation]
    out = ants.resample_image(img, (voxel_size_mm,) * 3, use_voxels=False, interp_type=interp)
    ants.image_write(out, str(out_file))
    return Path(out_file)


def register_via_intermediate(moving_file, intermediate_file, fixed_file, forward_xfm,
                              inverse_xfm, *, preset="default", threads=1, seed=1):
    """Register ``moving_file`` (GRE) to ``fixed_file`` through an image of the
    same subject and session (``intermediate_file``, a T1w): GRE → T1w rigid
    (mutual information: same head, other contrast), T1w → template with
    :func:`register`. The chain is written as one displacement-field transform
    per direction (``forward_xfm`` on the template grid, ``inverse_xfm`` on the
    GRE grid; ITK ``.h5``), usable like those of :func:`register`.
    """
    from ants.internal import get_lib_fn, process_arguments

    _threads(threads)
    with tempfile.TemporaryDirectory(prefix="qsmprep-reg-") as tmp:
        tmp = Path(tmp)
        rigid = str(tmp / "gre2t1_")
        mi = f"MI[{intermediate_file},{moving_file},1,32,Regular,0.25]"
        args = ["--dimensionality", "3", "--float", "1", "--collapse-output-transforms", "1",
                "--write-composite-transform", "1", "--output", f"[{rigid}]",
                "--interpolation", "Linear", "--winsorize-image-intensities", "[0.005,0.995]",
                "--initial-moving-transform", f"[{intermediate_file},{moving_file},1]",
                "--random-seed", str(seed),
                "--transform", "Rigid[0.1]", "--metric", mi,
                "--convergence", "[500x250x100,1e-6,10]", "--shrink-factors", "4x2x1",
                "--smoothing-sigmas", "2x1x0vox"]
        code = get_lib_fn("antsRegistration")(process_arguments(args))
        if code != 0:
            raise RuntimeError(f"ANTs rigid registration of the GRE {moving_file} to the "
                               f"T1w {intermediate_file} failed (antsRegistration exit {code})")
        t1_fwd, t1_inv = register(intermediate_file, fixed_file, tmp / "t1_fwd.h5",
                                  tmp / "t1_inv.h5", preset=preset, threads=threads, seed=seed)
        # one composite per direction: antsRegistration started from the chain
        # (the transform next to the output grid first, as antsApplyTransforms
        # takes them) and run with zero iterations writes it as an ITK composite
        chains = (
            (forward_xfm, fixed_file, moving_file, [str(t1_fwd), rigid + "Composite.h5"]),
            (inverse_xfm, moving_file, fixed_file, [rigid + "InverseComposite.h5", str(t1_inv)]),
        )
        for i, (dest, grid, source, chain) in enumerate(chains):
            out = str(tmp / f"chain{i}_")
            args = ["--dimensionality", "3", "--float", "1",
                    "--collapse-output-transforms", "1", "--write-composite-transform", "1",
                    "--output", f"[{out}]"]
            for tx in chain:
                args += ["--initial-moving-transform", tx]
            args += ["--transform", "Translation[0.1]", "--metric", f"MI[{grid},{source},1,32]",
                     "--convergence", "[0,1e-6,10]", "--shrink-factors", "1",
                     "--smoothing-sigmas", "0vox"]
            code = get_lib_fn("antsRegistration")(process_arguments(args))
            if code != 0:
                raise RuntimeError(f"ANTs could not compose the transforms of {moving_file} "
                                   f"through {intermediate_file} (antsRegistration exit {code})")
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(out + "Composite.h5", dest)
    return Path(forward_xfm), Path(inverse_xfm)
