#!/usr/bin/env python
"""Named pipelines on real in-vivo data: does the deep-learning chain behave?

The simulated benchmark (``benchmarks/accuracy.py``) decides which chain is the
default; the networks were trained on simulated fields only, so before (and
after) a deep-learning default this script runs every named pipeline
(``qsmprep.config.PIPELINES``) on the real 3-echo brain crop of
``../shared/data/romeo-invivo`` (no ground truth; TE 4/8/12 ms and 3 T
assumed, as upstream) with the app's shared front end: phase rescaled to
radians → MCPC-3D-S → ROMEO → ROMEO's B0 combination → BET mask, then each
pipeline's background removal and inversion and mean referencing.

No ground truth, so properties that need none, in each pipeline's mask:

- the χ distribution (1st/99th/99.9th percentiles, std, ppm): a network that
  falls apart on real noise or on a voxel size it was not trained on shows
  it as a blown-up or collapsed distribution;
- **high-pass RMS** of χ (σ = 1 voxel, ppm): noise and streaks;
- **dipole fit**: ‖M(D χ − f)‖ / ‖M f‖ with ``f`` the pipeline's own local
  field (the fraction of its own data it does not explain; regularisation
  makes it non-zero for every method);
- **correlation** with the classical chain's χ in the common mask, and the
  fraction of the BET mask each keeps.

Writes the ``invivo_pipelines`` section of docs/benchmarks.md,
benchmarks/results/invivo_pipelines.json and the figure
docs/invivo_pipelines.png (middle axial slice of each χ, same grey scale).

Usage: ``python benchmarks/invivo_pipelines.py [--data DIR]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, fmt, hardware, hardware_note, markdown_table, publish  # noqa: E402
from accuracy import call, call_full  # noqa: E402
from invivo_echo import FIELD_STRENGTH_T, high_pass_rms  # noqa: E402
from invivo_echo import front_end as echo_front_end  # noqa: E402

SECTION = "invivo_pipelines"
B0_DIR = (0.0, 0.0, 1.0)  # the crop's voxel axes are the scanner's (identity rotation)
FIGURE = ROOT / "docs" / "invivo_pipelines.png"
#: pipelines run beside the named ones: V-SHARP + TV, the classical yardstick
#: of the independent benchmark (docs/benchmarks.md, section independent)
REFERENCES = {"vsharp+tv": {"bf_removal": "vsharp", "inversion": "tv"}}


def dipole_misfit(chi, local, mask, voxel_size_mm):
    """‖M(D χ − f)‖ / ‖M f‖ on the 2× zero-padded grid (dimensionless)."""
    from qsmprep.sim.forward import dipole_convolve

    fit = dipole_convolve(np.where(mask, chi, 0.0).astype(np.float32), voxel_size_mm, B0_DIR)
    return float(np.linalg.norm((fit - local)[mask]) / np.linalg.norm(local[mask]))


def front_end(data_dir):
    """Total field (ppm), its noise (ppm), ``mask_for(inversion)`` (the BET mask as
    the app makes it before that inversion), magnitude, voxel size and echo times:
    :func:`invivo_echo.front_end` and the default echo combination."""
    from qsmprep.config import DEFAULT_METHODS
    from qsmprep.qsm.units import hz_to_ppm

    _, unwrapped, magnitude, vox, te, mask_for = echo_front_end(data_dir)
    b0, n_std = call("echo_combination", DEFAULT_METHODS["echo_combination"], unwrapped,
                     magnitude, te)
    return (hz_to_ppm(b0, FIELD_STRENGTH_T), hz_to_ppm(n_std, FIELD_STRENGTH_T), mask_for,
            magnitude, vox, te)


def run_pipeline(methods, total, noise, mask, magnitude, vox, te):
    from qsmprep.qsm import registry

    local, m = call("bf_removal", methods["bf_removal"], total, mask, vox, b0_dir=B0_DIR,
                    noise_std_ppm=noise)
    chi = call_full("inversion", methods["inversion"], local, m, vox, b0_dir=B0_DIR,
                    noise_std_ppm=noise, magnitude=magnitude, magnitude_echoes=magnitude,
                    echo_times_s=te)
    if registry.gives_local_field(methods["inversion"]):  # total field inversion
        chi, local = chi
    chi = call("referencing", "mean", chi, m)
    return local, chi, np.asarray(m, bool)


def figure(chis, path):
    """Middle axial slice of each pipeline's χ, −0.15..0.15 ppm."""
    from PIL import Image, ImageDraw

    tiles = []
    for name, (chi, m) in chis.items():
        z = chi.shape[2] // 2
        sl = np.where(m[:, :, z], chi[:, :, z], 0.0)
        grey = np.clip((sl + 0.15) / 0.3 * 255, 0, 255).astype(np.uint8)
        img = Image.fromarray(np.rot90(grey)).resize((grey.shape[0] * 4, grey.shape[1] * 4),
                                                     Image.NEAREST)
        tile = Image.new("L", (img.width, img.height + 16), 255)
        tile.paste(img, (0, 16))
        ImageDraw.Draw(tile).text((2, 2), name, fill=0)
        tiles.append(tile)
    out = Image.new("L", (sum(t.width + 4 for t in tiles), tiles[0].height), 255)
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + 4
    out.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "romeo-invivo")
    args = p.parse_args(argv)
    from qsmprep.config import DEFAULT_METHODS, PIPELINES

    total, noise, mask_for, magnitude, vox, te = front_end(args.data)
    default_mask = mask_for(DEFAULT_METHODS["inversion"])
    results, chis = {}, {}
    for name, change in {**PIPELINES, **REFERENCES}.items():
        methods = {**DEFAULT_METHODS, **change}
        mask = mask_for(methods["inversion"])
        t0 = time.perf_counter()
        local, chi, m = run_pipeline(methods, total, noise, mask, magnitude, vox, te)
        wall = time.perf_counter() - t0
        chis[name] = (chi, m)
        p1, p99, p999 = np.percentile(chi[m], [1, 99, 99.9])
        results[name] = {
            "methods": f"{methods['bf_removal']} + {methods['inversion']}",
            "p1_ppm": p1, "p99_ppm": p99, "p999_ppm": p999,
            "std_ppm": float(np.std(chi[m])),
            "highpass_rms_ppm": high_pass_rms(chi, m),
            "dipole_misfit": dipole_misfit(chi, local, m, vox),
            "mask_fraction": float(m.sum() / mask.sum()),
            "wall_s": wall,
        }
    for ref in ("classical", "vsharp+tv"):
        ref_chi, ref_mask = chis[ref]
        for name, (chi, m) in chis.items():
            both = m & ref_mask
            results[name][f"corr_with_{ref}"] = float(
                np.corrcoef(chi[both], ref_chi[both])[0, 1])
    figure(chis, FIGURE)

    rows = [[name, r["methods"], f"{r['p1_ppm']:+.3f} / {r['p99_ppm']:+.3f} / {r['p999_ppm']:+.3f}",
             fmt(r["std_ppm"], 3), fmt(r["highpass_rms_ppm"], 4), fmt(r["dipole_misfit"], 2),
             fmt(r["corr_with_classical"], 2), fmt(r["corr_with_vsharp+tv"], 2),
             f"{r['mask_fraction']:.0%}", fmt(r["wall_s"], 1)]
            for name, r in results.items()]
    info = hardware()
    body = (
        "## Named pipelines in vivo (no ground truth)\n\n"
        f"The real 3-echo brain crop `romeo-invivo` ({' × '.join(map(str, default_mask.shape))} "
        "voxels, "
        f"{' × '.join(f'{v:.2f}' for v in vox)} mm; TE 4/8/12 ms and 3 T assumed; B0 along the "
        "voxel z axis) through the app's front end (MCPC-3D-S → ROMEO → ROMEO B0 → BET mask, "
        f"{default_mask.mean():.0%} of the crop for the default; each pipeline gets the mask the "
        "app makes before its inversion), then each named pipeline (`--pipeline`) and, as the "
        "classical reference of the independent benchmark, V-SHARP + TV, with mean "
        "referencing (`benchmarks/invivo_pipelines.py`). Dipole misfit: ‖M(Dχ − f)‖/‖Mf‖ against "
        "the pipeline's own local field f. High-pass RMS: χ minus its σ = 1 voxel smoothing "
        "(noise, streaks). Mask kept: the fraction of the BET mask the background removal "
        "returns. Figure: `docs/invivo_pipelines.png` (middle axial slice, −0.15…0.15 ppm).\n\n"
        + markdown_table(["pipeline", "methods", "χ 1st / 99th / 99.9th pct (ppm)", "χ std (ppm)",
                          "χ high-pass RMS (ppm)", "dipole misfit", "correlation with classical",
                          "correlation with V-SHARP + TV", "mask kept", "wall (s)"], rows)
        + "\n" + hardware_note(info) + "\n")
    publish(SECTION, body, {"hardware": info, "results": results, "data": str(args.data.name)})
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
