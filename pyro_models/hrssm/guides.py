"""Guides of the HRSSM, each with the model's signature ``(x, mask=None, lengths=None)``: past a sequence's
end (``lengths (batch,)``) no site has a density, the frames' features are 0, the boundary posterior's
convolutions see zeros there at every layer (as a sequence alone sees its padding) and the backward GRU
starts at each sequence's own last frame."""
from __future__ import annotations

from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..params import register
from ..imputation import frames_inside, zero_missing
from ..networks import per_frame
from .boundaries import SegmentCounter, sample_boundary, update_site
from .config import BoundaryTemperature, HRSSMConfig, check_input
from .model import _KLScaled, step_mask
from .networks import AbstractPosterior, BoundaryPosterior, ObservationPosterior, _frame_network


class HRSSMGuide(_KLScaled, nn.Module):
    """The guide q(M, Z, S | X) = q(M | X) q(Z | M, X) q(S | Z, M, X) (paper: "Learning and inference";
    see the module docstring). ``forward(x, mask=None)`` returns the segment starts ``(batch, T)`` it drew."""

    def __init__(self, frame_shape: Sequence[int], config: HRSSMConfig, temperature: BoundaryTemperature):
        super().__init__()
        self.frame_shape, self.config, self.temperature = tuple(frame_shape), config, temperature
        self.encoder = _frame_network("encoder", self.frame_shape, config)
        # observation_colour False: q(S | Z, M, X)'s own encoder of the frames' channel maximum (1, H, W)
        self.observation_encoder = (None if config.observation_colour else
                                    _frame_network("encoder", (1, *self.frame_shape[1:]), config))
        self.boundary_posterior = BoundaryPosterior(config) if config.boundaries else None
        self.abstract_posterior = AbstractPosterior(config)
        self.observation_posterior = ObservationPosterior(config)

    def features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, encoder: Optional[nn.Module] = None) -> torch.Tensor:
        """Frame features e ``(batch, T, feature_size)`` of ``x (batch, T, *frame_shape)`` by ``encoder``
        (default: the shared one); 0 at frames where ``mask (batch, T)`` is False (missing). Missing frames
        are zeroed before the encoder too, so that in training mode their content cannot reach the
        observed frames' features through batch statistics."""
        encoder = self.encoder if encoder is None else encoder
        if mask is None:
            return per_frame(encoder, x, len(self.frame_shape))
        e = per_frame(encoder, zero_missing(x, mask), len(self.frame_shape))
        return e * mask.unsqueeze(-1).to(e.dtype)

    def observation_features(self, x: torch.Tensor, e: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What q(S | Z, M, X) reads ``(batch, T, feature_size)``: the shared features ``e``, or with
        ``observation_colour`` False those of each frame's channel maximum ``(batch, T, 1, H, W)``."""
        if self.observation_encoder is None:
            return e
        shapes = x.amax(dim=-3, keepdim=True)  # (batch, T, 1, H, W): the frame without its colours
        return self.features(shapes, mask, self.observation_encoder)

    def boundary_logits(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``(batch, T)`` of q(frame t starts a segment | X) before the constraints (column 0 unused)."""
        if self.boundary_posterior is None:
            raise ValueError("boundary_logits: this guide was built with boundaries=False")
        return self.boundary_posterior(self.features(x, mask))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_input(x, mask, self.frame_shape, self.config, lengths)
        register("hrssm_guide", self)
        cfg = self.config
        batch, steps = x.shape[:2]
        inside = frames_inside(None, lengths, steps)  # (batch, T) or None
        seen = frames_inside(mask, lengths, steps)
        e = self.features(x, seen)  # 0 past an end, as at a missing frame
        with pyro.plate("sequences", batch):
            starts = [x.new_ones(batch)]
            if self.boundary_posterior is not None and steps > 1:
                logits = self.boundary_posterior(e, inside)
                free = self.temperature.free_tensor(x)
                counter = SegmentCounter(batch, steps, cfg, x.device, free, lengths)
                temperature = self.temperature.tensor(x)
                for t in pyro.markov(range(steps - 1)):
                    with self._kl_scale(cfg.kl_weight_boundary):
                        starts.append(sample_boundary(f"m_{t + 1}", logits[:, t + 1], temperature, counter, t))
            else:
                starts = starts * steps
            starts = torch.stack(starts, dim=1)  # (batch, T), the gates, not the site values
            psi = self.abstract_posterior.features(e, starts, inside)
            phi = self.observation_posterior.features(self.observation_features(x, e, seen),
                                                      starts if cfg.observation_reset else torch.zeros_like(starts))
            z = None
            for t in pyro.markov(range(steps)):
                read = starts[:, t]
                gate = read.unsqueeze(-1)
                loc, scale = self.abstract_posterior(psi[:, t])
                with self._kl_scale(cfg.kl_weight_abstract), update_site(read, cfg.update_kl_gradient), step_mask(inside, t):
                    z_new = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))
                z = z_new if t == 0 else gate * z_new + (1.0 - gate) * z
                loc, scale = self.observation_posterior(phi[:, t], z)
                with self._kl_scale(cfg.kl_weight_observation), step_mask(inside, t):
                    pyro.sample(f"s_{t + 1}", dist.Normal(loc, scale).to_event(1))
        return starts
