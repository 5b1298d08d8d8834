"""Shared helpers of the benchmark scripts."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
from typing import Optional

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_json(path: str, payload) -> None:
    """Write ``payload`` as indented JSON to ``path`` (creating its folder) and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


def rss_mib(field: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process, MiB, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def machine_info() -> dict:
    """Where a benchmark ran: torch version, threads, cores, platform, processor."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "processor": platform.processor()}


def small_data(recipe, num_examples: int, cache_dir: str, length: Optional[int] = None):
    """The data config of ``recipe``'s default data set cut to ``num_examples`` training examples (sequences
    of ``length`` frames when given; generated sets cached in ``cache_dir``)."""
    if not recipe.sequences:
        return dataclasses.replace(recipe.data.config, num_shapes=num_examples + max(1, num_examples // 10))
    lengths = {} if length is None else {"num_steps": length}
    return dataclasses.replace(recipe.data.config, num_sequences=num_examples, cache_dir=cache_dir, **lengths)


def trainer_on_batch(spec, rows: slice, world=None):
    """The library's trainer for ``spec`` (model built, data loaded from ``spec.data``), its optimiser set up
    on the training examples ``rows``, which it returns as the batch ``x`` (the model's arguments, on the
    trainer's device): ``(trainer, x)``."""
    from inference.runs.experiment import build, model_inputs
    from inference.trainer import Trainer, as_inputs, place, take

    context = build(spec, spec.data.load(seed=0))
    trainer = Trainer(context.model, context.guide, spec.train, world=world,
                      units_per_example=spec.recipe.training.units_per_example(context.data))
    x = take(place(as_inputs(model_inputs(context.data, "train")), trainer.device), rows, trainer.device)
    trainer.setup(x)
    return trainer, x


def hrssm_trainer(x: torch.Tensor, config, device: str = "cpu", **train_overrides):
    """The library's trainer for an HRSSM of ``config`` on the batch ``x (batch, T, C, H, W)``, with the
    recipe's training defaults (``train_overrides`` replacing fields, e.g. ``jit=False``) and temperature
    annealing, its optimiser set up on ``x``."""
    from inference.recipes.hrssm import HRSSM_TRAIN_DEFAULTS, TemperatureAnnealing
    from pyro_models.hrssm import BoundarySchedule
    from inference.trainer import Trainer
    from pyro_models.hrssm import build_hrssm

    model, guide = build_hrssm(tuple(x.shape[2:]), config)
    trainer = Trainer(model, guide, dataclasses.replace(HRSSM_TRAIN_DEFAULTS, device=device, progress=False, **train_overrides),
                      callbacks=[TemperatureAnnealing(model.temperature, BoundarySchedule(), config.boundaries)],
                      units_per_example=x.shape[1])
    trainer.setup(x)
    return trainer


def training_step(trainer, x: torch.Tensor, validate: bool = False) -> None:
    """One step on ``x`` as training takes it: the callbacks' ``on_train_batch_start`` (e.g. the temperature
    schedule), then ``Trainer.step`` (not ``validate``d: only an epoch's first step is)."""
    for callback in trainer.callbacks:
        callback.on_train_batch_start(trainer, x)
    trainer.step(x, validate=validate)
