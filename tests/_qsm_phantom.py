"""Small analytic phantoms shared by the classical-method tests."""

import numpy as np

from qsmprep.qsm.kernels import dipole_convolve, sphere_field

N = 64
VOX = (1.0, 1.0, 1.0)


def ellipsoid(center, radii, n=N):
    """Boolean ellipsoid, centre relative to the grid centre (voxels)."""
    g = np.indices((n, n, n), dtype=np.float32) - (n - 1) / 2.0
    return sum(((g[i] - center[i]) / radii[i]) ** 2 for i in range(3)) <= 1.0


def brain_phantom():
    """(chi_ppm, brain_mask): piecewise-constant ellipsoids of known chi in an ellipsoidal brain."""
    brain = ellipsoid((0, 0, 0), (24, 20, 18))
    chi = np.zeros(brain.shape, dtype=np.float32)
    for center, radii, value in [
        ((-8, 0, 0), (5, 5, 5), 0.10),
        ((8, 5, 3), (4, 6, 3), -0.05),
        ((0, -10, -5), (3, 3, 8), 0.20),
        ((5, -5, 8), (2, 2, 2), 0.30),
        ((15, -3, -5), (3, 3, 3), 0.15),
    ]:
        chi[ellipsoid(center, radii)] = value
    return chi, brain


def local_field(chi, b0_dir=(0.0, 0.0, 1.0)):
    """Field (ppm) of ``chi`` everywhere on the grid."""
    return dipole_convolve(chi, VOX, b0_dir)


def background_field(b0_dir=(0.0, 0.0, 1.0)):
    """Exactly harmonic background (ppm): analytic fields of strong spheres outside the brain."""
    centers = [(0, 32, 0), (63, 40, 30), (30, 10, 63)]
    return sum(sphere_field((N, N, N), VOX, 4.0, -9.0, b0_dir, center=c)[0] for c in centers)


def csf_head(ventricle_r2star_hz):
    """A brain ellipsoid with central ventricles and superficial sulcal CSF,
    two echoes (4 and 24 ms): tissue decays with R2* 20/s, the ventricles
    with ``ventricle_r2star_hz`` but start brighter, the sulci like CSF."""
    brain = ellipsoid((0, 0, 0), (24, 20, 18))
    ventricles = ellipsoid((0, 3, 0), (8, 3, 4)) | ellipsoid((0, -3, 0), (8, 2, 4))
    sulci = brain & ~ellipsoid((0, 0, 0), (22, 18, 16))  # bright but superficial CSF
    rng = np.random.default_rng(0)
    te = np.array([0.004, 0.024])
    m0 = 0.8 * brain + 0.2 * (ventricles | sulci)
    r2 = np.where(ventricles, ventricle_r2star_hz, np.where(sulci, 3.0, 20.0))
    magnitude = m0[..., None] * np.exp(-r2[..., None] * te) + rng.normal(0, 0.005, (*brain.shape, 2))
    return brain, ventricles, magnitude.astype(np.float32), te
