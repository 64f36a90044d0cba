"""Numerical head phantoms: susceptibility, brain mask, labels, M0 and R2*.

Two anatomies:

* :func:`challenge_head` -- the QSM Challenge 2.0 head model (Marques JP et al.
  QSM reconstruction challenge 2.0: design and report of results. Magn Reson
  Med 2021;86:526-542), shipped at 1 mm in ``qsmprep/data/phantom`` (MIT, via
  NeuroPoly's susceptibility-separation phantom). It has real air, bone and
  muscle around the brain, so its total field carries a realistic background.
  The training data of :mod:`qsmprep.sim.hybrid` come from this head only.
* :func:`mni_head` -- an unseen anatomy for benchmarks, built from the MNI152
  (ICBM 2009a) grey/white-matter probability maps that ship with nilearn, with
  deep-grey-matter nuclei, skull, scalp and air sinuses added as simple shapes.

Both add, on request and reproducibly from ``rng``: per-region chi drawn
around the reference values, smooth texture, thin paramagnetic vessels,
microbleeds/haemorrhages (+0.4..1.2 ppm) and calcifications (-3..-0.2 ppm).
chi is in ppm relative to water; everything outside the field of view is
taken to be air (``Phantom.chi_ambient_ppm``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources

import numpy as np
from scipy import ndimage

#: Label names of the segmentation (Challenge 2.0 labels, plus 17).
LABELS = {
    1: "caudate", 2: "globus pallidus", 3: "putamen", 4: "red nucleus",
    5: "dentate nucleus", 6: "substantia nigra and STN", 7: "thalamus",
    8: "white matter", 9: "grey matter", 10: "CSF", 11: "blood", 12: "fat",
    13: "bone", 14: "air", 15: "muscle", 16: "calcification", 17: "haemorrhage",
}
AIR, BONE, MUSCLE, CSF, BLOOD, CALCIFICATION, HAEMORRHAGE = 14, 13, 15, 10, 11, 16, 17
PARENCHYMA = (1, 2, 3, 4, 5, 6, 7, 8, 9)

# Proton density (relative) and R2* (Hz) at 3 T per label: typical literature
# values for a short-TR gradient echo; R2* scales about linearly with B0.
_M0 = {1: 0.8, 2: 0.75, 3: 0.8, 4: 0.75, 5: 0.75, 6: 0.75, 7: 0.75, 8: 0.7, 9: 0.85,
       10: 0.9, 11: 0.8, 12: 0.9, 13: 0.05, 14: 0.0, 15: 0.55, 16: 0.1, 17: 0.4}
_R2STAR_3T = {1: 25, 2: 45, 3: 28, 4: 35, 5: 35, 6: 40, 7: 22, 8: 21, 9: 16,
              10: 3, 11: 40, 12: 30, 13: 200, 14: 0, 15: 35, 16: 150, 17: 120}


@dataclass(frozen=True)
class Phantom:
    """A head phantom on a voxel grid; all arrays (X, Y, Z).

    Attributes
    ----------
    chi_ppm : float32, susceptibility (ppm, relative to water).
    brain_mask : bool, the brain (the region QSM reconstructs).
    labels : uint8, segmentation (keys of :data:`LABELS`).
    m0 : float32, relative proton density (0 in air).
    r2star_hz : float32, R2* at 3 T (Hz); scale by B0/3 T for other fields.
    voxel_size_mm : tuple of 3 floats.
    affine : (4, 4) float64, voxel -> RAS+ mm of the head (B0 along z when the
        head lies straight in the scanner).
    chi_ambient_ppm : float, chi of the medium around the field of view (air).
    """

    chi_ppm: np.ndarray
    brain_mask: np.ndarray
    labels: np.ndarray
    m0: np.ndarray
    r2star_hz: np.ndarray
    voxel_size_mm: tuple
    affine: np.ndarray
    chi_ambient_ppm: float


@lru_cache(maxsize=1)
def chi_reference():
    """Reference chi (ppm, relative to water) per label, Challenge 2.0 values."""
    text = resources.files("qsmprep").joinpath("data", "phantom").joinpath("chi_reference.json").read_text()
    return {int(k): v["chiref_ppm"] for k, v in json.loads(text).items()}


@lru_cache(maxsize=1)
def _challenge_arrays():
    import nibabel as nib

    root = resources.files("qsmprep").joinpath("data", "phantom")
    with resources.as_file(root / "challenge_head_1mm_dseg.nii.gz") as p:
        img = nib.load(p)
        labels = np.asarray(img.dataobj, dtype=np.uint8)
    with resources.as_file(root / "challenge_head_1mm_brainmask.nii.gz") as p:
        brain = np.asarray(nib.load(p).dataobj) > 0
    vox = tuple(float(v) for v in img.header.get_zooms()[:3])
    return labels, brain, vox, img.affine


def as_rng(rng):
    """``numpy.random.Generator`` from a seed, a Generator or None."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def smooth_noise(shape, voxel_size_mm, fwhm_mm, rng):
    """Gaussian random field of unit standard deviation, smoothed to ``fwhm_mm``.

    Smooth fields are drawn on a grid ~4x finer than the FWHM and
    interpolated, so a 60 mm field on a whole head costs milliseconds.
    """
    step = np.maximum(np.floor(fwhm_mm / 4.0 / np.asarray(voxel_size_mm, float)), 1)
    coarse = tuple(int(np.ceil(n / q)) + 2 for n, q in zip(shape, step))
    sigma = [fwhm_mm / 2.355 / (v * q) for v, q in zip(voxel_size_mm, step)]
    field = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), sigma)
    if np.any(step > 1):
        coords = np.meshgrid(*[np.arange(n) / q for n, q in zip(shape, step)],
                             indexing="ij", sparse=False)
        field = ndimage.map_coordinates(field, coords, order=1)
    else:
        field = field[tuple(slice(0, n) for n in shape)]
    return field / max(float(field.std()), 1e-12)


def add_texture(chi, brain, voxel_size_mm, rng, *, floor_ppm=0.005, relative=0.1,
                fwhm_mm=3.0):
    """``chi`` (ppm) plus smooth random texture in ``brain``.

    The texture is a unit Gaussian random field smoothed to ``fwhm_mm``
    (:func:`smooth_noise`) times a local amplitude ``floor_ppm + relative *
    |chi|`` (ppm): tissue with strong susceptibility varies more than tissue
    near zero, and no tissue varies by more than a fraction of its contrast to
    its neighbours. The benchmark phantoms use the defaults; the hybrid
    training samples draw the three parameters around them
    (:func:`qsmprep.sim.hybrid.hybrid_sample`). 0 outside ``brain``.
    """
    amplitude = floor_ppm + relative * np.abs(chi)
    return chi + np.where(brain, amplitude * smooth_noise(chi.shape, voxel_size_mm, fwhm_mm, rng),
                          0)


def _ball_offsets(radius_vox):
    r = int(np.ceil(radius_vox.max()))
    g = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1].reshape(3, -1).T
    return g[((g / radius_vox) ** 2).sum(1) <= 1.0]


def _stamp(target, centres_vox, radius_vox):
    """Set ``target`` True in ellipsoids of semi-axes ``radius_vox`` (voxels)
    around each centre (N, 3); parts outside the grid are dropped."""
    idx = np.round(centres_vox).astype(int)[:, None, :] + _ball_offsets(radius_vox)[None]
    idx = idx.reshape(-1, 3)
    keep = np.all((idx >= 0) & (idx < target.shape), axis=1)
    target[tuple(idx[keep].T)] = True
    return target


def random_vessels(mask, voxel_size_mm, rng, *, count=40, radius_mm=(0.4, 1.2),
                   length_mm=(20.0, 80.0)):
    """Thin tubes along smooth random walks starting inside ``mask``.

    Each vessel is a curve with slowly turning direction (persistence length
    ~20 mm), rasterised with a radius drawn from ``radius_mm`` (at least half
    a voxel) and clipped to ``mask``. Returns a bool array.
    """
    vox = np.asarray(voxel_size_mm, float)
    vessels = np.zeros(mask.shape, bool)
    inside = np.argwhere(mask)
    if count == 0 or len(inside) == 0:
        return vessels
    step = 0.5 * vox.min()
    for start in inside[rng.integers(len(inside), size=count)]:
        n = int(rng.uniform(*length_mm) / step)
        turns = rng.standard_normal((n, 3)) * np.sqrt(2 * step / 20.0)
        direction = rng.standard_normal(3)
        path = np.empty((n, 3))
        pos = start * vox
        for i in range(n):
            direction = direction / np.linalg.norm(direction) + turns[i]
            pos = pos + step * direction / np.linalg.norm(direction)
            path[i] = pos
        radius = max(rng.uniform(*radius_mm), 0.5 * vox.min())
        _stamp(vessels, path / vox, radius / vox)
    return vessels & mask


def random_spheres(mask, voxel_size_mm, rng, count, radius_mm):
    """``count`` balls with radii drawn from ``radius_mm``, centred at random
    voxels of ``mask``. Returns a list of bool arrays (one per ball)."""
    vox = np.asarray(voxel_size_mm, float)
    inside = np.argwhere(mask)
    balls = []
    for c in inside[rng.integers(len(inside), size=count)] if len(inside) else []:
        r = rng.uniform(*radius_mm)
        balls.append(_stamp(np.zeros(mask.shape, bool), c[None], r / vox))
    return balls


def _draw_tissue_chi(rng, vary):
    """chi (ppm) per label: the reference, or a draw around it (brain: 15 %
    relative + 0.005 ppm absolute spread; bone 10 %; air fixed)."""
    ref = chi_reference()
    chi = {lab: ref.get(lab, 0.0) for lab in LABELS}
    chi[HAEMORRHAGE] = 0.8
    if vary:
        for lab in (*PARENCHYMA, CSF, BLOOD, MUSCLE):
            chi[lab] = chi[lab] * (1 + 0.15 * rng.standard_normal()) + 0.005 * rng.standard_normal()
        chi[BONE] *= 1 + 0.1 * rng.standard_normal()
    return chi


def add_lesions(chi, labels, parenchyma, brain, voxel_size_mm, rng):
    """Stamp bleed- and calcification-like spheres into ``chi`` (ppm) and
    ``labels``, in place: 1-4 small (radius 1-2.5 mm) and 0-1 large (4-8 mm)
    haemorrhages of 0.4-1.2 ppm, 1-3 calcifications (1-3 mm) of -3 to -0.2
    ppm, centred in ``parenchyma`` and clipped to ``brain``."""
    bleeds = random_spheres(parenchyma, voxel_size_mm, rng, rng.integers(1, 5), (1.0, 2.5))
    bleeds += random_spheres(parenchyma, voxel_size_mm, rng, rng.integers(0, 2), (4.0, 8.0))
    for ball in bleeds:
        labels[ball & brain] = HAEMORRHAGE
        chi[ball & brain] = rng.uniform(0.4, 1.2)
    for ball in random_spheres(parenchyma, voxel_size_mm, rng, rng.integers(1, 4), (1.0, 3.0)):
        labels[ball & brain] = CALCIFICATION
        chi[ball & brain] = rng.uniform(-3.0, -0.2)


def _decorate(labels, brain, base_chi, vox, rng, *, texture, vessels, lesions):
    """Add texture, vessels and lesions to a base chi map; build M0 and R2*."""
    labels = labels.copy()
    chi = base_chi.astype(np.float32)
    if texture:
        chi = add_texture(chi, brain, vox, rng)
    parenchyma = brain & np.isin(labels, PARENCHYMA)
    if vessels:
        tubes = random_vessels(parenchyma, vox, rng)
        labels[tubes] = BLOOD
        chi[tubes] = rng.uniform(0.25, 0.45)
    if lesions:
        add_lesions(chi, labels, parenchyma, brain, vox, rng)
    m0 = _lookup(_M0, labels)
    if texture:
        m0 *= 1 + 0.03 * smooth_noise(chi.shape, vox, 3.0, rng)
    r2star = _lookup(_R2STAR_3T, labels)
    return chi, labels, m0, r2star


def _lookup(table, labels):
    lut = np.zeros(256, np.float32)
    for k, v in table.items():
        lut[k] = v
    return lut[labels]


def challenge_head(voxel_size_mm=1.0, *, rng=None, vary_chi=True, texture=True,
                   vessels=True, lesions=True):
    """The QSM Challenge 2.0 head phantom at any voxel size.

    Parameters
    ----------
    voxel_size_mm : float or 3 floats
        Output voxel size; the 1 mm model is resampled (anti-aliased) to it.
    rng : int, numpy Generator or None
        Seed for every random draw (None: fresh entropy).
    vary_chi : bool
        Draw per-region chi around the Challenge reference (else the reference).
    texture, vessels, lesions : bool
        Add smooth chi/M0 texture; ~40 thin random veins (0.25..0.45 ppm);
        1-5 microbleeds/haemorrhages (+0.4..1.2 ppm) and 1-3 calcifications
        (-3..-0.2 ppm).

    Returns
    -------
    Phantom
    """
    rng = as_rng(rng)
    labels, brain, vox, affine = _challenge_arrays()
    table = _draw_tissue_chi(rng, vary_chi)
    base = _lookup(table, labels)
    chi, labels, m0, r2star = _decorate(labels, brain, base, vox, rng,
                                        texture=texture, vessels=vessels, lesions=lesions)
    phantom = Phantom(chi, brain, labels, m0, r2star, vox, affine, chi_reference()[AIR])
    return resample(phantom, voxel_size_mm)


# MNI152 centres (mm) and semi-axes (mm) of the iron-rich nuclei (left side;
# mirrored in x), approximate.
_MNI_NUCLEI = {
    1: ((-13, 14, 8), (5, 8, 8)),
    3: ((-25, 2, 1), (5, 11, 8)),
    2: ((-19, -4, -1), (3, 6, 4)),
    7: ((-11, -18, 7), (7, 11, 7)),
    6: ((-11, -16, -13), (3, 6, 2.5)),
    4: ((-5, -20, -9), (3, 3, 3)),
    5: ((-14, -56, -33), (5, 6, 5)),
}
# air cavities (MNI mm): sphenoid and frontal sinuses, ear canals/mastoids
_MNI_AIR = (((0, 15, -30), (12, 10, 8)), ((0, 62, 8), (10, 5, 8)),
            ((-50, -25, -38), (6, 8, 6)), ((50, -25, -38), (6, 8, 6)))


def _ellipsoid(shape, affine, centre_mm, axes_mm):
    """Bool mask of an axis-aligned ellipsoid given in world mm (the affine
    must be axis-aligned, as the MNI template's is)."""
    vox = np.abs(np.diag(affine)[:3])
    centre = np.linalg.solve(affine, [*centre_mm, 1.0])[:3]
    radius = np.asarray(axes_mm) / vox
    lo = np.maximum(np.floor(centre - radius).astype(int), 0)
    hi = np.minimum(np.ceil(centre + radius).astype(int) + 1, shape)
    out = np.zeros(shape, bool)
    if np.any(hi <= lo):
        return out
    grid = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
    d = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius))
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = d <= 1.0
    return out


def mni_head(voxel_size_mm=1.0, *, rng=None, vary_chi=True, texture=True, vessels=True,
             lesions=True):
    """A head phantom on the MNI152 anatomy (never used for training).

    chi in the brain is the partial-volume mixture of grey matter, white
    matter and CSF values (MNI152 2009a probability maps shipped with
    nilearn, no download), with ellipsoidal deep-grey-matter nuclei at their
    approximate MNI positions; around it a 2 mm CSF rim, a 6 mm skull, 5 mm
    of scalp and air, with sinus and ear-canal air cavities for a realistic
    background field. Arguments as for :func:`challenge_head`.
    """
    from nilearn import datasets

    rng = as_rng(rng)
    gm_img = datasets.load_mni152_gm_template(resolution=1)
    gm = np.asarray(gm_img.dataobj, np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, np.float32)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0
    affine = gm_img.affine
    vox = tuple(float(v) for v in gm_img.header.get_zooms()[:3])
    # pad so that skull, scalp and the air around them fit in the grid
    pad = 16
    gm, wm, brain = (np.pad(a, pad) for a in (gm, wm, brain))
    affine = affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, pad)

    depth = ndimage.distance_transform_edt(~brain, sampling=vox)
    rim, skull, head = depth <= 2.0, depth <= 8.0, depth <= 13.0
    labels = np.full(gm.shape, AIR, np.uint8)
    labels[head] = MUSCLE
    labels[skull] = BONE
    for centre, axes in _MNI_AIR:
        labels[_ellipsoid(gm.shape, affine, centre, axes) & ~rim] = AIR
    labels[rim] = CSF
    csf = np.clip(1 - gm - wm, 0, 1)
    labels[brain] = np.where(wm > np.maximum(gm, csf), 8, np.where(gm >= csf, 9, CSF))[brain]
    for lab, (centre, axes) in _MNI_NUCLEI.items():
        for sign in (1, -1):
            c = (sign * centre[0], centre[1], centre[2])
            labels[_ellipsoid(gm.shape, affine, c, axes) & brain & (wm + gm > 0.5)] = lab

    table = _draw_tissue_chi(rng, vary_chi)
    base = _lookup(table, labels)
    tissue = brain & np.isin(labels, (8, 9, CSF))
    mix = gm * table[9] + wm * table[8] + csf * table[CSF]
    base[tissue] = mix[tissue]
    chi, labels, m0, r2star = _decorate(labels, brain, base, vox, rng,
                                        texture=texture, vessels=vessels, lesions=lesions)
    phantom = Phantom(chi, brain, labels, m0, r2star, vox, affine, chi_reference()[AIR])
    return resample(phantom, voxel_size_mm)


def resample(phantom, voxel_size_mm):
    """Resample a phantom to another voxel size over the same field of view.

    Continuous maps (chi, M0, R2*) are Gaussian anti-aliased (FWHM = the
    down-sampling factor in voxels) and interpolated linearly; labels take the
    nearest voxel; the brain mask keeps voxels at least half inside.
    """
    src = np.asarray(phantom.voxel_size_mm, float)
    dst = np.broadcast_to(np.asarray(voxel_size_mm, float), (3,))
    if np.allclose(src, dst):
        return phantom
    shape = tuple(int(round(n * s / d)) for n, s, d in zip(phantom.chi_ppm.shape, src, dst))
    factor = dst / src
    # output voxel j sits at source index -0.5 + (j + 0.5) * factor
    coords = np.meshgrid(*[-0.5 + (np.arange(m) + 0.5) * f for m, f in zip(shape, factor)],
                         indexing="ij", sparse=False)
    sigma = [f / 2.355 if f > 1 else 0 for f in factor]

    def smooth(a, order=1):
        a = ndimage.gaussian_filter(a.astype(np.float32), sigma) if order else a
        return ndimage.map_coordinates(a, coords, order=order, mode="nearest")

    step = np.diag([*factor, 1.0])
    step[:3, 3] = -0.5 + 0.5 * factor
    return replace(
        phantom,
        chi_ppm=smooth(phantom.chi_ppm),
        brain_mask=smooth(phantom.brain_mask) >= 0.5,
        labels=smooth(phantom.labels, order=0),
        m0=smooth(phantom.m0),
        r2star_hz=smooth(phantom.r2star_hz),
        voxel_size_mm=tuple(float(d) for d in dst),
        affine=phantom.affine @ step,
    )


def crop(phantom, shape):
    """Crop a phantom to ``shape`` (voxels) around the brain's centre of mass;
    where ``shape`` reaches beyond the grid, pad with air."""
    centre = np.round(np.argwhere(phantom.brain_mask).mean(0)).astype(int)
    start = centre - np.asarray(shape) // 2
    src = [slice(max(s, 0), min(s + n, N)) for s, n, N in zip(start, shape, phantom.chi_ppm.shape)]
    dst = [slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start)]

    def take(a, fill):
        out = np.full(shape, fill, a.dtype)
        out[tuple(dst)] = a[tuple(src)]
        return out

    shift = np.eye(4)
    shift[:3, 3] = start
    return replace(
        phantom,
        chi_ppm=take(phantom.chi_ppm, phantom.chi_ambient_ppm),
        brain_mask=take(phantom.brain_mask, False),
        labels=take(phantom.labels, AIR),
        m0=take(phantom.m0, 0),
        r2star_hz=take(phantom.r2star_hz, 0),
        affine=phantom.affine @ shift,
    )
