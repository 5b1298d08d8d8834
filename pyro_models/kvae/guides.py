"""Guides of the Kalman VAE, each with the model's signature ``(x, mask=None, lengths=None)``. A missing frame (``mask``
False) is never read: it is zeroed before the encoder, and its a_t, drawn all the same (the mixture
weights read it), is left out of log q, as the model leaves it out of log p (integrated out with z)."""
from __future__ import annotations

from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..params import register
from ..imputation import zero_missing
from ..kl_weights import KLWeights, sample_latent
from ..networks import per_frame
from .config import KVAEConfig
from ..imputation import frames_inside
from .networks import ConvFrameEncoder, MLPFrameEncoder


class KVAEGuide(nn.Module):
    """The guide q(a | x) = prod_t N(a_t; mu(x_t), diag sigma^2(x_t)) (the recognition model, eq. 6)."""

    def __init__(self, frame_shape: Sequence[int], config: KVAEConfig, kl_weights: Optional[KLWeights] = None):
        super().__init__()
        self.frame_dims = len(frame_shape)
        self.encoder = (ConvFrameEncoder if len(frame_shape) == 3 else MLPFrameEncoder)(frame_shape, config)
        self.kl_weights = kl_weights if kl_weights is not None else KLWeights(config.a_dim)

    def posterior(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> dist.Distribution:
        """q(a | x): batch ``(batch,)``, event ``(T, a_dim)`` (``lengths``: read by the structured guide)."""
        loc, scale = per_frame(self.encoder, x, self.frame_dims)
        return dist.Normal(loc, scale).to_event(2)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        register("kvae_guide", self)
        mask = frames_inside(mask, lengths, x.shape[1])  # past a sequence's end: as a missing frame
        if mask is not None:
            x = zero_missing(x, mask)  # missing frames are never read
        posterior = self.posterior(x, lengths)
        if mask is not None:  # log q of the observed steps only
            posterior = posterior.base_dist.mask(mask.unsqueeze(-1)).to_event(2)
        with pyro.plate("sequences", x.shape[0]):
            return sample_latent("a", posterior, self.kl_weights)


class TemporalContext(nn.Module):
    """The network of the structured guide's correction to q(a_t | x_t): a bidirectional GRU over the frame
    features ``h (batch, T, F)`` and a dense layer from its states to a shift of the mean of a_t
    ``(batch, T, a_dim)``. The dense layer starts at zero, so the structured guide starts as the
    factorised one (and the KVAE warm start, which shapes the frame encoder, applies unchanged).

    Its initial weights are drawn from a fork of the global random stream (``torch.random.fork_rng``), so
    building it leaves that stream where it was: with the same seed, a run with the structured guide
    starts from exactly the factorised run's networks, batches and noise (common random numbers), and
    the two differ only by what the correction learns."""

    def __init__(self, features: int, config: KVAEConfig):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # the global stream is restored on exit (see above)
            self._build(features, config)

    def _build(self, features: int, config: KVAEConfig) -> None:
        self.rnn = nn.GRU(features, config.context_hidden, batch_first=True, bidirectional=True)
        self.shift = nn.Linear(2 * config.context_hidden, config.a_dim)
        nn.init.zeros_(self.shift.weight)
        nn.init.zeros_(self.shift.bias)

    def forward(self, h: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        if lengths is None:
            states, _ = self.rnn(h)  # (batch, T, 2 * context_hidden): x_{1:t} forwards, x_{t:T} backwards
            return self.shift(states)
        # each sequence on its own steps: the backward direction starts at its own last frame
        packed = pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False)
        states, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=h.shape[1])
        return self.shift(states)


class StructuredKVAEGuide(KVAEGuide):
    """The guide q(a | x) = prod_t N(a_t; mu(x_t) + delta_t(x_{1:T}), diag sigma^2(x_t)): each a_t sees the
    whole sequence through :class:`TemporalContext` (a bidirectional GRU over the frame features), so
    the posterior mean can use the frames around a noisy or ambiguous one; the variance stays the
    frame's own (capped below R, as the factorised guide's)."""

    def __init__(self, frame_shape: Sequence[int], config: KVAEConfig, kl_weights: Optional[KLWeights] = None):
        super().__init__(frame_shape, config, kl_weights)
        self.context = TemporalContext(self.encoder.head.loc.in_features, config)

    def posterior(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> dist.Distribution:
        """q(a | x): batch ``(batch,)``, event ``(T, a_dim)``; ``lengths (batch,)``: the GRU reads each
        sequence's own steps."""
        h = per_frame(self.encoder.body, x, self.frame_dims)  # (batch, T, features)
        loc, scale = self.encoder.head(h)  # each (batch, T, a_dim)
        return dist.Normal(loc + self.context(h, lengths), scale).to_event(2)
