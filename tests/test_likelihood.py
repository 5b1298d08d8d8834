"""Importance-sampled log-likelihoods against exact values: a linear-Gaussian VAE (closed-form marginal)
and a linear-Gaussian DMM on ragged sequences (the Kalman marginal of each sequence's own frames)."""
import math

import pyro
import pytest
import torch
from torch import nn

from inference.evaluation.likelihood import LikelihoodOptions, log_weights, split_likelihood
from pyro_models.dmm import DMMConfig, build_dmm, exact_log_marginal, step_mask
from pyro_models.networks import MLPEncoder
from pyro_models.vae import VAE, NormalGuide

F64 = torch.float64


def linear_vae(seed=0, z_dim=2, x_shape=(1, 1, 3)):
    torch.manual_seed(seed)
    decoder = nn.Sequential(nn.Linear(z_dim, 3), nn.Unflatten(-1, x_shape))
    model = VAE(decoder, z_dim, x_shape, "gaussian")
    guide = NormalGuide(MLPEncoder(x_shape, (8,), z_dim, 1e-3), model.kl_weights)
    model.double(), guide.double()
    with torch.no_grad():
        model.log_scale.fill_(math.log(0.6))
    return model, guide


def vae_marginal(model, x):
    """log N(x; b, W W^T + s^2 I) of the linear-Gaussian VAE, ``(batch,)``."""
    linear = model.decoder[0]
    cov = linear.weight @ linear.weight.T + model.log_scale.exp() ** 2 * torch.eye(3, dtype=F64)
    return torch.distributions.MultivariateNormal(linear.bias, cov).log_prob(x.flatten(1))


def test_the_vae_estimate_converges_to_the_closed_form_from_below():
    model, guide = linear_vae()
    x = torch.randn(4, 1, 1, 3, dtype=F64)
    exact = vae_marginal(model, x).detach()
    pyro.set_rng_seed(0)
    many = log_weights(model, guide, (x,), 4000, particles_per_pass=1000)
    assert torch.all((many.estimate - exact).abs() < 5 * many.stderr + 1e-3), (many.estimate, exact, many.stderr)
    # K = 1 is the ELBO: below log p(x) in expectation, by more than K = 4000 is
    single = torch.stack([log_weights(model, guide, (x,), 1).estimate for _ in range(400)])  # (400, batch)
    assert torch.all(single.mean(0) + 3 * single.std(0) / 20 < exact)
    assert torch.all(single.mean(0) < many.estimate)


def linear_dmm(seed=0):
    model, guide = build_dmm((3,), DMMConfig(z_dim=2, rnn_dim=8, transition="linear", emission="linear",
                                             likelihood="gaussian", guide="st-lr"))
    model.double(), guide.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=gen, dtype=F64))
        model.transition.linear.weight.add_(0.6 * torch.eye(2, dtype=F64))
        model.emitter.log_scale.fill_(math.log(0.5))
        model.transition.log_scale.fill_(math.log(0.5))
    return model, guide


def fit_guide(model, guide, x, lengths, steps=300):
    """A few hundred ELBO steps on the guide alone, so that it is a reasonable proposal."""
    optim = torch.optim.Adam(guide.parameters(), lr=0.02)
    elbo = pyro.infer.Trace_ELBO()
    for _ in range(steps):
        optim.zero_grad()
        elbo.differentiable_loss(model, guide, x, None, lengths).backward()
        optim.step()


def test_the_dmm_estimate_converges_to_the_kalman_marginal_of_each_ragged_sequence():
    pyro.set_rng_seed(1)
    model, guide = linear_dmm()
    lengths = torch.tensor([5, 2, 4])
    x = torch.randn(3, 5, 3, dtype=F64)
    fit_guide(model, guide, x, lengths)
    exact = exact_log_marginal(model, x, step_mask(lengths, 5)).detach()  # past the end: no frame
    result = log_weights(model, guide, (x, None, lengths), 3000, particles_per_pass=500)
    assert torch.all((result.estimate - exact).abs() < 5 * result.stderr + 2e-3), (result.estimate, exact, result.stderr)
    elbo = result.log_weights.mean(0)  # the K = 1 estimate's expectation
    assert torch.all(elbo < result.estimate)
    # the padding is not part of any sequence's marginal
    assert not torch.allclose(exact, exact_log_marginal(model, x).detach())


def test_per_step_numbers_divide_by_the_real_steps():
    pyro.set_rng_seed(2)
    model, guide = linear_dmm()
    lengths = torch.tensor([5, 2, 4])
    x = torch.randn(3, 5, 3, dtype=F64)
    options = LikelihoodOptions(k=200, particles_per_pass=100, batch_size=2)
    result = split_likelihood(model, guide, (x, None, lengths), options, lengths_arg=2, progress=False)
    assert result["steps"] == 11 and result["examples"] == 3 and result["k"] == 200
    assert result["nll_per_step"] == pytest.approx(-result["log_lik"] / 11)
    exact = float(exact_log_marginal(model, x, step_mask(lengths, 5)).detach().sum())
    assert abs(result["log_lik"] - exact) < 5 * result["log_lik_stderr"] + 0.05
    assert result["neg_elbo_per_step"] > result["nll_per_step"]


def test_bad_options_are_refused():
    for name, value in (("k", 0), ("split", "dev"), ("batch_size", 0)):
        with pytest.raises(ValueError, match=f"^{name}: expected"):
            LikelihoodOptions(**{name: value})


@pytest.mark.parametrize("name", list(__import__("inference.recipes.registry", fromlist=["recipes"]).recipes()))
def test_every_model_has_an_importance_sampled_likelihood(name):
    from inference.recipes.registry import recipes

    recipe = recipes()[name]
    config, shape = recipe.example()
    torch.manual_seed(0)
    model, guide = recipe.build(shape, config)
    x = torch.rand((3,) + tuple(shape))
    result = log_weights(model, guide, (x,), 6, particles_per_pass=3, vectorize=recipe.training.vectorized_particles)
    assert result.log_weights.shape == (6, 3) and torch.isfinite(result.log_weights).all()
    assert torch.all(result.estimate >= result.log_weights.mean(0))  # log-mean-exp >= mean (Jensen)
    assert torch.all(result.stderr >= 0)


@pytest.mark.parametrize("vectorize", [True, False])
def test_the_dmm_estimate_with_gaps_converges_to_the_kalman_marginal_of_the_observed_frames(vectorize):
    """Missing frames inside ragged sequences: the importance-sampled estimate (vectorised over particles
    or one draw a pass) against the Kalman marginal of each sequence's observed frames."""
    pyro.set_rng_seed(3)
    model, guide = linear_dmm()
    lengths = torch.tensor([5, 3, 4])
    x = torch.randn(3, 5, 3, dtype=F64)
    mask = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 0, 1, 1], [1, 0, 0, 1, 1]], dtype=torch.bool)
    fit_guide(model, guide, x, lengths)
    exact = exact_log_marginal(model, x, mask & step_mask(lengths, 5)).detach()
    result = log_weights(model, guide, (x, mask, lengths), 2000 if vectorize else 300,
                         particles_per_pass=500, vectorize=vectorize)
    assert torch.all((result.estimate - exact).abs() < 5 * result.stderr + 5e-3), (result.estimate, exact, result.stderr)
    assert not torch.allclose(exact, exact_log_marginal(model, x, step_mask(lengths, 5)).detach())  # the gaps count
