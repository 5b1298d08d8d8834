"""The VAE family's KL schedules, by name (``VAEOptions.kl_schedule``):

* ``none``: the plain ELBO.
* ``linear``: KL annealing, beta = epoch / epochs (:class:`~inference.training.schedules.LinearKLAnnealing`).
* ``free-bits``: soft free bits (seed 002; Chen et al. 2017 / Kingma et al. 2016): per-dimension
  weights gamma_d, updated before every step from the batch's KL per dimension, multiplying
  ``KL(q(z_d|x) || p(z_d))`` in the objective.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from ...training import Callback, Trainer, distributed
from ...training.schedules import LinearKLAnnealing
from .analysis import batch_kl_per_dim

KL_SCHEDULES = ("none", "linear", "free-bits")


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
