"""Exact inference for a linear-Gaussian state-space model (LGSSM) with missing data.

Generative process (column vectors), the LGSSM of Fraccaro et al. 2017, "A Disentangled
Recognition and Nonlinear Dynamics Model for Unsupervised Learning" (the Kalman VAE,
arXiv:1710.05741): eq. (1) gives the transition and emission densities and eq. (2) the
joint factorisation; the control input ``B_t u_t`` is omitted here::

    z_1 ~ N(init_loc, init_cov)
    z_t = A_t z_{t-1} + w_t,   w_t ~ N(0, Q),   t = 2..T     (A_t = trans_matrix[..., t-1, :, :])
    a_t = C_t z_t + v_t,       v_t ~ N(0, R),   t = 1..T     (C_t = obs_matrix[..., t-1, :, :])

With the 0-based time index of the tensors, ``trans_matrix[..., t, :, :]`` maps ``z[t-1]``
to ``z[t]``; ``trans_matrix[..., 0, :, :]`` is never used.

Missing data: ``mask[..., t]`` is ``True`` when ``a[t]`` is observed (``None`` = all
observed).  A masked step contributes no observation factor: :func:`log_marginal` is
``log p(a_observed)``, the filter skips the update (gain zero), and posteriors condition
only on observed steps -- the setting of the KVAE's missing-data imputation, where
``p(z | a_observed)`` is computed by Kalman filtering/smoothing.  Values of ``obs`` at
masked steps are replaced before any arithmetic, so they may be NaN; NaN or inf at an
*observed* step raises ``ValueError``.

Precision.  All functions up-cast their inputs to ``dtype`` (keyword, default
``torch.float64``) before any work and return results in that dtype; callers that want
float32 must cast back themselves.  Reason: float32 GaussianHMM was measured 8x off at
noise 1e-4 with no warning, and an uncentred information-form scan in float32 returned
-4947 where the true value was +275.3 (T = 20, noise std 1e-4).  Even in float64 the
uncentred information form lost 1e-5 absolute there, so :func:`log_marginal` evaluates
the likelihood through whitened residuals at the posterior mean (see its docstring) and
matches a 50-digit reference to ~1e-11.  Only pass ``dtype=torch.float32`` when the
noise covariances are well conditioned.

Public API (pure functions returning tensors or NamedTuples, in the style of dynamax's
``linear_gaussian_ssm``)::

    LGSSM(init_loc, init_cov, trans_matrix, trans_cov, obs_matrix, obs_cov)
    log_marginal(params, obs, mask=None, *, dtype=torch.float64, method="scan") -> (...)
    filter(params, obs, mask=None, *, dtype=torch.float64) -> FilterResult
    smooth(params, obs, mask=None, *, dtype=torch.float64, method="rts") -> SmoothResult
    sample_posterior(params, obs, mask=None, num_samples=1, *, dtype=torch.float64,
                     generator=None) -> (num_samples, ..., T, Z)

Inputs are validated before any work; errors are ``ValueError`` naming the argument, the
expected shape and the received one.
"""

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable
from pyro.ops.gaussian import (
    Gaussian,
    gaussian_tensordot,
    matrix_and_gaussian_to_gaussian,
    sequential_gaussian_filter_sample,
    sequential_gaussian_tensordot,
)

__all__ = [
    "LGSSM",
    "FilterResult",
    "SmoothResult",
    "log_marginal",
    "filter",
    "smooth",
    "sample_posterior",
]

_LOG_2PI = math.log(2.0 * math.pi)


class LGSSM(NamedTuple):
    """Parameters of a linear-Gaussian state-space model (column-vector convention).

    Shapes (``Z`` latent dim, ``D`` observation dim, ``T`` time steps, ``...`` batch):

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
    """Output of :func:`filter` (all in the compute dtype, float64 by default).

    - ``means`` ``(..., T, Z)`` and ``covs`` ``(..., T, Z, Z)``: filtered moments of
      ``p(z_t | a_s observed, s <= t)``.
    - ``pred_means`` ``(..., T, Z)`` and ``pred_covs`` ``(..., T, Z, Z)``: one-step
      predicted moments of ``p(z_t | a_s observed, s < t)``; index 0 is the prior
      ``(init_loc, init_cov)``.
    - ``log_increments`` ``(..., T)``: ``log p(a_t | a_s observed, s < t)`` at observed
      steps, exactly 0 at masked steps.
    - ``log_marginal`` ``(...)``: sum of ``log_increments`` (sequential counterpart of
      :func:`log_marginal`).
    """

    means: torch.Tensor
    covs: torch.Tensor
    pred_means: torch.Tensor
    pred_covs: torch.Tensor
    log_increments: torch.Tensor
    log_marginal: torch.Tensor


class SmoothResult(NamedTuple):
    """Output of :func:`smooth` (all in the compute dtype, float64 by default).

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


# ----------------------------------------------------------------------------------------
# Input validation and preparation
# ----------------------------------------------------------------------------------------


class _Prepared(NamedTuple):
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


def _prepare(params, obs, mask, dtype) -> _Prepared:
    """Validate every argument (before any numerical work), then cast and broadcast."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    missing = [f for f in LGSSM._fields if not hasattr(params, f)]
    if missing:
        raise TypeError(
            f"params: expected an LGSSM with fields {LGSSM._fields}, "
            f"got {type(params).__name__} missing {missing}"
        )
    p = {f: _to_tensor(getattr(params, f), f"params.{f}") for f in LGSSM._fields}
    obs = _to_tensor(obs, "obs")

    # ---- shapes ------------------------------------------------------------------------
    init_loc = p["init_loc"]
    if init_loc.dim() < 1 or init_loc.shape[-1] < 1:
        raise ValueError(f"init_loc: expected shape (..., Z) with Z >= 1, got {_shape(init_loc)}")
    Z = init_loc.shape[-1]

    def check_square(name, x, n, what):
        if x.dim() < 2 or x.shape[-2:] != (n, n):
            raise ValueError(
                f"{name}: expected shape (..., {n}, {n}) ({what}), got {_shape(x)}"
            )

    check_square("init_cov", p["init_cov"], Z, "Z from init_loc.shape[-1]")
    check_square("trans_cov", p["trans_cov"], Z, "Z from init_loc.shape[-1]")
    A = p["trans_matrix"]
    if A.dim() < 3 or A.shape[-2:] != (Z, Z):
        raise ValueError(
            f"trans_matrix: expected shape (..., T, {Z}, {Z}) (Z from init_loc.shape[-1]), "
            f"got {_shape(A)}"
        )
    C = p["obs_matrix"]
    if C.dim() < 3 or C.shape[-1] != Z or C.shape[-2] < 1:
        raise ValueError(
            f"obs_matrix: expected shape (..., T, D, {Z}) with D >= 1 "
            f"(Z from init_loc.shape[-1]), got {_shape(C)}"
        )
    D = C.shape[-2]
    check_square("obs_cov", p["obs_cov"], D, "D from obs_matrix.shape[-2]")
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
    if mask is not None:
        mask = _to_tensor(mask, "mask")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask: expected a bool tensor (True = observed), got dtype {mask.dtype}")
        if mask.dim() < 1 or mask.shape[-1] != T:
            raise ValueError(
                f"mask: expected shape (..., {T}) (T from obs.shape[-2]; obs.shape[:-1] = "
                f"{_shape(obs)[:-1]}), got {_shape(mask)}"
            )

    batch_parts = {
        "init_loc": init_loc.shape[:-1],
        "init_cov": p["init_cov"].shape[:-2],
        "trans_matrix": A.shape[:-3],
        "trans_cov": p["trans_cov"].shape[:-2],
        "obs_matrix": C.shape[:-3],
        "obs_cov": p["obs_cov"].shape[:-2],
        "obs": obs.shape[:-2],
    }
    if mask is not None:
        batch_parts["mask"] = mask.shape[:-1]
    try:
        batch_shape = torch.broadcast_shapes(*batch_parts.values())
    except RuntimeError:
        desc = ", ".join(f"{k}: {tuple(v)}" for k, v in batch_parts.items())
        raise ValueError(f"batch dimensions do not broadcast: {desc}") from None

    # ---- values ------------------------------------------------------------------------
    device = obs.device
    p = {k: v.to(device=device, dtype=dtype) for k, v in p.items()}
    for k, v in p.items():
        if k == "trans_matrix":
            v = v[..., 1:, :, :]  # trans_matrix[..., 0, :, :] is unused
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"params.{k} contains NaN or inf")
    for k in ("init_cov", "trans_cov", "obs_cov"):
        S = p[k]
        src = getattr(params, k)
        # tolerance relative to the precision the caller's matrix was built in
        src_dtype = src.dtype if isinstance(src, torch.Tensor) and src.is_floating_point() else dtype
        src_eps = torch.finfo(src_dtype).eps
        asym = (S - S.transpose(-1, -2)).abs().amax(dim=(-1, -2))
        scale = S.abs().amax(dim=(-1, -2))
        if bool((asym > math.sqrt(src_eps) * scale).any()):
            raise ValueError(f"{k} is not symmetric (max |S - S^T| = {float(asym.max()):.3g})")
        S = 0.5 * (S + S.transpose(-1, -2))
        if bool((torch.linalg.cholesky_ex(S.detach()).info != 0).any()):
            raise ValueError(f"{k} is not positive definite")
        p[k] = S

    if mask is None:
        mask_b = torch.ones(batch_shape + (T,), dtype=torch.bool, device=device)
    else:
        mask_b = mask.to(device).expand(batch_shape + (T,))
    obs_b = obs.to(dtype).expand(batch_shape + (T, D))
    bad = ~torch.isfinite(obs_b).all(-1) & mask_b
    if bool(bad.any()):
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"obs contains NaN or inf at an observed step (mask True); first at batch/time "
            f"index {first}. Set mask False there, or fill the value."
        )
    # Replace masked entries *before* any arithmetic so NaNs there cannot reach the
    # result or its gradient (torch.where routes a zero gradient to them).
    obs_b = torch.where(mask_b.unsqueeze(-1), obs_b, torch.zeros((), dtype=dtype, device=device))

    return _Prepared(
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


def _sym(S: torch.Tensor) -> torch.Tensor:
    return 0.5 * (S + S.transpose(-1, -2))


def _logdet_chol(L: torch.Tensor) -> torch.Tensor:
    """log|S| / 2 for S = L L^T."""
    return L.diagonal(dim1=-2, dim2=-1).log().sum(-1)


# ----------------------------------------------------------------------------------------
# Information-form factors (pyro.ops.gaussian, row-vector convention)
# ----------------------------------------------------------------------------------------


def _factors(q: _Prepared, shift: Optional[torch.Tensor] = None) -> Tuple[Gaussian, Optional[Gaussian]]:
    """Build the Markov chain of Gaussian factors whose contraction is p(a_obs).

    Returns ``init`` (a Gaussian over ``z[0]``, batch ``B``) holding
    ``p(z[0]) p(a[0] | z[0])^{mask[0]}`` and ``trans`` (a Gaussian over the pair
    ``(z[t-1], z[t])``, batch ``B + (T-1,)``, or ``None`` when ``T == 1``) holding
    ``p(z[t] | z[t-1]) p(a[t] | z[t])^{mask[t]}`` for ``t = 1..T-1``.

    pyro.ops.gaussian writes ``y = x @ M + noise``; our ``z_t = A_t z_{t-1} + w`` is
    the same with ``M = A_t^T``.  The observation factor ``log N(a_t; C_t z_t, R)``
    as a function of ``z_t`` is built directly in information form and multiplied by
    ``mask[t]`` (0 or 1), so a missing step contributes the zero Gaussian
    (log-normaliser 0, info 0, precision 0), i.e. the constant function 1 -- exactly
    what marginalising the missing ``a_t`` out of the joint gives.  No normalisation
    correction is then needed.

    ``shift`` (``B + (T, Z)``, optional) re-expresses every factor in the variables
    ``d_t = z_t - shift_t``.  This is a volume-preserving change of variables, so all
    integrals (the log marginal) are unchanged for any ``shift``; choosing it close to
    the posterior mean keeps the information vectors and log-normalisers O(1) instead
    of O(|a|^2 / noise^2), which removes the catastrophic cancellation the information
    form otherwise suffers at small noise.
    """
    B, T, Z, D = q.batch_shape, q.T, q.Z, q.D
    dtype, device = q.obs.dtype, q.obs.device
    maskf = q.mask.to(dtype)

    # Observation factors over z_t (or d_t), batch B + (T,).
    resid = q.obs
    if shift is not None:
        resid = resid - (q.obs_matrix @ shift.unsqueeze(-1)).squeeze(-1)
    L_R = torch.linalg.cholesky(q.obs_cov).unsqueeze(-3)  # B + (1, D, D)
    W = torch.linalg.solve_triangular(L_R, q.obs_matrix, upper=False)  # L_R^{-1} C_t
    u = torch.linalg.solve_triangular(L_R, resid.unsqueeze(-1), upper=False)  # L_R^{-1} a_t
    Wt = W.transpose(-1, -2)
    obs_prec = Wt @ W  # C^T R^{-1} C
    obs_info = (Wt @ u).squeeze(-1)  # C^T R^{-1} a
    obs_lognorm = -0.5 * D * _LOG_2PI - _logdet_chol(L_R) - 0.5 * u.squeeze(-1).pow(2).sum(-1)
    obs_g = Gaussian(
        obs_lognorm * maskf,
        obs_info * maskf.unsqueeze(-1),
        obs_prec * maskf.unsqueeze(-1).unsqueeze(-1),
    )

    # Prior over z_0.
    loc0 = q.init_loc if shift is None else q.init_loc - shift[..., 0, :]
    L0 = torch.linalg.cholesky(q.init_cov)
    u0 = torch.linalg.solve_triangular(L0, loc0.unsqueeze(-1), upper=False)
    init_info = torch.linalg.solve_triangular(L0.transpose(-1, -2), u0, upper=True).squeeze(-1)
    init_prec = _sym(torch.cholesky_inverse(L0))
    init_lognorm = -0.5 * Z * _LOG_2PI - _logdet_chol(L0) - 0.5 * u0.squeeze(-1).pow(2).sum(-1)
    init = Gaussian(init_lognorm, init_info, init_prec) + obs_g[(Ellipsis, 0)]
    if T == 1:
        return init, None

    # Transition noise w_t ~ N(offset_t, Q) with offset_t = A_t shift_{t-1} - shift_t.
    A = q.trans_matrix[..., 1:, :, :]
    L_Q = torch.linalg.cholesky(q.trans_cov).unsqueeze(-3)  # B + (1, Z, Z)
    noise_prec = _sym(torch.cholesky_inverse(L_Q)).expand(B + (T - 1, Z, Z))
    noise_lognorm = (-0.5 * Z * _LOG_2PI - _logdet_chol(L_Q)).expand(B + (T - 1,))
    if shift is None:
        noise_info = torch.zeros(B + (T - 1, Z), dtype=dtype, device=device)
    else:
        offset = (A @ shift[..., :-1, :].unsqueeze(-1)).squeeze(-1) - shift[..., 1:, :]
        v = torch.linalg.solve_triangular(L_Q, offset.unsqueeze(-1), upper=False)
        noise_info = torch.linalg.solve_triangular(L_Q.transpose(-1, -2), v, upper=True).squeeze(-1)
        noise_lognorm = noise_lognorm - 0.5 * v.squeeze(-1).pow(2).sum(-1)
    noise = Gaussian(noise_lognorm, noise_info, noise_prec)
    trans = matrix_and_gaussian_to_gaussian(A.transpose(-1, -2), noise)  # row-vector convention
    trans = trans + obs_g[(Ellipsis, slice(1, None))].event_pad(left=Z)
    return init, trans


def _posterior_mean(init: Gaussian, trans: Optional[Gaussian], T: int, Z: int) -> torch.Tensor:
    """Smoothed mean ``B + (T, Z)`` by pyro's parallel FFBS with zero noise (no autograd).

    Used as the centring point of ``log_marginal(..., method="pyro")``.
    """
    with torch.no_grad():
        init = Gaussian(init.log_normalizer.detach(), init.info_vec.detach(), init.precision.detach())
        B = init.batch_shape
        zeros = init.info_vec.new_zeros(B + (T, Z))
        if trans is None:
            return init.rsample(noise=zeros[..., 0, :]).unsqueeze(-2)
        trans = Gaussian(trans.log_normalizer.detach(), trans.info_vec.detach(), trans.precision.detach())
        return sequential_gaussian_filter_sample(init, trans, (), noise=zeros)


# ----------------------------------------------------------------------------------------
# Lean parallel scan (default method of log_marginal)
# ----------------------------------------------------------------------------------------
#
# For a linear-Gaussian model, with z_hat and Sigma the posterior mean and covariance of
# z given the observed a, and J = Sigma^{-1} the (block-tridiagonal) posterior precision,
#
#     log p(a) = log p(a, z_hat) + (T Z / 2) log(2 pi) - (1/2) log|J|            (value)
#     grad log p(a) = E_{z ~ p(z|a)} [grad_theta log p(a, z)]                    (Fisher)
#
# The second line needs only z_hat, the marginal covariances Sigma_tt and the lag-one
# cross covariances Sigma_{t,t-1}, and has a closed form (the EM sufficient statistics).
# All three quantities come from one tree factorisation of J (odd-even cyclic
# reduction, depth ceil(log2 T)) followed by two downward sweeps of the same depth
# (means, and a selected inversion for the covariances).  The tree runs without
# autograd; the gradient is assembled in closed form in _ScanLogMarginal.backward.
# This is several times cheaper than reverse-mode autodiff through the scan, and
# numerically better: log p(a, z_hat) is a sum of whitened residuals of size O(1), so
# the |a|^2/noise^2 terms that cancel in a plain information-form scan never appear.


def _shared_mat(fn, X: torch.Tensor) -> torch.Tensor:
    """Apply a left operator ``fn`` that is shared over time to every ``X[..., k, :, :]``.

    ``X`` is ``(..., K, n, m)``; the time axis is folded into the columns so ``fn`` runs
    once per batch element on an ``(n, K*m)`` matrix instead of ``K`` times on tiny ones.
    """
    K, n, m = X.shape[-3:]
    Y = fn(X.movedim(-3, -2).reshape(X.shape[:-3] + (n, K * m)))
    return Y.reshape(Y.shape[:-1] + (K, m)).movedim(-2, -3)


def _shared_vec(fn, x: torch.Tensor) -> torch.Tensor:
    """Same for vectors ``x (..., K, n)``."""
    return fn(x.transpose(-1, -2)).transpose(-1, -2)


def _lsolve(L: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve_triangular(L, X, upper=False)


# Layout notes (these matter more than flop counts for 4x4 blocks on CPU):
# * the tree works time-major, ``(K, *batch, Z, Z)``, so that ranges of time steps are
#   contiguous and batched products never need an implicit copy;
# * batched products of tiny matrices run through a naive kernel that is ~1.7x faster
#   when the right operand is column-major (``B.mT`` of a row-major ``B``); LAPACK
#   results (``inv``) are column-major already, and symmetric matrices are passed as
#   ``S.mT``; elsewhere a transposed copy is made (far cheaper than a product).


class _Level(NamedTuple):
    n: int  # number of eliminated latents (contracted pairs) at this level
    odd: bool  # an unpaired last element was carried to the next level
    Minv: torch.Tensor  # (n, ..., Z, Z)  M^{-1} (column-major), M = precision of the eliminated latent
    Ga: torch.Tensor  # (n, ..., Z, Z)  cp_x M^{-1}     (left coupling, transposed gain)
    Gc: torch.Tensor  # (n, ..., Z, Z)  cp_y^T M^{-1}   (right coupling, transposed gain)


def _halves(x: torch.Tensor, n: int):
    """Even and odd time slots of ``x (K, ...)`` as contiguous ``(n, ...)`` tensors."""
    x = x[: 2 * n].unflatten(0, (n, 2)).movedim(1, 0).contiguous()
    return x[0], x[1]


def _tree_factor(aa, cp, bb):
    """Pairwise tree reduction (cyclic reduction) of pair-factor precisions; no autograd.

    A pair factor over ``(left, right)`` has precision ``[[aa, -cp], [-cp^T, bb]]``, each
    block ``(K, ..., Z, Z)`` (``cp = A^T Q^{-1}`` at the base: the sign is folded in so
    that no negations are needed below).  Contracting ``x(a, b)`` with ``y(b, c)`` over
    ``b`` is a Schur complement: with ``M = bb_x + aa_y``,
    ``aa = aa_x - cp_x M^{-1} cp_x^T``, ``cp = cp_x M^{-1} cp_y``,
    ``bb = bb_y - cp_y^T M^{-1} cp_y``.  Depth ``ceil(log2 K)``.  ``M`` is SPD (it
    contains ``Q^{-1}``); it is inverted by LU, which for these small blocks is about
    twice as fast as Cholesky + ``cholesky_inverse``.

    Returns the levels, the top blocks ``(..., Z, Z)`` and ``sum log|M|`` ``(...)``.
    """
    levels = []
    logdet = aa.new_zeros(aa.shape[1:-2])
    while aa.shape[0] > 1:
        K = aa.shape[0]
        n = K // 2
        aa_x, aa_y = _halves(aa, n)
        cp_x, cp_y = _halves(cp, n)
        cpT_y = cp_y.transpose(-1, -2).contiguous()
        bb_x, bb_y = _halves(bb, n)
        M = bb_x + aa_y
        Minv = torch.linalg.inv_ex(M)[0]  # column-major: already the fast right operand
        logdet = logdet + torch.linalg.slogdet(M)[1].sum(0)
        Ga = cp_x @ Minv
        Gc = cpT_y @ Minv
        cp_yF = cpT_y.transpose(-1, -2)  # = cp_y, in the fast layout
        new = (aa_x - Ga @ cp_x.transpose(-1, -2), Ga @ cp_yF, bb_y - Gc @ cp_yF)
        if K % 2:
            new = tuple(torch.cat([x, old[2 * n :]], 0) for x, old in zip(new, (aa, cp, bb)))
        aa, cp, bb = new
        levels.append(_Level(n, bool(K % 2), Minv, Ga, Gc))
    return levels, aa[0], cp[0], bb[0], logdet


def _tree_info(levels, ha, hb):
    """The same reduction for the information vectors ``(K, ..., Z)`` of both halves.

    With ``b = hb_x + ha_y``: ``ha = ha_x + cp_x M^{-1} b``, ``hb = hb_y + cp_y^T M^{-1} b``.
    Returns the per-level ``b`` and the top halves ``(..., Z)``.
    """
    bs = []
    for lev in levels:
        n = lev.n
        b = (hb[0 : 2 * n : 2] + ha[1 : 2 * n : 2]).unsqueeze(-1)
        new_a = ha[0 : 2 * n : 2] + (lev.Ga @ b).squeeze(-1)
        new_b = hb[1 : 2 * n : 2] + (lev.Gc @ b).squeeze(-1)
        if lev.odd:
            new_a = torch.cat([new_a, ha[2 * n :]], 0)
            new_b = torch.cat([new_b, hb[2 * n :]], 0)
        ha, hb = new_a, new_b
        bs.append(b)
    return bs, ha[0], hb[0]


def _interleave(coarse, mid, n: int, odd: bool):
    """Fine-level boundary values along dim 0: coarse at even slots, ``mid`` at odd."""
    fine = coarse.new_empty((2 * n + odd + 1,) + coarse.shape[1:])
    fine[0 : 2 * n + 1 : 2] = coarse[: n + 1]
    fine[1 : 2 * n : 2] = mid
    if odd:
        fine[2 * n + 1] = coarse[n + 1]
    return fine


def _tree_means(levels, bs, ends):
    """Posterior means ``(T, ..., Z)`` from those of the outermost latents ``(2, ..., Z)``.

    The eliminated latent of a pair has conditional mean
    ``M^{-1} (b + cp_x^T a + cp_y c)`` given its neighbours ``a, c``; the sweep inverts
    the tree level by level.
    """
    bnd = ends
    for lev, b in zip(reversed(levels), reversed(bs)):
        n = lev.n
        a = bnd[0:n].unsqueeze(-1)
        c = bnd[1 : n + 1].unsqueeze(-1)
        mid = lev.Minv @ b + lev.Ga.transpose(-1, -2) @ a + lev.Gc.transpose(-1, -2) @ c
        bnd = _interleave(bnd, mid.squeeze(-1), n, lev.odd)
    return bnd


def _tree_covs(levels, diag, cross):
    """Selected inversion: marginal covariances ``(T, ..., Z, Z)`` and lag-one cross
    covariances ``cross[t] = Cov(z_t, z_{t+1})`` ``(T-1, ..., Z, Z)``.

    Starts from the top ``diag (2, ..., Z, Z)`` and ``cross (1, ..., Z, Z)`` of the two
    outermost latents.  An eliminated latent is ``b = mean + Ha a + Hc c + noise`` with
    ``Ha = Ga^T = M^{-1} cp_x^T``, ``Hc = Gc^T = M^{-1} cp_y`` and noise covariance
    ``M^{-1}``, so ``Cov(b, a) = Ha S_aa + Hc S_ca``, ``Cov(b, c) = Ha S_ac + Hc S_cc``
    and ``Cov(b, b) = M^{-1} + Cov(b, a) Ha^T + Cov(b, c) Hc^T``.
    """
    for lev in reversed(levels):
        n = lev.n
        Ha = lev.Ga.transpose(-1, -2).contiguous()
        Hc = lev.Gc.transpose(-1, -2).contiguous()
        S_aa = diag[0:n]  # symmetric: S.mT == S is the fast right operand
        S_cc = diag[1 : n + 1]
        S_ac = cross[0:n]
        S_ca = S_ac.transpose(-1, -2).contiguous()
        S_ba = Ha @ S_aa.transpose(-1, -2) + Hc @ S_ac.transpose(-1, -2)
        S_bc = Ha @ S_ca.transpose(-1, -2) + Hc @ S_cc.transpose(-1, -2)
        # Minv is symmetric: its transpose is the row-major view of the same values
        S_bb = lev.Minv.transpose(-1, -2) + S_ba @ Ha.transpose(-1, -2) + S_bc @ Hc.transpose(-1, -2)
        new_cross = cross.new_empty((2 * n + lev.odd,) + cross.shape[1:])
        new_cross[0 : 2 * n : 2] = S_ba.transpose(-1, -2)  # Cov(a, b)
        new_cross[1 : 2 * n : 2] = S_bc  # Cov(b, c)
        if lev.odd:
            new_cross[2 * n] = cross[n]
        diag = _interleave(diag, S_bb, n, lev.odd)
        cross = new_cross
    return diag, cross


class _Posterior(NamedTuple):
    means: torch.Tensor  # (..., T, Z)
    covs: torch.Tensor  # (..., T, Z, Z)
    cross: torch.Tensor  # (..., T-1, Z, Z)   Cov(z_t, z_{t+1})
    logdet_J: torch.Tensor  # (...)


def _time_major(x: torch.Tensor, event_dims: int) -> torch.Tensor:
    return x.movedim(-1 - event_dims, 0).contiguous()


def _batch_major(x: torch.Tensor, event_dims: int) -> torch.Tensor:
    return x.movedim(0, -1 - event_dims).contiguous()


def _scan_posterior(q: _Prepared, with_covs: bool = True) -> _Posterior:
    """Smoothed moments and ``log|J|`` by the parallel tree (no autograd)."""
    with torch.no_grad():
        T, Z = q.T, q.Z
        maskf = q.mask.to(q.obs.dtype)
        L_R = torch.linalg.cholesky(q.obs_cov)
        W = _shared_mat(lambda X: _lsolve(L_R, X), q.obs_matrix)  # L_R^{-1} C_t
        O = (W.transpose(-1, -2) @ W) * maskf[..., None, None]  # C^T R^{-1} C (0 if missing)
        o = (W.transpose(-1, -2) @ _shared_vec(lambda X: _lsolve(L_R, X), q.obs).unsqueeze(-1))
        o = o.squeeze(-1) * maskf.unsqueeze(-1)  # C^T R^{-1} a
        L0 = torch.linalg.cholesky(q.init_cov)
        init_P = torch.cholesky_inverse(L0) + O[..., 0, :, :]
        init_h = torch.cholesky_solve(q.init_loc.unsqueeze(-1), L0).squeeze(-1) + o[..., 0, :]
        if T == 1:
            L_top = torch.linalg.cholesky(init_P)
            means = torch.cholesky_solve(init_h.unsqueeze(-1), L_top).squeeze(-1).unsqueeze(-2)
            covs = torch.cholesky_inverse(L_top).unsqueeze(-3)
            cross = covs.new_zeros(covs.shape[:-3] + (0, Z, Z))
            return _Posterior(means, covs, cross, 2.0 * _logdet_chol(L_top))
        L_Q = torch.linalg.cholesky(q.trans_cov)
        Y = _shared_mat(lambda X: _lsolve(L_Q, X), q.trans_matrix[..., 1:, :, :])  # L_Q^{-1} A_t
        Yt = Y.transpose(-1, -2).contiguous()
        aa = _time_major(Yt @ Yt.transpose(-1, -2), 2)  # A^T Q^{-1} A (fast operand layout)
        QiA = _shared_mat(lambda X: torch.linalg.solve_triangular(L_Q.transpose(-1, -2), X, upper=True), Y)
        cp = _time_major(QiA.transpose(-1, -2), 2)  # A^T Q^{-1} (minus the off-diagonal block)
        Qi = torch.cholesky_inverse(L_Q)
        bb = _time_major(Qi.unsqueeze(-3) + O[..., 1:, :, :], 2)
        levels, aa, cp, bb, logdet = _tree_factor(aa, cp, bb)
        S = torch.cat(
            [torch.cat([aa + init_P, -cp], -1), torch.cat([-cp.transpose(-1, -2), bb], -1)], -2
        )
        L_top = torch.linalg.cholesky(S)
        logdet = logdet + 2.0 * _logdet_chol(L_top)
        S_top = torch.cholesky_inverse(L_top)
        hb = _time_major(o[..., 1:, :], 1)
        bs, ha, hb = _tree_info(levels, torch.zeros_like(hb), hb)
        ends = (S_top @ torch.cat([ha + init_h, hb], -1).unsqueeze(-1)).squeeze(-1)
        means = _tree_means(levels, bs, torch.stack([ends[..., :Z], ends[..., Z:]], 0))
        means = _batch_major(means, 1)
        if not with_covs:
            return _Posterior(means, None, None, logdet)
        S_top = _sym(S_top)
        diag = torch.stack([S_top[..., :Z, :Z], S_top[..., Z:, Z:]], 0)
        covs, cross = _tree_covs(levels, diag, S_top[..., :Z, Z:].unsqueeze(0))
        return _Posterior(means, _batch_major(covs, 2), _batch_major(cross, 2), logdet)


class _Joint(NamedTuple):
    value: torch.Tensor  # (...)  log p(a_obs, z)
    e0: torch.Tensor  # (..., Z)     z_0 - init_loc
    s: torch.Tensor  # (..., T, D)  a_t - C_t z_t (masked steps: -C_t z_t, weighted by 0)
    r: Optional[torch.Tensor]  # (..., T-1, Z)  z_t - A_t z_{t-1}
    A: Optional[torch.Tensor]  # (..., T-1, Z, Z)  trans_matrix[..., 1:, :, :], contiguous


def _joint_log_density(q: _Prepared, z: torch.Tensor) -> _Joint:
    """``log p(a_obs, z)`` from whitened residuals (all O(1) when ``z`` is the posterior
    mean, so nothing cancels even at tiny noise)."""
    T, Z, D = q.T, q.Z, q.D
    maskf = q.mask.to(q.obs.dtype)
    L0 = torch.linalg.cholesky(q.init_cov)
    L_R = torch.linalg.cholesky(q.obs_cov)
    e0 = z[..., 0, :] - q.init_loc
    s = q.obs - (q.obs_matrix @ z.unsqueeze(-1)).squeeze(-1)
    u0 = _lsolve(L0, e0.unsqueeze(-1)).squeeze(-1)
    us = _shared_vec(lambda X: _lsolve(L_R, X), s)
    value = (
        -0.5 * Z * _LOG_2PI - _logdet_chol(L0) - 0.5 * u0.pow(2).sum(-1)
        - maskf.sum(-1) * (0.5 * D * _LOG_2PI + _logdet_chol(L_R))
        - 0.5 * (us.pow(2).sum(-1) * maskf).sum(-1)
    )
    if T == 1:
        return _Joint(value, e0, s, None, None)
    L_Q = torch.linalg.cholesky(q.trans_cov)
    A = q.trans_matrix[..., 1:, :, :].contiguous()
    r = z[..., 1:, :] - (A @ z[..., :-1, :].unsqueeze(-1)).squeeze(-1)
    ur = _shared_vec(lambda X: _lsolve(L_Q, X), r)
    value = value - (T - 1) * (0.5 * Z * _LOG_2PI + _logdet_chol(L_Q)) - 0.5 * ur.pow(2).sum((-1, -2))
    return _Joint(value, e0, s, r, A)


class _ScanLogMarginal(torch.autograd.Function):
    """log p(a_obs) from the parallel tree, with the Fisher-identity gradient.

    Value: ``log p(a, z_hat) + (T Z / 2) log(2 pi) - log|J| / 2`` (exact for Gaussians).
    Gradient: ``E_{p(z|a)}[grad log p(a, z)]`` in closed form from the posterior mean,
    marginal covariances and lag-one cross covariances.  Inputs are the prepared (cast,
    symmetrised, broadcast) tensors; autograd maps the returned gradients back through
    that preparation (e.g. sums over broadcast dims).  First derivatives only
    (``once_differentiable``); ``method="pyro"`` supports higher ones.
    """

    @staticmethod
    def forward(ctx, need_grad, init_loc, init_cov, trans_matrix, trans_cov, obs_matrix, obs_cov, obs, mask):
        q = _Prepared(init_loc, init_cov, trans_matrix, trans_cov, obs_matrix, obs_cov, obs, mask,
                      mask.shape[:-1], obs.shape[-2], init_loc.shape[-1], obs.shape[-1])
        post = _scan_posterior(q, with_covs=need_grad)
        j = _joint_log_density(q, post.means)
        if need_grad:
            ctx.save_for_backward(init_cov, j.A, trans_cov, obs_matrix, obs_cov, mask.to(obs.dtype),
                                  post.means, post.covs, post.cross, j.e0, j.s, j.r)
            ctx.trans_shape = trans_matrix.shape
        return j.value + 0.5 * q.T * q.Z * _LOG_2PI - 0.5 * post.logdet_J

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (init_cov, At, Q, C, R, maskf, z, covs, cross, e0, s, r) = ctx.saved_tensors
        T = z.shape[-2]
        g1 = g.unsqueeze(-1)
        g2 = g1.unsqueeze(-1)

        def inv(S):
            return torch.cholesky_inverse(torch.linalg.cholesky(S))

        def outer(x, y):
            return x.unsqueeze(-1) * y.unsqueeze(-2)

        # E_post[grad log p(a, z)]: the EM sufficient statistics.  Products are written
        # A @ B.mT with B row-major (the fast layout for tiny bmm); covariances are
        # symmetric, so S.mT == S.
        P0i = inv(init_cov)
        g_m0 = (P0i @ e0.unsqueeze(-1)).squeeze(-1) * g1
        S0 = outer(e0, e0) + covs[..., 0, :, :]
        g_P0 = 0.5 * (P0i @ S0 @ P0i - P0i) * g2

        Ri = inv(R)
        sm = s * maskf.unsqueeze(-1)
        CS = C @ covs.transpose(-1, -2)  # C_t S_tt, (..., T, D, Z)
        U = sm.transpose(-1, -2) @ s + ((CS @ C.transpose(-1, -2)) * maskf[..., None, None]).sum(-3)
        g_R = 0.5 * (Ri @ U @ Ri - maskf.sum(-1)[..., None, None] * Ri) * g2
        # d/dC_t = m_t R^{-1} (s_t z_t^T - C_t S_tt);  d/da_t = -m_t R^{-1} s_t
        g_C = _shared_mat(lambda X: Ri @ X, (outer(s, z) - CS) * (maskf[..., None, None] * g2.unsqueeze(-3)))
        g_obs = -_shared_vec(lambda X: Ri @ X, sm * g2)

        g_A = z.new_zeros(ctx.trans_shape)
        g_Q = torch.zeros_like(Q)
        if T > 1:
            Qi = inv(Q)
            X = At @ covs[..., :-1, :, :].contiguous().transpose(-1, -2)  # A_t S_{t-1,t-1}
            crossT = cross.transpose(-1, -2).contiguous()  # S_{t,t-1}
            # d/dA_t = Q^{-1} E[(z_t - A_t z_{t-1}) z_{t-1}^T]
            E1 = (outer(r, z[..., :-1, :]) + crossT - X) * g2.unsqueeze(-3)
            g_A[..., 1:, :, :] = _shared_mat(lambda Y: Qi @ Y, E1)
            # sum_t E[(z_t - A_t z_{t-1})(z_t - A_t z_{t-1})^T]
            Y = (At @ crossT.transpose(-1, -2)).sum(-3)  # sum_t A_t S_{t-1,t}
            St = (
                r.transpose(-1, -2) @ r
                + covs[..., 1:, :, :].sum(-3)
                - Y
                - Y.transpose(-1, -2)
                + (X @ At.transpose(-1, -2)).sum(-3)  # sum_t A_t S_{t-1,t-1} A_t^T
            )
            g_Q = 0.5 * (Qi @ St @ Qi - (T - 1) * Qi) * g2
        return None, g_m0, g_P0, g_A, g_Q, g_C, g_R, g_obs, None


def _scan_log_marginal(q: _Prepared) -> torch.Tensor:
    inputs = (q.init_loc, q.init_cov, q.trans_matrix, q.trans_cov, q.obs_matrix, q.obs_cov, q.obs)
    need_grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    return _ScanLogMarginal.apply(need_grad, *inputs, q.mask)


# ----------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------


def log_marginal(
    params: LGSSM,
    obs: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    dtype: torch.dtype = torch.float64,
    method: str = "scan",
) -> torch.Tensor:
    """Exact ``log p(a_observed)`` by a parallel scan over time (O(log T) depth).

    The joint of Fraccaro et al. 2017 eq. (2) is a Markov chain of Gaussian factors,
    one per consecutive latent pair, ``p(z_t | z_{t-1}) p(a_t | z_t)^{mask_t}``
    (information form; pyro's row-vector convention ``y = x @ M`` is wrapped with
    ``M = A_t^T``).  The latents are integrated out by a pairwise tree reduction, as in
    :class:`pyro.distributions.GaussianHMM` / ``sequential_gaussian_tensordot``.

    Missing data: the observation factor of a masked step is the zero Gaussian
    (log-normaliser, information vector and precision all multiplied by 0), i.e. the
    constant 1 -- exactly what integrating the missing ``a_t`` out of the joint gives.
    The result is therefore exactly the log density of the observed sub-vector, with no
    normalisation correction; it is exactly 0 for a sequence with no observed step.

    Methods:

    * ``"scan"`` (default).  The tree reduces only the precision blocks (odd-even cyclic
      reduction of the block-tridiagonal posterior precision ``J``), then two downward
      sweeps of the same depth give the posterior mean ``z_hat``, the marginal
      covariances and the lag-one cross covariances.  The value is the exact Gaussian
      identity ``log p(a) = log p(a, z_hat) + (T Z / 2) log(2 pi) - log|J| / 2``; the
      gradient is Fisher's identity ``grad log p(a) = E_{p(z|a)}[grad log p(a, z)]``,
      assembled in closed form from those moments (the EM sufficient statistics)
      instead of by reverse-mode autodiff through the scan.  About 10x faster than the
      sequential filter for batch 32, T = 2000 (``docs/lgssm.md``).  First derivatives
      only: differentiating the gradient again raises an error.
    * ``"pyro"``.  The same reduction built from ``pyro.ops.gaussian`` (``Gaussian``,
      ``matrix_and_gaussian_to_gaussian``, ``sequential_gaussian_tensordot``,
      ``gaussian_tensordot``, ``event_logsumexp``), differentiated by autograd, so
      derivatives of every order are available; several times slower.

    Precision: in the information form the log-normalisers carry terms of size
    ``|a|^2 / noise^2`` that cancel in the final sum; at small noise (variances ~1e-8)
    the plain form lost ~1e-5 absolute (4e-8 relative) in float64 and was meaningless
    in float32.  ``"scan"`` never forms those terms (``log p(a, z_hat)`` is a sum of
    whitened residuals of size O(1)).  ``"pyro"`` re-centres: a gradient-free pass
    computes ``z_hat`` (pyro's FFBS with zero noise) and the factors are rebuilt in the
    variables ``z_t - z_hat_t``, a change of variables that leaves the integral
    unchanged for any ``z_hat``, so the value and all its derivatives stay exact with
    ``z_hat`` treated as a constant.  In the small-noise test both agree with a
    50-digit mpmath Kalman filter to ~1e-11.

    Args:
        params: :class:`LGSSM`; shapes as documented there.
        obs: ``(..., T, D)`` observations ``a``; masked entries may hold anything,
            including NaN (they are replaced before any arithmetic).
        mask: ``(..., T)`` bool, True = observed; ``None`` = all observed.
        dtype: compute and return dtype (default float64; see the module docstring on
            why float32 is unsafe for small noise).
        method: ``"scan"`` (default) or ``"pyro"``, see above.

    Returns:
        ``(...)`` tensor in ``dtype``.  Differentiable w.r.t. every parameter and
        ``obs`` (gradients are finite, and exactly zero for masked ``obs`` entries,
        even when those hold NaN).
    """
    if method not in ("scan", "pyro"):
        raise ValueError(f"method: expected 'scan' or 'pyro', got {method!r}")
    q = _prepare(params, obs, mask, dtype)
    if method == "scan":
        result = _scan_log_marginal(q)
    else:  # "pyro"
        init, trans = _factors(q)
        init, trans = _factors(q, shift=_posterior_mean(init, trans, q.T, q.Z))
        if trans is None:
            g = init
        else:
            g = gaussian_tensordot(init, sequential_gaussian_tensordot(trans), dims=q.Z)
        result = g.event_logsumexp()
    return torch.where(q.mask.any(-1), result, torch.zeros((), dtype=result.dtype, device=result.device))


def _kalman_filter(q: _Prepared):
    """Sequential covariance-form Kalman filter (Joseph update, Cholesky solves)."""
    T, Z, D = q.T, q.Z, q.D
    dtype, device = q.obs.dtype, q.obs.device
    eye = torch.eye(Z, dtype=dtype, device=device)
    maskf = q.mask.to(dtype)
    A, C, Q, R = q.trans_matrix, q.obs_matrix, q.trans_cov, q.obs_cov

    m, P = q.init_loc, q.init_cov
    means, covs, pmeans, pcovs, incs = [], [], [], [], []
    # unbind once: indexing [..., t] inside the loop would make the backward pass O(T^2)
    # (each slice's backward materialises a zero gradient of the full size)
    As, Cs, ys, ms_ = A.unbind(-3), C.unbind(-3), q.obs.unbind(-2), maskf.unbind(-1)
    for t in range(T):
        if t > 0:
            At = As[t]
            m = (At @ m.unsqueeze(-1)).squeeze(-1)
            P = _sym(At @ P @ At.transpose(-1, -2) + Q)
        pmeans.append(m)
        pcovs.append(P)
        Ct = Cs[t]
        CP = Ct @ P  # (D, Z)
        S = _sym(CP @ Ct.transpose(-1, -2) + R)
        L = torch.linalg.cholesky(S)
        innov = ys[t] - (Ct @ m.unsqueeze(-1)).squeeze(-1)
        # Gain K = P C^T S^{-1}; zero at masked steps, which skips the update exactly.
        K = torch.cholesky_solve(CP, L).transpose(-1, -2) * ms_[t][..., None, None]
        m = m + (K @ innov.unsqueeze(-1)).squeeze(-1)
        IKC = eye - K @ Ct
        P = _sym(IKC @ P @ IKC.transpose(-1, -2) + K @ R @ K.transpose(-1, -2))
        w = torch.linalg.solve_triangular(L, innov.unsqueeze(-1), upper=False).squeeze(-1)
        inc = -0.5 * D * _LOG_2PI - _logdet_chol(L) - 0.5 * w.pow(2).sum(-1)
        incs.append(inc * ms_[t])
        means.append(m)
        covs.append(P)
    incs = torch.stack(incs, -1)
    return FilterResult(
        means=torch.stack(means, -2),
        covs=torch.stack(covs, -3),
        pred_means=torch.stack(pmeans, -2),
        pred_covs=torch.stack(pcovs, -3),
        log_increments=incs,
        log_marginal=incs.sum(-1),
    )


def filter(  # noqa: A001 - name mirrors the dynamax API
    params: LGSSM,
    obs: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> FilterResult:
    """Kalman filter with missing data (sequential over time, batched over ``...``).

    Predict ``m_t^- = A_t m_{t-1}``, ``P_t^- = A_t P_{t-1} A_t^T + Q``; update with
    ``S = C_t P_t^- C_t^T + R`` (Cholesky), ``K = P_t^- C_t^T S^{-1}`` (Cholesky solve)
    and the Joseph form ``P_t = (I - K C_t) P_t^- (I - K C_t)^T + K R K^T``, which
    stays symmetric positive semi-definite under rounding; covariances are
    re-symmetrised every step.  At a masked step the gain is zero, so the update is
    skipped and the filtered moments equal the predicted ones.  With every step
    masked the output is the prior predictive.

    Args:
        params: :class:`LGSSM`.
        obs: ``(..., T, D)``; masked entries may be NaN.
        mask: ``(..., T)`` bool, True = observed; ``None`` = all observed.
        dtype: compute/return dtype (default float64).

    Returns:
        :class:`FilterResult` with ``means (..., T, Z)``, ``covs (..., T, Z, Z)``,
        ``pred_means``, ``pred_covs``, ``log_increments (..., T)``,
        ``log_marginal (...)``.
    """
    return _kalman_filter(_prepare(params, obs, mask, dtype))


def smooth(
    params: LGSSM,
    obs: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    dtype: torch.dtype = torch.float64,
    method: str = "rts",
) -> SmoothResult:
    """Smoothed moments of ``p(z_t | all observed a)`` -- the posterior ``p(z | a)``
    the KVAE's ELBO integrates over.

    ``method="rts"`` (default): Rauch-Tung-Striebel, sequential over time and
    differentiable.  Backward recursion with ``G_t = P_t A_{t+1}^T (P_{t+1}^-)^{-1}``
    (Cholesky solve) and the covariance in the sum-of-PSD-terms form
    ``P_t^s = (I - G_t A_{t+1}) P_t (I - G_t A_{t+1})^T + G_t Q G_t^T + G_t P_{t+1}^s G_t^T``
    (algebraically equal to ``P_t + G_t (P_{t+1}^s - P_{t+1}^-) G_t^T`` but without the
    cancellation).  Lag-one cross covariances ``Cov(z_{t+1}, z_t | a) = P_{t+1}^s G_t^T``.

    ``method="scan"``: the parallel tree of :func:`log_marginal` (cyclic reduction of
    the posterior precision, then downward sweeps for the means and a selected
    inversion for the covariances); O(log T) depth, no autograd (results carry no
    gradient).

    Args:
        params: :class:`LGSSM`.
        obs: ``(..., T, D)``; masked entries may be NaN.
        mask: ``(..., T)`` bool, True = observed; ``None`` = all observed.
        dtype: compute/return dtype (default float64).
        method: ``"rts"`` or ``"scan"``.

    Returns:
        :class:`SmoothResult` with ``means (..., T, Z)``, ``covs (..., T, Z, Z)``,
        ``cross_covs (..., T-1, Z, Z)`` and ``log_marginal (...)``.
    """
    if method not in ("rts", "scan"):
        raise ValueError(f"method: expected 'rts' or 'scan', got {method!r}")
    q = _prepare(params, obs, mask, dtype)
    if method == "scan":
        with torch.no_grad():
            post = _scan_posterior(q)
            value = _joint_log_density(q, post.means).value
            value = value + 0.5 * q.T * q.Z * _LOG_2PI - 0.5 * post.logdet_J
            value = torch.where(q.mask.any(-1), value, torch.zeros_like(value))
        return SmoothResult(post.means, post.covs, post.cross.transpose(-1, -2), value)
    f = _kalman_filter(q)
    T, Z = q.T, q.Z
    eye = torch.eye(Z, dtype=q.obs.dtype, device=q.obs.device)
    # unbind once: indexing inside the loop would make the backward pass O(T^2)
    As = q.trans_matrix.unbind(-3)
    fm, fc = f.means.unbind(-2), f.covs.unbind(-3)
    pm, pc = f.pred_means.unbind(-2), f.pred_covs.unbind(-3)
    ms, Ps = fm[T - 1], fc[T - 1]
    means, covs, cross = [ms], [Ps], []
    for t in range(T - 2, -1, -1):
        A1 = As[t + 1]
        m, P = fm[t], fc[t]
        L = torch.linalg.cholesky(pc[t + 1])
        # G^T = (P^-_{t+1})^{-1} A_{t+1} P_t
        G = torch.cholesky_solve(A1 @ P, L).transpose(-1, -2)
        cross.append(Ps @ G.transpose(-1, -2))
        ms = m + (G @ (ms - pm[t + 1]).unsqueeze(-1)).squeeze(-1)
        IGA = eye - G @ A1
        Gt = G.transpose(-1, -2)
        Ps = _sym(IGA @ P @ IGA.transpose(-1, -2) + G @ q.trans_cov @ Gt + G @ Ps @ Gt)
        means.append(ms)
        covs.append(Ps)
    means.reverse()
    covs.reverse()
    cross.reverse()
    if cross:
        cross_covs = torch.stack(cross, -3)
    else:
        cross_covs = f.covs.new_zeros(q.batch_shape + (0, Z, Z))
    return SmoothResult(
        means=torch.stack(means, -2),
        covs=torch.stack(covs, -3),
        cross_covs=cross_covs,
        log_marginal=f.log_marginal,
    )


def sample_posterior(
    params: LGSSM,
    obs: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    num_samples: int = 1,
    *,
    dtype: torch.dtype = torch.float64,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Joint draws ``z_{1:T} ~ p(z | a_observed)`` (forward filtering, backward sampling).

    Uses the same masked information-form factors as :func:`log_marginal` and pyro's
    parallel-scan FFBS (``sequential_gaussian_filter_sample``), so the draws are joint
    over time (correct cross-time covariances), not independent marginals.  The draws
    are reparameterised: differentiable w.r.t. the parameters and ``obs``.

    Args:
        params: :class:`LGSSM`.
        obs: ``(..., T, D)``; masked entries may be NaN.
        mask: ``(..., T)`` bool, True = observed; ``None`` = all observed.
        num_samples: number of joint draws ``N >= 1``.
        dtype: compute/return dtype (default float64).
        generator: optional ``torch.Generator`` for the standard-normal noise.

    Returns:
        ``(N, ..., T, Z)`` tensor in ``dtype``.
    """
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
    q = _prepare(params, obs, mask, dtype)
    init, trans = _factors(q)
    shape = (num_samples,) + tuple(q.batch_shape) + (q.T, q.Z)
    noise = torch.randn(shape, dtype=q.obs.dtype, device=q.obs.device, generator=generator)
    if trans is None:
        return init.rsample((num_samples,), noise=noise[..., 0, :]).unsqueeze(-2)
    return sequential_gaussian_filter_sample(init, trans, (num_samples,), noise=noise)
