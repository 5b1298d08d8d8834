#!/usr/bin/env python
"""Data-parallel throughput: examples per second of SVI training with 1 and N processes (ranks), one
thread each, for the VAE and the KVAE (or ``--models``), measured side by side in one run, and the
share of a step the gradient all-reduce takes.

    python benchmarks/data_parallel.py                       # 1 and 2 CPU processes (gloo)
    python benchmarks/data_parallel.py --ranks 1 2 4 --device cuda   # GPUs (nccl), one per rank

Each rank runs the library's trainer (``inference.trainer.Trainer`` with an ``inference.training.distributed.World``)
on its own batches of the model's default data (recipe defaults: config and per-rank batch size) and
times ``--steps`` steps after ``--warmup``; throughput counts the examples of all ranks. The all-reduce
share is the time of one all-reduce of a gradient-sized buffer over the median step. Writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import RESULTS, machine_info, small_data, trainer_on_batch, write_json

from inference.training.distributed import World, backend_for
from inference.runs.experiment import RunSpec
from inference.recipes.registry import recipes


def rank_main(rank: int, world_size: int, args: argparse.Namespace, folder: str) -> None:
    torch.set_num_threads(1)
    device = f"cuda:{rank}" if args.device == "cuda" else args.device
    dist.init_process_group(backend_for(device), init_method=f"file://{os.path.join(folder, 'rendezvous')}",
                            rank=rank, world_size=world_size)
    try:
        result = measure(args, World(rank, world_size, rank), device)
        if rank == 0:
            with open(os.path.join(folder, "result.json"), "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def measure(args: argparse.Namespace, world: World, device: str) -> dict:
    """Step times of this rank's trainer on its own batches (rank r: examples r*B .. r*B + B)."""
    recipe = recipes()[args.model]
    batch = args.batch or recipe.training.defaults.batch_size
    train = dataclasses.replace(recipe.training.defaults, batch_size=batch, device=device, progress=False)
    spec = RunSpec(args.model, recipe.config(), train, small_data(recipe, batch * world.size, args.cache_dir))
    trainer, x = trainer_on_batch(spec, slice(world.rank * batch, (world.rank + 1) * batch), world)
    cuda = trainer.device.type == "cuda"
    times = []
    for i in range(args.warmup + args.steps):
        if world.parallel:
            dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.step(x, validate=False)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    buffer = torch.zeros(sum(p.numel() for p in trainer.params) + 1, device=trainer.device)
    reduce_times = []
    for _ in range(args.steps if world.parallel else 0):
        start = time.perf_counter()
        dist.all_reduce(buffer)
        if cuda:
            torch.cuda.synchronize()
        reduce_times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {"ranks": world.size, "batch_per_rank": batch, "step_s": step, "examples_per_s": world.size * batch / step,
            "all_reduce_s": statistics.median(reduce_times) if reduce_times else 0.0, "gradient_floats": buffer.numel() - 1}


def run_ranks(args: argparse.Namespace, world_size: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(rank_main, args=(world_size, args, folder), nprocs=world_size, join=True)
        with open(os.path.join(folder, "result.json")) as f:
            return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=tuple(recipes()), default=["vae", "kvae"])
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2], help="process counts to compare (the first is the base)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help="per-rank batch (default: the recipe's)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", default=None, help="JSON path (default RESULTS/data_parallel_DEVICE.json)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        args.cache_dir = cache_dir
        for model in args.models:
            args.model = model
            base = None
            for world_size in args.ranks:
                row = {"model": model, **run_ranks(args, world_size)}
                base = base or row["examples_per_s"]
                row["speedup"] = row["examples_per_s"] / base
                row["all_reduce_share"] = row["all_reduce_s"] / row["step_s"]
                rows.append(row)
                print(f"{model:8s} {world_size} ranks: {row['examples_per_s']:8.1f} examples/s ({1000 * row['step_s']:.1f} ms/step, "
                      f"all-reduce {100 * row['all_reduce_share']:.1f}% of it), x{row['speedup']:.2f} of {args.ranks[0]} rank(s)",
                      flush=True)
    write_json(args.out or os.path.join(RESULTS, f"data_parallel_{args.device}.json"),
               {"device": args.device, "steps": args.steps, "rows": rows, **machine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
