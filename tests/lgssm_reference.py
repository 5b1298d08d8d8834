"""Reference implementations used only by tests/test_lgssm.py (not part of the library).

* :func:`pyro_log_marginal`: ``log p(a_observed)`` built from ``pyro.ops.gaussian``
  (``Gaussian``, ``matrix_and_gaussian_to_gaussian``, ``sequential_gaussian_tensordot``,
  ``gaussian_tensordot``, ``event_logsumexp``) and differentiated by autograd, so
  derivatives of every order are available (formerly ``log_marginal(method="pyro")``).
  To avoid the cancellation of the information form at small noise it re-centres: a
  gradient-free pass computes the posterior mean ``z_hat`` (Pyro's FFBS with zero noise)
  and the factors are rebuilt in the variables ``z_t - z_hat_t``, a volume-preserving
  change of variables that leaves the integral unchanged for any ``z_hat``.
* :func:`tree_smooth`: the smoothed moments of the library's parallel tree (the moments
  behind ``log_marginal``'s gradient), as a :class:`SmoothResult` without gradient
  (formerly ``smooth(method="scan")``).
"""

import math
from typing import Optional, Tuple

import torch
from pyro.ops.gaussian import (
    Gaussian,
    gaussian_tensordot,
    matrix_and_gaussian_to_gaussian,
    sequential_gaussian_filter_sample,
    sequential_gaussian_tensordot,
)

from pyro_models.lgssm import SmoothResult
from pyro_models.lgssm.scan import joint_log_density, tree_posterior
from pyro_models.lgssm.types import Prepared, prepare

F64 = torch.float64
LOG_2PI = math.log(2.0 * math.pi)


def _half_logdet(L):
    return L.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def _lsolve(L, X):
    return torch.linalg.solve_triangular(L, X, upper=False)


def _inverse_info(L, loc):
    """``(S^{-1} loc, S^{-1}, whitened loc)`` for ``S = L L^T``."""
    u = _lsolve(L, loc.unsqueeze(-1))
    info = torch.linalg.solve_triangular(L.transpose(-1, -2), u, upper=True).squeeze(-1)
    prec = torch.cholesky_inverse(L)
    return info, 0.5 * (prec + prec.transpose(-1, -2)), u.squeeze(-1)


def _obs_factors(q: Prepared, shift: Optional[torch.Tensor]) -> Gaussian:
    maskf = q.mask.to(q.obs.dtype)
    resid = q.obs if shift is None else q.obs - (q.obs_matrix @ shift.unsqueeze(-1)).squeeze(-1)
    L_R = torch.linalg.cholesky(q.obs_cov).unsqueeze(-3)
    W = _lsolve(L_R, q.obs_matrix)
    u = _lsolve(L_R, resid.unsqueeze(-1))
    Wt = W.transpose(-1, -2)
    lognorm = -0.5 * q.D * LOG_2PI - _half_logdet(L_R) - 0.5 * u.squeeze(-1).pow(2).sum(-1)
    return Gaussian(lognorm * maskf, (Wt @ u).squeeze(-1) * maskf.unsqueeze(-1), (Wt @ W) * maskf[..., None, None])


def _trans_factors(q: Prepared, shift: Optional[torch.Tensor]) -> Gaussian:
    """Transition noise ``w_t ~ N(offset_t, Q)``, ``offset_t = A_t shift_{t-1} - shift_t``."""
    B, T, Z = q.batch_shape, q.T, q.Z
    A = q.trans_matrix[..., 1:, :, :]
    L_Q = torch.linalg.cholesky(q.trans_cov).unsqueeze(-3)
    prec = torch.cholesky_inverse(L_Q)
    prec = (0.5 * (prec + prec.transpose(-1, -2))).expand(B + (T - 1, Z, Z))
    lognorm = (-0.5 * Z * LOG_2PI - _half_logdet(L_Q)).expand(B + (T - 1,))
    if shift is None:
        info = torch.zeros(B + (T - 1, Z), dtype=q.obs.dtype)
    else:
        offset = (A @ shift[..., :-1, :].unsqueeze(-1)).squeeze(-1) - shift[..., 1:, :]
        info, _, v = _inverse_info(L_Q, offset)
        lognorm = lognorm - 0.5 * v.pow(2).sum(-1)
    return matrix_and_gaussian_to_gaussian(A.transpose(-1, -2), Gaussian(lognorm, info, prec))


def factors(q: Prepared, shift: Optional[torch.Tensor] = None) -> Tuple[Gaussian, Optional[Gaussian]]:
    """The chain of masked Gaussian factors, optionally in the variables ``z_t - shift_t``."""
    obs = _obs_factors(q, shift)
    loc0 = q.init_loc if shift is None else q.init_loc - shift[..., 0, :]
    L0 = torch.linalg.cholesky(q.init_cov)
    info, prec, u0 = _inverse_info(L0, loc0)
    lognorm = -0.5 * q.Z * LOG_2PI - _half_logdet(L0) - 0.5 * u0.pow(2).sum(-1)
    init = Gaussian(lognorm, info, prec) + obs[(Ellipsis, 0)]
    if q.T == 1:
        return init, None
    return init, _trans_factors(q, shift) + obs[(Ellipsis, slice(1, None))].event_pad(left=q.Z)


def _detached(g: Gaussian) -> Gaussian:
    return Gaussian(g.log_normalizer.detach(), g.info_vec.detach(), g.precision.detach())


def posterior_mean(init: Gaussian, trans: Optional[Gaussian], T: int, Z: int) -> torch.Tensor:
    """Smoothed mean ``B + (T, Z)`` by Pyro's parallel FFBS with zero noise (no autograd)."""
    with torch.no_grad():
        init = _detached(init)
        zeros = init.info_vec.new_zeros(init.batch_shape + (T, Z))
        if trans is None:
            return init.rsample(noise=zeros[..., 0, :]).unsqueeze(-2)
        return sequential_gaussian_filter_sample(init, _detached(trans), (), noise=zeros)


def pyro_log_marginal(params, obs, mask=None, dtype=F64) -> torch.Tensor:
    """``log p(a_observed)`` ``(...)`` from ``pyro.ops.gaussian``, re-centred at the
    posterior mean; derivatives of every order by autograd."""
    q = prepare(params, obs, mask, dtype, validate_args=True)
    init, trans = factors(q)
    init, trans = factors(q, shift=posterior_mean(init, trans, q.T, q.Z))
    g = init if trans is None else gaussian_tensordot(init, sequential_gaussian_tensordot(trans), dims=q.Z)
    result = g.event_logsumexp()
    return torch.where(q.mask.any(-1), result, torch.zeros((), dtype=result.dtype))


def tree_smooth(params, obs, mask=None, dtype=F64) -> SmoothResult:
    """Smoothed moments ``(..., T, Z)``, ``(..., T, Z, Z)``, ``(..., T-1, Z, Z)`` and
    ``log p(a_observed)`` from the library's parallel tree (no gradient)."""
    q = prepare(params, obs, mask, dtype, validate_args=True)
    with torch.no_grad():
        post = tree_posterior(q)
        value = joint_log_density(q, post.means).value
        value = value + 0.5 * q.T * q.Z * LOG_2PI - 0.5 * post.logdet_J
        value = torch.where(q.mask.any(-1), value, torch.zeros_like(value))
    return SmoothResult(post.means, post.covs, post.cross.transpose(-1, -2), value)


# ----------------------------------------------------------------------------------------
# test utility: fail on any host synchronisation
# ----------------------------------------------------------------------------------------

# Ways a tensor value reaches Python (each a device-to-host sync on an accelerator), and the
# Cholesky that raises on failure (it reads its error code back to the host).
HOST_SYNC_METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "nonzero")
HOST_SYNC_FUNCTIONS = ((torch, "nonzero"), (torch.linalg, "cholesky"))


class HostSync(AssertionError):
    """Raised by :func:`forbid_host_sync` when code reads a tensor back to the host."""


def forbid_host_sync(monkeypatch) -> None:
    """Make every host-synchronising call in :data:`HOST_SYNC_METHODS` /
    :data:`HOST_SYNC_FUNCTIONS` raise :class:`HostSync` (until ``monkeypatch`` undoes it)."""

    def refuse(name):
        def raiser(*args, **kwargs):
            raise HostSync(f"host synchronisation: {name}")

        return raiser

    for name in HOST_SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
    for module, name in HOST_SYNC_FUNCTIONS:
        monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
