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
uncentred information form lost 1e-5 absolute there, so :func:`log_marginal` re-centres
its scan at the smoothed mean (see its docstring).  Only pass ``dtype=torch.float32``
when the noise covariances are well conditioned.

Public API (pure functions returning tensors or NamedTuples, in the style of dynamax's
``linear_gaussian_ssm``)::

    LGSSM(init_loc, init_cov, trans_matrix, trans_cov, obs_matrix, obs_cov)
    log_marginal(params, obs, mask=None, *, dtype=torch.float64, method="scan") -> (...)
    filter(params, obs, mask=None, *, dtype=torch.float64) -> FilterResult
    smooth(params, obs, mask=None, *, dtype=torch.float64) -> SmoothResult
    sample_posterior(params, obs, mask=None, num_samples=1, *, dtype=torch.float64,
                     generator=None) -> (num_samples, ..., T, Z)

Inputs are validated before any work; errors are ``ValueError`` naming the argument, the
expected shape and the received one.
"""

import math
from typing import NamedTuple, Optional, Tuple

import torch
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
# Same information-form factors as _factors(), but stored as plain tensors and with the
# precision reduction separated from the information-vector reduction:
#
# * precisions do not depend on the data or on the centring shift, so the tree of
#   Schur complements (and the inverses M^{-1} of the eliminated blocks) is computed
#   once, with autograd;
# * a gradient-free information sweep over that tree plus a downward sweep gives the
#   smoothed mean z_hat (the same recursion as FFBS with zero noise);
# * a second information sweep, in the variables z - z_hat (autograd on), accumulates
#   the log-normaliser.  In those variables every information vector is O(1) in
#   whitened units, so the large |a|^2/noise^2 terms never appear and nothing cancels.
#
# The value is an exact identity for any shift (the shift is a volume-preserving change
# of variables), so detaching z_hat gives exact derivatives of every order.


class _SPDInverse(torch.autograd.Function):
    """``(M^{-1}, log|M|)`` of a batch of small SPD matrices via one Cholesky.

    Its backward, ``dM = -M^{-1} G M^{-1} + g_logdet M^{-1}``, is a few batched
    products, several times cheaper than autograd through ``cholesky`` and
    ``solve_triangular`` on tiny matrices (the dominant cost of the scan); it is written
    with differentiable operations, so higher derivatives work too.
    """

    @staticmethod
    def forward(ctx, M):
        L = torch.linalg.cholesky(M)
        Minv = _sym(torch.cholesky_inverse(L))
        ctx.save_for_backward(Minv)
        return Minv, 2.0 * _logdet_chol(L)

    @staticmethod
    def backward(ctx, g_inv, g_logdet):
        (Minv,) = ctx.saved_tensors
        grad = Minv * g_logdet[..., None, None]
        if g_inv is not None:
            grad = grad - Minv @ g_inv @ Minv
        return grad


class _Level(NamedTuple):
    n: int  # number of contracted pairs at this level
    odd: bool  # an unpaired last element was carried to the next level
    Minv: torch.Tensor  # (..., n, Z, Z)  inverse precision of the eliminated variable
    ab_x: torch.Tensor  # (..., n, Z, Z)  coupling (left neighbour, eliminated)
    ab_y: torch.Tensor  # (..., n, Z, Z)  coupling (eliminated, right neighbour)
    logdet: torch.Tensor  # (...)  sum of log|M| over the level


def _pairs(x: torch.Tensor, dim: int):
    """Split ``x`` along time dim ``dim`` (negative) into even, odd and carried parts.

    Uses split/unflatten/unbind rather than strided indexing: their backward passes are
    concatenations, whereas the backward of basic slicing materialises a zero tensor of
    the full input size per slice, which dominated the run time.
    """
    K = x.shape[dim]
    n = K // 2
    carry = None
    if K % 2:
        x, carry = x.split([2 * n, 1], dim=dim)
    even, odd = x.unflatten(dim, (n, 2)).unbind(dim)
    return even, odd, carry


def _cat_carry(new: torch.Tensor, carry: Optional[torch.Tensor], dim: int) -> torch.Tensor:
    return new if carry is None else torch.cat([new, carry], dim)


def _precision_sweep(aa: torch.Tensor, ab: torch.Tensor, bb: torch.Tensor):
    """Pairwise tree reduction of pair-factor precisions given as blocks.

    A pair factor over ``(left, right)`` has precision ``[[aa, ab], [ab^T, bb]]``, each
    block ``(..., K, Z, Z)``.  Contracting ``x(a, b)`` with ``y(b, c)`` over ``b`` is a
    Schur complement: with ``M = bb_x + aa_y``, ``aa = aa_x - ab_x M^{-1} ab_x^T``,
    ``ab = -ab_x M^{-1} ab_y``, ``bb = bb_y - ab_y^T M^{-1} ab_y``.  Depth
    ``ceil(log2 K)``.  Returns the levels and the top blocks ``(..., Z, Z)``.
    """
    levels = []
    while aa.shape[-3] > 1:
        K = aa.shape[-3]
        aa_x, aa_y, aa_c = _pairs(aa, -3)
        ab_x, ab_y, ab_c = _pairs(ab, -3)
        bb_x, bb_y, bb_c = _pairs(bb, -3)
        Minv, logdet = _SPDInverse.apply(bb_x + aa_y)
        Xa = Minv @ ab_x.transpose(-1, -2)
        Xc = Minv @ ab_y
        aa = _cat_carry(aa_x - ab_x @ Xa, aa_c, -3)
        ab = _cat_carry(-(ab_x @ Xc), ab_c, -3)
        bb = _cat_carry(bb_y - ab_y.transpose(-1, -2) @ Xc, bb_c, -3)
        levels.append(_Level(K // 2, bool(K % 2), Minv, ab_x, ab_y, logdet.sum(-1)))
    return levels, aa.squeeze(-3), ab.squeeze(-3), bb.squeeze(-3)


def _info_sweep(levels, ha: torch.Tensor, hb: torch.Tensor):
    """The same reduction for the information vectors ``(..., K, Z)`` of both halves.

    With ``b = hb_x + ha_y`` and ``y = M^{-1} b``: ``ha = ha_x - ab_x y``,
    ``hb = hb_y - ab_y^T y``, and the log-normaliser gains ``b^T M^{-1} b / 2``.
    Returns the per-level ``b``, the top halves ``(..., Z)`` and ``sum b^T M^{-1} b``.
    """
    bs = []
    quad = ha.new_zeros(ha.shape[:-2])
    for lev in levels:
        ha_x, ha_y, ha_c = _pairs(ha, -2)
        hb_x, hb_y, hb_c = _pairs(hb, -2)
        b = (hb_x + ha_y).unsqueeze(-1)
        y = lev.Minv @ b
        ha = _cat_carry(ha_x - (lev.ab_x @ y).squeeze(-1), ha_c, -2)
        hb = _cat_carry(hb_y - (lev.ab_y.transpose(-1, -2) @ y).squeeze(-1), hb_c, -2)
        quad = quad + (b * y).sum((-1, -2, -3))
        bs.append(b)
    return bs, ha.squeeze(-2), hb.squeeze(-2), quad


def _down_sweep(levels, bs, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Means of all latents ``(..., T, Z)`` from those of the outermost two (no autograd).

    Inverts the tree level by level: the eliminated variable of a pair has conditional
    mean ``M^{-1} (b - ab_x^T a - ab_y c)`` given its neighbours ``a, c``.
    """
    bnd = torch.stack([first, last], -2)
    Z = first.shape[-1]
    for lev, b in zip(reversed(levels), reversed(bs)):
        n = lev.n
        a = bnd[..., 0:n, :].unsqueeze(-1)
        c = bnd[..., 1 : n + 1, :].unsqueeze(-1)
        mid = (lev.Minv @ (b - lev.ab_x.transpose(-1, -2) @ a - lev.ab_y @ c)).squeeze(-1)
        fine = bnd.new_empty(bnd.shape[:-2] + (2 * n + lev.odd + 1, Z))
        fine[..., 0 : 2 * n + 1 : 2, :] = bnd[..., : n + 1, :]
        fine[..., 1 : 2 * n : 2, :] = mid
        if lev.odd:
            fine[..., 2 * n + 1, :] = bnd[..., n + 1, :]
        bnd = fine
    return bnd


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


def _lower_solver(L: torch.Tensor, transpose: bool = False):
    if transpose:
        return lambda X: torch.linalg.solve_triangular(L.transpose(-1, -2), X, upper=True)
    return lambda X: torch.linalg.solve_triangular(L, X, upper=False)


class _BasePrec(NamedTuple):
    L_R: torch.Tensor  # B + (D, D)
    W: torch.Tensor  # B + (T, D, Z)  L_R^{-1} C_t
    L0: torch.Tensor  # B + (Z, Z)
    init_P: torch.Tensor  # B + (Z, Z)
    A: Optional[torch.Tensor]  # B + (T-1, Z, Z)  trans_matrix[..., 1:, :, :]
    L_Q: Optional[torch.Tensor]  # B + (Z, Z)
    aa: Optional[torch.Tensor]  # B + (T-1, Z, Z)  A^T Q^{-1} A
    ab: Optional[torch.Tensor]  # B + (T-1, Z, Z)  -A^T Q^{-1}
    bb: Optional[torch.Tensor]  # B + (T-1, Z, Z)  Q^{-1} + C^T R^{-1} C mask


def _base_precisions(q: _Prepared) -> _BasePrec:
    """Precisions of ``p(z_0) p(a_0|z_0)^{m_0}`` and of each pair factor, in blocks."""
    T = q.T
    maskf = q.mask.to(q.obs.dtype)
    L_R = torch.linalg.cholesky(q.obs_cov)
    W = _shared_mat(_lower_solver(L_R), q.obs_matrix)
    O = (W.transpose(-1, -2) @ W) * maskf[..., None, None]  # C^T R^{-1} C, 0 if missing
    L0 = torch.linalg.cholesky(q.init_cov)
    P0i = _sym(torch.cholesky_inverse(L0))
    if T == 1:
        return _BasePrec(L_R, W, L0, P0i + O.squeeze(-3), *[None] * 5)
    O0, O1 = O.split([1, T - 1], -3)
    L_Q = torch.linalg.cholesky(q.trans_cov)
    Qi = _sym(torch.cholesky_inverse(L_Q))
    A = q.trans_matrix.split([1, T - 1], -3)[1]
    QiA = _shared_mat(lambda X: Qi @ X, A)
    aa = A.transpose(-1, -2) @ QiA
    return _BasePrec(
        L_R, W, L0, P0i + O0.squeeze(-3), A, L_Q, aa, -QiA.transpose(-1, -2), Qi.unsqueeze(-3) + O1
    )


def _base_info(q: _Prepared, bp: _BasePrec, shift: Optional[torch.Tensor]):
    """Information vectors and log-normalisers of the same factors in ``z - shift``.

    Returns ``init_h (..., Z)``, the pair-factor halves ``ha, hb (..., T-1, Z)`` (None
    if T = 1) and the sum of all factors' log-normalisers ``(...)``.
    """
    T, Z, D = q.T, q.Z, q.D
    maskf = q.mask.to(q.obs.dtype)
    resid = q.obs
    if shift is not None:
        resid = resid - (q.obs_matrix @ shift.unsqueeze(-1)).squeeze(-1)
    u = _shared_vec(_lower_solver(bp.L_R), resid)  # L_R^{-1} r_t
    o = (bp.W.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1) * maskf.unsqueeze(-1)
    ln = (-0.5 * D * _LOG_2PI - _logdet_chol(bp.L_R)).unsqueeze(-1) - 0.5 * u.pow(2).sum(-1)
    ln = (ln * maskf).sum(-1)
    loc0 = q.init_loc if shift is None else q.init_loc - shift[..., 0, :]
    u0 = torch.linalg.solve_triangular(bp.L0, loc0.unsqueeze(-1), upper=False)
    init_h = torch.linalg.solve_triangular(bp.L0.transpose(-1, -2), u0, upper=True).squeeze(-1)
    ln = ln - 0.5 * Z * _LOG_2PI - _logdet_chol(bp.L0) - 0.5 * u0.squeeze(-1).pow(2).sum(-1)
    if T == 1:
        return init_h + o.squeeze(-2), None, None, ln
    o0, o1 = o.split([1, T - 1], -2)
    init_h = init_h + o0.squeeze(-2)
    if shift is None:
        ha, hb = torch.zeros_like(o1), o1
    else:
        off = (bp.A @ shift[..., :-1, :].unsqueeze(-1)).squeeze(-1) - shift[..., 1:, :]
        v = _shared_vec(_lower_solver(bp.L_Q), off)  # L_Q^{-1} offset
        Qioff = _shared_vec(_lower_solver(bp.L_Q, transpose=True), v)
        ha = -(bp.A.transpose(-1, -2) @ Qioff.unsqueeze(-1)).squeeze(-1)
        hb = Qioff + o1
        ln = ln - 0.5 * v.pow(2).sum((-1, -2))
    ln = ln - (T - 1) * (0.5 * Z * _LOG_2PI + _logdet_chol(bp.L_Q))
    return init_h, ha, hb, ln


def _scan_log_marginal(q: _Prepared) -> Tuple[torch.Tensor, torch.Tensor]:
    """log p(a_obs) ``(...)`` and the smoothed mean ``(..., T, Z)`` (detached)."""
    T, Z = q.T, q.Z
    bp = _base_precisions(q)
    if T == 1:
        levels, S = [], bp.init_P
    else:
        levels, aa, ab, bb = _precision_sweep(bp.aa, bp.ab, bp.bb)
        S = torch.cat(
            [torch.cat([aa + bp.init_P, ab], -1), torch.cat([ab.transpose(-1, -2), bb], -1)], -2
        )
    L_top = torch.linalg.cholesky(S)

    def reduce(init_h, ha, hb):
        if T == 1:
            return [], init_h, init_h.new_zeros(init_h.shape[:-1])
        bs, ha, hb, quad = _info_sweep(levels, ha, hb)
        return bs, torch.cat([ha + init_h, hb], -1), quad

    with torch.no_grad():  # smoothed mean, used only as the centring point
        bs, h, _ = reduce(*_base_info(q, bp, None)[:3])
        ends = torch.cholesky_solve(h.unsqueeze(-1), L_top).squeeze(-1)
        if T == 1:
            z_hat = ends.unsqueeze(-2)
        else:
            z_hat = _down_sweep(levels, bs, ends[..., :Z], ends[..., Z:])

    init_h, ha, hb, ln = _base_info(q, bp, z_hat)
    _, h, quad = reduce(init_h, ha, hb)
    u = torch.linalg.solve_triangular(L_top, h.unsqueeze(-1), upper=False).squeeze(-1)
    logdet = _logdet_chol(L_top)
    for lev in levels:
        logdet = logdet + 0.5 * lev.logdet  # _logdet_chol is half of log|M|
    # Each of the T latents is integrated out once: +0.5 Z log(2 pi) apiece.
    result = ln + 0.5 * T * Z * _LOG_2PI - logdet + 0.5 * (quad + u.pow(2).sum(-1))
    return result, z_hat


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

    The joint of Fraccaro et al. 2017 eq. (2) is written as a Markov chain of Gaussian
    factors in information form, one per consecutive latent pair
    ``p(z_t | z_{t-1}) p(a_t | z_t)^{mask_t}``, and the latents are integrated out by a
    pairwise tree reduction (as in :class:`pyro.distributions.GaussianHMM` /
    ``pyro.ops.gaussian.sequential_gaussian_tensordot``; pyro's row-vector convention
    ``y = x @ M`` is wrapped by using ``M = A_t^T``).

    Missing data: the observation factor of a masked step is the zero Gaussian
    (log-normaliser, information vector and precision all multiplied by 0), i.e. the
    constant 1 -- exactly what integrating the missing ``a_t`` out of the joint gives.
    The result is therefore exactly the log density of the observed sub-vector, with no
    normalisation correction; it is exactly 0 for a sequence with no observed step.

    Precision: in the information form the log-normalisers carry terms of size
    ``|a|^2 / noise^2`` that cancel in the final sum; at small noise (variances ~1e-8)
    the plain form lost ~1e-5 absolute (4e-8 relative) in float64 and was meaningless
    in float32.  Both methods therefore re-centre: a gradient-free pass computes the
    smoothed mean ``z_hat`` (FFBS with zero noise) and the factors are rebuilt in the
    variables ``z_t - z_hat_t``.  This change of variables leaves the integral
    unchanged for any ``z_hat``, so the value and all its derivatives are exact with
    ``z_hat`` treated as a constant.  In the small-noise test the result matches a
    50-digit mpmath Kalman filter to ~1e-11.

    Args:
        params: :class:`LGSSM`; shapes as documented there.
        obs: ``(..., T, D)`` observations ``a``; masked entries may hold anything,
            including NaN (they are replaced before any arithmetic).
        mask: ``(..., T)`` bool, True = observed; ``None`` = all observed.
        dtype: compute and return dtype (default float64; see the module docstring on
            why float32 is unsafe for small noise).
        method: ``"scan"`` (default): a lean implementation of the scan that reduces
            the precision matrices once and reuses their Cholesky factors for both the
            centring pass and the log-normaliser pass (about 8x faster than the
            sequential filter at T = 2000, see ``docs/lgssm.md``).  ``"pyro"``: the
            same computation built from ``pyro.ops.gaussian`` (``Gaussian``,
            ``matrix_and_gaussian_to_gaussian``, ``sequential_gaussian_tensordot``,
            ``gaussian_tensordot``, and ``sequential_gaussian_filter_sample`` with zero
            noise for the centring point); slower, kept as an independent check.

    Returns:
        ``(...)`` tensor in ``dtype``.  Differentiable w.r.t. every parameter and
        ``obs`` (gradients are finite, and exactly zero for masked ``obs`` entries,
        even when those hold NaN).
    """
    q = _prepare(params, obs, mask, dtype)
    if method == "scan":
        result, _ = _scan_log_marginal(q)
    elif method == "pyro":
        init, trans = _factors(q)
        init, trans = _factors(q, shift=_posterior_mean(init, trans, q.T, q.Z))
        if trans is None:
            g = init
        else:
            g = gaussian_tensordot(init, sequential_gaussian_tensordot(trans), dims=q.Z)
        result = g.event_logsumexp()
    else:
        raise ValueError(f"method: expected 'scan' or 'pyro', got {method!r}")
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
    for t in range(T):
        if t > 0:
            At = A[..., t, :, :]
            m = (At @ m.unsqueeze(-1)).squeeze(-1)
            P = _sym(At @ P @ At.transpose(-1, -2) + Q)
        pmeans.append(m)
        pcovs.append(P)
        Ct = C[..., t, :, :]
        CP = Ct @ P  # (D, Z)
        S = _sym(CP @ Ct.transpose(-1, -2) + R)
        L = torch.linalg.cholesky(S)
        innov = q.obs[..., t, :] - (Ct @ m.unsqueeze(-1)).squeeze(-1)
        # Gain K = P C^T S^{-1}; zero at masked steps, which skips the update exactly.
        K = torch.cholesky_solve(CP, L).transpose(-1, -2) * maskf[..., t, None, None]
        m = m + (K @ innov.unsqueeze(-1)).squeeze(-1)
        IKC = eye - K @ Ct
        P = _sym(IKC @ P @ IKC.transpose(-1, -2) + K @ R @ K.transpose(-1, -2))
        w = torch.linalg.solve_triangular(L, innov.unsqueeze(-1), upper=False).squeeze(-1)
        inc = -0.5 * D * _LOG_2PI - _logdet_chol(L) - 0.5 * w.pow(2).sum(-1)
        incs.append(inc * maskf[..., t])
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
) -> SmoothResult:
    """Rauch-Tung-Striebel smoother: moments of ``p(z_t | all observed a)``.

    This is the smoothed posterior ``p(z | a)`` that the KVAE's ELBO samples from
    (Fraccaro et al. 2017, Sec. 3.1).  Backward recursion with
    ``G_t = P_t A_{t+1}^T (P_{t+1}^-)^{-1}`` (Cholesky solve) and the covariance in the
    sum-of-PSD-terms form
    ``P_t^s = (I - G_t A_{t+1}) P_t (I - G_t A_{t+1})^T + G_t Q G_t^T + G_t P_{t+1}^s G_t^T``
    (algebraically equal to ``P_t + G_t (P_{t+1}^s - P_{t+1}^-) G_t^T`` but without the
    cancellation).  Lag-one cross covariances ``Cov(z_{t+1}, z_t | a) = P_{t+1}^s G_t^T``.

    Args:
        params: :class:`LGSSM`.
        obs: ``(..., T, D)``; masked entries may be NaN.
        mask: ``(..., T)`` bool, True = observed; ``None`` = all observed.
        dtype: compute/return dtype (default float64).

    Returns:
        :class:`SmoothResult` with ``means (..., T, Z)``, ``covs (..., T, Z, Z)``,
        ``cross_covs (..., T-1, Z, Z)`` and ``log_marginal (...)``.
    """
    q = _prepare(params, obs, mask, dtype)
    f = _kalman_filter(q)
    T, Z = q.T, q.Z
    eye = torch.eye(Z, dtype=q.obs.dtype, device=q.obs.device)
    ms = f.means[..., T - 1, :]
    Ps = f.covs[..., T - 1, :, :]
    means, covs, cross = [ms], [Ps], []
    for t in range(T - 2, -1, -1):
        A1 = q.trans_matrix[..., t + 1, :, :]
        m, P = f.means[..., t, :], f.covs[..., t, :, :]
        L = torch.linalg.cholesky(f.pred_covs[..., t + 1, :, :])
        # G^T = (P^-_{t+1})^{-1} A_{t+1} P_t
        G = torch.cholesky_solve(A1 @ P, L).transpose(-1, -2)
        cross.append(Ps @ G.transpose(-1, -2))
        dm = ms - f.pred_means[..., t + 1, :]
        ms = m + (G @ dm.unsqueeze(-1)).squeeze(-1)
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
