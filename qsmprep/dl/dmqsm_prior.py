"""The DM-QSM prior (:mod:`qsmprep.dl.dmqsm`): the score network and its
training pieces.

A small 3-D U-Net with a sinusoidal time embedding predicts the noise of
``x_t`` (DDPM epsilon-prediction; the discrete variance-preserving SDE),
trained by denoising score matching on chi patches only (:func:`dsm_loss`),
with a deterministic validation score (:func:`denoise_check`). Units: the
network works on ``chi / chi_scale_ppm``. Ho J, Jain A, Abbeel P. Denoising
diffusion probabilistic models. NeurIPS 2020.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CONFIG = {
    "base": 16,
    "levels": 3,
    "time_dim": 64,
    "groups": 8,
    "timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "chi_scale_ppm": 0.1,
}


# ---------------------------------------------------------------------------
# the score network


def timestep_embedding(t, dim):
    """Sinusoidal embedding ``[B, dim]`` of (float) timesteps ``t`` ``[B]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                         device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class TimeBlock(nn.Module):
    """Residual block: conv-GN-SiLU, + a per-channel bias from the time
    embedding, conv-GN-SiLU; a 1x1x1 skip when the width changes."""

    def __init__(self, cin, cout, time_dim, groups):
        super().__init__()
        g = math.gcd(groups, cout)
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm1 = nn.GroupNorm(g, cout)
        self.time = nn.Linear(time_dim, cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(g, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = F.silu(self.norm1(self.conv1(x)))
        h = h + self.time(emb)[:, :, None, None, None]
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class ScoreUNet(nn.Module):
    """The DM-QSM prior: a 3-D U-Net ``(x_t, t) -> epsilon`` (``[B, 1, X, Y, Z]``,
    ``t`` integer timesteps ``[B]``), with the DDPM noise schedule of its config
    (linear betas, ``timesteps`` steps) as buffers."""

    def __init__(self, config=None):
        super().__init__()
        self.config = {**DEFAULT_CONFIG, **(config or {})}
        c = self.config
        base, levels, tdim = c["base"], c["levels"], c["time_dim"]
        self.levels = levels
        chans = [base * 2**i for i in range(levels)]
        self.time_mlp = nn.Sequential(nn.Linear(tdim, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        cin = [1] + chans[:-1]
        self.down = nn.ModuleList(TimeBlock(a, b, tdim, c["groups"]) for a, b in zip(cin, chans))
        self.up = nn.ModuleList(nn.ConvTranspose3d(chans[i + 1], chans[i], 2, stride=2)
                                for i in range(levels - 1))
        self.dec = nn.ModuleList(TimeBlock(2 * chans[i], chans[i], tdim, c["groups"])
                                 for i in range(levels - 1))
        self.head = nn.Conv3d(base, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        betas = torch.linspace(c["beta_start"], c["beta_end"], c["timesteps"], dtype=torch.float64)
        self.register_buffer("alphas_bar", torch.cumprod(1 - betas, 0).float(), persistent=False)

    @property
    def multiple(self):
        """Spatial sizes must be multiples of this."""
        return 2 ** (self.levels - 1)

    def forward(self, x, t):
        emb = self.time_mlp(timestep_embedding(t, self.config["time_dim"]))
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = F.avg_pool3d(x, 2)
            x = block(x, emb)
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(self.levels - 1)):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], dim=1), emb)
        return self.head(x)


def q_sample(model, x0, t, noise):
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (the forward VP process)."""
    a = model.alphas_bar[t].view(-1, 1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def dsm_loss(model, chi_ppm, rng):
    """Denoising score matching (DDPM epsilon-prediction, Ho et al. 2020):
    mean squared error of the predicted noise at a uniform random timestep,
    on ``chi_ppm / chi_scale_ppm`` patches ``[B, 1, X, Y, Z]``. ``rng``: a
    numpy generator (timesteps and noise; the training loop restores it on
    resume)."""
    x0 = chi_ppm / model.config["chi_scale_ppm"]
    n = x0.shape[0]
    t = torch.from_numpy(rng.integers(0, model.config["timesteps"], size=n)).to(x0.device)
    noise = torch.from_numpy(rng.standard_normal(x0.shape, dtype=np.float32)).to(x0.device)
    return F.mse_loss(model(q_sample(model, x0, t, noise), t).float(), noise)


#: Timestep and noise seed of the validation denoising score (:func:`denoise_check`).
CHECK_T, CHECK_SEED = 200, 1234


def denoise_check(model, chi_ppm, t=CHECK_T, seed=CHECK_SEED):
    """The prior's one-step estimate ``x0_hat`` (ppm) of ``chi_ppm`` noised to
    timestep ``t`` with a fixed noise seed: a deterministic validation score
    of the network (its NRMSE to the truth; 0 noise would be trivial)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(chi_ppm.shape, generator=gen).to(chi_ppm.device)
    x0 = chi_ppm / model.config["chi_scale_ppm"]
    tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    a = model.alphas_bar[t]
    xt = q_sample(model, x0, tt, noise)
    eps = model(xt, tt).float()
    return (xt - (1 - a).sqrt() * eps) / a.sqrt() * model.config["chi_scale_ppm"]
