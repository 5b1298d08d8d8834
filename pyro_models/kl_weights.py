"""Training-time weights of a latent site's KL term, shared by a model and its guide (KL annealing,
soft free bits); every model of the library uses them through :func:`sample_latent`."""
from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from .distributions import DimWeighted


class KLWeights(nn.Module):
    """Training-time weights of a latent site's KL term: ``beta`` (a scalar, ``poutine.scale``) and
    ``gamma`` (``(z_dim,)``, per dimension, used when ``per_dim`` is on). In eval mode both are 1."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.beta = 1.0
        self.per_dim = False
        self.register_buffer("gamma", torch.ones(z_dim))

    def get_extra_state(self) -> Any:
        return {"beta": self.beta, "per_dim": self.per_dim}

    def set_extra_state(self, state: Any) -> None:
        self.beta, self.per_dim = state["beta"], state["per_dim"]


def sample_latent(name: str, fn: dist.Distribution, weights: KLWeights) -> torch.Tensor:
    """``pyro.sample(name, fn)`` with the annealing ``weights`` applied in training mode.

    Call it with the same ``weights`` in the model and the guide, so that ``beta`` and ``gamma``
    multiply ``log p - log q``, i.e. the KL term, and nothing else.
    """
    if not weights.training:
        return pyro.sample(name, fn)
    if weights.per_dim:
        fn = DimWeighted(fn, weights.gamma)
    if weights.beta == 1.0:
        return pyro.sample(name, fn)
    with poutine.scale(scale=weights.beta):
        return pyro.sample(name, fn)
