"""Types of :mod:`pyro_models.lgssm` (parameters in, results out) and input preparation.

Shapes: ``Z`` latent dim, ``D`` observation dim, ``T`` time steps, ``...`` batch dims that
broadcast against each other.

:func:`prepare` turns user inputs into :class:`Prepared` (cast to the compute dtype,
covariances symmetrised, everything broadcast to one batch shape, masked observations
replaced by 0).  It always checks shapes -- cheap, Python-level comparisons of
``tensor.shape`` -- and, only when validation is on, the *values*: finiteness,
symmetry and positive definiteness of the covariances (a Cholesky factorisation each) and
NaN/inf at observed steps.  Value checks read tensors back to the host (``bool(...)``),
which is why they are opt-in (Pyro's ``validate_args`` convention, see
:func:`validation_enabled`) and switched off on the training hot path.
"""

import math
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from pyro.distributions.util import is_validation_enabled

from ._linalg import sym

DEFAULT_DTYPE = torch.float64  # compute dtype of every Kalman quantity (see docs/lgssm.md)
COVARIANCE_FIELDS = ("init_cov", "trans_cov", "obs_cov")


class LGSSM(NamedTuple):
    """Parameters of a linear-Gaussian state-space model (column-vector convention).

    - ``init_loc``     ``(..., Z)``        mean of ``z_1``
    - ``init_cov``     ``(..., Z, Z)``     covariance of ``z_1`` (SPD)
    - ``trans_matrix`` ``(..., T, Z, Z)``  ``A_t``; entry ``t`` maps ``z[t-1] -> z[t]``;
      entry 0 is unused
    - ``trans_cov``    ``(..., Z, Z)``     ``Q`` (SPD), shared over time
    - ``obs_matrix``   ``(..., T, D, Z)``  ``C_t``
    - ``obs_cov``      ``(..., D, D)``     ``R`` (SPD), shared over time

    Leading batch dims of all fields (and of ``obs``/``mask``) broadcast against
    each other, so e.g. ``init_loc`` may be ``(Z,)`` while ``trans_matrix`` is
    ``(B, T, Z, Z)``.
    """

    init_loc: torch.Tensor
    init_cov: torch.Tensor
    trans_matrix: torch.Tensor
    trans_cov: torch.Tensor
    obs_matrix: torch.Tensor
    obs_cov: torch.Tensor


class FilterResult(NamedTuple):
    """Output of :func:`pyro_models.lgssm.filter` (in the compute dtype, float64 by default).

    - ``means`` ``(..., T, Z)`` and ``covs`` ``(..., T, Z, Z)``: filtered moments of
      ``p(z_t | a_s observed, s <= t)``.
    - ``pred_means`` ``(..., T, Z)`` and ``pred_covs`` ``(..., T, Z, Z)``: one-step
      predicted moments of ``p(z_t | a_s observed, s < t)``; index 0 is the prior
      ``(init_loc, init_cov)``.
    - ``log_increments`` ``(..., T)``: ``log p(a_t | a_s observed, s < t)`` at observed
      steps, exactly 0 at masked steps.
    - ``log_marginal`` ``(...)``: sum of ``log_increments``.
    """

    means: torch.Tensor
    covs: torch.Tensor
    pred_means: torch.Tensor
    pred_covs: torch.Tensor
    log_increments: torch.Tensor
    log_marginal: torch.Tensor


class SmoothResult(NamedTuple):
    """Output of :func:`pyro_models.lgssm.smooth` (in the compute dtype, float64 by default).

    - ``means`` ``(..., T, Z)`` and ``covs`` ``(..., T, Z, Z)``: smoothed moments of
      ``p(z_t | all observed a)``.
    - ``cross_covs`` ``(..., T-1, Z, Z)``: lag-one cross covariances,
      ``cross_covs[..., t, :, :] = Cov(z[t+1], z[t] | all observed a)``.
    - ``log_marginal`` ``(...)``: ``log p(a_observed)`` from the forward pass.
    """

    means: torch.Tensor
    covs: torch.Tensor
    cross_covs: torch.Tensor
    log_marginal: torch.Tensor


class Prepared(NamedTuple):
    """Inputs after :func:`prepare`: compute dtype, one batch shape ``B``, covariances
    symmetrised, masked observations replaced by 0."""

    init_loc: torch.Tensor  # B + (Z,)
    init_cov: torch.Tensor  # B + (Z, Z)
    trans_matrix: torch.Tensor  # B + (T, Z, Z)
    trans_cov: torch.Tensor  # B + (Z, Z)
    obs_matrix: torch.Tensor  # B + (T, D, Z)
    obs_cov: torch.Tensor  # B + (D, D)
    obs: torch.Tensor  # B + (T, D), masked entries replaced by 0
    mask: torch.Tensor  # B + (T,), bool
    batch_shape: torch.Size
    T: int
    Z: int
    D: int


def validation_enabled(validate_args: Optional[bool]) -> bool:
    """Whether to check input values: ``validate_args`` when given, otherwise Pyro's global
    switch (``pyro.enable_validation``, read through
    ``pyro.distributions.util.is_validation_enabled``), as for Pyro distributions."""
    return is_validation_enabled() if validate_args is None else bool(validate_args)


# ----------------------------------------------------------------------------------------
# shape checks (always on: Python-level only)
# ----------------------------------------------------------------------------------------


def _to_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as e:  # pragma: no cover - message only
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}") from e
    if x.is_complex():
        raise ValueError(f"{name}: complex tensors are not supported (dtype {x.dtype})")
    return x


def _shape(x: torch.Tensor) -> Tuple[int, ...]:
    return tuple(x.shape)


def _fields(params) -> Dict[str, torch.Tensor]:
    missing = [f for f in LGSSM._fields if not hasattr(params, f)]
    if missing:
        raise TypeError(
            f"params: expected an LGSSM with fields {LGSSM._fields}, "
            f"got {type(params).__name__} missing {missing}"
        )
    return {f: _to_tensor(getattr(params, f), f"params.{f}") for f in LGSSM._fields}


def _check_square(name: str, x: torch.Tensor, n: int, what: str) -> None:
    if x.dim() < 2 or x.shape[-2:] != (n, n):
        raise ValueError(f"{name}: expected shape (..., {n}, {n}) ({what}), got {_shape(x)}")


def _check_sizes(p: Dict[str, torch.Tensor], obs: torch.Tensor) -> Tuple[int, int, int]:
    """Check the event shapes of the parameters and ``obs``; return ``(T, Z, D)``."""
    init_loc, A, C = p["init_loc"], p["trans_matrix"], p["obs_matrix"]
    if init_loc.dim() < 1 or init_loc.shape[-1] < 1:
        raise ValueError(f"init_loc: expected shape (..., Z) with Z >= 1, got {_shape(init_loc)}")
    Z = init_loc.shape[-1]
    _check_square("init_cov", p["init_cov"], Z, "Z from init_loc.shape[-1]")
    _check_square("trans_cov", p["trans_cov"], Z, "Z from init_loc.shape[-1]")
    if A.dim() < 3 or A.shape[-2:] != (Z, Z):
        raise ValueError(
            f"trans_matrix: expected shape (..., T, {Z}, {Z}) (Z from init_loc.shape[-1]), "
            f"got {_shape(A)}"
        )
    if C.dim() < 3 or C.shape[-1] != Z or C.shape[-2] < 1:
        raise ValueError(
            f"obs_matrix: expected shape (..., T, D, {Z}) with D >= 1 "
            f"(Z from init_loc.shape[-1]), got {_shape(C)}"
        )
    D = C.shape[-2]
    _check_square("obs_cov", p["obs_cov"], D, "D from obs_matrix.shape[-2]")
    if obs.dim() < 2 or obs.shape[-1] != D:
        raise ValueError(
            f"obs: expected shape (..., T, {D}) (D from obs_matrix.shape[-2]), got {_shape(obs)}"
        )
    T = obs.shape[-2]
    if T < 1:
        raise ValueError(f"obs: expected at least one time step, got shape {_shape(obs)}")
    if A.shape[-3] != T:
        raise ValueError(
            f"trans_matrix: expected shape (..., {T}, {Z}, {Z}) (T from obs.shape[-2]), "
            f"got {_shape(A)}"
        )
    if C.shape[-3] != T:
        raise ValueError(
            f"obs_matrix: expected shape (..., {T}, {D}, {Z}) (T from obs.shape[-2]), "
            f"got {_shape(C)}"
        )
    return T, Z, D


def _check_mask(mask, obs: torch.Tensor, T: int) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    mask = _to_tensor(mask, "mask")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor (True = observed), got dtype {mask.dtype}")
    if mask.dim() < 1 or mask.shape[-1] != T:
        raise ValueError(
            f"mask: expected shape (..., {T}) (T from obs.shape[-2]; obs.shape[:-1] = "
            f"{_shape(obs)[:-1]}), got {_shape(mask)}"
        )
    return mask


def _batch_shape(p: Dict[str, torch.Tensor], obs: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Size:
    parts = {
        "init_loc": p["init_loc"].shape[:-1],
        "init_cov": p["init_cov"].shape[:-2],
        "trans_matrix": p["trans_matrix"].shape[:-3],
        "trans_cov": p["trans_cov"].shape[:-2],
        "obs_matrix": p["obs_matrix"].shape[:-3],
        "obs_cov": p["obs_cov"].shape[:-2],
        "obs": obs.shape[:-2],
    }
    if mask is not None:
        parts["mask"] = mask.shape[:-1]
    try:
        return torch.broadcast_shapes(*parts.values())
    except RuntimeError:
        desc = ", ".join(f"{k}: {tuple(v)}" for k, v in parts.items())
        raise ValueError(f"batch dimensions do not broadcast: {desc}") from None


# ----------------------------------------------------------------------------------------
# value checks (opt-in: each reads a tensor back to the host)
# ----------------------------------------------------------------------------------------


def _check_finite(p: Dict[str, torch.Tensor]) -> None:
    for k, v in p.items():
        if k == "trans_matrix":
            v = v[..., 1:, :, :]  # trans_matrix[..., 0, :, :] is unused
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"params.{k} contains NaN or inf")


def _check_covariance(name: str, S: torch.Tensor, source, dtype: torch.dtype) -> None:
    """Symmetric to ``sqrt(eps)`` of the caller's dtype (relative) and positive definite."""
    src_dtype = source.dtype if isinstance(source, torch.Tensor) and source.is_floating_point() else dtype
    tolerance = math.sqrt(torch.finfo(src_dtype).eps)
    asym = (S - S.transpose(-1, -2)).abs().amax(dim=(-1, -2))
    scale = S.abs().amax(dim=(-1, -2))
    if bool((asym > tolerance * scale).any()):
        raise ValueError(f"{name} is not symmetric (max |S - S^T| = {float(asym.max()):.3g})")
    if bool((torch.linalg.cholesky_ex(sym(S).detach()).info != 0).any()):
        raise ValueError(f"{name} is not positive definite")


def _check_observed(obs: torch.Tensor, mask: torch.Tensor) -> None:
    """``obs B + (T, D)`` finite wherever ``mask B + (T,)`` is True."""
    bad = ~torch.isfinite(obs).all(-1) & mask
    if bool(bad.any()):
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"obs contains NaN or inf at an observed step (mask True); first at batch/time "
            f"index {first}. Set mask False there, or fill the value."
        )


# ----------------------------------------------------------------------------------------
# preparation
# ----------------------------------------------------------------------------------------


def prepare(
    params: LGSSM,
    obs: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    dtype: torch.dtype = DEFAULT_DTYPE,
    validate_args: Optional[bool] = None,
) -> Prepared:
    """Check, cast and broadcast the inputs of every public function.

    Args:
        params: :class:`LGSSM` (any NamedTuple-like object with its fields).
        obs: ``(..., T, D)`` observations; masked entries may hold anything.
        mask: ``(..., T)`` bool, True = observed; ``None`` = all observed.
        dtype: floating compute dtype (default float64).
        validate_args: check values too (see the module docstring); ``None`` follows
            Pyro's validation switch.  Shapes are always checked.

    Returns:
        :class:`Prepared`, every field broadcast to the common batch shape ``B``.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    p = _fields(params)
    obs = _to_tensor(obs, "obs")
    T, Z, D = _check_sizes(p, obs)
    mask = _check_mask(mask, obs, T)
    batch_shape = _batch_shape(p, obs, mask)
    validate = validation_enabled(validate_args)

    device = obs.device
    p = {k: v.to(device=device, dtype=dtype) for k, v in p.items()}
    if validate:
        _check_finite(p)
        for k in COVARIANCE_FIELDS:
            _check_covariance(k, p[k], getattr(params, k), dtype)
    for k in COVARIANCE_FIELDS:
        p[k] = sym(p[k])  # so that the gradient w.r.t. a covariance is symmetric

    if mask is None:
        mask_b = torch.ones(batch_shape + (T,), dtype=torch.bool, device=device)
    else:
        mask_b = mask.to(device).expand(batch_shape + (T,))
    obs_b = obs.to(dtype).expand(batch_shape + (T, D))
    if validate:
        _check_observed(obs_b, mask_b)
    # Replace masked entries *before* any arithmetic so NaNs there cannot reach the
    # result or its gradient (torch.where routes a zero gradient to them).
    obs_b = torch.where(mask_b.unsqueeze(-1), obs_b, torch.zeros((), dtype=dtype, device=device))

    return Prepared(
        init_loc=p["init_loc"].expand(batch_shape + (Z,)),
        init_cov=p["init_cov"].expand(batch_shape + (Z, Z)),
        trans_matrix=p["trans_matrix"].expand(batch_shape + (T, Z, Z)),
        trans_cov=p["trans_cov"].expand(batch_shape + (Z, Z)),
        obs_matrix=p["obs_matrix"].expand(batch_shape + (T, D, Z)),
        obs_cov=p["obs_cov"].expand(batch_shape + (D, D)),
        obs=obs_b,
        mask=mask_b,
        batch_shape=batch_shape,
        T=T,
        Z=Z,
        D=D,
    )
