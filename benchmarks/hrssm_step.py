#!/usr/bin/env python
"""HRSSM training speed and peak memory at the default (official) sizes.

Times SVI steps of the trainer on generated colour-ball sequences (batch 16, T = 20, 32x32 RGB) and
reports steps per second and the peak memory during the steps (RSS above the level before them on
CPU; ``torch.cuda.max_memory_allocated`` on CUDA), as JSON.

    python benchmarks/hrssm_step.py [--belief-size 128] [--steps 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace

import torch


from common import RESULTS, hrssm_trainer, reset_peak_rss, rss_mib, write_json

from inference.recipes.hrssm import HRSSM_TRAIN_DEFAULTS
from pyro_models.datasets import color_balls
from pyro_models.hrssm import HRSSMConfig


def main(argv=None):
    defaults = HRSSMConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--belief-size", type=int, default=defaults.abstract_belief_size)
    p.add_argument("--conv-channels", type=int, default=defaults.conv_channels)
    p.add_argument("--batch-size", type=int, default=HRSSM_TRAIN_DEFAULTS.batch_size)
    p.add_argument("--num-steps", type=int, default=20, help="frames per sequence")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join(RESULTS, "hrssm_step.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    config = replace(defaults, abstract_belief_size=args.belief_size, observation_belief_size=args.belief_size,
                     feature_size=args.belief_size, conv_channels=args.conv_channels)
    frames, _ = color_balls(args.batch_size, args.num_steps, seed=0)
    x = torch.from_numpy(frames).to(args.device)
    trainer = hrssm_trainer(x, config, args.device)
    trainer.step(x)  # warm-up (validated: the first step of an epoch is)
    cuda = args.device.startswith("cuda")
    before = rss_mib("VmRSS")
    reset_peak_rss() if not cuda else torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for callback in trainer.callbacks:
            callback.before_step(trainer, x)
        trainer.step(x, validate=False)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    memory = ({"peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20} if cuda else
              {"rss_before_steps_mib": before, "peak_rss_during_steps_mib": rss_mib("VmHWM"),
               "step_peak_over_baseline_mib": rss_mib("VmHWM") - before})
    result = {"belief_size": args.belief_size, "conv_channels": args.conv_channels, "batch_size": args.batch_size,
              "num_steps": args.num_steps, "device": args.device, "threads": torch.get_num_threads(),
              "parameters": sum(p.numel() for p in trainer.params), "median_step_s": median,
              "steps_per_second": 1 / median, "memory": memory}
    print(f"HRSSM step {1e3 * median:.0f} ms ({1 / median:.2f} steps/s), "
          + ", ".join(f"{k} {v:.1f}" for k, v in memory.items()))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
