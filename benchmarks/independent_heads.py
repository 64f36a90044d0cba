"""Head phantoms for the independent benchmark, made without :mod:`qsmprep.sim`.

Anatomy: the MNI152 2009a grey/white-matter probability maps and T1 template
that ship with nilearn (no download; no network of ours was trained on them),
deformed per head by a seeded affine, with deep-grey-matter nuclei, veins,
bleeds and calcifications added here, and a CSF rim, skull, scalp, neck and
air cavities (frontal and sphenoid sinuses, nasal cavity, ear canals and
mastoid air) of seeded thickness and size around the brain. One held-out head
(:func:`challenge_model`) has a real head's geometry instead: the QSM Challenge
2.0 segmentation on its own 0.64 mm grid, with the Challenge's χ values.

Acquisition: qsm-forward's head route (Jaffray et al., QSM-CI) on a model grid
twice as fine as the acquired voxel: the field of the whole head in air, a
second-order shim, qsm-forward's phase offset and its multi-echo GRE signal
(:func:`qsm_forward.generate_signal`), cropped in k-space to the acquired grid
(:func:`qsm_forward.crop_kspace`) and given complex noise
(:func:`qsm_forward.add_noise`).

Two departures from ``qsm_forward.generate_bids``, both so that the truth
matches the signal (see docs/benchmarks.md, section ``independent``):

* the headers and truth maps are written on the acquired grid here:
  acquired voxel ``j`` is model voxel ``2j`` (what a k-space crop by 2 gives),
  the truth χ and local field are low-passed by the same k-space crop, and
  the affine is oblique so that the scanner's z axis is B0 (qsm-forward's
  image-space ``resize`` keeps only the affine's diagonal and drops its
  origin, so its headers and truth maps do not line up with the signal);
* the background stage's input is the low-passed local field plus the
  background field (of the χ outside the brain) taken at model voxel ``2j``:
  harmonic in the brain, as the truth of that stage needs; low-passing the
  whole field instead rings at the head's surface, 20 times the local field
  in the brain (the signal does not: it is zero in the air);
* the shim removes the 2nd-order *solid harmonics* fitted in the brain (a
  real shim's fields are harmonic); qsm-forward's Legendre fit includes the
  non-harmonic x², y², z² terms, which would take part of the local field
  out of the signal but not out of the truth.

The field is the same forward model as :func:`qsm_forward.generate_field`
(D = 1/3 − (k·b)²/|k|², 2× padding with the corner value; checked equal in
tests/test_benchmarks.py), computed with a real FFT in float32 so that a
0.5 mm model grid fits in memory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

#: Challenge 2.0 head labels (so that qsmprep.qsm.metrics.region_metrics applies)
CAUDATE, PALLIDUM, PUTAMEN, RED_NUCLEUS, DENTATE, NIGRA, THALAMUS = 1, 2, 3, 4, 5, 6, 7
WM, GM, CSF, VEIN, BONE, AIR, SOFT, CALCIFICATION, BLEED = 8, 9, 10, 11, 13, 14, 15, 16, 17

#: nuclei: label, MNI centre (mm, one hemisphere; mirrored), semi-axes (mm),
#: χ (ppm) before the per-head draw, R2* at 3 T (1/s)
NUCLEI = (
    (CAUDATE, (13, 12, 10), (4.5, 9, 7), 0.060, 22.0),
    (PUTAMEN, (25, 2, 1), (5, 13, 8), 0.045, 24.0),
    (PALLIDUM, (18, -3, -1), (3.5, 7, 4), 0.150, 38.0),
    (THALAMUS, (11, -18, 7), (7, 12, 8), 0.015, 20.0),
    (NIGRA, (10, -17, -11), (3, 6, 2.5), 0.120, 34.0),
    (RED_NUCLEUS, (5, -20, -8), (2.8, 3.2, 2.8), 0.100, 30.0),
    (DENTATE, (15, -56, -33), (6, 7, 5), 0.120, 30.0),
)

#: air cavities: MNI centre (mm), semi-axes (mm), mirrored
CAVITIES = (
    ((0, 60, -8), (12, 7, 10), False),      # frontal sinus
    ((0, 10, -36), (12, 12, 9), False),     # sphenoid sinus
    ((0, 48, -45), (9, 22, 14), False),     # nasal cavity / ethmoid
    ((58, -22, -42), (5, 9, 5), True),      # ear canals
    ((50, -38, -40), (9, 10, 8), True),     # mastoid air cells
)

#: tissue properties: label -> (M0, R2* at 3 T in 1/s)
TISSUE = {WM: (0.75, 21.0), GM: (0.85, 16.0), CSF: (1.0, 2.0), VEIN: (0.6, 45.0),
          BONE: (0.06, 400.0), AIR: (0.0, 0.0), SOFT: (0.9, 30.0),
          CALCIFICATION: (0.2, 250.0), BLEED: (0.45, 90.0)}


#: the phantom's version: 2 since 2026-12-03 (no χ texture in CSF); a head cached by
#: another version is rebuilt
PHANTOM_VERSION = 2


@dataclasses.dataclass
class Head:
    """A head on the acquired grid with its truth (qsm-forward signal)."""

    name: str
    description: str
    voxel_size_mm: tuple
    b0_dir: tuple              # unit vector in voxel axes
    field_strength_t: float
    echo_times_s: tuple
    affine: np.ndarray         # oblique: world z is B0
    mask: np.ndarray           # true brain mask (bool)
    labels: np.ndarray         # uint8, the labels above
    chi: np.ndarray            # truth χ (ppm), low-passed, 0 outside the mask
    total_field: np.ndarray    # ppm, shimmed: local_field + the background field at voxel 2j
    local_field: np.ndarray    # ppm, field of the brain's own χ, low-passed, in the mask
    magnitude: np.ndarray      # (X, Y, Z, E)
    phase: np.ndarray          # (X, Y, Z, E) rad, wrapped
    version: int = PHANTOM_VERSION


def phantom_version(head):
    """The phantom version ``head`` was built by (a version-1 pickle has no
    ``version`` field; the class default would claim the current one)."""
    return vars(head).get("version", 1)


def tilted_b0(tilt_deg, azimuth_deg=30.0):
    """Unit B0 direction in voxel axes, ``tilt_deg`` from the third axis."""
    t, a = np.deg2rad(tilt_deg), np.deg2rad(azimuth_deg)
    return np.array([np.sin(t) * np.cos(a), np.sin(t) * np.sin(a), np.cos(t)])


def oblique_affine(voxel_size_mm, b0_dir, origin_mm):
    """An affine whose rotation R takes ``b0_dir`` (voxel axes) to world z,
    so that ``b_i = R[2, i]`` reads B0 back (QSM_NOTES.md, geometry)."""
    b = np.asarray(b0_dir, float) / np.linalg.norm(b0_dir)
    z = np.array([0.0, 0.0, 1.0])
    v, c = np.cross(b, z), float(np.dot(b, z))
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    rot = np.eye(3) + vx + vx @ vx / (1.0 + c)      # Rodrigues: rot @ b = z
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(voxel_size_mm)
    affine[:3, 3] = origin_mm
    return affine


def dipole_field(chi_ppm, voxel_size_mm, b0_dir):
    """Field (ppm) of ``chi_ppm``: qsm-forward's ``generate_field`` without its
    mean removal (2× grid padded with the corner value, D(0) = 0), by a real
    FFT in float32."""
    shape = np.array(chi_ppm.shape)
    pad = np.full(tuple(2 * shape), chi_ppm[-1, -1, -1], np.float32)
    pad[:shape[0], :shape[1], :shape[2]] = chi_ppm
    spec = sfft.rfftn(pad, workers=-1)
    del pad
    b = np.asarray(b0_dir, float) / np.linalg.norm(b0_dir)
    k = [np.fft.fftfreq(n, d).astype(np.float32) for n, d in zip(2 * shape, voxel_size_mm)]
    k[2] = np.fft.rfftfreq(2 * shape[2], voxel_size_mm[2]).astype(np.float32)
    ky, kz = k[1][:, None], k[2][None, :]
    for i, kx in enumerate(k[0]):           # slab by slab: no full-size k arrays
        k2 = kx ** 2 + ky ** 2 + kz ** 2
        kb = kx * b[0] + ky * b[1] + kz * b[2]
        with np.errstate(invalid="ignore", divide="ignore"):
            d = np.where(k2 > 0, np.float32(1 / 3) - kb ** 2 / k2, 0).astype(np.float32)
        spec[i] *= d
    field = sfft.irfftn(spec, s=tuple(2 * shape), workers=-1)
    return np.ascontiguousarray(field[:shape[0], :shape[1], :shape[2]], dtype=np.float32)


def harmonic_shim(field, mask, order=2):
    """``field`` minus the solid harmonics up to ``order`` (≤ 2) fitted in
    ``mask``: a shim that leaves the brain's own (local) field untouched."""
    idx = np.indices(field.shape, dtype=np.float32)
    centre = [float(np.mean(np.nonzero(mask)[i])) for i in range(3)]
    x, y, z = (idx[i] - centre[i] for i in range(3))
    terms = [np.ones_like(x)]
    if order >= 1:
        terms += [x, y, z]
    if order >= 2:
        terms += [x * y, x * z, y * z, x * x - y * y, 2 * z * z - x * x - y * y]
    a = np.stack([t[mask] for t in terms], axis=1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(a, field[mask].astype(np.float64), rcond=None)
    fit = sum(c * t for c, t in zip(coef, terms))
    return (field - fit).astype(np.float32)


def _ellipsoid(shape, centre_vox, semi_vox):
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / s) ** 2 for g, c, s in zip(grids, centre_vox, semi_vox)) <= 1.0


def _smooth_noise(shape, sigma_vox, rng):
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return noise / (noise.std() + 1e-12)


def _anatomy(model_voxel_mm, rng):
    """MNI152 maps resampled to the model grid through a seeded affine (scale
    0.93–1.07 per axis, rotation up to 4°), cropped to the head. Returns
    ``gm, wm, brain, t1, mni_of`` (``mni_of(mm)``: MNI mm → model voxel)."""
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    maps = [np.asarray(gm_img.dataobj, np.float32),
            np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, np.float32),
            (np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0)
            .astype(np.float32),
            np.asarray(datasets.load_mni152_template(resolution=1).dataobj, np.float32)]
    mni_affine = gm_img.affine
    scale = rng.uniform(0.93, 1.07, 3)
    angles = np.deg2rad(rng.uniform(-4, 4, 3))
    rot = np.eye(3)
    for axis, ang in enumerate(angles):
        c, s = np.cos(ang), np.sin(ang)
        r = np.eye(3)
        i, j = [a for a in range(3) if a != axis]
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    deform = rot @ np.diag(scale)            # head mm = deform @ MNI mm
    # the model grid: the deformed brain's box plus 30 mm (skull, scalp, air),
    # and 45 mm below it (face, neck)
    brain_vox = np.argwhere(maps[2] > 0)
    brain_mm = (mni_affine[:3, :3] @ brain_vox.T).T + mni_affine[:3, 3]
    head_mm = brain_mm @ deform.T
    lo = head_mm.min(0) - np.array([30, 30, 45])
    hi = head_mm.max(0) + 30
    shape = tuple(int(np.ceil((h - l) / model_voxel_mm / 2) * 2) for l, h in zip(lo, hi))
    # model voxel v -> head mm -> MNI mm -> MNI voxel
    inv_deform = np.linalg.inv(deform)
    to_mni_vox = np.linalg.inv(mni_affine)
    matrix = to_mni_vox[:3, :3] @ inv_deform * model_voxel_mm
    offset = to_mni_vox[:3, :3] @ (inv_deform @ lo) + to_mni_vox[:3, 3]
    out = [ndimage.affine_transform(m, matrix, offset, output_shape=shape, order=1,
                                    mode="constant", cval=0.0) for m in maps]

    def mni_of(mm):
        return (deform @ np.asarray(mm, float) - lo) / model_voxel_mm

    gm, wm, brain, t1 = out
    return np.clip(gm, 0, 1), np.clip(wm, 0, 1), brain > 0.5, t1, mni_of


def tissue_texture(t1, wm, gm, brain, model_voxel_mm, rng):
    """χ texture (ppm): the T1 template's fine structure (darker T1 → more
    iron, less myelin: −0.01 ppm per standard deviation of its detail finer
    than 3 mm) plus smooth noise (0.006 ppm, 2 mm), in the tissue's share of
    each voxel (``wm + gm``) only: CSF is water and stays at the reference 0.
    (Version 1 of the phantom textured CSF too: its ventricles sat at
    +0.02 ppm and no region of the truth was at 0; docs/benchmarks.md.)"""
    detail = t1 - ndimage.gaussian_filter(t1, 3 / model_voxel_mm)
    texture = (-0.01 * detail / (detail[brain].std() + 1e-12)
               + 0.006 * _smooth_noise(t1.shape, 2 / model_voxel_mm, rng))
    return (np.clip(wm + gm, 0, 1) * texture).astype(np.float32)


def build_head(name, description, *, voxel_size_mm, field_strength_t, echo_times_s,
               b0_tilt_deg, seed, peak_snr=80.0, chi_texture=True, anatomy="mni"):
    """Build one :class:`Head` (see the module docstring); everything is drawn
    from ``seed``. ``anatomy``: ``"mni"`` (the MNI152 model above) or
    ``"challenge"`` (:func:`challenge_model`: the QSM Challenge 2.0 head's
    segmentation, whose 0.64 mm grid fixes ``voxel_size_mm`` at 1.28)."""
    rng = np.random.default_rng(seed)
    h = voxel_size_mm / 2.0                  # model grid: twice as fine
    if anatomy == "mni":
        labels, chi, brain, brain_chi = mni_model(h, rng, chi_texture)
    elif anatomy == "challenge":
        labels, chi, brain, brain_chi = challenge_model(h, rng, chi_texture)
    else:
        raise ValueError(f"Unknown anatomy {anatomy!r}; expected 'mni' or 'challenge'")
    return acquire(name, description, labels, chi, brain, brain_chi,
                   voxel_size_mm=voxel_size_mm, field_strength_t=field_strength_t,
                   echo_times_s=echo_times_s, b0_tilt_deg=b0_tilt_deg, seed=seed,
                   peak_snr=peak_snr)


def mni_model(h, rng, chi_texture=True):
    """The MNI152 head on a model grid of ``h`` mm: ``(labels, chi, brain,
    brain_chi)``, χ (ppm) of the whole head (the outside smoothed by a
    1-voxel partial volume) and of the brain alone."""
    gm, wm, brain, t1, mni_of = _anatomy(h, rng)
    shape = brain.shape
    vox3 = (h, h, h)

    # labels: brain tissue, then nuclei, shells and cavities
    labels = np.full(shape, AIR, np.uint8)
    depth_out = ndimage.distance_transform_edt(~brain, sampling=vox3)
    rim = 1.5 + 1.0 * (1 + _smooth_noise(shape, 12 / h, rng).clip(-1, 1))   # 1.5–3.5 mm
    skull = rim + 6.5 + 1.5 * _smooth_noise(shape, 15 / h, rng).clip(-1.5, 1.5)
    scalp = skull + 5.0 + 1.0 * _smooth_noise(shape, 15 / h, rng).clip(-1, 1)
    labels[depth_out <= scalp] = SOFT
    labels[depth_out <= skull] = BONE
    labels[depth_out <= rim] = CSF
    # face and neck: soft tissue below the brain, bone in front of it
    neck_top = mni_of((0, -20, -40))[2]
    neck = _ellipsoid(shape, mni_of((0, -5, -70)), (55 / h, 70 / h, 1e6))
    neck[:, :, int(neck_top):] = False
    labels[neck & (labels == AIR)] = SOFT
    csf_frac = np.clip(1 - gm - wm, 0, 1)
    tissue = np.argmax(np.stack([wm, gm, csf_frac]), axis=0)
    labels[brain] = np.array([WM, GM, CSF], np.uint8)[tissue[brain]]

    chi = np.zeros(shape, np.float32)
    chi_wm, chi_gm = rng.uniform(-0.045, -0.02), rng.uniform(0.01, 0.035)
    chi[brain] = (wm * chi_wm + gm * chi_gm)[brain]             # CSF is the reference, 0
    if chi_texture:
        chi[brain] += tissue_texture(t1, wm, gm, brain, h, rng)[brain]
    for label, centre, semi, value, _ in NUCLEI:
        v = value * rng.uniform(0.75, 1.3)
        for side in (1, -1):
            c = mni_of((side * centre[0], centre[1], centre[2]))
            sel = _ellipsoid(shape, c, [s * rng.uniform(0.85, 1.15) / h for s in semi]) & brain
            labels[sel], chi[sel] = label, v
    # veins: the superior sagittal and straight sinuses, then random tubes
    veins = np.zeros(shape, bool)
    sinuses = (((0, 62, 28), (0, 40, 62), 2.5), ((0, 40, 62), (0, 0, 74), 3.0),
               ((0, 0, 74), (0, -45, 70), 3.0), ((0, -45, 70), (0, -85, 40), 3.2),
               ((0, -48, 8), (0, -88, 20), 2.2))          # superior sagittal, straight sinus
    for a, b, r in sinuses:
        veins |= _tube(shape, mni_of(a), mni_of(b), r / h)
    for _ in range(14):
        a = rng.uniform((-60, -90, -30), (60, 60, 65))
        b = a + rng.normal(0, 25, 3)
        veins |= _tube(shape, mni_of(a), mni_of(b), rng.uniform(0.8, 1.6) / h)
    veins &= brain | (depth_out <= rim)
    labels[veins], chi[veins] = VEIN, rng.uniform(0.3, 0.45)
    for _ in range(2):
        c = rng.uniform((-45, -60, -10), (45, 40, 50))
        sel = _ellipsoid(shape, mni_of(c), [rng.uniform(2.5, 5) / h] * 3) & brain
        labels[sel], chi[sel] = BLEED, rng.uniform(0.4, 0.9)
    c = rng.uniform((-35, -50, 0), (35, 30, 40))
    sel = _ellipsoid(shape, mni_of(c), [rng.uniform(1.2, 2.2) / h] * 3) & brain
    labels[sel], chi[sel] = CALCIFICATION, rng.uniform(-1.0, -0.3)
    brain_chi = np.where(brain, chi, 0).astype(np.float32)

    # background sources: bone, soft tissue, air in the cavities and around the head
    chi[labels == BONE] = rng.uniform(-2.4, -1.8)
    chi[labels == SOFT] = rng.uniform(-0.1, 0.0)
    outside = ~brain & (depth_out > rim)
    for centre, semi, mirror in CAVITIES:
        for side in ((1, -1) if mirror else (1,)):
            c = mni_of((side * centre[0], centre[1], centre[2]))
            sel = _ellipsoid(shape, c, [s * rng.uniform(0.8, 1.2) / h for s in semi]) & outside
            labels[sel] = AIR
    chi[labels == AIR] = 9.2
    return labels, _partial_volume_outside(chi, brain), brain, brain_chi


def _partial_volume_outside(chi, brain):
    """χ outside ``brain`` smoothed by a 1-voxel Gaussian (partial volume), so
    that its field is not dominated by staircase edges."""
    smooth = ndimage.gaussian_filter(chi, 1.0)
    return np.where(brain, chi, smooth).astype(np.float32)


#: the QSM Challenge 2.0 head (README of ../shared/data, or $QSMPREP_SHARED_DATA as for
#: the tests): segmentation, brain mask and reference χ per label, on a 0.64 mm grid
CHALLENGE_DIR = Path(os.environ.get("QSMPREP_SHARED_DATA", Path(__file__).resolve().parents[2]
                                    / "shared" / "data")) / "challenge2-head"
CHALLENGE_VOXEL_MM = 0.64


def challenge_segmentation(source=CHALLENGE_DIR):
    """The Challenge head on its 0.64 mm grid: ``(labels, brain, chi_ref)``, the
    segmentation (uint8, the suite's label numbers), its brain mask and the
    reference χ of each label (ppm, relative to water) as a lookup array indexed
    by label (label = row of the table + 1; 0 for labels not in the table)."""
    import nibabel as nb
    from scipy.io import loadmat

    labels = np.asarray(nb.load(source / "SegmentedModel.nii.gz").dataobj).astype(np.uint8)
    brain = np.asarray(nb.load(source / "BrainMask.nii.gz").dataobj) > 0
    table = loadmat(source / "SusceptibilityValues.mat", squeeze_me=True)["label"]
    chi_ref = np.zeros(256)
    for i, entry in enumerate(table):
        chi_ref[i + 1] = float(entry["chiref"])
    return labels, brain, chi_ref


def challenge_model(h, rng, chi_texture=True, source=CHALLENGE_DIR):
    """The QSM Challenge 2.0 head (real head geometry: brain, vessels, skull,
    sinuses, ear canals, muscle, as segmented) as a model grid of ``h`` =
    0.64 mm: ``(labels, chi, brain, brain_chi)`` as :func:`mni_model`. χ is
    the Challenge's reference value of each label less CSF's (0.019 ppm), so
    CSF is the suite's zero, plus (``chi_texture``) smooth noise of 0.006 ppm
    (2 mm) in the tissue (every brain label but CSF, blood and calcification).
    Its labels are the suite's (the same numbering)."""
    if abs(h - CHALLENGE_VOXEL_MM) > 1e-6:
        raise ValueError(f"The Challenge head's model grid is {CHALLENGE_VOXEL_MM} mm, so its "
                         f"acquired voxel is {2 * CHALLENGE_VOXEL_MM} mm, not {2 * h} mm")
    labels, brain, chi_ref = challenge_segmentation(source)
    chi = (chi_ref - chi_ref[CSF]).astype(np.float32)[labels]
    if chi_texture:
        tissue = brain & ~np.isin(labels, (CSF, VEIN, CALCIFICATION))
        chi += np.where(tissue, 0.006 * _smooth_noise(labels.shape, 2 / h, rng), 0)
    brain_chi = np.where(brain, chi, 0).astype(np.float32)
    return labels, _partial_volume_outside(chi, brain), brain, brain_chi


def challenge_geometry(block=4, source=CHALLENGE_DIR):
    """The Challenge head's geometry on a grid ``block`` times as coarse as its
    0.64 mm model (block means, for quick checks of the head's background
    field): ``(chi, brain, magnitude, voxel_size_mm)`` with χ the labels'
    reference values (ppm, relative to water: air +9.2, bone -2.1), ``brain``
    the block means of the brain mask above 0.5 and ``magnitude`` the fraction
    of a block that is neither air nor bone (signal). The grid is RAS."""
    labels, brain, chi_ref = challenge_segmentation(source)
    shape = tuple(n // block for n in labels.shape)

    def block_mean(volume):
        v = volume.astype(np.float32)[tuple(slice(0, block * n) for n in shape)]
        return v.reshape(shape[0], block, shape[1], block, shape[2], block).mean(axis=(1, 3, 5))

    magnitude = 1 - block_mean(labels == AIR) - block_mean(labels == BONE)
    return (block_mean(chi_ref.astype(np.float32)[labels]), block_mean(brain) > 0.5, magnitude,
            (CHALLENGE_VOXEL_MM * block,) * 3)


def acquire(name, description, labels, chi, brain, brain_chi, *, voxel_size_mm,
            field_strength_t, echo_times_s, b0_tilt_deg, seed, peak_snr=80.0):
    """The :class:`Head` of a model (``labels``, whole-head ``chi``, ``brain``,
    ``brain_chi`` on a grid twice as fine as ``voxel_size_mm``): qsm-forward's
    signal with oblique B0, k-space cropped, with noise; truth on the acquired
    grid (the module docstring)."""
    import qsm_forward

    h = voxel_size_mm / 2.0
    shape = brain.shape
    vox3 = (h, h, h)
    b0_dir = tilted_b0(b0_tilt_deg)
    field = dipole_field(chi, vox3, b0_dir)
    field = harmonic_shim(field, brain)
    local = dipole_field(brain_chi, vox3, b0_dir)
    del chi

    m0 = np.zeros(shape, np.float32)
    r2s = np.zeros(shape, np.float32)
    for label, (m, r) in TISSUE.items():
        m0[labels == label], r2s[labels == label] = m, r
    for label, _, _, _, r in NUCLEI:
        m0[labels == label], r2s[labels == label] = 0.78, r
    m0 = ndimage.gaussian_filter(m0, 0.7)
    r2s = np.maximum(ndimage.gaussian_filter(r2s, 0.7), 1.0) * (field_strength_t / 3.0)
    offset = qsm_forward.generate_phase_offset(m0, brain, shape)

    acq_shape = tuple(n // 2 for n in shape)
    noise_rng = np.random.default_rng(seed + 1)
    mags, phases = [], []
    for te in echo_times_s:
        sig = qsm_forward.generate_signal(field, B0=field_strength_t, TR=0.05, TE=te,
                                          flip_angle=15, phase_offset=offset, R1=1.0,
                                          R2star=r2s, M0=m0)
        sig = qsm_forward.crop_kspace(sig, acq_shape)
        sig = qsm_forward.add_noise(sig, peak_snr=peak_snr, rng=noise_rng)
        mags.append(np.abs(sig).astype(np.float32))
        phases.append(np.angle(sig).astype(np.float32))
        del sig

    def lowpass(a):
        return np.real(qsm_forward.crop_kspace(a.astype(np.complex64), acq_shape)).astype(
            np.float32)

    mask = brain[::2, ::2, ::2]
    local_lp = lowpass(local)
    acq_vox = (voxel_size_mm,) * 3
    origin = -np.asarray(acq_vox) * np.asarray(acq_shape) / 2
    return Head(
        name, description, acq_vox, tuple(float(v) for v in b0_dir), float(field_strength_t),
        tuple(echo_times_s), oblique_affine(acq_vox, b0_dir, origin), mask,
        labels[::2, ::2, ::2], np.where(mask, lowpass(brain_chi), 0).astype(np.float32),
        np.where(mask, local_lp + (field - local)[::2, ::2, ::2], 0).astype(np.float32),
        np.where(mask, local_lp, 0).astype(np.float32),
        np.stack(mags, -1), np.stack(phases, -1))


def _tube(shape, a, b, radius_vox):
    """Voxels within ``radius_vox`` of the segment a–b (voxel coordinates)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    lo = np.maximum(np.floor(np.minimum(a, b) - radius_vox - 1), 0).astype(int)
    hi = np.minimum(np.ceil(np.maximum(a, b) + radius_vox + 2), shape).astype(int)
    out = np.zeros(shape, bool)
    if np.any(hi <= lo):
        return out
    grid = np.stack(np.meshgrid(*[np.arange(l, u) for l, u in zip(lo, hi)], indexing="ij"), -1)
    ab = b - a
    t = np.clip(((grid - a) @ ab) / max(ab @ ab, 1e-9), 0, 1)
    dist = np.linalg.norm(grid - (a + t[..., None] * ab), axis=-1)
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = dist <= radius_vox
    return out
