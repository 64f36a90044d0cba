"""Training and validation data: the simulator's hybrid samples.

Every sample comes from :func:`qsmprep.sim.hybrid.hybrid_sample`, a pure
function of ``(seed, index)`` built on the deformed Challenge 2.0 head and
synthetic shapes (the MNI head is never used for training). The training
stream of a run with seed ``s`` uses indices ``0, 1, 2, ...``; the fixed
validation set uses the held-out indices from :data:`VALIDATION_START` on.
"""

from __future__ import annotations

import numpy as np
import torch

from ..sim.hybrid import HybridDataset, hybrid_sample

#: First index of the held-out validation samples of a seed.
VALIDATION_START = 10**9

#: Validation patches of a run (the default of ``qsmprep-train --validation``).
VALIDATION_PATCHES = 8

#: Sample options per model. All four know the voxel size (NeXtQSM's dipole
#: data term; the TKD input channel of IR2QSM and the U-Net), so all train on
#: mildly anisotropic voxels. IR2QSM and the U-Net use 32^3 patches (batch 2
#: in the shipped run): a step is ~6x cheaper on the CPU than one 48^3 patch.
DATA = {
    "nextqsm": {"patch_size": 48, "voxel_size_range_mm": (0.85, 1.25)},
    "nextqsm-bfr": {"patch_size": 48, "voxel_size_range_mm": (0.85, 1.25)},
    "nextqsm-vn": {"patch_size": 48, "voxel_size_range_mm": (0.85, 1.25)},
    "ir2qsm": {"patch_size": 32, "voxel_size_range_mm": (0.85, 1.25)},
    "unet": {"patch_size": 32, "voxel_size_range_mm": (0.85, 1.25)},
    # DM-QSM's prior: chi patches cut from whole deformed heads (chi_patch_stream);
    # 32^3 on the CPU (the paper: 48^3), a step ~3.4x cheaper, sampling still on 48^3
    "dmqsm": {"patch_size": 32, "voxel_size_range_mm": (0.85, 1.25), "lesions": True},
}

#: DM-QSM's patches: cut with this stride from whole heads, those with more
#: than :data:`MAX_BACKGROUND` of background dropped (the paper's 30 and 80 %),
#: :data:`PATCHES_PER_HEAD` of them (in a random order) per simulated head.
PATCH_STRIDE, MAX_BACKGROUND, PATCHES_PER_HEAD = 30, 0.8, 64


#: Sample options that shape patches, not content: whole heads leave them out.
PATCH_OPTIONS = ("patch_size", "voxel_size_range_mm")


def sample_options(task_name, overrides=None):
    """The :func:`~qsmprep.sim.hybrid.hybrid_sample` options of a model's
    training data: :data:`DATA` updated by ``overrides`` (``qsmprep-train
    --data``, e.g. ``{"lesions": true}``)."""
    import inspect

    known = set(inspect.signature(hybrid_sample).parameters) - {"index", "seed"}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise ValueError(f"unknown sample option(s) {unknown} in --data; "
                         f"hybrid_sample takes {sorted(known)}")
    return {**DATA[task_name], **(overrides or {})}


def content_options(options):
    """``options`` without :data:`PATCH_OPTIONS`: those of the whole heads."""
    return {k: v for k, v in options.items() if k not in PATCH_OPTIONS}


def training_stream(seed, options, *, workers=1):
    """``start -> iterator`` over the hybrid samples ``start, start + 1, ...``,
    simulated by ``workers`` background processes (0: in this process).

    With one worker the order is exactly the index order, so a resumed run
    sees the same samples; with more, a batch may mix neighbouring indices.
    """
    def stream(start):
        data = HybridDataset(seed=seed, start=start, **options)
        if workers == 0:
            return iter(data)
        loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers,
                                             prefetch_factor=2, persistent_workers=False)
        return iter(loader)

    return stream


def chi_patches(mask, size, stride=PATCH_STRIDE, max_background=MAX_BACKGROUND):
    """Slices of the ``size``^3 patches of a volume cut with ``stride``
    whose background (``mask`` 0) is at most ``max_background`` of the patch."""
    mask = np.asarray(mask) > 0
    starts = [range(0, max(n - size, 0) + 1, stride) for n in mask.shape]
    out = []
    for i in starts[0]:
        for j in starts[1]:
            for k in starts[2]:
                sl = (slice(i, i + size), slice(j, j + size), slice(k, k + size))
                if mask[sl].shape == (size,) * 3 and mask[sl].mean() >= 1 - max_background:
                    out.append(sl)
    return out


class ChiPatchDataset(torch.utils.data.IterableDataset):
    """DM-QSM's training stream: position ``i`` is patch ``i % K`` (in a
    random order of the :func:`chi_patches`) of the whole deformed head
    ``hybrid_sample(start // K + i // K, patch_size=None)``, K =
    :data:`PATCHES_PER_HEAD`: a pure function of ``(seed, i)``, so a resumed
    run sees the same patches. Each item is a sample dict as
    :func:`~qsmprep.sim.hybrid.hybrid_sample` (fields cut too, unused)."""

    def __init__(self, seed=0, start=0, patch_size=32, **options):
        super().__init__()
        self.seed, self.start, self.size, self.options = seed, start, int(patch_size), options

    def head_patches(self, head):
        s = hybrid_sample(head, seed=self.seed, patch_size=None, **self.options)
        slices = chi_patches(s["mask"], self.size)
        rng = np.random.default_rng([self.seed, head, 30])
        order = rng.permutation(len(slices))
        if len(order) < PATCHES_PER_HEAD:
            order = np.resize(order, PATCHES_PER_HEAD)
        return s, [slices[k] for k in order[:PATCHES_PER_HEAD]]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        pos, cache = self.start + worker, (None, None)
        while True:
            head, j = divmod(pos, PATCHES_PER_HEAD)
            if cache[0] != head:
                cache = (head, self.head_patches(head))
            s, slices = cache[1]
            sl = slices[j]
            item = {k: np.ascontiguousarray(s[k][sl]) for k in
                    ("chi", "mask", "local_field", "total_field")}
            item.update(b0_dir=s["b0_dir"], voxel_size_mm=s["voxel_size_mm"],
                        index=np.int64(pos))
            yield item
            pos += workers


def chi_patch_stream(seed, options, *, workers=1):
    """``start -> iterator`` over :class:`ChiPatchDataset` (as
    :func:`training_stream`)."""
    def stream(start):
        data = ChiPatchDataset(seed=seed, start=start, **options)
        if workers == 0:
            return iter(data)
        return iter(torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers,
                                                prefetch_factor=2, persistent_workers=False))

    return stream


def validation_set(seed, options, n=VALIDATION_PATCHES):
    """The fixed validation samples (held-out indices of ``seed``)."""
    return [hybrid_sample(VALIDATION_START + i, seed=seed, **options) for i in range(n)]


#: First held-out index of the whole-head validation samples.
WHOLE_VALIDATION_START = VALIDATION_START + 10**6


def whole_validation_set(seed, n=2, voxel_size_mm=1.0, multiple=16, **sample_options):
    """Held-out *whole* deformed heads (1 mm, random B0 tilt), cropped to the
    brain's bounding box plus 6 voxels and zero-padded to ``multiple``.

    The networks train on patches but run on whole heads, where a correction
    learned on patches need not help (measured: a U-Net better than its TKD
    input on patches was worse on whole heads), so checkpoints are selected
    on these. Still the training anatomy (the Challenge head, deformed),
    never the MNI benchmark head. ``sample_options`` go to
    :func:`~qsmprep.sim.hybrid.hybrid_sample` (e.g. another texture model,
    ``benchmarks/training_data.py``).
    """
    from ..qsm.mask import bbox_slices

    out = []
    for i in range(n):
        s = hybrid_sample(WHOLE_VALIDATION_START + i, seed=seed, patch_size=None,
                          voxel_size_mm=voxel_size_mm, **sample_options)
        box = bbox_slices(s["mask"] > 0, margin=6)
        pads = [(0, -(sl.stop - sl.start) % multiple) for sl in box]
        for key in ("chi", "mask", "local_field", "total_field"):
            s[key] = np.pad(s[key][box], pads)
        out.append(s)
    return out
