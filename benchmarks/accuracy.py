#!/usr/bin/env python
"""Accuracy benchmark of every registered QSM method on simulated heads.

For a fixed, seeded set of phantoms from :mod:`qsmprep.sim` (the Challenge 2.0
head at 3 T, the same with B0 tilted by 20°, an MNI head at 7 T), every method
registered in :mod:`qsmprep.qsm.registry` is run per stage:

* background field removal, from the true total field, scored against the true
  local field;
* dipole inversion, from the true local field, scored against the true χ;
* background removal + inversion (:data:`JOINT_PAIRS`), from the true total
  field, scored against the true χ (NeXtQSM's joint mode against classical
  pairs);
* the whole pipeline from multi-echo phase and magnitude (unwrapping → B0 →
  masking → background removal → inversion → referencing), scored against the
  true χ.

The stage runs get the true brain mask; the pipeline builds its own mask.
All scores are taken in the true brain mask with :mod:`qsmprep.qsm.metrics`
(QSM-CI conventions). Writes the ``accuracy`` section of docs/benchmarks.md and
benchmarks/results/accuracy.json. A method that raises is reported as failed
with its error.

Usage: ``python benchmarks/accuracy.py [--quick]`` (``--quick``: 2 mm phantoms);
``--from-json FILE`` re-renders the docs section from saved results;
``--update --methods A B`` re-runs only those methods (e.g. after retraining a
network; ``vsharp+tv`` names a joint pair) and replaces their rows in the
saved results.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DOCS, RESULTS, ROOT, fmt, hardware, hardware_note, markdown_table, replace_section, timed,
    write_json,
)

def section(quick):
    """docs/benchmarks.md section (and results file stem) of a mode: the full
    1 mm run and the 2 mm ``--quick`` run are kept side by side."""
    return "accuracy-quick" if quick else "accuracy"

TRUE_MASK = "true brain mask"
SEED = 20240611

STAGES = {
    "bf_removal": "Background field removal: true total field → local field",
    "inversion": "Dipole inversion: true local field → χ",
    "joint": "Background removal + dipole inversion: true total field → χ",
    "pipeline": "Whole pipeline: multi-echo phase → χ",
}

# QSM-CI leaderboard, Challenge 2.0 "Sim" head (see /work/shared/QSM_NOTES.md),
# best NRMSE (%) per method, keyed by the method's registry name with '-' and
# '_' removed.
LEADERBOARD = {
    "bf_removal": {"ismv": "28.1", "resharp": "33.0", "sharp": "36.3", "lbv": "42.4",
                   "vsharp": "42.6", "pdf": "44.5"},
    "inversion": {"tv": "26.5", "tvadmm": "26.5", "tkd": "36.3", "ilsqr": "53.3",
                  "medi": "53–62", "qsmnet+": "52.8", "modl": "73.8"},
    "joint": {"nextqsm+nextqsm": "70.3"},
    "pipeline": {},
}
LEADERBOARD_NOTE = (
    "QSM-CI column: best NRMSE (%) of the same method on the QSM-CI leaderboard "
    "(Challenge 2.0 \"Sim\" head, 0.64 mm; QSM_NOTES.md), for context only: a different "
    "phantom, resolution and parameter tuning. Leaderboard bests per stage: background removal "
    "iSMV 28.1; dipole inversion TV-ADMM 26.5 (XSIM 0.85); total field → χ iSMV+HD-QSM 39.1, "
    "NeXtQSM 70.3; whole pipeline from raw phase 68.3 (XSIM 0.38), iQSM 74.6."
)

@dataclasses.dataclass
class Case:
    """One phantom with its ground truth and simulated acquisition."""

    name: str
    description: str
    voxel_size_mm: tuple
    b0_dir: tuple
    field_strength_t: float
    echo_times_s: tuple
    mask: np.ndarray          # true brain mask (bool)
    labels: np.ndarray | None  # Challenge 2.0-style labels, or None
    chi: np.ndarray           # true χ (ppm) in the brain, 0 outside
    total_field: np.ndarray   # ppm, from all sources (brain + background)
    local_field: np.ndarray   # ppm, from the brain's own sources, in the mask
    magnitude: np.ndarray     # (X, Y, Z, E)
    phase: np.ndarray         # (X, Y, Z, E) rad, wrapped


def case_specs(quick):
    """The fixed phantom set: (name, description, builder, kwargs)."""
    vox = 2.0 if quick else 1.0
    te3 = (0.004, 0.012, 0.020, 0.028)
    te7 = (0.004, 0.008, 0.012, 0.016)
    return [
        ("challenge-3T", f"Challenge 2.0 head, {vox:g} mm, 3 T, 4 echoes, B0 along z",
         "challenge_head", dict(voxel_size_mm=vox, field_strength_t=3.0, echo_times_s=te3,
                                b0_tilt_deg=0.0)),
        ("challenge-3T-oblique20", f"Challenge 2.0 head, {vox:g} mm, 3 T, 4 echoes, B0 tilted 20°",
         "challenge_head", dict(voxel_size_mm=vox, field_strength_t=3.0, echo_times_s=te3,
                                b0_tilt_deg=20.0)),
        ("mni-7T", f"MNI head, {vox:g} mm, 7 T, 4 echoes, B0 along z",
         "mni_head", dict(voxel_size_mm=vox, field_strength_t=7.0, echo_times_s=te7,
                          b0_tilt_deg=0.0)),
    ]


def build_case(name, description, builder, voxel_size_mm, field_strength_t, echo_times_s,
               b0_tilt_deg, snr=100.0, margin_mm=12.0):
    """Simulate one phantom with :mod:`qsmprep.sim` (whole head, seeded), then
    crop every map to the brain's bounding box plus ``margin_mm``.

    The background-removal input is the unshimmed total field (its truth, the
    local field, is then exact); the phase carries the shimmed field, a smooth
    phase offset, R2* decay and noise (``simulate_acquisition``). Both
    smooth the chi outside the brain (1 mm Gaussian partial volume,
    :func:`qsmprep.sim.forward.smooth_outside`; the acquisition its M0 too) so
    that the background field is harmonic in the brain (until 2026-11-26 it
    was not: V-SHARP of the background alone left 67 % of the local field on
    the 20-degree head).
    """
    from qsmprep.qsm.mask import bbox_slices
    from qsmprep.sim import acquisition, forward, phantoms

    head = getattr(phantoms, builder)(voxel_size_mm, rng=SEED)
    b0_dir = acquisition.tilted_b0(b0_tilt_deg)
    acq = acquisition.simulate_acquisition(head, echo_times_s, field_strength_t, b0_dir=b0_dir,
                                           snr=snr, rng=SEED + 1)
    total = forward.total_field(head.chi_ppm, head.voxel_size_mm, b0_dir,
                                chi_ambient_ppm=head.chi_ambient_ppm, brain_mask=head.brain_mask)
    mask = np.asarray(head.brain_mask, bool)
    box = bbox_slices(mask, margin=int(np.ceil(margin_mm / min(head.voxel_size_mm))))
    mask = mask[box]

    def brain(a):
        return np.where(mask, np.asarray(a, np.float32)[box], np.float32(0))

    return Case(name, description, tuple(head.voxel_size_mm), tuple(float(b) for b in b0_dir),
                float(field_strength_t), tuple(echo_times_s), mask,
                np.asarray(head.labels)[box], brain(head.chi_ppm), brain(total),
                brain(acq.local_field_ppm), acq.magnitude[box], acq.phase[box])


def call_full(stage, name, *args, **extra):
    """Run a registered method and return all it returns; ``extra`` keywords
    are passed only to methods whose function accepts them (e.g. a voxel size
    for Laplacian unwrapping)."""
    from qsmprep.qsm import registry

    params = inspect.signature(registry.get(stage, name).func).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in extra.items() if accepts_any or k in params}
    return registry.run(stage, name, *args, **kwargs)


def call(stage, name, *args, **extra):
    """:func:`call_full`, but an inversion gives χ only (one that also gives a
    local field, total field inversion, returns it second)."""
    from qsmprep.qsm import registry

    out = call_full(stage, name, *args, **extra)
    return out[0] if stage == "inversion" and registry.gives_local_field(name) else out


PIPELINE_STAGES = ("unwrapping", "echo_combination", "masking", "bf_removal", "inversion",
                   "referencing")


def magnitude_inputs(case):
    """The magnitude keywords of an inversion, as the app passes them: the
    magnitude, and every echo's with the echo times (TFI's CSF search checks
    their R2*)."""
    return {"magnitude": case.magnitude, "magnitude_echoes": case.magnitude,
            "echo_times_s": case.echo_times_s}


def _timed_into(times, stage, func, *args, **kwargs):
    """``func(*args, **kwargs)``, its wall time (s) stored in ``times[stage]``."""
    out, times[stage] = timed(func, *args, **kwargs)
    return out


def front_end(case, methods, *, device=None, times=None):
    """The app's steps before the background removal on the case's phase and
    magnitude: MCPC-3D-S phase-offset removal → unwrapping → echo combination
    (B0 and its noise map N_std, Hz) → mask (root-sum-of-squares magnitude and
    unwrapping quality; the true mask for :data:`TRUE_MASK`), with
    ``methods[stage]``. Returns ``(b0_hz, noise_hz, mask)``; ``device`` and
    ``times`` as for :func:`pipeline`."""
    from qsmprep.qsm import registry
    from qsmprep.qsm.unwrap import mcpc3ds

    times = {} if times is None else times
    on = {} if device is None else {"device": device}
    vox, te = case.voxel_size_mm, case.echo_times_s
    phase, _ = _timed_into(times, "mcpc3ds", mcpc3ds, case.phase, case.magnitude, te,
                           voxel_size_mm=vox)
    unwrapped, quality = _timed_into(times, "unwrapping", call, "unwrapping",
                                     methods["unwrapping"], phase, magnitude=case.magnitude,
                                     echo_times_s=te, voxel_size_mm=vox, **on)
    b0_hz, noise_hz = _timed_into(times, "echo_combination", call, "echo_combination",
                                  methods["echo_combination"], unwrapped, case.magnitude, te,
                                  **on)
    if methods["masking"] == TRUE_MASK:
        mask = case.mask
    else:
        rss = np.sqrt(np.sum(case.magnitude**2, axis=-1))
        mask = _timed_into(times, "masking", call, "masking", methods["masking"], rss,
                           quality=quality, voxel_size_mm=vox, **on,
                           **registry.masking_params(methods["masking"], methods["inversion"]))
    return b0_hz, noise_hz, np.asarray(mask, bool)


def pipeline(case, methods, *, device=None, times=None, intermediates=None):
    """χ (ppm) from the case's phase and magnitude, as the app computes it:
    :func:`front_end` (MCPC-3D-S → unwrapping → echo combination → mask) →
    total field → background removal → inversion → referencing, with
    ``methods[stage]``; N_std and the magnitude go to the methods that take them.
    ``device`` (e.g. ``"cuda"``) goes to the methods that take one (the app's
    ``--device``); ``times`` (a dict), when given, receives each stage's wall
    time (s), and ``intermediates`` (a dict) the brain ``mask`` of the masking
    stage."""
    from qsmprep.qsm.units import hz_to_ppm

    times = {} if times is None else times
    on = {} if device is None else {"device": device}
    vox, te, fs = case.voxel_size_mm, case.echo_times_s, case.field_strength_t
    b0_hz, noise_hz, mask = front_end(case, methods, device=device, times=times)
    total, noise_std_ppm = hz_to_ppm(b0_hz, fs), hz_to_ppm(noise_hz, fs)
    if intermediates is not None:
        intermediates["mask"] = mask
    local, mask = _timed_into(times, "bf_removal", call, "bf_removal", methods["bf_removal"],
                              total, mask, vox, b0_dir=case.b0_dir,
                              noise_std_ppm=noise_std_ppm, **on)
    chi = _timed_into(times, "inversion", call, "inversion", methods["inversion"], local, mask,
                      vox, b0_dir=case.b0_dir, noise_std_ppm=noise_std_ppm,
                      **magnitude_inputs(case), **on)
    return _timed_into(times, "referencing", call, "referencing", methods["referencing"], chi,
                       mask, magnitude=case.magnitude, voxel_size_mm=vox, echo_times_s=te)


#: pipelines compared with the default in every mode (the choice of the
#: default is argued from them in docs/methods.md), as the pair of
#: background removal and inversion they use: the classical chain
#: (``--pipeline classical``, the default from 2026-11-22 to 2026-11-27),
#: also with the true brain mask, the unweighted V-SHARP + TV-ADMM chain (the
#: default until 2026-11-22), the two crossings of those, and ``--pipeline
#: ir2qsm``
CANDIDATES = ({"bf_removal": "pdf", "inversion": "ilsqr"},
              {"bf_removal": "pdf", "inversion": "ilsqr", "masking": TRUE_MASK},
              {"bf_removal": "vsharp", "inversion": "tv"},
              {"bf_removal": "vsharp", "inversion": "ilsqr"},
              {"bf_removal": "pdf", "inversion": "tv"},
              {"bf_removal": "vsharp", "inversion": "ir2qsm"})


def pipeline_variants(quick):
    """The app's default pipeline (``qsmprep.config.DEFAULT_METHODS``), the
    same with the true brain mask (separates masking errors from the rest),
    the :data:`CANDIDATES` and, unless ``quick``, one variant per other
    unwrapping and echo-combination method (the stage tables cover
    background removal and inversion)."""
    from qsmprep.config import DEFAULT_METHODS
    from qsmprep.qsm import registry

    default = {stage: DEFAULT_METHODS[stage] for stage in PIPELINE_STAGES}
    variants = {"default: " + " → ".join(default.values()): default,
                f"default with the {TRUE_MASK}": {**default, "masking": TRUE_MASK}}
    for change in CANDIDATES:
        if any(default[k] != v for k, v in change.items()):
            variants[", ".join(f"{k}={v}" for k, v in change.items())] = {**default, **change}
    for stage in () if quick else ("unwrapping", "echo_combination"):
        for name in registry.names(stage):
            if name != default[stage]:
                variants[f"{stage}={name}"] = {**default, stage: name}
    return variants


def selection(methods=None, skip=()):
    """``keep(name)`` of ``--methods`` and ``--skip``. A name may join methods
    with ``+`` (a joint pair, the methods a pipeline variant changes): it is
    left out when it or one of its methods is skipped, and kept when no
    methods are given or when it or one of its methods is."""
    def keep(name):
        parts = [name, *name.split("+")]
        if any(p in skip for p in parts):
            return False
        return not methods or any(p in methods for p in parts)
    return keep


def selected_variants(variants, keep):
    """The pipeline variants (first: the default) whose changed methods
    (``keep("vsharp+tv")``) are kept; the default itself when its methods are."""
    default = next(iter(variants.values()))
    out = {}
    for label, methods in variants.items():
        own = [m for stage, m in methods.items() if m != default[stage]]
        if keep("+".join(own or default.values())):
            out[label] = methods
    return out


def score_row(stage, method, case, func, truth, labels=None, extra=None):
    """Run ``func`` timed and score it; a failure becomes a row with the error.
    ``extra(recon)`` returns more fields for the row (e.g. error by depth)."""
    from qsmprep.qsm import metrics

    row = {"stage": stage, "method": method, "phantom": case.name}
    try:
        cpu = time.process_time()
        out, seconds = timed(func)
        cpu = time.process_time() - cpu
        recon = out[0] if isinstance(out, tuple) else out
        row.update(status="ok", runtime_s=seconds, cpu_s=cpu,
                   metrics=metrics.score(recon, truth, case.mask, labels))
        row.update(extra(recon) if extra else {})
    except Exception as exc:  # noqa: BLE001 - a failing method is a result, not a crash
        error = f"{type(exc).__name__}: {exc}".replace(str(ROOT) + "/", "")
        row.update(status="failed", error=error.split(". ")[0].strip()[:200],
                   traceback=traceback.format_exc(limit=3))
    print(f"[accuracy] {stage:10s} {method:40s} {case.name:24s} {row['status']}"
          + (f" NRMSE {row['metrics']['nrmse']:.1f} % in {row['runtime_s']:.1f} s"
             if row["status"] == "ok" else f" {row['error']}"), flush=True)
    return row


#: (background removal, inversion) pairs of the joint stage: NeXtQSM's joint
#: mode, the issue's classical yardstick, the classical pipeline's pair and the
#: default's (total field inversion, no background stage)
JOINT_PAIRS = (("nextqsm", "nextqsm"), ("vsharp", "tv"), ("pdf", "ilsqr"), ("none", "tfi"))


def joint(case, bfr, inversion):
    """χ (ppm) from the true total field: ``bfr`` then ``inversion`` on the
    mask that ``bfr`` returns (eroded by the SMV methods)."""
    local, mask = call("bf_removal", bfr, case.total_field, case.mask, case.voxel_size_mm,
                       b0_dir=case.b0_dir)
    return call("inversion", inversion, local, mask, case.voxel_size_mm, b0_dir=case.b0_dir,
                **magnitude_inputs(case))


def local_field_methods():
    """Background-removal methods that give a local field to score: all but
    those that pass the total field on (``none``, for ``--inversion tfi``)."""
    from qsmprep.qsm import registry

    return [n for n in registry.names("bf_removal") if not registry.passes_total_field(n)]


def run_case(case, stages, quick=False, keep=lambda name: True):
    """All rows of one phantom; ``keep(name)`` (:func:`selection`) selects the
    methods to run, the joint pairs (``keep("vsharp+tv")``) and the pipeline
    variants (by the methods they change from the default, the default by its
    own)."""
    from qsmprep.qsm import registry

    rows = []
    if "bf_removal" in stages:
        for name in filter(keep, local_field_methods()):
            rows.append(score_row("bf_removal", name, case, lambda n=name: call(
                "bf_removal", n, case.total_field, case.mask, case.voxel_size_mm,
                b0_dir=case.b0_dir), case.local_field))
    if "inversion" in stages:
        for name in filter(keep, registry.names("inversion")):
            rows.append(score_row("inversion", name, case, lambda n=name: call(
                "inversion", n, case.local_field, case.mask, case.voxel_size_mm,
                b0_dir=case.b0_dir, **magnitude_inputs(case)), case.chi, case.labels))
    if "joint" in stages:
        for bfr, inv in JOINT_PAIRS:
            if keep(f"{bfr}+{inv}"):
                rows.append(score_row("joint", f"{bfr} + {inv}", case,
                                      lambda b=bfr, i=inv: joint(case, b, i),
                                      case.chi, case.labels))
    if "pipeline" in stages:
        for label, methods in selected_variants(pipeline_variants(quick), keep).items():
            rows.append(score_row("pipeline", label, case, lambda m=methods: pipeline(case, m),
                                  case.chi, case.labels))
    return rows


def _key(name):
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def render(results):
    """The Markdown of the accuracy section from a results dict (see main)."""
    parts = [
        "## Accuracy on simulated heads"
        + (" (2 mm, quick mode)\n" if results["quick"] else " (1 mm)\n"),
        "Generated by `python benchmarks/accuracy.py"
        + (" --quick`" if results["quick"] else "`")
        + f" (raw numbers: `benchmarks/results/{section(results['quick'])}.json`). "
        "Metrics follow the QSM-CI "
        "scoring conventions (`qsmprep.qsm.metrics`): both maps zeroed outside the true brain "
        "mask, every mask voxel counts, a dropped voxel scores 0. NRMSE, detrended NRMSE "
        "(dNRMSE) and HFEN in %, lower is better; XSIM and the correlation (CC) as fractions, "
        "higher is better; coverage = fraction of the mask with a value. XSIM is raw, "
        "as QSM-CI scores it: it sees where a map puts its zero. These phantoms' truth "
        "is on the Challenge 2.0 scale, on which CSF is +0.019 ppm (the median of its "
        "CSF label +0.017 to +0.023 ppm, the brain's mean about 0), and the default "
        "references the ventricular CSF core to 0 (since 2026-12-05, rule R31-6; "
        "docs/methods.md), so the whole-pipeline rows, which all reference as the "
        "default does, sit about 0.02 ppm below the truth and their raw XSIM is low on "
        "these heads (the stage rows are not referenced). XSIM dm compares both maps "
        "demeaned in the mask, as NRMSE does (–: rows run before 2026-12-06 did not "
        "record it). The independent suite's truth has CSF at 0 (section "
        "`independent`).\n",
        "Phantoms (seeded, fixed):\n",
        "\n".join(f"- `{p['name']}`: {p['description']}, grid {' × '.join(map(str, p['shape']))}"
                  for p in results["phantoms"]) + "\n",
    ]
    headers = ["Method", "Phantom", "NRMSE", "dNRMSE", "HFEN", "XSIM", "XSIM dm", "CC",
               "Coverage", "Wall (s)", "CPU (s)", "QSM-CI NRMSE"]
    for stage, title in STAGES.items():
        rows = [r for r in results["rows"] if r["stage"] == stage]
        if not rows:
            continue
        table, failed = [], {}
        for r in rows:
            if r["status"] != "ok":
                failed.setdefault((r["method"], r["error"]), []).append(r["phantom"])
                continue
            m = r["metrics"]
            table.append([r["method"], r["phantom"], fmt(m["nrmse"]), fmt(m["nrmse_detrend"]),
                          fmt(m["hfen"]), fmt(m["xsim"], 3), fmt(m.get("xsim_demeaned"), 3),
                          fmt(m["correlation"], 3),
                          fmt(m["coverage"], 3), fmt(r["runtime_s"], 1),
                          fmt(r.get("cpu_s"), 1), LEADERBOARD[stage].get(_key(r["method"]), "–")])
        parts += [f"### {title}\n", markdown_table(headers, table)]
        best = {}
        for r in rows:
            value = r["metrics"]["nrmse"] if r["status"] == "ok" else None
            if value is not None and np.isfinite(value):
                b = best.get(r["phantom"])
                if b is None or value < b["metrics"]["nrmse"]:
                    best[r["phantom"]] = r
        if best:
            parts.append("Lowest NRMSE: " + "; ".join(
                f"{p}: {r['method']} ({fmt(r['metrics']['nrmse'])} %)" for p, r in best.items())
                + ".\n")
        if failed:
            parts.append("Failed:\n\n" + "\n".join(
                f"- **{method}** on {', '.join(phantoms)}: `{error}`"
                for (method, error), phantoms in failed.items()) + "\n")
    region_rows = [r for r in results["rows"]
                   if r["status"] == "ok" and "nrmse_dgm" in r["metrics"]]
    if region_rows:
        parts += [
            "### Challenge 2.0 region metrics (χ)\n",
            "Detrended NRMSE (%) in the tissue (labels 7–9), deep grey matter (1–6) and "
            "blood (11, dilated); DGM linearity |1 − slope| of region means; calcification "
            "moment deviation (ppm·voxel) and streaking.\n",
            markdown_table(
                ["Stage", "Method", "Phantom", "Tissue", "DGM", "Blood", "DGM lin.",
                 "Calc. moment dev.", "Calc. streak"],
                [[r["stage"], r["method"], r["phantom"]]
                 + [fmt(r["metrics"][k], d) for k, d in (
                     ("nrmse_tissue", 1), ("nrmse_dgm", 1), ("nrmse_blood", 1),
                     ("dgm_linearity", 3), ("calc_moment_dev", 2), ("calc_streak", 3))]
                 for r in region_rows]),
        ]
    total = results.get("total_wall_s")
    if total:
        parts.append(f"The whole run (phantoms, every method, every pipeline) took "
                     f"{total / 60:.1f} min of wall time.\n")
    for u in results.get("updates", []):
        rows = ", ".join(u["methods"]) if u.get("methods") else "every method"
        if u.get("skip"):
            rows += " but " + ", ".join(u["skip"])
        if u.get("stages") and set(u["stages"]) != set(STAGES):
            rows += " in the " + ", ".join(STAGES[s].split(":")[0].lower() for s in u["stages"])
            rows += " stages"
        note = f"; {u['note']}" if u.get("note") else ""
        parts.append(f"Re-run on {u['date']} with `--update` (rows of {rows}"
                     f"; {u['wall_s'] / 60:.1f} min{note}); every other row is from the whole "
                     "run.\n")
    for r in results.get("relabels", []):
        parts.append(f"Renamed on {r['date']}: {r['why']}; e.g. "
                     + "; ".join(f"“{a}” is now “{b}”" for a, b in list(r["mapping"].items())[:3])
                     + ".\n")
    parts += [LEADERBOARD_NOTE + "\n", hardware_note(results["hardware"]) + "\n"]
    return "\n".join(parts)


def merge(saved, new, whole_stages=()):
    """``saved`` results with the rows of ``new`` replacing those of the same
    (stage, method, phantom) in place (unknown ones appended). The saved rows
    of ``whole_stages`` (stages re-run with every method) on the phantoms of
    ``new`` are all dropped first: a pipeline variant is labelled by what it
    changes from the default of its day, so a row left from an older default
    would sit beside the new ones under a label that no longer says what ran."""
    def key(r):
        return r["stage"], r["method"], r["phantom"]

    rerun = {p["name"] for p in new["phantoms"]}
    fresh = {key(r): r for r in new["rows"]}
    rows = [fresh.pop(key(r), r) for r in saved["rows"]
            if not (r["stage"] in whole_stages and r["phantom"] in rerun)]
    known = {p["name"] for p in saved["phantoms"]}
    return {**saved, "rows": rows + list(fresh.values()),
            "phantoms": saved["phantoms"] + [p for p in new["phantoms"] if p["name"] not in known]}


def write_outputs(results, docs=DOCS, json_path=None):
    """Write the JSON results (default ``benchmarks/results/<section>.json``)
    and replace the mode's section of ``docs``."""
    name = section(results["quick"])
    write_json(json_path or RESULTS / f"{name}.json", results)
    replace_section(docs, name, render(results))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 mm phantoms (a few minutes)")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--phantoms", nargs="+", help="only these phantom names")
    parser.add_argument("--methods", nargs="+", help="only these stage methods")
    parser.add_argument("--skip", nargs="+", default=[], help="leave out these stage methods")
    parser.add_argument("--from-json", type=Path,
                        help="only re-render the docs section from a saved results file")
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--json", type=Path,
                        help="results file (default: benchmarks/results/accuracy[-quick].json)")
    parser.add_argument("--update", action="store_true",
                        help="replace only the rows run now (--methods, --stages) in the "
                        "saved results file")
    parser.add_argument("--note", help="why the rows were re-run (with --update; in the docs)")
    args = parser.parse_args(argv)
    json_path = args.json or RESULTS / f"{section(args.quick)}.json"
    if args.update and not args.methods and set(args.stages) == set(STAGES):
        parser.error("--update needs --methods or --stages (the rows to re-run)")
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        replace_section(args.docs, section(saved["quick"]), render(saved))
        print(f"[accuracy] rendered {args.from_json} into {args.docs}")
        return

    saved = json.loads(json_path.read_text()) if args.update else None
    if saved and saved["quick"] != args.quick:
        parser.error(f"{json_path} holds a {'--quick' if saved['quick'] else 'full'} run")
    results = {"quick": args.quick, "hardware": hardware(), "seed": SEED,
               "phantoms": [], "rows": []}
    started = time.perf_counter()
    for name, description, builder, kwargs in case_specs(args.quick):
        if args.phantoms and name not in args.phantoms:
            continue
        case, seconds = timed(build_case, name, description, builder, **kwargs)
        print(f"[accuracy] built {name} {case.mask.shape} in {seconds:.1f} s", flush=True)
        results["phantoms"].append({
            "name": name, "description": description, "shape": list(case.mask.shape),
            "voxel_size_mm": list(case.voxel_size_mm), "b0_dir": list(case.b0_dir),
            "field_strength_t": case.field_strength_t, "echo_times_s": list(case.echo_times_s)})
        results["rows"] += run_case(
            case, args.stages, args.quick,
            keep=selection(args.methods, args.skip))
        wall = time.perf_counter() - started
        if saved is None:
            results["total_wall_s"] = wall
            write_outputs(results, args.docs, json_path)  # partial results survive a crash
        else:
            update = {"date": time.strftime("%Y-%m-%d"), "methods": args.methods,
                      "skip": args.skip, "stages": args.stages, "wall_s": wall,
                      "note": args.note}
            whole = () if args.methods or args.skip else args.stages
            merged = merge(saved, results, whole)
            merged["updates"] = saved.get("updates", []) + [update]
            write_outputs(merged, args.docs, json_path)
    print(f"[accuracy] wrote {args.docs} and {json_path}")


if __name__ == "__main__":
    main()
