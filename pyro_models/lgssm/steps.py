"""Sequential Kalman filtering and Rauch-Tung-Striebel smoothing, one step at a time.

The one-step functions are pure and batched over leading dims ``...`` (which broadcast
against each other).  They neither validate nor cast: call them in float64 (the library's
compute dtype) unless the covariances are well conditioned.

* :func:`predict`: ``p(z_{t-1} | a_{<t}) -> p(z_t | a_{<t})``.
* :func:`condition_on`: ``p(z_t | a_{<t}) -> p(z_t | a_{<=t})`` and
  ``log p(a_t | a_{<t})``; a masked (missing) step leaves the moments unchanged and
  contributes 0.
* :func:`smooth_step`: one backward RTS step, ``p(z_{t+1} | a) -> p(z_t | a)``.

:func:`filter` and :func:`smooth` run them over a whole sequence; :func:`rts_smooth`
smooths an existing :class:`FilterResult` (e.g. one built step by step, as the KVAE's
imputation does, where the parameters of step ``t+1`` depend on the filter at ``t``).
"""

from typing import List, Optional, Tuple

import torch

from ._linalg import LOG_2PI, apply, half_logdet_chol, lsolve, sym
from .types import DEFAULT_DTYPE, LGSSM, FilterResult, Prepared, SmoothResult, prepare

Moments = Tuple[torch.Tensor, torch.Tensor]


def predict(
    mean: torch.Tensor, cov: torch.Tensor, trans_matrix: torch.Tensor, trans_cov: torch.Tensor
) -> Moments:
    """One-step prediction through ``z_t = A_t z_{t-1} + w_t``, ``w_t ~ N(0, Q)``.

    Args:
        mean: ``(..., Z)`` mean of ``z_{t-1}``.
        cov: ``(..., Z, Z)`` covariance of ``z_{t-1}``.
        trans_matrix: ``(..., Z, Z)`` ``A_t``.
        trans_cov: ``(..., Z, Z)`` ``Q``.

    Returns:
        ``(mean (..., Z), cov (..., Z, Z))`` of ``z_t``: ``A_t m`` and
        ``A_t P A_t^T + Q`` (re-symmetrised).
    """
    mean = apply(trans_matrix, mean)
    cov = sym(trans_matrix @ cov @ trans_matrix.transpose(-1, -2) + trans_cov)
    return mean, cov


def condition_on(
    mean: torch.Tensor,
    cov: torch.Tensor,
    obs_matrix: torch.Tensor,
    obs_cov: torch.Tensor,
    obs: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Condition ``z_t ~ N(mean, cov)`` on ``a_t = C_t z_t + v_t``, ``v_t ~ N(0, R)``.

    With ``S = C P C^T + R`` (Cholesky) and the gain ``K = P C^T S^{-1}`` (Cholesky solve),
    the update is ``m + K (a - C m)`` and, in the Joseph form that stays positive
    semi-definite under rounding, ``(I - K C) P (I - K C)^T + K R K^T``.  At a masked step
    the gain is zero: the moments come back unchanged and the increment is exactly 0.

    Args:
        mean: ``(..., Z)`` predicted mean ``m_{t|t-1}``.
        cov: ``(..., Z, Z)`` predicted covariance ``P_{t|t-1}``.
        obs_matrix: ``(..., D, Z)`` ``C_t``.
        obs_cov: ``(..., D, D)`` ``R``.
        obs: ``(..., D)`` ``a_t``; entries at masked steps may hold anything, NaN included
            (they are replaced by 0 before any arithmetic).
        mask: ``(...)`` bool, True = ``a_t`` observed; ``None`` = observed.

    Returns:
        ``(mean (..., Z), cov (..., Z, Z), log_likelihood (...))``: the filtered moments
        ``m_{t|t}``, ``P_{t|t}`` and ``log p(a_t | a_{<t})`` (0 at masked steps).
    """
    if mask is not None:
        obs = torch.where(mask.unsqueeze(-1), obs, torch.zeros((), dtype=obs.dtype, device=obs.device))
    D, Z = obs_matrix.shape[-2:]
    CP = obs_matrix @ cov  # (..., D, Z)
    S = sym(CP @ obs_matrix.transpose(-1, -2) + obs_cov)  # (..., D, D)
    if mask is not None:  # a masked step's S is never used: I keeps its factor finite however large P grew
        S = torch.where(mask[..., None, None], S, torch.eye(D, dtype=S.dtype, device=S.device))
    L = torch.linalg.cholesky(S)
    innovation = obs - apply(obs_matrix, mean)  # (..., D)
    gain = torch.cholesky_solve(CP, L).transpose(-1, -2)  # (..., Z, D)
    if mask is not None:
        gain = gain * mask.to(gain.dtype)[..., None, None]  # zero gain skips the update exactly
    mean = mean + apply(gain, innovation)
    IKC = torch.eye(Z, dtype=cov.dtype, device=cov.device) - gain @ obs_matrix
    cov = sym(IKC @ cov @ IKC.transpose(-1, -2) + gain @ obs_cov @ gain.transpose(-1, -2))
    white = lsolve(L, innovation.unsqueeze(-1)).squeeze(-1)  # (..., D)
    log_likelihood = -0.5 * D * LOG_2PI - half_logdet_chol(L) - 0.5 * white.pow(2).sum(-1)
    if mask is not None:
        log_likelihood = log_likelihood * mask.to(log_likelihood.dtype)
    return mean, cov, log_likelihood


def smooth_step(
    filtered_mean: torch.Tensor,
    filtered_cov: torch.Tensor,
    next_pred_mean: torch.Tensor,
    next_pred_cov: torch.Tensor,
    next_mean: torch.Tensor,
    next_cov: torch.Tensor,
    next_trans_matrix: torch.Tensor,
    trans_cov: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One backward Rauch-Tung-Striebel step, from ``p(z_{t+1} | a)`` to ``p(z_t | a)``.

    ``G_t = P_t A_{t+1}^T (P_{t+1}^-)^{-1}`` (through the symmetric pseudo-inverse, not Cholesky: under
    dynamics that grow, e.g. a learned ``A`` with an eigenvalue above 1 over a long gap, ``P_{t+1}^-``
    spans many orders of magnitude and is singular or indefinite once rounded, even in float64; the
    smoother should still return, with the gain of its well-determined directions); the covariance in the
    sum-of-PSD-terms form ``(I - G A) P_t (I - G A)^T + G Q G^T + G P_{t+1}^s G^T``
    (algebraically ``P_t + G (P_{t+1}^s - P_{t+1}^-) G^T``, without the cancellation).

    Args:
        filtered_mean, filtered_cov: ``(..., Z)``, ``(..., Z, Z)``: ``m_{t|t}``, ``P_{t|t}``.
        next_pred_mean, next_pred_cov: ``(..., Z)``, ``(..., Z, Z)``: ``m_{t+1|t}``, ``P_{t+1|t}``.
        next_mean, next_cov: ``(..., Z)``, ``(..., Z, Z)``: smoothed ``m_{t+1|T}``, ``P_{t+1|T}``.
        next_trans_matrix: ``(..., Z, Z)`` ``A_{t+1}``.
        trans_cov: ``(..., Z, Z)`` ``Q``.

    Returns:
        ``(mean (..., Z), cov (..., Z, Z), cross_cov (..., Z, Z))``: the smoothed moments of
        ``z_t`` and ``Cov(z_{t+1}, z_t | a) = P_{t+1}^s G_t^T``.
    """
    A, P = next_trans_matrix, filtered_cov
    G = (torch.linalg.pinv(next_pred_cov, hermitian=True) @ (A @ P)).transpose(-1, -2)  # G^T = (P^-_{t+1})^{-1} A_{t+1} P_t
    Gt = G.transpose(-1, -2)
    cross_cov = next_cov @ Gt
    mean = filtered_mean + apply(G, next_mean - next_pred_mean)
    IGA = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device) - G @ A
    cov = sym(IGA @ P @ IGA.transpose(-1, -2) + G @ trans_cov @ Gt + G @ next_cov @ Gt)
    return mean, cov, cross_cov


def _stack_filter(means: List, covs: List, pred_means: List, pred_covs: List, increments: List) -> FilterResult:
    log_increments = torch.stack(increments, -1)  # (..., T)
    return FilterResult(
        means=torch.stack(means, -2),  # (..., T, Z)
        covs=torch.stack(covs, -3),  # (..., T, Z, Z)
        pred_means=torch.stack(pred_means, -2),
        pred_covs=torch.stack(pred_covs, -3),
        log_increments=log_increments,
        log_marginal=log_increments.sum(-1),
    )


def filter_prepared(q: Prepared) -> FilterResult:
    """Sequential Kalman filter over prepared inputs (see :func:`filter`)."""
    mean, cov = q.init_loc, q.init_cov
    outputs = ([], [], [], [], [])  # means, covs, pred_means, pred_covs, increments
    # unbind once: indexing [..., t] inside the loop would make the backward pass O(T^2)
    # (each slice's backward materialises a zero gradient of the full size)
    As, Cs, ys, masks = q.trans_matrix.unbind(-3), q.obs_matrix.unbind(-3), q.obs.unbind(-2), q.mask.unbind(-1)
    for t in range(q.T):
        if t > 0:
            mean, cov = predict(mean, cov, As[t], q.trans_cov)
        pred = (mean, cov)
        mean, cov, increment = condition_on(mean, cov, Cs[t], q.obs_cov, ys[t], masks[t])
        for out, value in zip(outputs, (mean, cov) + pred + (increment,)):
            out.append(value)
    return _stack_filter(*outputs)


def rts_smooth(filtered: FilterResult, trans_matrix: torch.Tensor, trans_cov: torch.Tensor) -> SmoothResult:
    """Rauch-Tung-Striebel smoother over the output of a Kalman filter.

    Args:
        filtered: :class:`FilterResult` with batch ``B`` (e.g. from :func:`filter`, or
            stacked from :func:`predict` / :func:`condition_on` steps).
        trans_matrix: ``B + (T, Z, Z)`` ``A_t`` (entry 0 unused) the filter ran with.
        trans_cov: ``B + (Z, Z)`` ``Q``.

    Returns:
        :class:`SmoothResult` with ``means B + (T, Z)``, ``covs B + (T, Z, Z)``,
        ``cross_covs B + (T-1, Z, Z)`` and ``log_marginal = filtered.log_marginal``.
    """
    T, Z = filtered.means.shape[-2:]
    # unbind once: indexing inside the loop would make the backward pass O(T^2)
    As = trans_matrix.unbind(-3)
    fm, fc = filtered.means.unbind(-2), filtered.covs.unbind(-3)
    pm, pc = filtered.pred_means.unbind(-2), filtered.pred_covs.unbind(-3)
    mean, cov = fm[T - 1], fc[T - 1]
    means, covs, cross = [mean], [cov], []
    for t in range(T - 2, -1, -1):
        mean, cov, cross_cov = smooth_step(fm[t], fc[t], pm[t + 1], pc[t + 1], mean, cov, As[t + 1], trans_cov)
        means.append(mean)
        covs.append(cov)
        cross.append(cross_cov)
    means.reverse()
    covs.reverse()
    cross.reverse()
    batch_shape = filtered.covs.shape[:-3]
    cross_covs = torch.stack(cross, -3) if cross else filtered.covs.new_zeros(batch_shape + (0, Z, Z))
    return SmoothResult(
        means=torch.stack(means, -2),  # (..., T, Z)
        covs=torch.stack(covs, -3),  # (..., T, Z, Z)
        cross_covs=cross_covs,  # (..., T-1, Z, Z)
        log_marginal=filtered.log_marginal,
    )


def filter(  # noqa: A001 - name mirrors the dynamax API
    params: LGSSM,
    obs: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    dtype: torch.dtype = DEFAULT_DTYPE,
    validate_args: Optional[bool] = None,
) -> FilterResult:
    """Kalman filter with missing data: :func:`predict` then :func:`condition_on` at every
    step (sequential over time, batched over ``...``).

    At a masked step the gain is zero, so the filtered moments equal the predicted ones;
    with every step masked the output is the prior predictive.  Differentiable.

    Args:
        params: :class:`LGSSM`.
        obs: ``(..., T, D)``; masked entries may be NaN.
        mask: ``(..., T)`` bool, True = observed; ``None`` = all observed.
        dtype: compute/return dtype (default float64).
        validate_args: check input values (finiteness, symmetric positive-definite
            covariances); ``None`` follows Pyro's validation switch.  Shapes are always
            checked.

    Returns:
        :class:`FilterResult` with ``means (..., T, Z)``, ``covs (..., T, Z, Z)``,
        ``pred_means``, ``pred_covs``, ``log_increments (..., T)``,
        ``log_marginal (...)``.
    """
    return filter_prepared(prepare(params, obs, mask, dtype, validate_args))


def smooth(
    params: LGSSM,
    obs: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    dtype: torch.dtype = DEFAULT_DTYPE,
    validate_args: Optional[bool] = None,
) -> SmoothResult:
    """Smoothed moments of ``p(z_t | all observed a)`` -- the posterior ``p(z | a)`` the
    KVAE's ELBO integrates over: :func:`filter`, then :func:`rts_smooth`.

    Sequential over time and differentiable.

    Args:
        params: :class:`LGSSM`.
        obs: ``(..., T, D)``; masked entries may be NaN.
        mask: ``(..., T)`` bool, True = observed; ``None`` = all observed.
        dtype: compute/return dtype (default float64).
        validate_args: as for :func:`filter`.

    Returns:
        :class:`SmoothResult` with ``means (..., T, Z)``, ``covs (..., T, Z, Z)``,
        ``cross_covs (..., T-1, Z, Z)`` and ``log_marginal (...)``.
    """
    q = prepare(params, obs, mask, dtype, validate_args)
    return rts_smooth(filter_prepared(q), q.trans_matrix, q.trans_cov)
