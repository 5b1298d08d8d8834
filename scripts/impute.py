#!/usr/bin/env python
"""Impute missing parts of held-out data with a trained run of any model (the paper's Figure 3 protocol
for sequences), through the model's own imputer.

    python scripts/impute.py --run runs/kvae --mask random          # frames dropped with p = 0.1 ... 1.0
    python scripts/impute.py --run runs/kvae --mask consecutive     # k = 1, 3, ..., 15 missing frames
    python scripts/impute.py --run runs/vae --mask bottom-half      # image models: bottom half, or random pixels

For sequences the first 4 frames are always observed. For every setting it prints and writes
(RUN/imputation_MASK.json) the error over the missing parts for each of the model's estimates (the KVAE:
smoothing and filtering) next to trivial floors (the training set's majority frame, i.e. the walls only,
and the last observed frame; for images, the mean training image), and draws the error curves and an
image strip into RUN/figures/.
"""
from __future__ import annotations

import argparse
import os
import sys

from inference.evaluation import imputation
from inference.cli.flags import HelpFormatter, OneLineParser
from inference.cli.command_line import main_guard
from inference.runs.experiment import load_run, read_spec


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="impute.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--run", required=True, help="a run directory (scripts/train.py MODEL --out RUN)")
    p.add_argument("--mask", choices=("random", "consecutive", "bottom-half"), default="random",
                   help="random or consecutive frames (sequence models); random pixels or bottom-half (image models)")
    p.add_argument("--data-dir", help="MNIST folder, for runs on MNIST")
    p.add_argument("--num-test", type=int, default=0, help="score only the first N held-out examples (0: all)")
    p.add_argument("--batch-size", type=int, default=250, help="examples imputed at once")
    p.add_argument("--num-samples", type=int, default=None,
                   help="posterior-predictive draws per example, whose mean is the estimate (default: the model's "
                        "choice: several for the DMM, whose estimate is an average of draws; 1 for models whose "
                        "estimates do not average draws, e.g. the KVAE's Kalman smoothing)")
    p.add_argument("--metric", choices=tuple(imputation.METRICS), default="hamming",
                   help="hamming: fraction of wrong binary pixels; mse: mean squared error")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    imputation.check_request(read_spec(args.run).recipe, args.mask, args.batch_size, args.num_samples, args.metric,
                             args.num_test)  # before any work
    run = load_run(args.run, data_dir=args.data_dir)
    rows = imputation.evaluate(run, args.mask, args.batch_size, args.seed, args.num_samples, args.metric, args.num_test)
    for row in rows:
        print(f"{args.mask} {row['setting']}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "setting"))
    imputation.figures(run, args.mask, rows, args.seed, args.metric)
    num_test = args.num_test or int(run.data.test.shape[0])
    out = imputation.save(run, args.mask, rows, metric=args.metric, num_test=num_test, seed=args.seed)
    print(f"wrote {out} and figures in {os.path.join(args.run, 'figures')}")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main, renames={"path": "--run", "kind": "--mask", "num_test": "--num-test",
                                       "num_samples": "--num-samples", "batch_size": "--batch-size"}))
