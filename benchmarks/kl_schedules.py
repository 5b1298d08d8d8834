#!/usr/bin/env python
"""Seed 002's experiments on real MNIST: the MLP VAE with no KL schedule, linear KL annealing and
soft free bits, side by side. Prints and writes the held-out ELBO, the KL, the active units and the KL
per dimension of each (the per-epoch figures are in each run directory).

    python benchmarks/kl_schedules.py --data-dir ../shared/data/mnist [--epochs 10] [--z-dim 64]
"""
from __future__ import annotations

import argparse
import os
import time


from common import RESULTS, write_json

from svi_overhead import DEFAULT_MNIST

from inference.recipes.vae.schedules import KL_SCHEDULES
from inference.trainer import TrainConfig
from inference.runs.experiment import RunSpec, train
from inference.recipes.vae import VAEOptions
from pyro_models.datasets import load_image_data
from pyro_models.vae import VAEConfig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_MNIST)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--z-dim", type=int, default=VAEConfig().z_dim)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedules", nargs="+", default=list(KL_SCHEDULES), choices=KL_SCHEDULES)
    p.add_argument("--runs", default=os.path.join(RESULTS, "kl_schedule_runs"))
    p.add_argument("--out", default=os.path.join(RESULTS, "kl_schedules.json"))
    args = p.parse_args(argv)
    data = load_image_data("mnist", args.data_dir, download=False)
    results = {"epochs": args.epochs, "z_dim": args.z_dim, "seed": args.seed}
    for schedule in args.schedules:
        out = os.path.join(args.runs, f"{schedule}-{time.strftime('%Y%m%d-%H%M%S')}")
        spec = RunSpec("vae", VAEConfig(z_dim=args.z_dim), TrainConfig(epochs=args.epochs, seed=args.seed, progress=False),
                       options=VAEOptions(kl_schedule=schedule))
        history = train(spec, out, data=data)
        last = history[-1]
        results[schedule] = {k: last[k] for k in ("test_elbo", "kl", "active_units", "kl_per_dim", "impute_mse", "impute_baseline_mse")}
        results[schedule]["run"] = out
        print(f"{schedule:>10}: test ELBO {last['test_elbo']:.2f}, KL {last['kl']:.2f} nats, {last['active_units']} of "
              f"{args.z_dim} units active, bottom-half imputation MSE {last['impute_mse']:.4f} "
              f"(mean image {last['impute_baseline_mse']:.4f}); run {out}")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
