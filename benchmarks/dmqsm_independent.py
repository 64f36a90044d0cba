"""DM-QSM on a head of the independent suite (benchmarks/independent_heads.py):
dipole inversion, x2 super-resolution (k-space and block down-sampling) and the
combined task on the whole head, scored against its truth, and the measured
time of a whole head (section ``dmqsm_independent`` of docs/benchmarks.md).

Run through ``python benchmarks/dmqsm.py --independent`` / ``--time-whole-head``
(see that script's docstring).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from _common import fmt, hardware, hardware_note, markdown_table, publish
from dmqsm import trilinear
from independent_heads import PHANTOM_VERSION, phantom_version

HEAD = "mni-3T-1.5mm-tilt15"


def independent_head(name=HEAD, cache_dir=None):
    """The independent suite's head ``name`` (:mod:`independent_heads`, the
    settings of :func:`independent.head_specs`), through
    :func:`independent.cached_head`: loaded from ``cache_dir/<name>.pkl`` when
    it is there and of the current phantom version, else built (minutes: 6 for
    the 1.5 mm head) and saved there."""
    import independent

    specs = {n: (d, k) for n, d, k in independent.head_specs(False) + independent.head_specs(True)}
    if name not in specs:
        raise ValueError(f"unknown head {name!r}; expected one of {sorted(specs)}")
    description, kwargs = specs[name]
    return independent.cached_head(cache_dir, name, description, **kwargs)[0]


def _even_box(mask, margin=8):
    """The mask's bounding box plus ``margin``, widened by one voxel where
    needed so that every edge is even (x2 down-sampling needs it); on an
    odd axis the box already spans, it drops an end plane without mask."""
    from qsmprep.qsm.mask import bbox_slices

    out = []
    for axis, (sl, n) in enumerate(zip(bbox_slices(mask, margin=margin), mask.shape)):
        start, stop = int(sl.start), int(sl.stop)
        if (stop - start) % 2:
            if stop < n:
                stop += 1
            elif start > 0:
                start -= 1
            elif not np.take(mask, n - 1, axis=axis).any():
                stop -= 1
            elif not np.take(mask, 0, axis=axis).any():
                start += 1
            else:
                raise ValueError(f"the mask fills axis {axis} (odd size {n}): pad the volume")
        out.append(slice(start, stop))
    return tuple(out)


def _timed_cpu(fn):
    """``(result as float32, wall s, process CPU s)``; process CPU time
    counts all threads of this process."""
    cpu, t = time.process_time(), time.perf_counter()
    out = fn()
    return np.asarray(out, np.float32), time.perf_counter() - t, time.process_time() - cpu


def _score(recon, truth, mask, wall, cpu):
    from qsmprep.qsm.metrics import nrmse, xsim

    return {"nrmse": float(nrmse(recon, truth, mask)), "xsim": float(xsim(recon, truth, mask)),
            "s": wall, "cpu_s": cpu}


def run_independent(head, model, opts, tasks=("inversion", "sr2", "sr2-block", "combined")):
    """DM-QSM and its baselines on one independent head (its true χ, mask and
    local field; its voxel size and oblique B0). Returns ``{(task, method): scores}``.

    * ``inversion``: the head's true local field (qsm-forward's field of the
      brain's χ on the model grid, k-space cropped) in the true mask, whole
      head: TKD 0.1 (DM-QSM's start), TV-ADMM, DM-QSM;
    * ``sr2`` / ``sr2-block``: the true χ down-sampled x2 per axis by a
      k-space crop / by 2^3 block averages, up-sampled back by trilinear
      interpolation, k-space zero filling and DM-QSM (``super_resolve`` with
      the matching ``mode`` and the true mask), scored against the true χ;
    * ``combined``: the true local field k-space cropped x2 in the mask of
      the 2^3 block averages of the true mask over 0.5; TKD 0.1 or TV at the
      low resolution, then trilinear; DM-QSM ``invert_super_resolve``.

    All on the mask's bounding box + 8 voxels (even edges); scores in the
    true mask at the head's resolution.
    """
    from qsmprep.dl import dmqsm
    from qsmprep.dl.inference import to_numpy, to_tensor
    from qsmprep.qsm import registry

    box = _even_box(head.mask)
    chi, mask = head.chi[box], head.mask[box]
    field = np.where(mask, head.local_field[box], 0).astype(np.float32)
    vox, b0 = tuple(float(v) for v in head.voxel_size_mm), tuple(head.b0_dir)
    vox_lr = tuple(2 * v for v in vox)
    rows = {}

    def add(task, method, fn):
        out, wall, cpu = _timed_cpu(fn)
        rows[(task, method)] = r = _score(out * mask, chi, mask, wall, cpu)
        print(f"{head.name} {task:10s} {method:34s} NRMSE {r['nrmse']:6.1f} XSIM {r['xsim']:.3f} "
              f"{wall:7.1f} s (CPU {cpu:.1f} s)", flush=True)

    if "inversion" in tasks:
        add("inversion", "TKD 0.1 (DM-QSM start)", lambda: registry.run(
            "inversion", "tkd", field, mask, vox, b0_dir=b0, threshold=dmqsm.TKD_THRESHOLD))
        add("inversion", "TV-ADMM", lambda: registry.run("inversion", "tv", field, mask, vox,
                                                         b0_dir=b0))
        add("inversion", "DM-QSM", lambda: dmqsm.invert(field, mask, vox, b0, device="cpu",
                                                        model=model, **opts))
    kdown = dmqsm.Downsample(chi.shape, 2, "kspace")
    for task, mode in (("sr2", "kspace"), ("sr2-block", "block")):
        if task not in tasks:
            continue
        lowres = to_numpy(dmqsm.Downsample(chi.shape, 2, mode)(to_tensor(chi, "cpu")))
        add(task, "trilinear", lambda: trilinear(lowres, 2))
        add(task, "k-space zero-filled",
            lambda: to_numpy(kdown.zero_filled(to_tensor(lowres, "cpu"))))
        add(task, "DM-QSM", lambda: dmqsm.super_resolve(lowres, 2, mask=mask, mode=mode,
                                                        device="cpu", model=model, **opts))
    if "combined" in tasks:
        mask_lr = to_numpy(dmqsm.Downsample(chi.shape, 2, "block")(
            to_tensor(mask.astype(np.float32), "cpu"))) > 0.5
        field_lr = to_numpy(kdown(to_tensor(field, "cpu"))) * mask_lr
        for name, method, kw in (("TKD 0.1", "tkd", {"threshold": dmqsm.TKD_THRESHOLD}),
                                 ("TV-ADMM", "tv", {})):
            add("combined", f"{name} at {vox_lr[0]:g} mm, trilinear",
                lambda method=method, kw=kw: trilinear(np.asarray(registry.run(
                    "inversion", method, field_lr, mask_lr, vox_lr, b0_dir=b0, **kw)), 2))
        add("combined", "DM-QSM", lambda: dmqsm.invert_super_resolve(
            field_lr, mask_lr, vox_lr, b0, 2, device="cpu", model=model, **opts))
    return rows


def kspace_resample(volume, shape):
    """``volume`` on a grid of ``shape`` (same field of view) by k-space zero
    padding or cropping (the amplitude kept)."""
    k = np.fft.fftshift(np.fft.fftn(volume))
    out = np.zeros(shape, complex)
    src, dst = [], []
    for n, m in zip(volume.shape, shape):
        c = min(n, m)
        src.append(slice(n // 2 - c // 2, n // 2 - c // 2 + c))
        dst.append(slice(m // 2 - c // 2, m // 2 - c // 2 + c))
    out[tuple(dst)] = k[tuple(src)]
    scale = np.prod(shape) / np.prod(volume.shape)
    return (np.real(np.fft.ifftn(np.fft.ifftshift(out))) * scale).astype(np.float32)


def time_whole_head(head, model, opts, voxel_mm=1.0):
    """Wall and process CPU time of ``dmqsm.invert`` (the given sampling
    options) on a whole head at ``voxel_mm``: the independent head's true
    local field, χ and mask resampled to that voxel (k-space zero padding;
    the mask by trilinear interpolation over 0.5). Also TKD's and DM-QSM's
    scores against the resampled truth, and the patch count."""
    import os

    from scipy import ndimage

    from qsmprep.dl import dmqsm, dmqsm_sampler
    from qsmprep.qsm import registry
    from qsmprep.qsm.mask import bbox_slices

    factor = head.voxel_size_mm[0] / voxel_mm
    shape = tuple(int(round(n * factor / 2)) * 2 for n in head.mask.shape)
    mask = ndimage.zoom(head.mask.astype(np.float32), [s / n for s, n in
                                                       zip(shape, head.mask.shape)],
                        order=1, grid_mode=True, mode="nearest") > 0.5
    field = np.where(mask, kspace_resample(head.local_field, shape), 0).astype(np.float32)
    chi = np.where(mask, kspace_resample(head.chi, shape), 0).astype(np.float32)
    vox = (voxel_mm,) * 3
    b0 = tuple(head.b0_dir)
    sub = mask[bbox_slices(mask, margin=8)]
    padded = [n + (-n % model.multiple) for n in sub.shape]
    sub = np.pad(sub, [(0, s - n) for s, n in zip(padded, sub.shape)])
    p = opts.get("patch", dmqsm.SAMPLING["patch"])
    o = opts.get("overlap", dmqsm.SAMPLING["overlap"])
    n_patches = sum(bool(sub[sl].any()) for sl in dmqsm_sampler.patch_grid(padded, p, o))
    steps = opts.get("steps", dmqsm.SAMPLING["steps"])
    tkd, tkd_wall, tkd_cpu = _timed_cpu(lambda: registry.run(
        "inversion", "tkd", field, mask, vox, b0_dir=b0, threshold=dmqsm.TKD_THRESHOLD))
    class StepClock(list):
        """``history=`` of the sampler: appended once per step; keeps the wall
        time, process CPU time and load average at each step."""

        def __init__(self):
            super().__init__()
            self.marks = []

        def append(self, value):
            super().append(value)
            self.marks.append((time.perf_counter(), time.process_time(), os.getloadavg()[0]))

    clock = StepClock()
    load_before = os.getloadavg()[0]
    start = (time.perf_counter(), time.process_time())
    out, wall, cpu = _timed_cpu(lambda: dmqsm.invert(field, mask, vox, b0, device="cpu",
                                                     model=model, history=clock, **opts))
    marks = [start] + [m[:2] for m in clock.marks]
    step_wall = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    step_cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    result = {
        "grid": list(shape), "voxel_mm": voxel_mm, "brain_voxels": int(mask.sum()),
        "sampled_box": list(padded), "patches": n_patches, "steps": steps,
        "wall_s": wall, "cpu_s": cpu, "s_per_patch_step": wall / (n_patches * steps),
        "cpu_s_per_patch_step": cpu / (n_patches * steps),
        "default_steps": dmqsm.SAMPLING["steps"],
        # linear in the steps (every step: one network pass per patch and one data term);
        # the set-up (crop, TKD start) is scaled too, so this slightly over-estimates
        "default_wall_s": wall * dmqsm.SAMPLING["steps"] / steps,
        "default_cpu_s": cpu * dmqsm.SAMPLING["steps"] / steps,
        "load_before": round(load_before, 1), "load_after": round(os.getloadavg()[0], 1),
        "nice": os.nice(0), "torch_threads": torch.get_num_threads(),
        # per step (the first includes the set-up): wall, CPU, load average after it
        "step_wall_s": step_wall, "step_cpu_s": step_cpu,
        "step_load": [m[2] for m in clock.marks],
        "tkd": _score(tkd, chi, mask, tkd_wall, tkd_cpu),
        "dmqsm": _score(out, chi, mask, wall, cpu),
    }
    print(result, flush=True)
    return result


INDEPENDENT_TITLES = {
    "inversion": "dipole inversion (true local field → χ, whole head)",
    "sr2": "×2 super-resolution (χ k-space cropped to twice the voxel → χ)",
    "sr2-block": "×2 super-resolution (χ block-averaged 2³ → χ)",
    "combined": "combined (local field k-space cropped to twice the voxel → χ)",
}


def _opts_text(opts):
    return f"`{opts}` (else the defaults)" if opts else "defaults"


def render_independent(saved):
    """The ``dmqsm_independent`` section from its saved results."""
    from qsmprep.dl import dmqsm

    head = saved.get("head", {})
    lines = [
        "## DM-QSM on the independent suite's heads\n",
        "Generated by `python benchmarks/dmqsm.py --independent --head-cache DIR` (tasks) and "
        "`--time-whole-head` (timing) (raw numbers: `benchmarks/results/dmqsm_independent.json`; "
        "`DIR` keeps the built head between runs). The head is the independent suite's "
        f"`{head.get('name')}` ({head.get('description')}, grid "
        f"{' × '.join(map(str, head.get('shape', [])))}; `benchmarks/independent_heads.py`, "
        "never made by `qsmprep.sim`): its true χ, true brain mask and true local field "
        "(qsm-forward's field of the brain's χ on the model grid, k-space cropped; B0 tilted "
        "15°, noise-free), cropped to the mask's bounding box + 8 voxels. Shipped weights, "
        f"sampling {_opts_text(saved.get('options'))} (steps {dmqsm.SAMPLING['steps']}, "
        f"ξ {dmqsm.SAMPLING['xi']:g} and "
        f"`t_start` {dmqsm.SAMPLING['t_start']} for inversion and the combined task, ξ "
        f"{dmqsm.XI_SUPER_RESOLUTION:g} and `t_start` {dmqsm.T_START_SUPER_RESOLUTION} for "
        f"super-resolution, seed {dmqsm.SAMPLING['seed']}). NRMSE (%) and XSIM "
        "(`qsmprep.qsm.metrics`, QSM-CI conventions) in the true mask at the head's "
        "resolution; wall and process CPU time (s) on 2 CPU cores.\n",
        "ξ was chosen on two 48³ crops of this same head (docs/deep-learning.md, \"How ξ was "
        "chosen\"), so the inversion rows are not independent of that one choice. Nor are "
        "the super-resolution rows (ξ and `t_start` chosen on a `qsmprep.sim` crop, the mean "
        f"of {dmqsm.SAMPLES_SUPER_RESOLUTION} samples on crops of the suite's other two heads): "
        f"their band weight {dmqsm.BAND_WEIGHT_SUPER_RESOLUTION:g} was chosen on this whole "
        "head and the 7 T one (rule R21-3, docs/deep-learning.md), and confirmed on the whole "
        "1 mm head, held out. A task marked (phantom v1) was measured on version 1 of the head "
        "(its CSF textured; benchmarks/independent_heads.py), the others on the current one.\n",
    ]
    rows = saved.get("rows", {})
    for task, title in INDEPENDENT_TITLES.items():
        methods = [(k.split("/", 1)[1], r) for k, r in rows.items() if k.split("/", 1)[0] == task]
        if not methods:
            continue
        old = any(r.get("phantom_version", 1) != PHANTOM_VERSION for _, r in methods)
        lines.append(f"**{title}**" + (" (phantom v1)" if old else "") + "\n")
        lines.append(markdown_table(
            ["method", "NRMSE (%)", "XSIM", "wall (s)", "CPU (s)"],
            [[m, fmt(r["nrmse"], 1), fmt(r["xsim"], 3), fmt(r["s"], 1), fmt(r.get("cpu_s"), 1)]
             for m, r in methods]))
    verdicts = []
    for task, baseline, target in (("inversion", "TKD 0.1 (DM-QSM start)", "its TKD start"),
                                   ("inversion", "TV-ADMM", "TV"),
                                   ("sr2", "k-space zero-filled", "k-space zero filling"),
                                   ("sr2-block", "k-space zero-filled", "k-space zero filling"),
                                   ("sr2-block", "trilinear", "trilinear"),
                                   ("combined", "TKD 0.1 at", "TKD then trilinear")):
        dm = rows.get(f"{task}/DM-QSM")
        base = next((r for k, r in rows.items() if k.startswith(f"{task}/{baseline}")), None)
        if not dm or not base:
            continue
        n = "better" if dm["nrmse"] < base["nrmse"] else "worse"
        x = "better" if dm["xsim"] > base["xsim"] else "worse"
        verdicts.append(f"{task}: NRMSE {n} than {target} ({dm['nrmse']:.1f} against "
                        f"{base['nrmse']:.1f} %), XSIM {x} ({dm['xsim']:.3f} against "
                        f"{base['xsim']:.3f})")
    if verdicts:
        lines.append("DM-QSM against the issue's yardsticks — " + "; ".join(verdicts) + ".\n")
    lines += [note + "\n" for note in saved.get("notes", [])]
    if saved.get("hardware"):
        lines.append(hardware_note(saved["hardware"]) + "\n")
    t = saved.get("timing")
    if t:
        lines.append(
            f"**Whole head at {t['voxel_mm']:g} mm** (`dmqsm.invert`, sampling "
            f"{_opts_text(t.get('options'))}): the "
            f"head above resampled to {t['voxel_mm']:g} mm by k-space zero padding (grid "
            f"{' × '.join(map(str, t['grid']))}, {t['brain_voxels']} brain voxels; sampled box "
            f"{' × '.join(map(str, t['sampled_box']))}, {t['patches']} patches of 48³ hold "
            f"brain, {t['steps']} steps): **{t['wall_s'] / 60:.1f} min wall**, "
            f"{t['cpu_s'] / 60:.1f} min process CPU time ({t['torch_threads']} torch threads, "
            f"`nice` {t['nice']}; {t['s_per_patch_step']:.2f} s per patch and step). The "
            f"machine was shared: load average {t['load_before']} before and "
            f"{t['load_after']} after the run on its 2 cores, so the wall time is an upper "
            f"bound of an unshared run and the CPU time (both threads together) is the "
            f"better measure of the work.")
        if t["steps"] != t.get("default_steps", t["steps"]):
            lines[-1] += (
                f" Measured with {t['steps']} steps, not the default {t['default_steps']}: "
                f"a step costs the same whatever their number (one network pass per patch "
                f"and one data term), so the default's time is this × "
                f"{t['default_steps']}/{t['steps']}: **{t['default_wall_s'] / 60:.1f} min "
                f"wall, {t['default_cpu_s'] / 60:.1f} min CPU** (extrapolated, set-up "
                f"included in the scaling, so slightly over).")
        if t.get("step_wall_s"):
            fast = sorted(t["step_wall_s"][1:] or t["step_wall_s"])
            lines[-1] += (
                f" Per step: {fast[0]:.0f}–{fast[-1]:.0f} s wall (median "
                f"{fast[len(fast) // 2]:.0f} s; load average {min(t['step_load']):.1f}–"
                f"{max(t['step_load']):.1f} during the run); the default "
                f"{t.get('default_steps', t['steps'])} steps at the fastest step's pace, the "
                f"closest this run came to an unshared machine: "
                f"{fast[0] * t.get('default_steps', t['steps']) / 60:.1f} min.")
        cpu_default = t.get("default_cpu_s", t["cpu_s"])
        lines[-1] += (
            f" On 2 unshared cores the default sampling would take between the CPU time "
            f"spread over both threads and the CPU time on one: about "
            f"{cpu_default / 120:.0f}–{cpu_default / 60:.0f} min.")
        lines[-1] += (
            f" Against the resampled truth ({t['steps']} steps): DM-QSM NRMSE "
            f"{t['dmqsm']['nrmse']:.1f} %, XSIM {t['dmqsm']['xsim']:.3f}; its TKD start "
            f"{t['tkd']['nrmse']:.1f} %, {t['tkd']['xsim']:.3f}.\n")
        if t.get("hardware"):
            lines.append(hardware_note(t["hardware"]) + "\n")
        earlier = [e for e in saved.get("earlier_timings", [])
                   if e["voxel_mm"] == t["voxel_mm"] and e["patches"] == t["patches"]]
        if earlier:
            lines.append("Earlier runs of the same measurement: " + "; ".join(
                f"{e['hardware']['date']}, {e['steps']} steps: {e['wall_s'] / 60:.1f} min wall, "
                f"{e['cpu_s'] / 60:.1f} min CPU (load average {e['load_before']} → "
                f"{e['load_after']})" for e in earlier) + ".\n")
    return "\n".join(lines)


def main_independent(args):
    """``--independent`` / ``--time-whole-head``: update the saved results of
    section ``dmqsm_independent`` with this run's part and re-render it."""
    import json
    import logging

    from _common import RESULTS
    from qsmprep.dl.methods import load_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.checkpoint:
        raise SystemExit("--checkpoint is for the crop benchmark only")
    model = load_model("dmqsm", "cpu")
    opts = {"steps": args.steps} if args.steps else {}
    path = RESULTS / "dmqsm_independent.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    head = independent_head(args.head, args.head_cache)
    if saved.get("head", {}).get("name") not in (None, head.name):
        saved = {}                          # another head: its rows and times do not mix
    version = phantom_version(head)
    saved["head"] = {"name": head.name, "description": head.description,
                     "shape": list(head.mask.shape),
                     "voxel_size_mm": list(head.voxel_size_mm), "b0_dir": list(head.b0_dir),
                     "phantom_version": version}
    if args.independent:
        info = hardware()
        rows = run_independent(head, model, opts, args.tasks)
        saved["hardware"], saved["options"] = info, opts
        saved.setdefault("rows", {})
        # keep the table order of INDEPENDENT_TITLES whatever the tasks of this run
        merged = {**saved["rows"], **{f"{t}/{m}": {**r, "phantom_version": version}
                                      for (t, m), r in rows.items()}}
        saved["rows"] = {k: merged[k] for task in INDEPENDENT_TITLES for k in merged
                         if k.split("/", 1)[0] == task}
    if args.time_whole_head:
        info = hardware()
        if saved.get("timing"):             # keep the earlier measurements
            saved.setdefault("earlier_timings", []).append(saved.pop("timing"))
        saved["timing"] = {**time_whole_head(head, model, opts, args.time_whole_head),
                           "options": opts, "hardware": info}
    body = render_independent(saved)
    if not args.no_publish:
        publish("dmqsm_independent", body, saved)
    else:
        print(body)
    return 0
