"""Assembles a Kalman VAE training run: sequence data, model and guide, an optional warm start, the
recipe's optimiser settings, the LSTM freeze, the report, the trainer."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Dict, List, Optional

import pyro
import torch

from pyro_models.datasets import load_sequence_data
from pyro_models.kvae import KVAEConfig, build_kvae

from .callbacks import FreezeParameters, KVAEReport
from .kvae_warmstart import WarmStartConfig, warm_start
from .rundir import RunDir, config_from_json, load_trained_modules, read_run_config
from .schedules import LinearKLAnnealing
from .trainer import TrainConfig, Trainer

# The optimisation recipe of the original code (simonkamronn/kvae).
# Its loss is the mean per frame, which its gradient clip of 150 assumes (mean_loss).
KVAE_TRAIN_DEFAULTS = TrainConfig(epochs=80, batch_size=32, lr=0.007, lr_decay=0.85, lr_decay_every=20, clip_norm=150.0,
                                  mean_loss=True)
LSTM_FROZEN_EPOCHS = 10


def build_kvae_run(data, config: KVAEConfig, seed: int):
    """Model and guide for the frames of ``data.train (N, T, *frame_shape)``, initialised from ``seed``."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    return build_kvae(tuple(data.train.shape[2:]), config)


def train_kvae(data, config: KVAEConfig, train_config: TrainConfig, out: Optional[str], lstm_frozen_epochs: int = LSTM_FROZEN_EPOCHS,
               resume: bool = False, extra_config: Optional[Dict[str, Any]] = None, kl_warmup_epochs: int = 0,
               warm: Optional[WarmStartConfig] = None) -> List[Dict[str, Any]]:
    """Train a KVAE on ``data`` (a ``SequenceData``); returns the per-epoch metrics. Put the arguments
    of ``load_sequence_data`` under ``extra_config["data_args"]`` so that :func:`load_kvae_run` can
    rebuild the data. ``warm`` runs :func:`inference.kvae_warmstart.warm_start` first (its losses go to
    ``RUN/warm_start.json``; skipped on resume). ``kl_warmup_epochs > 0`` scales the KL term (the ``a``
    site) by min(1, epoch / kl_warmup_epochs). Neither is part of the original recipe (default: off)."""
    model, guide = build_kvae_run(data, config, train_config.seed)
    run_config = {
        "model": "kvae",
        "data": data.name,
        "num_train": data.train.shape[0],
        "num_test": data.test.shape[0],
        "kvae": asdict(config),
        "train": asdict(train_config),
        "lstm_frozen_epochs": lstm_frozen_epochs,
        "kl_warmup_epochs": kl_warmup_epochs,
        "warm_start": asdict(warm) if warm is not None else None,
        **(extra_config or {}),
    }
    run = RunDir(out, run_config, resume=resume) if out is not None else None
    if warm is not None and not resume:
        model.to(train_config.device), guide.to(train_config.device)
        result = warm_start(model, guide, data.train, warm, progress=train_config.progress)
        if run is not None:
            run.write_json("warm_start.json", {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in result._asdict().items()})
    callbacks = [FreezeParameters(model.dynamics.lstm.parameters(), lstm_frozen_epochs), KVAEReport(seed=train_config.seed)]
    if kl_warmup_epochs > 0:
        if train_config.jit:
            raise ValueError("jit: a compiled ELBO freezes the KL warm-up's weight; use --kl-warmup-epochs 0 with --jit")
        callbacks.insert(0, LinearKLAnnealing(model.kl_weights, kl_warmup_epochs))
    trainer = Trainer(model, guide, train_config, run, callbacks, units_per_example=data.train.shape[1])
    return trainer.fit(data.train, data.test, resume=resume)


def load_kvae_run(path: str, data_dir: Optional[str] = None):
    """The trained model, guide (eval mode) and data of the KVAE run directory ``path``."""
    stored = read_run_config(path, "kvae")
    data = load_sequence_data(**{**stored["data_args"], **({"data_dir": data_dir} if data_dir is not None else {})})
    model, guide = build_kvae_run(data, config_from_json(KVAEConfig, stored["kvae"]), stored["train"]["seed"])
    load_trained_modules(path, model, guide)
    return model, guide, data
