"""Thin Nipype interfaces over the pure QSM functions.

Each interface reads its NIfTI inputs, makes one call into
:mod:`qsmprep.qsm` (a registry method through
:class:`qsmprep.execution.Execution`, or one named function) and writes the
result with the geometry of its input. How a method runs (device, tiling
under ``--mem``, threads, the context keywords it takes, the CPU fallback on
CUDA out-of-memory) is decided in :mod:`qsmprep.execution`, not here, so the
physics stays testable without Nipype.
"""

from __future__ import annotations

import os

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    isdefined, traits)

from ..qsm import registry
from ..execution import DL_BYTES_PER_VOXEL, Execution, Lazy, max_voxels_for  # noqa: F401
from ..utils.images import load_echoes, save_like
from ..utils.runinfo import logged_warnings


class _MethodInputSpec(BaseInterfaceInputSpec):
    method = traits.Str(mandatory=True, desc="method name in the registry")
    params = traits.Dict(traits.Str, traits.Any, value={}, usedefault=True,
                         desc="parameters overriding the method's defaults")
    num_threads = traits.Int(1, usedefault=True, desc="threads for this step")
    device = traits.Str("cpu", usedefault=True, desc="torch device for methods that take one")
    mem_gb = traits.Float(0.0, usedefault=True,
                          desc="memory for this step (GB, --mem); 0: no limit given")


def _execution(inputs, limit_threads=True):
    """The :class:`~qsmprep.execution.Execution` of a method interface's inputs
    (``limit_threads=False``: the thread pools are left as they are)."""
    return Execution(device=inputs.device, mem_gb=inputs.mem_gb,
                     num_threads=inputs.num_threads if limit_threads else None)


def _lazy_file(path, read=None):
    """A :class:`~qsmprep.execution.Lazy` reading an optional file only when the
    method takes it (None when the file is not given)."""
    if not isdefined(path) or path is None:
        return None
    return Lazy(lambda: read(path) if read else _load(path)[0])


def _out(stem, runtime):
    """Path of the work image ``stem`` in the node's folder, uncompressed (``.nii``):
    gzip took 5 s per 4-D phase image of a 1 mm head and saved 10-35 % (rule R26-2,
    docs/methods.md "Time and memory"); the data sinks compress the derivatives."""
    return os.path.join(runtime.cwd, f"{stem}.nii")


def _load(path, dtype=np.float32):
    img = nb.load(path)
    return np.asanyarray(img.dataobj, dtype=dtype), img


def _voxel_size(img):
    from ..qsm.units import voxel_size_from_affine

    return voxel_size_from_affine(img.affine)


class _LoadEchoesInputSpec(BaseInterfaceInputSpec):
    magnitude = traits.List(File(exists=True), mandatory=True)
    magnitude_echo_times_s = traits.List(traits.Float, mandatory=True, desc="s, file order")
    phase = traits.List(File(exists=True), mandatory=True)
    echo_times_s = traits.List(traits.Float, mandatory=True, desc="s, file order")
    phase_units = traits.Enum(None, "rad", "arbitrary", usedefault=True)
    complex_parts = traits.Bool(False, usedefault=True,
                                desc="magnitude/phase are the part-real/part-imag files")


class _LoadEchoesOutputSpec(TraitedSpec):
    magnitude = File(exists=True, desc="(X, Y, Z, E) magnitude, echoes by echo time")
    phase = File(exists=True, desc="(X, Y, Z, E) phase in rad, echoes by echo time")
    valid = File(exists=True, desc="voxels finite in every input")
    echo_times_s = traits.List(traits.Float, desc="s, sorted")
    phase_units = traits.Str(desc="units applied to the stored phase")
    phase_scaling = traits.Dict(desc="how the stored phase became rad (see "
                                "qsmprep.utils.images.interpret_phase)")


class LoadEchoes(SimpleInterface):
    """Stack echoes by echo time, phase to rad, NaN/Inf to 0
    (:func:`qsmprep.utils.images.load_echoes`).

    Real and imaginary parts (``complex_parts``) become magnitude and phase;
    without magnitude files (phase-only) the magnitude is 1 everywhere.
    """

    input_spec = _LoadEchoesInputSpec
    output_spec = _LoadEchoesOutputSpec

    def _run_interface(self, runtime):
        mag, phase, valid, tes, ref, record = load_echoes(
            self.inputs.phase, self.inputs.echo_times_s, self.inputs.magnitude,
            self.inputs.magnitude_echo_times_s, phase_units=self.inputs.phase_units,
            complex_parts=self.inputs.complex_parts)
        units = record["units"]
        self._results.update(
            magnitude=save_like(mag, ref, _out("magnitude", runtime)),
            phase=save_like(phase, ref, _out("phase", runtime)),
            valid=save_like(valid, ref, _out("valid", runtime), dtype=np.uint8),
            echo_times_s=tes,
            phase_units=units,
            phase_scaling=record,
        )
        return runtime


class _PhaseOffsetInputSpec(BaseInterfaceInputSpec):
    phase = File(exists=True, mandatory=True, desc="(X, Y, Z, E) phase, rad")
    magnitude = File(exists=True, mandatory=True)
    echo_times_s = traits.List(traits.Float, mandatory=True, desc="s")
    params = traits.Dict(traits.Str, traits.Any, value={}, usedefault=True,
                         desc="keyword arguments of mcpc3ds, e.g. sigma_mm")


class _PhaseOffsetOutputSpec(TraitedSpec):
    phase = File(exists=True, desc="(X, Y, Z, E) phase without the echo-independent offset")
    offset = File(exists=True, desc="the removed phase offset, rad")


class PhaseOffset(SimpleInterface):
    """Echo-independent phase offset removal: :func:`qsmprep.qsm.unwrap.mcpc3ds`
    (needs two echoes or more)."""

    input_spec = _PhaseOffsetInputSpec
    output_spec = _PhaseOffsetOutputSpec

    def _run_interface(self, runtime):
        from ..qsm.unwrap import mcpc3ds

        phase, ref = _load(self.inputs.phase)
        mag, _ = _load(self.inputs.magnitude)
        corrected, offset = mcpc3ds(phase, mag, list(self.inputs.echo_times_s),
                                    voxel_size_mm=_voxel_size(ref), **self.inputs.params)
        self._results.update(
            phase=save_like(corrected, ref, _out("phase_mcpc3ds", runtime)),
            offset=save_like(offset, ref, _out("phase_offset", runtime)),
        )
        return runtime


class _UnwrapInputSpec(_MethodInputSpec):
    phase = File(exists=True, mandatory=True, desc="(X, Y, Z, E) phase, rad")
    magnitude = File(exists=True, mandatory=True)
    valid = File(exists=True, mandatory=True)
    echo_times_s = traits.List(traits.Float, mandatory=True, desc="s")


class _UnwrapOutputSpec(TraitedSpec):
    unwrapped = File(exists=True, desc="(X, Y, Z, E) unwrapped phase, rad")
    quality = File(desc="voxel quality map (0..1), when the method gives one")


class Unwrap(SimpleInterface):
    """Phase unwrapping with registry stage ``unwrapping``."""

    input_spec = _UnwrapInputSpec
    output_spec = _UnwrapOutputSpec

    def _run_interface(self, runtime):
        phase, ref = _load(self.inputs.phase)
        mag, _ = _load(self.inputs.magnitude)
        valid, _ = _load(self.inputs.valid, bool)
        unwrapped, quality = _execution(self.inputs).run(
            "unwrapping", self.inputs.method, phase, magnitude=mag,
            echo_times_s=list(self.inputs.echo_times_s), mask=valid,
            params=self.inputs.params, context={"voxel_size_mm": _voxel_size(ref)},
        )
        self._results["unwrapped"] = save_like(unwrapped, ref, _out("unwrapped", runtime))
        if quality is not None:
            self._results["quality"] = save_like(quality, ref, _out("quality", runtime))
        return runtime


class _B0InputSpec(BaseInterfaceInputSpec):
    unwrapped = File(exists=True, mandatory=True, desc="(X, Y, Z, E) rad")
    magnitude = File(exists=True, mandatory=True)
    echo_times_s = traits.List(traits.Float, mandatory=True, desc="s")
    method = traits.Str("romeo", usedefault=True,
                        desc="echo_combination method in the registry")
    params = traits.Dict(traits.Str, traits.Any, value={}, usedefault=True,
                         desc="parameters overriding the method's defaults")


class _B0OutputSpec(TraitedSpec):
    fieldmap = File(exists=True, desc="B0 map, Hz")
    noise_std = File(exists=True, desc="N_std: standard deviation of the B0 estimate, Hz "
                     "(0 where there is no estimate)")


class EchoCombine(SimpleInterface):
    """B0 map (Hz) and its noise map N_std (Hz) from the unwrapped echoes, with
    registry stage ``echo_combination`` (:mod:`qsmprep.qsm.echo`)."""

    input_spec = _B0InputSpec
    output_spec = _B0OutputSpec

    def _run_interface(self, runtime):
        unwrapped, ref = _load(self.inputs.unwrapped)
        mag, _ = _load(self.inputs.magnitude)
        b0_hz, noise_hz = Execution().run(
            "echo_combination", self.inputs.method, unwrapped, mag,
            list(self.inputs.echo_times_s), params=self.inputs.params,
        )
        self._results["fieldmap"] = save_like(b0_hz, ref, _out("fieldmap_hz", runtime))
        self._results["noise_std"] = save_like(noise_hz, ref,
                                               _out("noise_std_hz", runtime))
        return runtime


class _PhaseSignInputSpec(BaseInterfaceInputSpec):
    fieldmap = File(exists=True, mandatory=True, desc="B0 map, Hz, sign as stored")
    magnitude = File(exists=True, mandatory=True, desc="(X, Y, Z, E) magnitude")
    mask = File(exists=True, mandatory=True, desc="brain mask")
    b0_dir = traits.List(traits.Float, mandatory=True, desc="unit B0 direction, voxel axes")
    phase_sign = traits.Enum("auto", "1", "-1", usedefault=True,
                             desc="auto: check and flip when clearly inverted; 1/-1: given")
    source = traits.Str("the phase", usedefault=True, desc="phase file(s), for messages")


class _PhaseSignOutputSpec(TraitedSpec):
    fieldmap = File(exists=True, desc="B0 map, Hz, in qsmprep's sign convention")
    phase_sign = traits.Int(desc="the sign applied: 1 (as stored) or -1 (inverted)")
    record = traits.Dict(desc="decision and evidence, for the sidecars and the report")


class PhaseSign(SimpleInterface):
    """Check the sign of the phase on the B0 map (:mod:`qsmprep.qsm.phase_sign`)
    and apply ``phase_sign``: given (1, -1), or with ``auto`` -1 when the
    evidence clearly shows an inverted phase (a warning), else 1
    (:func:`~qsmprep.qsm.phase_sign.resolve_phase_sign`)."""

    input_spec = _PhaseSignInputSpec
    output_spec = _PhaseSignOutputSpec

    def _run_interface(self, runtime):
        from ..qsm.phase_sign import (CLEAR_CORRELATION, decide_phase_sign,
                                      phase_sign_evidence, resolve_phase_sign)

        hz, ref = _load(self.inputs.fieldmap)
        mag, _ = _load(self.inputs.magnitude)
        mask, _ = _load(self.inputs.mask, bool)
        evidence = phase_sign_evidence(hz, mag, mask, _voxel_size(ref), self.inputs.b0_dir)
        setting = self.inputs.phase_sign
        sign, decision = resolve_phase_sign(evidence["correlation"], setting,
                                            self.inputs.source)
        shown = decide_phase_sign(evidence["correlation"])
        out = hz if sign == 1 else -hz
        self._results.update(
            fieldmap=save_like(out, ref, _out("fieldmap_signed_hz", runtime)),
            phase_sign=sign,
            record={"PhaseSign": sign, "PhaseSignSetting": setting,
                    "PhaseSignDecision": decision,
                    "PhaseSignCheck": {**evidence, "threshold": CLEAR_CORRELATION,
                                       "shown_sign": shown}},
        )
        return runtime


class _TotalFieldInputSpec(BaseInterfaceInputSpec):
    fieldmap = File(exists=True, mandatory=True, desc="B0 map, Hz")
    noise_std = File(exists=True, desc="N_std of the B0 map, Hz")
    field_strength_t = traits.Float(mandatory=True, desc="main field strength, T")


class _TotalFieldOutputSpec(TraitedSpec):
    total_field = File(exists=True, desc="total field, ppm")
    noise_std = File(desc="N_std of the total field, ppm (when given in Hz)")


class TotalField(SimpleInterface):
    """Total field (ppm) from the B0 map (Hz): :func:`qsmprep.qsm.units.hz_to_ppm`;
    its noise map N_std is converted the same way (Hz to ppm)."""

    input_spec = _TotalFieldInputSpec
    output_spec = _TotalFieldOutputSpec

    def _run_interface(self, runtime):
        from ..qsm.units import hz_to_ppm

        hz, ref = _load(self.inputs.fieldmap)
        ppm = hz_to_ppm(hz, self.inputs.field_strength_t)
        self._results["total_field"] = save_like(ppm, ref, _out("total_field_ppm", runtime))
        if isdefined(self.inputs.noise_std):
            noise = hz_to_ppm(_load(self.inputs.noise_std)[0],
                              self.inputs.field_strength_t)
            self._results["noise_std"] = save_like(noise, ref,
                                                   _out("noise_std_ppm", runtime))
        return runtime


class _MaskInputSpec(_MethodInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="(X, Y, Z, E) magnitude")
    quality = File(exists=True, desc="phase quality (0..1) from unwrapping")
    valid = File(exists=True, mandatory=True, desc="voxels with finite input")
    mask_file = File(exists=True, desc="user-supplied brain mask on the GRE grid: used "
                     "instead of the method (thresholded at 0.5 when not binary)")


class _MaskOutputSpec(TraitedSpec):
    mask = File(exists=True)


class Mask(SimpleInterface):
    """Brain mask with registry stage ``masking`` from the root-sum-of-squares
    magnitude (and the unwrapping quality for a method that takes it), or the
    user-supplied ``mask_file``; voxels with non-finite input are always left out."""

    input_spec = _MaskInputSpec
    output_spec = _MaskOutputSpec

    def _run_interface(self, runtime):
        if isdefined(self.inputs.mask_file):
            return self._user_mask(runtime)
        mag, ref = _load(self.inputs.magnitude)
        rss = _rss(mag)
        quality = _load(self.inputs.quality)[0] if isdefined(self.inputs.quality) else None
        mask = _execution(self.inputs, limit_threads=False).run(
            "masking", self.inputs.method, rss, quality=quality, params=self.inputs.params,
            context={"voxel_size_mm": _voxel_size(ref)})
        mask = np.asarray(mask, dtype=bool) & _load(self.inputs.valid, bool)[0]
        if self.inputs.method != "bet" and mask.any():
            from ..qsm.bet import check_brain_coverage

            check_brain_coverage(mask, rss, voxel_size_mm=_voxel_size(ref),
                                 method=self.inputs.method, source=self.inputs.magnitude)
        if not mask.any():
            raise ValueError(
                f"The '{self.inputs.method}' brain mask is empty (from {self.inputs.magnitude}"
                "): check that the magnitude shows the head and is not all zero/NaN, or try "
                "another --masking method"
            )
        self._results["mask"] = save_like(mask, ref, _out("mask", runtime), np.uint8)
        return runtime

    def _user_mask(self, runtime):
        from ..bids.masks import binarize_mask, mask_grid_error

        path = self.inputs.mask_file
        ref = nb.load(self.inputs.magnitude)
        img = nb.load(path)
        error = mask_grid_error(path, img, self.inputs.magnitude, ref)
        if error:
            raise ValueError(error)
        # a non-binary mask was reported once, before the run (bids.masks.check_mask)
        mask = binarize_mask(np.asanyarray(img.dataobj).reshape(ref.shape[:3]))[0]
        mask &= _load(self.inputs.valid, bool)[0]
        if not mask.any():
            raise ValueError(
                f"The user-supplied brain mask {path} is empty once voxels with non-finite "
                "input are left out; check that it covers the brain of this run")
        self._results["mask"] = save_like(mask, ref, _out("mask", runtime), np.uint8)
        return runtime


def _rss(mag):
    """Root-sum-of-squares over the echoes of a (X, Y, Z[, E]) magnitude."""
    return np.sqrt(np.sum(mag.reshape(mag.shape[:3] + (-1,)) ** 2, axis=3))


class _BFRInputSpec(_MethodInputSpec):
    total_field = File(exists=True, mandatory=True, desc="ppm")
    mask = File(exists=True, mandatory=True)
    b0_dir = traits.List(traits.Float, mandatory=True, desc="unit B0 direction, voxel axes")
    noise_std = File(exists=True, desc="N_std of the total field (ppm), data weights "
                     "1/N_std for methods that take them (PDF)")


class _BFROutputSpec(TraitedSpec):
    local_field = File(exists=True, desc="ppm")
    mask = File(exists=True, desc="mask where the local field is valid")


class BackgroundRemoval(SimpleInterface):
    """Background field removal with registry stage ``bf_removal``."""

    input_spec = _BFRInputSpec
    output_spec = _BFROutputSpec

    def _run_interface(self, runtime):
        field, ref = _load(self.inputs.total_field)
        mask, _ = _load(self.inputs.mask, bool)
        local, mask_out = _execution(self.inputs).run(
            "bf_removal", self.inputs.method, field, mask, _voxel_size(ref),
            b0_dir=tuple(self.inputs.b0_dir), params=self.inputs.params,
            context={"noise_std_ppm": _lazy_file(self.inputs.noise_std)},
        )
        self._results.update(
            local_field=save_like(local, ref, _out("local_field_ppm", runtime)),
            mask=save_like(mask_out, ref, _out("mask_local", runtime), np.uint8),
        )
        return runtime


class _InversionInputSpec(_MethodInputSpec):
    local_field = File(exists=True, mandatory=True, desc="ppm")
    mask = File(exists=True, mandatory=True)
    b0_dir = traits.List(traits.Float, mandatory=True, desc="unit B0 direction, voxel axes")
    magnitude = File(exists=True, desc="(X, Y, Z, E) magnitude, for methods that use "
                     "its edges (MEDI)")
    noise_std = File(exists=True, desc="N_std of the field (ppm), data weights 1/N_std for "
                     "methods that take them (MEDI, LSQR)")
    noise_std_absolute = traits.Bool(False, usedefault=True, desc="N_std's level is known")
    echo_times_s = traits.List(traits.Float, desc="echo times (s) of the magnitude's echoes, "
                               "for methods that find the CSF in it (TFI)")
    csf = File(exists=True, desc="the run's ventricular CSF core (CSFCore), for methods "
               "that take it (TFI's CSF term)")
    csf_note = traits.Str(desc="why ``csf`` is empty (CSFCore); '' when CSF was found")
    source = traits.Str("this run", usedefault=True,
                        desc="the run's file, named in the method's warnings")


class _ChiOutputSpec(TraitedSpec):
    chi = File(exists=True, desc="susceptibility, ppm")
    warnings = traits.List(traits.Str, desc="the warnings the method logged (e.g. a fall-back "
                           "to another reference region), for the Chimap's sidecar")


class _InversionOutputSpec(_ChiOutputSpec):
    local_field = File(desc="local field (ppm), when the method gives one (total field "
                       "inversion: the field less its fitted background sources)")


class Inversion(SimpleInterface):
    """Dipole inversion with registry stage ``inversion``."""

    input_spec = _InversionInputSpec
    output_spec = _InversionOutputSpec

    def _run_interface(self, runtime):
        local, ref = _load(self.inputs.local_field)
        mask, _ = _load(self.inputs.mask, bool)
        echoes = _lazy_file(self.inputs.magnitude)   # read once, for both keywords
        with logged_warnings() as warnings:
            out = _execution(self.inputs).run(
                "inversion", self.inputs.method, local, mask, _voxel_size(ref),
                b0_dir=tuple(self.inputs.b0_dir), params=self.inputs.params,
                context={"magnitude": (None if echoes is None
                                       else Lazy(lambda: _rss(echoes.get()))),
                         "magnitude_echoes": echoes,
                         "echo_times_s": (list(self.inputs.echo_times_s)
                                          if isdefined(self.inputs.echo_times_s) else None),
                         "noise_std_ppm": _lazy_file(self.inputs.noise_std),
                         "noise_std_absolute": self.inputs.noise_std_absolute,
                         "csf_region": _csf_region(self.inputs),
                         "source": self.inputs.source})
        self._results["warnings"] = warnings
        if registry.gives_local_field(self.inputs.method):
            out, local = out
            self._results["local_field"] = save_like(
                local, ref, _out("local_field_ppm", runtime))
        self._results["chi"] = save_like(out, ref, _out("chi_ppm", runtime))
        return runtime


def _csf_region(inputs):
    """A :class:`~qsmprep.execution.Lazy` of the CSFCore node's ``(core, problem)``
    (the return of :func:`qsmprep.qsm.reference.csf_mask`), or None when the
    interface was not given one."""
    if not isdefined(inputs.csf):
        return None
    note = inputs.csf_note if isdefined(inputs.csf_note) else ""
    return Lazy(lambda: (_load(inputs.csf, bool)[0], note or None))
