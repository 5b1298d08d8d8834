"""The DMM's latent chain as one Pyro site: z_{1:T} with event shape ``(T, z_dim)``.

Pyro's own DMM (``examples/dmm.py``) samples one site per step in the model and in the guide, so a step
of SVI pays Pyro's per-site bookkeeping 2T times and scores the model's transitions one step at a time.
Here the chain is a single site ``"z"``:

* :class:`TransitionChain` is the prior p(z_{1:T}) = prod_t N(z_t; G(z_{t-1}), S(z_{t-1})) (eq. 1). Given a
  draw of the whole chain (the guide's, replayed), every transition is scored *at once*: z_{0:T-1} goes
  through the transition network as one batch of ``batch * T`` states.
* :class:`PosteriorChain` is the guide q(z_{1:T} | x) = prod_t q(z_t | z_{t-1}, h_t). Drawing it is
  sequential (z_t depends on z_{t-1}); its density is recorded during the draw, so the ELBO never runs
  the combiner twice.
* ``kl_divergence(PosteriorChain, TransitionChain)`` is sum_t KL(q(z_t | z_{t-1}, h_t) || p(z_t | z_{t-1}))
  at the guide's draw of z_{1:T-1}: analytic per step, what ``TraceMeanField_ELBO`` scores for Pyro's
  per-step sites, and with flows the control-variate estimate of
  :class:`~pyro_models.distributions.FlowPosterior`.

Ragged sequences: ``valid (batch, T)`` bool marks the steps that exist (t < length). A step past a
sequence's end adds nothing to any density or KL; its z is still drawn (so tensors stay rectangular)
but nothing reads it except later steps past the end, which count for nothing either.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints
from torch.distributions.kl import kl_divergence, register_kl

from ..distributions import FlowPosterior

Transition = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]  # z_prev (..., Z) -> loc, scale
StepPosterior = Callable[[Optional[torch.Tensor], int], dist.Distribution]  # (z_{t-1}, t) -> q(z_t | ...)


def step_mask(lengths: Optional[torch.Tensor], num_steps: int) -> Optional[torch.Tensor]:
    """``valid (batch, T)`` bool, True where step t < ``lengths (batch,)``; None for ``lengths`` None."""
    if lengths is None:
        return None
    return torch.arange(num_steps, device=lengths.device) < lengths.unsqueeze(-1)  # (batch, T)


def _masked_sum(per_step: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Sum of ``per_step (..., batch, T)`` over T, counting only the ``valid (batch, T)`` steps."""
    if valid is not None:
        per_step = per_step.masked_fill(~valid, 0.0)
    return per_step.sum(-1)


class TransitionChain(TorchDistribution):
    """p(z_{1:T}) = prod_t N(z_t; loc(z_{t-1}), diag scale(z_{t-1})^2) with z_0 fixed: event ``(T, z_dim)``,
    batch ``batch_shape``. ``transition(z_prev (..., Z)) -> (loc, scale)``; ``z_0 (Z,)``; ``valid (batch, T)``
    bool or None (every step exists)."""

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, transition: Transition, z_0: torch.Tensor, num_steps: int, batch_shape: torch.Size,
                 valid: Optional[torch.Tensor] = None):
        self.transition, self.z_0, self.num_steps, self.valid = transition, z_0, num_steps, valid
        super().__init__(torch.Size(batch_shape), torch.Size((num_steps, z_0.shape[-1])), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return TransitionChain(self.transition, self.z_0, self.num_steps, torch.Size(batch_shape), self.valid)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        z = self.z_0.expand(torch.Size(sample_shape) + self.batch_shape + self.z_0.shape)  # (..., batch, Z)
        chain = []
        for _ in range(self.num_steps):
            loc, scale = self.transition(z)
            z = loc + scale * torch.randn_like(loc)
            chain.append(z)
        return torch.stack(chain, dim=-2)  # (..., batch, T, Z)

    def steps(self, value: torch.Tensor) -> dist.Independent:
        """The T transition densities at a draw ``value (..., batch, T, Z)``, all at once: batch
        ``(..., batch, T)``, event ``(Z,)``."""
        z_0 = self.z_0.expand(value.shape[:-2] + (1,) + self.z_0.shape)  # (..., batch, 1, Z)
        z_prev = torch.cat([z_0, value[..., :-1, :]], dim=-2)  # z_{0:T-1}, (..., batch, T, Z)
        loc, scale = self.transition(z_prev)
        return dist.Normal(loc, scale, validate_args=False).to_event(1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return _masked_sum(self.steps(value).log_prob(value), self.valid)


class PosteriorChain(TorchDistribution):
    """q(z_{1:T} | x) = prod_t q(z_t | z_{t-1}, h_t). ``posterior(z_prev, t)`` gives q(z_t | ...) (a Normal
    with event ``(Z,)`` or a :class:`FlowPosterior`) for ``z_prev (..., batch, Z)`` and a step ``t``, or all
    T steps at once for ``t = slice(None)`` and ``z_prev (..., batch, T, Z)`` (z_{0:T-1}); ``z_prev`` is None
    before the first step of a guide without ``z_0`` (mean field: it is never read). ``z_0 (Z,)`` or
    None; ``valid (batch, T)`` or None. Event ``(T, Z)``.

    ``rsample`` draws step by step and records the density of its draw, so scoring the draw costs
    nothing more; any other value (a replayed trace) is scored with all steps at once. The chain remembers
    the value it drew or scored last, whose per-step distributions ``kl_divergence`` against a
    :class:`TransitionChain` reads."""

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, posterior: StepPosterior, z_0: Optional[torch.Tensor], num_steps: int, z_dim: int,
                 batch_shape: torch.Size, valid: Optional[torch.Tensor] = None):
        self.posterior, self.z_0, self.num_steps, self.valid = posterior, z_0, num_steps, valid
        self._draw: Optional[torch.Tensor] = None  # the value drawn or scored last ...
        self._steps: List[dist.Distribution] = []  # ... its per-step distributions (drawn), or
        self._all: Optional[dist.Distribution] = None  # ... all steps at once, batch (..., batch, T) (scored)
        self._log_prob: Optional[torch.Tensor] = None
        super().__init__(torch.Size(batch_shape), torch.Size((num_steps, z_dim)), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return PosteriorChain(self.posterior, self.z_0, self.num_steps, self.event_shape[-1], torch.Size(batch_shape),
                              self.valid)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        lead = torch.Size(sample_shape) + self.batch_shape
        z = None if self.z_0 is None else self.z_0.expand(lead + self.z_0.shape)  # (..., batch, Z)
        chain, steps, log_q = [], [], []
        for t in range(self.num_steps):
            q = self.posterior(z, t)
            q = q.expand(lead) if q.batch_shape != lead else q
            z = q.rsample()
            chain.append(z), steps.append(q), log_q.append(q.log_prob(z))
        self._draw, self._steps, self._all = torch.stack(chain, dim=-2), steps, None  # (..., batch, T, Z)
        self._log_prob = _masked_sum(torch.stack(log_q, dim=-1), self.valid)  # (..., batch)
        return self._draw

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if value is self._draw:
            return self._log_prob
        z_prev = None
        if self.z_0 is not None:
            z_0 = self.z_0.expand(value.shape[:-2] + (1,) + self.z_0.shape)  # (..., batch, 1, Z)
            z_prev = torch.cat([z_0, value[..., :-1, :]], dim=-2)  # z_{0:T-1}, (..., batch, T, Z)
        self._draw, self._steps, self._all = value, [], self.posterior(z_prev, slice(None))
        self._log_prob = _masked_sum(self._all.log_prob(value), self.valid)
        return self._log_prob

    def step_normals(self) -> Optional[dist.Independent]:
        """The Normals of every step of the last value, batch ``(..., batch, T)``; None with flows."""
        if self._all is not None:
            return None if isinstance(self._all, FlowPosterior) else self._all
        if any(isinstance(step, FlowPosterior) for step in self._steps):
            return None
        locs = torch.stack([q.base_dist.loc for q in self._steps], dim=-2)  # (..., batch, T, Z)
        scales = torch.stack([q.base_dist.scale for q in self._steps], dim=-2)
        return dist.Normal(locs, scales, validate_args=False).to_event(1)


@register_kl(PosteriorChain, TransitionChain)
def _kl_chain(q: PosteriorChain, p: TransitionChain) -> torch.Tensor:
    """sum_t KL(q(z_t | z_{t-1}, h_t) || p(z_t | z_{t-1})) at q's last value, over the valid steps."""
    if q._draw is None:
        raise NotImplementedError("PosteriorChain: the KL needs a draw first")
    prior = p.steps(q._draw)  # batch (..., batch, T)
    normals = q.step_normals()
    if normals is not None:
        return _masked_sum(kl_divergence(normals, prior), q.valid)
    if not q._steps:  # flows, scored rather than drawn: no path to estimate the KL at
        raise NotImplementedError("PosteriorChain: a flow's KL needs the chain's own draw")
    loc, scale = prior.base_dist.loc, prior.base_dist.scale
    per_step = [kl_divergence(step, dist.Normal(loc[..., t, :], scale[..., t, :]).to_event(1))
                for t, step in enumerate(q._steps)]
    return _masked_sum(torch.stack(per_step, dim=-1), q.valid)
