"""Simulation: head phantoms, forward model, multi-echo signal, hybrid training data.

See docs/simulation.md. Public names are imported lazily (``hybrid`` needs torch)::

    from qsmprep.sim import challenge_head, simulate_acquisition, HybridDataset
"""

from importlib import import_module

_EXPORTS = {
    "Phantom": "phantoms", "challenge_head": "phantoms", "mni_head": "phantoms",
    "resample": "phantoms", "crop": "phantoms", "LABELS": "phantoms",
    "total_field": "forward", "local_field": "forward", "shim": "forward",
    "multi_echo_signal": "signal",
    "Acquisition": "acquisition", "simulate_acquisition": "acquisition",
    "oblique_affine": "acquisition", "tilted_b0": "acquisition",
    "write_acquisition": "bids",
    "hybrid_sample": "hybrid", "HybridDataset": "hybrid",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
