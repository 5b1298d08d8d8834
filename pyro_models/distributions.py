"""Small distribution helpers shared by the models.

* :class:`DimWeighted` — a factorised distribution whose log density weights each event dimension,
  the per-dimension generalisation of ``poutine.scale`` used by soft free bits.
* :func:`pixel_likelihood` — the per-pixel observation distribution of an image decoder.
* :func:`observe` — a ``pyro.sample`` of observations that accepts a per-unit (pixel, frame) ``obs_mask``.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
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


class SummedBernoulli(dist.Independent):
    """``GreyBernoulli(logits).to_event(n)`` whose ``log_prob`` sums the cross-entropy over the event before
    negating it: the same numbers bit for bit (negation is exact), without a negated copy of every element
    forward and backward (an image batch's size twice per step; ``benchmarks/svi_overhead.py``)."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        logits = self.base_dist.logits
        if logits.shape != value.shape:
            logits, value = torch.broadcast_tensors(logits, value)
        n = self.reinterpreted_batch_ndims
        cross_entropy = F.binary_cross_entropy_with_logits(logits, value, reduction="none")
        return -cross_entropy.reshape(cross_entropy.shape[: cross_entropy.dim() - n] + (-1,)).sum(-1)

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) == self.batch_shape:  # each plate expands a site's distribution every step
            return self
        return super().expand(batch_shape, _instance)


class StandardNormal(dist.Normal):
    """N(0, 1) per element (``loc`` 0 and ``scale`` 1, broadcast to ``shape``), whose KL from any Normal
    q has its closed form without p's parameters, ``0.5 (sigma_q^2 + mu_q^2 - 1) - log sigma_q``:
    fewer operations than the general Normal-Normal KL (every VAE step takes one). Built and expanded
    without ``Normal``'s argument broadcasting (a prior is built, and expanded by each plate, every step)."""

    def __init__(self, shape, like: torch.Tensor):
        zero = like.new_zeros(())
        self.loc, self.scale = zero.expand(shape), (zero + 1.0).expand(shape)
        torch.distributions.Distribution.__init__(self, torch.Size(shape), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return self if batch_shape == self.batch_shape else StandardNormal(batch_shape, self.loc)


@register_kl(dist.Normal, StandardNormal)
def _kl_normal_standard_normal(q: dist.Normal, p: StandardNormal) -> torch.Tensor:
    kl = 0.5 * (q.scale.square() + q.loc.square() - 1.0) - q.scale.log()
    if q.batch_shape == p.batch_shape:
        return kl
    return kl.expand(torch.broadcast_shapes(q.batch_shape, p.batch_shape))


def to_event(fn: TorchDistribution, event_dim: int) -> TorchDistribution:
    """``fn.to_event(event_dim)``, as :class:`SummedBernoulli` for a :class:`GreyBernoulli`."""
    if type(fn) is GreyBernoulli and event_dim > 0:
        return SummedBernoulli(fn, event_dim)
    return fn.to_event(event_dim)


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


def observe(name: str, fn: TorchDistribution, obs: Optional[torch.Tensor], mask: Optional[torch.Tensor],
            event_dim: int, unit_name: str = "units", hide_missing: bool = False):
    """Observe ``obs (batch, *event_shape)`` under ``fn``, whose batch shape is ``(..., batch, *event_shape)``
    (one distribution per element, e.g. per pixel), optionally with missing parts.

    Must run inside a data plate at ``dim=-1``. Without ``mask`` the ``event_dim`` trailing axes are one
    event (``to_event``). With a boolean ``mask (batch, *unit_shape)`` (True = observed), where
    ``unit_shape`` is a prefix of ``event_shape`` (e.g. every pixel of an image, or every frame of a
    sequence), each unit becomes its own element of a ``unit_name`` plate at ``dim=-2`` (the layout
    inside that site, ``{name}_units``, is ``(..., units, batch, *rest)``), so Pyro's ``obs_mask`` splits
    it into ``{name}_units_observed`` and a latent ``{name}_units_unobserved`` that ``Predictive``
    samples; the site ``name`` is then a deterministic one holding the observations with the missing
    parts drawn, in the data's layout ``(..., batch, *event_shape)`` as without a mask (what
    ``Predictive(..., return_sites=[name])`` returns either way). With ``hide_missing`` the latent is
    hidden from the trace (``poutine.block``): every ELBO then scores the observed parts only, with no
    guide site for the missing ones (what training on gappy sequences needs; the returned value still
    holds a draw of them). Returns a value of shape ``(..., batch, *event_shape)``.
    """
    if mask is None:
        return pyro.sample(name, to_event(fn, event_dim), obs=obs)
    unit_dims = mask.dim() - 1
    if obs is None or unit_dims < 1 or unit_dims > event_dim or mask.shape != obs.shape[: unit_dims + 1]:
        raise ValueError(
            f"mask: expected shape (batch, ...) matching the leading axes of the observations "
            f"{None if obs is None else tuple(obs.shape)}, got {tuple(mask.shape)}"
        )
    inner = event_dim - unit_dims
    unit_shape = obs.shape[1 : unit_dims + 1]
    num_units = unit_shape.numel()

    def to_site(t: torch.Tensor, rest: int) -> torch.Tensor:
        # (..., batch, *unit_shape, *rest_shape) -> (..., units, batch, *rest_shape)
        split = t.dim() - rest - unit_dims
        if split >= 2 and t.shape[split - 2] == 1:
            # a value drawn under an outer plate (e.g. vectorised particles at dim -3) keeps a size-1 slot
            # at dim -2 of the batch dims for this plate: the units take that slot
            t, split = t.squeeze(split - 2), split - 1
        t = t.reshape(t.shape[:split] + (num_units,) + t.shape[t.dim() - rest :])
        return t.movedim(-rest - 1, -rest - 2)

    site_fn = _reshape_like(fn, lambda t: to_site(t, inner)).to_event(inner)
    units = f"{name}_units"
    hidden = poutine.block(hide=[f"{units}_unobserved"]) if hide_missing else contextlib.nullcontext()
    with pyro.plate(unit_name, num_units, dim=-2), hidden:
        value = pyro.sample(units, site_fn, obs=to_site(obs, inner), obs_mask=to_site(mask.bool(), 0))
    value = value.movedim(-inner - 2, -inner - 1)  # (..., batch, units, *rest_shape)
    value = value.reshape(torch.broadcast_shapes(fn.batch_shape, obs.shape))  # (..., batch, *event_shape)
    return pyro.deterministic(name, value, event_dim=event_dim)


def _reshape_like(fn: TorchDistribution, to_site) -> TorchDistribution:
    if isinstance(fn, GreyBernoulli):
        return GreyBernoulli(logits=to_site(fn.logits), validate_args=False)
    if isinstance(fn, dist.Normal):
        return dist.Normal(to_site(fn.loc), to_site(fn.scale), validate_args=False)
    raise TypeError(f"observe_pixels: no pixel layout for {type(fn).__name__}")


def _hard_straight_through(soft: torch.Tensor) -> torch.Tensor:
    """0/1 in the forward pass (``soft > 0.5``), the identity's gradient backward (straight-through).
    Written with tensor ops only, so that ``torch.jit.trace`` keeps the gradient: ``soft - soft.detach()``
    is exactly 0 in value, so the result is exactly 0 or 1."""
    return (soft > 0.5).to(soft.dtype) + (soft - soft.detach())


class LogitRelaxedBernoulliStraightThrough(dist.TorchDistribution):
    """A relaxed Bernoulli (binary Concrete, Maddison et al. 2017) with hard 0/1 samples, a
    straight-through gradient through sigmoid(y), and densities in *logit space*.

    ``rsample`` draws y = (logits + L) / temperature, L ~ Logistic(0, 1), and returns
    ``hard = 1[y > 0]`` with the gradient of sigmoid(y); the hard tensor remembers y. ``log_prob`` scores
    that y under Logistic(logits / temperature, 1 / temperature). Pyro's
    ``RelaxedBernoulliStraightThrough`` scores sigmoid(y) instead, clamped to [eps, 1 - eps]; below a
    temperature of ~0.3 many samples hit the clamp and a one-sample KL log q - log p is biased (0.75 nats
    instead of 1.32 at temperature 0.1 for logits 2 vs -1). Here q and p of the same y differ by an
    exact log-ratio whose expectation is the KL, the same at every temperature. Pass the tensor returned
    by ``rsample`` to the site untouched (any operation on it drops the remembered y).

    ``temperature`` and ``logits`` broadcast to the batch shape; the event shape is ``()``.
    """

    arg_constraints = {"temperature": constraints.positive, "logits": constraints.real}
    support = constraints.boolean
    has_rsample = True

    def __init__(self, temperature: torch.Tensor, logits: torch.Tensor, validate_args=None):
        self.temperature = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
        self.logits = logits
        batch_shape = torch.broadcast_shapes(self.temperature.shape, logits.shape)
        self._logistic = dist.Logistic(logits / self.temperature, 1 / self.temperature).expand(batch_shape)
        super().__init__(batch_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape)
        return LogitRelaxedBernoulliStraightThrough(self.temperature, self.logits.expand(shape))

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        # L = log u - log(1 - u) with u kept off 0 (Pyro's Logistic draws u in [0, 1), and u = 0,
        # about one float32 draw in 2^24, gives y = -inf and a NaN density: seen once in ~200 steps).
        shape = self._extended_shape(sample_shape)
        finfo = torch.finfo(self.logits.dtype)
        u = torch.rand(shape, dtype=self.logits.dtype, device=self.logits.device).clamp(finfo.tiny, 1.0 - finfo.eps)
        y = self._logistic.loc + self._logistic.scale * (u.log() - torch.log1p(-u))  # the relaxed logit
        hard = _hard_straight_through(torch.sigmoid(y))
        hard._relaxed_logit = y
        return hard

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        y = getattr(value, "_relaxed_logit", None)
        if y is None:
            raise ValueError("LogitRelaxedBernoulliStraightThrough.log_prob: value must be the tensor returned by rsample "
                             "(it carries the relaxed logit); got a tensor without it")
        return self._logistic.log_prob(y)
