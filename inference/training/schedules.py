"""KL schedules for models with :class:`~pyro_models.vae.KLWeights` (the VAE family).

* ``none``: the plain ELBO.
* ``linear``: KL annealing, beta = epoch / epochs (seed 002; Bowman et al. 2016), applied with
  ``poutine.scale`` on the latent site.
* ``free-bits``: soft free bits (seed 002; Chen et al. 2017 / Kingma et al. 2016): per-dimension
  weights gamma_d, updated before every step from the batch's KL per dimension, multiplying
  ``KL(q(z_d|x) || p(z_d))`` in the objective.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from . import distributed
from ..evaluation.analysis import batch_kl_per_dim
from . import Callback, Trainer

KL_SCHEDULES = ("none", "linear", "free-bits")


class LinearKLAnnealing(Callback):
    """beta = start + (1 - start) * min(1, epoch / epochs), set at the start of each epoch (epochs count
    from 1, so epoch ``epochs`` and later train the full ELBO). With ``start = 0`` and ``epochs`` the
    run's length this is seed 002's schedule; shorter, a KL warm-up; ``start > 0`` is the minimum
    annealing factor of Krishnan et al. (2017) and Pyro's DMM example."""

    def __init__(self, kl_weights, epochs: int, start: float = 0.0):
        if epochs < 1:
            raise ValueError(f"epochs: expected >= 1, got {epochs}")
        if not 0.0 <= start <= 1.0:
            raise ValueError(f"start: expected in [0, 1], got {start}")
        self.kl_weights, self.epochs, self.start = kl_weights, epochs, start

    def on_train_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.kl_weights.beta = self.start + (1.0 - self.start) * min(1.0, epoch / self.epochs)

    def on_validation_epoch_end(self, trainer: Trainer, epoch: int) -> Dict[str, Any]:
        return {"beta": self.kl_weights.beta}

    def state_dict(self) -> Dict[str, Any]:
        return {"epochs": self.epochs, "start": self.start}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """The schedule's length stays the stored run's, so a resumed (or extended) run continues it."""
        self.epochs, self.start = state.get("epochs", self.epochs), state.get("start", self.start)


@dataclass
class FreeBitsConfig:
    """Seed 002's soft free-bits rule."""

    target: float = 0.5  # lambda: the KL per dimension aimed at (nats)
    threshold: float = 0.1  # relative band around the target where gamma stays
    rate: float = 0.1  # relative change of gamma per step
    gamma_init: Optional[float] = None  # None: U(0, 1) per dimension, as in the seed


def free_bits_update(gamma: torch.Tensor, kl_per_dim: torch.Tensor, config: FreeBitsConfig) -> torch.Tensor:
    """One step of the seed's rule.

    Per dimension d::

        gamma_d *= (1 - rate)  if KL_d <= (1 - threshold) * target   (too little information: weigh KL less)
        gamma_d *= (1 + rate)  if KL_d >= (1 + threshold) * target   (too much: weigh KL more)
        gamma_d = clamp(gamma_d, 0, 1)
    """
    low = kl_per_dim <= (1 - config.threshold) * config.target
    high = kl_per_dim >= (1 + config.threshold) * config.target
    factor = torch.ones_like(gamma)
    factor = torch.where(low, factor * (1 - config.rate), factor)
    factor = torch.where(high, factor * (1 + config.rate), factor)
    return (gamma * factor).clamp(0.0, 1.0)


class SoftFreeBits(Callback):
    """Updates ``kl_weights.gamma`` before every step with :func:`free_bits_update` from the batch's
    KL per dimension. Needs a factorised guide (KL per dimension must be defined)."""

    def __init__(self, kl_weights, config: FreeBitsConfig, site: str = "z"):
        self.kl_weights, self.config, self.site = kl_weights, config, site

    def on_fit_start(self, trainer: Trainer) -> None:
        if not getattr(trainer.guide, "factorised", False):
            raise ValueError("kl_schedule: 'free-bits' needs a factorised guide (e.g. 'normal'): per-dimension KL weights are undefined for flows")
        gamma = self.kl_weights.gamma
        if self.config.gamma_init is None:
            gamma.copy_(torch.rand(gamma.shape, generator=trainer.generator).to(gamma))
        else:
            gamma.fill_(self.config.gamma_init)
        self.kl_weights.per_dim = True

    @torch.no_grad()
    def on_train_batch_start(self, trainer: Trainer, batch) -> None:
        self.kl_weights.eval()  # the unweighted KL of the current batch
        kl = batch_kl_per_dim(trainer.model, trainer.guide, batch[0], self.site)
        kl = distributed.all_reduce_sum(kl, trainer.world) / trainer.world.size  # the global batch's: one gamma on every rank
        self.kl_weights.train()
        self.kl_weights.gamma.copy_(free_bits_update(self.kl_weights.gamma, kl, self.config))

    def on_validation_epoch_end(self, trainer: Trainer, epoch: int) -> Dict[str, Any]:
        return {"gamma_mean": float(self.kl_weights.gamma.mean())}


def make_kl_schedule(name: str, kl_weights, epochs: int, free_bits: Optional[FreeBitsConfig] = None) -> Optional[Callback]:
    """The callback for ``name`` in :data:`KL_SCHEDULES` (``None`` for ``none``)."""
    if name == "none":
        return None
    if name == "linear":
        return LinearKLAnnealing(kl_weights, epochs)
    if name == "free-bits":
        return SoftFreeBits(kl_weights, free_bits or FreeBitsConfig())
    raise ValueError(f"kl_schedule: expected one of {KL_SCHEDULES}, got {name!r}")
