"""Forward field model: total, local and background fields from chi.

The field (ppm, relative to B0) of a susceptibility map chi (ppm) is the
dipole convolution ``f = F^-1{D(k) F{chi}}`` with
``D(k) = 1/3 - (k.b)^2/|k|^2`` for the B0 direction ``b`` in voxel axes
(Salomir 2003; Marques & Bowtell 2005), computed with 2x zero padding by
:func:`qsmprep.qsm.kernels.dipole_convolve`.

Conventions (as in the QSM Challenge 2.0, Marques et al. MRM 2021):

* **total field**: the field of the whole head, with the space around the
  field of view filled with air. Because the padding of the FFT is zero, the
  map convolved is ``chi - chi_ambient``: a constant added to chi everywhere
  produces no field, so this is the field of the head embedded in air.
* **local field**: the field of ``chi * brain_mask`` only.
* **background field**: total minus local, i.e. the field of everything
  outside the brain (air, bone, ...), harmonic inside the brain.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..qsm.kernels import dipole_convolve


def smooth_outside(image, brain_mask, voxel_size_mm, sigma_mm=1.0, *, ambient=0.0):
    """``image`` outside ``brain_mask`` smoothed by a Gaussian of standard
    deviation ``sigma_mm`` (mm), as is in the brain: the partial volume of the
    head's voxelised tissue/air/bone steps.

    Applied to chi (``ambient`` = the chi of the air around the head) before
    its field is computed, it anti-aliases the background: the FFT dipole
    field of a voxelised source is that of its band-limited
    (sinc-interpolated) version, whose Gibbs ringing reaches into the brain.
    With air at ~10 ppm against tissue the background field of a voxelised
    head is not harmonic in the brain (measured on the Challenge 2.0 head at
    1 mm with B0 tilted 20 degrees: V-SHARP of the background alone left 67 %
    of the local field's norm 6 mm inside the brain; 0.8 % with ``sigma_mm``
    = 1; on the hybrid training heads 80-130 % and 1-3 %). A real voxel
    averages a continuous field, and the field of smoothed sources is the
    smoothed field. Applied to the magnitude M0 (``ambient`` 0) it keeps the
    signal consistent with the smoothed chi: a voxel that holds part air has
    part of the signal. The Gaussian acts on ``image - ambient`` with the
    edge values continued, and mixes the brain's own values into the voxels
    around it.
    """
    image = np.asarray(image, np.float32)
    if sigma_mm <= 0:
        return image
    sigma = [sigma_mm / v for v in np.broadcast_to(voxel_size_mm, (3,))]
    smooth = ndimage.gaussian_filter(image - np.float32(ambient), sigma, mode="nearest")
    return np.where(brain_mask, image, smooth + np.float32(ambient)).astype(np.float32)


def total_field(chi_ppm, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), *, chi_ambient_ppm=0.0,
                brain_mask=None, background_sigma_mm=1.0, pad_factor=2.0):
    """Field (ppm) of a whole head whose surroundings have ``chi_ambient_ppm``.

    Parameters
    ----------
    chi_ppm : (X, Y, Z) array, susceptibility (ppm).
    voxel_size_mm : 3 floats.
    b0_dir : 3 floats, B0 direction in voxel axes (normalised here; oblique
        directions are exact, no resampling).
    chi_ambient_ppm : float, chi outside the field of view (air: 9.2 ppm
        relative to water in the Challenge model).
    brain_mask : (X, Y, Z) bool array or None. When given, the sources
        outside it are anti-aliased with ``background_sigma_mm``
        (:func:`smooth_outside`), so that the background field is
        harmonic in the brain, as a real one is; None keeps chi as voxelised.
    background_sigma_mm : float, see ``brain_mask``; 0 keeps chi as is.
    pad_factor : float, FFT zero padding factor (2: no wrap-around).
    """
    chi = np.asarray(chi_ppm, np.float32)
    if brain_mask is not None:
        chi = smooth_outside(chi, brain_mask, voxel_size_mm, background_sigma_mm,
                             ambient=chi_ambient_ppm)
    return dipole_convolve(chi - np.float32(chi_ambient_ppm), voxel_size_mm, b0_dir,
                           pad_factor=pad_factor)


def local_field(chi_ppm, brain_mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), *, pad_factor=2.0):
    """Field (ppm) of the susceptibility inside ``brain_mask`` only."""
    chi = np.where(brain_mask, np.asarray(chi_ppm, np.float32), np.float32(0))
    return dipole_convolve(chi, voxel_size_mm, b0_dir, pad_factor=pad_factor)


def solid_harmonics(shape, voxel_size_mm, order):
    """Real solid harmonics of degree 1..``order`` (at most 3) on the grid,
    (n_terms, X, Y, Z), coordinates in units of 100 mm from the grid centre.

    These homogeneous polynomials solve Laplace's equation, like the fields of
    a scanner's shim coils and of any source outside the head, so background
    removal (which keeps only the non-harmonic part) removes them exactly.
    Degree 2, for example: xy, yz, xz, x^2 - y^2, 2z^2 - x^2 - y^2.
    """
    if not 0 <= order <= 3:
        raise ValueError(f"solid harmonics are tabulated up to degree 3, got order={order}")
    axes = [((np.arange(n) - (n - 1) / 2) * v / 100.0).astype(np.float32)
            for n, v in zip(shape, voxel_size_mm)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    r2xy = x * x + y * y
    degrees = [
        [x, y, z],
        [x * y, y * z, x * z, x * x - y * y, 2 * z * z - r2xy],
        [x * (x * x - 3 * y * y), y * (3 * x * x - y * y), z * (x * x - y * y), x * y * z,
         x * (4 * z * z - r2xy), y * (4 * z * z - r2xy), z * (2 * z * z - 3 * r2xy)],
    ]
    terms = [t for d in degrees[:order] for t in d]
    if not terms:
        return np.zeros((0, *shape), np.float32)
    return np.stack([np.broadcast_to(t, shape) for t in terms]).astype(np.float32)


def shim(field_ppm, mask, voxel_size_mm, order=2):
    """Remove the least-squares combination of the mean and the solid
    harmonics up to degree ``order`` (:func:`solid_harmonics`) fitted inside
    ``mask``, as a scanner's shim coils would: returns the residual field
    (ppm) on the whole grid. The removed part is harmonic, so the local field
    of the brain is unchanged."""
    basis = solid_harmonics(field_ppm.shape, voxel_size_mm, order)
    design = np.concatenate([np.ones((1, int(mask.sum())), np.float32), basis[:, mask]])
    coef, *_ = np.linalg.lstsq(design.T.astype(np.float64), field_ppm[mask].astype(np.float64),
                               rcond=None)
    fit = coef[0] + np.tensordot(coef[1:], basis, axes=1)
    return (field_ppm - fit).astype(np.float32)


def random_harmonic_field(shape, voxel_size_mm, rng, *, order=2, amplitude_ppm=0.5):
    """Random smooth background (ppm): solid harmonics (:func:`solid_harmonics`)
    up to degree ``order`` with Gaussian coefficients whose sum of squares is ``amplitude_ppm`` squared,
    in coordinates of 100 mm (so it varies by ~``amplitude_ppm`` across a head)."""
    basis = solid_harmonics(shape, voxel_size_mm, order)
    coef = rng.standard_normal(len(basis))
    coef *= amplitude_ppm / np.linalg.norm(coef)
    return np.tensordot(coef.astype(np.float32), basis, axes=1).astype(np.float32)
