"""The Kalman variational autoencoder (Fraccaro et al. 2017, "A disentangled recognition and nonlinear
dynamics model for unsupervised learning", arXiv 1710.05741).

Generative process (eqs. 1-5; no control input, so B is unused)::

    alpha_t = softmax(W LSTM(a_0, a_1, ..., a_{t-1}))        (batch, T, K); a_0 is learned
    A_t = sum_k alpha_t^(k) A^(k),  C_t = sum_k alpha_t^(k) C^(k)
    z_1 ~ N(0, init_cov);  z_t = A_t z_{t-1} + w_t,  w_t ~ N(0, Q)        (batch, T, state_dim)
    a_t = C_t z_t + v_t,  v_t ~ N(0, R)                                    (batch, T, a_dim)
    x_t | a_t ~ Bernoulli(decoder(a_t))                                    (batch, T, *frame_shape)

The model marginalises z exactly: the site ``a`` has the distribution :class:`KalmanPrior`, whose
``log_prob`` is log p(a) from the Kalman filter's parallel scan (:func:`pyro_models.lgssm.log_marginal`,
float64), so with the guide q(a | x) = prod_t N(a_t; mu(x_t), sigma^2(x_t)) the ELBO is eq. 7 with the
exact posterior of z. The reconstruction term is weighted by ``recon_weight`` in training mode only
(0.3 in the original recipe); evaluation always scores the true ELBO.

Sequences of different lengths (``lengths (batch,)``, the third argument of model and guides): the
steps past a sequence's end are missing frames after its last one, so their a_t is integrated out with z
and nothing is scored there; since nothing follows them, a ragged batch gives exactly the sum of what its
sequences give one at a time (the structured guide's backward GRU starts at each sequence's own end).

Model and guide share the signature ``(x, mask=None, lengths=None)`` with ``x (batch, T, *frame_shape)`` and
``mask (batch, T)`` (bool, True = frame observed): a missing frame adds no likelihood (the latent
``x_units_unobserved`` of ``obs_mask`` is hidden), and its a_t is integrated out with z in the prior
(:class:`KalmanPrior` with the mask) and left out of the guide's log q, so the ELBO is that of the
observed frames, with the missing steps marginalised exactly as imputation treats them: how the KVAE
trains on sequences with gaps. The frames' means are recorded as ``x_mean``.
"""
from __future__ import annotations
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import TorchDistribution
from torch import nn
from torch.distributions import constraints

from ..checks import check_frames
from ..params import register
from ..distributions import GreyBernoulli, observe
from ..imputation import check_lengths, frames_inside
from ..kl_weights import KLWeights, sample_latent
from ..lgssm import LGSSM, log_marginal
from ..networks import per_frame
from .config import KVAEConfig
from .networks import ConvFrameDecoder, MLPFrameDecoder


class KalmanDynamics(nn.Module):
    """The linear-Gaussian state-space model over a, with the dynamics parameter network:
    p(z_t | z_{t-1}) = N(A_t z_{t-1}, Q), p(a_t | z_t) = N(C_t z_t, R), (A_t, C_t) mixed from K bases
    with alpha_t = softmax(W LSTM(a_{0:t-1})) (eqs. 1, 3, 5). Q, R and Cov(z_1) are fixed buffers."""

    def __init__(self, config: KVAEConfig):
        super().__init__()
        k, z, a = config.num_bases, config.state_dim, config.a_dim
        self.a0 = nn.Parameter(torch.zeros(a))
        self.lstm = nn.LSTM(a, config.lstm_hidden, batch_first=True)
        self.alpha_head = nn.Linear(config.lstm_hidden, k)
        self.trans_bases = nn.Parameter(torch.eye(z).expand(k, z, z).clone())  # A^(k) = I
        self.obs_bases = nn.Parameter(config.init_obs_scale * torch.randn(k, a, z))
        self.register_buffer("trans_cov", config.trans_noise * torch.eye(z))
        self.register_buffer("obs_cov", config.obs_noise * torch.eye(a))
        self.register_buffer("init_cov", config.init_cov * torch.eye(z))
        self.register_buffer("init_loc", torch.zeros(z))

    def alpha(self, a: torch.Tensor) -> torch.Tensor:
        """Mixture weights ``(batch, T, K)`` for ``a (batch, T, a_dim)``: alpha_t sees a_0 ... a_{t-1}."""
        inputs = torch.cat([self.a0.expand(a.shape[0], 1, -1), a[:, :-1]], dim=1)  # (batch, T, a_dim)
        hidden, _ = self.lstm(inputs)
        return torch.softmax(self.alpha_head(hidden), dim=-1)

    def alpha_step(self, a_prev: torch.Tensor, state=None):
        """One step of the dynamics network: ``a_prev (batch, a_dim)`` -> ``alpha (batch, K)``, state."""
        hidden, state = self.lstm(a_prev.unsqueeze(1), state)
        return torch.softmax(self.alpha_head(hidden[:, 0]), dim=-1), state

    def matrices(self, alpha: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``A_t (..., Z, Z)`` and ``C_t (..., a_dim, Z)`` for weights ``alpha (..., K)``."""
        return (torch.einsum("...k,kij->...ij", alpha, self.trans_bases),
                torch.einsum("...k,kij->...ij", alpha, self.obs_bases))

    def lgssm(self, alpha: torch.Tensor) -> LGSSM:
        """The LGSSM of weights ``alpha (batch, T, K)`` (``trans_matrix[:, 0]`` is unused)."""
        trans, obs = self.matrices(alpha)
        return LGSSM(self.init_loc, self.init_cov, trans, self.trans_cov, obs, self.obs_cov)


class KalmanPrior(TorchDistribution):
    """p(a_{1:T}) = integral of prod_t p(a_t | z_t) p(z_t | z_{t-1}) dz, with the dynamics read from a's
    own past (alpha_t depends on a_{<t}); batch ``batch_shape``, event ``(T, a_dim)``.

    ``log_prob`` is exact (Kalman marginalisation by a parallel scan, float64); ``sample`` draws
    ancestrally (z, then a, step by step). With ``mask (*batch_shape, T)`` (True = step observed) it is
    ``log p(a_observed)``: the a_t of missing steps are integrated out with z (the LGSSM's own masked
    marginal), and read only as the inputs of the mixture weights alpha."""

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = False

    def __init__(self, dynamics: KalmanDynamics, batch_shape, num_steps: int, a_dim: int,
                 mask: Optional[torch.Tensor] = None):
        self.dynamics, self.mask = dynamics, mask
        super().__init__(torch.Size(batch_shape), torch.Size((num_steps, a_dim)), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        mask = None if self.mask is None else self.mask.expand(tuple(batch_shape) + self.event_shape[:1])
        return KalmanPrior(self.dynamics, batch_shape, *self.event_shape, mask=mask)

    def log_prob(self, a: torch.Tensor) -> torch.Tensor:
        flat = a.reshape((-1,) + a.shape[-2:])  # (n, T, a_dim)
        mask = None if self.mask is None else self.mask.expand(a.shape[:-1]).reshape(flat.shape[:2])  # (n, T)
        value = log_marginal(self.dynamics.lgssm(self.dynamics.alpha(flat)), flat, mask, validate_args=False)
        return value.to(a.dtype).reshape(a.shape[:-2])

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape
        a = generate_latents(self.dynamics, int(shape.numel()), self.event_shape[0]).a
        return a.reshape(shape + self.event_shape)


class Latents(NamedTuple):
    """A draw from the prior: ``a (batch, T, a_dim)``, ``z (batch, T, state_dim)``, ``alpha (batch, T, K)``."""

    a: torch.Tensor
    z: torch.Tensor
    alpha: torch.Tensor


def generate_latents(dynamics: KalmanDynamics, batch_size: int, num_steps: int) -> Latents:
    """Ancestral sampling of (z, a) from the prior, one step at a time (the LSTM needs each a_t)."""
    z_dist = torch.distributions.MultivariateNormal
    a_prev, state = dynamics.a0.expand(batch_size, -1), None
    z = z_dist(dynamics.init_loc, dynamics.init_cov).sample((batch_size,))
    outputs = []
    for t in range(num_steps):
        alpha, state = dynamics.alpha_step(a_prev, state)
        trans, obs = dynamics.matrices(alpha)
        if t > 0:
            z = z_dist((trans @ z.unsqueeze(-1)).squeeze(-1), dynamics.trans_cov).sample()
        a_prev = z_dist((obs @ z.unsqueeze(-1)).squeeze(-1), dynamics.obs_cov).sample()
        outputs.append((a_prev, z, alpha))
    a, z, alpha = (torch.stack(v, dim=1) for v in zip(*outputs))
    return Latents(a, z, alpha)


# ------------------------------------------------------------------------------------ model, guide
class KVAE(nn.Module):
    """The model p(x, a) = p(a) prod_t p(x_t | a_t), z marginalised exactly (see the module docstring)."""

    def __init__(self, frame_shape: Sequence[int], config: KVAEConfig):
        super().__init__()
        self.frame_shape, self.config = tuple(frame_shape), config
        self.decoder = (ConvFrameDecoder if len(frame_shape) == 3 else MLPFrameDecoder)(frame_shape, config)
        self.dynamics = KalmanDynamics(config)
        self.kl_weights = KLWeights(config.a_dim)  # beta of an optional KL warm-up (training mode only)

    def check_input(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    lengths: Optional[torch.Tensor] = None) -> None:
        check_frames(x, self.frame_shape)
        if mask is not None and mask.shape != x.shape[:2]:
            raise ValueError(f"mask: expected shape {tuple(x.shape[:2])} (batch, T), got {tuple(mask.shape)}")
        if lengths is not None:
            check_lengths(lengths, x.shape[0], x.shape[1])

    def frame_logits(self, a: torch.Tensor) -> torch.Tensor:
        """Decoder logits ``(..., T, *frame_shape)`` for ``a (..., T, a_dim)``."""
        return per_frame(self.decoder, a, 1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.check_input(x, mask, lengths)
        register("kvae", self)
        batch, steps = x.shape[:2]
        mask = frames_inside(mask, lengths, steps)  # a step past a sequence's end is a missing frame at its end
        with pyro.plate("sequences", batch):
            prior = KalmanPrior(self.dynamics, (batch,), steps, self.config.a_dim, mask=mask)
            a = sample_latent("a", prior, self.kl_weights)
            logits = self.frame_logits(a)  # (batch, T, *frame_shape)
            if mask is not None:
                pyro.deterministic("x_mean", torch.sigmoid(logits), event_dim=len(self.frame_shape) + 1)
            weight = self.config.recon_weight if self.training else 1.0
            with poutine.scale(scale=weight):
                return observe("x", GreyBernoulli(logits=logits, validate_args=False), x, mask,
                               len(self.frame_shape) + 1, "frames", hide_missing=True)


def generate(model: KVAE, batch_size: int, num_steps: int) -> torch.Tensor:
    """A Pyro program sampling sequences from the prior, one step at a time under ``pyro.markov``:
    z_t | z_{t-1}, a_t | z_t and x_t | a_t are sample sites ``z_t``, ``a_t``, ``x_t`` (t from 1).
    Returns the frames' Bernoulli means ``(batch, T, *frame_shape)``."""
    dynamics = model.dynamics
    a_prev, state, z, means = dynamics.a0.expand(batch_size, -1), None, None, []
    with pyro.plate("sequences", batch_size):
        for t in pyro.markov(range(num_steps)):
            alpha, state = dynamics.alpha_step(a_prev, state)
            trans, obs = dynamics.matrices(alpha)
            z_loc = dynamics.init_loc.expand(batch_size, -1) if z is None else (trans @ z.unsqueeze(-1)).squeeze(-1)
            z_cov = dynamics.init_cov if z is None else dynamics.trans_cov
            z = pyro.sample(f"z_{t + 1}", dist.MultivariateNormal(z_loc, z_cov))
            a_prev = pyro.sample(f"a_{t + 1}", dist.MultivariateNormal((obs @ z.unsqueeze(-1)).squeeze(-1), dynamics.obs_cov))
            logits = model.decoder(a_prev)
            means.append(torch.sigmoid(logits))
            pyro.sample(f"x_{t + 1}", dist.Bernoulli(logits=logits).to_event(len(model.frame_shape)))
    return torch.stack(means, dim=1)
