"""Tests for the pyro_models/lgssm package against an independent dense-Gaussian reference.

The reference builds the joint Gaussian over (z_1..z_T, a_1..a_T) by explicit linear
algebra (z = F (m + eps) with F = (I - blocksubdiag(A))^{-1}), then obtains every
quantity by selecting the observed sub-vector and Gaussian conditioning.  It shares no
code with the package under test.  ``lgssm_reference`` holds two further paths that only
these tests use: the ``pyro.ops.gaussian`` log marginal (any-order derivatives) and the
smoothed moments of the parallel tree.
"""

import zlib

import pyro
import pytest
import torch

from lgssm_reference import HostSync, forbid_host_sync, pyro_log_marginal, tree_smooth
from pyro_models import lgssm
from pyro_models.lgssm import LGSSM, condition_on, filter, log_marginal, predict, sample_posterior, smooth

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny batched matrices gain nothing from intra-op threads, and OpenMP spinning
    under CPU contention (e.g. another test process on a 2-core machine) made this
    module 15x slower; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def _spd(shape, n, gen, scale=1.0):
    X = torch.randn(shape + (n, n), generator=gen, dtype=F64)
    return scale * (X @ X.transpose(-1, -2) / n + 0.3 * torch.eye(n, dtype=F64))


def random_model(batch, T, Z, D, seed, param_batch=None):
    """Random time-varying LGSSM.  ``param_batch`` (default ``batch``) is the batch of
    init/cov fields, to exercise broadcasting when it is a suffix of ``batch``."""
    gen = torch.Generator().manual_seed(seed)
    pb = batch if param_batch is None else param_batch
    A = torch.eye(Z, dtype=F64) * 0.9 + 0.2 * torch.randn(batch + (T, Z, Z), generator=gen, dtype=F64)
    C = torch.randn(batch + (T, D, Z), generator=gen, dtype=F64)
    params = LGSSM(
        init_loc=torch.randn(pb + (Z,), generator=gen, dtype=F64),
        init_cov=_spd(pb, Z, gen),
        trans_matrix=A,
        trans_cov=_spd(pb, Z, gen, 0.5),
        obs_matrix=C,
        obs_cov=_spd(pb, D, gen, 0.5),
    )
    obs = torch.randn(batch + (T, D), generator=gen, dtype=F64) * 2.0
    return params, obs, gen


def make_mask(kind, batch, T, gen):
    if kind == "none":
        return None
    if kind == "all_missing":
        return torch.zeros(batch + (T,), dtype=torch.bool)
    return torch.rand(batch + (T,), generator=gen) < 0.6


def _expand(params, obs, mask):
    """Broadcast everything to the full batch and flatten it (for per-element loops)."""
    T, D = obs.shape[-2:]
    Z = params.init_loc.shape[-1]
    batch = torch.broadcast_shapes(
        params.init_loc.shape[:-1], params.init_cov.shape[:-2], params.trans_matrix.shape[:-3],
        params.trans_cov.shape[:-2], params.obs_matrix.shape[:-3], params.obs_cov.shape[:-2],
        obs.shape[:-2],
    )
    if mask is None:
        mask = torch.ones(batch + (T,), dtype=torch.bool)
    flat = [
        params.init_loc.expand(batch + (Z,)).reshape(-1, Z),
        params.init_cov.expand(batch + (Z, Z)).reshape(-1, Z, Z),
        params.trans_matrix.expand(batch + (T, Z, Z)).reshape(-1, T, Z, Z),
        params.trans_cov.expand(batch + (Z, Z)).reshape(-1, Z, Z),
        params.obs_matrix.expand(batch + (T, D, Z)).reshape(-1, T, D, Z),
        params.obs_cov.expand(batch + (D, D)).reshape(-1, D, D),
        obs.expand(batch + (T, D)).reshape(-1, T, D),
        mask.expand(batch + (T,)).reshape(-1, T),
    ]
    return batch, flat


def dense_joint(m0, P0, A, Q, C, R):
    """Mean and covariance of the joint (z, a), z and a stacked time-major."""
    T, Z = A.shape[0], A.shape[-1]
    sub = torch.zeros(T * Z, T * Z, dtype=F64)
    for t in range(1, T):
        sub[t * Z:(t + 1) * Z, (t - 1) * Z:t * Z] = A[t]
    F = torch.linalg.inv(torch.eye(T * Z, dtype=F64) - sub)
    shift = torch.cat([m0, torch.zeros((T - 1) * Z, dtype=F64)])
    mu_z = F @ shift
    Sz = F @ torch.block_diag(P0, *([Q] * (T - 1))) @ F.T
    Cb = torch.block_diag(*[C[t] for t in range(T)])
    mu_a = Cb @ mu_z
    Sa = Cb @ Sz @ Cb.T + torch.block_diag(*([R] * T))
    Sza = Sz @ Cb.T
    return mu_z, Sz, mu_a, Sa, Sza


def dense_condition(mu_z, Sz, mu_a, Sa, Sza, a, idx):
    """Moments of z given a[idx] (idx: long tensor into the stacked a-vector)."""
    if idx.numel() == 0:
        return mu_z, Sz
    Soo = Sa[idx][:, idx]
    K = torch.linalg.solve(Soo, Sza[:, idx].T).T
    mean = mu_z + K @ (a[idx] - mu_a[idx])
    cov = Sz - K @ Sza[:, idx].T
    return mean, 0.5 * (cov + cov.T)


def obs_index(mask_row, D, upto=None):
    steps = [t for t in range(mask_row.numel()) if bool(mask_row[t]) and (upto is None or t < upto)]
    return torch.tensor([t * D + d for t in steps for d in range(D)], dtype=torch.long)


def dense_reference(params, obs, mask):
    """All reference quantities, as tensors shaped like the module's outputs."""
    batch, (m0, P0, A, Q, C, R, a, mk) = _expand(params, obs, mask)
    T, D = a.shape[-2:]
    Z = m0.shape[-1]
    out = {k: [] for k in ("ll", "fm", "fc", "pm", "pc", "sm", "sc", "xc")}
    for b in range(m0.shape[0]):
        mu_z, Sz, mu_a, Sa, Sza = dense_joint(m0[b], P0[b], A[b], Q[b], C[b], R[b])
        avec = a[b].reshape(-1)
        idx = obs_index(mk[b], D)
        if idx.numel() == 0:
            ll = torch.zeros((), dtype=F64)
        else:
            sub = avec[idx]
            ll = torch.distributions.MultivariateNormal(mu_a[idx], Sa[idx][:, idx]).log_prob(sub)
        out["ll"].append(ll)
        fm, fc, pm, pc = [], [], [], []
        for t in range(T):
            blk = slice(t * Z, (t + 1) * Z)
            m, S = dense_condition(mu_z, Sz, mu_a, Sa, Sza, avec, obs_index(mk[b], D, upto=t + 1))
            fm.append(m[blk])
            fc.append(S[blk, blk])
            m, S = dense_condition(mu_z, Sz, mu_a, Sa, Sza, avec, obs_index(mk[b], D, upto=t))
            pm.append(m[blk])
            pc.append(S[blk, blk])
        m, S = dense_condition(mu_z, Sz, mu_a, Sa, Sza, avec, idx)
        out["fm"].append(torch.stack(fm))
        out["fc"].append(torch.stack(fc))
        out["pm"].append(torch.stack(pm))
        out["pc"].append(torch.stack(pc))
        out["sm"].append(m.reshape(T, Z))
        out["sc"].append(torch.stack([S[t * Z:(t + 1) * Z, t * Z:(t + 1) * Z] for t in range(T)]))
        out["xc"].append(
            torch.stack(
                [S[(t + 1) * Z:(t + 2) * Z, t * Z:(t + 1) * Z] for t in range(T - 1)]
            ) if T > 1 else torch.zeros(0, Z, Z, dtype=F64)
        )
    return {k: torch.stack(v).reshape(batch + v[0].shape) for k, v in out.items()}


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------
# exact agreement with the dense reference
# ----------------------------------------------------------------------------------------

BATCHES = [(), (3,), (2, 3)]
TZD = [(1, 2, 1), (2, 3, 2), (5, 2, 3), (7, 3, 2)]
MASKS = ["none", "random", "all_missing"]


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("T,Z,D", TZD)
@pytest.mark.parametrize("batch", BATCHES)
def test_against_dense_reference(batch, T, Z, D, mask_kind):
    seed = zlib.crc32(repr((batch, T, Z, D, mask_kind)).encode()) % 10_000
    # For batch (2, 3) the init/cov fields carry only the trailing (3,) batch dim.
    pb = batch[1:] if len(batch) == 2 else batch
    params, obs, gen = random_model(batch, T, Z, D, seed, param_batch=pb)
    mask = make_mask(mask_kind, batch, T, gen)
    if mask is not None:
        obs = torch.where(mask.unsqueeze(-1), obs, torch.full_like(obs, float("nan")))
    ref = dense_reference(params, obs, mask)

    ll = log_marginal(params, obs, mask)
    assert ll.shape == batch and ll.dtype == F64
    close(ll, ref["ll"])

    f = filter(params, obs, mask)
    assert f.means.shape == batch + (T, Z) and f.covs.shape == batch + (T, Z, Z)
    close(f.means, ref["fm"])
    close(f.covs, ref["fc"])
    close(f.pred_means, ref["pm"])
    close(f.pred_covs, ref["pc"])
    close(f.log_marginal, ref["ll"])
    assert f.log_increments.shape == batch + (T,)

    for smoother in (smooth, tree_smooth):
        s = smoother(params, obs, mask)
        close(s.means, ref["sm"])
        close(s.covs, ref["sc"])
        assert s.cross_covs.shape == batch + (T - 1, Z, Z)
        close(s.cross_covs, ref["xc"])
        close(s.log_marginal, ref["ll"])

    if mask_kind == "all_missing":
        assert bool((ll == 0).all())  # exactly zero, not just close
        assert bool((f.log_increments == 0).all())
        close(f.means, f.pred_means)  # filter = prior predictive
        close(s.means, ref["pm"])  # smoother = prior marginals


@pytest.mark.parametrize("T,Z,D", [(9, 1, 1), (6, 2, 5), (37, 3, 2), (64, 2, 2), (65, 2, 1)])
def test_tree_shapes_against_sequential(T, Z, D):
    """Odd/even level sizes, Z = 1, D > Z: the tree against the sequential filter/RTS."""
    params, obs, gen = random_model((2,), T, Z, D, seed=T + 10 * Z + 100 * D)
    mask = make_mask("random", (2,), T, gen)
    f = filter(params, obs, mask)
    close(log_marginal(params, obs, mask), f.log_marginal)
    rts, tree = smooth(params, obs, mask), tree_smooth(params, obs, mask)
    for a, b in zip(rts, tree):
        close(a, b)
    g1 = _grads(lambda p, a: log_marginal(p, a, mask), params, obs)
    g0 = _grads(lambda p, a: filter(p, a, mask).log_marginal, params, obs)
    for a, b in zip(g1, g0):
        close(a, b)


def test_masked_steps_reduce_to_subsequence():
    """Missing steps anywhere (including the first): the filter's update is skipped
    exactly there (filtered == predicted, zero increment), and the parallel scan agrees
    with the sequential filter."""
    params, obs, gen = random_model((2,), 6, 2, 2, seed=7)
    mask = torch.tensor([[True, False, False, True, True, False], [False, True, True, True, False, True]])
    f = filter(params, obs, mask)
    close(f.means[~mask], f.pred_means[~mask], tol=0)
    close(f.covs[~mask], f.pred_covs[~mask], tol=0)
    assert bool((f.log_increments[~mask] == 0).all())
    close(log_marginal(params, obs, mask), f.log_marginal)


# ----------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------


def _grads(fn, params, obs):
    leaves = [x.detach().clone().requires_grad_(True) for x in params] + [
        obs.detach().clone().requires_grad_(True)
    ]
    out = fn(LGSSM(*leaves[:6]), leaves[6]).sum()
    return torch.autograd.grad(out, leaves, allow_unused=True)


@pytest.mark.parametrize("mask_kind", ["none", "random"])
@pytest.mark.parametrize("batch,T", [((), 1), ((3,), 5)])
def test_gradient_matches_dense_reference(batch, T, mask_kind):
    Z, D = 3, 2
    params, obs, gen = random_model(batch, T, Z, D, seed=11 + T)
    mask = make_mask(mask_kind, batch, T, gen)
    if mask is not None:
        mask[..., 0] = True  # at least one observed step per sequence
        obs_nan = torch.where(mask.unsqueeze(-1), obs, torch.full_like(obs, float("nan")))
    else:
        obs_nan = obs

    got = _grads(lambda p, a: log_marginal(p, a, mask), params, obs_nan)
    want = _grads(lambda p, a: dense_reference(p, a, mask)["ll"], params, obs)
    names = list(LGSSM._fields) + ["obs"]
    for name, g, w in zip(names, got, want):
        # unused inputs (trans_matrix / trans_cov when T = 1) have no gradient
        ref_shape = (list(params) + [obs])[names.index(name)]
        g = torch.zeros_like(ref_shape) if g is None else g
        w = torch.zeros_like(ref_shape) if w is None else w
        assert bool(torch.isfinite(g).all()), f"non-finite gradient for {name}"
        if name.endswith("_cov"):
            # Covariances are symmetric parameters: only the symmetric part of the
            # gradient is defined (the module symmetrises its input).
            g, w = 0.5 * (g + g.transpose(-1, -2)), 0.5 * (w + w.transpose(-1, -2))
        close(g, w)
    if mask is not None:
        assert bool((got[6][~mask] == 0).all())  # masked obs get exactly zero gradient


def test_no_nan_gradients_with_nan_masked_obs_all_functions():
    params, obs, gen = random_model((2,), 4, 2, 2, seed=3)
    mask = torch.tensor([[True, False, True, False], [False, False, False, False]])
    obs = torch.where(mask.unsqueeze(-1), obs, torch.full_like(obs, float("nan")))
    leaves = [x.clone().requires_grad_(True) for x in params]
    obs = obs.clone().requires_grad_(True)
    p = LGSSM(*leaves)
    total = (
        log_marginal(p, obs, mask).sum()
        + filter(p, obs, mask).means.sum()
        + smooth(p, obs, mask).covs.sum()
        + sample_posterior(p, obs, mask, 3, generator=torch.Generator().manual_seed(0)).sum()
    )
    assert bool(torch.isfinite(total))
    for g in torch.autograd.grad(total, leaves + [obs]):
        assert bool(torch.isfinite(g).all())


# ----------------------------------------------------------------------------------------
# posterior sampling
# ----------------------------------------------------------------------------------------


def test_sample_posterior_moments_and_joint_structure():
    """Monte Carlo check with N = 40000 draws.  Tolerances are 5 standard errors:
    mean:        se = sqrt(S_ii / N)
    (cross-)cov: se = sqrt((S_ii S'_jj + C_ij^2) / N)   (Gaussian fourth moments)
    over 2*5*2 + 2*5*4 + 2*4*4 = 92 checks; with a fixed seed the test is deterministic,
    and a correct sampler would fail one of them with probability ~5e-5."""
    N, batch, T, Z, D = 40000, (2,), 5, 2, 1
    params, obs, gen = random_model(batch, T, Z, D, seed=5)
    mask = torch.tensor([[True, False, True, True, False], [False, True, False, False, True]])
    x = sample_posterior(params, obs, mask, N, generator=torch.Generator().manual_seed(1))
    assert x.shape == (N,) + batch + (T, Z) and x.dtype == F64
    ref = dense_reference(params, obs, mask)
    s = smooth(params, obs, mask)
    close(s.covs, ref["sc"])

    mean = x.mean(0)
    var = ref["sc"].diagonal(dim1=-2, dim2=-1)  # (B, T, Z)
    assert bool(((mean - ref["sm"]).abs() <= 5 * (var / N).sqrt()).all())

    xc = x - mean
    emp_cov = torch.einsum("nbti,nbtj->btij", xc, xc) / (N - 1)
    se_cov = ((var.unsqueeze(-1) * var.unsqueeze(-2) + ref["sc"] ** 2) / N).sqrt()
    assert bool(((emp_cov - ref["sc"]).abs() <= 5 * se_cov).all())

    # Lag-one cross covariance Cov(z[t+1], z[t]) -- zero if draws were independent over t.
    emp_x = torch.einsum("nbti,nbtj->btij", xc[..., 1:, :], xc[..., :-1, :]) / (N - 1)
    se_x = ((var[..., 1:, :].unsqueeze(-1) * var[..., :-1, :].unsqueeze(-2) + ref["xc"] ** 2) / N).sqrt()
    assert bool(((emp_x - ref["xc"]).abs() <= 5 * se_x).all())
    assert ref["xc"].abs().max() > 10 * se_x.max()  # the check has power against marginal draws


def test_sample_posterior_T1_and_all_missing():
    params, obs, gen = random_model((3,), 1, 2, 2, seed=2)
    x = sample_posterior(params, obs, None, 5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 3, 1, 2)
    params, obs, gen = random_model((), 3, 2, 2, seed=2)
    mask = torch.zeros(3, dtype=torch.bool)
    x = sample_posterior(params, obs * float("nan"), mask, 20000, generator=torch.Generator().manual_seed(0))
    # prior mean at t=0 is init_loc; 5 standard errors
    se = (params.init_cov.diagonal() / 20000).sqrt()
    assert bool(((x[:, 0].mean(0) - params.init_loc).abs() <= 5 * se).all())


# ----------------------------------------------------------------------------------------
# precision: float32 inputs are up-cast
# ----------------------------------------------------------------------------------------


def test_small_noise_float32_matches_float64_reference():
    T, Z, D = 20, 2, 2
    gen = torch.Generator().manual_seed(0)
    A = (torch.eye(Z, dtype=F64) + 0.05 * torch.randn(T, Z, Z, generator=gen, dtype=F64))
    C = torch.randn(T, D, Z, generator=gen, dtype=F64)
    noise = 1e-4  # noise standard deviation; variances 1e-8
    p64 = LGSSM(
        torch.zeros(Z, dtype=F64), torch.eye(Z, dtype=F64), A,
        noise**2 * torch.eye(Z, dtype=F64), C, noise**2 * torch.eye(D, dtype=F64),
    )
    # simulate data from the model
    z = torch.randn(Z, generator=gen, dtype=F64)
    a = []
    for t in range(T):
        if t > 0:
            z = A[t] @ z + noise * torch.randn(Z, generator=gen, dtype=F64)
        a.append(C[t] @ z + noise * torch.randn(D, generator=gen, dtype=F64))
    obs64 = torch.stack(a)
    p32 = LGSSM(*[x.float() for x in p64])
    obs32 = obs64.float()
    # the reference sees exactly the float32 values, cast to float64
    ref = dense_reference(LGSSM(*[x.double() for x in p32]), obs32.double(), None)["ll"]
    got = log_marginal(p32, obs32)
    assert got.dtype == F64
    # |ll| ~ 275 here; the dense reference itself is accurate to ~1e-7 (checked once
    # against a 50-digit mpmath Kalman filter: dense 6.5e-8 off, log_marginal 1e-11 off).
    close(got, ref)
    seq = filter(p32, obs32).log_marginal
    close(seq, ref)
    # Two independent float64 algorithms (parallel information-form scan vs sequential
    # covariance-form filter) agree far below the reference's own error.
    torch.testing.assert_close(got, seq, rtol=0, atol=1e-9)
    # Gradients are finite and agree between the two algorithms as well.
    leaves = [x.clone().requires_grad_(True) for x in p32]
    g_par = torch.autograd.grad(log_marginal(LGSSM(*leaves), obs32), leaves, allow_unused=True)
    g_seq = torch.autograd.grad(filter(LGSSM(*leaves), obs32).log_marginal, leaves, allow_unused=True)
    for gp, gs in zip(g_par, g_seq):
        assert bool(torch.isfinite(gp).all())
        torch.testing.assert_close(gp.double(), gs.double(), rtol=1e-6, atol=1e-6 * float(gs.abs().max()))


@pytest.mark.parametrize("mask_kind", ["none", "random", "all_missing"])
@pytest.mark.parametrize("batch,T", [((3,), 1), ((3,), 2), ((3,), 7), ((2, 3), 12)])
def test_scan_and_pyro_methods_agree(batch, T, mask_kind):
    """The lean scan and the pyro.ops.gaussian pipeline: same value and gradient."""
    params, obs, gen = random_model(batch, T, 3, 2, seed=21 + T)
    mask = make_mask(mask_kind, batch, T, gen)
    g1 = _grads(lambda p, a: log_marginal(p, a, mask), params, obs)
    g0 = _grads(lambda p, a: pyro_log_marginal(p, a, mask), params, obs)
    close(log_marginal(params, obs, mask), pyro_log_marginal(params, obs, mask), 1e-9)
    for a, b, x in zip(g1, g0, list(params) + [obs]):
        # unused inputs (trans_matrix, trans_cov when T = 1): None or zeros
        close(torch.zeros_like(x) if a is None else a, torch.zeros_like(x) if b is None else b, 1e-9)


def _hessian_vector(fn, params, obs):
    Q = params.trans_cov.clone().requires_grad_(True)
    a = obs.clone().requires_grad_(True)
    ll = fn(params._replace(trans_cov=Q), a).sum()
    (gQ,) = torch.autograd.grad(ll, [Q], create_graph=True)
    return torch.autograd.grad(gQ.pow(2).sum(), [Q, a])


def test_second_derivatives_pyro_method_match_dense_reference():
    """The pyro.ops.gaussian reference centres at a constant point, so higher derivatives
    are exact."""
    params, obs, gen = random_model((2,), 5, 2, 2, seed=4)
    mask = torch.tensor([[True, False, True, True, False], [True, True, False, True, True]])
    got = _hessian_vector(lambda p, a: pyro_log_marginal(p, a, mask), params, obs)
    want = _hessian_vector(lambda p, a: dense_reference(p, a, mask)["ll"], params, obs)
    for x, y in zip(got, want):
        close(0.5 * (x + x.transpose(-1, -2)) if x.dim() == 2 else x,
              0.5 * (y + y.transpose(-1, -2)) if y.dim() == 2 else y, 1e-6)


def test_scan_method_refuses_second_derivatives():
    params, obs, gen = random_model((2,), 5, 2, 2, seed=4)
    with pytest.raises(RuntimeError):
        _hessian_vector(lambda p, a: log_marginal(p, a, None), params, obs)


# ----------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------


def _good():
    params, obs, gen = random_model((3,), 4, 2, 2, seed=0)
    return params, obs


@pytest.mark.parametrize(
    "fn", [log_marginal, filter, smooth, lambda p, o, m: sample_posterior(p, o, m, 2)]
)
@pytest.mark.parametrize(
    "case,name",
    [
        ("wrong_D", "obs"),
        ("mask_shape", "mask"),
        ("mask_dtype", "mask"),
        ("nan_observed", "obs"),
        ("T_mismatch", "trans_matrix"),
        ("nonsquare_cov", "obs_cov"),
        ("bad_obs_matrix", "obs_matrix"),
        ("not_spd", "trans_cov"),
        ("not_symmetric", "init_cov"),
        ("nan_param", "obs_matrix"),
        ("batch", "batch"),
    ],
)
def test_bad_inputs_raise_value_error(fn, case, name):
    params, obs = _good()
    mask = None
    if case == "wrong_D":
        obs = obs[..., :1]
    elif case == "mask_shape":
        mask = torch.ones(3, 5, dtype=torch.bool)
    elif case == "mask_dtype":
        mask = torch.ones(3, 4)
    elif case == "nan_observed":
        obs = obs.clone()
        obs[1, 2, 0] = float("nan")
        mask = torch.ones(3, 4, dtype=torch.bool)
        mask[0, 2] = False  # a NaN elsewhere at a masked step would be fine
    elif case == "T_mismatch":
        params = params._replace(trans_matrix=params.trans_matrix[..., :3, :, :])
    elif case == "nonsquare_cov":
        params = params._replace(obs_cov=params.obs_cov[..., :1])
    elif case == "bad_obs_matrix":
        params = params._replace(obs_matrix=params.obs_matrix[..., :1])
    elif case == "not_spd":
        params = params._replace(trans_cov=-params.trans_cov)
    elif case == "not_symmetric":
        bump = torch.zeros(2, 2, dtype=F64)
        bump[0, 1] = 0.1
        params = params._replace(init_cov=params.init_cov + bump)
    elif case == "nan_param":
        C = params.obs_matrix.clone()
        C[0, 1, 0, 0] = float("nan")
        params = params._replace(obs_matrix=C)
    elif case == "batch":
        obs = torch.randn(4, 4, 2, dtype=F64)  # batch (4,) vs (3,)
    with pytest.raises(ValueError, match=name):
        fn(params, obs, mask)


def test_nan_at_masked_step_is_allowed():
    params, obs = _good()
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2] = False
    obs = obs.clone()
    obs[1, 2] = float("nan")
    assert bool(torch.isfinite(log_marginal(params, obs, mask)).all())


def test_obs_and_mask_broadcast_against_parameter_batch():
    params, obs, gen = random_model((3,), 4, 2, 2, seed=8)
    shared_obs = obs[0]  # (T, D), shared by the 3 parameter sets
    mask = torch.tensor([True, False, True, True])  # (T,)
    got = log_marginal(params, shared_obs, mask)
    want = log_marginal(params, shared_obs.expand(3, 4, 2), mask.expand(3, 4))
    assert got.shape == (3,)
    close(got, want, 1e-12)
    close(smooth(params, shared_obs, mask).means, smooth(params, shared_obs.expand(3, 4, 2), mask.expand(3, 4)).means, 1e-12)


def test_unused_first_transition_matrix_may_be_nan():
    params, obs = _good()
    A = params.trans_matrix.clone()
    A[..., 0, :, :] = float("nan")
    p = params._replace(trans_matrix=A)
    close(log_marginal(p, obs), log_marginal(params, obs), 0)
    close(smooth(p, obs).means, smooth(params, obs).means, 0)


def test_sample_posterior_bad_num_samples():
    params, obs = _good()
    with pytest.raises(ValueError, match="num_samples"):
        sample_posterior(params, obs, None, 0)


# ----------------------------------------------------------------------------------------
# step functions
# ----------------------------------------------------------------------------------------


def _step_filter(params, obs, mask):
    """A filter built by looping the public step functions (no validation, no casting)."""
    T = obs.shape[-2]
    mean, cov = params.init_loc, params.init_cov
    out = {k: [] for k in ("means", "covs", "pred_means", "pred_covs", "log_increments")}
    for t in range(T):
        if t > 0:
            mean, cov = predict(mean, cov, params.trans_matrix[..., t, :, :], params.trans_cov)
        out["pred_means"].append(mean)
        out["pred_covs"].append(cov)
        step_mask = None if mask is None else mask[..., t]
        C_t, a_t = params.obs_matrix[..., t, :, :], obs[..., t, :]
        mean, cov, inc = condition_on(mean, cov, C_t, params.obs_cov, a_t, step_mask)
        out["means"].append(mean)
        out["covs"].append(cov)
        out["log_increments"].append(inc)
    stacked = {k: torch.stack(v, -2 if k.endswith("means") else -3) for k, v in out.items() if k != "log_increments"}
    stacked["log_increments"] = torch.stack(out["log_increments"], -1)
    return stacked


@pytest.mark.parametrize("mask_kind", ["none", "random", "all_missing"])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_step_loop_matches_filter(batch, mask_kind):
    """predict / condition_on in a loop give filter(...)'s moments and log-likelihood, with
    missing steps (NaN observations there) skipped exactly; both match the dense reference."""
    T, Z, D = 7, 3, 2
    params, obs, gen = random_model(batch, T, Z, D, seed=31 + len(batch))
    mask = make_mask(mask_kind, batch, T, gen)
    if mask is not None:
        mask[..., 1] = False  # at least one missing step
        obs = torch.where(mask.unsqueeze(-1), obs, torch.full_like(obs, float("nan")))
    loop = _step_filter(params, obs, mask)
    f = filter(params, obs, mask)
    for name in ("means", "covs", "pred_means", "pred_covs", "log_increments"):
        close(loop[name], getattr(f, name), 1e-12)
    close(loop["log_increments"].sum(-1), f.log_marginal, 1e-12)
    ref = dense_reference(params, obs, mask)
    close(loop["means"], ref["fm"])
    close(loop["covs"], ref["fc"])
    close(loop["log_increments"].sum(-1), ref["ll"])
    if mask is not None:
        close(loop["means"][~mask], loop["pred_means"][~mask], tol=0)
        close(loop["covs"][~mask], loop["pred_covs"][~mask], tol=0)
        assert bool((loop["log_increments"][~mask] == 0).all())


def test_condition_on_mask_none_equals_all_observed():
    params, obs, gen = random_model((3,), 1, 2, 2, seed=12)
    args = (params.init_loc, params.init_cov, params.obs_matrix[:, 0], params.obs_cov, obs[:, 0])
    for a, b in zip(condition_on(*args), condition_on(*args, torch.ones(3, dtype=torch.bool))):
        close(a, b, 0)


def test_rts_smooth_of_a_step_filter_equals_smooth():
    params, obs, gen = random_model((2,), 6, 2, 2, seed=13)
    mask = make_mask("random", (2,), 6, gen)
    f = filter(params, obs, mask)
    s = lgssm.rts_smooth(f, params.trans_matrix, params.trans_cov)
    for a, b in zip(s, smooth(params, obs, mask)):
        close(a, b, 1e-12)


# ----------------------------------------------------------------------------------------
# opt-in validation
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", ["none", "random"])
def test_log_marginal_validation_off_same_value_and_gradient(mask_kind):
    params, obs, gen = random_model((3,), 9, 3, 2, seed=14)
    mask = make_mask(mask_kind, (3,), 9, gen)
    on = _grads(lambda p, a: log_marginal(p, a, mask, validate_args=True), params, obs)
    off = _grads(lambda p, a: log_marginal(p, a, mask, validate_args=False), params, obs)
    close(log_marginal(params, obs, mask, validate_args=False), log_marginal(params, obs, mask, validate_args=True), 0)
    for a, b in zip(off, on):
        close(a, b, 0)


def test_log_marginal_validation_off_does_no_host_sync(monkeypatch):
    """The training hot path: forward and backward without a tensor read back to the host
    and without the raising Cholesky; with validation on the same guard trips."""
    params, obs, gen = random_model((3,), 9, 3, 2, seed=15)
    mask = make_mask("random", (3,), 9, gen)
    leaves = [x.clone().requires_grad_(True) for x in params]
    forbid_host_sync(monkeypatch)
    value = log_marginal(LGSSM(*leaves), obs, mask, validate_args=False)
    torch.autograd.grad(value.sum(), leaves)
    with pytest.raises(HostSync):
        log_marginal(LGSSM(*leaves), obs, mask, validate_args=True)


@pytest.mark.parametrize(
    "fn",
    [log_marginal, filter, smooth, lambda p, o, m, **kw: sample_posterior(p, o, m, 2, **kw)],
)
def test_validate_args_none_follows_pyro_switch(fn):
    params, obs = _good()
    bump = torch.zeros(2, 2, dtype=F64)
    bump[0, 1] = 0.1
    params = params._replace(init_cov=params.init_cov + bump)  # not symmetric
    with pyro.validation_enabled(False):
        fn(params, obs, None)  # no check: the symmetric part is used
        with pytest.raises(ValueError, match="init_cov"):
            fn(params, obs, None, validate_args=True)
    with pytest.raises(ValueError, match="init_cov"):
        fn(params, obs, None)  # conftest enables Pyro validation
    fn(params, obs, None, validate_args=False)


def test_shapes_are_checked_with_validation_off():
    params, obs = _good()
    with pytest.raises(ValueError, match="obs"):
        log_marginal(params, obs[..., :1], validate_args=False)
    with pytest.raises(ValueError, match="mask"):
        log_marginal(params, obs, torch.ones(3, 4), validate_args=False)


# ----------------------------------------------------------------------------------------
# benchmark smoke test
# ----------------------------------------------------------------------------------------


def test_benchmark_script_runs_tiny(tmp_path):
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "lgssm.json"
    subprocess.run([sys.executable, "benchmarks/lgssm.py", "--T", "3", "6", "--batch", "2", "--repeats", "1", "--threads", "0",
                    "--out", str(out)], cwd=root, check=True, capture_output=True)
    data = json.loads(out.read_text())
    assert [r["T"] for r in data["results"]] == [3, 6]
    assert all(r["rel_diff_loglik"] < 1e-10 for r in data["results"])


def test_the_smoother_returns_through_a_long_gap_under_growing_dynamics():
    """A learned A with an eigenvalue above 1 over a long gap: the predicted covariance spans ~130 orders of
    magnitude and is singular or indefinite once rounded (Cholesky and LU refuse it; the KVAE's imputation
    on JSB died of this); the smoother still returns, exactly right where the answer is determined."""
    from pyro_models.lgssm import LGSSM, smooth

    T, Z = 200, 2
    rotation = torch.tensor([[0.8, -0.6], [0.6, 0.8]], dtype=torch.float64)
    A = rotation @ torch.diag(torch.tensor([2.2, 0.5], dtype=torch.float64)) @ rotation.T
    params = LGSSM(torch.zeros(Z, dtype=torch.float64), torch.eye(Z, dtype=torch.float64),
                   A.expand(T, Z, Z), 1e-2 * torch.eye(Z, dtype=torch.float64),
                   torch.eye(Z, dtype=torch.float64).expand(T, Z, Z), 1e-2 * torch.eye(Z, dtype=torch.float64))
    mask = torch.zeros(T, dtype=torch.bool)
    mask[:2] = True
    obs = torch.ones(T, Z, dtype=torch.float64)
    result = smooth(params, obs, mask, validate_args=False)
    # the unobserved future carries no information: the first two steps are those of the 2-step problem
    short = smooth(LGSSM(*(f[:2] if f.dim() == 3 else f for f in params)), obs[:2])
    assert torch.allclose(result.means[:2], short.means, atol=1e-6), (result.means[:2], short.means)
    # the covariances lose the directions rounding hid (~10% here), and stay positive semi-definite
    assert torch.allclose(result.covs[:2], short.covs, rtol=0.1, atol=1e-4)
    assert (torch.linalg.eigvalsh(result.covs[:2]) > 0).all()
    assert torch.isfinite(result.means).all() and result.covs[-1].diagonal().max() > 1e60  # the gap's growth
