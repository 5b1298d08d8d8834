"""Missing-frame imputation with a trained Kalman VAE (Fraccaro et al. 2017, sec. 5, Figure 3).

Pure functions of a model, a guide, frames ``x (batch, T, *frame_shape)`` and a frame mask
``mask (batch, T)`` (True = observed):

* :func:`impute`: the library's imputer (:class:`pyro_models.imputation.Imputation`): Kalman
  smoothing as the imputation, Kalman filtering as a second estimate, posterior-predictive draws
  as samples; observed frames are kept exactly.
* :func:`kalman_impute`: the lower-level estimates it uses.  The observed frames are encoded
  (a_t = mean of q(a_t | x_t)); a Kalman filter runs over a one step at a time with the dynamics
  network in the loop: alpha_t is fed the observed a_{t-1}, or at a missing step the one-step
  prediction C_{t-1} mu_{t-1|t-2} (as in the original code); then the RTS smoother over the
  parameters collected on the way.  O(T) in time.  Estimates: filtering a_t = C_t mu_{t|t},
  smoothing a_t = C_t mu_{t|T}, decoded to pixel probabilities.
* :func:`posterior_predictive`: joint draws of z from the smoothed posterior, a_t = C_t z_t + v_t,
  and frames from ``pyro.infer.Predictive`` of the model given those draws of ``a``.

Masks, error metrics and the trivial floors live in :mod:`pyro_models.imputation`; the mask and
floor helpers are re-exported here under their former names.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from pyro.infer import Predictive

from ..checks import check_frames
from .. import lgssm
from ..imputation import Imputation, check_lengths, frames_inside, check_mask, consecutive_frame_mask, expand_mask, random_frame_mask, zero_missing
from ..imputation import last_observed_frame as last_observed_floor
from ..imputation import majority_frame as static_floor
from ..modes import eval_mode

KALMAN_DTYPE = lgssm.DEFAULT_DTYPE  # Kalman moments are computed in float64 (see docs/lgssm.md)
DEFAULT_NUM_SAMPLES = 16
Pair = Tuple[torch.Tensor, torch.Tensor]

__all__ = ["KalmanImputation", "consecutive_frame_mask", "impute", "kalman_impute", "last_observed_floor",
           "posterior_predictive", "random_frame_mask", "static_floor"]


class KalmanImputation(NamedTuple):
    """Estimates for every step; only the missing steps are imputations."""

    filtered_a: torch.Tensor  # (batch, T, a_dim) C_t mu_{t|t}
    smoothed_a: torch.Tensor  # (batch, T, a_dim) C_t mu_{t|T}
    filtered: torch.Tensor  # (batch, T, *frame_shape) pixel probabilities decoded from filtered_a
    smoothed: torch.Tensor  # (batch, T, *frame_shape) pixel probabilities decoded from smoothed_a
    alpha: torch.Tensor  # (batch, T, K) mixture weights used
    params: lgssm.LGSSM  # the LGSSM (model dtype, float32) the estimates come from
    observed_a: torch.Tensor  # (batch, T, a_dim) encoder means (missing steps: unused)


def _apply(matrices: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    return (matrices @ vectors.unsqueeze(-1)).squeeze(-1)


def _kalman_cov(cov: torch.Tensor) -> torch.Tensor:
    """A covariance buffer ``(n, n)`` in the Kalman dtype, symmetrised as ``lgssm`` does."""
    cov = cov.to(KALMAN_DTYPE)
    return 0.5 * (cov + cov.transpose(-1, -2))


class _Step(NamedTuple):
    """What one filter step records (batch first; Kalman moments in float64)."""

    alpha: torch.Tensor  # (batch, K)
    trans_matrix: torch.Tensor  # (batch, Z, Z), model dtype
    obs_matrix: torch.Tensor  # (batch, a_dim, Z), model dtype
    pred_mean: torch.Tensor  # (batch, Z)        mu_{t|t-1}
    pred_cov: torch.Tensor  # (batch, Z, Z)
    mean: torch.Tensor  # (batch, Z)        mu_{t|t}
    cov: torch.Tensor  # (batch, Z, Z)
    log_increment: torch.Tensor  # (batch,)


def _filter_step(dynamics, noise: Pair, moments: Pair, alpha: torch.Tensor, first: bool, a_t: torch.Tensor,
                 observed_t: torch.Tensor) -> _Step:
    """Predict (unless ``first``) and condition on ``a_t (batch, a_dim)`` where ``observed_t (batch,)``;
    ``noise`` = ``(Q, R)`` and ``moments`` = ``(mu_{t-1|t-1}, Sigma_{t-1|t-1})`` in the Kalman dtype."""
    trans_matrix, obs_matrix = dynamics.matrices(alpha)  # (batch, Z, Z), (batch, a_dim, Z)
    (trans_cov, obs_cov), (mean, cov) = noise, moments
    if not first:
        mean, cov = lgssm.predict(mean, cov, trans_matrix.to(KALMAN_DTYPE), trans_cov)
    new_mean, new_cov, increment = lgssm.condition_on(
        mean, cov, obs_matrix.to(KALMAN_DTYPE), obs_cov, a_t.to(KALMAN_DTYPE), observed_t)
    return _Step(alpha, trans_matrix, obs_matrix, mean, cov, new_mean, new_cov, increment)


def _filter_with_dynamics(dynamics, observed_a: torch.Tensor, mask: torch.Tensor) -> _Step:
    """The Kalman filter over ``observed_a (batch, T, a_dim)``, one step at a time, with alpha_t from the
    dynamics LSTM fed a_{t-1}: the observed one, or at a missing step C_{t-1} mu_{t-1|t-2}.

    Returns a :class:`_Step` whose fields are stacked over time (dim 1)."""
    batch, num_steps = mask.shape
    noise = (_kalman_cov(dynamics.trans_cov), _kalman_cov(dynamics.obs_cov))
    moments = (dynamics.init_loc.to(KALMAN_DTYPE).expand(batch, -1),
               _kalman_cov(dynamics.init_cov).expand(batch, -1, -1))
    a_prev, state, steps = dynamics.a0.expand(batch, -1), None, []
    for t in range(num_steps):
        alpha, state = dynamics.alpha_step(a_prev, state)
        step = _filter_step(dynamics, noise, moments, alpha, t == 0, observed_a[:, t], mask[:, t])
        predicted_a = _apply(step.obs_matrix, step.pred_mean.to(observed_a.dtype))  # C_t mu_{t|t-1}
        a_prev = torch.where(mask[:, t, None], observed_a[:, t], predicted_a)
        moments = (step.mean, step.cov)
        steps.append(step)
    return _Step(*(torch.stack(field, dim=1) for field in zip(*steps)))


@torch.no_grad()
def kalman_impute(model, guide, x: torch.Tensor, mask: torch.Tensor,
                  lengths: Optional[torch.Tensor] = None) -> KalmanImputation:
    """Filtering and smoothing estimates of every frame of ``x (batch, T, *frame_shape)`` given its
    observed frames (``mask (batch, T)``, True = observed), in O(T): one filter step per frame, then
    the RTS smoother.  Runs in eval mode and restores the modules' modes."""
    check_mask(x, mask, frames=True)
    with eval_mode(model, guide):
        dynamics = model.dynamics
        observed_a = guide.posterior(zero_missing(x, mask), lengths).mean  # (batch, T, a_dim); missing steps unused
        steps = _filter_with_dynamics(dynamics, observed_a, mask)
        increments = steps.log_increment  # (batch, T)
        filtered = lgssm.FilterResult(steps.mean, steps.cov, steps.pred_mean, steps.pred_cov, increments,
                                      increments.sum(-1))
        smoothed = lgssm.rts_smooth(filtered, steps.trans_matrix.to(KALMAN_DTYPE), _kalman_cov(dynamics.trans_cov))
        params = lgssm.LGSSM(dynamics.init_loc, dynamics.init_cov, steps.trans_matrix, dynamics.trans_cov,
                             steps.obs_matrix, dynamics.obs_cov)
        filtered_a = _apply(steps.obs_matrix, filtered.means.to(observed_a.dtype))  # (batch, T, a_dim)
        smoothed_a = _apply(steps.obs_matrix, smoothed.means.to(observed_a.dtype))
        return KalmanImputation(filtered_a, smoothed_a, _decode(model, filtered_a), _decode(model, smoothed_a),
                                steps.alpha, params, observed_a)


def _decode(model, a: torch.Tensor) -> torch.Tensor:
    """Pixel probabilities ``(batch, T, *frame_shape)`` for ``a (batch, T, a_dim)``."""
    return torch.sigmoid(model.frame_logits(a))


@torch.no_grad()
def posterior_predictive(model, imputation: KalmanImputation, x: torch.Tensor, mask: torch.Tensor, num_samples: int,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Frames' pixel probabilities ``(num_samples, batch, T, *frame_shape)`` under joint posterior draws
    z ~ p(z | observed a), a_t = C_t z_t + v_t, through ``Predictive(model, posterior_samples={"a": ...})``."""
    params = imputation.params
    z = lgssm.sample_posterior(params, imputation.observed_a, mask, num_samples, generator=generator).to(x.dtype)
    # Drawn where the generator lives (a torch.Generator is per device), then moved to the data's device.
    noise = torch.randn(z.shape[:-1] + (params.obs_cov.shape[-1],), generator=generator, dtype=x.dtype,
                        device=generator.device if generator is not None else z.device).to(z.device)
    a = _apply(params.obs_matrix, z) + noise @ torch.linalg.cholesky(params.obs_cov).T  # (S, batch, T, a_dim)
    draws = Predictive(model, posterior_samples={"a": a}, return_sites=["x_mean"])(x, mask)
    return draws["x_mean"].reshape((num_samples,) + x.shape)


@torch.no_grad()
def impute(model, guide, x: torch.Tensor, mask: torch.Tensor, num_samples: int = DEFAULT_NUM_SAMPLES,
           generator: Optional[torch.Generator] = None, lengths: Optional[torch.Tensor] = None) -> Imputation:
    """Impute the missing frames of ``x (batch, T, *frame_shape)`` (``mask (batch, T)``, True = observed).

    Returns an :class:`~pyro_models.imputation.Imputation` whose tensors all hold the observed frames of
    ``x`` exactly: ``imputed`` ``x.shape`` = the Kalman-smoothing estimate; ``estimates`` =
    ``{"smoothing", "filtering"}`` (decoded pixel probabilities, each ``x.shape``); ``samples``
    ``(num_samples, *x.shape)`` = posterior-predictive draws (:func:`posterior_predictive`).  Runs in
    eval mode and restores the modules' modes. ``lengths (batch,)``: sequences of their own lengths; the
    steps past an end are neither read nor filled (returned as they are in ``x``).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
    check_frames(x, model.frame_shape)
    check_mask(x, mask, frames=True)
    untouched = mask
    if lengths is not None:
        check_lengths(lengths, x.shape[0], x.shape[1])
        inside = frames_inside(None, lengths, x.shape[1])
        mask, untouched = mask & inside, mask | ~inside  # past the end: not observed, and not filled either
    with eval_mode(model, guide):
        kalman = kalman_impute(model, guide, x, mask, lengths)
        draws = posterior_predictive(model, kalman, x, mask, num_samples, generator)
    shown = expand_mask(untouched, x)  # x.shape
    estimates = {"smoothing": torch.where(shown, x, kalman.smoothed),
                 "filtering": torch.where(shown, x, kalman.filtered)}
    return Imputation(mask, estimates["smoothing"], torch.where(shown, x, draws), estimates)
