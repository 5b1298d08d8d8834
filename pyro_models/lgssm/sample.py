"""Joint posterior draws ``z_{1:T} ~ p(z | a_observed)`` by Pyro's parallel-scan FFBS.

The chain of Fraccaro et al. 2017 eq. (2) is written as information-form Gaussian factors
of ``pyro.ops.gaussian`` (row-vector convention ``y = x @ M``; our ``z_t = A_t z_{t-1} + w``
is the same with ``M = A_t^T``), then sampled by ``sequential_gaussian_filter_sample``.
"""

from typing import Optional, Tuple

import torch
from pyro.ops.gaussian import Gaussian, matrix_and_gaussian_to_gaussian, sequential_gaussian_filter_sample

from ._linalg import LOG_2PI, half_logdet_chol, lsolve, sym
from .types import DEFAULT_DTYPE, LGSSM, Prepared, prepare


def _observation_factors(q: Prepared) -> Gaussian:
    """``p(a_t | z_t)^{mask_t}`` as Gaussians over ``z_t``, batch ``B + (T,)``.

    The log-normaliser, information vector and precision are all multiplied by
    ``mask_t`` (0 or 1), so a missing step contributes the zero Gaussian, i.e. the
    constant 1 -- exactly what marginalising the missing ``a_t`` out of the joint gives.
    """
    maskf = q.mask.to(q.obs.dtype)
    L_R = torch.linalg.cholesky(q.obs_cov).unsqueeze(-3)  # B + (1, D, D)
    W = lsolve(L_R, q.obs_matrix)  # L_R^{-1} C_t, B + (T, D, Z)
    u = lsolve(L_R, q.obs.unsqueeze(-1))  # L_R^{-1} a_t, B + (T, D, 1)
    Wt = W.transpose(-1, -2)
    lognorm = -0.5 * q.D * LOG_2PI - half_logdet_chol(L_R) - 0.5 * u.squeeze(-1).pow(2).sum(-1)
    return Gaussian(
        lognorm * maskf,
        (Wt @ u).squeeze(-1) * maskf.unsqueeze(-1),  # C^T R^{-1} a
        (Wt @ W) * maskf[..., None, None],  # C^T R^{-1} C
    )


def _initial_factor(q: Prepared) -> Gaussian:
    """``p(z_0)`` in information form, batch ``B``."""
    L0 = torch.linalg.cholesky(q.init_cov)
    u0 = lsolve(L0, q.init_loc.unsqueeze(-1))  # (B, Z, 1)
    info = torch.linalg.solve_triangular(L0.transpose(-1, -2), u0, upper=True).squeeze(-1)
    lognorm = -0.5 * q.Z * LOG_2PI - half_logdet_chol(L0) - 0.5 * u0.squeeze(-1).pow(2).sum(-1)
    return Gaussian(lognorm, info, sym(torch.cholesky_inverse(L0)))


def _transition_factors(q: Prepared) -> Gaussian:
    """``p(z_t | z_{t-1})`` over the pair ``(z_{t-1}, z_t)``, batch ``B + (T-1,)``."""
    B, T, Z = q.batch_shape, q.T, q.Z
    L_Q = torch.linalg.cholesky(q.trans_cov).unsqueeze(-3)  # B + (1, Z, Z)
    noise = Gaussian(
        (-0.5 * Z * LOG_2PI - half_logdet_chol(L_Q)).expand(B + (T - 1,)),
        torch.zeros(B + (T - 1, Z), dtype=q.obs.dtype, device=q.obs.device),
        sym(torch.cholesky_inverse(L_Q)).expand(B + (T - 1, Z, Z)),
    )
    return matrix_and_gaussian_to_gaussian(q.trans_matrix[..., 1:, :, :].transpose(-1, -2), noise)


def factors(q: Prepared) -> Tuple[Gaussian, Optional[Gaussian]]:
    """The Markov chain of Gaussian factors whose contraction is ``p(a_obs)``.

    Returns ``init`` (over ``z[0]``, batch ``B``) holding ``p(z[0]) p(a[0] | z[0])^{mask[0]}``
    and ``trans`` (over ``(z[t-1], z[t])``, batch ``B + (T-1,)``, ``None`` when ``T == 1``)
    holding ``p(z[t] | z[t-1]) p(a[t] | z[t])^{mask[t]}`` for ``t = 1..T-1``.
    """
    obs = _observation_factors(q)
    init = _initial_factor(q) + obs[(Ellipsis, 0)]
    if q.T == 1:
        return init, None
    return init, _transition_factors(q) + obs[(Ellipsis, slice(1, None))].event_pad(left=q.Z)


def sample_posterior(
    params: LGSSM,
    obs: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    num_samples: int = 1,
    *,
    dtype: torch.dtype = DEFAULT_DTYPE,
    generator: Optional[torch.Generator] = None,
    validate_args: Optional[bool] = None,
) -> torch.Tensor:
    """Joint draws ``z_{1:T} ~ p(z | a_observed)`` (forward filtering, backward sampling).

    The draws are joint over time (correct cross-time covariances), not independent
    marginals, and reparameterised: differentiable w.r.t. the parameters and ``obs``.

    Args:
        params: :class:`LGSSM`.
        obs: ``(..., T, D)``; masked entries may be NaN.
        mask: ``(..., T)`` bool, True = observed; ``None`` = all observed.
        num_samples: number of joint draws ``N >= 1``.
        dtype: compute/return dtype (default float64).
        generator: optional ``torch.Generator`` for the standard-normal noise.
        validate_args: check input values; ``None`` follows Pyro's validation switch.

    Returns:
        ``(N, ..., T, Z)`` tensor in ``dtype``.
    """
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
    q = prepare(params, obs, mask, dtype, validate_args)
    init, trans = factors(q)
    shape = (num_samples,) + tuple(q.batch_shape) + (q.T, q.Z)
    noise = torch.randn(shape, dtype=q.obs.dtype, device=q.obs.device, generator=generator)
    if trans is None:
        return init.rsample((num_samples,), noise=noise[..., 0, :]).unsqueeze(-2)
    return sequential_gaussian_filter_sample(init, trans, (num_samples,), noise=noise)
