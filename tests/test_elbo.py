"""ELBO estimators against analytic values on a conjugate Gaussian model."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from inference.training.elbo import elbo_terms, make_elbo
from pyro_models.distributions import DimWeighted, GreyBernoulli, StandardNormal, SummedBernoulli, to_event

PRIOR_SCALE, NOISE_SCALE = 1.5, 0.7


def model(x):
    """z ~ N(0, PRIOR_SCALE^2 I), x | z ~ N(z, NOISE_SCALE^2 I), x of shape (D,)."""
    z = pyro.sample("z", dist.Normal(torch.zeros_like(x), PRIOR_SCALE).to_event(1))
    pyro.sample("x", dist.Normal(z, NOISE_SCALE).to_event(1), obs=x)


def make_guide(loc, scale):
    def guide(x):
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))
    return guide


def analytic_elbo(x, loc, scale):
    """E_q[log p(x|z)] + E_q[log p(z)] + H[q] in closed form, for q = N(loc, scale^2)."""
    log_lik = (-0.5 * ((x - loc) ** 2 + scale**2) / NOISE_SCALE**2 - math.log(NOISE_SCALE) - 0.5 * math.log(2 * math.pi)).sum()
    log_prior = (-0.5 * (loc**2 + scale**2) / PRIOR_SCALE**2 - math.log(PRIOR_SCALE) - 0.5 * math.log(2 * math.pi)).sum()
    entropy = (torch.log(scale) + 0.5 * math.log(2 * math.pi * math.e)).sum()
    return log_lik + log_prior + entropy


def exact_posterior(x):
    precision = 1 / PRIOR_SCALE**2 + 1 / NOISE_SCALE**2
    return x / NOISE_SCALE**2 / precision, torch.full_like(x, precision**-0.5)


def log_evidence(x):
    return dist.Normal(0.0, math.sqrt(PRIOR_SCALE**2 + NOISE_SCALE**2)).log_prob(x).sum()


X = torch.tensor([0.3, -1.2, 2.0])


def test_exact_posterior_gives_log_evidence_for_every_sample():
    # With q equal to the exact posterior, log p(x, z) - log q(z) = log p(x) for every z: no MC error.
    guide = make_guide(*exact_posterior(X))
    for _ in range(5):
        loss = make_elbo("trace").differentiable_loss(model, guide, X)
        assert -loss.item() == pytest.approx(log_evidence(X).item(), abs=1e-5)
    terms = elbo_terms(model, guide, X)
    assert terms.elbo.item() == pytest.approx(log_evidence(X).item(), abs=1e-5)


@pytest.mark.parametrize("elbo_name", ["trace", "meanfield"])
def test_elbo_estimate_matches_analytic_value(elbo_name):
    loc, scale = torch.tensor([0.5, 0.0, -1.0]), torch.tensor([0.3, 1.1, 0.6])
    guide = make_guide(loc, scale)
    num = 4000
    estimates = torch.stack([-make_elbo(elbo_name).differentiable_loss(model, guide, X) for _ in range(num)])
    standard_error = estimates.std() / math.sqrt(num) + 1e-6
    # Monte Carlo tolerance: 5 standard errors of the mean of `num` one-sample estimates.
    assert abs(estimates.mean() - analytic_elbo(X, loc, scale)) < 5 * standard_error
    assert analytic_elbo(X, loc, scale) < log_evidence(X)  # it is a lower bound


def test_elbo_terms_split():
    loc, scale = torch.tensor([0.5, 0.0, -1.0]), torch.tensor([0.3, 1.1, 0.6])
    terms = elbo_terms(model, make_guide(loc, scale), X)
    assert terms.elbo.item() == pytest.approx((terms.log_lik - terms.kl).item())


def test_dim_weighted_kl_and_log_prob():
    q = dist.Normal(torch.tensor([0.5, -1.0]), torch.tensor([0.3, 2.0])).to_event(1)
    p = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    w = torch.tensor([0.25, 2.0])
    per_dim = torch.distributions.kl_divergence(q.base_dist, p.base_dist)
    weighted = torch.distributions.kl_divergence(DimWeighted(q, w), DimWeighted(p, w))
    assert weighted.item() == pytest.approx((w * per_dim).sum().item(), rel=1e-6)
    z = q.sample()
    assert DimWeighted(q, w).log_prob(z).item() == pytest.approx((w * q.base_dist.log_prob(z)).sum().item(), rel=1e-6)


@pytest.mark.parametrize("q_shape, p_shape", [((5, 3), (5, 3)), ((4, 5, 3), (5, 3)), ((5, 3), (4, 5, 3)), ((1, 3), (5, 3))])
def test_standard_normal_kl_equals_the_general_normal_kl(q_shape, p_shape):
    q = dist.Normal(torch.randn(q_shape), torch.rand(q_shape) + 0.1)
    p = StandardNormal(p_shape, torch.zeros(()))
    general = torch.distributions.kl_divergence(q, dist.Normal(torch.zeros(p_shape), torch.ones(p_shape)))
    special = torch.distributions.kl_divergence(q, p)
    assert special.shape == general.shape
    assert torch.allclose(special, general, atol=1e-6, rtol=1e-6)
    assert torch.distributions.kl._dispatch_kl(type(q), type(p)).__name__ == "_kl_normal_standard_normal"
    assert type(p.expand((2, *p_shape))) is StandardNormal and p.expand((2, *p_shape)).batch_shape == (2, *p_shape)


@pytest.mark.parametrize("event_dim", [1, 2, 3])
@pytest.mark.parametrize("particles", [False, True])
def test_summed_bernoulli_equals_independent_bernoulli_exactly(event_dim, particles):
    logits = torch.randn(6, 2, 5, 4)
    value = torch.rand(6, 2, 5, 4)
    if particles:  # a vectorised particle axis on the logits only
        logits = torch.randn(3, *logits.shape)
    fused, plain = to_event(GreyBernoulli(logits=logits), event_dim), GreyBernoulli(logits=logits).to_event(event_dim)
    assert type(fused) is SummedBernoulli and fused.event_shape == plain.event_shape
    assert torch.equal(fused.log_prob(value), plain.log_prob(value))
    expanded = fused.expand((7, *fused.batch_shape))
    assert type(expanded) is SummedBernoulli and torch.equal(expanded.log_prob(value), plain.expand((7, *plain.batch_shape)).log_prob(value))


def test_the_vae_step_takes_the_lean_distributions():
    from pyro import poutine
    from pyro_models.vae import VAEConfig, build_vae
    model, guide = build_vae((1, 4, 4), VAEConfig(hidden_dims=(4,), z_dim=2), "vae")
    x = torch.rand(3, 1, 4, 4)
    trace = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(x))).get_trace(x)
    assert type(trace.nodes["x"]["fn"]) is SummedBernoulli
    assert type(trace.nodes["z"]["fn"].base_dist) is StandardNormal


def test_dim_weighted_rejects_non_factorised():
    mvn = dist.MultivariateNormal(torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="Independent"):
        DimWeighted(mvn, torch.ones(2))
    with pytest.raises(ValueError, match="weights"):
        DimWeighted(dist.Normal(torch.zeros(2), 1.0).to_event(1), torch.ones(3))


def test_unknown_elbo_name():
    with pytest.raises(ValueError, match="elbo"):
        make_elbo("renyi")


def test_flow_posterior_kl_estimate_is_unbiased():
    from pyro.distributions.transforms import affine_autoregressive

    from pyro_models.distributions import FlowPosterior

    torch.manual_seed(0)
    base = dist.Normal(torch.tensor([0.3, -0.5, 1.0]), torch.tensor([0.5, 1.2, 0.8])).to_event(1)
    flows = [affine_autoregressive(3, hidden_dims=[8]) for _ in range(2)]
    for flow in flows:  # move away from the identity so the correction term matters
        for p in flow.parameters():
            p.data.normal_(0, 0.3)
    prior = dist.Normal(torch.zeros(3), torch.ones(3)).to_event(1)
    q = FlowPosterior(base, flows)
    num = 20000
    control_variate, plain = [], []
    with torch.no_grad():
        for _ in range(num // 500):
            z = q.rsample((500,))
            control_variate.append(torch.distributions.kl_divergence(q, prior))
            plain.append(q.log_prob(z) - prior.log_prob(z))
    control_variate, plain = torch.cat(control_variate), torch.cat(plain)
    # Both estimate KL(q || p): their means agree within 5 standard errors of the difference.
    difference = control_variate - plain
    assert abs(difference.mean()) < 5 * difference.std() / math.sqrt(num)
    assert control_variate.var() < plain.var()  # and the control variate helps


def _every_model_and_guide():
    from inference.recipes.registry import recipes

    return [(name, guide) for name, recipe in recipes().items() for guide in recipe.guides]


@pytest.mark.parametrize("name, guide_name", _every_model_and_guide())
def test_the_meanfield_fast_path_equals_pyros_trace_mean_field_elbo(name, guide_name):
    """Without validation the mean-field ELBO scores only what it reads (observed sites; latent sites
    without an analytic KL); its value and gradients equal Pyro's ``TraceMeanField_ELBO`` on the same
    draws, for every model and guide, sequences with gaps and different lengths included."""
    import dataclasses

    from inference.recipes.registry import recipes
    from pyro.infer import TraceMeanField_ELBO

    recipe = recipes()[name]
    config, shape = recipe.example()
    config = dataclasses.replace(config, guide=guide_name)
    torch.manual_seed(0)
    model, guide = recipe.build(shape, config)
    x = torch.rand((3,) + tuple(shape))
    args = (x,)
    if recipe.sequences:
        mask = torch.rand(x.shape[:2]) > 0.3
        mask[:, 0] = True
        args = (x, mask, torch.tensor([shape[0], shape[0] - 1, shape[0] - 2]))
    params = [p for m in (model, guide) for p in m.parameters()]
    results = []
    for elbo, validate in ((make_elbo("meanfield"), False), (TraceMeanField_ELBO(), True)):
        pyro.set_rng_seed(1)
        with pyro.validation_enabled(validate):
            loss = elbo.differentiable_loss(model, guide, *args)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        results.append((loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]))
    (fast, fast_grads), (pyro_loss, pyro_grads) = results
    assert torch.isfinite(fast) and torch.allclose(fast, torch.as_tensor(pyro_loss), rtol=1e-5, atol=1e-4)
    assert any(g.abs().sum() > 0 for g in fast_grads)
    for a, b in zip(fast_grads, pyro_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_fast_path_scores_nothing_up_front_and_vectorised_particles_agree():
    from pyro.infer import TraceMeanField_ELBO
    from pyro_models.vae import VAEConfig, build_vae

    torch.manual_seed(0)
    model, guide = build_vae((1, 6, 6), VAEConfig(z_dim=3, hidden_dims=(8,)), "vae")
    x = torch.rand(4, 1, 6, 6)
    elbo = make_elbo("meanfield", num_particles=3)
    with pyro.validation_enabled(False):
        model_trace, guide_trace = elbo._get_trace(model, guide, (x,), {})
    assert not any("log_prob" in site for trace in (model_trace, guide_trace) for site in trace.nodes.values())
    losses = []
    for fast, validate in ((elbo, False), (TraceMeanField_ELBO(num_particles=3, vectorize_particles=True), True)):
        pyro.set_rng_seed(2)
        with pyro.validation_enabled(validate):
            losses.append(fast.differentiable_loss(model, guide, x).detach())
    assert torch.allclose(losses[0], torch.as_tensor(losses[1]), rtol=1e-6)
