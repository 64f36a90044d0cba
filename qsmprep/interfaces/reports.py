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
            echo_index=self.inputs.echo_index,
        )
        self._results["out_report"] = out
        return runtime


class _RunSummaryInputSpec(BaseInterfaceInputSpec):
    info = traits.Dict(mandatory=True, desc="run summary (see qsmprep.reports.core.summary_html)")
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
        core.summary_html(self.inputs.info)  # fail early on an unusable summary
        out = os.path.join(runtime.cwd, os.path.basename(self.inputs.out_report))
        core.write_summary_json(self.inputs.info, out)
        self._results["out_report"] = out
        return runtime
