#!/usr/bin/env python
"""SVI overhead: this library's SVI step against a hand-written PyTorch step (seed 004's comparison).

The same MLP VAE (784-512-512-64, Bernoulli decoder, Normal encoder; identical initial weights) is
trained on the same batches (batch 128) by:

* ``pyro``: :class:`inference.Trainer`'s SVI step (ELBO ``differentiable_loss``, backward, Adam);
* ``torch``: a hand-written loop: reparameterised sample, BCE-with-logits, analytic Gaussian KL, Adam.

Steps alternate (pyro, torch, pyro, ...) so both see the same machine state; the ratio of median
step times is printed and written as JSON with the peak memory of each path (peak RSS of a process
running that path alone on CPU; ``torch.cuda.max_memory_allocated`` on CUDA).

    python benchmarks/svi_overhead.py [--data-dir ../shared/data/mnist] [--elbo meanfield] [--steps 200]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from copy import deepcopy

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyro  # noqa: E402

from inference.trainer import TrainConfig, Trainer  # noqa: E402
from pyro_models.datasets import load_image_data  # noqa: E402
from pyro_models.vae import VAEConfig, build_vae  # noqa: E402

DEFAULT_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


class HandWrittenVAE:
    """Seed 004's plain PyTorch VAE step on copies of the library's encoder and decoder networks."""

    def __init__(self, encoder, decoder, lr: float):
        self.encoder, self.decoder = encoder, decoder
        self.optimizer = torch.optim.Adam(list(encoder.parameters()) + list(decoder.parameters()), lr=lr)

    def step(self, x: torch.Tensor) -> float:
        loc, scale = self.encoder(x)
        z = loc + scale * torch.randn_like(loc)
        logits = self.decoder(z)
        reconstruction = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = (0.5 * (scale**2 + loc**2) - scale.log() - 0.5).sum()
        loss = reconstruction + kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item() / x.shape[0]


def build(args):
    data = load_image_data(args.data, args.data_dir, num_shapes=args.num_shapes, download=False).train
    torch.manual_seed(args.seed)
    model, guide = build_vae("vae", tuple(data.shape[1:]), VAEConfig())
    hand = HandWrittenVAE(deepcopy(guide.encoder), deepcopy(model.decoder), args.lr)
    config = TrainConfig(batch_size=args.batch_size, lr=args.lr, elbo=args.elbo, jit=args.jit, device=args.device, progress=False)
    trainer = Trainer(model, guide, config)
    hand.encoder.to(trainer.device), hand.decoder.to(trainer.device)
    trainer._setup_optimizer(data[: args.batch_size].to(trainer.device))
    batches = [data[i : i + args.batch_size].to(trainer.device) for i in range(0, len(data) - args.batch_size + 1, args.batch_size)]
    return trainer, hand, batches


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_alternating(trainer, hand, batches, steps: int, warmup: int):
    times = {"pyro": [], "torch": []}
    steppers = {"pyro": trainer.step, "torch": hand.step}
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        for name in ("pyro", "torch") if i % 2 == 0 else ("torch", "pyro"):
            _sync(trainer.device)
            start = time.perf_counter()
            steppers[name](batch)
            _sync(trainer.device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def _peak_rss_child(args, path: str, queue) -> None:
    torch.set_num_threads(args.threads)
    pyro.enable_validation(args.validate)
    trainer, hand, batches = build(args)
    step = trainer.step if path == "pyro" else hand.step
    step(batches[0])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(args.memory_steps):
        step(batches[i % len(batches)])
    queue.put((before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def peak_memory(args):
    """Peak memory (MiB) of each path: CUDA allocator peak, or the peak RSS of a child process."""
    if args.device.startswith("cuda"):
        trainer, hand, batches = build(args)
        result = {}
        for name, step in (("pyro", trainer.step), ("torch", hand.step)):
            torch.cuda.reset_peak_memory_stats()
            for i in range(args.memory_steps):
                step(batches[i % len(batches)])
            result[name] = {"peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20}
        return result
    context = multiprocessing.get_context("spawn")
    result = {}
    for name in ("pyro", "torch"):
        queue = context.Queue()
        child = context.Process(target=_peak_rss_child, args=(args, name, queue))
        child.start()
        before, after = queue.get()
        child.join()
        result[name] = {"peak_rss_mib": after / 1024, "rss_growth_during_steps_mib": (after - before) / 1024}
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("mnist", "shapes"), default="mnist" if os.path.isdir(DEFAULT_MNIST) else "shapes")
    p.add_argument("--data-dir", default=DEFAULT_MNIST)
    p.add_argument("--num-shapes", type=int, default=2000)
    p.add_argument("--elbo", choices=("trace", "meanfield"), default="meanfield")
    p.add_argument("--jit", action="store_true")
    p.add_argument("--validate", action="store_true", help="keep Pyro's argument validation on (off by default, as in training)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--memory-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "svi_overhead.json"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.enable_validation(args.validate)
    trainer, hand, batches = build(args)
    times = time_alternating(trainer, hand, batches, args.steps, args.warmup)
    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = median["pyro"] / median["torch"]
    result = {
        "elbo": args.elbo, "jit": args.jit, "validate": args.validate, "device": args.device, "threads": args.threads,
        "batch_size": args.batch_size, "steps": args.steps, "data": args.data,
        "median_step_ms": {k: 1e3 * v for k, v in median.items()},
        "ratio_pyro_over_torch": ratio,
        "memory": peak_memory(args),
    }
    print(f"median step: pyro {1e3 * median['pyro']:.3f} ms, torch {1e3 * median['torch']:.3f} ms; ratio {ratio:.3f} ({args.elbo} ELBO, {args.device}, {args.threads} threads)")
    for name, memory in result["memory"].items():
        print(f"memory {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in memory.items()))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
