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

from typing import Callable, List, Optional, Tuple, Union

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints
from torch.distributions.kl import kl_divergence, register_kl

from ..distributions import FlowPosterior

Transition = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]  # z_prev (..., Z) -> loc, scale
# (z_{t-1}, t) -> q(z_t | ...): a Normal's (loc, scale), or a distribution (flows)
StepPosterior = Callable[[Optional[torch.Tensor], Union[int, slice]], Union[Tuple[torch.Tensor, torch.Tensor], dist.Distribution]]


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

    def step_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log p(z_t | z_{t-1}) of every step ``(..., batch, T)``, past the ends included."""
        return self.steps(value).log_prob(value)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return _masked_sum(self.step_log_prob(value), self.valid)


class PosteriorChain(TorchDistribution):
    """q(z_{1:T} | x) = prod_t q(z_t | z_{t-1}, h_t). ``posterior(z_prev, t)`` gives q(z_t | ...) for
    ``z_prev (..., batch, Z)`` and a step ``t``, or for all T steps at once for ``t = slice(None)`` and
    ``z_prev (..., batch, T, Z)`` (z_{0:T-1}): a diagonal Normal's ``(loc, scale)``, or a distribution with
    event ``(Z,)`` (a :class:`FlowPosterior`). ``z_prev`` is None before the first step of a guide without
    ``z_0``: a mean-field guide (``z_0`` None), whose steps never read z_{t-1}, is drawn with all steps at
    once. ``valid (batch, T)`` or None. ``fused(lead) -> (z, loc, scale)``, each ``(*lead, T, Z)``: draws the
    Normal steps in one call (e.g. :func:`combiner_chain`) instead of the step-by-step loop. Event ``(T, Z)``.

    Normal steps are drawn as z_t = loc_t + scale_t * eps_t with nothing else in the loop (no distribution
    objects: the loop is the step's sequential part, and Python work there is paid T times); their
    densities are computed afterwards for all steps at once. Any other value than the chain's own draw
    (a replayed trace) is scored with all steps at once. The chain remembers the value it drew or scored
    last, whose per-step distributions ``kl_divergence`` against a :class:`TransitionChain` reads."""

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, posterior: StepPosterior, z_0: Optional[torch.Tensor], num_steps: int, z_dim: int,
                 batch_shape: torch.Size, valid: Optional[torch.Tensor] = None,
                 fused: Optional[Callable[[torch.Size], Tuple[torch.Tensor, ...]]] = None):
        self.posterior, self.z_0, self.num_steps, self.valid, self.fused = posterior, z_0, num_steps, valid, fused
        self._draw: Optional[torch.Tensor] = None  # the value drawn or scored last ...
        self._steps: List[dist.Distribution] = []  # ... its per-step distributions (drawn), or
        self._all: Optional[dist.Distribution] = None  # ... all steps at once, batch (..., batch, T) (scored)
        self._log_prob: Optional[torch.Tensor] = None
        super().__init__(torch.Size(batch_shape), torch.Size((num_steps, z_dim)), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return PosteriorChain(self.posterior, self.z_0, self.num_steps, self.event_shape[-1], torch.Size(batch_shape),
                              self.valid, self.fused)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        lead = torch.Size(sample_shape) + self.batch_shape
        if self.fused is not None:  # Normal steps drawn by one function with its own backward pass
            draw, locs, scales = self.fused(lead)
            return self._normal_draw(locs, scales, draw)
        if self.z_0 is None:  # mean field: every step at once
            steps = self.posterior(None, slice(None))
            if isinstance(steps, tuple):
                return self._normal_draw(*(p.expand(lead + p.shape[-2:]) for p in steps))
        z = None if self.z_0 is None else self.z_0.expand(lead + self.z_0.shape)  # (..., batch, Z)
        chain, params, flows, noise = [], [], [], None
        for t in range(self.num_steps):
            q = self.posterior(z, t)
            if isinstance(q, tuple):  # a Normal: the reparameterised draw, nothing more
                loc, scale = q
                if noise is None:  # every step's noise in one draw, as the fused chain draws it
                    noise = torch.randn(lead + (self.num_steps,) + loc.shape[-1:], dtype=loc.dtype, device=loc.device)
                z = loc + scale * noise[..., t, :]
                params.append(q)
            else:
                q = q.expand(lead) if q.batch_shape != lead else q
                z = q.rsample()
                flows.append(q)
            chain.append(z)
        if params:
            draw = torch.stack(chain, dim=-2)  # (..., batch, T, Z)
            locs, scales = (torch.stack(p, dim=-2) for p in zip(*params))  # (..., batch, T, Z) each
            return self._normal_draw(locs, scales, draw)
        self._draw, self._steps, self._all = torch.stack(chain, dim=-2), flows, None  # (..., batch, T, Z)
        log_q = torch.stack([q.log_prob(z) for q, z in zip(flows, chain)], dim=-1)  # (..., batch, T)
        self._log_prob = _masked_sum(log_q, self.valid)  # (..., batch)
        return self._draw

    def _normal_draw(self, locs: torch.Tensor, scales: torch.Tensor, draw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Record (and, without ``draw``, make) a draw of Normal steps ``locs, scales (..., batch, T, Z)``."""
        if draw is None:
            draw = locs + scales * torch.randn(locs.shape, dtype=locs.dtype, device=locs.device)
        self._steps, self._all = [], dist.Normal(locs, scales, validate_args=False).to_event(1)
        self._draw, self._log_prob = draw, _masked_sum(self._all.log_prob(draw), self.valid)
        return draw

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def step_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log q(z_t | z_{t-1}, h_t) of every step ``(..., batch, T)`` at ``value``, all steps at once."""
        self.log_prob(value if value is not self._draw else value.clone())
        return self._all.log_prob(value)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if value is self._draw:
            return self._log_prob
        z_prev = None
        if self.z_0 is not None:
            z_0 = self.z_0.expand(value.shape[:-2] + (1,) + self.z_0.shape)  # (..., batch, 1, Z)
            z_prev = torch.cat([z_0, value[..., :-1, :]], dim=-2)  # z_{0:T-1}, (..., batch, T, Z)
        steps = self.posterior(z_prev, slice(None))
        if isinstance(steps, tuple):
            steps = dist.Normal(*steps, validate_args=False).to_event(1)
        self._draw, self._steps, self._all = value, [], steps
        self._log_prob = _masked_sum(self._all.log_prob(value), self.valid)
        return self._log_prob

    def step_normals(self) -> Optional[dist.Independent]:
        """The Normals of every step of the last value, batch ``(..., batch, T)``; None with flows."""
        if self._all is not None:
            return None if isinstance(self._all, FlowPosterior) else self._all
        return None  # the steps were drawn one by one: flows


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


def longest_first(lengths: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The permutation that sorts ``lengths (batch,)`` by decreasing length (stable), or None when they
    are sorted already (the trainer's batches are: then no gather and no scatter back is needed)."""
    if lengths is None or bool((lengths[:-1] >= lengths[1:]).all()):
        return None
    return torch.argsort(lengths, descending=True, stable=True)


def active_rows(lengths: Optional[torch.Tensor], num_rows: int, num_steps: int, repeat: int = 1) -> List[int]:
    """For rows sorted by decreasing ``lengths (batch,)``, each repeated ``repeat`` times: how many rows are
    still inside their sequence at each step (a prefix of the rows). Without lengths every row is."""
    if lengths is None:
        return [num_rows] * num_steps
    counts = torch.bincount(lengths.cpu(), minlength=num_steps + 1)  # how many sequences end at each length
    alive = counts.flip(0).cumsum(0).flip(0)[1 : num_steps + 1]  # alive[t] = #(lengths > t)
    return [int(n) * repeat for n in alive.tolist()]


def _grow(carry: torch.Tensor, rows: int) -> torch.Tensor:
    """``carry (n, .)`` padded with zero rows to ``rows``: the rows that were past their end at the next step."""
    return carry if carry.shape[0] == rows else F.pad(carry, (0, 0, 0, rows - carry.shape[0]))


class _CombinerChain(torch.autograd.Function):
    """The structured guides' chain with a hand-written backward pass (see :func:`combiner_chain`)."""

    @staticmethod
    def forward(ctx, context, noise, z_0, w_z, b_z, w_head, b_head, num_states: int, min_scale: float, active: List[int]):
        # context (N, T, H): sum of the RNN states; noise (N, T, Z); z_0 (N, Z); w_z (H, Z); w_head (2Z, H);
        # active[t]: rows inside their sequence at step t, a prefix (rows past their end are left at 0).
        # Buffers are time-major, (T, N, .): a step's rows are one contiguous block written in place.
        context, noise = context.transpose(0, 1).contiguous(), noise.transpose(0, 1).contiguous()  # (T, N, .)
        steps, n, z_dim = noise.shape
        k = num_states + 1
        z_prev = noise.new_zeros(steps, n, z_dim)  # z_{0:T-1}
        tanh_u = torch.zeros_like(context)  # tanh(W_z z_{t-1} + b_z)
        hidden = torch.zeros_like(context)  # h_comb
        head = noise.new_zeros(steps, n, 2 * z_dim)  # (loc, pre-softplus scale)
        z = z_0
        for t, rows in enumerate(active):
            z = z_prev[t, :rows].copy_(z[:rows])
            u = torch.addmm(b_z, z, w_z.t(), out=tanh_u[t, :rows]).tanh_()  # (rows, H)
            h = torch.add(u, context[t, :rows], out=hidden[t, :rows]).div_(k)
            out = torch.addmm(b_head, h, w_head.t(), out=head[t, :rows])  # (rows, 2Z)
            z = torch.addcmul(out[:, :z_dim], F.softplus(out[:, z_dim:]) + min_scale, noise[t, :rows])
        loc, pre_scale = head[..., :z_dim], head[..., z_dim:]
        scale = F.softplus(pre_scale) + min_scale
        draw = loc + scale * noise  # past a sequence's end: loc 0, a constant scale, never scored
        ctx.save_for_backward(noise, z_prev, tanh_u, hidden, pre_scale, w_z, w_head)
        ctx.num_states, ctx.active = num_states, active
        return tuple(o.transpose(0, 1) for o in (draw, loc, scale))  # (N, T, Z) each

    @staticmethod
    def backward(ctx, d_draw, d_loc, d_scale):
        noise, z_prev, tanh_u, hidden, pre_scale, w_z, w_head = ctx.saved_tensors  # (T, N, .)
        steps, n, z_dim = noise.shape
        k = ctx.num_states + 1
        time_major = lambda g: noise.new_zeros(noise.shape) if g is None else g.transpose(0, 1)  # (N, T, Z) -> (T, N, Z)
        d_draw, d_loc, d_scale = time_major(d_draw), time_major(d_loc), time_major(d_scale)
        sig = torch.sigmoid(pre_scale)  # softplus'
        # everything the loop reads but the carry, for all steps at once (z_t = loc_t + scale_t * eps_t):
        d_loc_total = (d_draw + d_loc).contiguous()  # dL/dloc_t without the steps after t
        d_pre_scale = ((d_draw * noise + d_scale) * sig).contiguous()  # dL/d(pre-softplus scale_t), likewise
        noise_sig = (noise * sig).contiguous()  # d(pre-softplus scale_t)/dz_t's share of the carry
        d_tanh = (1.0 - tanh_u * tanh_u) / k  # d(h_comb)/du through tanh, (T, N, H)
        g_head = noise.new_zeros(steps, n, 2 * z_dim)
        g_h = torch.zeros_like(tanh_u)  # dL/dh_comb: k times dL/dc (the context's gradient)
        g_u = torch.zeros_like(tanh_u)
        carry = noise.new_zeros(0, z_dim)  # dL/dz_t through the steps after t
        for t in range(steps - 1, -1, -1):
            rows = ctx.active[t]
            carry = _grow(carry, rows)
            torch.add(d_loc_total[t, :rows], carry, out=g_head[t, :rows, :z_dim])
            torch.addcmul(d_pre_scale[t, :rows], carry, noise_sig[t, :rows], out=g_head[t, :rows, z_dim:])
            torch.mm(g_head[t, :rows], w_head, out=g_h[t, :rows])  # (rows, H)
            g = torch.mul(g_h[t, :rows], d_tanh[t, :rows], out=g_u[t, :rows])
            carry = g @ w_z  # (rows, Z): into z_{t-1}
        flat = (steps * n, -1)  # every step at once: (T, N, .) -> (T N, .)
        d_w_head = g_head.reshape(flat).t() @ hidden.reshape(flat)  # (2Z, H)
        d_w_z = g_u.reshape(flat).t() @ z_prev.reshape(flat)  # (H, Z)
        d_context = g_h.div_(k).transpose(0, 1)  # (N, T, H)
        return (d_context, None, _grow(carry, n), d_w_z, g_u.sum((0, 1)), d_w_head, g_head.sum((0, 1)), None, None, None)


def combiner_chain(context: torch.Tensor, noise: torch.Tensor, z_0: torch.Tensor, combiner, num_states: int,
                   lengths: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
    """A draw of q(z_{1:T} | x) = prod_t N(z_t; loc_t, scale_t) of a structured guide (st-r, st-l, st-lr)::

        h_t = (tanh(W_z z_{t-1} + b_z) + c_t) / (1 + n),   loc_t, scale_t = W_mu h_t + b_mu, softplus(W_s h_t + b_s) + m

    for ``context`` c ``(batch, T, H)`` (the sum of the ``num_states`` = n RNN states), ``noise`` eps ``(...,
    batch, T, Z)``, ``z_0 (Z,)`` and the :class:`~.networks.Combiner` ``combiner``. Returns ``(z, loc, scale)``,
    each ``(..., batch, T, Z)``, z_t = loc_t + scale_t eps_t: the values, and the gradients with respect to
    every input and weight, of autograd through the T steps, computed with a hand-written backward pass.
    Autograd would record some twenty operations a step and compute each step's weight gradients apart (T
    products of a batch's rows); here the forward loop records nothing, the backward loop does two small
    products a step (the chain's Jacobian), and each weight's gradient is one product over all steps.

    With ``lengths (batch,)`` a step computes only the sequences that have not ended (the rows are sorted
    by length so that they are a prefix); past a sequence's end loc is 0 and scale constant, values that
    no density or KL reads. ``tests/test_ragged.py`` checks values and gradients against autograd's."""
    lead, (batch, steps, z_dim) = noise.shape[:-3], noise.shape[-3:]
    head = combiner.head
    if head.scale_fn is not F.softplus:
        raise ValueError("combiner: the fused chain is written for a softplus scale")
    order = longest_first(lengths)
    repeat = int(torch.Size(lead).numel())  # draws per sequence (particles)

    def rows_first(t: torch.Tensor) -> torch.Tensor:  # (..., batch, T, D) -> (batch * particles, T, D), sorted
        t = t.expand(lead + t.shape[-3:]).movedim(-3, 0)  # (batch, ..., T, D)
        t = t if order is None else t[order]
        return t.reshape(batch * repeat, steps, t.shape[-1])

    w_head = torch.cat([head.loc.weight, head.scale.weight])  # (2Z, H)
    b_head = torch.cat([head.loc.bias, head.scale.bias])
    outputs = _CombinerChain.apply(rows_first(context), rows_first(noise), z_0.expand(batch * repeat, z_dim),
                                   combiner.z_to_hidden.weight, combiner.z_to_hidden.bias, w_head, b_head,
                                   num_states, head.min_scale, active_rows(lengths, batch * repeat, steps, repeat))
    inverse = None if order is None else torch.argsort(order)

    def back(t: torch.Tensor) -> torch.Tensor:  # (batch * particles, T, Z) -> (..., batch, T, Z), original order
        t = t.reshape((batch,) + lead + (steps, z_dim))
        return (t if inverse is None else t[inverse]).movedim(0, -3)

    return tuple(back(o) for o in outputs)
