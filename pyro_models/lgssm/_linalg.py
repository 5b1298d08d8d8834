"""Small linear-algebra helpers shared by the modules of :mod:`pyro_models.lgssm`.

Every helper is batched over leading dimensions and performs no host synchronisation (the
Cholesky factorisation uses ``torch.linalg.cholesky_ex``, which reports failure in a tensor
instead of raising), so they are safe on the training hot path.
"""

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


def sym(S: torch.Tensor) -> torch.Tensor:
    """Symmetric part ``(S + S^T) / 2`` of ``S (..., n, n)``."""
    return 0.5 * (S + S.transpose(-1, -2))


def chol(S: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor ``(..., n, n)`` of an SPD ``S (..., n, n)``, without an error check.

    ``torch.linalg.cholesky`` raises on failure, which costs a host synchronisation on an
    accelerator; here positive definiteness is checked once, up front, by the opt-in
    validation, and a non-SPD input silently gives a meaningless factor.
    """
    return torch.linalg.cholesky_ex(S).L


def half_logdet_chol(L: torch.Tensor) -> torch.Tensor:
    """``log|S| / 2`` ``(...)`` for ``S = L L^T`` with ``L (..., n, n)`` lower triangular."""
    return L.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def lsolve(L: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``L^{-1} X`` for lower-triangular ``L (..., n, n)`` and ``X (..., n, m)``."""
    return torch.linalg.solve_triangular(L, X, upper=False)


def apply(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Matrix-vector product ``M v`` ``(..., n)`` for ``M (..., n, m)`` and ``v (..., m)``."""
    return (M @ v.unsqueeze(-1)).squeeze(-1)
