"""Deep-learning QSM methods (PyTorch): networks, inference, weights registry."""

import copy

#: Registry names of the learned methods (``bf_removal`` and/or ``inversion``),
#: one per shipped model (:data:`qsmprep.dl.methods.MODELS`); here, so that
#: input checks need not import torch.
LEARNED_METHODS = ("nextqsm", "ir2qsm", "unet", "dmqsm")

#: Voxel sizes (mm, every axis) on which the shipped networks were trained
#: (0.85-1.25 mm, ``qsmprep.train.data.DATA``) or measured against a ground
#: truth (1 and 2 mm heads, ``benchmarks/accuracy.py``). Outside it their maps
#: are unvalidated: qsmprep warns and suggests ``--pipeline classical``.
VALIDATED_VOXEL_SIZE_MM = (0.8, 2.1)


def merge_config(default, config):
    """``default`` updated (recursively) by ``config``: a model's architecture
    (its defaults, or the one saved in weights) with ``--config`` overrides."""
    out = copy.deepcopy(default)
    for key, value in (config or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out
