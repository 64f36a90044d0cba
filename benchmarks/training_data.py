"""How much of the hybrid training data's chi an inversion can recover.

Held-out whole training heads (``qsmprep.train.data.whole_validation_set``:
the Challenge head deformed, 1 mm, random B0 tilt, seed 0), simulated with
three brain-texture models (``qsmprep.sim.phantoms.add_texture``); each is
inverted from its true local field by TKD and TV-ADMM (the classical
references of the dipole stage). On the benchmark phantoms TV leads TKD by
7-10 points NRMSE; training data on which it does not are data whose target
is mostly out of reach of any inversion, and a network trained on them
learns little beyond its closed-form input (docs/simulation.md, *Texture*).

Writes the table between ``<!-- training_data:start -->`` and
``<!-- training_data:end -->`` in docs/simulation.md.

Usage: ``python benchmarks/training_data.py [--heads N]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, fmt, markdown_table, replace_section, write_json  # noqa: E402

#: texture models: label -> hybrid_sample keywords
MODELS = {
    "the shipped model: floor 0–0.01 ppm + 0–0.2·|χ|, 2–8 mm FWHM": {},
    "flat 0–0.03 ppm, 2–8 mm FWHM (the model until 2026-11-27)":
        {"texture_floor_ppm": (0.0, 0.03), "texture_relative": (0.0, 0.0)},
    "no texture": {"texture_floor_ppm": (0.0, 0.0), "texture_relative": (0.0, 0.0)},
}


def main(argv=None):
    from qsmprep.qsm.inversion import tkd, tv_admm
    from qsmprep.qsm.metrics import nrmse
    from qsmprep.train.data import whole_validation_set

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=6)
    args = parser.parse_args(argv)
    rows, results = [], {}
    for label, options in MODELS.items():
        scores = []
        for s in whole_validation_set(0, args.heads, **options):
            f, m, chi = s["local_field"], s["mask"], s["chi"]
            kw = {"b0_dir": s["b0_dir"]}
            scores.append([nrmse(tkd(f, m, s["voxel_size_mm"], **kw), chi, m),
                           nrmse(tv_admm(f, m, s["voxel_size_mm"], **kw), chi, m)])
        scores = np.asarray(scores)
        gain = scores[:, 0] - scores[:, 1]
        results[label] = scores.tolist()
        rows.append([label, f"{fmt(scores[:, 0].mean())} / {fmt(np.median(scores[:, 0]))}",
                     f"{fmt(scores[:, 1].mean())} / {fmt(np.median(scores[:, 1]))}",
                     f"{fmt(gain.mean())} ({fmt(gain.min())} to {fmt(gain.max())})"])
        print(rows[-1], flush=True)
    body = (f"NRMSE (%, mean / median over {args.heads} held-out whole training heads, 1 mm, "
            "from the true local field; `benchmarks/training_data.py`):\n\n"
            + markdown_table(["brain texture", "TKD", "TV-ADMM", "TV's lead over TKD (range)"],
                             rows) + "\n")
    replace_section(ROOT / "docs" / "simulation.md", "training_data", body)
    write_json(RESULTS / "training_data.json", results)


if __name__ == "__main__":
    main()
