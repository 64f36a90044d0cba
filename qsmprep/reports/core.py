"""Assemble the per-subject HTML report (``out/sub-<label>.html``).

The report is built by :mod:`nireports` from the reportlets in
``out/sub-<label>/figures/`` following ``qsmprep/data/reports-spec.yml``, with
a self-contained page template (no network needed to view it). Sections:

* Summary: one table per run, rendered from the run's summary JSON
  (``..._desc-summary_<suffix>.json`` in the figures folder, see
  :func:`summary_html`);
* per run: magnitude with brain mask, wrapped/unwrapped phase, ROMEO quality,
  B0 map, local field, chi (two windows);
* Methods: ``out/logs/CITATION.md`` with numbered references
  (:func:`~qsmprep.reports.citations.write_citation_files` also writes ``CITATION.html`` and ``.bib``);
* Errors: the crash files in ``out/sub-<label>/log/<run-uuid>/``.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import numpy as np

from ..utils.files import write_text
from . import reportlets
from .citations import write_citation_files

LOGGER = logging.getLogger("qsmprep.reports")

#: Reportlet kind -> (drawing function, ``desc`` entity of the figure file).
KINDS = {
    "magnitude": (reportlets.magnitude_svg, "magnitude"),
    "phase": (reportlets.phase_svg, "phase"),
    "quality": (reportlets.quality_svg, "quality"),
    "fieldmap": (reportlets.b0_svg, "fieldmap"),
    "localfield": (reportlets.local_field_svg, "localfield"),
    "chi": (reportlets.chi_svg, "chi"),
}

_ENTITY_ORDER = ("ses", "acq", "rec", "run")
_PACKAGE_DATA = Path(__file__).resolve().parent.parent / "data"
SPEC_FILE = _PACKAGE_DATA / "reports-spec.yml"
TEMPLATE_FILE = Path(__file__).resolve().parent / "report.tpl"


# --------------------------------------------------------------------------- names


def parse_entities(filename):
    """BIDS entities of a file name: ``{"sub": "01", ..., "suffix": "Chimap"}``."""
    name = Path(filename).name.split(".")[0]
    parts = name.split("_")
    entities = dict(p.split("-", 1) for p in parts if "-" in p)
    if "-" not in parts[-1]:
        entities["suffix"] = parts[-1]
    return entities


def figure_name(entities, desc, extension=".svg"):
    """File name of a reportlet, e.g. ``sub-01_run-1_desc-chi_MEGRE.svg``.

    ``entities`` holds ``sub`` and optionally ``ses``, ``acq``, ``rec``, ``run``
    and ``suffix`` (default ``MEGRE``); other entities are left out.
    """
    if "sub" not in entities:
        raise ValueError(f"entities need a 'sub' label; got {entities}")
    parts = [f"sub-{entities['sub']}"]
    parts += [f"{k}-{entities[k]}" for k in _ENTITY_ORDER if entities.get(k) is not None]
    parts += [f"desc-{desc}", entities.get("suffix") or "MEGRE"]
    return "_".join(parts) + extension


# --------------------------------------------------------------------------- images


def load_canonical(path, volume=None):
    """Load a NIfTI in the closest RAS+ orientation.

    Returns ``(data float32 (X, Y, Z), voxel_size_mm)``; for 4D images
    ``volume`` picks the 0-based index along the last axis (default 0).
    """
    import nibabel as nb

    img = nb.as_closest_canonical(nb.load(str(path)))
    if img.ndim == 4:
        data = np.asanyarray(img.dataobj[..., volume or 0])
    elif img.ndim == 3:
        data = np.asanyarray(img.dataobj)
    else:
        raise ValueError(f"{path}: expected a 3D or 4D image; got {img.ndim}D")
    return data.astype(np.float32), tuple(float(v) for v in img.header.get_zooms()[:3])


def render_reportlet(kind, out_file, in_file, *, mask_file=None, wrapped_file=None, echo_index=0,
                     csf_file=None):
    """Draw reportlet ``kind`` (a key of :data:`KINDS`) from NIfTI files into ``out_file``.

    ``in_file`` is the map to show (for ``magnitude`` and ``phase``: the
    multi-echo magnitude or unwrapped phase, of which echo ``echo_index`` is
    drawn); ``wrapped_file`` is the wrapped phase in rad (``phase`` only);
    ``csf_file`` the ventricular CSF core outlined on ``chi``.
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown reportlet kind {kind!r}; choose one of {sorted(KINDS)}")
    draw = KINDS[kind][0]
    data, vox = load_canonical(in_file, echo_index)
    mask = load_canonical(mask_file)[0] > 0.5 if mask_file else None
    if kind == "magnitude":
        if mask is None:
            raise ValueError("The magnitude reportlet needs a mask_file to draw its contour")
        svg = draw(data, mask, vox)
    elif kind == "phase":
        if not wrapped_file:
            raise ValueError("The phase reportlet needs wrapped_file (wrapped phase, rad)")
        svg = draw(load_canonical(wrapped_file, echo_index)[0], data, vox, mask=mask,
                   echo=echo_index + 1)
    elif kind == "chi" and csf_file:
        svg = draw(data, vox, mask=mask, csf=load_canonical(csf_file)[0] > 0.5)
    else:
        svg = draw(data, vox, mask=mask)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    return write_text(out_file, svg)


def render_figures_from_derivatives(output_dir, subject_label, *, overwrite=False):
    """Draw the reportlets that the saved derivatives allow, for ``--reports-only``.

    Looks in ``out/sub-<label>/[ses-*/]anat/`` for ``*_Chimap``,
    ``*_desc-local_fieldmap``, ``*_fieldmap`` (B0, Hz), ``*_desc-brain_mask`` and
    ``*_label-CSF_desc-ventricles_mask`` and writes the chi, local-field and B0
    reportlets of each run into ``out/sub-<label>/figures/`` (existing files are
    kept unless ``overwrite``).
    Returns the list of files written.
    """
    subject_label = subject_label.removeprefix("sub-")
    root = Path(output_dir) / f"sub-{subject_label}"
    figures = root / "figures"
    written = []
    for chi_file in sorted(root.glob("**/anat/*_Chimap.nii*")):
        ents = parse_entities(chi_file)
        stem = chi_file.name.split("_Chimap")[0]
        ext = "".join(chi_file.suffixes)
        mask = chi_file.parent / f"{stem}_desc-brain_mask{ext}"
        mask = mask if mask.exists() else None
        csf = chi_file.parent / f"{stem}_label-CSF_desc-ventricles_mask{ext}"
        todo = [("chi", chi_file),
                ("localfield", chi_file.parent / f"{stem}_desc-local_fieldmap{ext}"),
                ("fieldmap", chi_file.parent / f"{stem}_fieldmap{ext}")]
        for kind, src in todo:
            out = figures / figure_name({**ents, "suffix": "MEGRE"}, KINDS[kind][1])
            if src.exists() and (overwrite or not out.exists()):
                written.append(render_reportlet(
                    kind, out, src, mask_file=mask,
                    csf_file=csf if kind == "chi" and csf.exists() else None))
    return written


# --------------------------------------------------------------------------- summary


def _fmt_num(value, unit=""):
    return f"{float(value):.4g}{unit}"


def summary_html(info):
    """HTML table summarising one run, from a plain dict (or its JSON).

    Recognised keys (all optional except ``subject``): ``subject``,
    ``session``, ``acquisition``, ``run``, ``echo_times_s`` (list, s),
    ``field_strength_t``, ``voxel_size_mm`` (3), ``matrix`` (3),
    ``b0_angle_deg``, ``methods`` (stage -> method name or description),
    ``device``, ``timings_s`` (step -> seconds), ``warnings`` (list of str).
    Other keys are listed as they are.
    """
    info = dict(info)
    if "subject" not in info:
        raise ValueError("The run summary needs at least a 'subject' label")
    esc = html.escape
    rows = []
    for key, label in (("subject", "Subject"), ("session", "Session"),
                       ("acquisition", "Acquisition"), ("run", "Run")):
        if info.get(key) is not None:
            rows.append((label, esc(str(info.pop(key)))))
        info.pop(key, None)
    tes = info.pop("echo_times_s", None)
    if tes is not None:
        rows.append(("Echoes", str(len(tes))))
        rows.append(("Echo times", esc(", ".join(_fmt_num(t * 1e3) for t in tes)) + " ms"))
    if info.get("field_strength_t") is not None:
        rows.append(("Field strength", _fmt_num(info.pop("field_strength_t"), " T")))
    if info.get("voxel_size_mm") is not None:
        rows.append(("Voxel size",
                     " × ".join(_fmt_num(v) for v in info.pop("voxel_size_mm")) + " mm"))
    if info.get("matrix") is not None:
        rows.append(("Matrix", " × ".join(str(int(v)) for v in info.pop("matrix"))))
    if info.get("b0_angle_deg") is not None:
        rows.append(("B0 angle to slab normal", _fmt_num(info.pop("b0_angle_deg"), "°")))
    methods = info.pop("methods", None) or {}
    for stage, name in methods.items():
        rows.append((f"Method: {esc(str(stage).replace('_', ' '))}", esc(str(name))))
    if info.get("device") is not None:
        rows.append(("Device", esc(str(info.pop("device")))))
    timings = info.pop("timings_s", None) or {}
    if timings:
        items = "".join(f"<li>{esc(str(k))}: {float(v):.1f} s</li>" for k, v in timings.items())
        total = sum(float(v) for v in timings.values())
        rows.append(("Processing time", f"<ul>{items}</ul>total {total:.1f} s"))
    warnings = info.pop("warnings", None) or []
    for key, value in info.items():
        rows.append((esc(str(key).replace("_", " ")), esc(str(value))))
    body = "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    out = [f'<table class="qsmprep-summary">\n{body}\n</table>']
    if warnings:
        items = "\n".join(f"<li>{esc(str(w))}</li>" for w in warnings)
        out.append(f'<div class="qsmprep-warnings"><strong>Warnings ({len(warnings)})</strong>'
                   f"<ul>\n{items}\n</ul></div>")
    else:
        out.append('<p class="qsmprep-ok">No warnings were raised during this run.</p>')
    return "\n".join(out)


def write_summary_json(info, out_file):
    """Write a run summary dict as JSON (the workflow writes one per run)."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_text(out_file, json.dumps(info, indent=2, default=_json_default))
    return out_file


def _json_default(obj):
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    return str(obj)


def _render_summaries(figures):
    """Turn every ``*_desc-summary_*.json`` in ``figures`` into its ``.html``."""
    runs = []
    for js in sorted(Path(figures).glob("*_desc-summary_*.json")):
        info = json.loads(js.read_text())
        write_text(js.with_suffix(".html"), summary_html(info))
        runs.append(info)
    return runs


def _overview_html(subject_label, runs, run_uuid):
    from ..__about__ import __version__

    sessions = sorted({str(r["session"]) for r in runs if r.get("session") is not None})
    names = [", ".join(f"{k} {r[k]}" for k in ("session", "acquisition", "run")
                       if r.get(k) is not None) or "single run" for r in runs]
    rows = [("Subject", subject_label), ("Sessions", ", ".join(sessions) or "none"),
            ("Runs", f"{len(runs)}" + (f" ({'; '.join(names)})" if runs else "")),
            ("qsmprep version", __version__), ("Run identifier", str(run_uuid))]
    body = "\n".join(f"<tr><th>{k}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="qsmprep-summary">\n{body}\n</table>'


# --------------------------------------------------------------------------- errors


def errors_html(log_dir):
    """The crash files (``crash*.txt`` / ``crash*.pklz``) in ``log_dir`` as HTML."""
    from nireports.assembler.misc import read_crashfile

    esc = html.escape
    files = sorted(Path(log_dir).glob("crash*.*")) if log_dir and Path(log_dir).is_dir() else []
    if not files:
        return '<p class="qsmprep-ok">No errors to report.</p>'
    out = [f'<p class="qsmprep-error">{len(files)} processing step(s) failed; details below.</p>']
    for path in files:
        try:
            info = read_crashfile(str(path))
        except Exception as exc:  # an unreadable crash file is itself worth reporting
            info = {"traceback": f"Could not read the crash file: {exc!r}"}
        inputs = "".join(f"<li>{esc(str(k))}: <code>{esc(str(v))}</code></li>"
                         for k, v in info.get("inputs", []))
        out.append(
            f"<details><summary>Node: {esc(str(info.get('node', 'unknown')))}</summary>"
            f"<p>File: <code>{esc(path.name)}</code><br>Working directory: "
            f"<code>{esc(str(info.get('node_dir', 'unknown')))}</code></p>"
            + (f"<ul>{inputs}</ul>" if inputs else "")
            + f"<pre>{esc(str(info.get('traceback', '')))}</pre></details>")
    return "\n".join(out)


# --------------------------------------------------------------------------- assembly


class _Fragment:
    """A ready-made HTML reportlet for sections added outside the spec."""

    def __init__(self, name, title, body, description=None):
        self.name, self.title, self.subtitle = name, title, None
        self.description = description
        self.components = [(body, None)]


def generate_report(output_dir, subject_label, run_uuid, *, spec_file=SPEC_FILE):
    """Write ``output_dir/sub-<label>.html`` from the reportlets already on disk.

    Renders the run summary JSONs and the methods text (``logs/CITATION.md``)
    first, then assembles the report with nireports. Returns the HTML path.
    """
    from nireports.assembler.report import Report, SubReport

    output_dir = Path(output_dir).absolute()
    subject_label = subject_label.removeprefix("sub-")
    if not (output_dir / f"sub-{subject_label}").is_dir():
        raise FileNotFoundError(f"No outputs of sub-{subject_label} in {output_dir}")
    figures = output_dir / f"sub-{subject_label}" / "figures"
    figures.mkdir(exist_ok=True)
    runs = _render_summaries(figures)
    write_text(figures / f"sub-{subject_label}_desc-overview_qsm.html",
               _overview_html(subject_label, runs, run_uuid))
    write_citation_files(output_dir / "logs")

    report = Report(output_dir, run_uuid, bootstrap_file=spec_file,
                    out_filename=f"sub-{subject_label}.html", reportlets_dir=output_dir,
                    subject=subject_label)
    report.template_path = TEMPLATE_FILE
    log_dir = output_dir / f"sub-{subject_label}" / "log" / str(run_uuid)
    report.sections.append(SubReport(
        "Errors", reportlets=[_Fragment("errors", "Errors", errors_html(log_dir),
                                        f"Crash files of run {run_uuid}.")]))
    report.generate_report()
    return report.out_filename


def latest_run_uuid(output_dir, subject_label):
    """The most recently modified ``sub-<label>/log/<run-uuid>`` name, or None."""
    log = Path(output_dir) / f"sub-{subject_label.removeprefix('sub-')}" / "log"
    runs = sorted((p for p in log.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return runs[-1].name if runs else None


def reports_only(output_dir, subject_labels, run_uuid=None):
    """``--reports-only``: re-render missing figures from derivatives, rebuild the HTML.

    Nothing is recomputed. ``run_uuid`` defaults, per subject, to the latest
    run in ``sub-<label>/log/``. Returns the number of subjects whose report
    failed (0 on success); failures are logged.
    """
    failed = 0
    for label in subject_labels:
        label = label.removeprefix("sub-")
        try:
            render_figures_from_derivatives(output_dir, label)
            generate_report(output_dir, label, run_uuid or latest_run_uuid(output_dir, label))
        except Exception:
            LOGGER.exception("Could not build the report of sub-%s", label)
            failed += 1
    return failed
