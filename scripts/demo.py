#!/usr/bin/env python
"""The main job on built-in data: train a Kalman VAE on generated bouncing balls, then impute missing
frames by Kalman smoothing and filtering, and write the figures.

    python scripts/demo.py --out runs/demo                 # KVAE, a few minutes on two CPU cores
    python scripts/demo.py --out runs/demo --model vae     # the MLP VAE on generated shapes

Each call makes a fresh run directory ``OUT/<timestamp>`` and prints where its figures are. The demo
is smaller than the paper's recipe (fewer sequences and epochs, a narrower decoder) and starts with the
warm start against posterior collapse (``inference/recipes/kvae/warmstart.py``); see ``docs/kvae.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

from inference.evaluation import imputation
from inference.cli.flags import OneLineParser
from inference.cli.command_line import main_guard
from inference.runs.experiment import RunSpec, load_run, train
from inference.recipes.registry import get_recipe

DEMO_FRACTION_FROZEN = 4  # the LSTM is frozen for the first quarter of the epochs (the recipe: 10 of 80)
DEMO_TRAIN_EVAL_SIZE = 100  # training sequences scored each epoch (train_elbo): the curve, at a fifth of all 500's cost
DEMO_EPOCHS = {"kvae": 4, "vae": 12}  # the warm start does most of the KVAE's work
DEMO_WARM_START_RESTARTS = 1  # one warm start, not the recipe's best of several: the demo's time budget


def kvae_spec(args) -> RunSpec:
    recipe = get_recipe("kvae")
    return RunSpec(
        "kvae", recipe.config(decoder_channels=args.decoder_channels),
        replace(recipe.training.defaults, epochs=args.epochs, lr=args.lr, seed=args.seed, train_eval_size=DEMO_TRAIN_EVAL_SIZE),
        replace(recipe.data.config, num_sequences=args.num_sequences, cache_dir=args.cache_dir),
        recipe.options(lstm_frozen_epochs=max(1, args.epochs // DEMO_FRACTION_FROZEN),
                       warm_start_steps=args.warm_start_steps, dynamics_fit_steps=args.dynamics_fit_steps,
                       dynamics_lstm_steps=args.dynamics_lstm_steps, trajectory_penalty=args.trajectory_penalty,
                       warm_start_restarts=args.warm_start_restarts),
    )


def vae_spec(args) -> RunSpec:
    recipe = get_recipe("vae")
    return RunSpec("vae", recipe.config(z_dim=16), replace(recipe.training.defaults, epochs=args.epochs, seed=args.seed),
                   recipe.data.config, recipe.options(kl_schedule="linear"))


def demo_kvae(args, out: str) -> None:
    last = train(kvae_spec(args), out)[-1]
    print(f"\nKVAE on generated bouncing balls: held-out ELBO {last['test_elbo']:.1f} nats/sequence; "
          f"frames dropped with p = 0.5: smoothing error {last['impute_smooth']:.4f}, filtering {last['impute_filter']:.4f}")
    run = load_run(out)
    rows = imputation.evaluate(run, "random", num_test=args.num_impute, seed=args.seed)
    for row in rows:
        print(f"drop probability {row['setting']}: smoothing {row['smoothing']:.4f}, filtering {row['filtering']:.4f}, "
              f"walls only {row['floor_majority_frame']:.4f}, last observed {row['floor_last_observed']:.4f}")
    imputation.figures(run, "random", rows, args.seed)
    imputation.save(run, "random", rows, metric="hamming", num_test=args.num_impute, seed=args.seed)


def demo_vae(args, out: str) -> None:
    last = train(vae_spec(args), out)[-1]
    print(f"\nMLP VAE on generated shapes: held-out ELBO {last['test_elbo']:.2f} nats/image, {last['active_units']} active "
          f"units of 16, bottom-half imputation MSE {last['impute_mse']:.4f} (mean image: {last['impute_baseline_mse']:.4f})")


def parse_args(argv=None) -> argparse.Namespace:
    kvae = get_recipe("kvae")
    p = OneLineParser(prog="demo.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="folder of the demo's run directories")
    p.add_argument("--model", choices=("kvae", "vae"), default="kvae", help="the demo to run")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: " + ", ".join(f"{k} {v}" for k, v in DEMO_EPOCHS.items()) + "; kvae: after the warm start)")
    p.add_argument("--lr", type=float, default=kvae.training.defaults.lr, help="kvae: Adam's learning rate after the warm start (the "
                   "original recipe's 0.007 first undoes much of what the warm start learned)")
    p.add_argument("--num-sequences", type=int, default=500, help="kvae: generated training sequences")
    p.add_argument("--decoder-channels", type=int, default=32, help="kvae: sub-pixel block width (the paper: 128)")
    p.add_argument("--num-impute", type=int, default=100, help="kvae: held-out sequences scored for imputation")
    p.add_argument("--cache-dir", default="data/cache", help="where generated sequence sets are cached")
    p.add_argument("--warm-start-steps", type=int, default=kvae.options.warm_start_steps,
                   help="kvae: autoencoder steps of the warm start (0: from scratch as the original recipe, which often collapses)")
    p.add_argument("--trajectory-penalty", type=float, default=kvae.options.trajectory_penalty,
                   help="kvae: warm start, weight of the straight-trajectory penalty on the codes (0: off)")
    p.add_argument("--dynamics-fit-steps", type=int, default=kvae.options.dynamics_fit_steps, help="kvae: warm start, LGSSM fitting steps")
    p.add_argument("--dynamics-lstm-steps", type=int, default=kvae.options.dynamics_lstm_steps, help="kvae: warm start, then steps fitting the LSTM with the LGSSM")
    p.add_argument("--warm-start-restarts", type=int, default=DEMO_WARM_START_RESTARTS,
                   help=f"kvae: warm starts tried, the best by its own score kept (scripts/train.py kvae: {kvae.options.warm_start_restarts})")
    p.add_argument("--seed", type=int, default=0, help="seed of the run")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    args.epochs = DEMO_EPOCHS[args.model] if args.epochs is None else args.epochs
    for name in ("epochs", "num_sequences", "decoder_channels", "warm_start_restarts"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if not 0 < args.lr < float("inf"):
        p.error(f"--lr: expected a finite number > 0, got {args.lr}")
    if not args.trajectory_penalty >= 0:
        p.error(f"--trajectory-penalty: expected >= 0, got {args.trajectory_penalty}")
    for name in ("num_impute", "warm_start_steps", "dynamics_fit_steps", "dynamics_lstm_steps", "seed"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')}: expected >= 0, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = os.path.join(args.out, time.strftime("%Y%m%d-%H%M%S"))
    (demo_kvae if args.model == "kvae" else demo_vae)(args, out)
    print(f"run directory: {out}\nfigures: {os.path.join(out, 'figures')}")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
