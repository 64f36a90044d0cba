"""Pure-array QSM physics: no Nipype, no file I/O.

Every function takes and returns numpy arrays with explicit units (phase in
rad, time in s, field in Hz or ppm, chi in ppm) and voxel sizes in mm, so it
can be used directly from Python::

    from qsmprep.qsm import romeo_unwrap, romeo_b0
"""

from importlib import import_module

# public name -> submodule; imported lazily so that a missing optional piece
# never breaks ``import qsmprep.qsm``.
_EXPORTS = {
    "GAMMA_BAR_MHZ_PER_T": "units",
    "hz_to_ppm": "units",
    "ppm_to_hz": "units",
    "phase_to_ppm": "units",
    "rescale_phase": "units",
    "b0_dir_from_affine": "units",
    "dipole_kernel": "kernels",
    "dipole_convolve": "kernels",
    "smv_kernel": "kernels",
    "sphere_field": "kernels",
    "romeo_unwrap": "romeo",
    "laplacian_unwrap": "unwrap",
    "mcpc3ds": "unwrap",
    "romeo_b0": "echo",
    "weighted_echo_fit": "echo",
    "nrmse": "metrics",
    "nrmse_detrend": "metrics",
    "hfen": "metrics",
    "xsim": "metrics",
    "correlation": "metrics",
    "coverage": "metrics",
    "region_metrics": "metrics",
    "score": "metrics",
    "quality_mask": "romeo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
