"""Hybrid training data, generated on the fly (the idea of NeXtQSM).

Cognolato F et al. NeXtQSM -- A complete deep learning pipeline for data-
consistent quantitative susceptibility mapping trained with hybrid data.
Med Image Anal 2023;84:102700: realistic brain *shapes* with simulated
susceptibility *content* and simulated background fields, so that no
in-vivo ground truth is needed.

Each sample starts from the Challenge 2.0 head (the only anatomy used for
training; :func:`~qsmprep.sim.phantoms.mni_head` stays unseen), randomly
rotated, scaled and elastically deformed, and fills it with random chi:
per-label tissue values drawn widely around the reference, smooth texture,
random spheres, ellipsoids and cylinders in the brain (including strong
bleed- and calcification-like sources), and random strong sources outside
the brain on top of air and bone. The fields are simulated on a region
``patch + 2 * margin`` wide and the patch is cropped from its centre, so
sources in the margin (and the region's own air/bone) act on the patch.

Everything is a pure function of ``(seed, index)``: the same pair always
gives the same sample, whatever the worker or the order.

Example::

    from torch.utils.data import DataLoader
    from qsmprep.sim.hybrid import HybridDataset

    data = HybridDataset(seed=0, patch_size=64, length=10_000)
    for batch in DataLoader(data, batch_size=2, num_workers=2):
        x = batch["total_field"][:, None] * batch["mask"][:, None]   # (B, 1, 64, 64, 64)
        y = batch["local_field"][:, None]
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ..qsm.fft import fast_shape, fftn, ifftn, pad
from ..qsm.kernels import dipole_kernel
from .acquisition import tilted_b0
from .forward import random_harmonic_field, smooth_outside
from .phantoms import (AIR, BONE, CSF, MUSCLE, PARENCHYMA, _challenge_arrays, _lookup,
                       _M0, _R2STAR_3T, add_lesions, add_texture, chi_reference)
from .signal import magnitude_phase, multi_echo_signal, smooth_phase_offset


def _deformation(shape, vox, rng, max_rotation_deg, scale_range, elastic_mm):
    """Map region voxel -> head mm offset from the region centre (3, X, Y, Z)."""
    rot = Rotation.from_rotvec(rng.standard_normal(3) / np.sqrt(3) *
                               np.radians(rng.uniform(0, max_rotation_deg))).as_matrix()
    linear = rot @ np.diag(rng.uniform(*scale_range, size=3))
    axes = [(np.arange(n) - (n - 1) / 2) * v for n, v in zip(shape, vox)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    coords = (linear @ grid).reshape(3, *shape)
    if elastic_mm > 0:  # smooth displacement: Gaussian-weighted 5^3 control grid
        control = rng.standard_normal((3, 5, 5, 5)) * elastic_mm
        weights = []
        for n in shape:
            knots = np.linspace(0, n - 1, 5)
            w = np.exp(-0.5 * ((np.arange(n)[:, None] - knots) / (knots[1] - knots[0])) ** 2)
            weights.append(w / w.sum(1, keepdims=True))
        coords += np.einsum("cijk,xi,yj,zk->cxyz", control, *weights, optimize=True)
    return coords


def _random_shape(shape, vox, rng, size_mm):
    """A random ellipsoid or cylinder (bool), anywhere in the grid."""
    axes = [((np.arange(n) - rng.uniform(0, n)) * v).astype(np.float32)
            for n, v in zip(shape, vox)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    r = Rotation.random(random_state=rng).as_matrix().tolist()  # floats: keep float32 grids
    u = [r[0][i] * x + r[1][i] * y + r[2][i] * z for i in range(3)]
    a = rng.uniform(*size_mm, size=3).tolist()
    if rng.random() < 0.7:  # ellipsoid (sphere when the axes are alike)
        return (u[0] / a[0]) ** 2 + (u[1] / a[1]) ** 2 + (u[2] / a[2]) ** 2 <= 1
    return ((u[0] / a[0]) ** 2 + (u[1] / a[0]) ** 2 <= 1) & (np.abs(u[2]) <= 4 * a[2])


def _smooth_background(chi, mask, local_mask, ambient, vox, sigma_mm):
    """The background sources: chi outside the brain ``mask`` anti-aliased by
    a Gaussian of ``sigma_mm`` (:func:`~qsmprep.sim.forward.smooth_outside`;
    brain chi outside ``local_mask``, in the margin of a patch, as it is), zero
    in ``local_mask``. Unsmoothed, the background of whole deformed heads at
    1 mm was not harmonic in the brain (V-SHARP of it alone left 80-130 % of
    the local field's norm 6 mm inside the brain; 1-3 % with ``sigma_mm`` = 1
    and the random sources kept 3 mm from the brain)."""
    outside = smooth_outside(chi, mask, vox, sigma_mm, ambient=ambient)
    return np.where(local_mask, 0, outside).astype(np.float32)


def _fields(chi_local, chi_background, vox, b0, pad_factor, ambient):
    """Local and background fields (ppm) with one complex FFT pair.

    The real and imaginary parts do not mix when the kernel is even,
    D[k] = D[-k]; on an even grid with an oblique B0 the Nyquist planes break
    that, so D is replaced by its even part, which gives exactly the real part
    that :func:`~qsmprep.qsm.kernels.dipole_convolve` keeps. The zero padding
    stands for ``ambient``: the world beyond the region continues with it.
    """
    shape = fast_shape(chi_local.shape, factor=pad_factor)
    both, crop = pad((chi_local + 1j * (chi_background - ambient)).astype(np.complex64), shape)
    d = dipole_kernel(shape, vox, b0)
    d = 0.5 * (d + np.roll(np.flip(d), 1, axis=(0, 1, 2)))
    out = ifftn(d * fftn(both))[crop]
    return out.real.astype(np.float32), out.imag.astype(np.float32)


def hybrid_sample(index, *, seed=0, patch_size=64, margin=16, voxel_size_mm=(1.0, 1.0, 1.0),
                  voxel_size_range_mm=None, max_b0_angle_deg=30.0, max_rotation_deg=15.0,
                  scale_range=(0.9, 1.1), elastic_mm=3.0, noise_ppm=(0.0, 0.003),
                  background_poly_ppm=(0.0, 0.3), echo_times_s=None, field_strength_t=3.0,
                  snr=(40.0, 200.0), pad_factor=1.5, local_sources="patch",
                  background_sigma_mm=1.0, background_clearance_mm=3.0,
                  texture_floor_ppm=(0.0, 0.01), texture_relative=(0.0, 0.2),
                  texture_fwhm_mm=(2.0, 8.0), lesions=False):
    """One hybrid training sample, a pure function of ``(seed, index)``.

    Parameters
    ----------
    index : int, sample number.
    seed : int, dataset seed.
    patch_size : int, 3 ints or None; None gives the whole (deformed) head.
    margin : int, voxels simulated around the patch on each side.
    voxel_size_mm : 3 floats; or draw each axis from ``voxel_size_range_mm``
        = (lo, hi) when given.
    max_b0_angle_deg : B0 tilted from the third axis by up to this, uniformly
        in angle and azimuth.
    max_rotation_deg, scale_range, elastic_mm : head deformation (rotation
        angle, per-axis scale, std of the smooth displacement).
    noise_ppm : (lo, hi) std of Gaussian noise added to ``total_field``
        (ppm; in vivo multi-echo field maps at 3 T have about 0.001-0.003
        ppm per voxel; until 2026-11-26 the default reached 0.01 ppm, about
        the RMS of a brain's local field).
    background_poly_ppm : (lo, hi) amplitude of a 2nd-order polynomial field.
    echo_times_s : optional echo times (s): also return wrapped ``phase`` and
        ``magnitude`` (X, Y, Z, echo) at ``field_strength_t`` with a
        first-echo SNR drawn from ``snr`` = (lo, hi).
    pad_factor : FFT zero padding of the region (1.5 keeps wrap-around
        images >= 1.5 region widths away).
    local_sources : ``"patch"`` (default): the local field is the field of
        the chi inside the brain mask *and the patch*, so it is fully
        determined by what the patch shows, as the local field of a whole
        head is by the brain; brain tissue in the margin acts as a background
        source. ``"region"``: the field of all brain chi of the region, part
        of which lies outside the patch (a dipole inversion of the patch
        cannot recover it).
    background_sigma_mm : std (mm) of a Gaussian applied to the chi outside
        the brain (relative to the ambient air) before its field is computed,
        and to M0 of the ``magnitude`` (with ``echo_times_s``); 0 keeps the
        voxelised sources. See :func:`_smooth_background`.
    background_clearance_mm : the random strong sources outside the brain
        stay at least this far from the brain mask (anatomy keeps CSF, skull
        and meninges between the brain and air or bone).
    texture_floor_ppm, texture_relative, texture_fwhm_mm : (lo, hi) ranges of
        the brain texture's parameters (:func:`~qsmprep.sim.phantoms.add_texture`,
        the benchmark phantoms' model: 0.005 ppm + 0.1 |chi|, 3 mm FWHM).
        Until 2026-11-27 the texture was ``U(0, 0.03) ppm`` everywhere,
        as strong in white matter as the grey/white contrast; it hid the
        structure any inversion can recover (TV-ADMM left 34.3 % NRMSE on six
        held-out whole heads, 31.2 % with this model, 26.9 % without texture:
        ``benchmarks/training_data.py``, docs/simulation.md).
    lesions : also stamp the benchmark phantoms' bleeds and calcifications
        (:func:`~qsmprep.sim.phantoms.add_lesions`: uniform spheres of 0.4-1.2
        and -3 to -0.2 ppm, up to 8 mm radius) into the brain, after the
        random shapes. The random shapes alone left IR2QSM (TV channel)
        overshooting a large uniform bleed by 4-11 % (docs/deep-learning.md).

    Returns
    -------
    dict of numpy arrays (float32 unless said):
        ``chi`` (ppm, 0 outside the mask), ``mask`` (float32 0/1),
        ``local_field`` (ppm, field of chi inside the mask, noise-free),
        ``total_field`` (ppm, local + background + polynomial + noise, not
        masked), [``phase`` (rad), ``magnitude``], ``b0_dir`` (3,),
        ``voxel_size_mm`` (3,), ``index`` (int64).
    """
    rng = np.random.default_rng([seed, index])
    labels0, brain0, base_vox, _ = _challenge_arrays()
    if voxel_size_range_mm is not None:
        vox = tuple(rng.uniform(*voxel_size_range_mm, size=3))
    else:
        vox = tuple(float(v) for v in np.broadcast_to(voxel_size_mm, (3,)))
    if patch_size is None:
        patch = tuple(int(round(n * b / v)) for n, b, v in zip(labels0.shape, base_vox, vox))
        region, centre = patch, (np.asarray(labels0.shape) - 1) / 2
    else:
        patch = tuple(int(p) for p in np.broadcast_to(patch_size, (3,)))
        region = tuple(p + 2 * margin for p in patch)
        inside = np.flatnonzero(brain0)
        centre = np.array(np.unravel_index(inside[rng.integers(len(inside))], brain0.shape))
    b0 = tilted_b0(np.degrees(np.arccos(rng.uniform(np.cos(np.radians(max_b0_angle_deg)), 1))),
                   rng.uniform(0, 360))

    # anatomy: deformed labels and brain mask of the region
    coords = _deformation(region, vox, rng, max_rotation_deg, scale_range, elastic_mm)
    coords = coords / np.asarray(base_vox)[:, None, None, None] + centre[:, None, None, None]
    labels = ndimage.map_coordinates(labels0, coords, order=0, mode="constant", cval=AIR)
    mask = ndimage.map_coordinates(brain0.view(np.uint8), coords, order=0) > 0

    # content: tissue values, texture, random shapes
    ref = chi_reference()
    table = {lab: ref[lab] * (1 + 0.3 * rng.standard_normal()) + 0.02 * rng.standard_normal()
             for lab in (*PARENCHYMA, CSF, 11)}
    table.update({AIR: ref[AIR] * rng.uniform(0.9, 1.1), BONE: ref[BONE] * rng.uniform(0.7, 1.3),
                  MUSCLE: 0.02 * rng.standard_normal(), 16: rng.uniform(-3.0, -0.2)})
    chi = _lookup(table, labels)
    chi = add_texture(chi, mask, vox, rng, floor_ppm=rng.uniform(*texture_floor_ppm),
                      relative=rng.uniform(*texture_relative),
                      fwhm_mm=rng.uniform(*texture_fwhm_mm))
    for _ in range(rng.integers(0, 16)):
        blob = _random_shape(region, vox, rng, (1.0, 10.0))
        strong = rng.random() < 0.15
        value = rng.uniform(-2.0, 1.5) if strong else rng.uniform(-0.2, 0.4)
        chi[blob & mask] = value
    if lesions:
        add_lesions(chi, labels, mask & np.isin(labels, PARENCHYMA), mask, vox, rng)
    clear = ndimage.distance_transform_edt(~mask, sampling=vox) > background_clearance_mm
    for _ in range(rng.integers(0, 8)):  # background sources outside the brain
        blob = _random_shape(region, vox, rng, (3.0, 25.0))
        chi[blob & clear] = rng.uniform(-10.0, 10.0)

    # fields: local from chi in the mask (and the patch), background from the rest
    if local_sources not in ("patch", "region"):
        raise ValueError(f"local_sources must be 'patch' or 'region', got {local_sources!r}")
    crop = None if patch_size is None else tuple(slice(margin, margin + p) for p in patch)
    local_mask = mask
    if crop is not None and local_sources == "patch":
        local_mask = np.zeros_like(mask)
        local_mask[crop] = mask[crop]
    border = np.concatenate([f.ravel() for f in (chi[0], chi[-1], chi[:, 0], chi[:, -1],
                                                  chi[:, :, 0], chi[:, :, -1])])
    ambient = float(np.median(border))
    local, background = _fields(np.where(local_mask, chi, 0),
                                _smooth_background(chi, mask, local_mask, ambient, vox,
                                                   background_sigma_mm),
                                vox, b0, pad_factor, ambient)
    background += random_harmonic_field(region, vox, rng,
                                          amplitude_ppm=rng.uniform(*background_poly_ppm))
    if crop is not None:
        chi, mask, labels, local, background = (a[crop] for a in (chi, mask, labels, local,
                                                                   background))
    total = local + background
    total += rng.uniform(*noise_ppm) * rng.standard_normal(total.shape, dtype=np.float32)
    out = {
        "chi": np.where(mask, chi, 0).astype(np.float32), "mask": mask.astype(np.float32),
        "local_field": local, "total_field": total.astype(np.float32),
        "b0_dir": b0.astype(np.float32), "voxel_size_mm": np.asarray(vox, np.float32),
        "index": np.int64(index),
    }
    if echo_times_s is not None:
        # M0 with the partial volume of the background's chi, as in simulate_acquisition
        m0 = smooth_outside(_lookup(_M0, labels), mask, vox, background_sigma_mm)
        r2s = _lookup(_R2STAR_3T, labels) * (field_strength_t / 3)
        offset = smooth_phase_offset(total.shape, vox, rng)
        signal = multi_echo_signal(local + background, m0, r2s, echo_times_s, field_strength_t,
                                   phase_offset_rad=offset, snr=rng.uniform(*snr),
                                   mask=mask if mask.any() else None, rng=rng)
        out["magnitude"], out["phase"] = magnitude_phase(signal)
    return out


class HybridDataset(torch.utils.data.IterableDataset):
    """Infinite (or ``length``-long) stream of :func:`hybrid_sample` dicts.

    Sample ``i`` of the stream is ``hybrid_sample(start + i, seed=seed, **kwargs)``;
    with several DataLoader workers, worker ``w`` of ``W`` makes the samples
    ``i = w, w + W, ...``, so the set of samples does not depend on the number
    of workers (their order within a batch may). Use ``start`` to resume or to
    hold out a validation stream (e.g. ``start=10**9``).
    Per-worker cost: the 1 mm head (7 M voxels) is loaded once per process.
    """

    def __init__(self, seed=0, length=None, start=0, **kwargs):
        super().__init__()
        self.seed, self.length, self.start, self.kwargs = seed, length, start, kwargs

    def sample(self, index):
        """The sample at stream position ``index``."""
        return hybrid_sample(self.start + index, seed=self.seed, **self.kwargs)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        i = worker
        while self.length is None or i < self.length:
            yield self.sample(i)
            i += workers
