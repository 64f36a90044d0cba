"""IR2QSM: iterative reverse concatenations and recurrent modules.

Four U-Net iterations with separate weights. From the second iteration on,
the input of each encoder level is concatenated with the previous iteration's
decoder features at that scale ("reverse concatenation"); a convolutional GRU
cell in the bottleneck carries a hidden state across iterations. The final
map is a 1x1x1 convolution over the four iteration outputs and the
closed-form chi estimate of the input field. Training loss
(:func:`ir2qsm_loss`): MSE of the final map plus smaller weights on the
iteration outputs, decaying towards the first iteration. Inference is
deterministic (no noise injection).

Input: :func:`qsmprep.dl.unet.field_inputs` (local field ppm, mask, B0
direction channels, a closed-form estimate of chi: TKD, or TV-ADMM with
``config["init_tv"]`` as the shipped model); output chi (ppm). The published
network uses 16/32/64/128 filters (~10 M parameters); the default here is
sized for CPU training.

Deliberate deviation (physics-informed residual, as :class:`UNetQSM`): each
iteration outputs the estimate channel plus a learned correction, and the
final 1x1x1 conv fuses the four iteration outputs with the estimate instead
of the input field itself. The estimate is a fixed function of the input
field, so the fusion still sees the field, but in units of chi: the network
only has to learn the correction of a closed-form inversion (streaking,
truncated cone, over-smoothing) instead of the dipole inverse from scratch,
which a CPU training budget cannot reach. The output convs start at zero and
the fusion at the mean of the iterations, so the untrained network is
exactly its estimate channel.

Reference: Li M, Chen C, Wang Z, et al. Quantitative susceptibility mapping
via deep neural networks with iterative reverse concatenations and recurrent
modules. Med Phys 2025.
"""

from __future__ import annotations

import torch
from torch import nn

from .unet import IN_CHANNELS, TKD_THRESHOLD, UNet, normalised_inputs, normalised_mse

DEFAULT_CONFIG = {
    "base": 8,
    "levels": 4,
    "iterations": 4,
    "aux_weights": [0.0625, 0.125, 0.25, 0.5],
    "tkd_threshold": TKD_THRESHOLD,
    #: None: the estimate the network corrects is TKD; options of
    #: :func:`qsmprep.qsm.inversion.tv_admm`: TV-ADMM (:func:`field_inputs`)
    "init_tv": None,
}


class ConvGRUCell(nn.Module):
    """Convolutional gated recurrent unit (3x3x3 gates)."""

    def __init__(self, channels):
        super().__init__()
        self.gates = nn.Conv3d(2 * channels, 2 * channels, 3, padding=1)
        self.candidate = nn.Conv3d(2 * channels, channels, 3, padding=1)

    def forward(self, x, h=None):
        if h is None:
            h = torch.zeros_like(x)
        update, reset = torch.sigmoid(self.gates(torch.cat([x, h], dim=1))).chunk(2, dim=1)
        cand = torch.tanh(self.candidate(torch.cat([x, reset * h], dim=1)))
        return (1 - update) * h + update * cand


class IR2QSM(nn.Module):
    """IR2QSM network; ``forward`` takes the 7-channel :func:`field_inputs`
    and works in units of the estimate channel's RMS (:func:`normalised_inputs`)."""

    def __init__(self, config=None):
        super().__init__()
        self.config = {**DEFAULT_CONFIG, **(config or {})}
        c = self.config
        nets = []
        for t in range(c["iterations"]):
            probe = UNet(base=c["base"], levels=c["levels"])
            extra = None if t == 0 else probe.channels[:-1]
            nets.append(UNet(IN_CHANNELS + (t > 0), 1, base=c["base"], levels=c["levels"],
                             extra_channels=extra))
            nn.init.zeros_(nets[-1].head.weight)
            nn.init.zeros_(nets[-1].head.bias)
        self.iterations = nn.ModuleList(nets)
        self.gru = ConvGRUCell(nets[0].channels[-1])
        self.fuse = nn.Conv3d(c["iterations"] + 1, 1, 1)
        with torch.no_grad():  # start: the mean of the iterations (all TKD at init)
            self.fuse.weight.zero_()
            self.fuse.weight[0, : c["iterations"]] = 1.0 / c["iterations"]
            self.fuse.bias.zero_()

    @property
    def multiple(self):
        return self.iterations[0].multiple

    def forward(self, x, return_iterations=False):
        mask = x[:, 1:2]
        inp, s = normalised_inputs(x)
        estimate = inp[:, 5:6]  # the TKD or TV chi estimate, in units of s
        h = feats = None
        outs = []
        for t, net in enumerate(self.iterations):
            xin = inp if t == 0 else torch.cat([inp, outs[-1]], dim=1)
            skips, bottom = net.encode(xin, extra=None if feats is None else feats + [None])
            h = self.gru(bottom, h)
            out, feats = net.decode(h, skips)
            outs.append(estimate + out)
        chi = self.fuse(torch.cat(outs + [estimate], dim=1)) * s * mask
        if return_iterations:
            return chi, [o * s * mask for o in outs]
        return chi


def ir2qsm_loss(model, x, chi_true):
    """MSE(final) + sum_t w_t MSE(iteration t) inside the mask, each sample's
    error in units of its TKD channel's RMS (:func:`normalised_inputs`), so
    that every sample counts alike, whatever its contrast."""
    chi, outs = model(x, return_iterations=True)
    return normalised_mse(chi, chi_true, x) + sum(
        w * normalised_mse(o, chi_true, x) for w, o in zip(model.config["aux_weights"], outs))
