"""The hierarchical recurrent state-space model (HRSSM) of Variational Temporal Abstraction (Kim, Ahn,
Bengio, NeurIPS 2019, arXiv 1910.00775), in Pyro, following the official code (taesupkim/vta) where the
paper leaves a detail open.

Equations are cited by the paper's headings (section 3): "Generative process", "Prior on temporal
structure", "Hierarchical transitions", "Observation transition" and, for inference, "Sequence
decomposition", "State inference", "Observation abstraction predictor".

Generative process (paper: "Generative process"), for frames t = 1..T::

    c_1 = 0,  z_1 ~ N(mu_z(c_1), sigma_z(c_1)),  h_1 = W_a [c_1, z_1]                          (INIT)
    for t > 1:
      m_{t-1} = 0 (COPY):    c_t = c_{t-1},  z_t = z_{t-1},  h_t = GRU_s([s_{t-1}, a_t], h_{t-1})
      m_{t-1} = 1 (UPDATE):  c_t = GRU_z(z_{t-1}, c_{t-1}),  z_t ~ N(mu_z(c_t), sigma_z(c_t)),
                             h_t = a_t                                                     (INIT)
      where a_t = W_a [c_t, z_t]                         (the abstract feature)
    s_t ~ N(mu_s(h_t), sigma_s(h_t)),  f_t = W_f [h_t, s_t]
    x_t ~ N(sigmoid(decoder(f_t)), obs_scale^2 I)        (Gaussian, fixed standard deviation; the paper's)
      or Bernoulli(sigmoid(decoder(f_t)))                  (likelihood="bernoulli": binary frames)
    m_t ~ Bern(sigmoid(w_m . f_t + b_m)), t < T,  with the hard constraints below

``m_t = 1`` marks a boundary after frame t: frame t + 1 starts a new segment ("READ" in the official
code). Shapes: frames ``x (batch, T, *frame_shape)`` with ``frame_shape`` ``(C, H, W)`` (conv encoder and
decoder) or ``(D,)`` (MLPs); ``c_t (batch, abstract_belief_size)``, ``z_t (batch, abstract_state_size)``,
``h_t (batch, observation_belief_size)``, ``s_t (batch, observation_state_size)``.

Hard constraints (paper: "Prior on temporal structure", made always satisfiable, see
:class:`SegmentCounter`): with ``n`` segments so far and the current one ``l`` frames long, ``m_t = 1``
is forced once ``l >= max_length`` (l_max) and ``m_t = 0`` once ``n >= max_segments`` (N_max) or when a
boundary now would leave more frames than the remaining ``N_max - n`` segments can hold. They act on the
prior and on the guide, so every sample of either has at most N_max segments of at most l_max frames.
Forced steps are deterministic in both, so their boundary site is masked out (no KL).

Inference (paper: "Learning and inference"): q(M, Z, S | X) = q(M | X) q(Z | M, X) q(S | Z, M, X) with
per-frame CNN (or MLP) features e_t shared by the three factors:

* q(m_t | X): a non-causal Conv1d stack over (e_1..e_T) gives one logit per frame; the boundary is drawn
  from ``LogitRelaxedBernoulliStraightThrough(temperature, logits)`` (hard 0/1 forward, gradient of the relaxed
  sample backward; the two-class Gumbel-softmax of the official code). Constraints as above.
* q(z_t | M, X) = N(. | psi^fwd_{t-1}, psi^bwd_t): a forward GRU over e (never reset) and a backward GRU
  reset at segment starts (it sees the current segment only). Used at UPDATE steps only.
* q(s_t | z_t, M, X) = N(. | phi^fwd_t, z_t): a forward GRU over e reset at segment starts.

ELBO sites: ``m_t`` (t = 1..T-1), ``z_t``, ``s_t`` (t = 1..T) and the observed ``x`` (all frames, event
``(T, *frame_shape)``), inside one ``pyro.plate("sequences", batch)``, time under ``pyro.markov``. The
``z_t`` site is masked (``poutine.mask``) at COPY steps in model and guide, so COPY adds no KL; with
``TraceMeanField_ELBO`` the z and s KLs are analytic, the boundary KL is the one-sample estimate
``log q(y_t) - log p(y_t)`` of the relaxed sample's logit y_t (as the official code, which scores the
log-space sample; Pyro's ``RelaxedBernoulliStraightThrough`` would score the clamped sigmoid(y_t),
biased below temperature ~0.3). Model and guide share the
signature ``(x, mask=None)``. ``mask (batch, T)`` bool marks observed frames: a missing frame adds no
likelihood term (model) and is read as the feature e_t = 0 by every posterior factor (guide), so its
content is never seen; :func:`impute_frames` draws it from the posterior predictive.

``observation_reset=False`` (not the paper's model) keeps the observation level running across
boundaries: h_t = GRU_s([s_{t-1}, a_t], h_{t-1}) at every t > 1 (an UPDATE changes a_t, not h's history),
and the guide's phi is not reset at segment starts. A boundary then costs the KL of the new z_t only,
not a re-encoding of the observation state (see docs/hrssm.md, "What trains the boundaries").

``boundaries=False`` gives the plain RSSM baseline with the same networks: every step is an UPDATE (no
boundary sites, no boundary networks, no observation-level GRU).
"""
from __future__ import annotations

import contextlib
from typing import List, NamedTuple, Optional, Sequence, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from ..params import register
from ..imputation import frames_inside
from ..networks import per_frame
from .boundaries import SegmentCounter, sample_boundary, update_site
from .config import BoundaryTemperature, HRSSMConfig, check_input
from .networks import AbstractTransition, BoundaryPrior, ObservationTransition, StateFeature, _frame_network


class HRSSMStates(NamedTuple):
    """The model's states along a sequence (values of one draw): ``starts (batch, T)`` (1: frame t starts
    a segment), ``c (batch, T, C)``, ``z (batch, T, Z)``, ``h (batch, T, H)``, ``s (batch, T, S)``, state
    features ``f (batch, T, F)``."""

    starts: torch.Tensor
    c: torch.Tensor
    z: torch.Tensor
    h: torch.Tensor
    s: torch.Tensor
    f: torch.Tensor


class _KLScaled:
    """Mixin: ``poutine.scale`` by a KL weight, in training mode only (evaluation scores the true ELBO);
    weight 0 masks the site's log densities out (``poutine.scale`` needs a positive scale)."""

    def _kl_scale(self, weight: float):
        if not self.training or weight == 1.0:
            return contextlib.nullcontext()
        return poutine.scale(scale=weight) if weight > 0 else poutine.mask(mask=False)


def step_mask(inside: Optional[torch.Tensor], t: int):
    """The context of step ``t``'s sites: masked to the sequences still running (``inside (batch, T)``)."""
    return contextlib.nullcontext() if inside is None else poutine.mask(mask=inside[:, t])


class HRSSM(_KLScaled, nn.Module):
    """The model p(X, Z, S, M) = prod_t p(x_t | s_t) p(m_t | s_t) p(s_t | s_{<t}, z_t, m_{<t})
    p(z_t | z_{<t}, m_{<t}) (paper: "Generative process"; see the module docstring).
    ``forward(x, mask=None)`` returns :class:`HRSSMStates`."""

    def __init__(self, frame_shape: Sequence[int], config: HRSSMConfig, temperature: BoundaryTemperature):
        super().__init__()
        self.frame_shape, self.config, self.temperature = tuple(frame_shape), config, temperature
        self.abstract = AbstractTransition(config)
        self.observation = ObservationTransition(config, recurrent=config.boundaries)
        self.state_feature = StateFeature(config)
        self.decoder = _frame_network("decoder", self.frame_shape, config)
        self.boundary_prior = BoundaryPrior(config) if config.boundaries else None

    def frame_mean(self, f: torch.Tensor) -> torch.Tensor:
        """E[x_t | s_t] ``(batch, T, *frame_shape)`` for state features ``f (batch, T, F)`` (the Gaussian's
        mean, or the Bernoulli's probabilities)."""
        return torch.sigmoid(per_frame(self.decoder, f, 1))

    def observation_dist(self, f: torch.Tensor, mask: Optional[torch.Tensor] = None) -> dist.Distribution:
        """p(x | S): batch ``(batch,)``, event ``(T, *frame_shape)``; frames where ``mask (batch, T)`` is
        False add nothing to the log density. Gaussian with std ``obs_scale`` (the paper's) or Bernoulli
        (``config.likelihood``)."""
        if self.config.likelihood == "bernoulli":
            pixels = dist.Bernoulli(logits=per_frame(self.decoder, f, 1), validate_args=False)
        else:
            pixels = dist.Normal(self.frame_mean(f), self.config.obs_scale)
        frames = pixels.to_event(len(self.frame_shape))  # batch (batch, T)
        return (frames if mask is None else frames.mask(mask)).to_event(1)

    def latents(self, batch_size: int, num_steps: int, like: torch.Tensor,
                lengths: Optional[torch.Tensor] = None) -> HRSSMStates:
        """The latent process: sites ``z_t``, ``s_t`` (t = 1..T) and ``m_t`` (t < T) in time order, under
        ``pyro.markov``; must run inside the ``sequences`` plate. ``like``: dtype and device."""
        cfg = self.config
        c = like.new_zeros(batch_size, cfg.abstract_belief_size)
        read = like.new_ones(batch_size)  # frame 1 starts a segment
        free = self.temperature.free_tensor(like)
        counter = SegmentCounter(batch_size, num_steps, cfg, like.device, free, lengths) if cfg.boundaries else None
        inside = frames_inside(None, lengths, num_steps)  # (batch, T) or None: past an end, no z_t or s_t density
        temperature = self.temperature.tensor(like)
        z = h = s = None
        trajectory: List[Tuple[torch.Tensor, ...]] = []
        for t in pyro.markov(range(num_steps)):
            gate = read.unsqueeze(-1)  # hard 0/1 forward, straight-through gradient backward
            if t > 0:  # UPDATE: new belief; COPY: keep it
                c = gate * self.abstract.belief(z, c) + (1.0 - gate) * c
            loc, scale = self.abstract(c)
            with self._kl_scale(cfg.kl_weight_abstract), update_site(read, cfg.update_kl_gradient), step_mask(inside, t):
                z_new = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))
            z = z_new if t == 0 else gate * z_new + (1.0 - gate) * z  # COPY: exactly z_{t-1}
            a = self.observation.init(c, z)
            if t == 0 or self.observation.cell is None:  # INIT (the RSSM baseline always is)
                h = a
            elif cfg.observation_reset:  # INIT at a segment's start, else the observation-level GRU
                h = gate * a + (1.0 - gate) * self.observation.update(s, a, h)
            else:  # observation_reset=False: the GRU at every step, reading the new a_t after an UPDATE
                h = self.observation.update(s, a, h)
            loc, scale = self.observation(h)
            with self._kl_scale(cfg.kl_weight_observation), step_mask(inside, t):
                s = pyro.sample(f"s_{t + 1}", dist.Normal(loc, scale).to_event(1))
            f = self.state_feature(h, s)
            trajectory.append((read, c, z, h, s, f))
            if counter is not None and t + 1 < num_steps:
                with self._kl_scale(cfg.kl_weight_boundary):
                    read = sample_boundary(f"m_{t + 1}", self.boundary_prior(f), temperature, counter, t)
        return HRSSMStates(*(torch.stack(values, dim=1) for values in zip(*trajectory)))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                lengths: Optional[torch.Tensor] = None) -> HRSSMStates:
        check_input(x, mask, self.frame_shape, self.config, lengths)
        register("hrssm", self)
        batch, steps = x.shape[:2]
        with pyro.plate("sequences", batch):
            states = self.latents(batch, steps, x, lengths)
            pyro.sample("x", self.observation_dist(states.f, frames_inside(mask, lengths, steps)), obs=x)
        return states


def generate(model: HRSSM, batch_size: int, num_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A Pyro program sampling from the prior (sites ``z_t``, ``s_t``, ``m_t``, ``x``). Returns the frame
    means ``(batch, T, *frame_shape)`` and the segment starts ``(batch, T)``."""
    like = next(model.parameters())
    if batch_size < 1 or num_steps < 1 or (model.config.boundaries and num_steps > model.config.max_steps):
        raise ValueError(
            f"generate: expected batch_size >= 1 and 1 <= num_steps <= {model.config.max_steps or 'any'}, "
            f"got {batch_size}, {num_steps}"
        )
    with pyro.plate("sequences", batch_size):
        states = model.latents(batch_size, num_steps, like)
        pyro.sample("x", model.observation_dist(states.f))
    return model.frame_mean(states.f), states.starts
