"""The deep Markov model (DMM) of Krishnan, Shalit, Sontag, "Structured Inference Networks for Nonlinear
State Space Models", AAAI 2017 (arXiv 1609.09869), in Pyro.

Generative process (eq. 1; no action input Delta_t), for frames t = 1..T::

    z_0                                   learned, (z_dim,)
    z_t ~ N(G(z_{t-1}), S(z_{t-1}))       (batch, z_dim), S diagonal          (transition)
    x_t ~ Bernoulli(F(z_t))               (batch, *frame_shape)                 (emission)

G and S come from the gated transition function (:class:`~.networks.GatedTransition`; ``transition=
"linear"``: N(A z_{t-1} + b, diag s^2), :class:`~.networks.LinearTransition`), F from the emitter
(:class:`~.networks.Emitter`: an MLP, convolutions for image frames, or linear). Pixels may be grey
(values in [0, 1], scored by :class:`~pyro_models.distributions.GreyBernoulli`); ``likelihood=
"gaussian"`` gives x_t ~ N(F(z_t), diag r^2) instead. With the linear transition, a linear emission and the
Gaussian likelihood the DMM is a linear-Gaussian state-space model whose marginal is exact
(:mod:`.linear`).

Pyro sites: ``z_1`` .. ``z_T`` (event ``(z_dim,)``) in time order under ``pyro.markov``, and ``x``
(event ``(T, *frame_shape)``), inside ``pyro.plate("sequences", batch)``. Every ``z_t`` goes through
:func:`~pyro_models.kl_weights.sample_latent` with the :class:`~pyro_models.kl_weights.KLWeights` the
guide shares, so KL annealing (``beta``) scales log p(z_t | z_{t-1}) - log q(z_t | ...) in training
mode only.

Model and guides share the signature ``(x, mask=None)``, ``x (batch, T, *frame_shape)`` with
``frame_shape`` ``(D,)`` or ``(C, H, W)``. ``mask (batch, T)`` bool marks observed frames: ``x`` is then
observed through :func:`~pyro_models.distributions.observe`, a missing frame adds no likelihood (the
latent ``x_unobserved`` that ``obs_mask`` creates is hidden from the trace, so every ELBO scores the
observed frames only, and the ``x`` site's value holds a draw of the missing ones), and the frames'
means E[x_t | z_t] are recorded as ``x_mean`` for imputation.
"""
from __future__ import annotations

from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..distributions import observe
from ..kl_weights import KLWeights, sample_latent
from ..networks import per_frame
from .config import DMMConfig, check_input
from .networks import Emitter, build_transition

def site_names(num_steps: int):
    """The latent sites of a sequence of ``num_steps`` frames, in time order: ``z_1`` .. ``z_T``."""
    return [f"z_{t}" for t in range(1, num_steps + 1)]


class DMM(nn.Module):
    """The model p(x, z) = prod_t p(z_t | z_{t-1}) p(x_t | z_t) with a learned z_0 (see the module
    docstring). ``forward(x, mask=None)`` returns the ``x`` site's value ``(batch, T, *frame_shape)``."""

    def __init__(self, frame_shape: Sequence[int], config: DMMConfig):
        super().__init__()
        self.frame_shape, self.config = tuple(frame_shape), config
        self.transition = build_transition(config)
        self.emitter = Emitter(frame_shape, config)
        self.z_0 = nn.Parameter(torch.zeros(config.z_dim))
        self.kl_weights = KLWeights(config.z_dim)  # beta of KL annealing, shared with the guide

    @property
    def frame_dims(self) -> int:
        return len(self.frame_shape)

    def latents(self, batch_size: int, num_steps: int) -> torch.Tensor:
        """The latent chain: sites ``z_1`` .. ``z_T`` under ``pyro.markov``; must run inside the
        ``sequences`` plate. Returns z ``(..., batch, T, z_dim)``."""
        z = self.z_0.expand(batch_size, -1)  # (batch, z_dim)
        chain = []
        for name in pyro.markov(site_names(num_steps)):
            loc, scale = self.transition(z)
            z = sample_latent(name, dist.Normal(loc, scale).to_event(1), self.kl_weights)
            chain.append(z)
        return torch.stack(chain, dim=-2)

    def frame_params(self, z: torch.Tensor) -> torch.Tensor:
        """F(z_t) ``(..., T, *frame_shape)`` (Bernoulli logits or Normal means) for ``z (..., T, z_dim)``."""
        return per_frame(self.emitter, z, 1)

    def frame_mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x_t | z_t] ``(..., T, *frame_shape)`` for ``z (..., T, z_dim)``."""
        return self.emitter.mean(self.frame_params(z))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_input(x, mask, self.frame_shape)
        pyro.module("dmm", self)
        batch, steps = x.shape[:2]
        event_dim = self.frame_dims + 1  # (T, *frame_shape)
        with pyro.plate("sequences", batch):
            params = self.frame_params(self.latents(batch, steps))  # (..., batch, T, *frame_shape)
            if mask is not None:
                pyro.deterministic("x_mean", self.emitter.mean(params), event_dim=event_dim)
            return observe("x", self.emitter.distribution(params), x, mask, event_dim, "frames", hide_missing=True)


def generate(model: DMM, batch_size: int, num_steps: int) -> torch.Tensor:
    """A Pyro program sampling sequences from the prior (sites ``z_1`` .. ``z_T`` and ``x``, event
    ``(T, *frame_shape)``). Returns the frames' means E[x_t | z_t] ``(batch, T, *frame_shape)``."""
    if batch_size < 1 or num_steps < 1:
        raise ValueError(f"generate: expected batch_size >= 1 and num_steps >= 1, got {batch_size}, {num_steps}")
    with pyro.plate("sequences", batch_size):
        params = model.frame_params(model.latents(batch_size, num_steps))  # (batch, T, *frame_shape)
        pyro.sample("x", model.emitter.distribution(params).to_event(model.frame_dims + 1))
    return model.emitter.mean(params)
