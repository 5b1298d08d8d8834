#!/usr/bin/env python
"""One HRSSM training step of this library against one of the official VTA code (Kim et al. 2019,
taesupkim/vta, unpatched), side by side in one process on the same batch of colour-ball frames.

    git clone https://github.com/taesupkim/vta /tmp/vta
    OMP_NUM_THREADS=1 python benchmarks/hrssm_vs_vta.py --vta-dir /tmp/vta [--belief-size 32 --rounds 5]

Both at the same sizes (belief = feature = conv width, state 8, batch 16, 32x32 RGB, Adam, clip 10). This
library's step is ``Trainer.step`` on ``T`` frames; the official step is ``EnvModel.forward`` on
``T + 2 * init_size`` frames (it encodes ``init_size`` context frames at each end and decodes the ``T``
in between), ``backward``, clip and ``Adam.step``. This library's step is timed as training takes it (compiled,
``TrainConfig.jit``, the recipe's default, without argument validation, which only each epoch's first
step runs), eager, and eager and validated (every step before ``TrainConfig.check_every_step``). The steps alternate, one of each per round, and the ratio is taken per round (so a neighbour's load hits both alike); the medians are printed and written
as JSON. The official code is not shipped here: ``--vta-dir`` is a checkout of it.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
import warnings
from dataclasses import replace

import torch

from common import RESULTS, hrssm_trainer, machine_info, training_step, write_json

from inference.recipes.hrssm import HRSSM_TRAIN_DEFAULTS, MEAN_FIELD_WARNING
from pyro_models.datasets import color_balls
from pyro_models.hrssm import HRSSMConfig


def ours(x: torch.Tensor, width: int, state: int, validate: bool = False, jit: bool = True):
    """This library's step on ``x (batch, T, 3, 32, 32)`` in [0, 1], as a function of no arguments: as
    the trainer takes all but an epoch's first step (compiled, the recipe's default, and without argument
    validation), ``jit=False`` eager, or eager and ``validate``d as every step was before
    ``TrainConfig.check_every_step`` existed."""
    config = replace(HRSSMConfig(), abstract_belief_size=width, observation_belief_size=width, feature_size=width,
                     conv_channels=width, abstract_state_size=state, observation_state_size=state)
    trainer = hrssm_trainer(x, config, jit=jit)
    return lambda: training_step(trainer, x, validate)


def _official_modules(vta_dir: str) -> dict:
    """The official code's modules, loaded from their files: it is a folder of top-level modules
    (``hssm`` imports ``modules`` and ``utils`` by name), registered under those names."""
    loaded = {}
    for name in ("utils", "modules", "hssm"):
        spec = importlib.util.spec_from_file_location(name, os.path.join(vta_dir, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        loaded[name] = module
    return loaded


def official(vta_dir: str, x: torch.Tensor, width: int, state: int, init_size: int, args):
    """The official step on ``x`` with ``init_size`` context frames added at each end (copies of the
    first and last frames), pixels mapped to [-1, 1] as its ``preprocess`` does."""
    if not os.path.isfile(os.path.join(vta_dir, "hssm.py")):
        raise SystemExit(f"error: --vta-dir: expected a checkout of taesupkim/vta (hssm.py), got {vta_dir!r}")
    EnvModel = _official_modules(vta_dir)["hssm"].EnvModel
    model = EnvModel(belief_size=width, state_size=state, num_layers=args.num_layers, max_seg_len=args.max_length,
                     max_seg_num=args.max_segments)
    optimizer = torch.optim.Adam(model.parameters(), lr=HRSSM_TRAIN_DEFAULTS.lr, amsgrad=True)
    padded = torch.cat([x[:, :1].expand(-1, init_size, -1, -1, -1), x, x[:, -1:].expand(-1, init_size, -1, -1, -1)], 1)
    padded = (2 * padded - 1).contiguous()  # (batch, T + 2 init, 3, 32, 32) in [-1, 1]

    def step():
        optimizer.zero_grad()
        loss = model(padded, x.shape[1], init_size, 1.0)["train_loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HRSSM_TRAIN_DEFAULTS.clip_norm)
        optimizer.step()
    return step


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vta-dir", required=True, help="a checkout of https://github.com/taesupkim/vta")
    p.add_argument("--belief-size", type=int, default=32, help="belief = feature = conv width of both")
    p.add_argument("--state-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-steps", type=int, default=20, help="frames T of this library's sequences")
    p.add_argument("--init-sizes", type=int, nargs="+", default=[1, 5],
                   help="the official context frames at each end (1: 22 frames seen, 5: its default 30)")
    p.add_argument("--num-layers", type=int, default=3, help="official boundary-detector layers")
    p.add_argument("--max-segments", type=int, default=5)
    p.add_argument("--max-length", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=os.path.join(RESULTS, "hrssm_vs_vta.json"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", MEAN_FIELD_WARNING)  # the recipe's filter (docs/hrssm.md)
    torch.manual_seed(0)
    frames, _ = color_balls(args.batch_size, args.num_steps, seed=0)
    x = torch.from_numpy(frames)
    steps = {"ours": ours(x, args.belief_size, args.state_size),
             "ours_eager": ours(x, args.belief_size, args.state_size, jit=False),
             "ours_eager_validated": ours(x, args.belief_size, args.state_size, validate=True, jit=False)}
    for init in args.init_sizes:
        steps[f"official_init{init}"] = official(args.vta_dir, x, args.belief_size, args.state_size, init, args)
    for step in steps.values():  # warm-up
        step()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(timed(step))
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratios = {name: statistics.median(o / t for o, t in zip(times["ours"], times[name])) for name in steps if name != "ours"}
    for name, median in medians.items():
        print(f"{name}: {1e3 * median:.0f} ms a step" + (f"; ours / this = {ratios[name]:.3f}" if name in ratios else ""))
    write_json(args.out, {**vars(args), "median_step_s": medians, "ours_over_official": ratios, "times_s": times,
                          **machine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
