"""ROMEO phase unwrapping (Dymerska et al. 2021) and its phase-quality mask.

ROMEO grows the unwrapped region along the most reliable edges first. Each
voxel has three forward edges; an edge's weight is
the product of ``0.1 + 0.9 f`` over the enabled coherence factors ``f``, and is
quantised into 256 bins (1 = best, 255 = worst, 0 = invalid, never queued).
Phase linearity (the wrapped second differences on both sides of the edge, a
ROMEO.jl weight) keeps the growth off strongly curved phase, where a true step
near 2 pi can hide: it wraps to a small step in every echo whose TE is a
multiple of TE1, so the coherence factors rate it as good.
A bucket queue pops the best edge and unwraps its unvisited end against the
visited one. The hot loops are compiled with numba.

References
----------
Dymerska B, Eckstein K, Bachrata B, et al. Phase unwrapping with a rapid
opensource minimum spanning tree algorithm (ROMEO). Magn Reson Med
2021;85:2294-2308.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .units import check_echo_times_s

TWO_PI = 2 * np.pi

WEIGHTS = (
    "phase_coherence",
    "phase_gradient_coherence",
    "phase_linearity",
    "magnitude_coherence",
    "magnitude_weight",
)

_NBINS = 256
_RELIABLE_QUALITY = 0.3  # voxels above this quality vote in the global 2 pi correction


# --------------------------------------------------------------------------
# compiled kernels
# --------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _wrap(x):
    return x - 2 * np.pi * np.round(x / (2 * np.pi))


@njit(cache=True, inline="always")
def _linearity(a, b, c):
    """``max(0, 1 - |wrap(a - 2 b + c)| / 2)`` for three consecutive phases."""
    return max(0.0, 1.0 - abs(_wrap(a - 2.0 * b + c)) / 2.0)


@njit(cache=True, inline="always")
def _edge_weight(i, j, h, k, phase, phase2, mag, te_ratio, maxmag, use):
    """Weight in [0, 1] of edge ``i -> j``: product of ``0.1 + 0.9 f`` over the
    enabled factors. ``h = i - (j - i)`` and ``k = j + (j - i)`` are the voxels
    before and after the edge on its line (-1 where missing or invalid)."""
    dp = _wrap(phase[j] - phase[i])
    w = 1.0
    if use[0]:  # phase coherence
        w *= 0.1 + 0.9 * (1.0 - abs(dp) / np.pi)
    if use[1]:  # phase-gradient coherence with a second echo
        dp2 = _wrap(phase2[j] - phase2[i]) * te_ratio
        w *= 0.1 + 0.9 * max(0.0, 1.0 - abs(dp - dp2))
    if use[2]:  # phase linearity: geometric mean of both sides; 0.9 at the border
        lin = 0.9
        if h >= 0 and k >= 0:
            lin = np.sqrt(_linearity(phase[h], phase[i], phase[j])
                          * _linearity(phase[i], phase[j], phase[k]))
        w *= 0.1 + 0.9 * lin
    if use[3] or use[4]:
        small = min(mag[i], mag[j])
        big = max(mag[i], mag[j])
        if use[3]:  # magnitude coherence
            w *= 0.1 + 0.9 * ((small / big) ** 2 if big > 0 else 0.0)
        if use[4]:  # magnitude weight
            w *= 0.1 + 0.9 * (0.5 + 0.5 * min(1.0, small / (0.5 * maxmag)))
    return w


@njit(cache=True, inline="always")
def _to_bin(w):
    """Quantise a weight: 1 (best) .. 255 (worst); 0 is kept for invalid edges."""
    return max(np.int64(np.round((1.0 - w) * (_NBINS - 1))), 1)


@njit(cache=True, inline="always")
def _line_voxel(i, stride, pos, n, valid):
    """Index ``i + stride`` if ``0 <= pos < n`` and it is valid, else -1."""
    if pos < 0 or pos >= n:
        return -1
    j = i + stride
    return j if valid[j] else -1


@njit(cache=True, parallel=True)
def _edge_bins(phase, phase2, mag, valid, shape, te_ratio, maxmag, use):
    """Quantised weights of the 3 forward edges of every voxel, at ``4 * v + d``.

    Byte ``4 * v + 3`` is left 0 for the visited flag of :func:`_grow`.

    ``use`` = (phase coherence, gradient coherence, phase linearity, magnitude
    coherence, magnitude weight) flags; ``phase2``/``mag`` may be empty when
    unused.
    """
    nx, ny, nz = shape[0], shape[1], shape[2]
    sx, sy = ny * nz, nz
    bins = np.zeros(4 * nx * ny * nz, dtype=np.uint8)
    for x in prange(nx):
        for y in range(ny):
            for z in range(nz):
                i = (x * ny + y) * nz + z
                if not valid[i]:
                    continue
                j = i + sx
                if x + 1 < nx and valid[j]:
                    h = _line_voxel(i, -sx, x - 1, nx, valid)
                    k = _line_voxel(j, sx, x + 2, nx, valid)
                    bins[4 * i] = _to_bin(
                        _edge_weight(i, j, h, k, phase, phase2, mag, te_ratio, maxmag, use))
                j = i + sy
                if y + 1 < ny and valid[j]:
                    h = _line_voxel(i, -sy, y - 1, ny, valid)
                    k = _line_voxel(j, sy, y + 2, ny, valid)
                    bins[4 * i + 1] = _to_bin(
                        _edge_weight(i, j, h, k, phase, phase2, mag, te_ratio, maxmag, use))
                j = i + 1
                if z + 1 < nz and valid[j]:
                    h = _line_voxel(i, -1, z - 1, nz, valid)
                    k = _line_voxel(j, 1, z + 2, nz, valid)
                    bins[4 * i + 2] = _to_bin(
                        _edge_weight(i, j, h, k, phase, phase2, mag, te_ratio, maxmag, use))
    return bins


@njit(cache=True)
def _voxel_score(bins, shape):
    """Integer voxel score: sum of (255 - bin + 1) over the valid incident edges."""
    n = shape[0] * shape[1] * shape[2]
    strides = (shape[1] * shape[2], shape[2], 1)
    score = np.zeros(n, dtype=np.int32)
    for i in range(n):
        for d in range(3):
            b = bins[4 * i + d]
            if b:
                s = 256 - b
                score[i] += s
                score[i + strides[d]] += s
    return score


@njit(cache=True)
def _seed_order(score):
    """Voxels with a positive score, best first (counting sort, O(N))."""
    top = score.max()
    counts = np.zeros(top + 2, dtype=np.int64)
    for s in score:
        counts[s] += 1
    start = np.zeros(top + 2, dtype=np.int64)  # descending: best score first
    acc = 0
    for s in range(top, 0, -1):
        start[s] = acc
        acc += counts[s]
    order = np.empty(acc, dtype=np.int32)
    for i in range(score.size):
        s = score[i]
        if s > 0:
            order[start[s]] = i
            start[s] += 1
    return order


_BLOCK = 4096  # queue entries per block of a bin's stack


@njit(cache=True)
def _grow(phase, state, order, shape):
    """Region-growing unwrap of flat ``phase`` in place; returns region labels.

    ``state`` holds 4 bytes per voxel: the bins of its 3 forward edges and a
    visited flag (byte 3, set here). The bucket queue keeps one LIFO stack per
    bin, built from fixed-size blocks of a shared pool recycled through a free
    list, so pushes and pops stay sequential in memory (untouched pool pages
    are never allocated). A queue entry ``6 * new + k`` names the voxel to
    unwrap and the direction ``k`` of its already unwrapped neighbour.
    """
    sx, sy = shape[1] * shape[2], shape[2]
    step = np.array([sx, sy, 1, -sx, -sy, -1], dtype=np.int64)  # new -> old
    n = shape[0] * shape[1] * shape[2]
    n_blocks = (6 * n) // _BLOCK + _NBINS + 1
    pool = np.empty(n_blocks * _BLOCK, dtype=np.int32)
    top = np.full(_NBINS, -1, dtype=np.int64)  # current block of each bin
    fill = np.zeros(_NBINS, dtype=np.int64)  # entries in that block
    below = np.empty(n_blocks, dtype=np.int64)  # the (full) block under it
    free = np.arange(n_blocks)[::-1].copy()
    n_free = n_blocks
    region = np.zeros(n, dtype=np.int32)
    two_pi = 2 * np.pi
    label = 0
    for seed in order:
        if state[4 * seed + 3]:
            continue
        label += 1
        state[4 * seed + 3] = 1
        region[seed] = label
        v = seed
        cur = _NBINS
        while True:
            # queue the edges from v to its unvisited neighbours
            for k in range(6):
                if k < 3:  # forward edge v -> w, stored at v
                    w = v + step[k]
                    b = state[4 * v + k]
                    if b == 0 or state[4 * w + 3]:
                        continue
                    entry = 6 * w + k + 3
                else:  # backward edge w -> v, stored at w
                    w = v - step[k - 3]
                    if w < 0:
                        continue
                    b = state[4 * w + k - 3]
                    if b == 0 or state[4 * w + 3]:
                        continue
                    entry = 6 * w + k - 3
                blk = top[b]
                if blk < 0 or fill[b] == _BLOCK:
                    n_free -= 1
                    below[free[n_free]] = blk
                    blk = top[b] = free[n_free]
                    fill[b] = 0
                pool[blk * _BLOCK + fill[b]] = entry
                fill[b] += 1
                cur = min(cur, b)
            # pop the best entry whose voxel is still unvisited
            new = -1
            while cur < _NBINS:
                blk = top[cur]
                if blk < 0:
                    cur += 1
                    continue
                fill[cur] -= 1
                entry = pool[blk * _BLOCK + fill[cur]]
                if fill[cur] == 0:
                    free[n_free] = blk
                    n_free += 1
                    top[cur] = below[blk]
                    fill[cur] = _BLOCK if below[blk] >= 0 else 0
                if not state[4 * (entry // 6) + 3]:
                    new = entry // 6
                    break
            if new < 0:
                break
            old = new + step[entry - 6 * new]
            phase[new] -= two_pi * np.round((phase[new] - phase[old]) / two_pi)
            state[4 * new + 3] = 1
            region[new] = label
            v = new
    return region


@njit(cache=True)
def _region_medians(k, region, reliable, nreg):
    """Lower median of the integers ``k`` within each region label 1..nreg.

    Only ``reliable`` voxels count, except in regions that have none.
    """
    n_reliable = np.zeros(nreg + 1, dtype=np.int64)
    for i in range(k.size):
        if reliable[i]:
            n_reliable[region[i]] += 1
    lo = np.full(nreg + 1, np.iinfo(np.int32).max, dtype=np.int64)
    hi = np.full(nreg + 1, np.iinfo(np.int32).min, dtype=np.int64)
    cnt = np.zeros(nreg + 1, dtype=np.int64)
    for i in range(k.size):
        r = region[i]
        if r and (reliable[i] or n_reliable[r] == 0):
            lo[r] = min(lo[r], k[i])
            hi[r] = max(hi[r], k[i])
            cnt[r] += 1
    offs = np.zeros(nreg + 2, dtype=np.int64)
    for r in range(1, nreg + 1):
        offs[r + 1] = offs[r] + (hi[r] - lo[r] + 1 if cnt[r] else 0)
    hist = np.zeros(offs[nreg + 1], dtype=np.int64)
    for i in range(k.size):
        r = region[i]
        if r and (reliable[i] or n_reliable[r] == 0):
            hist[offs[r] + k[i] - lo[r]] += 1
    med = np.zeros(nreg + 1, dtype=np.int64)
    for r in range(1, nreg + 1):
        acc = 0
        for b in range(offs[r], offs[r + 1]):
            acc += hist[b]
            if 2 * acc >= cnt[r]:
                med[r] = lo[r] + b - offs[r]
                break
    return med


# --------------------------------------------------------------------------
# ROMEO
# --------------------------------------------------------------------------
def _spatial_unwrap(phase, phase2, mag, valid, te_ratio, maxmag, use):
    """Unwrap one contiguous 3-D echo; returns (unwrapped, region, score)."""
    shape = np.array(phase.shape, dtype=np.int64)
    empty = np.zeros(0, dtype=np.float32)
    bins = _edge_bins(
        phase.ravel(),
        empty if phase2 is None else phase2.ravel(),
        empty if mag is None else mag.ravel(),
        valid.ravel(),
        shape,
        float(te_ratio),
        float(maxmag),
        np.array(use, dtype=np.bool_),
    )
    score = _voxel_score(bins, shape)
    flat = phase.ravel()  # a private contiguous copy: unwrapped in place
    region = _grow(flat, bins, _seed_order(score), shape)
    return phase, region, score


def _correct_regions(phase, reference, region, reliable, nreg):
    """``phase - 2 pi median(round((phase - reference) / 2 pi))`` in each region,
    the median taken over its ``reliable`` voxels."""
    k = np.rint((phase - reference) / TWO_PI).astype(np.int64).reshape(-1)
    med = _region_medians(k, region, reliable, nreg).astype(np.float32)
    return phase - np.float32(TWO_PI) * med[region].reshape(phase.shape)


def _temporal_unwrap(out, echo_times_s, template):
    """Unwrap echoes in time against their neighbour echo, outward from ``template``."""
    n = out.shape[-1]
    pairs = [(e, e - 1) for e in range(template + 1, n)]
    pairs += [(e, e + 1) for e in range(template - 1, -1, -1)]
    for e, ref in pairs:
        predicted = out[..., ref] * np.float32(echo_times_s[e] / echo_times_s[ref])
        out[..., e] -= np.float32(TWO_PI) * np.rint((out[..., e] - predicted) / TWO_PI)


def romeo_unwrap(
    phase,
    *,
    magnitude=None,
    echo_times_s=None,
    mask=None,
    mode="template",
    template_echo=0,
    weights=WEIGHTS,
    correct_global=True,
):
    """ROMEO phase unwrapping (Dymerska et al., MRM 2021;85:2294).

    Parameters
    ----------
    phase : array (X, Y, Z) or (X, Y, Z, E)
        Wrapped phase in rad, echoes on the last axis. NaN/inf voxels are
        invalid: never queued, returned as 0 with quality 0.
    magnitude : array like ``phase``, optional
        Magnitude; enables the magnitude weights.
    echo_times_s : sequence of float, optional
        Echo times in s; required for more than one echo.
    mask : bool array (X, Y, Z), optional
        Voxels to unwrap (default: all finite voxels). Outside it the phase
        is returned wrapped.
    mode : {"template", "individual"}
        ``template``: unwrap ``template_echo`` in space and the other echoes
        in time against their neighbour echo, ``phi_e -= 2 pi round((phi_e -
        phi_ref TE_e / TE_ref) / 2 pi)``. ``individual``: unwrap every echo in
        space, then remove each echo's 2 pi offset against the template.
    template_echo : int
        Index (0-based) of the template echo.
    weights : sequence of str
        Enabled edge-weight factors, a subset of :data:`WEIGHTS`. Factors that
        need missing data (second echo, magnitude) are skipped.
    correct_global : bool
        Subtract ``2 pi median(round(phi / 2 pi))`` within each connected
        region, so that the unwrapped phase lies near the wrapped range. The
        median is over the region's voxels of quality > 0.3 (all of them if
        none), so that unwrapped background noise does not bias it; where
        noise fills most of the volume, pass a ``mask``.

    Returns
    -------
    unwrapped : float32 array like ``phase``
        Unwrapped phase (rad); ``unwrapped - phase`` is a multiple of 2 pi
        at every valid voxel.
    quality : float32 array (X, Y, Z)
        Voxel quality in [0, 1]: mean weight of the six incident edges of the
        template echo (0 outside the mask and at invalid voxels).
    """
    phase = np.asarray(phase)
    if phase.ndim not in (3, 4):
        raise ValueError(f"phase must be 3-D or 4-D (echoes last), got shape {phase.shape}")
    unknown = set(weights) - set(WEIGHTS)
    if unknown:
        raise ValueError(f"Unknown ROMEO weights {sorted(unknown)}; choose from {WEIGHTS}")
    if mode not in ("template", "individual"):
        raise ValueError(f"mode must be 'template' or 'individual', got {mode!r}")
    single = phase.ndim == 3
    out = np.array(phase[..., None] if single else phase, dtype=np.float32)  # wrapped, then unwrapped
    n_echo = out.shape[-1]
    mag = None if magnitude is None else np.asarray(magnitude, dtype=np.float32).reshape(out.shape)
    if echo_times_s is None:
        if n_echo > 1:
            raise ValueError("echo_times_s (s) are required to unwrap more than one echo")
        echo_times_s = (1.0,)  # any: a single echo is unwrapped in space only
    else:
        check_echo_times_s(echo_times_s)
    te = np.asarray(echo_times_s, dtype=np.float64).reshape(-1)
    if te.size != n_echo:
        raise ValueError(f"Got {te.size} echo times for {n_echo} echoes")
    if not 0 <= template_echo < n_echo:
        raise ValueError(f"template_echo={template_echo} out of range for {n_echo} echoes")

    valid = np.isfinite(out).all(axis=-1)
    if mag is not None:
        valid &= np.isfinite(mag).all(axis=-1)
    if mask is not None:
        valid &= np.asarray(mask, dtype=bool).reshape(valid.shape)
    out[~valid] = 0
    maxmag = 1.0
    if mag is not None and valid.any():
        maxmag = float(np.percentile(mag[..., template_echo][valid], 95)) or 1.0

    def unwrap_echo(e):
        # wrap(differences) are the same before and after unwrapping, so the
        # second echo may already be unwrapped in ``out``
        other = e + 1 if e + 1 < n_echo else e - 1
        use = (
            "phase_coherence" in weights,
            "phase_gradient_coherence" in weights and other >= 0,
            "phase_linearity" in weights,
            "magnitude_coherence" in weights and mag is not None,
            "magnitude_weight" in weights and mag is not None,
        )
        return _spatial_unwrap(
            np.ascontiguousarray(out[..., e]),
            np.ascontiguousarray(out[..., other]) if use[1] else None,
            np.ascontiguousarray(mag[..., e]) if mag is not None else None,
            valid,
            te[e] / te[other] if use[1] else 1.0,
            maxmag,
            use,
        )

    t = template_echo
    out[..., t], region, score = unwrap_echo(t)
    nreg = int(region.max())
    quality = (score / np.float32(6 * 255)).astype(np.float32)
    # background noise drifts freely: only good voxels vote on 2 pi offsets
    reliable = quality > _RELIABLE_QUALITY
    if correct_global:
        out[..., t] = _correct_regions(out[..., t], np.float32(0), region, reliable, nreg)
    if mode == "template":
        _temporal_unwrap(out, te, t)
    else:
        for e in range(n_echo):
            if e != t:
                out[..., e] = unwrap_echo(e)[0]
                predicted = out[..., t] * np.float32(te[e] / te[t])
                out[..., e] = _correct_regions(out[..., e], predicted, region, reliable, nreg)
    return (out[..., 0] if single else out), quality.reshape(valid.shape)


def quality_mask(quality, threshold=0.2):
    """Phase-quality mask: voxels whose ROMEO quality exceeds ``threshold``.

    ``quality`` is the map returned by :func:`romeo_unwrap` (0..1); typical
    thresholds are 0.1-0.3 (higher is stricter).
    """
    return np.asarray(quality) > threshold
