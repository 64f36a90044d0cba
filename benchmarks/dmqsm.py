"""DM-QSM against closed-form baselines: dipole inversion, x2 super-resolution
and both at once, on heads from outside the training generator and on our own.

Cases (chi ppm and brain mask; local field = dipole convolution of chi in the
mask, 1 mm, B0 along z, noise-free):

* ``mni`` -- a crop of the MNI head (:func:`qsmprep.sim.phantoms.mni_head`,
  seed 0): anatomy never used for training;
* ``qsm-forward`` -- the cylinder phantom of qsm-forward
  (``generate_susceptibility_phantom``, as ``qsm-forward simple``): another
  package's phantom;
* ``challenge`` -- a crop of the undeformed Challenge 2.0 head phantom
  (:func:`~qsmprep.sim.phantoms.challenge_head`, seed 0): the anatomy the
  hybrid generator deforms, with the benchmark phantoms' content model;
* ``hybrid`` -- the check case (``check_case.npz``): a held-out sample of our
  own training generator.

Tasks: ``inversion`` (TKD 0.1, the DM-QSM start; TV-ADMM; DM-QSM), ``sr2``
(x2 per axis: the truth down-sampled in k-space; trilinear and k-space
zero-filled up-sampling; DM-QSM), ``combined`` (the low-resolution local
field of the high-resolution truth; TKD or TV at low resolution, then
trilinear up-sampling; DM-QSM). Scores: NRMSE (%) and XSIM in the mask, and
wall time. The whole-head time of the default sampling is estimated from the
measured time per network pass and the patch count of the MNI head at 1 mm.

Usage: ``python benchmarks/dmqsm.py [--quick] [--steps N]``.

``--independent --head-cache DIR``: the same tasks on a head of the
independent suite (:mod:`independent_heads`, default the 1.5 mm 3 T head;
built once, then loaded from ``DIR``), whole head, scored against its truth
(section ``dmqsm_independent``). ``--time-whole-head [MM]``: wall and process
CPU time, per step too, of ``dmqsm.invert`` with the default sampling on
that head resampled to MM (default 1) mm. ``--from-json FILE`` re-renders a
section from its saved results.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, hardware, hardware_note, markdown_table, publish  # noqa: E402

VOX = (1.0, 1.0, 1.0)
B0 = (0.0, 0.0, 1.0)


def _crop_centre(chi, mask, size):
    centre = np.round(np.argwhere(mask).mean(0)).astype(int)
    sl = tuple(slice(max(c - size // 2, 0), max(c - size // 2, 0) + size) for c in centre)
    return chi[sl], mask[sl]


def cases(size):
    from qsmprep.sim.phantoms import challenge_head, mni_head
    from qsmprep.train.export import check_case

    out = {}
    head = mni_head(1.0, rng=0)
    out["mni"] = ("MNI head (unseen anatomy)",) + _crop_centre(head.chi_ppm, head.brain_mask, size)
    import qsm_forward

    chi = qsm_forward.generate_susceptibility_phantom(
        resolution=(size,) * 3, background=0, large_cylinder_val=0.005,
        small_cylinder_radii=[size / 16, size / 16, size / 16, size / 9],
        small_cylinder_vals=[0.05, 0.1, 0.2, 0.5]).astype(np.float32)
    out["qsm-forward"] = ("qsm-forward cylinders (another package)", chi, chi != 0)
    head = challenge_head(1.0, rng=0)
    out["challenge"] = (("Challenge 2.0 head, undeformed (training anatomy)",)
                        + _crop_centre(head.chi_ppm, head.brain_mask, size))
    case = check_case()
    out["hybrid"] = ("check case (held-out sample of our generator)",) + _crop_centre(
        case["chi"], case["mask"] > 0, size)
    return {k: (d, np.where(m, c, 0).astype(np.float32), m.astype(bool))
            for k, (d, c, m) in out.items()}


def scores(recon, truth, mask, seconds):
    from qsmprep.qsm.metrics import nrmse, xsim

    return {"nrmse": float(nrmse(recon, truth, mask)), "xsim": float(xsim(recon, truth, mask)),
            "s": seconds}


def trilinear(lowres, factor):
    from scipy import ndimage

    return ndimage.zoom(lowres, factor, order=1, grid_mode=True, mode="nearest")


def run_case(chi, mask, model, opts):
    from qsmprep.dl import dmqsm, dmqsm_sampler
    from qsmprep.dl.inference import to_numpy, to_tensor
    from qsmprep.qsm import registry
    from qsmprep.qsm.kernels import dipole_convolve

    field = dipole_convolve(chi, VOX, B0).astype(np.float32) * mask
    rows = {}

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return np.asarray(out, np.float32), time.perf_counter() - t

    # dipole inversion
    out, s = timed(lambda: registry.run("inversion", "tkd", field, mask, VOX, b0_dir=B0,
                                        threshold=dmqsm.TKD_THRESHOLD))
    rows[("inversion", "TKD 0.1 (DM-QSM start)")] = scores(out, chi, mask, s)
    out, s = timed(lambda: registry.run("inversion", "tv", field, mask, VOX, b0_dir=B0))
    rows[("inversion", "TV-ADMM")] = scores(out, chi, mask, s)
    out, s = timed(lambda: dmqsm.invert(field, mask, VOX, B0, device="cpu", model=model, **opts))
    rows[("inversion", "DM-QSM")] = scores(out, chi, mask, s)

    # x2 super-resolution of chi (the truth down-sampled in k-space)
    down = dmqsm_sampler.Downsample(chi.shape, 2)
    lowres = to_numpy(down(to_tensor(chi, "cpu")))
    out, s = timed(lambda: trilinear(lowres, 2) * mask)
    rows[("sr2", "trilinear")] = scores(out, chi, mask, s)
    out, s = timed(lambda: to_numpy(down.zero_filled(to_tensor(lowres, "cpu"))) * mask)
    rows[("sr2", "k-space zero-filled")] = scores(out, chi, mask, s)
    out, s = timed(lambda: dmqsm.super_resolve(lowres, 2, mask=mask, device="cpu", model=model,
                                               **opts))
    rows[("sr2", "DM-QSM")] = scores(out, chi, mask, s)

    # combined: the low-resolution local field of the high-resolution truth
    mask_lr = to_numpy(down(to_tensor(mask.astype(np.float32), "cpu"))) > 0.5
    field_lr = to_numpy(down(to_tensor(dipole_convolve(chi, VOX, B0).astype(np.float32),
                                       "cpu"))) * mask_lr
    vox_lr = tuple(2 * v for v in VOX)
    for name, kw in (("TKD 0.1", {"threshold": dmqsm.TKD_THRESHOLD}), ("TV-ADMM", {})):
        method = "tkd" if name.startswith("TKD") else "tv"
        out, s = timed(lambda: trilinear(np.asarray(registry.run(
            "inversion", method, field_lr, mask_lr, vox_lr, b0_dir=B0, **kw)), 2) * mask)
        rows[("combined", f"{name} at 2 mm, trilinear")] = scores(out, chi, mask, s)
    out, s = timed(lambda: dmqsm.invert_super_resolve(field_lr, mask_lr, vox_lr, B0, 2,
                                                      device="cpu", model=model, **opts))
    rows[("combined", "DM-QSM")] = scores(np.where(mask, out, 0), chi, mask, s)
    return rows


def whole_head_estimate(model, opts, crop_seconds):
    """Estimated seconds of the default sampling of the MNI head at 1 mm: the
    measured DM-QSM inversion of a crop (one 48^3 patch: ``crop_seconds``,
    every step's network pass and data term) per step, times the steps and
    the patches holding brain in the whole head's bounding box."""
    from qsmprep.dl import dmqsm, dmqsm_sampler
    from qsmprep.qsm.mask import bbox_slices
    from qsmprep.sim.phantoms import mni_head

    mask = mni_head(1.0, rng=0, texture=False, vessels=False, lesions=False).brain_mask
    sub = mask[bbox_slices(mask, margin=8)]
    shape = [n + (-n % model.multiple) for n in sub.shape]
    sub = np.pad(sub, [(0, s - n) for s, n in zip(shape, sub.shape)])
    p, o = opts.get("patch", dmqsm.SAMPLING["patch"]), opts.get("overlap", 8)
    n_patches = sum(bool(sub[sl].any()) for sl in dmqsm_sampler.patch_grid(shape, p, o))
    steps = opts.get("steps", dmqsm.SAMPLING["steps"])
    per_patch_step = crop_seconds / steps
    return {"shape": tuple(shape), "patches": n_patches, "steps": steps,
            "s_per_patch_step": per_patch_step,
            "estimate_s": per_patch_step * n_patches * steps}


TITLES = {"inversion": "dipole inversion", "sr2": "×2 super-resolution",
          "combined": "combined (×2 super-resolution of a 2 mm field)"}


def sampling_used(opts):
    """The sampling settings a run with ``opts`` uses, per task family."""
    from qsmprep.dl import dmqsm

    base = {"steps": dmqsm.SAMPLING["steps"], **opts}
    return {"inversion": {"xi": dmqsm.SAMPLING["xi"], "t_start": dmqsm.SAMPLING["t_start"],
                          **base},
            "super_resolution": {"xi": dmqsm.XI_SUPER_RESOLUTION,
                                 "t_start": dmqsm.T_START_SUPER_RESOLUTION, **base}}


def render(results, info, opts, estimate, size, sampling=None):
    from qsmprep.dl import dmqsm

    used, stale = f"`{opts}` (other settings: the defaults)", {}
    if sampling:
        inv, sr = sampling["inversion"], sampling["super_resolution"]
        used = (f"{inv['steps']} steps; ξ {inv['xi']:g}, `t_start` {inv['t_start']} for "
                f"inversion and the combined task; ξ {sr['xi']:g}, `t_start` {sr['t_start']} "
                f"for super-resolution (options `{opts}`, else the defaults of the run's date)")
        for task, family in (("inversion", inv), ("combined", inv), ("sr2", sr)):
            now = (dmqsm.SAMPLING["xi"] if family is inv else dmqsm.XI_SUPER_RESOLUTION)
            if family["xi"] != now:
                stale[task] = f"DM-QSM, ξ {family['xi']:g} (today's default: {now:g})"
    lines = [f"DM-QSM (`--inversion dmqsm`, `qsmprep.dl.dmqsm`) against closed-form baselines "
             f"on {size}^3 crops at 1 mm (B0 along z, noise-free local fields of chi in the "
             f"mask), sampling: {used}. NRMSE (%) and XSIM in "
             "the mask; time in seconds (CPU). `python benchmarks/dmqsm.py` rewrites this "
             "section.", ""]
    cases_ = list(results)
    for task, title in TITLES.items():
        lines.append(f"**{title}**\n")
        methods = [m for (t, m) in results[cases_[0]]["rows"] if t == task]
        headers = ["method"] + [f"{results[c]['title']}: NRMSE / XSIM / s" for c in cases_]
        rows = []
        for m in methods:
            label = stale.get(task, m) if m == "DM-QSM" else m
            rows.append([label] + [f"{fmt(r['nrmse'], 1)} / {fmt(r['xsim'], 3)} / {fmt(r['s'], 1)}"
                               for c in cases_ for r in [results[c]["rows"][(task, m)]]])
        lines.append(markdown_table(headers, rows))
    lines.append(
        f"Whole 1 mm head, default sampling (estimated, not measured: {estimate['patches']} "
        f"patches of 48^3 hold brain in the MNI head's bounding box {estimate['shape']}, "
        f"× {estimate['steps']} steps × {estimate['s_per_patch_step']:.2f} s per patch and "
        f"step, measured on the MNI crop's inversion above, load included): about "
        f"{estimate['estimate_s'] / 60:.0f} min. A one-patch crop leaves out the whole "
        "volume's data term and the machine's load varies, so take the measured whole "
        "head of section `dmqsm_independent` below instead.\n")
    lines.append(hardware_note(info))
    return "\n".join(lines)


def rerender(path):
    """The ``dmqsm`` or ``dmqsm_independent`` section from its saved results
    (``benchmarks/results/dmqsm.json`` or ``dmqsm_independent.json``)."""
    import json

    from _common import DOCS, replace_section

    saved = json.loads(Path(path).read_text())
    if "head" in saved:                     # dmqsm_independent.json
        from dmqsm_independent import render_independent

        replace_section(DOCS, "dmqsm_independent", render_independent(saved))
        return 0
    results = {k: {"title": v["title"], "rows": {tuple(key.split("/", 1)): r
                                                 for key, r in v["rows"].items()}}
               for k, v in saved["results"].items()}
    body = render(results, saved["hardware"], saved["options"] or "defaults",
                  saved["estimate"], saved.get("size", 48), saved.get("sampling"))
    replace_section(DOCS, "dmqsm", body)
    return 0


def main(argv=None):
    from dmqsm_independent import HEAD, INDEPENDENT_TITLES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=48, help="crop edge (voxels)")
    p.add_argument("--steps", type=int, help="DM-QSM steps (default: the method's)")
    p.add_argument("--quick", action="store_true", help="one case (smoke test)")
    p.add_argument("--no-publish", action="store_true")
    p.add_argument("--checkpoint", help="a qsmprep-train checkpoint instead of the shipped "
                   "weights (development; implies --no-publish)")
    p.add_argument("--independent", action="store_true",
                   help="the tasks on the independent suite's head instead (section "
                   "dmqsm_independent)")
    p.add_argument("--tasks", nargs="+", choices=list(INDEPENDENT_TITLES),
                   default=list(INDEPENDENT_TITLES), help="with --independent: these tasks")
    p.add_argument("--time-whole-head", type=float, metavar="MM", nargs="?", const=1.0,
                   help="time dmqsm.invert on the independent head resampled to MM (default "
                   "1) mm (section dmqsm_independent)")
    p.add_argument("--from-json", type=Path, metavar="FILE",
                   help="re-render the dmqsm or dmqsm_independent section from its saved "
                   "results (no run)")
    p.add_argument("--head", default=HEAD, help="independent suite head (default %(default)s)")
    p.add_argument("--head-cache", metavar="DIR",
                   help="load the head from DIR/<head>.pkl, or build it and save it there")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if args.independent or args.time_whole_head:
        from dmqsm_independent import main_independent

        return main_independent(args)
    if args.from_json:
        return rerender(args.from_json)
    from qsmprep.dl.methods import load_model

    info = hardware()
    if args.checkpoint:
        from qsmprep.dl.dmqsm_prior import ScoreUNet

        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        model = ScoreUNet(state["config"])
        model.load_state_dict(state["model"])
        model.eval()
        args.no_publish = True
    else:
        model = load_model("dmqsm", "cpu")
    opts = {"steps": args.steps} if args.steps else {}
    results = {}
    for key, (title, chi, mask) in cases(args.size).items():
        if args.quick and key != "mni":
            continue
        rows = run_case(chi, mask, model, opts)
        results[key] = {"title": title, "rows": rows}
        for (task, method), r in rows.items():
            print(f"{key:12s} {task:10s} {method:34s} NRMSE {r['nrmse']:6.1f} "
                  f"XSIM {r['xsim']:.3f} {r['s']:6.1f} s", flush=True)
    estimate = whole_head_estimate(model, opts,
                                   results["mni"]["rows"][("inversion", "DM-QSM")]["s"])
    print(estimate)
    sampling = sampling_used(opts)
    body = render(results, info, opts or "defaults", estimate, args.size, sampling)
    if not args.no_publish:
        publish("dmqsm", body, {"hardware": info, "options": opts, "sampling": sampling,
                                "size": args.size, "estimate": estimate,
                                "results": {k: {"title": v["title"],
                                                "rows": {f"{t}/{m}": r for (t, m), r in
                                                         v["rows"].items()}}
                                            for k, v in results.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
