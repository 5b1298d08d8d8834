"""Small distribution helpers shared by the models.

* :class:`DimWeighted` — a factorised distribution whose log density weights each event dimension,
  the per-dimension generalisation of ``poutine.scale`` used by soft free bits.
* :func:`pixel_likelihood` — the per-pixel observation distribution of an image decoder.
* :func:`observe_pixels` — a ``pyro.sample`` of an image that accepts a per-pixel ``obs_mask``.
"""
from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints
from torch.distributions.kl import kl_divergence, register_kl

LIKELIHOODS = ("bernoulli", "gaussian")


class DimWeighted(TorchDistribution):
    """``log p_w(z) = sum_d w_d log p(z_d)`` for a factorised ``p = Independent(base, 1)``.

    Samples are those of ``p``. Used with the same weights in a model and its guide, the ELBO's KL term
    becomes ``sum_d w_d KL(q_d || p_d)`` (analytically so under ``TraceMeanField_ELBO``): the soft
    free-bits objective of seed 002. Weights ``(event_dim,)`` are treated as constants.
    """

    arg_constraints = {}

    def __init__(self, base: dist.Independent, weights: torch.Tensor):
        if not isinstance(base, torch.distributions.Independent) or base.reinterpreted_batch_ndims != 1:
            raise ValueError(
                f"DimWeighted: base must be Independent(factorised, 1), got {type(base).__name__}; "
                "per-dimension KL weights need a factorised (mean-field) distribution"
            )
        if weights.shape != base.event_shape:
            raise ValueError(
                f"DimWeighted: weights must have the event shape {tuple(base.event_shape)}, "
                f"got {tuple(weights.shape)}"
            )
        self.base, self.weights = base, weights
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    @property
    def has_rsample(self):
        return self.base.has_rsample

    def sample(self, sample_shape=torch.Size()):
        return self.base.sample(sample_shape)

    def rsample(self, sample_shape=torch.Size()):
        return self.base.rsample(sample_shape)

    def log_prob(self, value):
        return (self.weights * self.base.base_dist.log_prob(value)).sum(-1)

    def expand(self, batch_shape, _instance=None):
        return DimWeighted(self.base.expand(batch_shape), self.weights)


@register_kl(DimWeighted, DimWeighted)
def _kl_dim_weighted(q: DimWeighted, p: DimWeighted) -> torch.Tensor:
    return (q.weights * kl_divergence(q.base.base_dist, p.base.base_dist)).sum(-1)


class FlowPosterior(dist.TransformedDistribution):
    """A flow posterior q(z) = f_K o ... o f_1 pushed ``base`` (a factorised Normal), whose KL to a
    factorised prior is estimated with the base's analytic KL as a control variate::

        KL(q || p) = KL(q_0 || p) + E_{q_0}[ log p(z_0) - log p(f(z_0)) - log |det df/dz_0| ]

    (exact identity; the expectation is estimated at the last draw of ``rsample``/``sample``, so
    ``TraceMeanField_ELBO`` scores the guide's own sample). Near-identity flows make the Monte Carlo
    part nearly constant, so the ELBO's variance approaches that of the Normal guide with analytic KL.
    """

    _path = None

    def rsample(self, sample_shape=torch.Size()):
        z = self.base_dist.rsample(sample_shape)
        path = [z]
        for transform in self.transforms:
            z = transform(z)
            path.append(z)
        self._path = path
        return z

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)


@register_kl(FlowPosterior, torch.distributions.Independent)
def _kl_flow_factorised(q: FlowPosterior, p: torch.distributions.Independent) -> torch.Tensor:
    if q._path is None:
        raise NotImplementedError("FlowPosterior: the KL estimate needs a draw first")
    path = q._path
    log_det = sum(t.log_abs_det_jacobian(x, y) for t, x, y in zip(q.transforms, path[:-1], path[1:]))
    return kl_divergence(q.base_dist, p) + p.log_prob(path[0]) - p.log_prob(path[-1]) - log_det


class GreyBernoulli(dist.Bernoulli):
    """Bernoulli whose ``log_prob`` accepts grey values in [0, 1] (the cross-entropy of seed 002/004:
    ``x log p + (1 - x) log(1 - p)``), so un-binarised images can be scored as the seeds do."""

    support = constraints.unit_interval


def pixel_likelihood(name: str, params: torch.Tensor, log_scale: Optional[torch.Tensor] = None):
    """The per-pixel distribution of an image decoder's output ``params`` (any shape).

    ``bernoulli``: ``params`` are logits; grey values allowed (:class:`GreyBernoulli`).
    ``gaussian``: ``params`` are means, ``exp(log_scale)`` the standard deviation.
    """
    if name == "bernoulli":
        return GreyBernoulli(logits=params, validate_args=False)
    if name == "gaussian":
        if log_scale is None:
            raise ValueError("pixel_likelihood('gaussian') needs log_scale")
        return dist.Normal(params, log_scale.exp().expand_as(params), validate_args=False)
    raise ValueError(f"unknown likelihood {name!r}; choose one of {LIKELIHOODS}")


def likelihood_mean(name: str, params: torch.Tensor) -> torch.Tensor:
    """The mean image of :func:`pixel_likelihood` (probabilities for Bernoulli, means for Gaussian)."""
    return torch.sigmoid(params) if name == "bernoulli" else params


def observe_pixels(name: str, fn: TorchDistribution, obs: Optional[torch.Tensor], mask: Optional[torch.Tensor], event_dim: int):
    """Observe images ``obs (batch, *pixel_shape)`` under per-pixel ``fn`` (batch shape
    ``(..., batch, *pixel_shape)``, where ``pixel_shape`` has ``event_dim`` axes).

    Must run inside a data plate at ``dim=-1``. Without ``mask`` the pixels are one event
    (``to_event``). With a boolean ``mask`` (the shape of ``obs``, True = observed), every pixel is its
    own batch element in a ``pixels`` plate at ``dim=-2`` (the layout inside the site is
    ``(..., pixels, batch)``), which lets Pyro's ``obs_mask`` split the site into ``{name}_observed``
    and a latent ``{name}_unobserved`` that ``Predictive`` samples. Returns ``(..., batch, *pixel_shape)``.
    """
    if mask is None:
        return pyro.sample(name, fn.to_event(event_dim), obs=obs)
    if obs is None or mask.shape != obs.shape:
        raise ValueError(
            f"mask: expected the shape of the observed images {None if obs is None else tuple(obs.shape)}, got {tuple(mask.shape)}"
        )
    leading, pixel_shape = fn.batch_shape[:-event_dim], fn.batch_shape[-event_dim:]
    num_pixels = pixel_shape.numel()

    def to_site(t: torch.Tensor) -> torch.Tensor:  # (..., batch, *pixel_shape) -> (..., pixels, batch)
        return t.reshape(t.shape[: t.dim() - event_dim] + (num_pixels,)).transpose(-1, -2)

    with pyro.plate("pixels", num_pixels, dim=-2):
        value = pyro.sample(name, _reshape_like(fn, to_site), obs=to_site(obs), obs_mask=to_site(mask.bool()))
    return value.transpose(-1, -2).reshape(value.shape[:-2] + leading[-1:] + pixel_shape)


def _reshape_like(fn: TorchDistribution, to_site) -> TorchDistribution:
    if isinstance(fn, GreyBernoulli):
        return GreyBernoulli(logits=to_site(fn.logits), validate_args=False)
    if isinstance(fn, dist.Normal):
        return dist.Normal(to_site(fn.loc), to_site(fn.scale), validate_args=False)
    raise TypeError(f"observe_pixels: no pixel layout for {type(fn).__name__}")
