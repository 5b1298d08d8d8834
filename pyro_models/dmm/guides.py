"""Guides of the DMM, each with the model's signature ``(x, mask=None, lengths=None)``: the paper's four
inference networks (Table 1) chosen by ``config.guide``, one of :data:`~.config.GUIDES`::

    "st-r"   q(z | x) = prod_t q(z_t | z_{t-1}, x_{t:T})    backward RNN + combiner (the paper's DKS)
    "st-l"   q(z | x) = prod_t q(z_t | z_{t-1}, x_{1:t})    forward RNN + combiner (left context only)
    "st-lr"  q(z | x) = prod_t q(z_t | z_{t-1}, x_{1:T})    bidirectional RNN + combiner
    "mf-lr"  q(z | x) = prod_t q(z_t | x_{1:T})             bidirectional RNN, no z_{t-1} (mean field)

The structured guides read z_{t-1} from their own previous draw (z_0 of the guide is learned). With
``num_flows > 0`` every q(z_t | ...) is an inverse autoregressive flow (Kingma et al. 2016) on top of
the combiner's Normal, conditioned on the combiner's hidden state h_comb; each step starts as the
identity (zero-initialised output layer), the steps are shared over time. The chain is one site ``z``
(event ``(T, z_dim)``, :class:`~.chains.PosteriorChain`), as in the model; ``TraceMeanField_ELBO`` scores
its KL analytically step by step (flows: the base's analytic KL as a control variate,
:class:`~pyro_models.distributions.FlowPosterior`).

A missing frame (``mask`` False) is never read: the frame is zeroed before the frame encoder and its
features are zeroed after, so the RNNs see e_t = 0 there; with ``mask_feature`` each e_t gains one more
entry, 1 where the frame is observed and 0 where it is missing, so that a gap is not read as a frame of
zeros. With ``guide_frame_dropout > 0`` (training mode only) each frame is also hidden from the guide
with that probability, a fresh draw every step, while the model still scores it: any q(z | x) gives a
lower bound, and this one learns to infer z across gaps (Bowman et al. 2016's word dropout, applied to
the inference network only). A step past a sequence's end (``lengths``) is
never read either: the backward RNN starts at each sequence's own last frame.
"""
from __future__ import annotations

from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import conditional_affine_autoregressive
from torch import nn

from ..params import register
from ..distributions import FlowPosterior
from ..imputation import zero_missing
from ..kl_weights import KLWeights, sample_latent
from ..networks import per_frame
from .chains import PosteriorChain, combiner_chain, step_mask
from .config import DMMConfig, check_input
from .networks import Combiner, FrameEncoder, MeanFieldCombiner, SequenceContext

STRUCTURED = ("st-r", "st-l", "st-lr")  # guides whose q(z_t | ...) reads z_{t-1}
LEFT = ("st-l", "st-lr", "mf-lr")  # guides whose RNN reads the past frames x_{1:t}
RIGHT = ("st-r", "st-lr", "mf-lr")  # guides whose RNN reads the future frames x_{t:T}


def _identity_flows(config: DMMConfig) -> nn.ModuleList:
    """``num_flows`` conditional affine autoregressive steps on z, context h_comb, each the identity map."""
    flows = nn.ModuleList(
        conditional_affine_autoregressive(config.z_dim, config.rnn_dim, list(config.flow_hidden))
        for _ in range(config.num_flows)
    )
    for flow in flows:  # shift 0, log-scale 0
        nn.init.zeros_(flow.nn.layers[-1].weight)
        nn.init.zeros_(flow.nn.layers[-1].bias)
    return flows


class DMMGuide(nn.Module):
    """The guide q(z_{1:T} | x_{1:T}) of ``config.guide`` (see the module docstring). ``forward(x,
    mask=None, lengths=None)`` returns its draw z ``(batch, T, z_dim)``."""

    def __init__(self, frame_shape: Sequence[int], config: DMMConfig, kl_weights: Optional[KLWeights] = None):
        super().__init__()
        self.frame_shape, self.config = tuple(frame_shape), config
        self.encoder = FrameEncoder(frame_shape, config)
        feature_dim = self.encoder.feature_dim + int(config.mask_feature)
        self.context = SequenceContext(feature_dim, config, config.guide in LEFT, config.guide in RIGHT)
        structured = config.guide in STRUCTURED
        self.combiner = Combiner(config) if structured else MeanFieldCombiner(config)
        self.z_0 = nn.Parameter(torch.zeros(config.z_dim)) if structured else None
        self.flows = _identity_flows(config)
        self.kl_weights = kl_weights if kl_weights is not None else KLWeights(config.z_dim)

    def seen(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The frames the guide reads, ``(batch, T)`` bool (None: all): ``mask``, less a fresh
        ``guide_frame_dropout`` draw in training mode."""
        rate = self.config.guide_frame_dropout
        if not (self.training and rate > 0):
            return mask
        kept = torch.rand(x.shape[:2], device=x.device) >= rate  # (batch, T)
        return kept if mask is None else mask & kept

    def features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Frame features e ``(batch, T, feature_dim)`` of ``x (batch, T, *frame_shape)``; exactly 0 at the
        frames where ``mask (batch, T)`` is False, whose content is never read; with ``mask_feature`` the
        last entry is the mask (1 everywhere when ``mask`` is None)."""
        if mask is not None:
            x = zero_missing(x, mask)
        e = per_frame(self.encoder, x, len(self.frame_shape))  # (batch, T, encoder.feature_dim)
        if mask is not None:
            e = e * mask.unsqueeze(-1).to(e.dtype)
        if not self.config.mask_feature:
            return e
        flag = e.new_ones(e.shape[:2]) if mask is None else mask.to(e.dtype)  # (batch, T)
        return torch.cat([e, flag.unsqueeze(-1)], -1)  # (batch, T, encoder.feature_dim + 1)

    def posterior(self, z_prev: Optional[torch.Tensor], context: torch.Tensor):
        """q(z_t | z_{t-1}, RNN states at t) for ``z_prev (..., batch, z_dim)`` and ``context (batch, n,
        rnn_dim)`` (or every step at once: ``z_prev (..., batch, T, z_dim)``, ``context (batch, T, n,
        rnn_dim)``): the Normal's ``(loc, scale)``, each ``(..., batch, z_dim)``; with flows the
        distribution, batch ``(..., batch)``, event ``(z_dim,)``."""
        h = self.combiner.hidden(z_prev, context)  # (..., batch, rnn_dim)
        loc, scale = self.combiner.head(h)
        if not len(self.flows):
            return loc, scale
        base = dist.Normal(loc, scale).to_event(1)
        return FlowPosterior(base, [flow.condition(h) for flow in self.flows])

    def chain(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
              lengths: Optional[torch.Tensor] = None) -> PosteriorChain:
        """q(z_{1:T} | x): batch ``(batch,)``, event ``(T, z_dim)``, for the guide's arguments."""
        batch, steps = x.shape[:2]
        context = self.context(self.features(x, self.seen(x, mask)), lengths)  # (batch, T, n, rnn_dim)
        # One view per step, cut once: indexing context[:, t] at every step would make the backward pass
        # build a zero tensor of the whole context per step (quadratic in T; 70% of a JSB epoch).
        per_step = context.unbind(1)  # T x (batch, n, rnn_dim)

        def posterior(z_prev: Optional[torch.Tensor], t) -> dist.Distribution:
            return self.posterior(z_prev, context if isinstance(t, slice) else per_step[t])

        fused = None
        if self.config.fused_chain and self.z_0 is not None and not len(self.flows) and not torch.jit.is_tracing():
            summed = context.sum(-2)  # (batch, T, rnn_dim): the combiner reads the sum of the states

            def fused(lead: torch.Size):
                noise = torch.randn(lead + (steps, self.config.z_dim), dtype=summed.dtype, device=summed.device)
                return combiner_chain(summed, noise, self.z_0, self.combiner, context.shape[-2], lengths)

        return PosteriorChain(posterior, self.z_0, steps, self.config.z_dim, torch.Size((batch,)),
                              step_mask(lengths, steps), fused)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_input(x, mask, self.frame_shape, lengths)
        register("dmm_guide", self)
        chain = self.chain(x, mask, lengths)
        with pyro.plate("sequences", x.shape[0]):
            return sample_latent("z", chain, self.kl_weights)  # (..., batch, T, z_dim)
