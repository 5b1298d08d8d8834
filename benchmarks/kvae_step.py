#!/usr/bin/env python
"""KVAE training speed and the LGSSM's share of a step, at the original recipe's sizes.

Times, alternately in one run, (a) a full SVI step of the trainer (batch 32, T = 20, 32x32 frames) and
(b) the LGSSM part alone: the Kalman prior's log p(a) (dynamics LSTM + parallel-scan log marginal,
float64) forward and backward on the same shapes. Prints steps per second and (b) / (a), and writes
JSON (target for the share: 20% or less).

    python benchmarks/kvae_step.py [--decoder-channels 128] [--steps 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace

import torch


from common import RESULTS, write_json

from inference.recipes.kvae import KVAE_TRAIN_DEFAULTS
from inference.trainer import Trainer
from pyro_models.datasets import bouncing_balls
from pyro_models.kvae import KalmanPrior, KVAEConfig, build_kvae


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder-channels", type=int, default=KVAEConfig().decoder_channels)
    p.add_argument("--batch-size", type=int, default=KVAE_TRAIN_DEFAULTS.batch_size)
    p.add_argument("--num-steps", type=int, default=20, help="frames per sequence")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join(RESULTS, "kvae_step.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    config = KVAEConfig(decoder_channels=args.decoder_channels)
    x = torch.from_numpy(bouncing_balls(args.batch_size, args.num_steps, seed=0)).unsqueeze(2).to(args.device)
    model, guide = build_kvae(tuple(x.shape[2:]), config)
    trainer = Trainer(model, guide, replace(KVAE_TRAIN_DEFAULTS, device=args.device, progress=False), units_per_example=args.num_steps)
    trainer.setup(x)
    a = guide.posterior(x).rsample().detach().requires_grad_()

    def lgssm_part():
        KalmanPrior(model.dynamics, (args.batch_size,), args.num_steps, config.a_dim).log_prob(a).sum().backward()

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    times = {"step": [], "lgssm": []}
    for i in range(args.steps + 1):
        for name, fn in (("step", lambda: trainer.step(x, validate=False)), ("lgssm", lgssm_part)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i > 0:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {"decoder_channels": args.decoder_channels, "batch_size": args.batch_size, "num_steps": args.num_steps,
              "device": args.device, "threads": torch.get_num_threads(),
              "median_s": median, "steps_per_second": 1 / median["step"], "lgssm_share": median["lgssm"] / median["step"]}
    print(f"KVAE step {1e3 * median['step']:.1f} ms ({result['steps_per_second']:.2f} steps/s); LGSSM part "
          f"{1e3 * median['lgssm']:.2f} ms = {100 * result['lgssm_share']:.1f}% of a step")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
