"""Nipype interfaces that draw the report's reportlets from NIfTI files.

Each one calls :mod:`qsmprep.reports.core`; the drawing itself lives in
:mod:`qsmprep.reports.reportlets`. Save ``out_report`` into
``out/sub-<label>/figures/`` (e.g. with niworkflows' ``DerivativesDataSink``
and ``datatype="figures"``, ``desc=<kind>``) and call
:func:`qsmprep.reports.core.generate_report` once the subject is done.
"""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..reports import core


class _QSMReportletInputSpec(BaseInterfaceInputSpec):
    kind = traits.Enum(*sorted(core.KINDS), mandatory=True,
                       desc="which reportlet: " + ", ".join(sorted(core.KINDS)))
    in_file = File(exists=True, mandatory=True,
                   desc="map to draw: magnitude (multi-echo), unwrapped phase (rad, "
                        "multi-echo), ROMEO quality, B0 (Hz), local field (ppm) or chi (ppm)")
    mask_file = File(exists=True, desc="brain mask (required for kind='magnitude')")
    wrapped_file = File(exists=True, desc="wrapped phase in rad (required for kind='phase')")
    csf_file = File(exists=True, desc="the ventricular CSF core, outlined on kind='chi'")
    echo_index = traits.Int(0, usedefault=True,
                            desc="0-based echo drawn from 4D magnitude/phase inputs")
    out_report = File("report.svg", usedefault=True, desc="output SVG file name")


class _QSMReportletOutputSpec(TraitedSpec):
    out_report = File(exists=True, desc="the reportlet (SVG)")


class QSMReportlet(SimpleInterface):
    """Draw one reportlet mosaic (SVG) with colour bar and units."""

    input_spec = _QSMReportletInputSpec
    output_spec = _QSMReportletOutputSpec

    def _run_interface(self, runtime):
        out = os.path.join(runtime.cwd, os.path.basename(self.inputs.out_report))
        core.render_reportlet(
            self.inputs.kind, out, self.inputs.in_file,
            mask_file=self.inputs.mask_file if isdefined(self.inputs.mask_file) else None,
            wrapped_file=self.inputs.wrapped_file if isdefined(self.inputs.wrapped_file) else None,
            csf_file=self.inputs.csf_file if isdefined(self.inputs.csf_file) else None,
            echo_index=self.inputs.echo_index,
        )
        self._results["out_report"] = out
        return runtime


class _RunSummaryInputSpec(BaseInterfaceInputSpec):
    info = traits.Dict(mandatory=True, desc="run summary (see qsmprep.reports.core.summary_html)")
    interpretation = traits.Dict(desc="how the input was read (qsmprep.workflows.qsm."
                                 "merge_interpretation): added as 'input: ...' rows")
    out_report = File("summary.json", usedefault=True, desc="output JSON file name")


class _RunSummaryOutputSpec(TraitedSpec):
    out_report = File(exists=True, desc="run summary as JSON (rendered at report time)")


class RunSummary(SimpleInterface):
    """Write the run summary JSON; the report renders it into the Summary table.

    Save it as ``..._desc-summary_<suffix>.json`` in the figures folder; the
    CLI may add ``timings_s`` and ``warnings`` to it after the run.
    """

    input_spec = _RunSummaryInputSpec
    output_spec = _RunSummaryOutputSpec

    def _run_interface(self, runtime):
        info = dict(self.inputs.info)
        if isdefined(self.inputs.interpretation):
            info.update(interpretation_rows(self.inputs.interpretation))
        core.summary_html(info)  # fail early on an unusable summary
        out = os.path.join(runtime.cwd, os.path.basename(self.inputs.out_report))
        core.write_summary_json(info, out)
        self._results["out_report"] = out
        return runtime


def interpretation_rows(interp):
    """Rows of the run summary (one table of the report) saying how the input
    was read: field strength and its source, phase scale, phase sign, B0
    direction source, echo times. Keys start with ``input_`` so that they are
    listed together."""
    rows = {}
    source = interp.get("FieldStrengthSource")
    if interp.get("MagneticFieldStrengthUsed") is not None:
        used = f"{float(interp['MagneticFieldStrengthUsed']):.4g} T"
        if source == "ImagingFrequency":
            used += f" from ImagingFrequency {interp.get('ImagingFrequency'):g} MHz"
            if interp.get("MagneticFieldStrengthNominal") is not None:
                used += f" (nominal {interp['MagneticFieldStrengthNominal']:g} T)"
        else:
            used += " from MagneticFieldStrength (nominal; no ImagingFrequency)"
        rows["input_field_strength"] = used
    scaling = interp.get("PhaseScaling") or {}
    if scaling:
        text = str(scaling.get("Description", scaling.get("Convention", "")))
        if "VerifiedByWraps" in scaling:
            text += ("; verified by its 2pi wraps" if scaling["VerifiedByWraps"]
                     else "; not verified (no phase wraps)")
        declared = scaling.get("DeclaredUnits", "n/a")
        rows["input_phase_scale"] = f"{text} (sidecar Units: {declared or 'none'})"
    if "PhaseSign" in interp:
        check = interp.get("PhaseSignCheck") or {}
        r = check.get("correlation")
        rows["input_phase_sign"] = (
            f"{int(interp['PhaseSign']):+d}, {interp.get('PhaseSignDecision', '')}"
            f" (air-model correlation r = {'n/a' if r is None else f'{r:+.2f}'})")
    if interp.get("B0DirectionSource"):
        rows["input_B0_direction"] = str(interp["B0DirectionSource"])
    if interp.get("EchoTimesUsed"):
        rows["input_echo_times"] = ", ".join(f"{t * 1e3:.4g}" for t in
                                             interp["EchoTimesUsed"]) + " ms"
    return rows
