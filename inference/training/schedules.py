"""KL annealing for any model with :class:`~pyro_models.kl_weights.KLWeights`: beta = epoch / epochs
(seed 002; Bowman et al. 2016), applied with ``poutine.scale`` on the latent site. The VAE's soft free
bits, which read the VAE's per-dimension KL, live beside its recipe (``inference/recipes/vae/schedules.py``)."""
from __future__ import annotations

from typing import Any, Dict

from . import Callback, Trainer


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
