"""The group report ``group/qsmprep_group.html``: every run of a study on one page.

* one chi thumbnail per run (middle axial slice, the same window for all runs,
  cached in ``group/figures/``) linking to the run's subject report;
* per region, the distribution of the regional mean chi with every run a
  point (inline SVG, no JavaScript library); runs with a robust z-score
  beyond :data:`OUTLIER_Z` are drawn in red, listed, and linked to their report;
* the runs processed with settings that differ from the most common ones.

Plain HTML + inline SVG, no network: it opens from disk in any browser.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from ..utils.files import atomic_write, write_text

#: robust z-score beyond which a run's regional mean is flagged (Iglewicz & Hoaglin 1993)
OUTLIER_Z = 3.5
#: chi window of the thumbnails (ppm), the same for every run
THUMB_WINDOW_PPM = (-0.15, 0.15)
THUMB_PX = 96
#: smallest chi range (ppm) spanned by a strip plot's axis
MIN_SPAN_PPM = 0.02


def thumbnail(chimap, out_png):
    """PNG of the middle axial slice of ``chimap`` (written unless up to date)."""
    import nibabel as nb
    from PIL import Image

    out_png = Path(out_png)
    if out_png.is_file() and out_png.stat().st_mtime >= Path(chimap).stat().st_mtime:
        return out_png
    img = nb.load(chimap)
    z = img.shape[2] // 2
    chi = np.asanyarray(img.dataobj[:, :, z], dtype=np.float32)
    lo, hi = THUMB_WINDOW_PPM
    grey = np.clip((np.nan_to_num(chi) - lo) / (hi - lo), 0, 1)
    pic = Image.fromarray((255 * np.rot90(grey)).astype(np.uint8))  # RAS: anterior up
    pic.thumbnail((THUMB_PX, THUMB_PX))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_png, lambda tmp: pic.save(tmp, format="PNG"))
    return out_png


def _strip_svg(region, points, width=260, height=220):
    """A strip plot: one circle per run (jittered in x), outliers red and linked."""
    values = np.array([p["mean_ppm"] for p in points], float)
    finite = values[np.isfinite(values)]
    if not finite.size:
        return f'<p class="empty">{html.escape(region)}: no values</p>'
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < MIN_SPAN_PPM:  # do not blow small differences up to the full height
        centre = (hi + lo) / 2
        lo, hi = centre - MIN_SPAN_PPM / 2, centre + MIN_SPAN_PPM / 2
    pad = 0.1 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    top, bottom, left = 24, 20, 48

    def y(v):
        return top + (hi - v) / (hi - lo) * (height - top - bottom)

    rng = np.random.default_rng(0)
    parts = [f'<svg class="strip" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{width / 2}" y="14" text-anchor="middle" font-weight="bold">'
             f'{html.escape(region)}</text>']
    for v in np.linspace(lo, hi, 4):
        parts.append(f'<line x1="{left}" x2="{width - 6}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                     'stroke="#ddd"/>'
                     f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end" '
                     f'font-size="10">{v:.4g}</text>')
    for p in points:
        if not np.isfinite(p["mean_ppm"]):
            continue
        cx = left + 12 + rng.uniform(0, width - left - 30)
        colour = "#d62728" if p["outlier"] else "#1f77b4"
        circle = (f'<circle class="{"outlier" if p["outlier"] else "run"}" cx="{cx:.1f}" '
                  f'cy="{y(p["mean_ppm"]):.1f}" r="3.5" fill="{colour}" fill-opacity="0.7">'
                  f'<title>{html.escape(p["run_id"])}: {p["mean_ppm"]:.4f} ppm'
                  f'{" (outlier, robust z %.1f)" % p["robust_z"] if p["outlier"] else ""}'
                  '</title></circle>')
        if p["outlier"]:
            circle = f'<a href="{html.escape(p["report"])}">{circle}</a>'
        parts.append(circle)
    parts.append("</svg>")
    return "".join(parts)


def make_thumbnails(jobs, *, nprocs=None):
    """``{run_id: (chimap, png)}`` -> ``{run_id: png}``, thumbnails not yet up to
    date drawn in ``nprocs`` processes (default: all cores; reading the
    compressed Chimaps dominates, about 0.1-0.2 s per 1 mm map)."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    todo = {k: v for k, v in jobs.items()
            if not (v[1].is_file() and v[1].stat().st_mtime >= Path(v[0]).stat().st_mtime)}
    nprocs = nprocs or os.cpu_count() or 1
    if len(todo) > 4 and nprocs > 1:
        with ProcessPoolExecutor(max_workers=nprocs) as pool:
            list(pool.map(thumbnail, *zip(*todo.values()), chunksize=8))
    else:
        for chimap, png in todo.values():
            thumbnail(chimap, png)
    return {k: v[1] for k, v in jobs.items()}


def write_group_report(group_dir, runs, regions_rows, processing, *, nprocs=None):
    """Write ``group_dir/qsmprep_group.html``.

    ``runs``: one dict per run (``run_id``, ``subject``, ``chimap``,
    ``report``, ``settings_group``); ``regions_rows``: the long table
    (with ``robust_z`` and ``outlier``); ``processing``: the metadata dict of
    :func:`qsmprep.workflows.group.processing_metadata`.
    """
    group_dir = Path(group_dir)
    figures = group_dir / "figures"
    pngs = make_thumbnails(
        {run["run_id"]: (run["chimap_path"], figures / f"{run['run_id']}_desc-chi_thumb.png")
         for run in runs if run.get("chimap_path") and Path(run["chimap_path"]).is_file()},
        nprocs=nprocs)
    cards = []
    for run in runs:
        src = None
        if run["run_id"] in pngs:
            src = pngs[run["run_id"]].relative_to(group_dir).as_posix()
        flag = (' <span class="flag">settings differ</span>'
                if run["settings_group"] != 1 else "")
        img = (f'<img src="{html.escape(src)}" alt="chi of {html.escape(run["run_id"])}" '
               f'width="{THUMB_PX}">' if src else '<div class="nothumb">no Chimap</div>')
        cards.append(f'<figure class="run" data-subject="{html.escape(run["subject"])}">'
                     f'<a href="{html.escape(run["report"])}">{img}</a>'
                     f'<figcaption>{html.escape(run["run_id"])}{flag}</figcaption></figure>')
    by_region = {}
    for row in regions_rows:
        by_region.setdefault(row["region"], []).append(row)
    strips = "".join(_strip_svg(region, points) for region, points in by_region.items())
    outliers = [r for r in regions_rows if r["outlier"]]
    outlier_rows = "".join(
        f'<tr><td><a href="{html.escape(r["report"])}">{html.escape(r["run_id"])}</a></td>'
        f'<td>{html.escape(r["region"])}</td><td>{r["mean_ppm"]:.4f}</td>'
        f'<td>{r["robust_z"]:.1f}</td></tr>' for r in outliers)
    differing = processing.get("differing_settings", {})
    settings = "".join(
        f"<li><code>{html.escape(key)}</code>: " + "; ".join(
            f"{html.escape(value)} ({len(ids)} run(s): {html.escape(', '.join(ids[:10]))}"
            f"{' …' if len(ids) > 10 else ''})" for value, ids in values.items()) + "</li>"
        for key, values in differing.items())
    n_sub = len({r["subject"] for r in runs})
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>qsmprep group report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.runs {{ display: flex; flex-wrap: wrap; gap: 6px; }}
figure.run {{ margin: 0; width: {THUMB_PX + 8}px; font-size: 11px; text-align: center; }}
figure.run img {{ background: #000; display: block; margin: auto; }}
.flag {{ color: #d62728; font-weight: bold; }}
.strips {{ display: flex; flex-wrap: wrap; gap: 12px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 6px; }}
.nothumb {{ width: {THUMB_PX}px; height: {THUMB_PX}px; background: #eee; }}
</style></head>
<body data-runs="{len(runs)}" data-subjects="{n_sub}">
<h1>qsmprep group report</h1>
<p>{len(runs)} run(s) of {n_sub} subject(s); qsmprep version(s)
{html.escape(', '.join(processing.get('versions', [])) or 'n/a')}.
Regional statistics: <code>group/qsmprep_regions.tsv</code>; processing metadata:
<code>group/qsmprep_processing.json</code>.</p>
<h2>Settings</h2>
{'<p>All runs were processed with the same settings.</p>' if not differing else
 '<p class="flag">Runs were processed with different settings:</p><ul>' + settings + '</ul>'}
<h2>Regional mean susceptibility (ppm)</h2>
<p>One point per run; red: robust z-score beyond {OUTLIER_Z} (median and MAD of the
region over all runs), linked to the run's report. Hover a point for its run.</p>
<div class="strips">{strips or '<p>No regional statistics (run the participant level with --regions).</p>'}</div>
<h2>Outliers</h2>
{'<table><tr><th>run</th><th>region</th><th>mean (ppm)</th><th>robust z</th></tr>'
 + outlier_rows + '</table>' if outliers else '<p>None.</p>'}
<h2>Runs</h2>
<p>Middle axial slice of each Chimap, window {THUMB_WINDOW_PPM[0]} to {THUMB_WINDOW_PPM[1]} ppm;
click for the subject report.</p>
<div class="runs">{''.join(cards)}</div>
<script>
window.addEventListener('load', function () {{
  var images = Array.prototype.slice.call(document.querySelectorAll('figure.run img'));
  var broken = images.filter(function (im) {{ return !(im.complete && im.naturalWidth > 0); }});
  document.body.setAttribute('data-figures-total', images.length);
  document.body.setAttribute('data-figures-loaded', images.length - broken.length);
}});
</script>
</body></html>
"""
    return write_text(group_dir / "qsmprep_group.html", page)
