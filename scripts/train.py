#!/usr/bin/env python
"""Train a registered model with SVI. The flags of each model are generated from its configs:

    python scripts/train.py --help                  # the models
    python scripts/train.py kvae --help             # kvae's flags with their defaults
    python scripts/train.py vae --data shapes --epochs 5 --out runs/vae-shapes
    python scripts/train.py conv-vae --data mnist --data-dir ../shared/data/mnist --guide iaf --out runs/cvae
    python scripts/train.py kvae --data bouncing-balls --out runs/kvae      # the original recipe's defaults
    python scripts/train.py hrssm --data color-balls --out runs/hrssm       # --no-boundaries: the RSSM
    torchrun --nproc_per_node 2 scripts/train.py vae --data shapes --out runs/vae-dp   # data parallel

Writes a run directory (--out): config.json, metrics.jsonl, checkpoint.pt (and the one before),
figures/. --resume continues it (the learning rate, clip and epochs may change); the same command again
continues an interrupted run, and restarts one that failed before its first checkpoint. Errors are one
line; --debug (or PYRO_MODELS_DEBUG=1) shows the traceback.
"""
from __future__ import annotations

import sys

from inference.cli.command_line import main_guard, parse_train_args
from inference.training.distributed import main_process
from inference.runs.experiment import train


def main(argv=None) -> int:
    args = parse_train_args(argv, __doc__)
    history = train(args.spec, args.out, resume=args.resume)
    if not main_process():  # under torchrun: rank 0 reports
        return 0
    if history:
        last = history[-1]
        print(f"done: epoch {last['epoch']}, test ELBO {last['test_elbo']:.2f} nats/example; run in {args.out}")
    else:
        print(f"nothing to do: the run in {args.out} has done its {args.spec.train.epochs} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
