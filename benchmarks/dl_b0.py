"""Accuracy of the deep-learning methods on the unseen anatomy, against B0 tilt.

The unseen-anatomy phantom (MNI head, 1 mm, a 112^3 crop around the brain's
centre, never used in training) is simulated with B0 tilted by 0..45
degrees. Dipole stage (true local field -> chi): each deep-learning
inversion with the true direction, the feed-forward networks (IR2QSM, U-Net)
also with the direction ignored (``(0, 0, 1)``), and TKD and TV-ADMM for
reference. Training saw tilts up to 30 degrees. Joint stage (true total
field -> chi, B0 along the third axis, the whole head in a 160x192x160
grid): NeXtQSM's two networks against V-SHARP + TV (the issue's yardstick), the
cross pairs, and PDF + iLSQR (the `classical` pipeline's pair, the default until 2026-11-27).

Writes the table between ``<!-- dl_b0:start -->`` and ``<!-- dl_b0:end -->``
in docs/deep-learning.md.

Usage: ``python benchmarks/dl_b0.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, fmt, markdown_table, replace_section, unseen_head  # noqa: E402

TILTS_DEG = (0, 15, 30, 45)
METHODS = ("nextqsm", "ir2qsm", "unet", "tkd", "tv")
FEED_FORWARD = ("ir2qsm", "unet")


def main():
    from qsmprep.qsm import registry
    from qsmprep.qsm.metrics import nrmse
    from qsmprep.sim import forward
    from qsmprep.sim.acquisition import tilted_b0
    from qsmprep.sim.phantoms import crop

    whole, total, local_true = unseen_head()
    head = crop(whole, (112, 112, 112))
    chi, mask, vox = head.chi_ppm, head.brain_mask, head.voxel_size_mm
    rows = []
    for tilt in TILTS_DEG:
        b0 = tilted_b0(tilt, 30.0)
        local = forward.local_field(chi, mask, vox, b0)
        row = [f"{tilt}°"]
        for name in METHODS:
            kw = {"device": "cpu"} if name in ("nextqsm", *FEED_FORWARD) else {}
            rec = registry.run("inversion", name, local, mask, vox, b0_dir=b0, **kw)
            row.append(fmt(nrmse(rec, chi * mask, mask)))
            if name in FEED_FORWARD:
                rec = registry.run("inversion", name, local, mask, vox, b0_dir=(0, 0, 1),
                                   device="cpu")
                row.append(fmt(nrmse(rec, chi * mask, mask)))
        rows.append(row)
        print(row, flush=True)
    headers = ["B0 tilt", "NeXtQSM", "IR2QSM", "IR2QSM, tilt ignored", "U-Net",
               "U-Net, tilt ignored", "TKD", "TV-ADMM"]
    chi, mask = whole.chi_ppm, whole.brain_mask
    local_true = local_true * mask
    joint = []
    for name, bfr, inv in [("NeXtQSM (both networks)", "nextqsm", "nextqsm"),
                           ("NeXtQSM BFR + TV-ADMM", "nextqsm", "tv"),
                           ("V-SHARP + NeXtQSM VN", "vsharp", "nextqsm"),
                           ("V-SHARP + TV-ADMM", "vsharp", "tv"),
                           ("PDF + iLSQR (`classical` pipeline, no N_std here)", "pdf", "ilsqr")]:
        bkw = {"device": "cpu"} if bfr == "nextqsm" else {}
        ikw = {"device": "cpu"} if inv == "nextqsm" else {}
        loc, m = registry.run("bf_removal", bfr, total, mask, vox, b0_dir=(0, 0, 1), **bkw)
        rec = registry.run("inversion", inv, loc, m, vox, b0_dir=(0, 0, 1), **ikw)
        joint.append([name, fmt(nrmse(loc, local_true, mask)),
                      fmt(nrmse(rec, chi * mask, mask))])
        print(joint[-1], flush=True)
    body = ("NRMSE (%, QSM-CI convention) on the MNI head (unseen anatomy; 112³ crop, 1 mm), "
            "`benchmarks/dl_b0.py`. Dipole stage, true local field, against the B0 tilt:\n\n"
            + markdown_table(headers, rows)
            + "\nTotal field → χ (whole head, 160×192×160, B0 along the third axis; "
              "local-field NRMSE of the background removal step, χ NRMSE of the chain):\n\n"
            + markdown_table(["chain", "local field", "χ"], joint))
    replace_section(ROOT / "docs" / "deep-learning.md", "dl_b0", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
