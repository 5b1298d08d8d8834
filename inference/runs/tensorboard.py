"""TensorBoard logging of a run (an optional extra: ``pip install -e ".[tensorboard]"``), what the pixyz
seeds did with ``tensorboardX.SummaryWriter``, through ``torch.utils.tensorboard``.

With ``TrainConfig.tensorboard`` (``--tensorboard``) the experiment layer adds this logger, and rank 0 writes under ``RUN/tensorboard/``:

* ``step/loss`` and ``step/lr``: the training loss per example and the learning rate of every step;
* ``epoch/<metric>``: every numeric value of the epoch's ``metrics.jsonl`` line (ELBOs, KL, the
  model's report: imputation errors, boundary F1, ...);
* the figures the run wrote during the epoch (``figures/*.png``) as images, tagged by name;
* the run's configuration as hyperparameters (the HPARAMS tab, linked to ``epoch/test_elbo``) and as
  JSON text.

    tensorboard --logdir runs/            # every run side by side
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Dict

from .rundir import RunDir
from ..training import Callback, Trainer

LOG_FOLDER = "tensorboard"
MISSING = 'tensorboard: the TensorBoard extra is not installed; pip install -e ".[tensorboard]" (or pip install tensorboard)'


def available() -> bool:
    """Whether the ``tensorboard`` package (which ``torch.utils.tensorboard`` needs) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


def require() -> None:
    """Raise ``ValueError`` (:data:`MISSING`) unless the extra is installed."""
    if not available():
        raise ValueError(MISSING)


def hparam_values(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nested config as TensorBoard hyperparameters: ``group.field`` keys; bool, number and string
    values as they are, anything else (lists, None) as its JSON text."""
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(hparam_values(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


class TensorBoardLogger(Callback):
    """Writes the run to TensorBoard event files in ``RUN/tensorboard`` (see the module docstring). The
    experiment layer adds it last, so that at each epoch's end it sees every metric and figure."""

    def __init__(self, run: RunDir):
        require()
        self.run = run
        self.step = 0  # optimiser steps logged; saved in checkpoints
        self.writer = None

    def _open(self) -> None:
        """The writer, opened at the first epoch of this process (after a resume has restored ``step``):
        ``purge_step`` (the first step to come) drops what a stopped run logged after its last checkpoint, so a resumed run keeps
        one history."""
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(os.path.join(self.run.path, LOG_FOLDER), purge_step=self.step + 1 if self.step else None)
        if self.step == 0:
            for summary in hparams(hparam_values(self.run.config), {"epoch/test_elbo": 0.0}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```\n" + json.dumps(self.run.config, indent=1) + "\n```")

    def on_train_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if self.writer is None:
            self._open()

    def on_train_batch_end(self, trainer: Trainer, loss: float) -> None:
        self.step += 1
        self.writer.add_scalar("step/loss", loss, self.step)
        self.writer.add_scalar("step/lr", trainer.optimizer.param_groups[0]["lr"], self.step)

    def on_train_epoch_end(self, trainer: Trainer, epoch: int, metrics: Dict[str, Any]) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"epoch/{name}", value, epoch)
        self._figures(epoch)
        self.writer.flush()

    def _figures(self, epoch: int) -> None:
        """The figures the run wrote this epoch (:meth:`RunDir.take_figures`), tagged by name without the
        epoch suffix."""
        import matplotlib.image

        for path in self.run.take_figures():
            image = matplotlib.image.imread(path)  # (H, W, 3 or 4) floats in [0, 1]
            tag = "figures/" + os.path.splitext(os.path.basename(path))[0].split("_epoch")[0]
            self.writer.add_image(tag, image[..., :3], epoch, dataformats="HWC")

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step = state["step"]
