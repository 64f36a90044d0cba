"""Heads deformed by a known smooth field: test subjects for registration.

A subject is the packaged Challenge 2.0 head (:mod:`qsmprep.sim.phantoms`)
seen through a known spatial transform: a global affine (rotation, scaling,
translation) composed with a smooth random displacement, sampled on a grid
of any voxel size. Its labels are known exactly (nearest neighbour of the
deformed 1 mm label map), so a registration can be scored by the Dice
overlap of the atlas labels it brings back onto the subject grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .phantoms import _M0, _R2STAR_3T, _challenge_arrays, as_rng, chi_reference


@dataclass(frozen=True)
class DeformedHead:
    """A deformed head on its own grid (RAS+ ``affine``, mm)."""

    labels: np.ndarray  # uint8, Challenge labels (1..7 deep grey matter)
    magnitude: np.ndarray  # float32, mean-echo-like GRE magnitude (a.u.)
    chi_ppm: np.ndarray  # float32, piecewise constant reference chi
    brain: np.ndarray  # bool
    affine: np.ndarray


def random_transform(rng, *, rotation_deg=6.0, scale=0.06, shift_mm=6.0,
                     warp_mm=3.0, warp_fwhm_mm=30.0):
    """Parameters of a random subject transform: uniform rotations up to
    ``rotation_deg`` about each axis, scalings within ``1 ± scale``, shifts
    up to ``shift_mm`` and a smooth displacement of about ``warp_mm`` (peak)."""
    rng = as_rng(rng)
    angles = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3))
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    linear = rot @ np.diag(rng.uniform(1 - scale, 1 + scale, 3))
    return {"linear": linear, "shift_mm": rng.uniform(-shift_mm, shift_mm, 3),
            "warp_mm": warp_mm, "warp_fwhm_mm": warp_fwhm_mm,
            "warp_seed": int(rng.integers(2**31))}


#: a T1-weighted contrast per label (MPRAGE-like: white matter bright, CSF dark)
T1W_CONTRAST = {1: 0.65, 2: 0.75, 3: 0.65, 4: 0.7, 5: 0.7, 6: 0.7, 7: 0.7, 8: 1.0, 9: 0.55,
                10: 0.12, 11: 0.3, 12: 1.0, 13: 0.05, 14: 0.0, 15: 0.45, 16: 0.05}
#: no deformation (the head as shipped, on a grid of any voxel size)
IDENTITY = {"linear": np.eye(3), "shift_mm": np.zeros(3), "warp_mm": 0.0, "warp_fwhm_mm": 30.0,
            "warp_seed": 0}


def deformed_head(voxel_size_mm=2.0, transform=None, *, rng=None, echo_times_s=(0.004, 0.012),
                  gain=1.0, bias=0.15, noise=0.01, contrast=None):
    """Sample the Challenge head through ``transform`` (:func:`random_transform`).

    Subject point ``x`` (mm) shows the head at ``T(x) = L x + t + u(L x + t)``:
    ``L`` the linear part, ``t`` the shift, ``u`` a smooth displacement (mm).
    The magnitude has its own contrast (mean over ``echo_times_s`` of
    ``M0 exp(-R2* TE)``, times ``gain``), a smooth multiplicative ``bias``
    field and Gaussian noise (``noise`` × the maximum), unlike the template.
    ``contrast`` (label -> intensity, e.g. :data:`T1W_CONTRAST`) replaces the GRE one.
    """
    rng = as_rng(rng)
    transform = transform or random_transform(rng)
    labels1, brain1, _, affine1 = _challenge_arrays()
    labels1 = np.asarray(labels1)
    vox1 = np.sqrt((affine1[:3, :3] ** 2).sum(0))
    fov = np.array(labels1.shape) * vox1
    shape = tuple(int(round(f / voxel_size_mm)) for f in fov)
    centre1 = affine1[:3, :3] @ ((np.array(labels1.shape) - 1) / 2) + affine1[:3, 3]
    affine = np.diag([voxel_size_mm] * 3 + [1.0])
    affine[:3, 3] = centre1 - voxel_size_mm * (np.array(shape) - 1) / 2

    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = ijk.reshape(-1, 3) @ affine[:3, :3].T + affine[:3, 3]
    # linear part about the head's centre, then the smooth displacement
    moved = (world - centre1) @ transform["linear"].T + centre1 + transform["shift_mm"]
    wrng = np.random.default_rng(transform["warp_seed"])
    coarse = 8.0  # mm, grid of the displacement field
    cshape = tuple(int(np.ceil(f / coarse)) + 3 for f in fov)
    sigma = transform["warp_fwhm_mm"] / 2.355 / coarse
    disp = np.stack([ndimage.gaussian_filter(wrng.standard_normal(cshape), sigma)
                     for _ in range(3)])
    disp *= transform["warp_mm"] / max(np.abs(disp).max(), 1e-12)
    origin = affine1[:3, 3] - coarse
    cidx = ((moved - origin) / coarse).T
    moved = moved + np.stack([ndimage.map_coordinates(d, cidx, order=3, mode="nearest")
                              for d in disp], -1)
    src = np.linalg.solve(affine1[:3, :3], (moved - affine1[:3, 3]).T)

    labels = ndimage.map_coordinates(labels1, src, order=0, mode="constant", cval=14)
    labels = labels.reshape(shape).astype(np.uint8)
    brain = ndimage.map_coordinates(np.asarray(brain1, np.float32), src, order=1,
                                    cval=0).reshape(shape) >= 0.5
    te = np.asarray(echo_times_s)
    tissue = np.array([_M0.get(k, 0) * np.exp(-_R2STAR_3T.get(k, 0) * te).mean()
                       if contrast is None else contrast.get(k, 0.0)
                       for k in range(256)], np.float32)
    # partial volumes: the magnitude of the 1 mm head, linearly interpolated
    mag1 = tissue[labels1]
    mag = ndimage.map_coordinates(mag1, src, order=1, cval=0).reshape(shape)
    xyz = ijk / np.array(shape)
    field = 1 + bias * np.sin(np.pi * xyz[..., 0]) * np.cos(np.pi * xyz[..., 2] / 2)
    mag = gain * mag * field
    mag = mag + noise * mag.max() * rng.standard_normal(shape)
    ref = chi_reference()
    chi = np.array([ref.get(k, 0.0) for k in range(256)], np.float32)[labels]
    chi[~brain] = 0
    return DeformedHead(labels, np.abs(mag).astype(np.float32), chi, brain, affine)
