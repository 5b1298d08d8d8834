"""Guides of the Kalman VAE, each with the model's signature ``(x, mask=None)``."""
from __future__ import annotations

from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..kl_weights import KLWeights, sample_latent
from ..networks import per_frame
from .config import KVAEConfig
from .networks import ConvFrameEncoder, MLPFrameEncoder


class KVAEGuide(nn.Module):
    """The guide q(a | x) = prod_t N(a_t; mu(x_t), diag sigma^2(x_t)) (the recognition model, eq. 6)."""

    def __init__(self, frame_shape: Sequence[int], config: KVAEConfig, kl_weights: Optional[KLWeights] = None):
        super().__init__()
        self.frame_dims = len(frame_shape)
        self.encoder = (ConvFrameEncoder if len(frame_shape) == 3 else MLPFrameEncoder)(frame_shape, config)
        self.kl_weights = kl_weights if kl_weights is not None else KLWeights(config.a_dim)

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(a | x): batch ``(batch,)``, event ``(T, a_dim)``."""
        loc, scale = per_frame(self.encoder, x, self.frame_dims)
        return dist.Normal(loc, scale).to_event(2)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        pyro.module("kvae_guide", self)
        with pyro.plate("sequences", x.shape[0]):
            return sample_latent("a", self.posterior(x), self.kl_weights)
