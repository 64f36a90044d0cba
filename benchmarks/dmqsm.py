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


def render(results, info, opts, estimate, size):
    lines = [f"DM-QSM (`--inversion dmqsm`, `qsmprep.dl.dmqsm`) against closed-form baselines "
             f"on {size}^3 crops at 1 mm (B0 along z, noise-free local fields of chi in the "
             f"mask), sampling `{opts}` (other settings: the defaults). NRMSE (%) and XSIM in "
             "the mask; time in seconds (CPU). `python benchmarks/dmqsm.py` rewrites this "
             "section.", ""]
    cases_ = list(results)
    for task, title in TITLES.items():
        lines.append(f"**{title}**\n")
        methods = [m for (t, m) in results[cases_[0]]["rows"] if t == task]
        headers = ["method"] + [f"{results[c]['title']}: NRMSE / XSIM / s" for c in cases_]
        rows = []
        for m in methods:
            rows.append([m] + [f"{fmt(r['nrmse'], 1)} / {fmt(r['xsim'], 3)} / {fmt(r['s'], 1)}"
                               for c in cases_ for r in [results[c]["rows"][(task, m)]]])
        lines.append(markdown_table(headers, rows))
    lines.append(
        f"Whole 1 mm head, default sampling (estimated, not measured: {estimate['patches']} "
        f"patches of 48^3 hold brain in the MNI head's bounding box {estimate['shape']}, "
        f"× {estimate['steps']} steps × {estimate['s_per_patch_step']:.2f} s per patch and "
        f"step, measured on the MNI crop's inversion above, load included): about "
        f"{estimate['estimate_s'] / 60:.0f} min.\n")
    lines.append(hardware_note(info))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=48, help="crop edge (voxels)")
    p.add_argument("--steps", type=int, help="DM-QSM steps (default: the method's)")
    p.add_argument("--quick", action="store_true", help="one case (smoke test)")
    p.add_argument("--no-publish", action="store_true")
    p.add_argument("--checkpoint", help="a qsmprep-train checkpoint instead of the shipped "
                   "weights (development; implies --no-publish)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
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
    body = render(results, info, opts or "defaults", estimate, args.size)
    if not args.no_publish:
        publish("dmqsm", body, {"hardware": info, "options": opts, "estimate": estimate,
                                "results": {k: {"title": v["title"],
                                                "rows": {f"{t}/{m}": r for (t, m), r in
                                                         v["rows"].items()}}
                                            for k, v in results.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
