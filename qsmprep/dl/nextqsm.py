"""NeXtQSM: learned background removal + data-consistent variational inversion.

Two networks, trainable end to end (total field -> local field -> chi):

* background removal: a 3-D U-Net maps the masked total field (ppm), the
  mask and, unless ``bfr.smv_radius_mm`` is None, the SMV high-pass of the
  total field inside the eroded mask, ``M_e (f - SMV f)`` (SHARP's
  background-free input, Schweser et al. 2011), to the local field (ppm);
  with ``bfr.vsharp`` set (:data:`VSHARP_PRIOR`) it also gets the V-SHARP
  local field (Wu et al. 2012) computed on the whole input, and outputs
  ``V-SHARP + correction`` with the correction's output conv zeroed at
  initialisation, so an untrained network is exactly V-SHARP (a deviation
  from the paper, like the TKD channel of IR2QSM and the U-Net: the
  deconvolution of the SMV high-pass is global, out of reach of a small
  U-Net's receptive field, and the network learns only the correction,
  including the rim V-SHARP erodes);
* variational network (VN): ``K`` unrolled gradient steps on
  ``E_i(x) = lambda_i/2 ||M(Dx - f)||^2 + R(x)``::

      x_0 = TV-ADMM(f)                       (``init_tv``; the paper: x_0 = 0)
      x_{i+1} = (x_i - alpha_i [lambda_i D^T(M(D x_i - f)) + R(x_i, f)]) . M

  with one U-Net regulariser ``R`` shared by all steps and learned positive
  ``alpha_i``, ``lambda_i``; ``D`` is the dipole operator with the true voxel
  size and B0 direction over the zero-padded volume
  (:class:`qsmprep.dl.dipole.DipoleOperator`).

Both networks work in units of a per-volume scale ``s`` (ppm): the RMS of
the local field in the mask for ``R`` (inputs ``x / s``, ``f / s``, output
times ``s``), the RMS of the SMV high-pass in the eroded mask for the
background-removal U-Net (high-pass input and output). Background removal
and dipole inversion are linear, so a brain with a third of the training
patches' contrast is treated like one with the same contrast (with fixed
scales, networks trained on high-contrast patches add their learned
correction at full amplitude to low-contrast brains). Two deviations from the
  paper, both to learn a useful network within a CPU budget: the iterations
  start from a classical solution, and ``R`` also sees the local field ``f``
  as a second channel. The start is the TV-ADMM solution (Bilgic et al.
  2014) with the options ``vn.init_tv`` (:data:`TV_START`; the registry's
  ``tv`` defaults), so that an untrained VN (``R`` = 0) is TV followed by
  ``K`` data-consistency steps and the network learns a correction of TV,
  as the background removal corrects V-SHARP; with ``init_tv`` None the
  closed-form Tikhonov solution ``M . F^-1{D F f / (D^2 + eps)}``
  (``init_eps``; the weights shipped until 2026-11-27, whose configs lack
  ``init_tv``: load those with ``"init_tv": None``), with ``init_eps`` None
  too, 0 as published.

The published network uses 6 steps and 16..512 filters (~39 M parameters);
the default configuration here is sized for CPU training and a GPU user
trains the full size with the same code by changing :data:`DEFAULT_CONFIG`.

Reference: Cognolato F, O'Brien K, Jin J, et al. NeXtQSM - A complete deep
learning pipeline for data-consistent quantitative susceptibility mapping
trained with hybrid data. Med Image Anal 2023;84:102700.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..qsm.bgremove import default_radii_mm
from . import merge_config
from .unet import UNet, mask_rms

#: V-SHARP options of the background removal's closed-form input
#: (``bfr.vsharp``; None: a U-Net without it, as in weights saved before
#: 2026-11-26, whose configs lack the key: load those with ``"vsharp": None``)
VSHARP_PRIOR = {"max_radius_mm": 12.0, "min_radius_mm": None, "threshold": 0.05}

#: TV-ADMM options of the VN's start (``vn.init_tv``; None: Tikhonov)
TV_START = {"lam": 2e-4, "max_iter": 40, "tol": 3e-3}

#: Architecture and scales: ``total_scale_ppm`` brings the total field to
#: order 1; ``local_scale_ppm`` is the background-removal output scale when
#: ``smv_radius_mm`` is None (otherwise the high-pass RMS is used).
DEFAULT_CONFIG = {
    "bfr": {"base": 12, "levels": 4, "smv_radius_mm": 5.0, "vsharp": VSHARP_PRIOR},
    "vn": {"base": 12, "levels": 4, "steps": 3, "alpha0": 1.0, "lambda0": 2.0,
           "init_eps": 0.01, "init_tv": TV_START},
    "total_scale_ppm": 1.0,
    "local_scale_ppm": 0.05,
}


def _inverse_softplus(y):
    return float(torch.log(torch.expm1(torch.tensor(float(y)))))


def _whole(net, inp):
    return net(inp)


class NeXtQSM(nn.Module):
    """NeXtQSM background-removal network + variational network."""

    def __init__(self, config=None):
        super().__init__()
        self.config = merge_config(DEFAULT_CONFIG, config)
        c = self.config
        bfr = c["bfr"]
        channels = 2 + (bfr["smv_radius_mm"] is not None) + (bfr.get("vsharp") is not None)
        self.bfr = UNet(channels, 1, base=bfr["base"], levels=bfr["levels"])
        if bfr.get("vsharp") is not None:
            # the U-Net corrects V-SHARP: an untrained one returns V-SHARP
            nn.init.zeros_(self.bfr.head.weight)
            nn.init.zeros_(self.bfr.head.bias)
        vn = c["vn"]
        self.regulariser = UNet(2, 1, base=vn["base"], levels=vn["levels"])
        # R starts at zero: an untrained VN is Tikhonov + K data-consistency steps
        nn.init.zeros_(self.regulariser.head.weight)
        nn.init.zeros_(self.regulariser.head.bias)
        k = vn["steps"]
        self.alpha_raw = nn.Parameter(torch.full((k,), _inverse_softplus(vn["alpha0"])))
        self.lambda_raw = nn.Parameter(torch.full((k,), _inverse_softplus(vn["lambda0"])))

    @property
    def multiple(self):
        return max(self.bfr.multiple, self.regulariser.multiple)

    def remove_background(self, total, mask, dipole, apply=_whole):
        """Local field (ppm) from the total field (ppm), both ``[B, 1, X, Y, Z]``;
        ``dipole`` is the volume's :class:`~qsmprep.dl.dipole.DipoleOperator`
        (for the SMV filter)."""
        s_in, s_out = self.config["total_scale_ppm"], self.config["local_scale_ppm"]
        f = total * mask
        inputs = [f / s_in, mask]
        cfg = self.config["bfr"]
        radius = cfg["smv_radius_mm"]
        if radius is not None:
            eroded = (dipole.smv(mask, radius) > 0.999).to(f.dtype) * mask
            high_pass = (f - dipole.smv(f, radius)) * eroded
            s_out = mask_rms(high_pass, eroded)
            inputs.append(high_pass / s_out)
        prior = 0
        if cfg.get("vsharp") is not None:
            prior = self.vsharp(f, mask, dipole)
            inputs.append(prior / s_out)
        return (prior + apply(self.bfr, torch.cat(inputs, dim=1)) * s_out) * mask

    def vsharp(self, total, mask, dipole):
        """The V-SHARP local field (ppm) that the background-removal U-Net
        corrects (``bfr.vsharp`` options, as
        :func:`qsmprep.qsm.bgremove.vsharp`), zero outside its eroded mask."""
        opts = self.config["bfr"]["vsharp"]
        voxel = dipole.voxel_size_mm.max(axis=0)
        radii = default_radii_mm(voxel, opts["max_radius_mm"], opts["min_radius_mm"])
        return dipole.vsharp(total, mask, radii, opts["threshold"])[0]

    def invert(self, local, mask, dipole, apply=_whole, return_steps=False):
        """Chi (ppm) from the local field (ppm) with the unrolled VN.

        ``dipole`` is a :class:`~qsmprep.dl.dipole.DipoleOperator` over the
        volume's shape; ``apply(net, inp)`` runs the regulariser (whole or
        tiled). With ``return_steps`` also returns every iterate.
        """
        alphas, lambdas = F.softplus(self.alpha_raw), F.softplus(self.lambda_raw)
        f = local * mask
        s = mask_rms(f, mask)
        x = self.start(f, mask, dipole)
        steps = []
        for alpha, lam in zip(alphas, lambdas):
            reg = apply(self.regulariser, torch.cat([x / s, f / s], dim=1)) * s
            x = (x - alpha * (lam * dipole.data_gradient(x, f, mask) + reg)) * mask
            steps.append(x)
        return (x, steps) if return_steps else x

    def start(self, local, mask, dipole):
        """The VN's first iterate ``x_0`` (ppm) from the masked local field:
        TV-ADMM (``vn.init_tv``), else Tikhonov (``vn.init_eps``), else 0."""
        vn = self.config["vn"]
        if vn.get("init_tv") is not None:
            return dipole.tv(local, mask, **vn["init_tv"])
        if vn["init_eps"] is not None:
            return dipole.tikhonov(local, vn["init_eps"]) * mask
        return torch.zeros_like(local)

    def forward(self, total, mask, dipole, apply=_whole):
        """(local field, chi), both ppm, from the total field (ppm)."""
        local = self.remove_background(total, mask, dipole, apply)
        return local, self.invert(local, mask, dipole, apply)
