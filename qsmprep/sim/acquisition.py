"""A simulated multi-echo GRE acquisition of a phantom, with its ground truth.

Chains :mod:`~qsmprep.sim.forward` and :mod:`~qsmprep.sim.signal`: total
field of the head in air, a second-order shim over the brain, a smooth
phase offset, R2* decay and complex noise. An oblique B0 direction is
simulated exactly in k-space and recorded in the affine (the head is tilted
in the scanner, the voxel grid stays aligned with the head), so that
:func:`qsmprep.qsm.units.b0_dir_from_affine` of the affine gives back
the B0 direction used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from .forward import local_field, shim, smooth_outside, total_field
from .phantoms import as_rng
from .signal import magnitude_phase, multi_echo_signal, smooth_phase_offset


@dataclass(frozen=True)
class Acquisition:
    """Simulated data and ground truth on one grid (arrays (X, Y, Z[, echo])).

    magnitude, phase (rad, wrapped) : float32 (X, Y, Z, echo).
    echo_times_s : tuple; field_strength_t : float (T).
    b0_dir : unit vector in voxel axes; affine : (4, 4) RAS+ with
        ``b0_dir_from_affine(affine) == b0_dir``; voxel_size_mm.
    chi_ppm, brain_mask, labels : the phantom's ground truth.
    total_field_ppm : the field the phase encodes (after shimming).
    local_field_ppm : field of chi inside the brain mask only.
    phase_offset_rad : phase at TE = 0.
    """

    magnitude: np.ndarray
    phase: np.ndarray
    echo_times_s: tuple
    field_strength_t: float
    b0_dir: np.ndarray
    affine: np.ndarray
    voxel_size_mm: tuple
    chi_ppm: np.ndarray
    brain_mask: np.ndarray
    labels: np.ndarray
    total_field_ppm: np.ndarray
    local_field_ppm: np.ndarray
    phase_offset_rad: np.ndarray


def tilted_b0(angle_deg, azimuth_deg=90.0):
    """Unit B0 direction tilted by ``angle_deg`` from the third voxel axis,
    towards the in-plane direction at ``azimuth_deg`` from the first axis
    (default 90: towards the second axis, i.e. a head pitch)."""
    t, a = np.radians(angle_deg), np.radians(azimuth_deg)
    return np.array([np.sin(t) * np.cos(a), np.sin(t) * np.sin(a), np.cos(t)])


def oblique_affine(affine, b0_dir):
    """Rotate ``affine`` in world space so that B0 (world z) has direction
    ``b0_dir`` in its voxel axes (see ``b0_dir_from_affine``)."""
    b = np.asarray(b0_dir, float) / np.linalg.norm(b0_dir)
    rot = np.asarray(affine, float)[:3, :3]
    head_dir = (rot / np.linalg.norm(rot, axis=0)) @ b
    turn, _ = Rotation.align_vectors([[0.0, 0.0, 1.0]], [head_dir])
    out = np.eye(4)
    out[:3, :3] = turn.as_matrix()
    out = out @ affine
    return out


def simulate_acquisition(phantom, echo_times_s, field_strength_t=3.0, *, b0_dir=(0.0, 0.0, 1.0),
                         snr=100.0, shim_order=2, background_sigma_mm=1.0, rng=None):
    """Simulate a multi-echo GRE acquisition of ``phantom``.

    Parameters
    ----------
    phantom : :class:`~qsmprep.sim.phantoms.Phantom`
    echo_times_s : sequence of echo times (s).
    field_strength_t : float, B0 (T); R2* is scaled from 3 T linearly.
    b0_dir : B0 direction in the phantom's voxel axes.
    snr : mean first-echo magnitude in the brain over the noise std.
    shim_order : degree of the polynomial removed from the total field over
        the brain (a scanner shim); None keeps the raw field.
    background_sigma_mm : partial volume (mm) of the voxels outside the brain
        (:func:`~qsmprep.sim.forward.smooth_outside`), applied to chi before
        its field is computed, so that the background field is harmonic in
        the brain, and to M0, so that the signal agrees with that chi (a voxel
        that holds part air has part of the signal); 0 keeps both voxelised.
    rng : int, Generator or None (phase offset and noise).
    """
    rng = as_rng(rng)
    vox, mask = phantom.voxel_size_mm, phantom.brain_mask
    field = total_field(phantom.chi_ppm, vox, b0_dir, chi_ambient_ppm=phantom.chi_ambient_ppm,
                        brain_mask=mask, background_sigma_mm=background_sigma_mm)
    if shim_order is not None:
        field = shim(field, mask, vox, shim_order)
    offset = smooth_phase_offset(field.shape, vox, rng)
    m0 = smooth_outside(phantom.m0, mask, vox, background_sigma_mm)
    signal = multi_echo_signal(field, m0, phantom.r2star_hz * (field_strength_t / 3.0),
                               echo_times_s, field_strength_t, phase_offset_rad=offset,
                               snr=snr, mask=mask, rng=rng)
    magnitude, phase = magnitude_phase(signal)
    b = np.asarray(b0_dir, float) / np.linalg.norm(b0_dir)
    return Acquisition(
        magnitude=magnitude, phase=phase,
        echo_times_s=tuple(float(t) for t in echo_times_s),
        field_strength_t=float(field_strength_t), b0_dir=b,
        affine=oblique_affine(phantom.affine, b), voxel_size_mm=tuple(vox),
        chi_ppm=phantom.chi_ppm, brain_mask=mask, labels=phantom.labels,
        total_field_ppm=field,
        local_field_ppm=local_field(phantom.chi_ppm, mask, vox, b0_dir),
        phase_offset_rad=offset,
    )
