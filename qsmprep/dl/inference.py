"""Device choice, padding and memory-bounded tiled inference.

One code path for CPU and CUDA: :func:`select_device` picks the
``torch.device`` once; :func:`pad_to_multiple` / :func:`crop` let a U-Net run
on volumes of any size; :func:`predict_tiled` runs a fully convolutional
network over overlapping tiles blended with a linear taper, for volumes that
do not fit in memory (used on CUDA out-of-memory and under a voxel cap).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

LOGGER = logging.getLogger("qsmprep.dl")

#: Largest volume (voxels) run in one piece on the CPU before tiling.
CPU_MAX_VOXELS = 256**3

#: Voxels of context kept around the brain mask's bounding box: the
#: feed-forward networks and DM-QSM run on that box, not on the whole image (a
#: whole-head image is 2-3 times the brain's box; their fields are zero
#: outside the mask anyway).
MASK_BOX_MARGIN = 8


def on_mask_box(compute, field, mask):
    """``compute(field, mask)`` (numpy volumes in, a volume of the same shape
    out) on ``mask``'s bounding box plus :data:`MASK_BOX_MARGIN` voxels,
    pasted into zeros of the input's shape."""
    from ..qsm.mask import bbox_slices

    box = bbox_slices(mask, margin=MASK_BOX_MARGIN)
    out = np.zeros(np.shape(mask), np.float32)
    out[box] = compute(field[box], mask[box])
    return out


def select_device(device="auto"):
    """The ``torch.device`` to run on.

    ``"auto"`` picks CUDA when available and otherwise falls back to the CPU
    with a log line; ``"cuda"`` without a GPU is an error.
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        LOGGER.info("No CUDA device available: running the network on the CPU")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was requested but no CUDA device is available")
    if name == "cpu" or name.startswith("cuda"):
        return torch.device(name)
    raise ValueError(f"Unknown device {device!r}: expected 'auto', 'cpu' or 'cuda'")


#: Numeric precisions of the networks' convolutions (training steps:
#: ``qsmprep-train --precision``; inference: the methods' ``precision``).
PRECISIONS = ("fp32", "bf16")


def bf16_supported(device):
    """Whether ``device`` runs bfloat16 convolutions natively (CPUs with
    AVX512-BF16 or AMX through oneDNN; CUDA GPUs from Ampere on)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision, device, strict=True):
    """``"fp32"`` or ``"bf16"`` for ``precision`` on ``device``.

    ``"auto"`` is ``"bf16"`` where :func:`bf16_supported`, else ``"fp32"``.
    ``"bf16"`` without native support is an error when ``strict`` (training),
    else float32 with a warning (inference: a more exact map, not a failed run).
    """
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and not bf16_supported(device):
        advice = (f"precision 'bf16' needs native bfloat16 on {torch.device(device)} "
                  f"(an AVX512-BF16/AMX CPU or an Ampere or later GPU)")
        if strict:
            raise ValueError(f"{advice}; use precision 'fp32'")
        LOGGER.warning("%s: running in float32 instead", advice)
        return "fp32"
    return precision


def autocast(precision, device):
    """Context for the networks' forward passes: bfloat16 autocast for
    ``"bf16"`` (convolutions in bfloat16; FFTs, losses and weights stay
    float32), nothing for ``"fp32"``."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")


def pad_to_multiple(x, multiple):
    """Zero-pad the last three axes of ``x`` (tensor, ``[..., X, Y, Z]``) up to a
    multiple of ``multiple``, data centred. Returns (padded, crop slices)."""
    sizes = x.shape[-3:]
    target = [int(np.ceil(n / multiple) * multiple) for n in sizes]
    before = [(t - n) // 2 for n, t in zip(sizes, target)]
    widths = []
    for b, n, t in reversed(list(zip(before, sizes, target))):
        widths += [b, t - n - b]
    crop = (Ellipsis,) + tuple(slice(b, b + n) for b, n in zip(before, sizes))
    return F.pad(x, widths), crop


def crop(x, slices):
    """Crop ``x`` back with the slices returned by :func:`pad_to_multiple`."""
    return x[slices]


def _taper(n, overlap):
    """1-D blending weights: linear ramps of ``overlap`` voxels at both ends."""
    w = np.ones(n, dtype=np.float32)
    if overlap > 0:
        ramp = (np.arange(overlap, dtype=np.float32) + 1) / (overlap + 1)
        w[:overlap] = ramp
        w[n - overlap:] = np.minimum(w[n - overlap:], ramp[::-1])
    return w


def tile_starts(n, tile, step):
    """Start indices of tiles of ``tile`` voxels, ``step`` apart, covering ``n``
    voxels (the last tile flush with the end; one tile at 0 when ``n <= tile``).
    Used by :func:`predict_tiled` and DM-QSM's patch grid."""
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, step)) + [n - tile]
    return sorted(set(starts))


def predict_tiled(fn, x, *, tile=96, overlap=24):
    """Apply a fully convolutional ``fn`` over overlapping tiles of ``x``.

    Parameters
    ----------
    fn : callable
        Maps a ``[B, C, x, y, z]`` tensor to ``[B, C', x, y, z]`` (same size).
    x : torch.Tensor
        ``[B, C, X, Y, Z]`` input.
    tile : int
        Tile edge (voxels); a multiple of the network's size multiple.
    overlap : int
        Overlap between neighbouring tiles (voxels); outputs are blended with
        linear ramps over the overlap, so seams vanish when ``overlap`` covers
        the network's effective receptive field.

    Returns
    -------
    torch.Tensor ``[B, C', X, Y, Z]`` on ``x``'s device.
    """
    if overlap >= tile:
        raise ValueError(f"overlap ({overlap}) must be smaller than tile ({tile})")
    shape = x.shape[-3:]
    sizes = [min(tile, n) for n in shape]
    out = weight = None
    grids = [tile_starts(n, t, tile - overlap) for n, t in zip(shape, sizes)]
    for i in grids[0]:
        for j in grids[1]:
            for k in grids[2]:
                sl = (Ellipsis, slice(i, i + sizes[0]), slice(j, j + sizes[1]),
                      slice(k, k + sizes[2]))
                y = fn(x[sl])
                w = torch.from_numpy(np.einsum(
                    "i,j,k->ijk",
                    *[_taper(t, overlap if t < n else 0) for t, n in zip(sizes, shape)],
                )).to(y.device, y.dtype)
                if out is None:
                    out = y.new_zeros(y.shape[:2] + tuple(shape))
                    weight = y.new_zeros(tuple(shape))
                out[sl] += y * w
                weight[sl[1:]] += w
    return out / weight


def run_network(model_fn, x, *, multiple, max_voxels=None, tile=96, overlap=24):
    """Run a network on ``x`` (``[B, C, X, Y, Z]``) padded to ``multiple``,
    whole when it fits, else with its convolutional parts tiled.

    ``model_fn(xp, apply)`` computes the output from the padded input, calling
    ``apply(net, inp)`` for each fully convolutional sub-network: ``apply``
    runs it on the whole volume or over tiles (:func:`predict_tiled`), so
    global operators (the dipole data term) always see the whole volume.
    Tiles are used when the padded volume has more than ``max_voxels`` voxels
    (default :data:`CPU_MAX_VOXELS` on the CPU, unlimited on CUDA) or when
    CUDA runs out of memory. The output is cropped back to ``x``'s size.
    """
    xp, sl = pad_to_multiple(x, multiple)
    if max_voxels is None and x.device.type == "cpu":
        max_voxels = CPU_MAX_VOXELS
    tile = int(np.ceil(tile / multiple) * multiple)

    def whole(net, inp):
        return net(inp)

    def tiled(net, inp):
        return predict_tiled(net, inp, tile=tile, overlap=overlap)

    if max_voxels is not None and np.prod(xp.shape[-3:]) > max_voxels:
        LOGGER.info("Volume %s exceeds %d voxels: tiled inference (%d^3, overlap %d)",
                    tuple(x.shape[-3:]), max_voxels, tile, overlap)
        return crop(model_fn(xp, tiled), sl)
    try:
        return crop(model_fn(xp, whole), sl)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        LOGGER.info("CUDA out of memory on %s: tiled inference (%d^3, overlap %d)",
                    tuple(x.shape[-3:]), tile, overlap)
        return crop(model_fn(xp, tiled), sl)


def to_tensor(array, device):
    """A numpy volume ``[X, Y, Z]`` as a float32 ``[1, 1, X, Y, Z]`` tensor."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)


def to_numpy(tensor):
    """A ``[1, 1, X, Y, Z]`` tensor as a float32 numpy volume."""
    return tensor[0, 0].detach().cpu().numpy().astype(np.float32)
