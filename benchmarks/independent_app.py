#!/usr/bin/env python
"""The app itself on the independent heads: does ``qsmprep`` give users the map
the benchmark scores?

``independent.py`` scores the default chain called in-process
(:func:`accuracy.pipeline`), with the head's B0 direction, field strength and
phase in radians handed over as numbers. A user's data reach the app as a BIDS
dataset the way a scanner and dcm2niix write it. For each head of a suite
(default: the held-out heads, rule R26-0), this script:

* writes the head as a BIDS dataset in Siemens conventions: phase as integers
  in [-4096, 4095] (no units in the sidecar), magnitude as integers, the
  oblique affine the B0 direction must be read from, ``EchoTime`` and
  ``EchoNumber`` per echo, ``MagneticFieldStrength`` rounded to the tesla and
  ``ImagingFrequency`` (MHz) beside it, as the scanner reports them;
* runs ``qsmprep <bids> <out> participant`` (the command line, Nipype's real
  graph, 2 processes, CPU) and reads ``*_Chimap.nii.gz``;
* runs :func:`accuracy.pipeline` with the default methods twice: on the head
  as ``independent.py`` does (its float phase and magnitude, its numbers), and
  on the very inputs the app read (the BIDS files through the app's own
  loader, with the voxel size and B0 direction it reads from the header);
* scores the maps against the truth (QSM-CI conventions, true mask) and
  compares the app's brain mask and χ with the second run's.

The second comparison isolates the product from its benchmark: the same
inputs through the command line and through the in-process chain must give
the same mask and, but for float32 rounding in the early-stopped solvers, the
same map. A difference there is a convention read wrong (field strength, B0
direction, phase scale or sign) or a step the benchmark does not run the way
the app does. The first shows what the scanner's integer format costs.

Usage: ``python benchmarks/independent_app.py --head-cache DIR [--suite held-out]``.
Section ``independent-app`` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS, fmt, hardware, hardware_note, markdown_table, proc_status_gb, publish,
)
from accuracy import pipeline  # noqa: E402
from independent import SUITES, as_case, cached_head, head_specs  # noqa: E402

#: Siemens' integer phase range (dcm2niix keeps the stored values)
PHASE_MAX = 4096
#: the magnitude's integer scale (its largest value)
MAGNITUDE_MAX = 4000


def gre_file(anat, subject, echo, part):
    """The NIfTI of one echo and part (``mag``, ``phase``) of the run in ``anat``."""
    return Path(anat) / f"sub-{subject}_echo-{echo}_part-{part}_MEGRE.nii.gz"


def write_bids(head, root, subject):
    """``head`` (an :class:`independent_heads.Head`) as a BIDS dataset at ``root``
    with one subject, in the conventions of the module docstring. Returns the
    subject's anat folder."""
    import nibabel as nb

    from qsmprep.qsm.units import GAMMA_BAR_MHZ_PER_T

    root = Path(root)
    anat = root / f"sub-{subject}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "qsmprep independent head", "BIDSVersion": "1.9.0"}))
    phase = np.clip(np.round(head.phase / np.pi * PHASE_MAX), -PHASE_MAX, PHASE_MAX - 1)
    magnitude = np.round(head.magnitude / head.magnitude.max() * MAGNITUDE_MAX)
    for e, te in enumerate(head.echo_times_s, start=1):
        meta = {"EchoTime": round(float(te), 6), "EchoNumber": e,
                "MagneticFieldStrength": round(head.field_strength_t),
                "ImagingFrequency": round(GAMMA_BAR_MHZ_PER_T * head.field_strength_t, 6),
                "Manufacturer": "Siemens"}
        for part, data in (("mag", magnitude), ("phase", phase)):
            path = gre_file(anat, subject, e, part)
            img = nb.Nifti1Image(data[..., e - 1].astype(np.int16), head.affine)
            img.set_qform(head.affine, code=1)
            img.set_sform(head.affine, code=1)
            nb.save(img, path)
            path.with_name(path.name.replace(".nii.gz", ".json")).write_text(
                json.dumps(meta, indent=1))
    return anat


def tree_rss_gb(pid):
    """Resident memory (GB) of process ``pid`` and all its descendants, from /proc
    (0 for a process that is gone)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        total += proc_status_gb("VmRSS", p) or 0.0
    return total


def run_app(bids, out, work, subject, sample_s=0.25):
    """``qsmprep bids out participant`` (2 processes, CPU): ``(chi, brain mask,
    seconds, peak GB)`` from its derivatives; the peak is the largest resident
    memory of the command and all its processes together (Nipype runs nodes in
    worker processes, two at a time here), sampled every ``sample_s`` seconds."""
    import nibabel as nb

    cmd = [sys.executable, "-m", "qsmprep.cli.run", str(bids), str(out), "participant",
           "-w", str(work), "--nprocs", "2", "--device", "cpu"]
    start, peak = time.perf_counter(), 0.0
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        while proc.poll() is None:
            peak = max(peak, tree_rss_gb(proc.pid))
            time.sleep(sample_s)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"qsmprep failed ({proc.returncode}): {err.read()[-2000:]}")
    anat = Path(out) / f"sub-{subject}" / "anat"
    chi = np.asarray(nb.load(anat / f"sub-{subject}_Chimap.nii.gz").dataobj, dtype=np.float32)
    mask = np.asarray(nb.load(anat / f"sub-{subject}_desc-brain_mask.nii.gz").dataobj) > 0
    return chi, mask, seconds, peak


def read_as_app(anat, subject, echoes):
    """The run's magnitude, phase (rad), voxel size (mm) and B0 direction as the
    app reads them (:func:`qsmprep.utils.images.load_echoes`, the header's affine)."""
    import nibabel as nb

    from qsmprep.bids.metadata import b0_affine
    from qsmprep.qsm.units import b0_dir_from_affine, voxel_size_from_affine
    from qsmprep.utils.images import load_echoes

    files = {part: [str(gre_file(anat, subject, e, part)) for e in range(1, echoes + 1)]
             for part in ("mag", "phase")}
    tes = [json.loads(Path(f.replace(".nii.gz", ".json")).read_text())["EchoTime"]
           for f in files["phase"]]
    mag, phase, _, _, ref, _ = load_echoes(files["phase"], tes, files["mag"], tes)
    affine = b0_affine(nb.load(files["phase"][0]).header)[0]
    return mag, phase, voxel_size_from_affine(ref.affine), tuple(b0_dir_from_affine(affine))


def default_chain(case):
    """χ (ppm) and the masking stage's brain mask of the default methods on ``case``."""
    from qsmprep.config import DEFAULT_METHODS

    start, intermediates = time.perf_counter(), {}
    chi = pipeline(case, dict(DEFAULT_METHODS), intermediates=intermediates)
    return chi, intermediates["mask"], time.perf_counter() - start


def compare(head, app_chi, app_mask, bench, same):
    """The row of one head: scores of the app's map and of the two in-process
    runs (``bench``: the head as ``independent.py`` runs it; ``same``: the app's
    inputs), and the app against ``same`` (mask voxels that differ, χ differences
    in the true mask, ppm)."""
    from qsmprep.qsm import metrics

    truth, mask = head.chi, head.mask
    diff = (app_chi - same[0])[mask]
    return {"app": metrics.score(app_chi, truth, mask),
            "benchmark": metrics.score(bench[0], truth, mask),
            "same_inputs": metrics.score(same[0], truth, mask),
            "mask_voxels_differ": int(np.sum(app_mask ^ same[1])),
            "mask_voxels": int(app_mask.sum()),
            "max_abs_diff_ppm": float(np.abs(diff).max()),
            "rms_diff_ppm": float(np.sqrt(np.mean(diff**2))),
            "truth_rms_ppm": float(np.sqrt(np.mean(truth[mask] ** 2))),
            "benchmark_s": bench[2]}


def render(results):
    rows = []
    for r in results["rows"]:
        a, b, c = r["app"], r["benchmark"], r["same_inputs"]
        rows.append([r["head"], f"{fmt(a['nrmse'])} / {fmt(a['xsim'], 3)}",
                     f"{fmt(c['nrmse'])} / {fmt(c['xsim'], 3)}",
                     f"{fmt(b['nrmse'])} / {fmt(b['xsim'], 3)}",
                     f"{r['mask_voxels_differ']} of {r['mask_voxels']}",
                     f"{r['max_abs_diff_ppm']:.2g}", f"{r['rms_diff_ppm']:.2g}",
                     f"{r['truth_rms_ppm']:.4f}", fmt(r["app_s"], 0),
                     fmt(r.get("app_peak_gb"), 2), fmt(r["benchmark_s"], 0)])
    return "\n".join([
        "## Independent heads through the app (`qsmprep participant`)\n",
        "Generated by `python benchmarks/independent_app.py` (raw numbers: "
        "`benchmarks/results/independent-app.json`). Each head of the "
        f"`{results['suite']}` suite is written as a BIDS dataset the way a Siemens scanner "
        "and dcm2niix hand it over (integer phase in [−4096, 4095] without units, integer "
        "magnitude, the oblique affine, `MagneticFieldStrength` rounded to the tesla beside "
        "`ImagingFrequency`) and run through the command line with the default pipeline "
        "(2 processes, CPU). Its `Chimap` (NRMSE % / raw XSIM against the truth, QSM-CI "
        "conventions in the true mask) is set beside the in-process chain that "
        "`independent.py` scores (`accuracy.pipeline`) run twice: on the inputs the app "
        "read (the BIDS files through the app's loader, the voxel size and B0 direction "
        "from the header), and on the head's float data and numbers as `independent.py` "
        "runs it. The difference columns compare the app with the first: brain-mask voxels "
        "that differ, and χ in the true mask (ppm), beside the truth's RMS there. Wall "
        "times: the app's includes Nipype, reading and writing files and the report; its "
        "peak memory is the largest sum of the resident memory of the command and its "
        "worker processes, sampled every 0.25 s ('–': not measured).\n",
        markdown_table(["Head", "App", "In-process, the app's inputs",
                        "In-process, as independent.py", "Mask voxels differ",
                        "max |Δχ| (ppm)", "RMS Δχ (ppm)", "truth RMS (ppm)", "App (s)",
                        "App peak (GB)", "In-process (s)"], rows),
        *[note + "\n" for note in results.get("notes", [])],
        hardware_note(results["hardware"]) + "\n",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=SUITES, default="held-out")
    parser.add_argument("--heads", nargs="+", help="only these heads")
    parser.add_argument("--head-cache", type=Path, help="folder of built heads (independent.py)")
    parser.add_argument("--docs", type=Path)
    parser.add_argument("--keep", type=Path, help="keep the BIDS datasets and outputs here")
    args = parser.parse_args(argv)

    saved = RESULTS / "independent-app.json"
    notes = json.loads(saved.read_text()).get("notes", []) if saved.exists() else []
    results = {"suite": args.suite, "hardware": hardware(), "rows": [], "notes": notes}
    for i, (name, description, kwargs) in enumerate(head_specs(args.suite), start=1):
        if args.heads and name not in args.heads:
            continue
        head, _ = cached_head(args.head_cache, name, description, **kwargs)
        subject = f"head{i}"
        with tempfile.TemporaryDirectory() as tmp:
            root = args.keep / name if args.keep else Path(tmp)
            anat = write_bids(head, root / "bids", subject)
            app_chi, app_mask, app_s, app_gb = run_app(root / "bids", root / "out",
                                                       root / "work", subject)
            mag, phase, vox, b0 = read_as_app(anat, subject, len(head.echo_times_s))
        case = as_case(head)
        same = default_chain(dataclasses.replace(case, magnitude=mag, phase=phase,
                                                 voxel_size_mm=vox, b0_dir=b0))
        row = {"head": name, "app_s": app_s, "app_peak_gb": app_gb,
               **compare(head, app_chi, app_mask, default_chain(case), same)}
        print(f"[independent_app] {name}: NRMSE app {row['app']['nrmse']:.2f} %, same inputs "
              f"{row['same_inputs']['nrmse']:.2f} %, as independent.py "
              f"{row['benchmark']['nrmse']:.2f} %; {row['mask_voxels_differ']} mask voxels "
              f"differ, RMS diff {row['rms_diff_ppm']:.2g} ppm", flush=True)
        results["rows"].append(row)
        del head, case, same
        publish("independent-app", render(results), results, args.docs)


if __name__ == "__main__":
    main()
