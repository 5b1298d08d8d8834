"""Variational autoencoders in Pyro: the MLP VAE of seed 004 and the convolutional VAE of seed 003.

Generative process (Kingma & Welling 2014, eqs. 1-3 and appendix C)::

    z ~ N(0, I)                                  (batch, z_dim)
    x | z ~ prod_pixels p(x_i | decoder(z)_i)    Bernoulli (grey values allowed) or Gaussian

The model and every guide are ``nn.Module`` callables with the same signature ``(x, mask=None)``, with
``x (batch, C, H, W)`` and ``mask`` a boolean ``(batch, C, H, W)`` (True = observed) used for
imputation. Guides are chosen by name (:data:`GUIDES`): ``normal``, the amortised diagonal Normal, and
``iaf``, an amortised inverse autoregressive flow (Kingma et al. 2016) on top of it.

KL annealing and soft free bits act on the latent site through :class:`KLWeights`, shared by the model
and its guide: ``beta`` scales the site with ``poutine.scale`` and ``gamma`` weights each dimension
(:class:`~pyro_models.distributions.DimWeighted`). They act in training mode only, so ``eval()`` always
scores the true ELBO.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import pyro
import pyro.distributions as dist
from pyro.infer.util import is_validation_enabled
import torch
from torch import nn

from ..params import register
from ..distributions import LIKELIHOODS, StandardNormal, likelihood_mean, observe, pixel_likelihood
from ..kl_weights import KLWeights, sample_latent

ARCHITECTURES = {"vae": "mlp", "conv-vae": "conv"}
GUIDES = ("normal", "iaf")


@dataclass
class VAEConfig:
    """Sizes and choices of a VAE. Defaults: seed 004's 784-512-512-64 MLP, seed 003's conv stack."""

    z_dim: int = 64  # size of the latent z
    hidden_dims: Tuple[int, ...] = (512, 512)  # MLP encoder and decoder widths (vae)
    channels: Tuple[int, ...] = (32, 64, 128, 256, 512)  # conv encoder filters, stride 2 each (conv-vae)
    likelihood: str = field(default="bernoulli", metadata={"choices": LIKELIHOODS})  # p(x | z) per pixel: bernoulli (grey values allowed) or gaussian (learned global scale)
    min_scale: float = 1e-4  # floor of the encoder's standard deviation
    guide: str = field(default="normal", metadata={"choices": GUIDES})  # normal: amortised diagonal Normal; iaf: inverse autoregressive flow on it
    num_flows: int = 2  # IAF steps of the "iaf" guide
    flow_hidden_dims: Tuple[int, ...] = (256,)  # autoregressive network widths of each IAF step

    def __post_init__(self):
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood: expected one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.guide not in GUIDES:
            raise ValueError(f"guide: expected one of {GUIDES}, got {self.guide!r}")
        if self.z_dim < 1:
            raise ValueError(f"z_dim: expected >= 1, got {self.z_dim}")
        if self.num_flows < 0:
            raise ValueError(f"num_flows: expected >= 0, got {self.num_flows}")
        if self.guide == "iaf" and self.num_flows < 1:
            raise ValueError(f"num_flows: the 'iaf' guide needs >= 1 flow steps (0 is the 'normal' guide), got {self.num_flows}")
        for name in ("hidden_dims", "channels", "flow_hidden_dims"):
            widths = getattr(self, name)
            if not widths or min(widths) < 1:
                raise ValueError(f"{name}: expected one or more widths >= 1, got {widths}")
        if not self.min_scale > 0:
            raise ValueError(f"min_scale: expected > 0, got {self.min_scale}")


class VAE(nn.Module):
    """The model p(x, z) = N(z; 0, I) p(x | z). ``decoder`` is the network of p(x | z)."""

    def __init__(self, decoder: nn.Module, z_dim: int, x_shape: Sequence[int], likelihood: str = "bernoulli"):
        super().__init__()
        self.decoder, self.z_dim, self.x_shape, self.likelihood = decoder, z_dim, tuple(x_shape), likelihood
        self.kl_weights = KLWeights(z_dim)
        self.log_scale = nn.Parameter(torch.zeros(())) if likelihood == "gaussian" else None

    def check_input(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(batch, *x_shape)`` (and ``mask`` the same shape)."""
        if x.dim() != len(self.x_shape) + 1 or tuple(x.shape[1:]) != self.x_shape:
            raise ValueError(f"x: expected shape (batch, {', '.join(map(str, self.x_shape))}), got {tuple(x.shape)}")
        if mask is not None and mask.shape != x.shape:
            raise ValueError(f"mask: expected shape {tuple(x.shape)} (that of x), got {tuple(mask.shape)}")
        if is_validation_enabled() and self.likelihood == "bernoulli":  # a host sync: only when validating
            low, high = float(x.min()), float(x.max())
            if low < 0 or high > 1:
                raise ValueError(f"x: the Bernoulli likelihood needs values in [0, 1], got min {low:.4g}, max {high:.4g}")

    def prior(self, batch_size: int, like: torch.Tensor) -> dist.Distribution:
        """p(z) = N(0, I), batch ``(batch_size,)``, event ``(z_dim,)``."""
        return StandardNormal((batch_size, self.z_dim), like).to_event(1)

    def observation(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z), per pixel: batch ``z.shape[:-1] + x_shape``."""
        return pixel_likelihood(self.likelihood, self.decoder(z), self.log_scale)

    def mean_image(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z], ``z.shape[:-1] + x_shape``."""
        return likelihood_mean(self.likelihood, self.decoder(z))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.check_input(x, mask)
        register("model", self)
        with pyro.plate("data", x.shape[0]):
            z = sample_latent("z", self.prior(x.shape[0], x), self.kl_weights)
            params = self.decoder(z)  # (batch, C, H, W)
            if mask is not None:
                pyro.deterministic("x_mean", likelihood_mean(self.likelihood, params), event_dim=len(self.x_shape))
            return observe("x", pixel_likelihood(self.likelihood, params, self.log_scale), x, mask, len(self.x_shape), "pixels")


def generate(model: VAE, batch_size: int) -> torch.Tensor:
    """A Pyro program sampling images from the prior: z ~ N(0, I) (site ``z``, ``(batch, z_dim)``), then
    x ~ p(x | z) (site ``x``, ``(batch, *x_shape)``), as every model package's ``generate`` does for its
    model. Returns the images' means E[x | z] ``(batch, *x_shape)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    like = next(model.decoder.parameters())
    with pyro.plate("data", batch_size):
        z = pyro.sample("z", model.prior(batch_size, like))
        pyro.sample("x", model.observation(z).to_event(len(model.x_shape)))
    return model.mean_image(z)
