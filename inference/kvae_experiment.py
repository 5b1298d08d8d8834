"""Assembles a Kalman VAE training run: sequence data, model and guide, the recipe's optimiser
settings, the LSTM freeze, the report, the trainer."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Dict, List, Optional

import pyro
import torch

from pyro_models.kvae import KVAEConfig, build_kvae

from .callbacks import FreezeParameters, KVAEReport
from .rundir import RunDir
from .trainer import TrainConfig, Trainer

# The optimisation recipe of the original code (simonkamronn/kvae).
KVAE_TRAIN_DEFAULTS = TrainConfig(epochs=80, batch_size=32, lr=0.007, lr_decay=0.85, lr_decay_every=20, clip_norm=150.0)
LSTM_FROZEN_EPOCHS = 10


def build_kvae_run(data, config: KVAEConfig, seed: int):
    """Model and guide for the frames of ``data.train (N, T, *frame_shape)``, initialised from ``seed``."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    return build_kvae(tuple(data.train.shape[2:]), config)


def train_kvae(data, config: KVAEConfig, train_config: TrainConfig, out: Optional[str], lstm_frozen_epochs: int = LSTM_FROZEN_EPOCHS,
               resume: bool = False, extra_config: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """Train a KVAE on ``data`` (a ``SequenceData``); returns the per-epoch metrics."""
    model, guide = build_kvae_run(data, config, train_config.seed)
    run_config = {
        "model": "kvae",
        "data": data.name,
        "num_train": data.train.shape[0],
        "num_test": data.test.shape[0],
        "kvae": asdict(config),
        "train": asdict(train_config),
        "lstm_frozen_epochs": lstm_frozen_epochs,
        **(extra_config or {}),
    }
    run = RunDir(out, run_config, resume=resume) if out is not None else None
    callbacks = [FreezeParameters(model.dynamics.lstm.parameters(), lstm_frozen_epochs), KVAEReport(seed=train_config.seed)]
    trainer = Trainer(model, guide, train_config, run, callbacks)
    return trainer.fit(data.train, data.test, resume=resume)
