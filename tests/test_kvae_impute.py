"""Tests for pyro_models/kvae/impute.py: KVAE missing-frame imputation on a tiny KVAE with vector
frames, against a copy of the former O(T^2) algorithm, and the Kalman prior's hot path."""

import os
import subprocess
import sys

import pytest
import torch

from lgssm_reference import forbid_host_sync
from pyro_models import lgssm
from pyro_models.imputation import Imputation
from pyro_models.kvae import KalmanPrior, KVAEConfig, build_kvae
from pyro_models.kvae.impute import KalmanImputation, impute, kalman_impute

FRAME_SHAPE = (6,)
BATCH, STEPS = 3, 12
DROP_PROB = 0.5
TOLERANCE = 1e-5  # new O(T) algorithm against the O(T^2) reference (float32 outputs)
NUM_SAMPLES = 3
PARAM_NOISE = 0.3  # random perturbation of the dynamics bases, so alpha matters


@pytest.fixture
def kvae():
    """A tiny KVAE whose dynamics depend visibly on alpha: bases perturbed away from A = I and
    observation bases of order one (the defaults make C tiny)."""
    torch.manual_seed(0)
    config = KVAEConfig(lstm_hidden=8, mlp_hidden=(16,), init_obs_scale=1.0)
    model, guide = build_kvae(FRAME_SHAPE, config)
    with torch.no_grad():
        bases = model.dynamics.trans_bases
        bases.add_(PARAM_NOISE * torch.randn_like(bases))
    return model, guide


def _data(seed=1, first_missing=True):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand((BATCH, STEPS) + FRAME_SHAPE, generator=gen) > 0.5).float()
    mask = torch.rand(BATCH, STEPS, generator=gen) >= DROP_PROB
    mask[0, 3:6] = False  # a run of missing frames
    mask[1] = True  # a fully observed sequence
    if first_missing:
        mask[2, 0] = False
    return x, mask


# ------------------------------------------------------------------ the former O(T^2) algorithm
def _apply(matrices, vectors):
    return (matrices @ vectors.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def quadratic_kalman_impute(model, guide, x, mask):
    """The former kalman_impute: the whole filter re-run over the prefix at every missing step.
    Returns (filtered_a, smoothed_a, filtered, smoothed, alpha)."""
    model.eval(), guide.eval()
    dynamics = model.dynamics
    shown = torch.where(mask.reshape(mask.shape + (1,) * (x.dim() - 2)), x, torch.zeros_like(x))
    observed_a = guide.posterior(shown).mean
    a_prev, state, alphas = dynamics.a0.expand(x.shape[0], -1), None, []
    for t in range(x.shape[1]):
        alpha, state = dynamics.alpha_step(a_prev, state)
        alphas.append(alpha)
        a_prev = observed_a[:, t]
        if not mask[:, t].all():
            prefix = dynamics.lgssm(torch.stack(alphas, dim=1))
            prediction = lgssm.filter(prefix, observed_a[:, : t + 1], mask[:, : t + 1]).pred_means[:, t]
            predicted_a = _apply(prefix.obs_matrix[:, t], prediction.to(x.dtype))
            a_prev = torch.where(mask[:, t, None], a_prev, predicted_a)
    alpha = torch.stack(alphas, dim=1)
    params = dynamics.lgssm(alpha)
    filtered_a = _apply(params.obs_matrix, lgssm.filter(params, observed_a, mask).means.to(x.dtype))
    smoothed_a = _apply(params.obs_matrix, lgssm.smooth(params, observed_a, mask).means.to(x.dtype))

    def decode(a):
        return torch.sigmoid(model.frame_logits(a))

    return filtered_a, smoothed_a, decode(filtered_a), decode(smoothed_a), alpha


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("first_missing", [False, True])
def test_kalman_impute_equals_quadratic_reference(kvae, first_missing):
    model, guide = kvae
    x, mask = _data(first_missing=first_missing)
    got = kalman_impute(model, guide, x, mask)
    assert isinstance(got, KalmanImputation)
    want = quadratic_kalman_impute(model, guide, x, mask)
    for name, w in zip(("filtered_a", "smoothed_a", "filtered", "smoothed", "alpha"), want):
        torch.testing.assert_close(getattr(got, name), w, rtol=TOLERANCE, atol=TOLERANCE, msg=name)
    # The comparison has power: feeding the encoder's a_{t-1} at missing steps too changes alpha.
    naive_alpha = model.dynamics.alpha(got.observed_a)
    assert (naive_alpha - got.alpha).abs().max() > 100 * TOLERANCE


def test_impute_result_type_shapes_and_observed_frames(kvae):
    model, guide = kvae
    x, mask = _data()
    result = impute(model, guide, x, mask, num_samples=NUM_SAMPLES, generator=torch.Generator().manual_seed(0))
    assert isinstance(result, Imputation)
    assert result.mask is mask
    assert result.imputed.shape == x.shape
    assert result.samples.shape == (NUM_SAMPLES,) + x.shape
    assert set(result.estimates) == {"smoothing", "filtering"}
    assert result.imputed is result.estimates["smoothing"]
    for estimate in [result.imputed, *result.estimates.values(), *result.samples]:
        assert estimate.shape == x.shape
        assert torch.equal(estimate[mask], x[mask])  # observed frames untouched
        missing = estimate[~mask]
        assert bool(torch.isfinite(missing).all()) and bool(((missing >= 0) & (missing <= 1)).all())
    kalman = kalman_impute(model, guide, x, mask)
    assert torch.equal(result.imputed[~mask], kalman.smoothed[~mask])
    assert torch.equal(result.estimates["filtering"][~mask], kalman.filtered[~mask])


def test_missing_frame_content_is_never_read(kvae):
    model, guide = kvae
    x, mask = _data()
    scrambled = torch.where(mask[..., None], x, 1.0 - x)

    def run(frames):
        return impute(model, guide, frames, mask, num_samples=NUM_SAMPLES, generator=torch.Generator().manual_seed(0))

    a, b = run(x), run(scrambled)
    assert torch.equal(a.imputed[~mask], b.imputed[~mask])
    assert torch.equal(a.samples[:, ~mask], b.samples[:, ~mask])


@pytest.mark.parametrize("model_training,guide_training", [(True, True), (False, True), (False, False)])
def test_modes_are_restored(kvae, model_training, guide_training):
    model, guide = kvae
    model.train(model_training), guide.train(guide_training)
    x, mask = _data()
    impute(model, guide, x, mask, num_samples=1)
    assert (model.training, guide.training) == (model_training, guide_training)
    kalman_impute(model, guide, x, mask)
    assert (model.training, guide.training) == (model_training, guide_training)


def test_bad_arguments_raise(kvae):
    model, guide = kvae
    x, mask = _data()
    with pytest.raises(ValueError, match="mask"):
        kalman_impute(model, guide, x, mask[:, :-1])
    with pytest.raises(ValueError, match="mask"):
        impute(model, guide, x, mask.float())
    with pytest.raises(ValueError, match="num_samples"):
        impute(model, guide, x, mask, num_samples=0)


def test_kalman_prior_log_prob_does_no_host_sync(kvae, monkeypatch):
    """The training hot path: log p(a) forward and backward with no tensor read back to the host."""
    model, _ = kvae
    a = torch.randn(BATCH, STEPS, model.config.a_dim, requires_grad=True)
    prior = KalmanPrior(model.dynamics, (BATCH,), STEPS, model.config.a_dim)
    forbid_host_sync(monkeypatch)
    value = prior.log_prob(a)
    assert value.shape == (BATCH,) and value.dtype == a.dtype
    value.sum().backward()
    monkeypatch.undo()
    assert bool(torch.isfinite(a.grad).all())


def test_benchmark_script_runs_tiny(tmp_path, repo_root):
    import json

    out = tmp_path / "kvae_impute.json"
    script = os.path.join(repo_root, "benchmarks", "kvae_impute.py")
    subprocess.run([sys.executable, script, "--T", "4", "8", "--batch", "2", "--repeats", "1", "--num-samples", "1",
                    "--out", str(out)], check=True, capture_output=True, cwd=repo_root)
    data = json.loads(out.read_text())
    assert [r["T"] for r in data["results"]] == [4, 8]
    assert data["results"][0]["ratio_per_step"] == pytest.approx(1.0)
