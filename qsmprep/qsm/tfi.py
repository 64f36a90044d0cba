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
* **The prior covers the edge band** (rule R31-5): ``M_G`` exempts the
  strongest magnitude gradients from the prior, most of them at the brain's
  edge, where the field has no weight either, so χ there was held by
  neither. In the band the prior covers every gradient between two mask
  voxels except those touching a vessel-like voxel (R2* above twice the
  mask's median: pial veins are χ edges whose field the deeper data need).
* **Linear data term and PDF start.** The field is in ppm (no complex
  exponential); the outside sources start from PDF's fit, and each lagged
  diffusivity step solves for the update by CG, so the CG tolerance is relative
  to what is left to fit rather than to the background, which is ~100 times
  the brain's field and would stop CG before the brain is fitted.
* **A coarse-grid start** for voxels up to 1.25 mm: PDF's fit and the first
  lagged-diffusivity steps on a grid twice as coarse, the last three on the
  acquired grid. CG fits the large scales (background sources, the brain's
  low frequencies) slowest; on the coarse grid they cost a ninth as much,
  and on the independent heads the result was better in half the time.
* **MEDI+0's CSF term** (Liu Z et al., MRM 2018;79:2795-2803):
  ``+ csf_lam/2 ||M_CSF (chi - mean_CSF chi)||^2`` keeps chi uniform over the
  core of the ventricular CSF that :func:`qsmprep.qsm.reference.csf_mask` finds
  in the multi-echo magnitude (water: one value); left out, with a warning,
  where none is found. On the independent heads it lowered NRMSE on all three.
* **lambda follows the field's noise** (rule R27-2): the data weights are
  ``1/N_std`` scaled to mean 1, so a fixed ``lam`` would regularise a field
  twice as noisy no more than a clean one; ``lam`` is set for a field noise of
  ``noise_ref_ppm`` and scaled by ``(noise_ref_ppm / sigma)^2``, the way a
  MAP estimate's weight scales (:func:`noise_scaled_lam`).
* **One step of iterative regularisation at the end** (Osher et al., Multiscale
  Model Simul 2005;4:460-489): the early-stopped TV fit leaves 10-15 % of the
  trusted field unexplained, much of it fine structure the prior flattened;
  ``misfit_step`` times its closed-form gradient-Tikhonov inversion
  ``D F{r} / (D^2 + misfit_lam |E|^2)`` (Bilgic et al. 2014),
  ``r = [w > 0] (f - D chi)``, is added to chi.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from . import torch_ops as T
from .fft import fast_shape
from .bgremove import _data_weights, fit_outside_sources
from .inversion import gradient_mask
from .mask import MaskBox, check_volume, depth_mm
from .reference import csf_mask

LOGGER = logging.getLogger("qsmprep")


def edge_band(mask, voxel_size_mm, edge_mm):
    """The mask's voxels within ``edge_mm`` (mm) of its boundary, whose field
    TFI does not trust. The depth of a voxel is its distance to the nearest
    voxel outside the mask (the outer layer is one voxel deep)."""
    mask = np.asarray(mask, dtype=bool)
    if edge_mm <= 0:
        return np.zeros_like(mask)
    return mask & (depth_mm(mask, voxel_size_mm, border_outside=False) <= edge_mm)


def edge_weights(weights, mask, voxel_size_mm, edge_mm, band=None):
    """``weights`` set to 0 in the edge band (:func:`edge_band`, or ``band``
    when given). Raises a ValueError when no weighted voxel would be left."""
    if edge_mm <= 0:
        return weights
    band = edge_band(mask, voxel_size_mm, edge_mm) if band is None else band
    out = np.where(np.asarray(mask, bool) & ~band, weights, 0.0).astype(np.float32)
    if not np.any(out > 0):
        raise ValueError(f"No voxel of the mask is deeper than edge_mm={edge_mm} mm; "
                         "use a smaller edge_mm for a mask this thin")
    return out


def tfi(total_field_ppm, mask, voxel_size_mm, *, b0_dir, noise_std_ppm=None, magnitude=None,
        magnitude_echoes=None, echo_times_s=None, lam=8000.0, p_outside=30.0, edge_mm=3.0,
        edge_fraction=0.8, band_prior=True, vessel_r2star_factor=2.0, max_outer=10, cg_iter=100,
        last_cg_factor=2.0, coarse_steps=10, coarse_cg_iter=200, coarse_max_mm=2.5,
        steps_after_coarse=3, tol=1e-2, pad_factor=1.1, misfit_step=0.5, misfit_lam=1e-2,
        csf_lam=10000.0, noise_ref_ppm=1.2e-3, lam_factor_range=(0.125, 8.0),
        noise_std_absolute=True, csf_region=None, source="this run", device="cpu"):
    """Preconditioned total field inversion (Liu et al. 2017), see the module
    docstring. ``total_field_ppm`` is the total (or a local) field in ppm,
    ``noise_std_ppm`` its N_std (ppm), ``magnitude`` the (multi-echo) magnitude for
    the edge mask. ``lam`` weights the data term of fields in ppm (as MEDI's),
    ``edge_mm`` is the outer band of the mask (mm) whose field gets no weight;
    with ``band_prior`` the prior covers the band's gradients (:func:`band_edges`),
    except at vessel-like voxels (:func:`vessel_like`, R2* above
    ``vessel_r2star_factor`` times the mask's median), where ``magnitude_echoes``
    and ``echo_times_s`` give R2* (two echoes or more; else ``M_G`` as MEDI's).

    The problem is solved from PDF's fit of the outside sources by ``max_outer``
    lagged-diffusivity steps of at most ``cg_iter`` CG iterations each, the
    last with ``last_cg_factor`` times as many (its weights have settled; on the
    independent heads it raised XSIM on all three). Where a grid twice as coarse
    has voxels of at most ``coarse_max_mm`` (acquired voxels up to 1.25 mm),
    PDF's fit and ``coarse_steps`` steps of ``coarse_cg_iter`` run on it first
    (2 x 2 x 2 block means), and only the last ``steps_after_coarse`` of the
    ``max_outer`` steps on the acquired grid, from the coarse chi upsampled: a
    coarse CG iteration costs a ninth of an acquired one, and on the independent
    heads this was as accurate in half the time (docs/methods.md, "Total field
    inversion").
    ``csf_lam`` (0: off) weighs MEDI+0's CSF term over ``csf_region``, the
    ventricular CSF core as :func:`qsmprep.qsm.reference.csf_mask` returns it,
    ``(core, problem)``, when the caller found it (the workflow finds it once
    for a run), else over the CSF found in ``magnitude_echoes`` (X, Y, Z, E;
    with ``echo_times_s`` its R2* is checked), else in ``magnitude``
    (:func:`zero_reference_region`); ``source`` (the run's file) is named in
    the warning when there is none.
    ``lam`` is for a field whose noise is ``noise_ref_ppm`` (ppm; 0: ``lam`` as
    given) and is scaled to this field's noise by :func:`noise_scaled_lam`
    (``lam_factor_range``) when ``noise_std_absolute`` (N_std has an absolute
    level: more than one echo).
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
    lam = noise_scaled_lam(lam, noise_std_ppm if noise_std_absolute else None, mask,
                           noise_ref_ppm, lam_factor_range, source)
    band = edge_band(mask, voxel_size_mm, edge_mm)
    w = edge_weights(_data_weights(mask, noise_std_ppm), mask, voxel_size_mm, edge_mm, band)
    if magnitude is None:
        edges = [mask] * 3
    else:
        edges = gradient_mask(magnitude, mask, edge_fraction)
        vessels = (vessel_like(magnitude_echoes, echo_times_s, mask, vessel_r2star_factor)
                   if band_prior else None)
        if vessels is not None:
            edges = band_edges(edges, mask, band, vessels)
    csf = zero_reference_region(magnitude if magnitude_echoes is None else magnitude_echoes,
                                mask, voxel_size_mm, echo_times_s, source,
                                csf_region) if csf_lam else None
    zero_ref = None if csf is None else box.pad(csf)
    fine = _Problem(box.pad(mask), box.pad(np.where(mask, field, 0)), box.pad(w) ** 2,
                    np.stack([box.pad(e) for e in edges]), voxel_size_mm, b0_dir, lam,
                    p_outside, device, zero_ref, csf_lam)
    steps = [cg_iter] * int(max_outer)
    if steps:
        steps[-1] = round(last_cg_factor * cg_iter)
    if coarse_steps > 0 and 2 * max(voxel_size_mm) <= coarse_max_mm:
        coarse = fine.coarsened()
        y = coarse.solve(coarse.pdf_start(), [coarse_cg_iter] * int(coarse_steps), tol)
        y = fine.solve(fine.upsampled(coarse, y),
                       steps[len(steps) - min(int(steps_after_coarse), len(steps)):], tol)
    else:
        y = fine.solve(fine.pdf_start(), steps, tol)
    chi = fine.p * y
    m, f, w2, d, shape = fine.m, fine.f, fine.w2, fine.d, fine.shape
    local = m * (f - fine.dconv((1 - m) * chi))
    if misfit_step:
        misfit = (w2 > 0).to(f.dtype) * (f - fine.dconv(chi))
        denom = d * d + float(misfit_lam) * T.grad_norm2_t(shape, device)
        denom = torch.where(denom == 0, torch.ones_like(denom), denom)
        chi = chi + float(misfit_step) * T.irfft3(T.rfft3(misfit) * d / denom, shape)
    return box.unpad(T.to_numpy(m * chi)), box.unpad(T.to_numpy(local))


def vessel_like(magnitude_echoes, echo_times_s, mask, factor=2.0):
    """Voxels of ``mask`` whose R2* (1/s, from the first and the last echo of
    ``magnitude_echoes``, (X, Y, Z, E), at ``echo_times_s``) is above ``factor``
    times its median over the mask: veins (deoxygenated blood) and other strong
    local field gradients, at 3 T and 7 T alike. None without two echoes."""
    if magnitude_echoes is None or echo_times_s is None or len(echo_times_s) < 2:
        return None
    mag = np.asarray(magnitude_echoes)
    if mag.ndim != 4 or mag.shape[-1] != len(echo_times_s):
        return None
    mask = np.asarray(mask, dtype=bool)
    te = np.asarray(echo_times_s, dtype=np.float64)
    first, last = (np.maximum(mag[..., i].astype(np.float64), 1e-9) for i in (0, -1))
    r2star = np.log(first / last) / (te[-1] - te[0])
    return mask & (r2star > factor * np.median(r2star[mask]))


def band_edges(edges, mask, band, vessels):
    """MEDI's edge mask ``edges`` (3, X, Y, Z; 1 where the prior applies) with
    the prior on every gradient (forward difference along each axis, as
    :func:`qsmprep.qsm.inversion.gradient_mask` takes it) between two voxels of
    ``mask`` of which one lies in ``band`` and neither in ``vessels``."""
    out = np.array(edges, dtype=np.float32, copy=True)
    mask, band, vessels = (np.asarray(a, dtype=bool) for a in (mask, band, vessels))
    for axis in range(3):
        def nxt(a):
            return np.roll(a, -1, axis=axis)

        prior = mask & nxt(mask) & (band | nxt(band)) & ~(vessels | nxt(vessels))
        out[axis][prior] = 1.0
    return out


def noise_scaled_lam(lam, noise_std_ppm, mask, noise_ref_ppm, factor_range=(0.125, 8.0),
                     source="this run"):
    """``lam`` (set for a field whose noise is ``noise_ref_ppm``, ppm) scaled to
    the noise of this field, as a MAP estimate's weight scales:
    ``lam (noise_ref_ppm / sigma)^2`` with ``sigma = 1 / mean(1 / N_std)`` over
    the mask (the level the data weights ``1/N_std`` are divided by), the factor
    clipped to ``factor_range`` (with a warning naming ``source``). ``lam``
    unchanged when ``noise_ref_ppm`` is 0 or None, or ``noise_std_ppm`` is None
    (no N_std, or one whose level is unknown: one echo)."""
    if not noise_ref_ppm or noise_std_ppm is None:
        LOGGER.info("%s: TFI's lambda %g (not scaled to the field's noise: %s)", source, lam,
                    "no noise level known" if noise_ref_ppm else "noise_ref_ppm is 0")
        return float(lam)
    n = np.asarray(noise_std_ppm, dtype=np.float64)[np.asarray(mask, bool)]
    n = n[np.isfinite(n) & (n > 0)]
    if n.size == 0:
        return float(lam)
    sigma = 1.0 / float(np.mean(1.0 / n))
    wanted = (float(noise_ref_ppm) / sigma) ** 2
    low, high = factor_range
    factor = min(max(wanted, low), high)
    if factor != wanted:
        LOGGER.warning(
            "%s: the field's noise (N_std %.2g ppm) is outside the range TFI's lambda is "
            "scaled over (%.2g to %.2g ppm): lambda %g times %g, not %.3g, so the map may be "
            "%s than TFI would make it at this noise (docs/methods.md, \"Total field "
            "inversion\")", source, sigma, noise_ref_ppm / high ** 0.5,
            noise_ref_ppm / low ** 0.5, lam, factor, wanted,
            "noisier" if wanted < low else "smoother")
    LOGGER.info("%s: TFI's lambda %.0f (%.3g times %g: the field's noise %.3g ppm against "
                "%.3g ppm)", source, lam * factor, factor, lam, sigma, noise_ref_ppm)
    return float(lam) * factor


def zero_reference_region(magnitude, mask, voxel_size_mm, echo_times_s=None,
                          source="this run", csf_region=None):
    """The ventricular CSF core of :func:`qsmprep.qsm.reference.csf_mask` (the voxels
    ``--referencing csf`` takes its median over) for MEDI+0's term: from
    ``csf_region`` (``csf_mask``'s ``(core, problem)``) when given, else found
    in ``magnitude``; None, with a warning naming ``source`` and saying why,
    when there is no magnitude or no CSF in it."""
    if csf_region is not None:
        csf, problem = csf_region
    elif magnitude is None:
        problem = "no magnitude image was given"
    else:
        csf, problem = csf_mask(magnitude, mask, voxel_size_mm, echo_times_s=echo_times_s)
    if problem:
        LOGGER.warning("%s: total field inversion ran without MEDI+0's CSF term: %s. The map "
                       "is fitted without it (slightly less accurate on whole heads; "
                       "docs/methods.md, \"Total field inversion\")", source, problem)
        return None
    return csf


def upsample_within(x, coarse_mask, mask):
    """Trilinear 2x upsampling of ``x`` onto the grid of ``mask`` (cropped),
    of its parts inside and outside ``coarse_mask`` (0/1) separately, each
    normalised by its own upsampled support and kept on its side of ``mask``:
    the brain's weak chi and the background's strong sources (ppm) are not
    blended across the mask's edge."""
    def up(v):
        return T.upsample2(v, mask.shape)

    inside = up(x * coarse_mask) / up(coarse_mask).clamp_min(1e-3)
    outside = up(x * (1 - coarse_mask)) / up(1 - coarse_mask).clamp_min(1e-3)
    return torch.where(mask > 0, inside, outside)


class _Problem:
    """TFI on one grid: mask ``m``, field ``f``, data weights ``w2``, edge mask
    ``m_g`` (3, X, Y, Z), preconditioner ``p``, dipole kernel ``d`` and, for
    MEDI+0's term of weight ``csf_lam``, the CSF core ``csf`` or None
    (tensors), solved for the preconditioned variable ``y`` (chi = p y)."""

    def __init__(self, m, f, w2, m_g, voxel_size_mm, b0_dir, lam, p_outside, device,
                 csf=None, csf_lam=0.0):
        self.m, self.f, self.w2 = (T.as_tensor(a, device) for a in (m, f, w2))
        self.csf = None if csf is None else T.as_tensor(csf, device) * self.m
        self.csf_lam = float(csf_lam)
        self.m_g = T.as_tensor(m_g, device) * self.m
        self.voxel_size_mm, self.b0_dir, self.lam = tuple(voxel_size_mm), b0_dir, float(lam)
        self.p_outside, self.device = float(p_outside), device
        self.shape = tuple(self.m.shape)
        self.p = self.m + self.p_outside * (1 - self.m)
        self.d = T.dipole_kernel_t(self.shape, self.voxel_size_mm, b0_dir, device)

    def dconv(self, x):
        return T.irfft3(self.d * T.rfft3(x), self.shape)

    def coarsened(self):
        """The problem on a grid twice as coarse (fast FFT size, even last
        axis): block means of the field and weights over the mask's part of a
        block, a coarse voxel in the mask (and in the edge mask) when more than
        half its block is; the same lam (twice it, which keeps the balance of
        the data and the prior for a smooth chi, scored 0.2-0.4 points worse on
        the 7 T head of the independent benchmark)."""
        shape = fast_shape(tuple((n + 1) // 2 for n in self.shape), even_last=True)
        part = T.block_mean2(self.m, shape)
        m = (part > 0.5).float()
        inside = part.clamp_min(1e-6)
        f = m * T.block_mean2(self.f * self.m, shape) / inside
        w2 = m * T.block_mean2(self.w2, shape) / inside
        m_g = (T.block_mean2(self.m_g, shape) > 0.5).float()
        csf = None if self.csf is None else (T.block_mean2(self.csf, shape) > 0.5).float()
        return _Problem(m, f, w2, m_g, tuple(2 * v for v in self.voxel_size_mm), self.b0_dir,
                        self.lam, self.p_outside, self.device, csf, self.csf_lam)

    def upsampled(self, coarse, y):
        """``coarse``'s solution ``y`` as this grid's start (``y`` = chi / p)."""
        return upsample_within(coarse.p * y, coarse.m, self.m) / self.p

    def pdf_start(self):
        """PDF's fit of the sources outside the mask, as ``y``."""
        return fit_outside_sources(self.dconv, self.f, self.m, self.w2) / self.p_outside

    def solve(self, y, cg_steps, tol):
        """Lagged-diffusivity steps from ``y``, one for each entry of
        ``cg_steps`` (its CG iterations at most), stopping early when a step
        changes ``y`` by less than ``tol`` (relative)."""
        normal = _NormalOperator(self.d, self.p, self.w2, self.lam, self.csf, self.csf_lam)
        rhs = self.lam * self.p * self.dconv(self.w2 * self.f)
        for its in cg_steps:
            g = self.m_g * T.grad(self.p * y)
            normal.set_tv_weights(self.m_g * self.m_g
                                  / torch.sqrt(torch.sum(g * g, dim=0, keepdim=True) + 1e-6))
            del g
            step, _ = T.cg(normal, rhs - normal(y), max_iter=int(its), tol=tol)
            y = y + step
            change = torch.linalg.vector_norm(step) / torch.linalg.vector_norm(y).clamp_min(1e-12)
            if change < tol:
                break
        return y


class _NormalOperator:
    """``A x = lam P D W^2 D P x + P grad^T (M_G v M_G) grad P x``: the lagged
    diffusivity step's normal operator, with its work arrays allocated once
    (each CG iteration would otherwise allocate and fault in about ten arrays
    of the box's size; on the CPU that took as long as the FFTs). The tensor a
    call returns is overwritten by the next call."""

    def __init__(self, d, p, w2, lam, csf=None, csf_lam=0.0):
        self.d, self.p, self.w2, self.lam = d, p, w2, float(lam)
        self.csf_diag, self.csf_index = None, None
        if csf is not None and csf_lam:   # csf_lam Q, Q x = M_CSF (x - mean_CSF x)
            index = torch.nonzero(csf.reshape(-1) > 0).squeeze(1)
            if index.numel():
                self.csf_diag, self.csf_index = float(csf_lam) * csf, index
        self.shape = tuple(p.shape)
        self.px, self.a, self.b, self.out = (torch.empty_like(p) for _ in range(4))
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
        mean = 0.0 if self.csf_index is None else self.px.reshape(-1)[self.csf_index].mean()
        return T.grad_adj_grad(self.px, self.tv, out=self.out, diag=self.csf_diag, shift=mean,
                               add=self.b, add_scale=self.lam, scale=self.p)
