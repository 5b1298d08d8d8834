#!/usr/bin/env python
"""Benchmark: KVAE missing-frame imputation time against sequence length (linear in T?).

Times ``pyro_models.kvae.impute.kalman_impute`` (encoder, Kalman filter one step at a time with the
dynamics LSTM in the loop, RTS smoother, decoder) and the full imputer ``impute`` (the same plus
``num_samples`` posterior-predictive draws) on an untrained small KVAE with vector frames, a random
half of the frames missing (the first ``NUM_GIVEN`` observed), batch 8, float32 model and float64
Kalman moments, one thread.  Prints the median time per step and ``ratio_per_step`` = (time(T) / T)
relative to the first T: linear growth gives ratios near 1 (the former algorithm re-ran the filter
over the prefix at every missing step, O(T^2)).  Writes JSON.

    python benchmarks/kvae_impute.py                      # T = 20 200 2000, batch 8
    python benchmarks/kvae_impute.py --T 4 8 --batch 2 --repeats 1 --out /tmp/x.json   # smoke
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from common import RESULTS, machine_info, write_json  # benchmarks/common.py (the script's own folder)

from pyro_models.kvae import KVAEConfig, build_kvae
from pyro_models.kvae.impute import impute, kalman_impute, random_frame_mask

DEFAULT_T = (20, 200, 2000)
DEFAULT_BATCH = 8
FRAME_DIM = 16  # vector frames (frame_dim,)
MLP_HIDDEN = (64,)  # encoder and decoder widths (small model); dynamics sizes: KVAEConfig defaults
DROP_PROB = 0.5  # half the frames missing
NUM_GIVEN = 1  # leading frames always observed
PIXEL_THRESHOLD = 0.5  # frames are binary: uniform noise above the threshold


def make_problem(batch: int, num_steps: int, seed: int):
    """Random binary frames ``(batch, T, FRAME_DIM)`` and a frame mask ``(batch, T)``."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, num_steps, FRAME_DIM, generator=gen) > PIXEL_THRESHOLD).float()
    mask = random_frame_mask(batch, num_steps, DROP_PROB, num_given=NUM_GIVEN, generator=gen)
    return x, mask


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(model, guide, num_steps: int, args) -> dict:
    x, mask = make_problem(args.batch, num_steps, args.seed)
    methods = {
        "kalman_impute": lambda: kalman_impute(model, guide, x, mask),
        "impute": lambda: impute(model, guide, x, mask, num_samples=args.num_samples,
                                 generator=torch.Generator().manual_seed(args.seed)),
    }
    times = {k: [] for k in methods}
    for r in range(args.repeats):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))  # alternate to cancel drift
        for k in order:
            times[k].append(timed(methods[k]))
    row = {"T": num_steps, "missing_fraction": float((~mask).float().mean()), "all_times_s": times}
    for k, v in times.items():
        row[f"{k}_s"] = statistics.median(v)
        row[f"{k}_ms_per_step"] = 1e3 * row[f"{k}_s"] / num_steps
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=list(DEFAULT_T), help="sequence lengths")
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    ap.add_argument("--num-samples", type=int, default=4, help="posterior-predictive draws of impute")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per method (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = leave torch's default)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "kvae_impute.json"))
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = KVAEConfig(mlp_hidden=MLP_HIDDEN)
    model, guide = build_kvae((FRAME_DIM,), config)

    measure(model, guide, min(args.T), argparse.Namespace(**{**vars(args), "repeats": 1}))  # warm-up
    rows = [measure(model, guide, T, args) for T in args.T]
    base = rows[0]
    for row in rows:
        for k in ("kalman_impute", "impute"):
            row[f"ratio_per_step_{k}"] = row[f"{k}_ms_per_step"] / base[f"{k}_ms_per_step"]
        row["ratio_per_step"] = row["ratio_per_step_kalman_impute"]

    print(f"batch={args.batch} frame_dim={FRAME_DIM} a_dim={config.a_dim} K={config.num_bases} "
          f"lstm={config.lstm_hidden} drop={DROP_PROB}, median of {args.repeats}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; ratio = (time(T)/T) / (time({base['T']})/{base['T']})")
    print("|     T | kalman_impute ms/step | ratio | impute ms/step | ratio |")
    print("|------:|----------------------:|------:|---------------:|------:|")
    for r in rows:
        print(f"| {r['T']:5d} | {r['kalman_impute_ms_per_step']:21.3f} | {r['ratio_per_step_kalman_impute']:5.2f} | "
              f"{r['impute_ms_per_step']:14.3f} | {r['ratio_per_step_impute']:5.2f} |")

    write_json(args.out, {
        "benchmark": "KVAE imputation time per step against T (kalman_impute and impute)",
        "config": {**{k: getattr(args, k) for k in ("T", "batch", "num_samples", "repeats", "seed", "threads")},
                   "frame_dim": FRAME_DIM, "mlp_hidden": list(MLP_HIDDEN), "drop_prob": DROP_PROB,
                   "num_given": NUM_GIVEN},
        **machine_info(),
        "results": rows,
    })
    return rows


if __name__ == "__main__":
    main()
