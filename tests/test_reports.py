"""Per-subject HTML reports: reportlets, summary, citations, errors, browser check."""

import json
import re
import shutil
import uuid
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from qsmprep.reports import browser, citations, core, reportlets

SHAPE = (40, 44, 16)
VOX = (1.0, 1.0, 2.5)  # anisotropic on purpose
ECHO_TIMES = (0.004, 0.008, 0.012)


def _grid(shape=SHAPE, vox=VOX):
    axes = [(np.arange(n) - (n - 1) / 2) * v for n, v in zip(shape, vox)]
    return np.meshgrid(*axes, indexing="ij")


def _head(shape=SHAPE, vox=VOX, seed=0):
    """A synthetic head: ellipsoid mask, smooth field, a 'vein' and noise."""
    rng = np.random.default_rng(seed)
    x, y, z = _grid(shape, vox)
    mask = (x / 17) ** 2 + (y / 19) ** 2 + (z / 17) ** 2 < 1
    b0_hz = (30 * np.exp(-((y - 20) ** 2) / 60) + 0.5 * x).astype(np.float32)
    chi = np.where(mask, 0.02 * np.sin(x / 3) + 0.3 * (np.hypot(x - 5, z) < 1.5), 0)
    tes = np.asarray(ECHO_TIMES)
    mag = (1000 * mask[..., None] * np.exp(-tes / 0.03)
           + 20 * rng.random(shape + (len(tes),))).astype(np.float32)
    unwrapped = (2 * np.pi * b0_hz[..., None] * tes).astype(np.float32)
    wrapped = np.angle(np.exp(1j * unwrapped)).astype(np.float32)
    return {"mask": mask, "b0": b0_hz, "chi": chi.astype(np.float32), "mag": mag,
            "unwrapped": unwrapped, "wrapped": wrapped,
            "quality": np.where(mask, 0.9, 0.1).astype(np.float32),
            "local": (chi * 0.3).astype(np.float32)}


def _save(data, path, vox=VOX):
    path.parent.mkdir(parents=True, exist_ok=True)
    nb.Nifti1Image(np.asarray(data, dtype=np.float32), np.diag([*vox, 1.0])).to_filename(path)
    return path


def _displayed_ratios(svg):
    """Displayed width/height of every embedded raster of a matplotlib SVG."""
    ratios = []
    for m in re.finditer(r'<image [^>]*?width="(\d+)" height="(\d+)" '
                         r'transform="matrix\(([-\d.e]+) 0 0 ([-\d.e]+)', svg):
        w, h, a, d = (float(g) for g in m.groups())
        ratios.append((abs(w * a) / abs(h * d), w / h))
    return ratios


def test_mosaic_keeps_physical_aspect_of_anisotropic_voxels():
    head = _head()
    svg = reportlets.chi_svg(head["chi"], VOX, mask=head["mask"], n_slices=4)
    assert svg.lstrip().startswith("<?xml") and "χ (ppm)" in svg
    box = reportlets._bounding_box(head["mask"])  # drawn with 2-voxel margins
    ext = [(min(hi + 2, n - 1) - max(lo - 2, 0) + 1) * v
           for (lo, hi), n, v in zip(box, SHAPE, VOX)]
    expected = {ext[0] / ext[1], ext[0] / ext[2], ext[1] / ext[2]}  # axial, coronal, sagittal
    ratios = _displayed_ratios(svg)
    assert len(ratios) == 2 * 3 * 4  # two windows x three views x four slices
    for shown, _ in ratios:
        assert min(abs(shown - e) / e for e in expected) < 0.02, (shown, expected)
    # coronal and sagittal panels are stretched: 16 slices of 2.5 mm show as 40 mm
    assert sum(pixels > 1.5 * shown for shown, pixels in ratios) == 2 * 2 * 4


def test_chi_reportlet_outlines_the_ventricular_csf_core(tmp_path):
    """The run's CSF core (the voxels of ReferenceValues' CSF median) is outlined
    in cyan on the first χ mosaic, from the arrays and from the derivatives as
    written (``--reports-only``); without it, or when it is empty (no ventricles
    found), nothing cyan is drawn."""
    head = _head()
    x, y, z = _grid()
    csf = head["mask"] & (np.hypot(x, y) < 4)
    colour = reportlets.CSF_COLOUR
    with_csf = reportlets.chi_svg(head["chi"], VOX, mask=head["mask"], csf=csf, n_slices=4)
    assert colour in with_csf and "cyan: the ventricular CSF core" in with_csf
    for none in (None, np.zeros_like(csf)):
        assert colour not in reportlets.chi_svg(head["chi"], VOX, mask=head["mask"], csf=none,
                                                n_slices=4)
    anat = tmp_path / "out" / "sub-01" / "anat"
    _save(head["chi"], anat / "sub-01_Chimap.nii.gz")
    _save(head["mask"], anat / "sub-01_desc-brain_mask.nii.gz")
    _save(csf, anat / "sub-01_label-CSF_desc-ventricles_mask.nii.gz")
    written = core.render_figures_from_derivatives(tmp_path / "out", "01")
    chi_svg = [p for p in written if "desc-chi" in p.name]
    assert len(chi_svg) == 1 and colour in chi_svg[0].read_text()


def test_robust_window_and_slice_positions():
    vol = np.arange(1000, dtype=float).reshape(10, 10, 10)
    lo, hi = reportlets.robust_window(vol, percentiles=(1, 99))
    assert lo == pytest.approx(np.percentile(vol, 1)) and hi == pytest.approx(np.percentile(vol, 99))
    assert reportlets.robust_window(vol - 600, symmetric=True)[0] == pytest.approx(
        -reportlets.robust_window(vol - 600, symmetric=True)[1])
    pos = reportlets.slice_positions((10, 30), 4)
    assert pos.min() > 10 and pos.max() < 30 and len(pos) == 4
    with pytest.raises(ValueError, match="3D"):
        reportlets.mosaic_svg([{"volume": np.zeros((4, 4)), "label": "x"}], VOX)


def test_summary_html_shows_echo_times_and_escapes():
    info = {"subject": "01", "run": 2, "echo_times_s": [0.00492, 0.0098, 0.0147],
            "field_strength_t": 3, "voxel_size_mm": [1, 1, 2.5], "matrix": [40, 44, 16],
            "b0_angle_deg": 12.34, "methods": {"bf_removal": "vsharp"}, "device": "cpu",
            "timings_s": {"unwrap": 1.25, "inversion": 2.5},
            "warnings": ["Phase has no Units <b>guessed</b>"]}
    out = core.summary_html(info)
    assert "4.92, 9.8, 14.7 ms" in out and ">3<" in out
    assert "1 × 1 × 2.5 mm" in out and "12.34°" in out and "vsharp" in out
    assert "total 3.8 s" in out
    assert "&lt;b&gt;guessed&lt;/b&gt;" in out and "<b>" not in out
    with pytest.raises(ValueError, match="subject"):
        core.summary_html({"run": 1})


def test_citations_numbered_in_order_of_use(tmp_path):
    md = ("# Methods\n\nPhase was unwrapped with ROMEO [@dymerska2021romeo] and the\n"
          "background removed with V-SHARP [@wu2012vsharp; @dymerska2021romeo].\n\n"
          "- inversion: TKD @shmueli2009tkd\n- unknown: [@nobody1999]\n")
    (tmp_path / "CITATION.md").write_text(
        md + "\n### References\n\n- an old list [@gorgolewski2011nipype]\n")
    assert citations.cited_keys(md) == ["dymerska2021romeo", "wu2012vsharp", "nobody1999",
                                   "shmueli2009tkd"]
    written = citations.write_citation_files(tmp_path)
    body = (tmp_path / "CITATION.html").read_text()
    assert "<h3>Methods</h3>" in body and "<li>inversion: TKD" in body
    assert '[<a href="#ref-wu2012vsharp">2</a>, <a href="#ref-dymerska2021romeo">1</a>]' in body
    assert "nobody1999?" in body
    refs = re.findall(r'<li id="ref-(\w+)">', body)
    assert refs == ["dymerska2021romeo", "wu2012vsharp", "shmueli2009tkd"]
    assert "doi.org/10.1002/mrm.28563" in body  # ROMEO's DOI
    assert "gorgolewski2011nipype" not in body  # the old reference list is replaced
    assert sorted(citations.parse_bib(written[1].read_text())) == sorted(refs)
    (tmp_path / "CITATION.bib").write_text("% written by the workflow\n")
    assert citations.write_citation_files(tmp_path) == [tmp_path / "CITATION.html"]


def test_bib_has_every_registry_citation():
    from qsmprep.qsm import registry

    bib = citations.parse_bib(citations.BIB_FILE.read_text())
    cited = {c for stage in registry.STAGES for m in registry.methods(stage).values()
             for c in m.citations}
    assert cited <= set(bib), sorted(cited - set(bib))
    for key, entry in bib.items():
        assert entry.get("author") and entry.get("year", "").isdigit(), key


def _crash(tmp_path, fmt):
    """Produce a real Nipype crash file by running a failing node."""
    from nipype import Node, Workflow
    from nipype.interfaces.utility import Function

    def fail(x):
        raise ValueError(f"bad <input> {x}")

    crash_dir = tmp_path / f"crash-{fmt}"
    wf = Workflow(name=f"wf_{fmt}", base_dir=str(tmp_path / f"work-{fmt}"))
    wf.config["execution"] = {"crashdump_dir": str(crash_dir), "crashfile_format": fmt,
                              "stop_on_first_crash": True}
    node = Node(Function(function=fail, input_names=["x"]), name="failing")
    node.inputs.x = 3
    wf.add_nodes([node])
    with pytest.raises(RuntimeError):
        wf.run()
    return crash_dir


@pytest.mark.parametrize("fmt", ["pklz", "txt"])
def test_errors_html_renders_nipype_crash_files(tmp_path, fmt):
    crash_dir = _crash(tmp_path, fmt)
    assert list(crash_dir.glob("crash*"))
    out = core.errors_html(crash_dir)
    assert "1 processing step(s) failed" in out
    assert "ValueError: bad &lt;input&gt; 3" in out and "failing" in out
    assert "No errors" in core.errors_html(tmp_path / "nothing-here")


# --------------------------------------------------------------------------- full report

CITATION_MD = """## Methods

Results included in this manuscript come from preprocessing performed with qsmprep,
built on Nipype [@gorgolewski2011nipype]. Phase was unwrapped with ROMEO
[@dymerska2021romeo], the background field removed with V-SHARP [@wu2012vsharp] and
the susceptibility computed with TKD [@shmueli2009tkd].
"""


def _output_tree(tmp_path, run_uuid):
    """A qsmprep output folder with two runs, as the workflow leaves it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "qsmprep outputs", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}))
    (out / "logs").mkdir()
    (out / "logs" / "CITATION.md").write_text(CITATION_MD)
    figures = out / "sub-01" / "figures"
    work = tmp_path / "work"
    for run in (1, 2):
        head = _head(seed=run)
        ents = {"sub": "01", "ses": "1", "run": str(run)}
        anat = out / "sub-01" / "ses-1" / "anat"
        stem = f"sub-01_ses-1_run-{run}"
        _save(head["chi"], anat / f"{stem}_Chimap.nii.gz")
        _save(head["mask"], anat / f"{stem}_desc-brain_mask.nii.gz")
        _save(head["b0"], anat / f"{stem}_fieldmap.nii.gz")
        _save(head["local"], anat / f"{stem}_desc-local_fieldmap.nii.gz")
        # the figures made inside the workflow from intermediate files
        mag = _save(head["mag"], work / f"{stem}_mag.nii.gz")
        mask = anat / f"{stem}_desc-brain_mask.nii.gz"
        core.render_reportlet("magnitude", figures / core.figure_name(ents, "magnitude"), mag,
                              mask_file=mask)
        core.render_reportlet("phase", figures / core.figure_name(ents, "phase"),
                              _save(head["unwrapped"], work / f"{stem}_unwrapped.nii.gz"),
                              wrapped_file=_save(head["wrapped"], work / f"{stem}_wrapped.nii.gz"),
                              mask_file=mask, echo_index=1)
        core.render_reportlet("quality", figures / core.figure_name(ents, "quality"),
                              _save(head["quality"], work / f"{stem}_quality.nii.gz"),
                              mask_file=mask)
        core.write_summary_json(
            {"subject": "01", "session": "1", "run": run, "echo_times_s": list(ECHO_TIMES),
             "field_strength_t": 3.0, "voxel_size_mm": VOX, "matrix": SHAPE,
             "b0_angle_deg": 0.0, "methods": {"unwrapping": "romeo", "inversion": "tkd"},
             "device": "cpu", "timings_s": {"unwrapping": 1.0, "inversion": 0.5},
             "warnings": ["Phase Units missing: inferred rad from the range"] * (run == 2)},
            figures / core.figure_name(ents, "summary", ".json"))
    log = out / "sub-01" / "log" / run_uuid
    log.mkdir(parents=True)
    for crash in _crash(tmp_path, "txt").glob("crash*"):
        shutil.copy(crash, log / crash.name)
    return out


def test_reports_only_builds_the_report_from_outputs(tmp_path):
    run_uuid = "20240101-000000_" + uuid.uuid4().hex[:8]
    out = _output_tree(tmp_path, run_uuid)
    assert core.latest_run_uuid(out, "sub-01") == run_uuid
    assert core.reports_only(out, ["sub-01"]) == 0
    report = (out / "sub-01.html").read_text()
    figures = sorted(p.name for p in (out / "sub-01" / "figures").glob("*.svg"))
    assert len(figures) == 2 * 6
    for name in figures:  # every figure is in the report exactly once
        assert report.count(f'src="./sub-01/figures/{name}"') == 1, name
    assert report.count("4, 8, 12 ms") == 2
    assert "Phase Units missing" in report and "1 processing step(s) failed" in report
    assert 'href="#ref-dymerska2021romeo"' in report  # the methods text with citations
    assert (out / "logs" / "CITATION.bib").exists()
    assert "http://" not in report.split("<body>")[0] and "https://" not in report.split(
        "<body>")[0]  # nothing fetched from the network
    assert core.reports_only(tmp_path / "missing", ["02"]) == 1


def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    if browser.find_chromium() is None:
        pytest.skip("Chromium not found: install it with "
                    "`apt-get install -y chromium chromium-driver` to run the browser check")
    run_uuid = uuid.uuid4().hex
    out = _output_tree(tmp_path, run_uuid)
    core.render_figures_from_derivatives(out, "01")
    page = core.generate_report(out, "01", run_uuid)

    seen = browser.check_report(page)
    assert not seen["console"], seen["console"]
    assert seen["figures_total"] == seen["figures_loaded"] == 12
    assert seen["text"].count("Echo times 4, 8, 12 ms") == 2  # both runs
    assert "could not be displayed" not in seen["text"]

    shot = browser.screenshot(page, tmp_path / "report.png", width=1280, height=4000)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (4000, 1280)
    assert pixels.std() > 20  # text and dark figures on white, not a blank page
    assert (pixels < 50).mean() > 0.05  # the black mosaics are on screen

    # The self-check must catch a figure that does not load.
    next((out / "sub-01" / "figures").glob("*_desc-chi_*.svg")).unlink()
    broken = browser.check_report(page)
    assert (broken["figures_total"], broken["figures_loaded"]) == (12, 11)
    assert "1 figure(s) could not be displayed" in broken["text"]


def test_reportlet_interfaces_in_a_nipype_node(tmp_path):
    from nipype import Node

    from qsmprep.interfaces.reports import QSMReportlet, RunSummary

    head = _head()
    chi = _save(head["chi"], tmp_path / "chi.nii.gz")
    mask = _save(head["mask"], tmp_path / "mask.nii.gz")
    node = Node(QSMReportlet(kind="chi", in_file=str(chi), mask_file=str(mask)),
                name="chi_rpt", base_dir=str(tmp_path / "work"))
    svg = Path(node.run().outputs.out_report)
    assert svg.suffix == ".svg" and len(_displayed_ratios(svg.read_text())) == 2 * 3 * 6
    with pytest.raises(Exception, match="wrapped_file"):
        Node(QSMReportlet(kind="phase", in_file=str(chi)), name="bad",
             base_dir=str(tmp_path / "work")).run()
    info = {"subject": "01", "echo_times_s": list(ECHO_TIMES)}
    summary = Node(RunSummary(info=info), name="summary", base_dir=str(tmp_path / "work"))
    assert json.loads(Path(summary.run().outputs.out_report).read_text()) == info
