#!/usr/bin/env python
"""SVI overhead: this library's SVI step against a hand-written PyTorch step (seed 004's comparison).

The same MLP VAE (784-512-512-64, Bernoulli decoder, Normal encoder; identical initial weights) is
trained on the same batches (batch 128) by:

* ``pyro``: :class:`inference.Trainer`'s SVI step (ELBO ``differentiable_loss``, backward, Adam) with
  ``jit=True`` (the loss compiled by ``torch.jit.trace``);
* ``pyro_eager``: the same step without compilation (the trainer's default);
* ``torch``: a hand-written loop: reparameterised sample, BCE-with-logits, analytic Gaussian KL, Adam;
* ``pixyz`` (when pixyz is importable; seed 004's library, written for 0.3.3): seed 004's pixyz VAE,
  ``Model(loss=(KullbackLeibler(q, prior) - p.log_prob().expectation(q)).mean())`` (the seed's
  ``StochasticReconstructionLoss``, in 0.3.3's spelling), its
  ``model.train({"x": x})`` step, on copies of the same networks.

Every path steps with the same optimiser, ``torch.optim.Adam(fused=True)`` (the trainer's), so that the
ratios measure the framework's overhead, not the optimiser's implementation.

Steps rotate through the paths so all see the same machine state; the ratios of median step times
are printed and written as JSON with the peak memory of each path (peak RSS of a process running
that path alone on CPU; ``torch.cuda.max_memory_allocated`` on CUDA).

    python benchmarks/svi_overhead.py [--data-dir ../shared/data/mnist] [--elbo meanfield] [--steps 300]
"""
from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import statistics
import time

import torch
import torch.nn.functional as F


from common import RESULTS, reset_peak_rss, rss_mib, write_json

import pyro

from inference.trainer import TrainConfig, Trainer
from pyro_models.datasets import load_image_data
from pyro_models.vae import VAEConfig, build_vae

DEFAULT_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


class HandWrittenVAE:
    """Seed 004's plain PyTorch VAE step on copies of the library's encoder and decoder networks."""

    def __init__(self, encoder, decoder, lr: float):
        self.encoder, self.decoder = encoder, decoder
        self.optimizer = torch.optim.Adam(list(encoder.parameters()) + list(decoder.parameters()), lr=lr, fused=True)

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


def pixyz_available() -> bool:
    return importlib.util.find_spec("pixyz") is not None


def pixyz_stepper(encoder, decoder, z_dim: int, lr: float, device):
    """Seed 004's pixyz VAE on ``encoder`` (flattened x -> loc, scale) and ``decoder`` (z -> logits):
    ``step(x) -> loss per example``."""
    from pixyz.distributions import Bernoulli, Normal
    from pixyz.losses import KullbackLeibler
    from pixyz.models import Model

    class Inference(Normal):  # q(z | x)
        def __init__(self):
            super().__init__(cond_var=["x"], var=["z"], name="q")
            self.encoder = encoder

        def forward(self, x):
            loc, scale = self.encoder(x)
            return {"loc": loc, "scale": scale}

    class Generator(Bernoulli):  # p(x | z), on flattened images
        def __init__(self):
            super().__init__(cond_var=["z"], var=["x"], name="p")
            self.decoder = decoder

        def forward(self, z):
            return {"probs": torch.sigmoid(self.decoder(z).flatten(1))}  # (batch, C, H, W) -> (batch, C*H*W)

    p, q = Generator().to(device), Inference().to(device)
    prior = Normal(loc=torch.tensor(0.0), scale=torch.tensor(1.0), var=["z"], features_shape=[z_dim], name="p_prior").to(device)
    loss = (KullbackLeibler(q, prior) - p.log_prob().expectation(q)).mean()  # 0.3's StochasticReconstructionLoss
    model = Model(loss=loss, distributions=[p, q], optimizer=torch.optim.Adam, optimizer_params={"lr": lr, "fused": True})
    return lambda x: model.train({"x": x.flatten(1)})  # (batch, C, H, W) -> (batch, C*H*W)


PATHS = ("pyro", "pyro_eager", "torch") + (("pixyz",) if pixyz_available() else ())


def build(args, paths=PATHS):
    """Steppers of ``paths``, on identical initial networks, and the batches."""
    data = load_image_data(args.data, args.data_dir, num_shapes=args.num_shapes, download=False).train
    steppers = {}
    for name, jit in (("pyro", True), ("pyro_eager", False)):
        if name not in paths:
            continue
        pyro.clear_param_store()
        torch.manual_seed(args.seed)
        model, guide = build_vae(tuple(data.shape[1:]), VAEConfig(), "vae")
        config = TrainConfig(batch_size=args.batch_size, lr=args.lr, elbo=args.elbo, jit=jit, device=args.device, progress=False)
        trainer = Trainer(model, guide, config)
        trainer.setup(data[: args.batch_size].to(trainer.device))
        steppers[name] = trainer.step
    device = torch.device(args.device)
    if "torch" in paths:
        torch.manual_seed(args.seed)
        model, guide = build_vae(tuple(data.shape[1:]), VAEConfig(), "vae")
        hand = HandWrittenVAE(guide.encoder.to(device), model.decoder.to(device), args.lr)
        steppers["torch"] = hand.step
    if "pixyz" in paths:
        torch.manual_seed(args.seed)
        model, guide = build_vae(tuple(data.shape[1:]), VAEConfig(), "vae")
        steppers["pixyz"] = pixyz_stepper(guide.encoder, model.decoder, VAEConfig().z_dim, args.lr, device)
    batches = [data[i : i + args.batch_size].to(device) for i in range(0, len(data) - args.batch_size + 1, args.batch_size)]
    return steppers, batches, device


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_alternating(steppers, batches, device, steps: int, warmup: int):
    """Step times (s) per path; the order of the paths rotates every step."""
    times = {name: [] for name in steppers}
    names = list(steppers)
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        for k in range(len(names)):
            name = names[(i + k) % len(names)]
            _sync(device)
            start = time.perf_counter()
            steppers[name](batch)
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def _peak_rss_child(args, path: str, queue) -> None:
    torch.set_num_threads(args.threads)
    pyro.enable_validation(args.validate)
    steppers, batches, _ = build(args, paths=(path,))
    step = steppers[path]
    step(batches[0])
    before = rss_mib("VmRSS")
    reset_peak_rss()
    for i in range(args.memory_steps):
        step(batches[i % len(batches)])
    queue.put((before, rss_mib("VmHWM")))


def peak_memory(args):
    """Peak memory (MiB) of each path: the CUDA allocator's peak, or on CPU the peak RSS while a child
    process running that path alone takes ``memory_steps`` steps (peak reset just before them)."""
    if args.device.startswith("cuda"):
        steppers, batches, _ = build(args)
        result = {}
        for name, step in steppers.items():
            torch.cuda.reset_peak_memory_stats()
            for i in range(args.memory_steps):
                step(batches[i % len(batches)])
            result[name] = {"peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20}
        return result
    context = multiprocessing.get_context("spawn")
    result = {}
    for name in PATHS:
        queue = context.Queue()
        child = context.Process(target=_peak_rss_child, args=(args, name, queue))
        child.start()
        before, after = queue.get()
        child.join()
        result[name] = {"rss_before_steps_mib": before, "peak_rss_during_steps_mib": after, "step_peak_over_baseline_mib": after - before}
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("mnist", "shapes"), default="mnist" if os.path.isdir(DEFAULT_MNIST) else "shapes")
    p.add_argument("--data-dir", default=DEFAULT_MNIST)
    p.add_argument("--num-shapes", type=int, default=2000)
    p.add_argument("--elbo", choices=("trace", "meanfield"), default="meanfield")
    p.add_argument("--validate", action="store_true", help="keep Pyro's argument validation on (off by default, as in training)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--memory-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(RESULTS, "svi_overhead.json"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.enable_validation(args.validate)
    steppers, batches, device = build(args)
    times = time_alternating(steppers, batches, device, args.steps, args.warmup)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "elbo": args.elbo, "validate": args.validate, "device": args.device, "threads": args.threads,
        "batch_size": args.batch_size, "steps": args.steps, "data": args.data,
        "median_step_ms": {k: 1e3 * v for k, v in median.items()},
        "ratio_pyro_over_torch": median["pyro"] / median["torch"],
        "ratio_pyro_eager_over_torch": median["pyro_eager"] / median["torch"],
        "ratio_pixyz_over_torch": median["pixyz"] / median["torch"] if "pixyz" in median else None,
        "memory": peak_memory(args),
    }
    print(f"median step ({args.elbo} ELBO, {args.device}, {args.threads} threads): "
          + ", ".join(f"{k} {1e3 * v:.3f} ms" for k, v in median.items()))
    print(f"ratio pyro (jit) / torch: {result['ratio_pyro_over_torch']:.3f}; pyro eager / torch: {result['ratio_pyro_eager_over_torch']:.3f}"
          + (f"; pixyz / torch: {result['ratio_pixyz_over_torch']:.3f}" if "pixyz" in median else "; pixyz: not installed, skipped"))
    for name, memory in result["memory"].items():
        print(f"memory {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in memory.items()))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
