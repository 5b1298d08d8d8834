"""Latent-space diagnostics for models with one vector latent site (the VAE family): KL per
dimension, active units, decoder weight norms. Pure functions of a model, a guide and data."""
from __future__ import annotations

from typing import NamedTuple, Tuple

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.runtime import NonlocalExit
from torch.distributions import kl_divergence

# Burda et al. (2016), "Importance weighted autoencoders", sec. 5.2: a unit is active when
# Cov_x(E_q[z_u | x]) exceeds this.
ACTIVE_UNIT_THRESHOLD = 1e-2


def _unwrap_factorised(fn: dist.Distribution):
    """The per-dimension base of an ``Independent(factorised, 1)`` site distribution, else ``None``."""
    fn = getattr(fn, "base", fn)  # DimWeighted
    if isinstance(fn, torch.distributions.Independent) and fn.reinterpreted_batch_ndims == 1:
        return fn.base_dist
    return None


def latent_site(model, guide, x: torch.Tensor, site: str = "z") -> Tuple[dist.Distribution, dist.Distribution, torch.Tensor]:
    """The guide's and the model's distributions at ``site`` and the guide's sample, for batch ``x``.

    The model runs only up to ``site`` (``poutine.escape``), so nothing downstream (a decoder, its
    batch-norm statistics) is touched.
    """
    guide_trace = poutine.trace(guide).get_trace(x)
    replayed = poutine.replay(poutine.block(model, hide_types=["param"]), trace=guide_trace)
    try:
        poutine.escape(replayed, escape_fn=lambda msg: msg["name"] == site)(x)
    except NonlocalExit as stop:
        return guide_trace.nodes[site]["fn"], stop.site["fn"], guide_trace.nodes[site]["value"]
    raise ValueError(f"latent_site: the model has no sample site named {site!r}")


def batch_kl_per_dim(model, guide, x: torch.Tensor, site: str = "z", num_samples: int = 16) -> torch.Tensor:
    """Mean over the batch of KL(q(z_d | x) || p(z_d)) for each dimension d: ``(z_dim,)``.

    Exact for factorised guides and priors. For other guides (flows) q's marginal along d is replaced
    by the Gaussian with the same mean and variance, estimated from ``num_samples`` draws per example
    (an approximation, stated in the figure titles).
    """
    q, p, _ = latent_site(model, guide, x, site)
    q_base, p_base = _unwrap_factorised(q), _unwrap_factorised(p)
    if p_base is None:
        raise ValueError(f"batch_kl_per_dim: the prior at site {site!r} is not factorised")
    if q_base is None:
        draws = q.sample((num_samples,))  # (samples, batch, z_dim)
        q_base = dist.Normal(draws.mean(0), draws.std(0))
    return kl_divergence(q_base, p_base).reshape(-1, q_base.batch_shape[-1]).mean(0)


class LatentStats(NamedTuple):
    """Diagnostics of a latent site over a data set."""

    kl_per_dim: torch.Tensor  # (z_dim,) mean KL(q(z_d|x) || p(z_d)), nats
    posterior_mean_var: torch.Tensor  # (z_dim,) Cov_x(E_q[z_d | x]) (Burda et al. 2016)
    active_units: int  # dimensions whose posterior_mean_var exceeds ACTIVE_UNIT_THRESHOLD


@torch.no_grad()
def latent_stats(model, guide, data: torch.Tensor, batch_size: int = 500, site: str = "z", num_samples: int = 16) -> LatentStats:
    """KL per dimension and active units of ``site`` over ``data (N, ...)``, in eval mode."""
    kl_sum, means = 0.0, []
    for start in range(0, data.shape[0], batch_size):
        x = data[start : start + batch_size]
        kl_sum = kl_sum + batch_kl_per_dim(model, guide, x, site, num_samples) * x.shape[0]
        q, _, _ = latent_site(model, guide, x, site)
        mean = q.mean if _unwrap_factorised(q) is not None else q.sample((num_samples,)).mean(0)
        means.append(mean.reshape(x.shape[0], -1))
    variance = torch.cat(means).var(0)
    return LatentStats(kl_sum / data.shape[0], variance, int((variance > ACTIVE_UNIT_THRESHOLD).sum()))


def decoder_weight_norms(layer: torch.nn.Linear) -> torch.Tensor:
    """Column norms ``(in_features,)`` of a decoder's first linear layer: how strongly the decoder
    reads each latent dimension (seed 002's second bar plot)."""
    return layer.weight.detach().norm(dim=0)
