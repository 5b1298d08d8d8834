#!/usr/bin/env python
"""The MLP VAE on real MNIST, trained as a new user would, against a hand-written PyTorch VAE.

Data: the IDX files in --data-dir (the official test set alone gives 9,000 train / 1,000 held out).
Trained the same way (784-512-512-64, batch 128, Adam 1e-3, grey values under a Bernoulli likelihood,
--epochs epochs): this library's ``normal`` and ``iaf`` guides through ``scripts/train.py``'s code path,
and seed 004's hand-written loop on identical initial networks. Prints and writes the held-out ELBO of
each (nats per image, higher is better).

    python benchmarks/mnist_vae.py --data-dir ../shared/data/mnist [--epochs 10] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import os
import time
from copy import deepcopy

import torch
import torch.nn.functional as F


from common import RESULTS, write_json

from svi_overhead import DEFAULT_MNIST, HandWrittenVAE

from inference.trainer import TrainConfig
from inference.runs.experiment import RunSpec, train
from pyro_models.datasets import load_image_data
from pyro_models.vae import VAEConfig, build_vae


@torch.no_grad()
def hand_written_elbo(hand: HandWrittenVAE, data: torch.Tensor, batch_size: int = 500) -> float:
    """One-sample reconstruction term minus the analytic KL, nats per image."""
    total = 0.0
    for start in range(0, len(data), batch_size):
        x = data[start : start + batch_size]
        loc, scale = hand.encoder(x)
        z = loc + scale * torch.randn_like(loc)
        log_lik = -F.binary_cross_entropy_with_logits(hand.decoder(z), x, reduction="sum")
        kl = (0.5 * (scale**2 + loc**2) - scale.log() - 0.5).sum()
        total += (log_lik - kl).item()
    return total / len(data)


def train_hand_written(data, config: TrainConfig):
    torch.manual_seed(config.seed)
    model, guide = build_vae(tuple(data.train.shape[1:]), VAEConfig(), "vae")  # same initial weights
    hand = HandWrittenVAE(deepcopy(guide.encoder), deepcopy(model.decoder), config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(data.train), generator=generator)
        for i in range(0, len(order), config.batch_size):
            hand.step(data.train[order[i : i + config.batch_size]])
        history.append({"epoch": epoch, "test_elbo": hand_written_elbo(hand, data.test)})
        print(f"hand-written epoch {epoch}: test ELBO {history[-1]['test_elbo']:.2f}")
    return history


def mean_std(values):
    values = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(values.mean()), "std": float(values.std()) if len(values) > 1 else 0.0, "values": values.tolist()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_MNIST)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--guides", nargs="+", default=["normal", "iaf"])
    p.add_argument("--elbo", choices=("meanfield", "trace"), default=TrainConfig().elbo)
    p.add_argument("--runs", default=os.path.join(RESULTS, "mnist_runs"))
    p.add_argument("--out", default=os.path.join(RESULTS, "mnist_vae.json"))
    args = p.parse_args(argv)
    data = load_image_data("mnist", args.data_dir, download=False)
    results = {"epochs": args.epochs, "elbo": args.elbo, "seeds": args.seeds, "num_train": len(data.train), "num_test": len(data.test)}
    finals = {name: [] for name in [f"pyro_{g}" for g in args.guides] + ["hand_written"]}
    for seed in args.seeds:
        config = TrainConfig(epochs=args.epochs, seed=seed, elbo=args.elbo, progress=False)
        for guide in args.guides:
            start = time.perf_counter()
            out = os.path.join(args.runs, f"{guide}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}")
            history = train(RunSpec("vae", VAEConfig(guide=guide), config), out, data=data)
            finals[f"pyro_{guide}"].append(history[-1]["test_elbo"])
            print(f"seed {seed}, pyro {guide} guide: test ELBO {history[-1]['test_elbo']:.2f} ({time.perf_counter() - start:.0f}s; run {out})")
        finals["hand_written"].append(train_hand_written(data, config)[-1]["test_elbo"])
    for name, values in finals.items():
        results[name] = mean_std(values)
        print(f"{name:>12}: held-out ELBO {results[name]['mean']:.2f} +- {results[name]['std']:.2f} nats/image over seeds {args.seeds}")
    if "normal" in args.guides:
        gaps = [a - b for a, b in zip(finals["pyro_normal"], finals["hand_written"])]
        results["gap_pyro_normal_minus_hand"] = mean_std(gaps)
        print(f"pyro normal - hand-written: {results['gap_pyro_normal_minus_hand']['mean']:+.2f} nats (per seed {[round(g, 2) for g in gaps]})")
    if {"normal", "iaf"} <= set(args.guides):
        gaps = [a - b for a, b in zip(finals["pyro_iaf"], finals["pyro_normal"])]
        results["gap_iaf_minus_normal"] = mean_std(gaps)
        print(f"iaf - normal: {results['gap_iaf_minus_normal']['mean']:+.2f} nats (per seed {[round(g, 2) for g in gaps]})")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
