"""The settings of a training run."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .elbo import ELBOS

SEED_BOUND = 2**32  # NumPy's generators take seeds below this

# Settings of the machine, not of the run: a stored run loads whatever they say, and a resume may change them.
RUNTIME = ("device", "progress", "tensorboard", "eval_batch_size", "check_every_step")


@dataclass
class TrainConfig:
    """Optimisation settings shared by every model: what defines a run, and the runtime settings of the
    machine it runs on (:data:`RUNTIME`: they change no number of the run, may change on resume, and are
    checked by :meth:`check_machine` when training starts)."""

    epochs: int = 10  # passes over the training set
    batch_size: int = 128  # examples per SVI step
    lr: float = 1e-3  # Adam's learning rate
    weight_decay: float = 0.0  # Adam's L2 penalty on every parameter (added to the gradient of the loss the step takes: per example and unit with mean_loss)
    amsgrad: bool = False  # Adam with the AMSGrad correction (the official VTA recipe's optimiser)
    beta1: float = 0.9  # Adam's decay of its first-moment (mean gradient) estimate (Pyro's DMM example: 0.96)
    lr_decay: float = 1.0  # the learning rate is multiplied by this, in (0, 1] ...
    lr_decay_every: int = 1  # ... every this many epochs (staircase)
    clip_norm: Optional[float] = None  # global gradient-norm clip; none: no clipping
    ema_decay: float = 0.0  # Polyak averaging: held-out scores, reports and best.pt use a moving average of the weights with this decay per step (e.g. 0.999; inference/training/averaging.py); 0: the raw weights
    mean_loss: bool = False  # step on the loss per example and unit (e.g. per frame), not the batch sum
    elbo: str = field(default="meanfield", metadata={"choices": tuple(ELBOS)})  # meanfield: analytic KL where known, else Monte Carlo; trace: Monte Carlo KL
    num_particles: int = 1  # samples per ELBO estimate (vectorised)
    jit: bool = False  # compile the training loss with torch.jit.trace (models that declare themselves compilable)
    device: str = "cpu"  # cpu, cuda or cuda:N
    seed: int = 0  # seeds initialisation, batch order and every draw
    eval_batch_size: int = 500  # examples per batch when scoring held-out data (sequences of different lengths: at most batch_size, sorted by length, so a batch holds little padding)
    eval_every: int = 1  # score the held-out data (and run the per-epoch reports) every this many epochs, and at the last
    tensorboard: bool = False  # also log to RUN/tensorboard (needs the tensorboard extra)
    train_eval_size: int = 1000  # training examples scored in eval mode each epoch (train_elbo)
    progress: bool = True  # tqdm progress bars and one line per epoch
    bucket_batches: int = 8  # sequences of different lengths: each batch is drawn from a window of this many batches sorted by length, so a batch's sequences have similar lengths (1: no bucketing)
    # treat denormal floats (below 1.2e-38) as zero on the CPU (x86 FTZ/DAZ, torch.set_flush_denormal): weight
    # decay drives unused weights into that range, where every product with them is many times slower (a JSB DMM
    # epoch went from 2.5 s to 11 s after 350 epochs, with 14% of its weights denormal; docs/benchmarks.md)
    flush_denormal: bool = True
    check_every_step: bool = False  # every SVI step under Pyro's and torch's argument validation; off: each epoch's first step only (the checks cost 6-8% of an HRSSM step, docs/benchmarks.md; non-finite losses and gradients are caught at every step either way)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "lr_decay_every", "eval_batch_size", "train_eval_size", "num_particles",
                     "bucket_batches", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr: expected a finite number > 0, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay: expected a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"beta1: expected a number in [0, 1), got {self.beta1}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay: expected a number in [0, 1) (0: no averaging), got {self.ema_decay}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay: expected in (0, 1], got {self.lr_decay}")
        if self.clip_norm is not None and not 0 < self.clip_norm < math.inf:
            raise ValueError(f"clip_norm: expected a finite number > 0 or None, got {self.clip_norm}")
        if self.jit and self.check_every_step:
            raise ValueError("check_every_step: Pyro's argument checks do not run inside a compiled loss; "
                             "expected jit False with it, got jit True")
        if self.elbo not in ELBOS:
            raise ValueError(f"elbo: expected one of {tuple(ELBOS)}, got {self.elbo!r}")
        if not 0 <= self.seed < SEED_BOUND:
            raise ValueError(f"seed: expected an integer in [0, 2**32), got {self.seed}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device: expected cpu, cuda or cuda:N, got {self.device!r}") from None

    def check_machine(self) -> None:
        """Raise ``ValueError`` unless this machine can run the runtime settings (:data:`RUNTIME`): the CUDA
        device is there. Checked when training starts, never when a stored run is read, so that a run
        trained on a GPU loads on a CPU."""
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device: {self.device!r} requested but CUDA is not available here")
