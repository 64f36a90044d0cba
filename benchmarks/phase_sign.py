#!/usr/bin/env python
"""The phase-sign check (``--phase-sign auto``, :mod:`qsmprep.qsm.phase_sign`) on
heads of real and simulated geometry.

The check correlates the B0 map with the field of the air that the magnitude
outlines; r >= 0.3 confirms the sign, r <= -0.3 negates the phase. Two parts:

- ``--geometry``: the QSM Challenge 2.0 head (``../shared/data/challenge2-head``:
  real skull, sinuses, mastoid cells, face) at 2.56 mm
  (:func:`independent_heads.challenge_geometry`): χ from the Challenge's labels,
  its field by dipole convolution, the magnitude the fraction of a voxel that
  is neither air nor bone. B0 tilted 0-45 degrees about the first and the
  second axis; the head as it is, with the face removed (magnitude and field
  zeroed in front of and below the brain, as defacing tools do), and with a
  layer of fat under the skin (its field offset by fat's chemical shift,
  -3.4 ppm, times the fat fraction; none of our simulators has fat).
- ``--heads CACHE``: the six heads of the independent benchmark, read from a
  folder holding their ``<name>.pkl`` (what ``benchmarks/independent.py
  --head-cache`` writes for the full and the ``--held-out`` suite; a head not
  there is skipped with a message), each through the app's front end
  (MCPC-3D-S, ROMEO, echo combination, BET mask); the field as it is and
  negated.

Each row gives r of the check as it is (the brain and the tissue with signal
outside it) and of the brain alone (the check before rule R29-6; docs/usage.md,
"Phase sign check"). Writes the ``phase_sign`` section of docs/benchmarks.md
and benchmarks/results/phase_sign.json.

Usage: ``python benchmarks/phase_sign.py --geometry [--heads CACHE]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, markdown_table, publish  # noqa: E402

SECTION = "phase_sign"
#: B0 tilts (degrees) of the geometry part, about each of the first two axes
TILTS_DEG = (0.0, 15.0, 30.0, 45.0)
#: fat's chemical shift against water (ppm): its voxels' field is offset by it
FAT_SHIFT_PPM = -3.4
#: the geometry variants: (name, depth of the fat layer under the skin in mm, fat
#: fraction, face removed)
VARIANTS = (("as it is", 0.0, 0.0, False), ("defaced", 0.0, 0.0, True),
            ("fat 5 mm, fraction 0.5", 5.0, 0.5, False), ("fat 5 mm, fraction 1", 5.0, 1.0, False),
            ("fat 8 mm, fraction 1", 8.0, 1.0, False))
#: the independent benchmark's heads: three decision heads, three held-out
HEADS = ("mni-3T-1.5mm-tilt15", "mni-7T-1.25mm-tilt25", "mni-3T-1mm-tilt5",
         "mni-3T-1.2mm-tilt20", "mni-7T-1mm-tilt10", "challenge-3T-1.28mm-tilt12")


def tilted(axis, degrees):
    """Unit B0 direction tilted from the third voxel axis towards ``axis``."""
    b0 = np.zeros(3)
    b0[2], b0[axis] = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    return tuple(float(v) for v in b0)


def both_checks(field, magnitude, mask, vox, b0):
    """r of the check as it is and of the brain alone (None where it abstains
    for lack of voxels)."""
    from qsmprep.qsm.phase_sign import phase_sign_evidence

    now = phase_sign_evidence(field, magnitude, mask, vox, b0)
    brain = phase_sign_evidence(field, magnitude, mask, vox, b0, outside_mm=None)
    return now["correlation"], brain["correlation"]


def geometry_rows(block=4, tilts=TILTS_DEG, variants=VARIANTS, source=None):
    """The rows of the geometry part (see the module docstring)."""
    import independent_heads

    from qsmprep.qsm.kernels import dipole_convolve
    from qsmprep.qsm.mask import depth_mm

    chi, mask, magnitude, vox = independent_heads.challenge_geometry(
        block, **({} if source is None else {"source": source}))
    y, z = np.ogrid[:chi.shape[1], :chi.shape[2]]
    ymax, zmin = np.nonzero(mask.any(axis=(0, 2)))[0][-1], np.nonzero(mask.any(axis=(0, 1)))[0][0]
    # the face: in front of the brain's front 12 of its voxels and below its lowest 40 % (RAS)
    face = ((y > ymax - 12) & (z < zmin + 0.4 * (chi.shape[2] - zmin)))[None] & ~mask
    skin_depth = depth_mm(magnitude > 0.2, vox)
    rows = []
    for axis in (0, 1):
        for deg in tilts:
            b0 = tilted(axis, deg)
            field = dipole_convolve(chi, vox, b0)
            for name, fat_mm, fraction, defaced in variants:
                f, m = field, magnitude
                if fat_mm:
                    f = f + FAT_SHIFT_PPM * fraction * ((skin_depth <= fat_mm) & ~mask)
                if defaced:
                    f, m = np.where(face, 0, f), np.where(face, 0, m)
                now, brain = both_checks(f, m, mask, vox, b0)
                rows.append({"axis": axis + 1, "tilt_deg": deg, "variant": name,
                             "r": now, "r_brain_only": brain})
    return rows


def head_rows(cache):
    """The rows of the heads part (see the module docstring)."""
    import pickle

    from accuracy import front_end
    from independent import as_case

    from qsmprep.config import DEFAULT_METHODS

    rows = []
    for name in HEADS:
        path = Path(cache) / f"{name}.pkl"
        if not path.exists():
            print(f"[phase_sign] {path} not found: build it with benchmarks/independent.py",
                  flush=True)
            continue
        case = as_case(pickle.loads(path.read_bytes()))
        b0_hz, _, mask = front_end(case, dict(DEFAULT_METHODS))
        vox = case.voxel_size_mm
        now, brain = both_checks(b0_hz, case.magnitude, mask, vox, case.b0_dir)
        negated, _ = both_checks(-b0_hz, case.magnitude, mask, vox, case.b0_dir)
        rows.append({"head": name, "held_out": HEADS.index(name) >= 3, "r": now,
                     "r_negated": negated, "r_brain_only": brain})
        print(f"[phase_sign] {name}: r {now} (brain only {brain})", flush=True)
    return rows


def render(results):
    """The section's Markdown."""
    text = ["Generated by `python benchmarks/phase_sign.py --geometry --heads CACHE` (raw "
            "numbers: `benchmarks/results/phase_sign.json`). The phase-sign check "
            "(`--phase-sign auto`) correlates the B0 map with the field of the air that the "
            "magnitude outlines: r >= 0.3 confirms the sign, r <= -0.3 negates the phase, "
            "between them it abstains (docs/usage.md, \"Phase sign check\"). Each cell: r of "
            "the check (the brain and the tissue with signal outside it, since rule R29-6) / "
            "of the brain alone (the check before). The fat layer's field is offset by fat's "
            "chemical shift (-3.4 ppm) times its fraction; none of our simulators has fat.\n"]
    if results.get("geometry"):
        text.append("The QSM Challenge 2.0 head (real skull, sinuses, mastoid cells, face) at "
                    "2.56 mm, the right-signed field, B0 tilted from the third voxel axis:\n")
        variants = list(dict.fromkeys(r["variant"] for r in results["geometry"]))
        cells = {(r["axis"], r["tilt_deg"], r["variant"]):
                 f"{fmt(r['r'], 2)} / {fmt(r['r_brain_only'], 2)}" for r in results["geometry"]}
        keys = sorted({(r["axis"], r["tilt_deg"]) for r in results["geometry"]})
        text.append(markdown_table(["B0 tilt", *variants],
                                   [[f"{deg:g}° towards axis {axis}",
                                     *(cells[(axis, deg, v)] for v in variants)]
                                    for axis, deg in keys]))
    if results.get("heads"):
        text.append("\nThe independent benchmark's heads through the app's front end (BET mask):\n")
        text.append(markdown_table(
            ["head", "r", "r, negated field", "r, brain alone"],
            [[r["head"] + (" (held out)" if r["held_out"] else ""), fmt(r["r"], 3),
              fmt(r["r_negated"], 3), fmt(r["r_brain_only"], 3)] for r in results["heads"]]))
    return "\n".join(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--geometry", action="store_true", help="the Challenge geometry part")
    parser.add_argument("--heads", metavar="CACHE", help="the independent benchmark's cache")
    parser.add_argument("--docs", type=Path, help="Markdown file to write (docs/benchmarks.md)")
    args = parser.parse_args(argv)
    if not (args.geometry or args.heads):
        parser.error("give --geometry and/or --heads CACHE")
    results = {"geometry": geometry_rows() if args.geometry else [],
               "heads": head_rows(args.heads) if args.heads else []}
    publish(SECTION, render(results), results, docs=args.docs)
    return results


if __name__ == "__main__":
    main()
