"""Group level: a table of every run already processed in the output folder.

``qsmprep bids_dir output_dir group`` reads the ``*_Chimap.json`` sidecars
and maps written by participant-level runs and lists them in
``group/qsmprep_runs.tsv``, one row per run, with the methods used and the
mean and standard deviation of chi (ppm) inside the run's brain mask.

With the runs' ``*_desc-regions_stats.tsv`` (``--regions``) it also writes
(:func:`write_group_outputs`):

* ``group/qsmprep_regions.tsv``: long format, one row per run and region,
  with the robust z-score of the regional mean among all runs;
* ``group/qsmprep_processing.json``: versions, methods and parameters of
  every run, and the settings in which runs differ;
* ``group/qsmprep_group.html``: the group report (:mod:`qsmprep.reports.group`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nb
import numpy as np

from ..utils.files import atomic_write, write_text
from .qsm import PIPELINE_STAGES

#: one column per pipeline stage: the method name from the sidecar's QSMMethods
COLUMNS = ("subject", "session", "acquisition", "reconstruction", "run", "chimap",
           "magnetic_field_strength_t", "n_echoes", *PIPELINE_STAGES,
           "mask_voxels", "chi_mean_ppm", "chi_std_ppm")

_SHORT = {"sub": "subject", "ses": "session", "acq": "acquisition",
          "rec": "reconstruction", "run": "run"}


def write_group_table(output_dir, *, nprocs=1):
    """Write ``group/qsmprep_runs.tsv`` (+ ``.json`` column descriptions).

    Returns the TSV path; raises ``FileNotFoundError`` when no participant
    level output is found. ``nprocs`` processes read the maps.
    """
    output_dir = Path(output_dir)
    sidecars = native_chimaps(output_dir)
    if not sidecars:
        raise FileNotFoundError(
            f"No *_Chimap.json in {output_dir}; run the participant level first"
        )
    if nprocs > 1 and len(sidecars) > 4:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=nprocs) as pool:
            rows = list(pool.map(_row, sidecars, [output_dir] * len(sidecars), chunksize=8))
    else:
        rows = [_row(path, output_dir) for path in sidecars]
    group = output_dir / "group"
    group.mkdir(exist_ok=True)
    tsv = group / "qsmprep_runs.tsv"

    def write_rows(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(tsv, write_rows)
    write_text(group / "qsmprep_runs.json", json.dumps({
        "chimap": {"Description": "Chimap path relative to the output folder"},
        "magnetic_field_strength_t": {"Units": "T"},
        "mask_voxels": {"Description": "voxels in the run's desc-brain_mask"},
        "chi_mean_ppm": {"Description": "mean chi inside the brain mask", "Units": "ppm"},
        "chi_std_ppm": {"Description": "standard deviation of chi inside the brain mask",
                        "Units": "ppm"},
    }, indent=2) + "\n")
    return tsv


def native_chimaps(output_dir):
    """The ``*_Chimap.json`` of every run, on its own grid (not ``space-<template>``)."""
    return [p for p in sorted(Path(output_dir).glob("sub-*/**/anat/*_Chimap.json"))
            if "_space-" not in p.name]


def _row(sidecar, output_dir):
    meta = json.loads(sidecar.read_text())
    chimap = sidecar.with_name(sidecar.name.replace(".json", ".nii.gz"))
    mask_path = sidecar.with_name(sidecar.name.replace("_Chimap.json", "_desc-brain_mask.nii.gz"))
    entities = dict(part.split("-", 1) for part in sidecar.name.split("_")[:-1])
    row = {_SHORT[k]: v for k, v in entities.items() if k in _SHORT}
    methods = meta.get("QSMMethods", {})
    row.update({stage: methods.get(stage, {}).get("Name", "n/a") for stage in PIPELINE_STAGES})
    row.update(
        chimap=chimap.relative_to(output_dir).as_posix(),
        magnetic_field_strength_t=meta.get("MagneticFieldStrength", ""),
        n_echoes=len(meta.get("EchoTime", [])),
    )
    if chimap.is_file() and mask_path.is_file():
        chi = np.asanyarray(nb.load(chimap).dataobj, dtype=np.float64)
        mask = np.asanyarray(nb.load(mask_path).dataobj) > 0
        row.update(mask_voxels=int(mask.sum()),
                   chi_mean_ppm=f"{chi[mask].mean():.6g}" if mask.any() else "n/a",
                   chi_std_ppm=f"{chi[mask].std():.6g}" if mask.any() else "n/a")
    return {c: row.get(c, "n/a") for c in COLUMNS}


#: columns of group/qsmprep_regions.tsv
REGION_COLUMNS = ("subject", "session", "acquisition", "reconstruction", "run", "region",
                  "label", "voxels", "mean_ppm", "median_ppm", "std_ppm", "p5_ppm", "p95_ppm",
                  "robust_z", "outlier", "settings_group")
#: sidecar keys of a run's settings that differ between runs only by file name
_RUN_SPECIFIC = ("File", "Description")


def write_group_outputs(output_dir, *, nprocs=None):
    """``qsmprep_runs.tsv`` plus the regional table, the processing metadata and
    the group report (thumbnails drawn in ``nprocs`` processes; default all
    cores). Returns the paths written."""
    from ..reports.group import OUTLIER_Z, write_group_report
    from ..regions.stats import robust_z

    import os

    output_dir = Path(output_dir)
    nprocs = nprocs or os.cpu_count() or 1
    runs_tsv = write_group_table(output_dir, nprocs=nprocs)
    group = output_dir / "group"
    runs = [_run_info(p, output_dir) for p in native_chimaps(output_dir)]
    processing = processing_metadata(runs)
    groups = processing["settings_group_of_run"]
    rows = []
    for run in runs:
        run["settings_group"] = groups[run["run_id"]]
        if run["stats"] is None:
            continue
        with open(run["stats"], newline="") as f:
            for rec in csv.DictReader(f, delimiter="\t"):
                rows.append({**run["entities"], "run_id": run["run_id"], "report": run["report"],
                             "region": rec["region"], "label": rec.get("label", "n/a"),
                             **{k: _float(rec.get(k)) for k in REGION_COLUMNS[8:13]},
                             "voxels": rec.get("voxels", "n/a"),
                             "settings_group": run["settings_group"]})
    for region in dict.fromkeys(r["region"] for r in rows):
        sel = [r for r in rows if r["region"] == region]
        for r, z in zip(sel, robust_z([r["mean_ppm"] for r in sel])):
            r["robust_z"] = float(z)
            r["outlier"] = bool(np.isfinite(z) and abs(z) > OUTLIER_Z)

    def fmt(value):
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return f"{value:.6g}" if np.isfinite(value) else "n/a"
        return "n/a" if value in (None, "") else str(value)

    def write_rows(tmp):
        with open(tmp, "w", newline="") as f:
            f.write("\t".join(REGION_COLUMNS) + "\n")
            for r in rows:
                f.write("\t".join(fmt(r.get(c)) for c in REGION_COLUMNS) + "\n")

    regions_tsv = atomic_write(group / "qsmprep_regions.tsv", write_rows)
    write_text(group / "qsmprep_regions.json", json.dumps({
        "region": {"Description": "region of the run's *_desc-regions_dseg (the "
                   "--regions-atlas, QSMChallenge by default: the runs' "
                   "desc-regions_stats.json Atlas, Regions.Atlas in qsmprep_processing.json)"},
        **{c: {"Description": f"{c[:-4].replace('p5', '5th percentile').replace('p95', '95th percentile')}"
               " of chi in the region", "Units": "ppm"} for c in REGION_COLUMNS[8:13]},
        "voxels": {"Description": "voxels of the region inside the run's brain mask"},
        "robust_z": {"Description": "(mean - median over runs) / (1.4826 MAD) within the region"},
        "outlier": {"Description": f"|robust_z| > {OUTLIER_Z}"},
        "settings_group": {"Description": "1: the most common processing settings; other "
                           "numbers: runs whose settings differ (group/qsmprep_processing.json)"},
    }, indent=2) + "\n")
    meta_json = write_text(group / "qsmprep_processing.json",
                           json.dumps({k: v for k, v in processing.items()
                                       if k != "settings_group_of_run"}, indent=2) + "\n")
    report = write_group_report(group, runs, rows, processing, nprocs=nprocs)
    return {"runs": runs_tsv, "regions": regions_tsv, "processing": meta_json, "report": report}


def _float(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def _run_info(sidecar, output_dir):
    run_id = sidecar.name[: -len("_Chimap.json")]
    entities = dict(part.split("-", 1) for part in run_id.split("_"))
    stats = sidecar.with_name(f"{run_id}_desc-regions_stats.tsv")
    stats_json = stats.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    regions_meta = json.loads(stats_json.read_text()) if stats_json.is_file() else {}
    return {
        "run_id": run_id,
        "subject": entities["sub"],
        "entities": {_SHORT[k]: v for k, v in entities.items() if k in _SHORT},
        "chimap": sidecar.with_name(f"{run_id}_Chimap.nii.gz").relative_to(output_dir).as_posix(),
        "chimap_path": str(sidecar.with_name(f"{run_id}_Chimap.nii.gz")),
        "report": f"../sub-{entities['sub']}.html",
        "stats": stats if stats.is_file() else None,
        "settings": _settings(meta, regions_meta),
    }


def _settings(meta, regions_meta):
    """The settings of a run that should agree across a study, flattened
    (``QSMMethods.<stage>`` -> JSON of the method and its parameters)."""
    out = {"SoftwareVersion": json.dumps(meta.get("SoftwareVersion"))}
    for stage, record in sorted(meta.get("QSMMethods", {}).items()):
        record = {k: v for k, v in record.items() if k not in _RUN_SPECIFIC}
        out[f"QSMMethods.{stage}"] = json.dumps(record, sort_keys=True)
    for key in ("Atlas", "Registration", "ReferenceRegion"):
        out[f"Regions.{key}"] = json.dumps(regions_meta.get(key))
    return out


def processing_metadata(runs):
    """Versions, methods and parameters per run; the settings in which runs
    differ; each run's settings group (1 = the most common settings)."""
    signatures = {r["run_id"]: json.dumps(r["settings"], sort_keys=True) for r in runs}
    counts = {}
    for sig in signatures.values():
        counts[sig] = counts.get(sig, 0) + 1
    order = {sig: i + 1 for i, sig in enumerate(sorted(counts, key=lambda s: -counts[s]))}
    keys = sorted({k for r in runs for k in r["settings"]})
    differing = {}
    for key in keys:
        values = {}
        for r in runs:
            values.setdefault(r["settings"].get(key, "null"), []).append(r["run_id"])
        if len(values) > 1:
            differing[key] = values
    return {
        "versions": sorted({json.loads(r["settings"]["SoftwareVersion"]) or "unknown"
                            for r in runs}),
        "consistent": not differing,
        "differing_settings": differing,
        "runs": [{"run": r["run_id"], "chimap": r["chimap"],
                  "settings_group": order[signatures[r["run_id"]]],
                  "settings": {k: json.loads(v) for k, v in r["settings"].items()}}
                 for r in runs],
        "settings_group_of_run": {rid: order[sig] for rid, sig in signatures.items()},
    }
