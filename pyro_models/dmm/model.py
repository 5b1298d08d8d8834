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

Pyro sites: ``z`` (event ``(T, z_dim)``: the whole chain z_{1:T}, :mod:`.chains`) and ``x`` (event
``(T, *frame_shape)``), inside ``pyro.plate("sequences", batch)``. Given the guide's draw of the chain,
every transition and every frame is scored at once. ``z`` goes through
:func:`~pyro_models.kl_weights.sample_latent` with the :class:`~pyro_models.kl_weights.KLWeights` the
guide shares, so KL annealing (``beta``) scales log p(z) - log q(z | x) in training mode only.

Model and guides share the signature ``(x, mask=None, lengths=None)``, ``x (batch, T, *frame_shape)`` with
``frame_shape`` ``(D,)`` or ``(C, H, W)``.

* ``lengths (batch,)`` int: sequence b has ``lengths[b]`` steps (ragged batches, padded to T). Past its
  end there is nothing: no latent density, no KL, no likelihood (the steps are masked, as Pyro's
  ``examples/dmm.py`` masks them); a batch gives the sum of what its sequences give one at a time.
* ``mask (batch, T)`` bool marks observed frames *inside* a sequence: ``x`` is then observed through
  :func:`~pyro_models.distributions.observe`, a missing frame adds no likelihood but its latent z_t stays
  (the latent ``x_units_unobserved`` that ``obs_mask`` creates is hidden from the trace, so every ELBO scores
  the observed frames only, and the ``x`` site's value holds a draw of the missing ones), and the
  frames' means E[x_t | z_t] are recorded as ``x_mean`` for imputation.
"""
from __future__ import annotations

from typing import Optional, Sequence

import pyro
import torch
from torch import nn

from ..params import register
from ..distributions import observe
from ..kl_weights import KLWeights, sample_latent
from ..networks import per_frame
from .chains import TransitionChain, step_mask
from .config import DMMConfig, check_input
from .networks import Emitter, build_transition

class DMM(nn.Module):
    """The model p(x, z) = prod_t p(z_t | z_{t-1}) p(x_t | z_t) with a learned z_0 (see the module
    docstring). ``forward(x, mask=None, lengths=None)`` returns the ``x`` site's value ``(batch, T,
    *frame_shape)``."""

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

    def prior(self, batch_size: int, num_steps: int, valid: Optional[torch.Tensor] = None) -> TransitionChain:
        """p(z_{1:T}): batch ``(batch_size,)``, event ``(T, z_dim)``; ``valid (batch, T)`` marks the steps that
        exist (None: all)."""
        return TransitionChain(self.transition, self.z_0, num_steps, torch.Size((batch_size,)), valid)

    def frame_params(self, z: torch.Tensor) -> torch.Tensor:
        """F(z_t) ``(..., T, *frame_shape)`` (Bernoulli logits or Normal means) for ``z (..., T, z_dim)``."""
        return per_frame(self.emitter, z, 1)

    def frame_mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x_t | z_t] ``(..., T, *frame_shape)`` for ``z (..., T, z_dim)``."""
        return self.emitter.mean(self.frame_params(z))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_input(x, mask, self.frame_shape, lengths)
        register("dmm", self)
        batch, steps = x.shape[:2]
        valid = step_mask(lengths, steps)  # (batch, T) or None
        with pyro.plate("sequences", batch):
            z = sample_latent("z", self.prior(batch, steps, valid), self.kl_weights)  # (..., batch, T, z_dim)
            params = self.frame_params(z)  # (..., batch, T, *frame_shape)
            return observe_frames(self.emitter, params, x, mask, valid, self.frame_dims)


def observe_frames(emitter: Emitter, params: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor],
                   valid: Optional[torch.Tensor], frame_dims: int) -> torch.Tensor:
    """The ``x`` site: frames ``x (batch, T, *frame_shape)`` under p(x_t | z_t) with parameters ``params``.
    Steps past a sequence's end (``valid`` False) add no likelihood; with a gap ``mask (batch, T)`` the
    missing frames add none either and the frames' means are recorded as ``x_mean`` (see the module
    docstring). Returns the site's value."""
    fn = emitter.distribution(params)
    event_dim = frame_dims + 1  # (T, *frame_shape)
    if mask is not None:
        pyro.deterministic("x_mean", emitter.mean(params), event_dim=event_dim)
        observed = mask if valid is None else mask & valid  # a step past the end is hidden like a gap
        return observe("x", fn, x, observed, event_dim, "frames", hide_missing=True)
    if valid is not None:
        fn = fn.mask(valid.reshape(valid.shape + (1,) * frame_dims))  # (batch, T, 1, ...): past the end, nothing
    return pyro.sample("x", fn.to_event(event_dim), obs=x)


def generate(model: DMM, batch_size: int, num_steps: int) -> torch.Tensor:
    """A Pyro program sampling sequences from the prior (sites ``z``, event ``(T, z_dim)``, and ``x``, event
    ``(T, *frame_shape)``). Returns the frames' means E[x_t | z_t] ``(batch, T, *frame_shape)``."""
    if batch_size < 1 or num_steps < 1:
        raise ValueError(f"generate: expected batch_size >= 1 and num_steps >= 1, got {batch_size}, {num_steps}")
    with pyro.plate("sequences", batch_size):
        z = pyro.sample("z", model.prior(batch_size, num_steps))
        params = model.frame_params(z)  # (batch, T, *frame_shape)
        pyro.sample("x", model.emitter.distribution(params).to_event(model.frame_dims + 1))
    return model.emitter.mean(params)
