"""Does feeding the B0 direction work? Dipole-inversion NRMSE against B0 tilt.

The unseen-anatomy phantom (MNI head, 1 mm, a 112^3 crop around the brain's
centre) is simulated with B0 tilted by 0..45 degrees; each deep-learning
inversion runs with the true direction, and the feed-forward networks
(IR2QSM, U-Net) also with the direction ignored (``(0, 0, 1)``). Training
saw tilts up to 30 degrees.

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
from _common import ROOT, fmt, markdown_table, replace_section  # noqa: E402

TILTS_DEG = (0, 15, 30, 45)
METHODS = ("nextqsm", "ir2qsm", "unet")


def main():
    from qsmprep.qsm import registry
    from qsmprep.qsm.metrics import nrmse
    from qsmprep.sim import forward
    from qsmprep.sim.acquisition import tilted_b0
    from qsmprep.sim.phantoms import crop, mni_head

    head = crop(mni_head(1.0, rng=0), (112, 112, 112))
    chi, mask, vox = head.chi_ppm, head.brain_mask, head.voxel_size_mm
    rows = []
    for tilt in TILTS_DEG:
        b0 = tilted_b0(tilt, 30.0)
        local = forward.local_field(chi, mask, vox, b0)
        row = [f"{tilt}°"]
        for name in METHODS:
            rec = registry.run("inversion", name, local, mask, vox, b0_dir=b0, device="cpu")
            row.append(fmt(nrmse(rec, chi * mask, mask)))
            if name != "nextqsm":
                rec = registry.run("inversion", name, local, mask, vox, b0_dir=(0, 0, 1),
                                   device="cpu")
                row.append(fmt(nrmse(rec, chi * mask, mask)))
        rows.append(row)
        print(row, flush=True)
    headers = ["B0 tilt", "NeXtQSM", "IR2QSM", "IR2QSM, tilt ignored", "U-Net",
               "U-Net, tilt ignored"]
    body = ("Dipole-inversion NRMSE (%) on the MNI head (112³ crop, 1 mm, true local field) "
            "against the B0 tilt (`benchmarks/dl_b0.py`):\n\n" + markdown_table(headers, rows))
    replace_section(ROOT / "docs" / "deep-learning.md", "dl_b0", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
