"""The dipole forward operator in torch, for data-consistency terms.

``A x = crop(F^-1{D . F{pad(x)}})``, with ``D`` the k-space unit dipole kernel
of :func:`qsmprep.qsm.kernels.dipole_kernel` (true voxel size and B0
direction) over a zero-padded fast-FFT grid. ``D`` is real and even, and the
crop is the adjoint of the zero-padding, so ``A`` is self-adjoint: the
gradient of ``1/2 ||M(Ax - f)||^2`` is ``A(M(Ax - f))``.

Reference: Salomir R et al. Concepts Magn Reson B 2003;19B:26-34.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..qsm.fft import fast_shape
from ..qsm.kernels import dipole_kernel, half_spectrum, smv_kernel, tkd_inverse


class DipoleOperator:
    """Dipole convolution of ``[B, C, X, Y, Z]`` tensors (ppm -> ppm), and the
    other k-space filters of the same padded grid (SMV, Tikhonov and TKD
    inverses).

    Parameters
    ----------
    shape : tuple of 3 ints
        Spatial shape of the volumes it applies to.
    voxel_size_mm : array-like, ``(3,)`` or ``(B, 3)``
        Voxel size (mm), one per batch item or shared.
    b0_dirs : array-like, ``(3,)`` or ``(B, 3)``
        B0 direction in voxel axes, one per batch item or shared.
    pad_factor : float
        The FFT grid is at least ``pad_factor`` times ``shape`` (fast sizes).
    device : torch.device
    """

    def __init__(self, shape, voxel_size_mm, b0_dirs=(0.0, 0.0, 1.0), *,
                 pad_factor=1.5, device="cpu"):
        self.shape = tuple(int(n) for n in shape)
        self.padded = fast_shape(self.shape, factor=pad_factor)
        dirs = np.atleast_2d(np.asarray(b0_dirs, dtype=np.float64))
        voxels = np.atleast_2d(np.asarray(voxel_size_mm, dtype=np.float64))
        dirs, voxels = np.broadcast_arrays(dirs, voxels)
        self._full = [dipole_kernel(self.padded, v, b) for b, v in zip(dirs, voxels)]
        self._voxels, self._smv = voxels, {}
        self.device = device
        self.kernel = self._spectrum(lambda d: d)
        self.before = [(p - n) // 2 for n, p in zip(self.shape, self.padded)]

    def _forward(self, x):
        """``rfftn`` of ``x`` zero-padded to the FFT grid."""
        if tuple(x.shape[-3:]) != self.shape:
            raise ValueError(f"DipoleOperator built for {self.shape}, got {tuple(x.shape[-3:])}")
        widths = []
        for b, n, p in reversed(list(zip(self.before, self.shape, self.padded))):
            widths += [b, p - n - b]
        return torch.fft.rfftn(F.pad(x, widths), dim=(-3, -2, -1))

    def _inverse(self, spectrum):
        """``irfftn`` of a padded-grid spectrum, cropped back to ``shape``."""
        y = torch.fft.irfftn(spectrum, s=self.padded, dim=(-3, -2, -1))
        (bx, by, bz), (nx, ny, nz) = self.before, self.shape
        return y[..., bx:bx + nx, by:by + ny, bz:bz + nz]

    def _filter(self, x, spectrum):
        return self._inverse(self._forward(x) * spectrum)

    def _spectrum(self, fn):
        """Half spectra ``[B, 1, X, Y, Z//2+1]`` of the filter ``fn(D)``
        (:func:`qsmprep.qsm.kernels.half_spectrum`, the one helper of every
        half-spectrum path: symmetrised, so the real part of the full product
        for an oblique B0 on even grids too)."""
        half = [half_spectrum(fn(d).astype(np.float32)) for d in self._full]
        return torch.from_numpy(np.stack(half)[:, None]).to(self.device)

    @property
    def voxel_size_mm(self):
        """Voxel sizes (mm), ``(B, 3)``."""
        return self._voxels

    def __call__(self, x):
        return self._filter(x, self.kernel)

    def _smv_spectrum(self, radius_mm):
        if radius_mm not in self._smv:
            half = [half_spectrum(smv_kernel(self.padded, v, radius_mm)) for v in self._voxels]
            self._smv[radius_mm] = torch.from_numpy(np.stack(half)[:, None]).to(self.device)
        return self._smv[radius_mm]

    def smv(self, x, radius_mm):
        """Spherical mean value of ``x`` over balls of ``radius_mm`` (the
        :func:`qsmprep.qsm.kernels.smv_kernel` of each item's voxel size)."""
        return self._filter(x, self._smv_spectrum(radius_mm))

    def vsharp(self, field, mask, radii_mm, threshold=0.05):
        """V-SHARP background removal on this grid (Wu et al. 2012; Schweser
        et al. 2011), as :func:`qsmprep.qsm.bgremove.vsharp`: for radii from
        large to small each voxel takes the high-pass ``f - S_r f`` of the
        largest ``r`` whose ball lies in ``mask``; the result is deconvolved
        by ``1 - S_rmax``, truncated where ``|1 - S| < threshold``.

        ``field`` (ppm) and ``mask`` are ``[B, 1, X, Y, Z]``; ``radii_mm`` in
        descending order. Returns ``(local_ppm, covered)``, both zero outside
        the mask eroded by the smallest radius (``covered``, 0/1).
        """
        with torch.no_grad():
            field_k, mask_k = self._forward(field * mask), self._forward(mask)
            high_pass = torch.zeros_like(field)
            covered = torch.zeros_like(mask)
            for radius in radii_mm:
                smv = self._smv_spectrum(float(radius))
                inside = (self._inverse(mask_k * smv) > 0.999).to(mask.dtype) * mask * (1 - covered)
                high_pass = high_pass + inside * self._inverse(field_k * (1 - smv))
                covered = covered + inside
            deconv = 1 - self._smv_spectrum(float(radii_mm[0]))
            inverse = torch.where(deconv.abs() >= threshold, 1 / deconv, torch.zeros_like(deconv))
            return self._filter(high_pass, inverse) * covered, covered

    def tikhonov(self, field, eps):
        """Closed-form Tikhonov inverse ``F^-1{D F f / (D^2 + eps)}`` (ppm)."""
        return self._filter(field, self._spectrum(lambda d: d / (d**2 + eps)))

    def tv(self, field, mask, lam=2e-4, rho=None, max_iter=40, tol=3e-3):
        """Total-variation dipole inversion by ADMM (Bilgic et al. 2014) of
        each volume of ``field`` (ppm, ``[B, 1, X, Y, Z]``) on this grid, as
        :func:`qsmprep.qsm.inversion.tv_admm` with the same options; no
        gradient; zero outside ``mask``."""
        from ..qsm.inversion import _admm_tv

        rho = 100.0 * lam if rho is None else float(rho)
        with torch.no_grad():
            field_k = self._forward(field.float() * mask)
            items = []
            for b in range(field.shape[0]):
                d = self.kernel[min(b, self.kernel.shape[0] - 1), 0]
                items.append(_admm_tv(d**2, d * field_k[b, 0], self.padded, lam, rho,
                                      max_iter, tol))
            (bx, by, bz), (nx, ny, nz) = self.before, self.shape
            x = torch.stack(items)[:, None, bx:bx + nx, by:by + ny, bz:bz + nz]
            return x * mask

    def tkd(self, field, threshold=0.15):
        """Thresholded k-space division ``F^-1{F f / D}`` with ``1/D`` replaced by
        ``sign(D)/threshold`` where ``|D| < threshold`` (``D(0) = 0`` gives 0),
        the filter of :func:`qsmprep.qsm.inversion.tkd` on this padded grid."""
        return self._filter(field, self._spectrum(lambda d: tkd_inverse(d, threshold)))

    adjoint = __call__

    def data_gradient(self, x, field, mask):
        """``A^T(M(Ax - f))``: gradient of ``1/2 ||M(Ax - f)||^2`` in x."""
        return self.adjoint(mask * (self(x) - field))
