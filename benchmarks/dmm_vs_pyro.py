#!/usr/bin/env python
"""A training epoch of this library's DMM against one of Pyro's own ``examples/dmm.py``, side by side in one
process on the JSB chorales' 229 training sequences (lengths 25-129), at the paper's widths (z 100,
transition 200, emission 100, RNN 600), batch 20.

    git clone https://github.com/pyro-ppl/pyro /tmp/pyro      # examples/dmm.py is not in the pip package
    OMP_NUM_THREADS=1 python benchmarks/dmm_vs_pyro.py --pyro-dir /tmp/pyro --data-dir ../shared/data/polyphonic

Pyro's side runs the example's own ``DMM`` module (model and guide), its ``ClippedAdam`` settings and
``SVI(Trace_ELBO)`` step, on batches made by its own ``poly.get_mini_batch`` from a random permutation (its
data download is broken in Pyro 1.9.1, so the same sequences are handed to it in its own format). This
library's side is the trainer's epoch as ``scripts/train.py dmm --data jsb`` runs it (ST-R guide, analytic
KL per step, batches of similar length cut to their longest sequence). Epochs alternate, one of each per
round, and the ratio is taken per round (so a neighbour's load hits both alike); the medians are printed
and written as JSON. Pyro's ``--jit`` path fails on this torch (a TorchScript tuple-type error), so its
eager path is the reference, as it is for anyone running the example today.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import time

import numpy as np
import pyro
import torch

from common import RESULTS, machine_info, write_json

from inference.runs.experiment import LENGTHS_ARG, RunSpec, build, model_inputs
from inference.recipes.dmm import DMM_TRAIN_DEFAULTS
from inference.trainer import Trainer
from pyro_models.datasets.configs import SequenceDataConfig
from pyro_models.dmm import DMMConfig


def _without_torchvision() -> None:
    """Pyro's example imports ``pyro.contrib.examples.polyphonic_data_loader``, whose helper module imports
    torchvision for its MNIST downloads only; where torchvision is not installed (an optional extra
    here), an empty stand-in lets the import through. Nothing the benchmark runs touches it."""
    import sys
    import types

    if importlib.util.find_spec("torchvision") is None and "torchvision" not in sys.modules:
        stub = types.ModuleType("torchvision")
        sys.modules["torchvision"] = stub
        for name in ("datasets", "transforms"):
            setattr(stub, name, types.ModuleType(f"torchvision.{name}"))
            sys.modules[f"torchvision.{name}"] = getattr(stub, name)
        stub.datasets.MNIST = type("MNIST", (), {"mirrors": []})  # a base class the helper module subclasses


def pyro_example(pyro_dir: str):
    """Pyro's ``examples/dmm.py`` as a module, loaded from its file."""
    _without_torchvision()
    path = os.path.join(pyro_dir, "examples", "dmm.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pyro_dir: {path} not found (a checkout of github.com/pyro-ppl/pyro)")
    spec = importlib.util.spec_from_file_location("pyro_dmm_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pyro_epoch(example, data: torch.Tensor, lengths: torch.Tensor, batch_size: int, seed: int):
    """Pyro's side: the example's DMM, optimiser and SVI step; returns ``run_epoch() -> seconds``."""
    import pyro.contrib.examples.polyphonic_data_loader as poly
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import ClippedAdam

    pyro.clear_param_store()
    torch.manual_seed(seed)
    dmm = example.DMM()  # the example's defaults: the paper's widths
    adam = ClippedAdam({"lr": 3e-4, "betas": (0.96, 0.999), "clip_norm": 10.0, "lrd": 0.99996, "weight_decay": 2.0})
    svi = SVI(dmm.model, dmm.guide, adam, loss=Trace_ELBO())
    sequences, seq_lengths = data, lengths  # the example keeps both as tensors
    rng = np.random.default_rng(seed)

    def run_epoch() -> float:
        start = time.perf_counter()
        order = rng.permutation(len(sequences))
        for i in range(0, len(order), batch_size):
            batch, reversed_batch, mask, batch_lengths = poly.get_mini_batch(order[i : i + batch_size], sequences, seq_lengths)
            svi.step(batch, reversed_batch, mask, batch_lengths, 1.0)
        return time.perf_counter() - start

    return run_epoch


def our_epoch(data_dir: str, batch_size: int, seed: int):
    """This library's side: the trainer's epoch of ``train.py dmm --data jsb``; returns ``run_epoch()``."""
    spec = RunSpec("dmm", DMMConfig(), dataclasses.replace(DMM_TRAIN_DEFAULTS, batch_size=batch_size, seed=seed,
                                                           progress=False),
                   SequenceDataConfig(data="jsb", data_dir=data_dir))
    context = build(spec, spec.data.load())
    trainer = Trainer(context.model, context.guide, spec.train, lengths_arg=LENGTHS_ARG,
                      units_per_example=spec.recipe.training.units_per_example(context.data))
    train = model_inputs(context.data, "train")
    trainer.setup(tuple(t[:batch_size] if t is not None else None for t in train))
    epoch = [0]

    def run_epoch() -> float:
        epoch[0] += 1
        start = time.perf_counter()
        trainer.train_epoch(train, epoch[0])
        return time.perf_counter() - start

    return run_epoch, context.data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyro-dir", required=True, help="a checkout of github.com/pyro-ppl/pyro")
    parser.add_argument("--data-dir", required=True, help="the folder of jsb_chorales.json (or the original pickle / .mat)")
    parser.add_argument("--rounds", type=int, default=5, help="epochs of each, alternating")
    parser.add_argument("--batch-size", type=int, default=20, help="sequences per step (the example's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(RESULTS, "dmm_vs_pyro.json"))
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.pyro_dir, "examples", "dmm.py")):  # before any work
        parser.error(f"--pyro-dir: expected a checkout of github.com/pyro-ppl/pyro with examples/dmm.py, got {args.pyro_dir}")
    ours, data = our_epoch(args.data_dir, args.batch_size, args.seed)
    theirs = pyro_epoch(pyro_example(args.pyro_dir), data.train, data.train_lengths, args.batch_size, args.seed)
    ours(), theirs()  # warm-up: first-call costs on both sides
    rows = []
    for r in range(args.rounds):
        mine, pyros = ours(), theirs()
        rows.append({"ours_s": mine, "pyro_s": pyros, "speedup": pyros / mine})
        print(f"round {r + 1}: ours {mine:.2f} s, Pyro's example {pyros:.2f} s per epoch: {pyros / mine:.2f}x")
    summary = {name: statistics.median(row[name] for row in rows) for name in ("ours_s", "pyro_s", "speedup")}
    print(f"median: ours {summary['ours_s']:.2f} s, Pyro's example {summary['pyro_s']:.2f} s per epoch; "
          f"this library {summary['speedup']:.2f}x faster")
    write_json(args.out, {"benchmark": "dmm_vs_pyro", "data": "JSB chorales, 229 training sequences",
                          "widths": {"z": 100, "transition": 200, "emission": 100, "rnn": 600},
                          "batch_size": args.batch_size, "rounds": rows, "median": summary, "machine": machine_info()})


if __name__ == "__main__":
    main()
