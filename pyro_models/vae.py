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

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import conditional_affine_autoregressive
from torch import nn

from .distributions import LIKELIHOODS, DimWeighted, FlowPosterior, likelihood_mean, observe, pixel_likelihood
from .networks import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder

ARCHITECTURES = {"vae": "mlp", "conv-vae": "conv"}
GUIDES = ("normal", "iaf")


@dataclass
class VAEConfig:
    """Sizes and choices of a VAE. Defaults: seed 004's 784-512-512-64 MLP, seed 003's conv stack."""

    z_dim: int = 64
    hidden_dims: Tuple[int, ...] = (512, 512)  # MLP encoder and decoder widths
    channels: Tuple[int, ...] = (32, 64, 128, 256, 512)  # conv encoder filters, stride 2 each
    likelihood: str = "bernoulli"  # or "gaussian" (learned global scale)
    min_scale: float = 1e-4  # floor of the encoder's standard deviation
    guide: str = "normal"  # one of GUIDES
    num_flows: int = 2  # IAF steps of the "iaf" guide
    flow_hidden_dims: Tuple[int, ...] = (256,)  # autoregressive network widths of each IAF step

    def __post_init__(self):
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood: expected one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.guide not in GUIDES:
            raise ValueError(f"guide: expected one of {GUIDES}, got {self.guide!r}")
        if self.z_dim < 1 or self.num_flows < 0:
            raise ValueError(f"z_dim must be >= 1 and num_flows >= 0, got {self.z_dim}, {self.num_flows}")


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

    def prior(self, batch_size: int, like: torch.Tensor) -> dist.Distribution:
        """p(z) = N(0, I), batch ``(batch_size,)``, event ``(z_dim,)``."""
        zero = like.new_zeros(())
        return dist.Normal(zero, zero + 1.0).expand([batch_size, self.z_dim]).to_event(1)

    def observation(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z), per pixel: batch ``z.shape[:-1] + x_shape``."""
        return pixel_likelihood(self.likelihood, self.decoder(z), self.log_scale)

    def mean_image(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z], ``z.shape[:-1] + x_shape``."""
        return likelihood_mean(self.likelihood, self.decoder(z))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.check_input(x, mask)
        pyro.module("model", self)
        with pyro.plate("data", x.shape[0]):
            z = sample_latent("z", self.prior(x.shape[0], x), self.kl_weights)
            params = self.decoder(z)  # (batch, C, H, W)
            if mask is not None:
                pyro.deterministic("x_mean", likelihood_mean(self.likelihood, params), event_dim=len(self.x_shape))
            return observe("x", pixel_likelihood(self.likelihood, params, self.log_scale), x, mask, len(self.x_shape), "pixels")


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
        pyro.module("guide", self)
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
        pyro.module("guide", self)
        with pyro.plate("data", x.shape[0]):
            return sample_latent("z", self.posterior(x), self.kl_weights)


def build_vae(name: str, x_shape: Sequence[int], config: VAEConfig) -> Tuple[VAE, nn.Module]:
    """The model and guide for ``name`` in ``ARCHITECTURES`` (``vae``: MLP, ``conv-vae``: conv) on
    images of shape ``x_shape = (C, H, W)``."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of {tuple(ARCHITECTURES)}")
    if len(x_shape) != 3:
        raise ValueError(f"x_shape: expected (C, H, W), got {tuple(x_shape)}")
    if ARCHITECTURES[name] == "mlp":
        encoder = MLPEncoder(x_shape, config.hidden_dims, config.z_dim, config.min_scale)
        decoder = MLPDecoder(config.z_dim, config.hidden_dims[::-1], x_shape)
    else:
        encoder = ConvEncoder(x_shape, config.channels, config.z_dim, config.min_scale)
        decoder = ConvDecoder(config.z_dim, config.channels, x_shape)
    model = VAE(decoder, config.z_dim, x_shape, config.likelihood)
    if config.guide == "normal":
        guide: nn.Module = NormalGuide(encoder, model.kl_weights)
    else:
        guide = IAFGuide(encoder, config.z_dim, config.num_flows, config.flow_hidden_dims, model.kl_weights)
    return model, guide
