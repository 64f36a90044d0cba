"""``qsmprep-train``: train (and ship) the deep-learning models.

Example::

    qsmprep-train nextqsm --out runs/nextqsm --steps 3000 --export
    qsmprep-train nextqsm --out runs/nextqsm --resume runs/nextqsm/checkpoint.pt --steps 6000
"""

from __future__ import annotations

import argparse
import json
import logging
import os

# OpenMP threads that spin while waiting waste a shared CPU (a training step
# measured 6x slower on 2 busy cores); must be set before torch starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from ..dl.inference import PRECISIONS, select_device  # noqa: E402
from .data import (  # noqa: E402
    VALIDATION_PATCHES, chi_patch_stream, content_options, sample_options, training_stream,
    validation_set, whole_validation_set,
)
from .export import WHOLE_HEADS, export  # noqa: E402
from .loop import VALIDATE_EVERY, train  # noqa: E402
from .tasks import TASKS  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(prog="qsmprep-train", description=__doc__.split("\n")[0])
    p.add_argument("model", choices=sorted(TASKS), help="what to train")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.csv)")
    p.add_argument("--steps", type=int, default=3000, help="total optimiser steps")
    p.add_argument("--resume", help="checkpoint to continue from")
    p.add_argument("--init", help="checkpoint or shipped weights (e.g. "
                   "qsmprep/data/models/nextqsm.pt) whose matching weights initialise the model "
                   "and whose architecture it keeps (--config updates it)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="samples per step")
    p.add_argument("--patch", type=int, help="patch edge (voxels); default per model")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=0,
                   help="steps of linear learning-rate warm-up (e.g. 20 when fine-tuning "
                   "with --init)")
    p.add_argument("--config", type=json.loads, default=None,
                   help='architecture overrides as JSON, e.g. \'{"base": 16}\' (of the '
                   "defaults, or of the --init file's architecture)")
    p.add_argument("--data", type=json.loads, default=None,
                   help='training-data (hybrid sample) overrides as JSON, e.g. '
                   '\'{"lesions": true}\' (validation patches and whole heads get them too)')
    p.add_argument("--validation", type=int, default=VALIDATION_PATCHES,
                   help="validation patches")
    p.add_argument("--validation-whole", type=int, default=WHOLE_HEADS,
                   help="held-out whole 1 mm heads on which best.pt is selected (0: select "
                   "on the validation patches)")
    p.add_argument("--validate-every", type=int, default=VALIDATE_EVERY,
                   help="steps between validations (checkpoints are selected on these)")
    p.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds")
    p.add_argument("--time-limit", type=float, help="stop (with a checkpoint) after seconds "
                   "of this call; the schedule of --steps is unchanged (resume later)")
    p.add_argument("--time-budget", type=float, help="end the run after this many seconds of "
                   "training steps (or at --steps, if sooner), the learning rate decaying over "
                   "it: a run sized by time, e.g. on a GPU")
    p.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                   help="of the training steps: bf16 (mixed precision; steps ~2.6x faster on "
                   "CPUs with AVX512-BF16/AMX; also on Ampere+ GPUs, not measured there), "
                   "fp32, or auto (bf16 where native)")
    p.add_argument("--workers", type=int, default=1, help="data simulation processes")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--export", action="store_true",
                   help="ship the best weights + model card to qsmprep/data/models")
    p.add_argument("--models-dir", help="export here instead of the package's models folder")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    options = sample_options(args.model, args.data)
    if args.patch:
        options["patch_size"] = args.patch
    make_stream = chi_patch_stream if args.model == "dmqsm" else training_stream
    train(args.model, args.out, make_stream(args.seed, options, workers=args.workers),
          validation_set(args.seed, options, args.validation), steps=args.steps,
          batch_size=args.batch, device=device, seed=args.seed, config=args.config,
          lr=args.lr, resume=args.resume, init=args.init,
          checkpoint_every_s=args.checkpoint_every, validate_every=args.validate_every,
          time_limit_s=args.time_limit, time_budget_s=args.time_budget,
          progress=not args.no_progress, data_options=options, precision=args.precision,
          warmup_steps=args.warmup,
          whole_samples=whole_validation_set(args.seed, args.validation_whole,
                                             **content_options(options)))
    if args.export:
        val, check = export(args.model, args.out, args.models_dir, device)
        print(json.dumps({"validation": val, "check_case": check}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
