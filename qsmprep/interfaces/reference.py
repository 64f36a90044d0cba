"""Nipype interfaces of the referencing step: the run's ventricular CSF core,
found once and used by every step that takes it, and the referencing itself."""

from __future__ import annotations

import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    isdefined, traits)

from ..utils.images import save_like
from ..utils.runinfo import logged_warnings
from .qsm import _ChiOutputSpec, _csf_region, _execution, _lazy_file, _load, _MethodInputSpec
from .qsm import _out, _voxel_size


class _CSFCoreInputSpec(BaseInterfaceInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="(X, Y, Z, E) magnitude")
    mask = File(exists=True, mandatory=True, desc="brain mask")
    echo_times_s = traits.List(traits.Float, desc="echo times (s) of the magnitude's echoes "
                               "(the candidates' R2* is checked with them)")
    params = traits.Dict(traits.Str, traits.Any, value={}, usedefault=True,
                         desc="keywords of qsmprep.qsm.reference.csf_mask (--referencing "
                         "csf's settings)")


class _CSFCoreOutputSpec(TraitedSpec):
    csf = File(exists=True, desc="the ventricular CSF core (uint8; empty when none found)")
    csf_note = traits.Str(desc="why no CSF was found; '' when it was")


class CSFCore(SimpleInterface):
    """The run's ventricular CSF core (:func:`qsmprep.qsm.reference.csf_mask`):
    found once, for TFI's CSF term, ``--referencing csf`` and the Chimap's
    ``ReferenceValues``."""

    input_spec = _CSFCoreInputSpec
    output_spec = _CSFCoreOutputSpec

    def _run_interface(self, runtime):
        from ..qsm.reference import csf_mask

        magnitude, _ = _load(self.inputs.magnitude)
        mask, ref = _load(self.inputs.mask, bool)
        te = list(self.inputs.echo_times_s) if isdefined(self.inputs.echo_times_s) else None
        csf, problem = csf_mask(magnitude, mask, _voxel_size(ref), echo_times_s=te,
                                **self.inputs.params)
        self._results["csf"] = save_like(csf, ref, _out("csf_core", runtime), np.uint8)
        self._results["csf_note"] = problem or ""
        return runtime


class _ReferenceInputSpec(_MethodInputSpec):
    chi = File(exists=True, mandatory=True, desc="ppm")
    mask = File(exists=True, mandatory=True)
    magnitude = File(exists=True, desc="(X, Y, Z, E) magnitude, for methods that find "
                     "the CSF in it")
    echo_times_s = traits.List(traits.Float, desc="echo times (s) of the magnitude's echoes")
    csf = File(exists=True, desc="the run's ventricular CSF core (CSFCore)")
    csf_note = traits.Str(desc="why ``csf`` is empty (CSFCore); '' when CSF was found")
    source = traits.Str("this run", usedefault=True,
                        desc="the run's file, named in the method's warnings")


class _ReferenceOutputSpec(_ChiOutputSpec):
    reference_values = traits.Dict(desc="chi's means over reference regions, for the sidecar")


class Reference(SimpleInterface):
    """Referencing with registry stage ``referencing``, and the written map's values over
    the common reference regions (:func:`qsmprep.qsm.reference.reference_values`):
    the CSF core is ``csf`` when given (found once for the run), else found here
    once, with the method's settings (:func:`~qsmprep.qsm.reference.csf_search_params`),
    for both the method and the values."""

    input_spec = _ReferenceInputSpec
    output_spec = _ReferenceOutputSpec

    def _run_interface(self, runtime):
        from ..qsm.reference import csf_mask, csf_search_params, reference_values

        chi, ref = _load(self.inputs.chi)
        mask, _ = _load(self.inputs.mask, bool)
        magnitude, vox = _lazy_file(self.inputs.magnitude), _voxel_size(ref)
        te = list(self.inputs.echo_times_s) if isdefined(self.inputs.echo_times_s) else None
        region = _csf_region(self.inputs)   # the run's (core, problem), or None
        if region is not None:
            region = region.get()
        elif magnitude is not None:         # not given: one search, with the method's settings
            region = csf_mask(magnitude.get(), mask, vox, echo_times_s=te,
                              **csf_search_params(self.inputs.method, self.inputs.params))
        with logged_warnings() as warnings:
            out = _execution(self.inputs, limit_threads=False).run(
                "referencing", self.inputs.method, chi, mask, params=self.inputs.params,
                context={"voxel_size_mm": vox, "magnitude": magnitude, "echo_times_s": te,
                         "csf_region": region,
                         "source": self.inputs.source})
        out = np.where(mask, out, 0)
        self._results["reference_values"] = reference_values(out, mask, region)
        self._results["warnings"] = warnings
        self._results["chi"] = save_like(out, ref, _out("chi_ref_ppm", runtime))
        return runtime
