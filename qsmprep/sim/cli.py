"""``qsmprep-sim``: write a simulated multi-echo GRE BIDS dataset with ground truth.

Example (the README demo, ~10 s)::

    qsmprep-sim demo_bids --subjects 1 --voxel-size 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from .acquisition import simulate_acquisition, tilted_b0
from .bids import write_acquisition, write_dataset_description, write_participants
from .phantoms import challenge_head, crop, mni_head


def build_parser():
    p = argparse.ArgumentParser(
        prog="qsmprep-sim", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("bids_dir", help="output BIDS dataset folder (created)")
    p.add_argument("--subjects", type=int, default=1, help="number of subjects (each a new draw)")
    p.add_argument("--sessions", type=int, default=0, help="sessions per subject (0: no ses- level)")
    p.add_argument("--phantom", choices=("challenge", "mni"), default="challenge",
                   help="head anatomy: QSM Challenge 2.0 head, or MNI152 (unseen by training)")
    p.add_argument("--voxel-size", type=float, nargs="+", default=[1.0], metavar="MM",
                   help="voxel size in mm (one value or three)")
    p.add_argument("--matrix", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="crop the grid to this matrix around the brain")
    p.add_argument("--te", type=float, nargs="+", default=[0.004, 0.008, 0.012, 0.016, 0.020],
                   metavar="S", help="echo times in seconds")
    p.add_argument("--field-strength", type=float, default=3.0, help="B0 in tesla")
    p.add_argument("--snr", type=float, default=100.0,
                   help="first-echo mean magnitude in the brain over noise std (inf: no noise)")
    p.add_argument("--b0-angle", type=float, default=0.0,
                   help="tilt of B0 from the slab normal, degrees (head pitch); written to the affine")
    p.add_argument("--seed", type=int, default=0, help="random seed (reproducible datasets)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if len(args.voxel_size) not in (1, 3):
        raise SystemExit("--voxel-size takes one value or three")
    if any(te >= 1 for te in args.te):
        raise SystemExit(f"--te expects seconds (e.g. 0.004), got {args.te}")
    make = challenge_head if args.phantom == "challenge" else mni_head
    vox = args.voxel_size[0] if len(args.voxel_size) == 1 else tuple(args.voxel_size)
    subjects = [f"{i + 1:02d}" for i in range(args.subjects)]
    write_dataset_description(args.bids_dir, phantom=args.phantom)
    write_participants(args.bids_dir, subjects)
    for i, subject in enumerate(subjects):
        for j, session in enumerate([f"{k + 1:02d}" for k in range(args.sessions)] or [None]):
            start = time.perf_counter()
            rng = np.random.default_rng([args.seed, i, j])
            phantom = make(vox, rng=rng)
            if args.matrix:
                phantom = crop(phantom, tuple(args.matrix))
            acq = simulate_acquisition(phantom, args.te, args.field_strength,
                                       b0_dir=tilted_b0(args.b0_angle), snr=args.snr, rng=rng)
            write_acquisition(args.bids_dir, acq, subject, session)
            label = f"sub-{subject}" + (f" ses-{session}" if session else "")
            print(f"{label}: {acq.magnitude.shape} at {acq.voxel_size_mm} mm, "
                  f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
