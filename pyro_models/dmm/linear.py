"""The linear-Gaussian special case of the DMM and its exact inference by Kalman filtering.

With ``transition="linear"``, ``emission="linear"`` and ``likelihood="gaussian"`` the DMM is::

    z_t = A z_{t-1} + b + w_t,   w_t ~ N(0, diag s^2),   t = 1..T,   z_0 learned (a constant)
    x_t = C z_t + d + v_t,       v_t ~ N(0, diag r^2)                (x_t flattened to (D,))

Subtracting the prior means m_t = A m_{t-1} + b (m_0 = z_0) gives the offset-free LGSSM of
:mod:`pyro_models.lgssm` in u_t = z_t - m_t, a shift of unit Jacobian::

    u_1 ~ N(0, diag s^2),   u_t = A u_{t-1} + w_t
    y_t = x_t - (C m_t + d) = C u_t + v_t

so log p(x_observed) is ``log_marginal`` of y, and p(z | x_observed) is the LGSSM posterior of u shifted
by m. Everything here is float64 (the LGSSM's compute dtype).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from ..lgssm import LGSSM, log_marginal, sample_posterior
from .model import DMM
from .networks import LinearTransition

DTYPE = torch.float64


class LinearGaussianDMM(NamedTuple):
    """A linear-Gaussian DMM over T steps as an offset-free LGSSM: ``params`` (no batch dims),
    ``prior_means`` m_t ``(T, z_dim)`` and ``obs_offsets`` C m_t + d ``(T, D)``."""

    params: LGSSM
    prior_means: torch.Tensor
    obs_offsets: torch.Tensor


def check_linear_gaussian(model: DMM) -> None:
    """Raise ``ValueError`` unless ``model`` has the linear transition, a linear emission and the Gaussian
    likelihood."""
    linear = isinstance(model.transition, LinearTransition) and isinstance(model.emitter.net, nn.Linear)
    if not linear or model.emitter.likelihood != "gaussian":
        cfg = model.config
        raise ValueError(
            "model: expected transition='linear', emission='linear', likelihood='gaussian', got "
            f"{cfg.transition!r}, {cfg.emission!r}, {cfg.likelihood!r}"
        )


def as_lgssm(model: DMM, num_steps: int) -> LinearGaussianDMM:
    """The LGSSM of ``model`` over ``num_steps`` frames (see the module docstring), float64."""
    check_linear_gaussian(model)
    trans, emit = model.transition.linear, model.emitter.net
    a, b = trans.weight.to(DTYPE), trans.bias.to(DTYPE)  # (Z, Z), (Z,)
    c, d = emit.weight.to(DTYPE), emit.bias.to(DTYPE)  # (D, Z), (D,)
    trans_cov = torch.diag_embed(model.transition.log_scale.to(DTYPE).exp() ** 2)  # diag s^2
    obs_cov = torch.diag_embed(model.emitter.log_scale.to(DTYPE).exp().reshape(-1) ** 2)  # diag r^2, (D, D)
    means, m = [], model.z_0.to(DTYPE)
    for _ in range(num_steps):
        m = a @ m + b
        means.append(m)
    prior_means = torch.stack(means)  # (T, Z)
    params = LGSSM(torch.zeros_like(b), trans_cov, a.expand(num_steps, -1, -1), trans_cov,
                   c.expand(num_steps, -1, -1), obs_cov)
    return LinearGaussianDMM(params, prior_means, prior_means @ c.T + d)


def _centred_obs(system: LinearGaussianDMM, x: torch.Tensor) -> torch.Tensor:
    """y_t = x_t - (C m_t + d): ``(batch, T, D)`` for ``x (batch, T, *frame_shape)``."""
    return x.to(DTYPE).flatten(2) - system.obs_offsets  # (batch, T, *frame) -> (batch, T, D)


def exact_log_marginal(model: DMM, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log p(x_observed) ``(batch,)`` (float64) of a linear-Gaussian DMM for ``x (batch, T, *frame_shape)``
    and the frame mask ``mask (batch, T)`` (True = observed; ``None``: all)."""
    system = as_lgssm(model, x.shape[1])
    return log_marginal(system.params, _centred_obs(system, x), mask)


def sample_exact_posterior(model: DMM, x: torch.Tensor, mask: Optional[torch.Tensor] = None, num_samples: int = 1,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Joint draws z ~ p(z_{1:T} | x_observed) ``(num_samples, batch, T, z_dim)`` (float64) of a
    linear-Gaussian DMM (forward filtering, backward sampling)."""
    system = as_lgssm(model, x.shape[1])
    u = sample_posterior(system.params, _centred_obs(system, x), mask, num_samples, generator=generator)
    return u + system.prior_means
