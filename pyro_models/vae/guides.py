"""Guides of the VAE family, each with the model's signature ``(x, mask=None)``: ``normal`` (the amortised
diagonal Normal) and ``iaf`` (an inverse autoregressive flow on top of it)."""
from __future__ import annotations

from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import conditional_affine_autoregressive
from torch import nn

from ..params import register
from ..distributions import FlowPosterior
from ..kl_weights import KLWeights, sample_latent


class NormalGuide(nn.Module):
    """The guide q(z | x) = N(z; mu(x), diag sigma(x)^2); ``encoder`` is its network."""

    factorised = True

    def __init__(self, encoder: nn.Module, kl_weights: KLWeights):
        super().__init__()
        self.encoder, self.kl_weights = encoder, kl_weights

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z | x): batch ``(batch,)``, event ``(z_dim,)``."""
        loc, scale = self.encoder(x)
        return dist.Normal(loc, scale).to_event(1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        register("guide", self)
        with pyro.plate("data", x.shape[0]):
            return sample_latent("z", self.posterior(x), self.kl_weights)


class IAFGuide(nn.Module):
    """The guide q(z | x) = f_K o ... o f_1 pushed N(mu(x), diag sigma(x)^2), where each f_k is an
    affine autoregressive transform ``z <- mu(z, h) + exp(s(z, h)) * z`` conditioned on the encoder's
    features h(x) (inverse autoregressive flow, Kingma et al. 2016, eqs. 10-11). Each step starts as the
    identity (its output layer is zero-initialised), so training starts from the Normal guide and the
    flows can only add flexibility.

    Under ``TraceMeanField_ELBO`` the KL term uses the base's analytic KL as a control variate
    (:class:`~pyro_models.distributions.FlowPosterior`); under ``Trace_ELBO`` it is plain Monte Carlo.
    """

    factorised = False

    def __init__(self, encoder: nn.Module, z_dim: int, num_flows: int, hidden_dims: Sequence[int], kl_weights: KLWeights):
        super().__init__()
        self.encoder, self.kl_weights = encoder, kl_weights
        self.flows = nn.ModuleList(
            conditional_affine_autoregressive(z_dim, encoder.feature_dim, list(hidden_dims)) for _ in range(num_flows)
        )
        for flow in self.flows:  # mu = 0, s = 0: the identity map
            nn.init.zeros_(flow.nn.layers[-1].weight)
            nn.init.zeros_(flow.nn.layers[-1].bias)

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z | x): batch ``(batch,)``, event ``(z_dim,)``."""
        h = self.encoder.features(x)  # (batch, feature_dim)
        loc, scale = self.encoder.head(h)
        base = dist.Normal(loc, scale).to_event(1)
        return FlowPosterior(base, [flow.condition(h) for flow in self.flows])

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        register("guide", self)
        with pyro.plate("data", x.shape[0]):
            return sample_latent("z", self.posterior(x), self.kl_weights)
