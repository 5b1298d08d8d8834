#!/usr/bin/env python
"""What denormal floats cost a long CPU run: one training epoch from a run's checkpoint with
``torch.set_flush_denormal`` off and on, side by side in one process.

    OMP_NUM_THREADS=1 python benchmarks/denormals.py --run runs/jsb-dmm-st-lr --rounds 3

Weight decay drives weights that the data do not use towards zero; below 1.2e-38 (float32) they become
denormal, and every product with one is many times slower on x86 (microcode assists). A checkpoint after
a few hundred epochs holds many (the script counts them, in the weights and in Adam's moments). Each round
restores the checkpoint, trains one epoch with flushing off, restores it again and trains one with it on
(an epoch with flushing on turns the denormals it writes into zeros, so the rounds start alike); the
ratio is per round, the median printed and written as JSON.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from common import RESULTS, machine_info, write_json

from inference.runs.experiment import LENGTHS_ARG, load_run, model_inputs
from inference.runs.rundir import read_checkpoint
from inference.training import Trainer

TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32


def denormals(tensors) -> tuple:
    """(denormal entries, entries) of the floating-point ``tensors``."""
    tensors = [t for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    return (sum(int(((t != 0) & (t.abs() < TINY)).sum()) for t in tensors), sum(t.numel() for t in tensors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run directory with a checkpoint")
    parser.add_argument("--rounds", type=int, default=3, help="epochs of each, alternating (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "denormals.json"))
    args = parser.parse_args()
    if not os.path.isdir(args.run):
        parser.error(f"--run: expected a run directory, got {args.run}")
    run = load_run(args.run)
    spec, state = run.spec, read_checkpoint(args.run, map_location="cpu")
    trainer = Trainer(run.model, run.guide, spec.train, units_per_example=spec.recipe.training.units_per_example(run.data),
                      lengths_arg=LENGTHS_ARG if getattr(run.data, "ragged", False) else None,
                      vectorize_particles=spec.recipe.training.vectorized_particles)
    train = model_inputs(run.data, "train")
    trainer.setup(tuple(t[: spec.train.batch_size] if t is not None else None for t in train))
    trainer.checkpoints.restore(state)
    weights = denormals(trainer.params)
    moments = denormals([v for s in trainer.optimizer.state.values() for v in s.values()])
    print(f"denormal floats at epoch {state['epoch']}: {weights[0]:,} of {weights[1]:,} weights, "
          f"{moments[0]:,} of {moments[1]:,} Adam moments")
    rows = []
    for r in range(args.rounds):
        seconds = {}
        for flush in (False, True):
            trainer.checkpoints.restore(state)
            torch.set_flush_denormal(flush)
            start = time.perf_counter()
            trainer.train_epoch(train, state["epoch"] + 1)
            seconds[flush] = time.perf_counter() - start
        rows.append({"flush_off_s": seconds[False], "flush_on_s": seconds[True], "ratio": seconds[False] / seconds[True]})
        print(f"round {r + 1}: {seconds[False]:.2f} s with denormals, {seconds[True]:.2f} s flushed: {rows[-1]['ratio']:.2f}x")
    median = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    print(f"median: {median['flush_off_s']:.2f} s against {median['flush_on_s']:.2f} s an epoch: flushing is {median['ratio']:.2f}x faster")
    write_json(args.out, {"benchmark": "denormals", "run": args.run, "epoch": state["epoch"],
                          "denormal_weights": weights, "denormal_adam_moments": moments, "rounds": rows,
                          "median": median, "machine": machine_info()})


if __name__ == "__main__":
    main()
