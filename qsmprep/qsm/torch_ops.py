"""Torch versions of the k-space operators, so iterative solvers run on CPU or CUDA.

All volumes are real float32 tensors (X, Y, Z); k-space arrays are the
half spectra of :func:`torch.fft.rfftn` (last axis ``Z // 2 + 1``). Finite
differences are periodic forward differences in voxel units, so their
k-space symbol is ``exp(2 pi i k_j / N_j) - 1``.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from .kernels import dipole_kernel, gradient_norm2, half_spectrum, smv_kernel


def as_tensor(x, device="cpu", dtype=torch.float32):
    """A contiguous tensor on ``device`` from a numpy array or a tensor on any
    device (a CUDA tensor never goes through numpy)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=torch.device(device), dtype=dtype).contiguous()
    return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype, device=torch.device(device))


def to_numpy(x):
    """A float32 numpy array from a tensor on any device."""
    return x.detach().to("cpu", torch.float32).numpy()


def rfft3(x):
    """Half-spectrum FFT over the three spatial axes."""
    return torch.fft.rfftn(x, dim=(0, 1, 2))


def irfft3(xk, shape):
    """Inverse of :func:`rfft3` for a real volume of ``shape``."""
    return torch.fft.irfftn(xk, s=tuple(shape), dim=(0, 1, 2))


def dipole_kernel_t(shape, voxel_size_mm, b0_dir, device="cpu"):
    """Dipole kernel (:func:`qsmprep.qsm.kernels.dipole_kernel`) as a half-spectrum
    tensor (``half=True``: the values of :func:`qsmprep.qsm.kernels.half_spectrum`,
    symmetrised, so that it is the real part of the full product for an oblique B0
    on even grids too, issue 24)."""
    return as_tensor(dipole_kernel(shape, voxel_size_mm, b0_dir, half=True), device)


def smv_kernel_t(shape, voxel_size_mm, radius_mm, device="cpu"):
    """SMV kernel (:func:`qsmprep.qsm.kernels.smv_kernel`) as a half-spectrum tensor."""
    return as_tensor(half_spectrum(smv_kernel(shape, voxel_size_mm, radius_mm)), device)


def grad_norm2_t(shape, device="cpu"):
    """:func:`qsmprep.qsm.kernels.gradient_norm2` as a half-spectrum tensor."""
    return as_tensor(half_spectrum(gradient_norm2(shape)), device)


def _sl(d, start, stop):
    """Index selecting ``start:stop`` along axis ``d`` of a 3-D tensor."""
    idx = [slice(None)] * 3
    idx[d] = slice(start, stop)
    return tuple(idx)


def add_rolled(out, x, shift, d, scale=1.0):
    """``out += scale * torch.roll(x, shift, dims=d)`` for ``shift`` = +1 or -1,
    with slices instead of ``torch.roll`` (several times faster on CPU)."""
    if shift == 1:
        out[_sl(d, 1, None)].add_(x[_sl(d, None, -1)], alpha=scale)
        out[_sl(d, 0, 1)].add_(x[_sl(d, -1, None)], alpha=scale)
    elif shift == -1:
        out[_sl(d, None, -1)].add_(x[_sl(d, 1, None)], alpha=scale)
        out[_sl(d, -1, None)].add_(x[_sl(d, 0, 1)], alpha=scale)
    else:
        raise ValueError(f"shift must be +1 or -1, got {shift}")
    return out


def grad(x, out=None):
    """Periodic forward differences of a (X, Y, Z) tensor -> (3, X, Y, Z),
    written into ``out`` when given."""
    if out is None:
        out = torch.empty((3, *x.shape), dtype=x.dtype, device=x.device)
    for d in range(3):
        n = x.shape[d]
        torch.sub(x.narrow(d, 1, n - 1), x.narrow(d, 0, n - 1), out=out[d].narrow(d, 0, n - 1))
        torch.sub(x.narrow(d, 0, 1), x.narrow(d, n - 1, 1), out=out[d].narrow(d, n - 1, 1))
    return out


def grad_adj(g, out=None):
    """Adjoint of :func:`grad` (= minus the backward-difference divergence),
    written into ``out`` when given."""
    out = torch.add(g[0], g[1], out=out)
    out.add_(g[2]).neg_()
    for d in range(3):
        add_rolled(out, g[d], 1, d)
    return out


def grad_adj_grad(x, weights, out=None, *, diag=None, shift=0.0, add=None, add_scale=1.0,
                  scale=None):
    """``grad^T (weights * grad x)`` of a (X, Y, Z) tensor with (3, X, Y, Z)
    ``weights``: the weighted (positive semi-definite) graph Laplacian of the
    periodic forward differences, the regulariser's part of a lagged-diffusivity
    normal operator. Written into ``out`` when given.

    The rest of such an operator can be computed in the same pass:
    ``scale * (grad^T (weights grad x) + diag * (x - shift) + add_scale * add)``,
    each term only when its tensor (``diag``, ``add``, ``scale``: like ``x``) is
    given; ``shift`` is a number (TFI's CSF term: ``diag = csf_lam * M_CSF``,
    ``shift`` the CSF mean). On the CPU one compiled pass over the arrays
    (:func:`_grad_adj_grad_cpu`); elsewhere :func:`grad_adj_grad_torch`."""
    if out is None:
        out = torch.empty_like(x)
    terms = (diag, add, scale)
    if x.device.type == "cpu" and all(
            t.dtype == torch.float32 for t in (x, weights, out, *terms) if t is not None):
        none = np.zeros((1, 1, 1), np.float32)
        diag_a, add_a, scale_a = (none if t is None else t.contiguous().numpy() for t in terms)
        _grad_adj_grad_cpu(x.contiguous().numpy(), weights.contiguous().numpy(), out.numpy(),
                           diag_a, float(shift), add_a, float(add_scale), scale_a,
                           diag is not None, add is not None, scale is not None)
        return out
    return grad_adj_grad_torch(x, weights, out, diag=diag, shift=shift, add=add,
                               add_scale=add_scale, scale=scale)


def grad_adj_grad_torch(x, weights, out=None, *, diag=None, shift=0.0, add=None, add_scale=1.0,
                        scale=None, work=None):
    """:func:`grad_adj_grad` composed of torch calls (its path off the CPU, and
    the reference of ``benchmarks/tfi_operator.py``); ``work`` (3, X, Y, Z), when
    given, receives the gradient."""
    out = grad_adj(grad(x, out=work).mul_(weights), out=out)
    if diag is not None:
        out.addcmul_(diag, x - shift)
    if add is not None:
        out.add_(add, alpha=add_scale)
    return out if scale is None else out.mul_(scale)


@njit(cache=True, parallel=True)
def _grad_adj_grad_cpu(x, w, out, diag, shift, add, add_scale, scale, has_diag, has_add,
                       has_scale):
    """``out[j] = sum_a w_a[j - e_a] (x[j] - x[j - e_a]) - w_a[j] (x[j + e_a] - x[j])``,
    periodic, with the optional terms of :func:`grad_adj_grad`: that function
    without the ten intermediate passes (and those of the other terms)."""
    nx, ny, nz = x.shape
    shift, add_scale = np.float32(shift), np.float32(add_scale)
    for i in prange(nx):
        ip, im = (i + 1) % nx, (i + nx - 1) % nx
        for j in range(ny):
            jp, jm = (j + 1) % ny, (j + ny - 1) % ny
            for k in range(nz):
                kp = k + 1 if k + 1 < nz else 0
                km = k - 1 if k > 0 else nz - 1
                c = x[i, j, k]
                v = (w[0, im, j, k] * (c - x[im, j, k]) - w[0, i, j, k] * (x[ip, j, k] - c)
                     + w[1, i, jm, k] * (c - x[i, jm, k]) - w[1, i, j, k] * (x[i, jp, k] - c)
                     + w[2, i, j, km] * (c - x[i, j, km]) - w[2, i, j, k] * (x[i, j, kp] - c))
                if has_diag:
                    v += diag[i, j, k] * (c - shift)
                if has_add:
                    v += add_scale * add[i, j, k]
                if has_scale:
                    v *= scale[i, j, k]
                out[i, j, k] = v


def laplacian(x, voxel_size_mm=(1.0, 1.0, 1.0)):
    """7-point Laplacian (periodic) of a (X, Y, Z) tensor, in units of x / mm^2."""
    w = [1.0 / float(h) ** 2 for h in voxel_size_mm]
    out = x * (-2.0 * sum(w))
    for d in range(3):
        add_rolled(out, x, 1, d, w[d])
        add_rolled(out, x, -1, d, w[d])
    return out


def block_mean2(x, shape=None):
    """2 x 2 x 2 block means of the last three axes of tensor ``x`` (an odd axis
    padded with a zero first), zero-padded to ``shape`` when given."""
    spatial = x.shape[-3:]
    pads = [a for n in reversed(spatial) for a in (0, n % 2)]
    y = torch.nn.functional.avg_pool3d(
        torch.nn.functional.pad(x.reshape(-1, 1, *spatial), pads), 2)
    y = y.reshape(*x.shape[:-3], *y.shape[-3:])
    if shape is None:
        return y
    out = x.new_zeros((*x.shape[:-3], *shape))
    out[..., :y.shape[-3], :y.shape[-2], :y.shape[-1]] = y
    return out


def upsample2(x, shape=None):
    """Trilinear 2x up-sampling of a (X, Y, Z) tensor (voxel centres, as
    :func:`block_mean2` places them), cropped to ``shape`` when given."""
    y = torch.nn.functional.interpolate(x[None, None], scale_factor=2, mode="trilinear",
                                        align_corners=False)[0, 0]
    return y if shape is None else y[:shape[0], :shape[1], :shape[2]]


def cg(apply_a, b, x0=None, *, max_iter=100, tol=1e-6):
    """Conjugate gradients for ``A x = b`` with a symmetric positive (semi-)definite ``A``.

    Stops after ``max_iter`` iterations or when ``||r|| <= tol ||b||``.
    Returns ``(x, iterations)``.
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply_a(x) if x0 is not None else b.clone()
    p = r.clone()
    rr = float(torch.sum(r * r))
    stop = float(tol * torch.linalg.vector_norm(b)) ** 2
    it = 0
    for it in range(1, int(max_iter) + 1):
        if rr <= stop:
            return x, it - 1
        ap = apply_a(p)
        pap = float(torch.sum(p * ap))
        if pap <= 0:  # p in A's null space (semi-definite A): no further descent
            break
        alpha = rr / pap
        x.add_(p, alpha=alpha)
        r.add_(ap, alpha=-alpha)
        rr_new = float(torch.sum(r * r))
        p.mul_(rr_new / rr).add_(r)
        rr = rr_new
    return x, it

