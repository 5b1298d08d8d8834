#!/usr/bin/env python
"""SVI step time and peak memory of every registered model at its defaults, on CPU or ``--device cuda``,
and how both grow with the batch, the sequence length and the width (``docs/scaling.md``).

Each model trains on its own default data set (generated: shapes, bouncing balls, colour-changing balls)
with its recipe's defaults (config, batch size); ``--sweep`` varies one size, everything else fixed:

    python benchmarks/model_steps.py                                   # every model, its defaults
    python benchmarks/model_steps.py --device cuda                     # the same on a GPU
    python benchmarks/model_steps.py --models kvae --sweep batch 8 16 32 64
    python benchmarks/model_steps.py --models hrssm --sweep length 10 20 40
    python benchmarks/model_steps.py --models dmm --sweep width 0.5 1 2   # x the default widths (recipe.width_fields)

Times are medians over ``--steps`` steps after one warm-up step (CUDA synchronised around each);
memory is the peak over the warm-up and timed steps above the level before them (CUDA:
``max_memory_allocated``; CPU: peak RSS): activations, gradients and Adam's moments. Writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import torch

from common import RESULTS, machine_info, reset_peak_rss, rss_mib, small_data, trainer_on_batch, write_json

from inference.runs.experiment import RunSpec
from inference.recipes.recipe import widened
from inference.recipes.registry import recipes

SWEEPS = ("batch", "length", "width")


def time_steps(name: str, batch: int, length: int, width: float, steps: int, device: str, cache_dir: str) -> dict:
    """One model's step time and memory at these sizes."""
    recipe = recipes()[name]
    train_config = dataclasses.replace(recipe.training.defaults, batch_size=batch, device=device, progress=False)
    spec = RunSpec(name, widened(recipe, recipe.config(), width), train_config, small_data(recipe, batch * 2, cache_dir, length))
    trainer, x = trainer_on_batch(spec, slice(0, batch))
    cuda = trainer.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        reset_peak_rss()
        base = rss_mib("VmRSS")
    trainer.step(x)  # warm-up (validated: the first step of an epoch is) (its memory counts: the allocator reuses it in the timed steps)
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.step(x, validate=False)
        sync()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mib("VmHWM")) - base
    median = statistics.median(times)
    params = sum(p.numel() for p in trainer.params)
    return {"model": name, "batch": batch, "length": length if recipe.sequences else None, "width": width,
            "parameters": params, "step_s": median, "examples_per_s": batch / median, "peak_mib": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=tuple(recipes()), default=list(recipes()))
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    p.add_argument("--device", default="cpu")
    p.add_argument("--length", type=int, default=20, help="frames per sequence (sequence models)")
    p.add_argument("--batch", type=int, default=None, help="default: each recipe's batch size")
    p.add_argument("--sweep", nargs="+", default=None, metavar=("SIZE", "VALUE"),
                   help=f"one of {SWEEPS} and its values (width: factors of the default widths)")
    p.add_argument("--out", default=None, help="JSON path (default RESULTS/model_steps[_SIZE]_DEVICE.json)")
    args = p.parse_args(argv)
    if args.sweep is not None and (args.sweep[0] not in SWEEPS or len(args.sweep) < 2):
        p.error(f"--sweep: expected one of {SWEEPS} and at least one value, got {args.sweep}")
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        for name in args.models:
            batch = args.batch or recipes()[name].training.defaults.batch_size
            settings = [(batch, args.length, 1.0)]
            if args.sweep is not None:
                size, values = args.sweep[0], [float(v) for v in args.sweep[1:]]
                index = SWEEPS.index(size)
                settings = [tuple((int(v) if index < 2 else v) if i == index else s for i, s in enumerate(settings[0]))
                            for v in values]
            for b, length, width in settings:
                torch.manual_seed(0)
                row = time_steps(name, b, length, width, args.steps, args.device, cache_dir)
                rows.append(row)
                print(f"{name:9s} batch {b:4d} length {length:4d} width x{width:<4g} params {row['parameters']:9d}: "
                      f"{1000 * row['step_s']:8.1f} ms/step, {row['examples_per_s']:8.1f} examples/s, peak {row['peak_mib']:8.1f} MiB",
                      flush=True)
    suffix = f"_{args.sweep[0]}" if args.sweep else ""
    write_json(args.out or os.path.join(RESULTS, f"model_steps{suffix}_{args.device.replace(':', '')}.json"),
               {"device": args.device, "steps": args.steps, "rows": rows, **machine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
