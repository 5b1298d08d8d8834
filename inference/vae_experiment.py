"""Assembles a VAE-family training run: data, model and guide, KL schedule, report, trainer."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Dict, List, Optional

import pyro
import torch

from pyro_models.datasets import ImageData, binarizer
from pyro_models.vae import VAEConfig, build_vae

from .callbacks import VAEReport
from .rundir import RunDir
from .schedules import FreeBitsConfig, make_kl_schedule
from .trainer import TrainConfig, Trainer


def prepare_images(data: ImageData, binarize: str, seed: int) -> ImageData:
    """Static binarisation of both splits; for ``dynamic``, one fixed draw of the held-out split (the
    training split is redrawn every batch by the trainer)."""
    transform = binarizer(binarize)
    if binarize == "static":
        return ImageData(transform(data.train), transform(data.test), data.name)
    if binarize == "dynamic":
        return ImageData(data.train, transform(data.test, torch.Generator().manual_seed(seed)), data.name)
    return data


def train_vae(
    model_name: str,
    data: ImageData,
    vae_config: VAEConfig,
    train_config: TrainConfig,
    out: Optional[str],
    kl_schedule: str = "none",
    free_bits: Optional[FreeBitsConfig] = None,
    binarize: str = "none",
    resume: bool = False,
    extra_config: Optional[Dict[str, Any]] = None,
) -> List[Dict[str, Any]]:
    """Train ``model_name`` (``vae`` or ``conv-vae``) on ``data``; returns the per-epoch metrics.

    ``out``: the run directory (``None``: no files). Everything needed to repeat the run is written to
    its ``config.json``.
    """
    if train_config.jit and kl_schedule != "none":
        raise ValueError(
            f"jit: a compiled ELBO freezes the KL weights read while tracing; use --kl-schedule none with --jit "
            f"(got --kl-schedule {kl_schedule})"
        )
    pyro.clear_param_store()  # a new run: no parameters left over from another model in this process
    torch.manual_seed(train_config.seed)  # network initialisation
    data = prepare_images(data, binarize, train_config.seed)
    model, guide = build_vae(model_name, tuple(data.train.shape[1:]), vae_config)
    config = {
        "model": model_name,
        "data": data.name,
        "num_train": data.train.shape[0],
        "num_test": data.test.shape[0],
        "binarize": binarize,
        "kl_schedule": kl_schedule,
        "free_bits": asdict(free_bits or FreeBitsConfig()),
        "vae": asdict(vae_config),
        "train": asdict(train_config),
        **(extra_config or {}),
    }
    run = RunDir(out, config, resume=resume) if out is not None else None
    callbacks = [VAEReport(fill=data.train.mean(0))]
    schedule = make_kl_schedule(kl_schedule, model.kl_weights, train_config.epochs, free_bits)
    if schedule is not None:
        callbacks.insert(0, schedule)
    transform = binarizer("dynamic") if binarize == "dynamic" else None
    trainer = Trainer(model, guide, train_config, run, callbacks, batch_transform=transform)
    return trainer.fit(data.train, data.test, resume=resume)
