"""IR2QSM: iterative reverse concatenations and recurrent modules.

Four U-Net iterations with separate weights. From the second iteration on,
the input of each encoder level is concatenated with the previous iteration's
decoder features at that scale ("reverse concatenation"); a convolutional GRU
cell in the bottleneck carries a hidden state across iterations. The final
map is a 1x1x1 convolution over the four iteration outputs and the input
field. Training loss (:func:`ir2qsm_loss`): MSE of the final map plus
smaller weights on the iteration outputs, decaying towards the first
iteration. Inference is deterministic (no noise injection).

Input: :func:`qsmprep.dl.unet.field_inputs` (local field ppm, mask, B0
direction channels); output chi (ppm). The published network uses 16/32/64/128
filters (~10 M parameters); the default here is sized for CPU training.

Reference: Li M, Chen C, Wang Z, et al. Quantitative susceptibility mapping
via deep neural networks with iterative reverse concatenations and recurrent
modules. Med Phys 2025.
"""

from __future__ import annotations

import torch
from torch import nn

from .unet import UNet

DEFAULT_CONFIG = {
    "base": 8,
    "levels": 4,
    "iterations": 4,
    "aux_weights": [0.0625, 0.125, 0.25, 0.5],
    "local_scale_ppm": 0.05,
    "chi_scale_ppm": 0.1,
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
    """IR2QSM network; ``forward`` takes the 5-channel :func:`field_inputs`."""

    def __init__(self, config=None):
        super().__init__()
        self.config = {**DEFAULT_CONFIG, **(config or {})}
        c = self.config
        nets = []
        for t in range(c["iterations"]):
            probe = UNet(base=c["base"], levels=c["levels"])
            extra = None if t == 0 else probe.channels[:-1]
            nets.append(UNet(5 + (t > 0), 1, base=c["base"], levels=c["levels"],
                             extra_channels=extra))
        self.iterations = nn.ModuleList(nets)
        self.gru = ConvGRUCell(nets[0].channels[-1])
        self.fuse = nn.Conv3d(c["iterations"] + 1, 1, 1)

    @property
    def multiple(self):
        return self.iterations[0].multiple

    def forward(self, x, return_iterations=False):
        c = self.config
        mask = x[:, 1:2]
        inp = torch.cat([x[:, :1] / c["local_scale_ppm"], x[:, 1:]], dim=1)
        h = feats = None
        outs = []
        for t, net in enumerate(self.iterations):
            xin = inp if t == 0 else torch.cat([inp, outs[-1]], dim=1)
            skips, bottom = net.encode(xin, extra=None if feats is None else feats + [None])
            h = self.gru(bottom, h)
            out, feats = net.decode(h, skips)
            outs.append(out)
        chi = self.fuse(torch.cat(outs + [inp[:, :1]], dim=1)) * c["chi_scale_ppm"] * mask
        if return_iterations:
            return chi, [o * c["chi_scale_ppm"] * mask for o in outs]
        return chi


def ir2qsm_loss(model, x, chi_true):
    """MSE(final) + sum_t w_t MSE(iteration t) inside the mask (chi in units of
    the model's chi scale)."""
    chi, outs = model(x, return_iterations=True)
    mask = x[:, 1:2]
    s = model.config["chi_scale_ppm"]

    def mse(y):
        return (((y - chi_true) / s) ** 2 * mask).sum() / mask.sum().clamp(min=1)

    return mse(chi) + sum(w * mse(o) for w, o in zip(model.config["aux_weights"], outs))
