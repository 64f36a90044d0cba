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
