"""Missing-frame imputation with a trained Kalman VAE (Fraccaro et al. 2017, sec. 5, Figure 3).

Pure functions of a model, a guide, frames ``x (batch, T, *frame_shape)`` and a frame mask
``mask (batch, T)`` (True = observed):

* :func:`kalman_impute`: the observed frames are encoded (a_t = mean of q(a_t | x_t)); a Kalman
  filter runs over a with the dynamics network in the loop: alpha_t is fed the observed a_{t-1}, or at a
  missing step the one-step prediction C_{t-1} mu_{t-1|t-2} (as in the original code); then the RTS
  smoother. Estimates: filtering a_t = C_t mu_{t|t}, smoothing a_t = C_t mu_{t|T}, decoded to pixel
  probabilities.
* :func:`posterior_predictive`: joint draws of z from the smoothed posterior, a_t = C_t z_t + v_t, and
  frames from ``pyro.infer.Predictive`` of the model given those draws of ``a``.
* Masks (:func:`random_frame_mask`, :func:`consecutive_frame_mask`), the error metric
  (:func:`hamming_error`) and the trivial floors (:func:`static_floor`, :func:`last_observed_floor`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from pyro.infer import Predictive

from . import lgssm


class KalmanImputation(NamedTuple):
    """Estimates for every step; only the missing steps are imputations."""

    filtered_a: torch.Tensor  # (batch, T, a_dim) C_t mu_{t|t}
    smoothed_a: torch.Tensor  # (batch, T, a_dim) C_t mu_{t|T}
    filtered: torch.Tensor  # (batch, T, *frame_shape) pixel probabilities decoded from filtered_a
    smoothed: torch.Tensor  # (batch, T, *frame_shape) pixel probabilities decoded from smoothed_a
    alpha: torch.Tensor  # (batch, T, K) mixture weights used
    params: lgssm.LGSSM  # the LGSSM (float32) the estimates come from
    observed_a: torch.Tensor  # (batch, T, a_dim) encoder means (missing steps: unused)


def check_frame_mask(x: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.shape != x.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor of shape {tuple(x.shape[:2])} (batch, T), got {mask.dtype} {tuple(mask.shape)}")


def _apply(matrices: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    return (matrices @ vectors.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def kalman_impute(model, guide, x: torch.Tensor, mask: torch.Tensor) -> KalmanImputation:
    """Filtering and smoothing estimates of every frame of ``x`` given its observed frames."""
    check_frame_mask(x, mask)
    model.eval(), guide.eval()
    dynamics = model.dynamics
    shown = torch.where(mask.reshape(mask.shape + (1,) * (x.dim() - 2)), x, torch.zeros_like(x))
    observed_a = guide.posterior(shown).mean  # (batch, T, a_dim); missing steps never used
    a_prev, state, alphas = dynamics.a0.expand(x.shape[0], -1), None, []
    for t in range(x.shape[1]):
        alpha, state = dynamics.alpha_step(a_prev, state)
        alphas.append(alpha)
        a_prev = observed_a[:, t]
        if not mask[:, t].all():  # the prediction C_t mu_{t|t-1} feeds the next alpha
            prefix = dynamics.lgssm(torch.stack(alphas, dim=1))
            prediction = lgssm.filter(prefix, observed_a[:, : t + 1], mask[:, : t + 1]).pred_means[:, t]
            predicted_a = _apply(prefix.obs_matrix[:, t], prediction.to(x.dtype))
            a_prev = torch.where(mask[:, t, None], a_prev, predicted_a)
    alpha = torch.stack(alphas, dim=1)  # (batch, T, K)
    params = dynamics.lgssm(alpha)
    filtered_a = _apply(params.obs_matrix, lgssm.filter(params, observed_a, mask).means.to(x.dtype))
    smoothed_a = _apply(params.obs_matrix, lgssm.smooth(params, observed_a, mask).means.to(x.dtype))
    decode = lambda a: torch.sigmoid(model.frame_logits(a))  # noqa: E731
    return KalmanImputation(filtered_a, smoothed_a, decode(filtered_a), decode(smoothed_a), alpha, params, observed_a)


@torch.no_grad()
def posterior_predictive(model, imputation: KalmanImputation, x: torch.Tensor, mask: torch.Tensor, num_samples: int,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Frames' pixel probabilities ``(num_samples, batch, T, *frame_shape)`` under joint posterior draws
    z ~ p(z | observed a), a_t = C_t z_t + v_t, through ``Predictive(model, posterior_samples={"a": ...})``."""
    params = imputation.params
    z = lgssm.sample_posterior(params, imputation.observed_a, mask, num_samples, generator=generator).to(x.dtype)
    noise = torch.randn(z.shape[:-1] + (params.obs_cov.shape[-1],), generator=generator, dtype=x.dtype)
    a = _apply(params.obs_matrix, z) + noise @ torch.linalg.cholesky(params.obs_cov).T  # (S, batch, T, a_dim)
    draws = Predictive(model, posterior_samples={"a": a}, return_sites=["x_mean"])(x, mask)
    return draws["x_mean"].reshape((num_samples,) + x.shape)


def random_frame_mask(batch: int, num_steps: int, drop_prob: float, num_given: int = 4,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The first ``num_given`` frames observed, each later frame missing with probability ``drop_prob``."""
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob: expected a probability in [0, 1], got {drop_prob}")
    mask = torch.rand(batch, num_steps, generator=generator) >= drop_prob
    mask[:, :num_given] = True
    return mask


def consecutive_frame_mask(batch: int, num_steps: int, num_missing: int, num_given: int = 4) -> torch.Tensor:
    """``num_missing`` frames missing right after the first ``num_given`` (the paper's planning masks)."""
    if num_given + num_missing > num_steps or num_missing < 0:
        raise ValueError(f"num_missing: expected 0 <= k <= T - {num_given} = {num_steps - num_given}, got {num_missing}")
    mask = torch.ones(batch, num_steps, dtype=torch.bool)
    mask[:, num_given : num_given + num_missing] = False
    return mask


def hamming_error(truth: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of wrongly predicted pixels, ``(truth > 0.5) != (prediction > 0.5)``, over missing frames."""
    missing = ~mask
    if not missing.any():
        return float("nan")
    wrong = (truth > 0.5) != (prediction > 0.5)  # (batch, T, *frame)
    return float(wrong[missing].float().mean())


def static_floor(train: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The pixel-wise majority frame of the training set (for bouncing balls: the walls only), as a
    prediction for every frame of ``like (batch, T, *frame)``."""
    mode = (train.float().mean(dim=(0, 1)) > 0.5).to(like.dtype)
    return mode.expand_as(like)


def last_observed_floor(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every missing frame predicted by the last observed frame before it (frame 0 must be observed)."""
    if not mask[:, 0].all():
        raise ValueError("mask: the first frame of every sequence must be observed for the last-frame floor")
    out = x.clone()
    for t in range(1, x.shape[1]):
        out[:, t] = torch.where(mask[:, t].reshape((-1,) + (1,) * (x.dim() - 2)), x[:, t], out[:, t - 1])
    return out
