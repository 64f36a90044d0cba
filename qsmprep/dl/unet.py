"""3-D U-Net: conv-BN-ReLU x2 blocks, max-pool down, transposed-conv up.

References
----------
Ronneberger O, Fischer P, Brox T. U-Net: convolutional networks for
biomedical image segmentation. MICCAI 2015. Cicek O et al. 3D U-Net: learning
dense volumetric segmentation from sparse annotation. MICCAI 2016.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .dipole import DipoleOperator


def conv_block(cin, cout):
    """Two 3x3x3 conv-BN-ReLU layers."""
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """A 3-D U-Net with ``levels`` resolution levels.

    Parameters
    ----------
    in_channels, out_channels : int
    base : int
        Channels at full resolution; doubled at each level down.
    levels : int
        Resolution levels (the input size must be a multiple of
        ``2**(levels - 1)``, see :attr:`multiple`).
    extra_channels : sequence of int, optional
        Channels concatenated to the input of each encoder level but the
        bottleneck (IR2QSM's reverse concatenation); ``None``: none.
    """

    def __init__(self, in_channels=1, out_channels=1, base=16, levels=4, extra_channels=None):
        super().__init__()
        self.levels = levels
        self.channels = [base * 2**i for i in range(levels)]
        extra = list(extra_channels or [0] * (levels - 1))
        if len(extra) != levels - 1:
            raise ValueError(f"extra_channels needs {levels - 1} entries, got {len(extra)}")
        self.extra_channels = extra + [0]
        cin = [in_channels] + self.channels[:-1]
        self.down = nn.ModuleList(
            conv_block(c + e, c_out) for c, e, c_out in zip(cin, self.extra_channels, self.channels)
        )
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList(
            nn.ConvTranspose3d(self.channels[i + 1], self.channels[i], 2, stride=2)
            for i in range(levels - 1)
        )
        self.dec = nn.ModuleList(
            conv_block(2 * self.channels[i], self.channels[i]) for i in range(levels - 1)
        )
        self.head = nn.Conv3d(base, out_channels, 1)

    @property
    def multiple(self):
        """Spatial sizes must be multiples of this."""
        return 2 ** (self.levels - 1)

    def encode(self, x, extra=None):
        """Encoder: the skip features of each level and the bottleneck features.

        ``extra[i]`` (or None) is concatenated to the input of level ``i``.
        """
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = self.pool(x)
            if extra is not None and extra[i] is not None:
                x = torch.cat([x, extra[i]], dim=1)
            x = block(x)
            skips.append(x)
        return skips[:-1], skips[-1]

    def decode(self, bottom, skips):
        """Decoder: (output, decoder features of each level, full resolution first)."""
        x = bottom
        feats = [None] * (self.levels - 1)
        for i in reversed(range(self.levels - 1)):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], dim=1))
            feats[i] = x
        return self.head(x), feats

    def forward(self, x):
        skips, bottom = self.encode(x)
        return self.decode(bottom, skips)[0]


#: Truncation level of the TKD input channel (the default of
#: :func:`qsmprep.qsm.inversion.tkd`).
TKD_THRESHOLD = 0.15

#: Channels of the network input (:func:`normalised_inputs`): local field,
#: mask, three B0-direction channels, TKD (or TV) estimate.
IN_CHANNELS = 6


def mask_rms(x, mask, floor=1e-6):
    """Root mean square of ``x`` over the mask voxels of each batch item,
    ``[B, 1, 1, 1, 1]`` (at least ``floor``)."""
    num = (x**2 * mask).sum(dim=(1, 2, 3, 4), keepdim=True)
    return (num / mask.sum(dim=(1, 2, 3, 4), keepdim=True).clamp(min=1)).sqrt().clamp(min=floor)


def field_inputs(local, mask, b0_dirs, voxel_size_mm=(1.0, 1.0, 1.0), tkd_threshold=TKD_THRESHOLD,
                 init_tv=None):
    """Model input ``[B, 7, X, Y, Z]``: local field (ppm), mask, the B0
    direction (voxel axes) as three channels constant inside the mask, a
    closed-form estimate of chi (ppm) from the masked local field, and its RMS
    over the mask (ppm, constant inside the mask: the input scale).

    The estimate is TKD (``tkd_threshold``) or, when ``init_tv`` is a dict of
    options of :func:`qsmprep.qsm.inversion.tv_admm`, TV-ADMM (the models'
    ``init_tv`` config, as NeXtQSM's variational network starts from TV).
    ``local`` and ``mask`` are ``[B, 1, X, Y, Z]``; ``b0_dirs`` is ``(3,)`` or
    ``(B, 3)`` (normalised here); ``voxel_size_mm`` ``(3,)`` or ``(B, 3)``.
    The estimate and the scale are computed here, on the whole volume
    given (true voxel size and B0 direction), so that tiled inference tiles
    channels computed once on the whole head.
    """
    b = torch.as_tensor(b0_dirs, dtype=local.dtype).reshape(-1, 3).to(local.device)
    b = b / b.norm(dim=1, keepdim=True)
    field = local * mask
    if init_tv is None:
        dipole = DipoleOperator(local.shape[-3:], np.asarray(voxel_size_mm, dtype=np.float64),
                                b.detach().cpu().double().numpy(), device=local.device)
        chi0 = dipole.tkd(field, tkd_threshold).to(local.dtype) * mask
    else:
        chi0 = tv_estimate(field, mask, b, voxel_size_mm, init_tv).to(local.dtype) * mask
    b = b.expand(local.shape[0], 3)[:, :, None, None, None] * mask
    return torch.cat([field, mask, b, chi0, mask_rms(chi0, mask) * mask], dim=1)


def tv_estimate(field, mask, b0_dirs, voxel_size_mm, options):
    """TV-ADMM chi (ppm, ``[B, 1, X, Y, Z]``) of each masked field of the batch:
    :func:`qsmprep.qsm.inversion.tv_admm` (the registry's ``tv``, on the
    mask's padded bounding box) with ``options``, on the field's device."""
    from ..qsm.inversion import tv_admm

    n = field.shape[0]
    dirs = np.broadcast_to(np.asarray(b0_dirs.detach().cpu(), np.float64).reshape(-1, 3), (n, 3))
    voxels = np.broadcast_to(np.asarray(voxel_size_mm, np.float64).reshape(-1, 3), (n, 3))
    device = field.device.type if field.device.type == "cpu" else str(field.device)
    out = [torch.from_numpy(np.ascontiguousarray(tv_admm(
        field[i, 0].detach().float().cpu().numpy(), mask[i, 0].detach().cpu().numpy() > 0,
        tuple(voxels[i]), b0_dir=tuple(dirs[i]), device=device, **options)))
        for i in range(n)]
    return torch.stack(out)[:, None].to(field.device)


def normalised_inputs(x):
    """The network's view of :func:`field_inputs` and the scale ``s``
    (``[B, 1, 1, 1, 1]``, ppm): field and chi estimate (TKD or TV) divided by
    ``s``, the RMS of the estimate. Dipole inversion is linear, so the networks
    work in units of ``s`` and multiply their output by it: a map with 3x the
    contrast gives exactly 3x the output (with a TKD channel; TV is nearly
    linear), and the low-contrast in-vivo brain is not corrected with the
    amplitude learned on high-contrast training patches.
    """
    s = x[:, 6:7].amax(dim=(2, 3, 4), keepdim=True).clamp(min=1e-6)
    return torch.cat([x[:, :1] / s, x[:, 1:5], x[:, 5:6] / s], dim=1), s


def normalised_mse(chi, chi_true, x):
    """Mean over the mask voxels of ``((chi - chi_true) / s)^2``, ``s`` the
    input scale of the :func:`field_inputs` ``x`` (:func:`normalised_inputs`),
    so that every sample counts alike in a loss, whatever its contrast."""
    mask = x[:, 1:2]
    s = normalised_inputs(x)[1]
    return (((chi - chi_true) / s) ** 2 * mask).sum() / mask.sum().clamp(min=1)


class UNetQSM(nn.Module):
    """Plain U-Net dipole inversion: :func:`field_inputs` -> chi (ppm).

    The baseline of the IR2QSM paper, trained on the same data. ``forward``
    takes the 7-channel input of :func:`field_inputs` and returns
    ``(TKD + s U-Net(input / s)) * mask`` (:func:`normalised_inputs`): the
    network learns a residual correction of the TKD channel in units of its
    RMS ``s``. Its output conv starts at zero, so the untrained model is
    exactly TKD. With ``config["init_tv"]`` (options of
    :func:`qsmprep.qsm.inversion.tv_admm`) the channel is TV-ADMM instead.
    """

    def __init__(self, config=None):
        super().__init__()
        self.config = {"base": 16, "levels": 4, "tkd_threshold": TKD_THRESHOLD, "init_tv": None,
                       **(config or {})}
        self.net = UNet(IN_CHANNELS, 1, base=self.config["base"], levels=self.config["levels"])
        nn.init.zeros_(self.net.head.weight)
        nn.init.zeros_(self.net.head.bias)

    @property
    def multiple(self):
        return self.net.multiple

    def forward(self, x):
        mask = x[:, 1:2]
        inp, s = normalised_inputs(x)
        return (x[:, 5:6] + self.net(inp) * s) * mask
