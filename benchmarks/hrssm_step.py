#!/usr/bin/env python
"""HRSSM training speed and peak memory at the default (official) sizes.

Times SVI steps of the trainer on generated colour-ball sequences (batch 16, T = 20, 32x32 RGB) and
reports steps per second of the compiled step (``TrainConfig.jit``, the recipe's default) and of the
eager one, alternating, their ratio, and the peak memory during the steps (RSS above the level before
them on CPU, both trainers together; ``torch.cuda.max_memory_allocated`` on CUDA), as JSON.

    python benchmarks/hrssm_step.py [--belief-size 128] [--steps 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from dataclasses import replace

import torch


from common import RESULTS, hrssm_trainer, reset_peak_rss, rss_mib, training_step, write_json

from inference.recipes.hrssm import HRSSM_TRAIN_DEFAULTS, MEAN_FIELD_WARNING
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
    warnings.filterwarnings("ignore", MEAN_FIELD_WARNING)  # the recipe's filter (docs/hrssm.md)
    torch.manual_seed(0)
    config = replace(defaults, abstract_belief_size=args.belief_size, observation_belief_size=args.belief_size,
                     feature_size=args.belief_size, conv_channels=args.conv_channels)
    frames, _ = color_balls(args.batch_size, args.num_steps, seed=0)
    x = torch.from_numpy(frames).to(args.device)
    modes = {"compiled": True, "eager": False}  # TrainConfig.jit (the recipe's default: compiled)
    trainers = {mode: hrssm_trainer(x, config, args.device, jit=jit) for mode, jit in modes.items()}
    for trainer in trainers.values():
        trainer.step(x)  # warm-up (the compiled one traces here)
    cuda = args.device.startswith("cuda")
    before = rss_mib("VmRSS")
    reset_peak_rss() if not cuda else torch.cuda.reset_peak_memory_stats()
    times = {mode: [] for mode in modes}
    for _ in range(args.steps):  # alternating, so a neighbour's load hits both alike
        for mode, trainer in trainers.items():
            times[mode].append(timed_step(trainer, x, cuda))
    median = {mode: statistics.median(t) for mode, t in times.items()}
    ratio = statistics.median(c / e for c, e in zip(times["compiled"], times["eager"]))
    memory = ({"peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20} if cuda else
              {"rss_before_steps_mib": before, "peak_rss_during_steps_mib": rss_mib("VmHWM"),
               "step_peak_over_baseline_mib": rss_mib("VmHWM") - before})
    result = {"belief_size": args.belief_size, "conv_channels": args.conv_channels, "batch_size": args.batch_size,
              "num_steps": args.num_steps, "device": args.device, "threads": torch.get_num_threads(),
              "parameters": sum(p.numel() for p in trainers["eager"].params), "median_step_s": median["compiled"],
              "median_step_s_eager": median["eager"], "compiled_over_eager": ratio,
              "steps_per_second": 1 / median["compiled"], "memory": memory, "times_s": times}
    print(f"HRSSM step {1e3 * median['compiled']:.0f} ms compiled ({1 / median['compiled']:.2f} steps/s), "
          f"{1e3 * median['eager']:.0f} ms eager: compiled / eager = {ratio:.3f}; "
          + ", ".join(f"{k} {v:.1f}" for k, v in memory.items()))
    write_json(args.out, result)


def timed_step(trainer, x: torch.Tensor, cuda: bool) -> float:
    """Seconds of one training step as training takes it (the callbacks' ``on_train_batch_start``, no validation)."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    training_step(trainer, x)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
