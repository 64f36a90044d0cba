"""Dipole and spherical-mean-value kernels and the forward field model.

References
----------
Salomir R et al. A fast calculation method for magnetic field inhomogeneity
due to an arbitrary distribution of bulk susceptibility. Concepts Magn Reson B
2003;19B:26-34. Marques JP, Bowtell R. Application of a Fourier-based method
for rapid calculation of field inhomogeneity due to spatial variation of
magnetic susceptibility. Concepts Magn Reson B 2005;25B:65-78.
"""

from __future__ import annotations

import numpy as np

from .fft import fast_shape, fftn, ifftn, pad


def kspace_grid(shape, voxel_size_mm):
    """Spatial frequencies (cycles/mm) on a grid, ``fftfreq`` order, float32."""
    axes = [
        np.fft.fftfreq(n, d=float(v)).astype(np.float32)
        for n, v in zip(shape, voxel_size_mm)
    ]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def dipole_kernel(shape, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), *, half=False):
    """Unit dipole kernel in k-space, ``D(k) = 1/3 - (k.b)^2 / |k|^2``.

    Parameters
    ----------
    shape : tuple of 3 ints
        Grid shape (usually padded).
    voxel_size_mm : tuple of 3 floats
        Voxel size along each array axis.
    b0_dir : tuple of 3 floats
        B0 direction in voxel axes (normalised here).
    half : bool
        Return only the ``rfftn`` half of the kernel's even part (last axis
        ``N // 2 + 1``), the values of ``half_spectrum(dipole_kernel(...))``,
        computed on that half alone: half the time and a fraction of the
        memory, which matters on the phase-sign check's doubled grid.

    Returns
    -------
    ndarray, float32, ``shape`` (or its half); ``D(0) = 0``.

    Notes
    -----
    On an even-sized axis the Nyquist plane holds only ``-N/2``, so for an
    oblique ``b`` the kernel is not Hermitian-even there. Take the real part
    of the inverse FFT (as :func:`dipole_convolve` does), or use the even part
    ``(D(k) + D(-k)) / 2`` when packing two real maps into one complex FFT.
    """
    b = np.asarray(b0_dir, dtype=np.float64)
    b = b / np.linalg.norm(b)
    k = list(kspace_grid(shape, voxel_size_mm))
    if not half:
        return _dipole_values(k, b)
    k[2] = k[2][..., : shape[2] // 2 + 1]
    d = _dipole_values(k, b)
    # The even part (even_part) differs from D only where a component of k sits on
    # the Nyquist bin of an even axis, its own mirror: there it is the mean of D(k)
    # and D of k with those components negated (D is even in k otherwise).
    flipped = [a.copy() for a in k]
    for axis, n in enumerate(shape):
        if n % 2 == 0:
            flipped[axis].reshape(-1)[n // 2] *= -1
    for axis, n in enumerate(shape):
        if n % 2 == 0:
            plane = tuple(slice(n // 2, n // 2 + 1) if a == axis else slice(None)
                          for a in range(3))
            on = [g[plane] if g.shape[axis] > 1 else g for g in k]
            on_flipped = [g[plane] if g.shape[axis] > 1 else g for g in flipped]
            d[plane] = 0.5 * (_dipole_values(on, b) + _dipole_values(on_flipped, b))
    return d


def _dipole_values(k, b, rows=16):
    """``1/3 - (k.b)^2 / |k|^2`` (float32; 0 where ``k = 0``) on the sparse grid
    ``k`` (three broadcastable float32 axes), ``rows`` of the first axis at a time.
    k.b is taken in float64 (on the magic-angle cone of an axis-aligned B0, D is
    then a tiny non-zero number whose sign TKD-type filters use)."""
    kx, ky, kz = k
    shape = np.broadcast_shapes(kx.shape, ky.shape, kz.shape)
    d = np.empty(shape, np.float32)
    for start in range(0, shape[0], rows):
        x = kx[start:start + rows] if kx.shape[0] > 1 else kx
        y = ky[start:start + rows] if ky.shape[0] > 1 else ky
        z = kz[start:start + rows] if kz.shape[0] > 1 else kz
        kb = x * b[0] + y * b[1] + z * b[2]
        k2 = x**2 + y**2 + z**2
        zero = k2 == 0
        k2 = np.where(zero, np.float32(1.0), k2)   # D(0) is set below
        v = np.square(kb, out=kb)
        v /= k2
        np.subtract(1.0 / 3.0, v, out=v)
        v = np.where(zero, 0.0, v)
        d[start:start + rows] = v
    return d


def gradient_norm2(shape):
    """``sum_j |exp(2 pi i k_j / N_j) - 1|^2 = sum_j 4 sin^2(pi k_j / N_j)`` on the
    FFT grid of ``shape``: the symbol of ``grad^T grad`` (= -Laplacian) for
    periodic forward differences (float64, full spectrum)."""
    terms = [4 * np.sin(np.pi * np.fft.fftfreq(n)) ** 2 for n in shape]
    return terms[0][:, None, None] + terms[1][None, :, None] + terms[2][None, None, :]


def even_part(kspace):
    """``(H(k) + H(-k)) / 2`` of a real k-space array ``H`` on an FFT grid.

    ``-k`` of bin ``i`` is bin ``(-i) mod N`` on every axis. A real, even
    filter in k (the dipole kernel, an SMV kernel) is unchanged, except on
    the Nyquist planes of even-sized axes, where an oblique dipole kernel is
    not even (see :func:`dipole_kernel`). The real part of ``F^-1{H F{x}}``
    for real ``x`` equals ``F^-1{even_part(H) F{x}}``.
    """
    kspace = np.asarray(kspace)
    if not np.issubdtype(kspace.dtype, np.floating):
        kspace = kspace.astype(np.float32)  # an indicator (bool): True + True is not 2
    axes = tuple(range(kspace.ndim))
    mirrored = np.roll(np.flip(kspace, axis=axes), 1, axis=axes)
    return 0.5 * (kspace + mirrored)


def half_spectrum(kspace):
    """The ``rfftn`` half (last axis ``N // 2 + 1``) of a real k-space filter,
    symmetrised (:func:`even_part`) so that ``irfftn(half * rfftn(x))`` is
    exactly the real part of the full complex product ``F^-1{H F{x}}``, the
    field of :func:`dipole_convolve`, for an oblique B0 on even grids too.

    The one helper of every half-spectrum k-space filter in qsmprep (the
    torch solvers of :mod:`qsmprep.qsm.torch_ops` and
    :mod:`qsmprep.qsm.inversion`, and :class:`qsmprep.dl.dipole.DipoleOperator`);
    the dipole kernel's own half is computed directly by
    ``dipole_kernel(..., half=True)``, with the same values.
    """
    return even_part(kspace)[..., : np.shape(kspace)[-1] // 2 + 1]


def tkd_inverse(d, threshold):
    """The thresholded inverse of a dipole kernel ``d`` (TKD; Shmueli 2009,
    Wharton 2010): ``1/D`` where ``|D| >= threshold``, ``sign(D)/threshold``
    elsewhere (``D = 0``, the k-space origin, gives 0)."""
    with np.errstate(divide="ignore"):
        return np.where(np.abs(d) >= threshold, 1.0 / d, np.sign(d) / threshold)


def sphere_kernel(shape, voxel_size_mm, radius_mm):
    """Normalised spherical mean value (SMV) kernel in image space.

    A ball of ``radius_mm`` (voxels whose centre lies within the radius)
    centred on index 0 with wrap-around, summing to 1.
    """
    grids = []
    for n, v in zip(shape, voxel_size_mm):
        idx = np.arange(n)
        idx = np.where(idx > n // 2, idx - n, idx)
        grids.append(idx * float(v))
    x, y, z = np.meshgrid(*grids, indexing="ij", sparse=True)
    ball = (x**2 + y**2 + z**2) <= float(radius_mm) ** 2
    ball = ball.astype(np.float32)
    return ball / ball.sum()


def smv_kernel(shape, voxel_size_mm, radius_mm):
    """SMV kernel in k-space (real, float32): F{ball / sum(ball)}."""
    return np.real(fftn(sphere_kernel(shape, voxel_size_mm, radius_mm))).astype(np.float32)


def dipole_convolve(chi, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), *, pad_factor=2.0):
    """Field (ppm) induced by a susceptibility map (ppm): ``F^-1{D . F{chi}}``.

    The map is zero-padded to ``pad_factor`` times its size (rounded up to a
    fast FFT size) to avoid wrap-around, then cropped back.
    """
    chi = np.asarray(chi, dtype=np.float32)
    shape = fast_shape(chi.shape, factor=pad_factor)
    padded, crop = pad(chi, shape)
    d = dipole_kernel(shape, voxel_size_mm, b0_dir)
    field = np.real(ifftn(d * fftn(padded)))
    return np.ascontiguousarray(field[crop], dtype=np.float32)


def sphere_field(shape, voxel_size_mm, radius_mm, chi_ppm, b0_dir=(0.0, 0.0, 1.0),
                 center=None):
    """Analytic field (ppm) of a uniformly magnetised sphere (Lorentz-corrected).

    Inside: 0. Outside: ``chi * a^3 / r^3 * (3 cos^2 theta - 1) / 3`` with
    theta the angle between r and B0. Returns (field_ppm, sphere_mask).
    """
    b = np.asarray(b0_dir, dtype=np.float64)
    b = b / np.linalg.norm(b)
    if center is None:
        center = [(n - 1) / 2.0 for n in shape]
    grids = [(np.arange(n) - c) * float(v) for n, c, v in zip(shape, center, voxel_size_mm)]
    x, y, z = np.meshgrid(*grids, indexing="ij")
    r2 = x**2 + y**2 + z**2
    inside = r2 <= radius_mm**2
    with np.errstate(divide="ignore", invalid="ignore"):
        cos2 = (x * b[0] + y * b[1] + z * b[2]) ** 2 / r2
        field = chi_ppm * radius_mm**3 / r2**1.5 * (3 * cos2 - 1) / 3.0
    field[inside] = 0.0
    return field.astype(np.float32), inside
