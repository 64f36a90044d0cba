"""Total field inversion: total field (ppm) -> susceptibility chi (ppm), with no
separate background-removal stage.

Preconditioned total field inversion (TFI; Liu et al., MRM 2017, 78:303-315)
fits one susceptibility map over the whole padded box, inside the brain mask
``M`` and outside it, to the total field measured in the brain:

``min_y  lam/2 ||W (f - D P y)||^2 + ||M_G grad(P y)||_1``,   ``chi = P y``

``P`` is the preconditioner: 1 in ``M`` and ``p_outside`` (30 in the paper)
outside, so that the strong background sources (air, bone: ppm) and the weak
brain susceptibilities (0.01-0.1 ppm) converge together. ``W = 1/N_std``
(mean 1) in ``M``, the same data weights as PDF and MEDI, and ``M_G`` is
MEDI's magnitude edge mask inside ``M`` (no regulariser outside, where the
background sources are determined by the data alone, as in PDF).

Where ours differs from the paper, and why (docs/methods.md, "Total field
inversion"):

* **Edge data are not trusted.** The phase of the outer ``edge_mm`` of the
  mask mixes cortex, CSF and skull after the scanner's k-space truncation and
  is wrong by many times the local field there (the independent benchmark);
  those voxels get no data weight, while their chi is still estimated from the
  deeper data through the dipole coupling and the edge-preserving prior.
  Dropping them from the mask instead scores them as 0 and costs more.
* **Linear data term and PDF start.** The field is in ppm (no complex
  exponential); the outside sources start from PDF's fit, and each lagged
  diffusivity step solves for the update by CG, so the CG tolerance is relative
  to what is left to fit rather than to the background, which is ~100 times
  the brain's field and would stop CG before the brain is fitted.
* **One step of iterative regularisation at the end** (Osher et al., Multiscale
  Model Simul 2005;4:460-489): the early-stopped TV fit leaves 10-15 % of the
  trusted field unexplained, much of it fine structure the prior flattened;
  ``misfit_step`` times its closed-form gradient-Tikhonov inversion
  ``D F{r} / (D^2 + misfit_lam |E|^2)`` (Bilgic et al. 2014),
  ``r = [w > 0] (f - D chi)``, is added to chi.
"""

from __future__ import annotations

import numpy as np
import torch

from . import torch_ops as T
from .bgremove import _data_weights, fit_outside_sources
from .inversion import gradient_mask
from .mask import MaskBox, check_volume, depth_mm


def edge_weights(weights, mask, voxel_size_mm, edge_mm):
    """``weights`` set to 0 within ``edge_mm`` (mm) of the mask's boundary.

    The depth of a voxel is its distance to the nearest voxel outside the mask
    (the outer layer is one voxel deep). Raises a ValueError when no weighted
    voxel would be left."""
    if edge_mm <= 0:
        return weights
    depth = depth_mm(mask, voxel_size_mm, border_outside=False)
    out = np.where(depth > edge_mm, weights, 0.0).astype(np.float32)
    if not np.any(out > 0):
        raise ValueError(f"No voxel of the mask is deeper than edge_mm={edge_mm} mm; "
                         "use a smaller edge_mm for a mask this thin")
    return out


def tfi(total_field_ppm, mask, voxel_size_mm, *, b0_dir, noise_std_ppm=None, magnitude=None,
        lam=8000.0, p_outside=30.0, edge_mm=3.0, edge_fraction=0.8, max_outer=10,
        cg_iter=100, last_cg_factor=2.0, tol=1e-2, pad_factor=1.1, misfit_step=0.5, misfit_lam=1e-2,
        device="cpu"):
    """Preconditioned total field inversion (Liu et al. 2017), see the module
    docstring. ``total_field_ppm`` is the total (or a local) field in ppm,
    ``noise_std_ppm`` its N_std (ppm), ``magnitude`` the (multi-echo) magnitude for
    the edge mask. ``lam`` weights the data term of fields in ppm (as MEDI's),
    ``edge_mm`` is the outer band of the mask (mm) whose field gets no weight.
    Each of the ``max_outer`` lagged-diffusivity steps runs at most ``cg_iter``
    CG iterations, the last one ``last_cg_factor`` times as many (its weights
    have settled; on the independent heads it raised XSIM on all three).
    ``misfit_step`` (0: off) times the gradient-Tikhonov inversion (``misfit_lam``,
    :func:`qsmprep.qsm.inversion.tikhonov`) of the field the fit leaves
    unexplained where the data are trusted is added to chi (see the module
    docstring).
    Returns ``(chi, local_field)`` (ppm, 0 outside the mask): the local field is
    the field given less the field of the background sources fitted outside
    the mask (what a background removal would have passed on)."""
    field = check_volume(total_field_ppm, mask, "field")
    mask = np.asarray(mask, dtype=bool)
    box = MaskBox(mask, pad_factor=pad_factor, even_last=True)  # faster real FFTs
    shape = box.shape
    m = T.as_tensor(box.pad(mask), device)
    f = T.as_tensor(box.pad(np.where(mask, field, 0)), device)
    w = edge_weights(_data_weights(mask, noise_std_ppm), mask, voxel_size_mm, edge_mm)
    w2 = T.as_tensor(box.pad(w), device) ** 2
    d = T.dipole_kernel_t(shape, voxel_size_mm, b0_dir, device)
    p = m + p_outside * (1 - m)
    if magnitude is None:
        m_g = m.expand(3, *shape).clone()
    else:
        edges = gradient_mask(magnitude, mask, edge_fraction)
        m_g = T.as_tensor(np.stack([box.pad(e) for e in edges]), device) * m

    def dconv(x):
        return T.irfft3(d * T.rfft3(x), shape)

    rhs = lam * p * dconv(w2 * f)
    y = fit_outside_sources(dconv, f, m, w2) / p_outside
    normal = _NormalOperator(d, p, w2, lam)
    for k in range(int(max_outer)):
        g = m_g * T.grad(p * y)
        normal.set_tv_weights(m_g * m_g / torch.sqrt(torch.sum(g * g, dim=0, keepdim=True) + 1e-6))
        del g
        its = round(last_cg_factor * cg_iter) if k == int(max_outer) - 1 else cg_iter
        step, _ = T.cg(normal, rhs - normal(y), max_iter=its, tol=tol)
        y = y + step
        change = torch.linalg.vector_norm(step) / torch.linalg.vector_norm(y).clamp_min(1e-12)
        if change < tol:
            break
    chi = p * y
    local = m * (f - dconv((1 - m) * chi))
    if misfit_step:
        misfit = (w2 > 0).to(f.dtype) * (f - dconv(chi))
        denom = d * d + float(misfit_lam) * T.grad_norm2_t(shape, device)
        denom = torch.where(denom == 0, torch.ones_like(denom), denom)
        chi = chi + float(misfit_step) * T.irfft3(T.rfft3(misfit) * d / denom, shape)
    return box.unpad(T.to_numpy(m * chi)), box.unpad(T.to_numpy(local))


class _NormalOperator:
    """``A x = lam P D W^2 D P x + P grad^T (M_G v M_G) grad P x``: the lagged
    diffusivity step's normal operator, with its work arrays allocated once
    (each CG iteration would otherwise allocate and fault in about ten arrays
    of the box's size; on the CPU that took as long as the FFTs)."""

    def __init__(self, d, p, w2, lam):
        self.d, self.p, self.w2, self.lam = d, p, w2, float(lam)
        self.shape = tuple(p.shape)
        self.px, self.a, self.b = (torch.empty_like(p) for _ in range(3))
        self.k = torch.empty(d.shape, dtype=p.dtype.to_complex(), device=p.device)
        self.tv = None

    def set_tv_weights(self, tv):
        """``M_G v M_G`` (3, X, Y, Z) of this step."""
        self.tv = tv

    def _dconv(self, x, out):
        torch.fft.rfftn(x, dim=(0, 1, 2), out=self.k)
        self.k.mul_(self.d)
        return torch.fft.irfftn(self.k, s=self.shape, dim=(0, 1, 2), out=out)

    def __call__(self, x):
        torch.mul(self.p, x, out=self.px)
        self._dconv(self.px, self.a).mul_(self.w2)
        self._dconv(self.a, self.b)
        T.grad_adj_grad(self.px, self.tv, out=self.a)
        return torch.add(self.a, self.b, alpha=self.lam).mul_(self.p)
