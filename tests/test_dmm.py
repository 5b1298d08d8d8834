"""The deep Markov model: sites, shapes and gradients of every guide and frame kind, masks, imputation,
KL annealing, the linear-Gaussian special case against the exact Kalman marginal, and training."""
import inspect
import math
import warnings
from dataclasses import fields

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import site_is_subsample

from pyro_models.dmm import GUIDES, DMMConfig, as_lgssm, build_dmm, exact_log_marginal, generate, impute, \
    sample_exact_posterior
from pyro_models.lgssm import smooth

F64 = torch.float64
BATCH, STEPS = 3, 4
SMALL = dict(z_dim=3, transition_dim=8, emission_hidden=(8,), rnn_dim=8, conv_channels=(4, 6), flow_hidden=(8,))
FRAME_KINDS = {  # name: (frame_shape, frame_network)
    "vector": ((7,), "mlp"),
    "image-mlp": ((1, 6, 6), "mlp"),
    "image-conv": ((2, 6, 5), "conv"),
}
LINEAR = dict(SMALL, transition="linear", emission="linear", likelihood="gaussian")
MEAN_FIELD_WARNING = "Failed to verify mean field restriction"


def build(kind="vector", **overrides):
    frame_shape, network = FRAME_KINDS[kind]
    model, guide = build_dmm(frame_shape, DMMConfig(**dict(SMALL, frame_network=network, **overrides)))
    return model, guide, frame_shape


def elbo_loss(model, guide, x, mask=None, seed=0):
    pyro.set_rng_seed(seed)
    return TraceMeanField_ELBO().differentiable_loss(model, guide, x, mask)


def perturb_flows(guide):
    """The IAF steps start as the identity (zero output layer), which blocks the gradient of their inner
    layers; give the output layers small values so every parameter is reachable."""
    with torch.no_grad():
        for flow in guide.flows:
            flow.nn.layers[-1].weight.normal_(0.0, 0.1)
            flow.nn.layers[-1].bias.normal_(0.0, 0.1)


# ------------------------------------------------------------------------------------ sites, shapes, gradients
@pytest.mark.parametrize("num_flows", [0, 1])
@pytest.mark.parametrize("kind", list(FRAME_KINDS))
@pytest.mark.parametrize("guide_name", GUIDES)
def test_sites_shapes_and_gradients(guide_name, kind, num_flows):
    model, guide, frame_shape = build(kind, guide=guide_name, num_flows=num_flows)
    perturb_flows(guide)
    x = torch.rand(BATCH, STEPS, *frame_shape)
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    for trace in (guide_trace, model_trace):
        latent = [n for n, s in trace.nodes.items()
                  if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]
        assert latent == ["z"]  # the whole chain is one site in both
        assert trace.nodes["z"]["value"].shape == (BATCH, STEPS, 3)
    assert model_trace.nodes["x"]["value"].shape == x.shape
    assert guide_trace.nodes["_RETURN"]["value"].shape == (BATCH, STEPS, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = elbo_loss(model, guide, x)
    assert not [w for w in caught if MEAN_FIELD_WARNING in str(w.message)]
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in list(model.named_parameters()) + list(guide.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_guides_read_the_context_they_claim():
    # st-r's q(z_t | z_{t-1}, x_{t:T}) ignores the past frames; st-lr and mf-lr read them.
    x = torch.rand(2, 5, 7)
    changed = x.clone()
    changed[:, 0] = torch.rand_like(changed[:, 0])
    last = x.clone()
    last[:, -1] = torch.rand_like(last[:, -1])
    for guide_name, reads_past, reads_future in (("st-r", False, True), ("st-l", True, False), ("st-lr", True, True),
                                                 ("mf-lr", True, True)):
        _, guide, _ = build(guide=guide_name)
        context, other = guide.context(guide.features(x)), guide.context(guide.features(changed))
        future = guide.context(guide.features(last))
        if reads_future:
            assert torch.equal(context[:, 1:, -1], other[:, 1:, -1])  # h^right_t for t >= 2: x_{t:T} only
        assert torch.allclose(context[:, 1:], other[:, 1:]) != reads_past
        assert torch.allclose(context[:, :-1], future[:, :-1]) != reads_future
    _, guide, _ = build(guide="mf-lr")
    assert guide.z_0 is None  # mean field: q(z_t | x) never reads z_{t-1}


def test_generation():
    model, _, frame_shape = build("image-conv")
    trace = poutine.trace(generate).get_trace(model, 2, 5)
    assert trace.nodes["_RETURN"]["value"].shape == (2, 5) + frame_shape
    assert trace.nodes["z"]["value"].shape == (2, 5, 3)


# ------------------------------------------------------------------------------------ masks and imputation
MASK = torch.tensor([[True, False, True, True], [True, True, True, True], [False, True, True, False]])


@pytest.mark.parametrize("guide_name", GUIDES)
@pytest.mark.parametrize("kind", ["vector", "image-conv"])
def test_missing_frames_are_never_read(guide_name, kind):
    model, guide, frame_shape = build(kind, guide=guide_name, num_flows=1)
    x = torch.rand(BATCH, STEPS, *frame_shape)
    missing, observed = x.clone(), x.clone()
    missing[~MASK] = torch.rand_like(missing[~MASK])
    observed[MASK] = torch.rand_like(observed[MASK])
    loss = elbo_loss(model, guide, x, MASK)
    assert torch.equal(loss, elbo_loss(model, guide, missing, MASK))
    assert not torch.equal(loss, elbo_loss(model, guide, observed, MASK))
    everything = torch.ones_like(MASK)
    assert torch.allclose(elbo_loss(model, guide, x, everything), elbo_loss(model, guide, x), rtol=1e-5)


@pytest.mark.parametrize("guide_name", GUIDES)
def test_the_mask_feature_tells_a_gap_from_a_frame_of_zeros(guide_name):
    x = torch.rand(BATCH, STEPS, 7)
    zeros = x.clone()
    zeros[~MASK] = 0.0  # the gaps of MASK, as observed all-zero frames (silence in a piano roll)
    observed = torch.ones_like(MASK)
    for mask_feature in (False, True):
        pyro.set_rng_seed(0)
        model, guide, _ = build(guide=guide_name, mask_feature=mask_feature)
        gap, silence = elbo_loss(model, guide, x, MASK), elbo_loss(model, guide, zeros, MASK)
        assert torch.equal(gap, silence)  # the content of a gap is never read, either way
        # without the flag the guide cannot tell the gap from silence: its q(z | x) is the same
        pyro.set_rng_seed(1)
        z_gap = poutine.trace(guide).get_trace(x, MASK).nodes["z"]["value"]
        pyro.set_rng_seed(1)
        z_silence = poutine.trace(guide).get_trace(zeros, observed).nodes["z"]["value"]
        assert torch.equal(z_gap, z_silence) != mask_feature


@pytest.mark.parametrize("guide_name", ["st-r", "mf-lr"])
def test_guide_frame_dropout_hides_frames_in_training_only(guide_name):
    rate = 0.3
    model, guide, _ = build(guide=guide_name, mask_feature=True, guide_frame_dropout=rate)
    plain = build(guide=guide_name, mask_feature=True)[1]
    plain.load_state_dict(guide.state_dict())
    x = torch.rand(BATCH, STEPS, 7)
    guide.eval(), plain.eval()
    pyro.set_rng_seed(2)
    z_eval = poutine.trace(guide).get_trace(x).nodes["z"]["value"]
    pyro.set_rng_seed(2)
    assert torch.equal(z_eval, poutine.trace(plain).get_trace(x).nodes["z"]["value"])  # eval: no dropout
    guide.train()
    big = torch.zeros(400, 100, 7)
    seen = guide.seen(big, None)  # (400, 100)
    # a fresh Bernoulli(1 - rate) draw per frame: 40,000 frames, standard error 0.0023, 5 of them allowed
    assert abs(seen.float().mean().item() - (1 - rate)) < 5 * math.sqrt(rate * (1 - rate) / seen.numel())
    assert not torch.equal(seen, guide.seen(big, None))  # fresh every step
    mask = torch.rand(400, 100) < 0.5
    assert not (guide.seen(big, mask) & ~mask).any()  # a missing frame stays missing


def test_emission_dropout_acts_in_training_only():
    rate, draws = 0.25, 20000
    model = build(emission_dropout=rate)[0]
    plain = build()[0]
    plain.load_state_dict(model.state_dict())
    z = torch.randn(2, SMALL["z_dim"])
    model.eval(), plain.eval()
    assert torch.equal(model.emitter(z), plain.emitter(z))  # eval mode: no dropout
    model.train()
    with torch.no_grad():
        thinned = model.emitter(z.expand(draws, *z.shape).reshape(-1, z.shape[-1])).reshape(draws, *z.shape[:1], -1)
    # One hidden layer: the output is linear in the dropped units, so inverted dropout keeps its mean. Each
    # draw's standard error from the sample itself; 5 of them allowed.
    error = thinned.std(0) / math.sqrt(draws)
    assert ((thinned.mean(0) - plain.emitter(z)).abs() < 5 * error + 1e-6).all()
    assert (thinned.std(0) > 0).all()  # it does act
    with pytest.raises(ValueError, match="^emission_dropout: applies to the MLP emission"):
        DMMConfig(emission="linear", emission_dropout=rate)
    with pytest.raises(ValueError, match="^emission_dropout: applies to the MLP emission, not to the convolutional"):
        build("image-conv", emission_dropout=rate)


def test_a_missing_frame_adds_no_likelihood():
    model, guide, frame_shape = build()
    x = torch.rand(BATCH, STEPS, *frame_shape)
    guide_trace = poutine.trace(guide).get_trace(x, MASK)
    trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, MASK)
    assert "x_units_unobserved" not in trace.nodes  # hidden: no latent frame for any ELBO to score
    probs = trace.nodes["x_mean"]["value"]  # (batch, T, D)
    frames = (x * probs.log() + (1 - x) * (1 - probs).log()).sum(-1)  # grey cross-entropy, (batch, T)
    observed = trace.log_prob_sum(lambda name, site: name == "x_units_observed")
    assert torch.allclose(observed, frames[MASK].sum(), rtol=1e-5)
    value = trace.nodes["_RETURN"]["value"]  # (batch, T, D): observed frames, and a draw of the missing ones
    assert torch.equal(value[MASK], x[MASK]) and ((value[~MASK] == 0) | (value[~MASK] == 1)).all()


def test_past_the_last_observed_frame_z_is_drawn_from_the_transition():
    """``roll_out``: steps up to each sequence's last observed frame keep the guide's draw; every later step
    is z_t = loc(z_{t-1}) + scale(z_{t-1}) * eps_t under the model's transition, from the redrawn z_{t-1}
    (z_0 when nothing is observed); and the imputer's frames past that point follow it."""
    from pyro_models.dmm.impute import last_observed, roll_out

    model, guide, frame_shape = build("vector")
    mask = torch.tensor([[1, 0, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    last = last_observed(mask)
    assert last.tolist() == [2, 4, -1]
    z = torch.randn(3, 5, SMALL["z_dim"])
    torch.manual_seed(4)
    rolled = roll_out(model, z, last)
    torch.manual_seed(4)
    previous = model.z_0.expand(3, -1)
    for t in range(5):
        expected = z[:, t]
        if not bool((t <= last).all()):
            loc, scale = model.transition(previous)
            expected = torch.where((t > last).unsqueeze(-1), loc + scale * torch.randn_like(loc), expected)
        keep = t <= last
        assert torch.equal(rolled[keep, t], z[keep, t])
        assert torch.allclose(rolled[:, t], expected) and not torch.allclose(rolled[~keep, t], z[~keep, t])
        previous = rolled[:, t]
    # the imputer's draw is E[x_t | z_t] of exactly that: the guide's z, rolled out past the last observed frame
    x = torch.rand(3, 5, *frame_shape)
    mask[2, 0] = True
    torch.manual_seed(7)
    result = impute(model, guide, x, mask, num_samples=1)
    model.eval(), guide.eval()
    torch.manual_seed(7)
    with torch.no_grad():
        drawn = poutine.trace(guide).get_trace(torch.where(mask[..., None], x, torch.zeros_like(x)), mask).nodes["z"]["value"]
        expected = model.frame_mean(roll_out(model, drawn, last_observed(mask)))
    assert torch.allclose(result.samples[0][~mask], expected[~mask])


def test_impute_keeps_observed_frames_and_restores_modes():
    model, guide, frame_shape = build("image-mlp", guide="st-lr")
    x = torch.rand(BATCH, STEPS, *frame_shape)
    model.train(), guide.eval()
    result = impute(model, guide, x, MASK, num_samples=5, generator=torch.Generator().manual_seed(1))
    assert model.training and not guide.training
    assert result.samples.shape == (5,) + x.shape and result.imputed.shape == x.shape
    assert torch.equal(result.mask, MASK) and result.estimates["posterior_mean"] is result.imputed
    assert torch.equal(result.imputed[MASK], x[MASK])
    assert torch.equal(result.samples[:, MASK], x[MASK].expand(5, -1, -1, -1, -1))
    filled = result.imputed[~MASK]
    assert ((filled > 0) & (filled < 1)).all() and not torch.equal(filled, x[~MASK])
    assert torch.allclose(result.imputed[~MASK], result.samples[:, ~MASK].mean(0))
    changed = x.clone()
    changed[~MASK] = 0.5
    again = impute(model, guide, changed, MASK, num_samples=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.imputed[~MASK], filled)  # the same draws, and missing content unread
    with pytest.raises(ValueError, match="mask: expected a bool tensor"):
        impute(model, guide, x, MASK.float())
    with pytest.raises(ValueError, match="num_samples"):
        impute(model, guide, x, MASK, num_samples=0)


# ------------------------------------------------------------------------------------ KL annealing
def kl_of(model, guide, x, seed=0):
    """sum_t KL(q(z_t | ...) || p(z_t | z_{t-1})) of one draw, as TraceMeanField_ELBO scores it (eval mode)."""
    pyro.set_rng_seed(seed)
    guide.eval(), model.eval()
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    guide.train(), model.train()
    return torch.distributions.kl_divergence(guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"]).sum()


@pytest.mark.parametrize("num_flows", [0, 1])
def test_beta_scales_the_kl_in_training_only(num_flows):
    model, guide, frame_shape = build(guide="st-lr", num_flows=num_flows)
    perturb_flows(guide)
    model.double(), guide.double()
    x = torch.rand(BATCH, STEPS, *frame_shape, dtype=F64)

    def loss(beta, training=True):
        model.kl_weights.beta = beta
        model.train(training), guide.train(training)
        return elbo_loss(model, guide, x).detach()

    kl = kl_of(model, guide, x)
    assert kl > 0 and guide.kl_weights is model.kl_weights
    assert torch.allclose(loss(1.0) - loss(0.5), 0.5 * kl, rtol=1e-9)
    assert torch.allclose(loss(1.0) - loss(0.25), 0.75 * kl, rtol=1e-9)
    assert torch.equal(loss(0.5, training=False), loss(1.0, training=False))
    assert torch.equal(loss(1.0, training=False), loss(1.0))


# ------------------------------------------------------------------------------------ the linear-Gaussian DMM
def linear_model(seed=0, frame_dim=3):
    """A linear-Gaussian DMM in float64 with random A, b, s, C, d, r and z_0."""
    model, guide = build_dmm((frame_dim,), DMMConfig(**LINEAR))
    model.double(), guide.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=F64))
        model.transition.linear.weight.add_(0.6 * torch.eye(3, dtype=F64))
        model.transition.log_scale.sub_(0.5)
    return model, guide


def markov_gaussian_log_prob(result, u):
    """log N(u_{1:T}) of the Gauss-Markov chain with smoothed marginals and lag-one cross covariances
    ``result`` (a ``SmoothResult``), ``u (S, batch, T, Z)``: q(u_1) prod_t q(u_{t+1} | u_t)."""
    mvn = torch.distributions.MultivariateNormal
    total = mvn(result.means[:, 0], result.covs[:, 0]).log_prob(u[:, :, 0])
    for t in range(u.shape[2] - 1):
        gain = result.cross_covs[:, t] @ torch.linalg.inv(result.covs[:, t])  # Cov(u_{t+1}, u_t) P_t^-1
        loc = result.means[:, t + 1] + (gain @ (u[:, :, t] - result.means[:, t]).unsqueeze(-1)).squeeze(-1)
        cov = result.covs[:, t + 1] - gain @ result.cross_covs[:, t].transpose(-1, -2)
        total = total + mvn(loc, 0.5 * (cov + cov.transpose(-1, -2))).log_prob(u[:, :, t + 1])
    return total  # (S, batch)


def log_joint(model, x, mask, z):
    """log p(x_observed, z) ``(batch,)`` from the DMM's own Pyro program, z ``(batch, T, Z)`` conditioned."""
    trace = poutine.trace(poutine.condition(model, data={"z": z})).get_trace(x, mask)
    trace.compute_log_prob()
    terms = [site["log_prob"].reshape(-1, x.shape[0]).sum(0) for site in trace.nodes.values()
             if site["type"] == "sample" and not site["infer"].get("_deterministic") and not site_is_subsample(site)]
    return sum(terms)


@pytest.mark.parametrize("with_mask", [False, True])
def test_linear_gaussian_dmm_defines_the_lgssm_joint(with_mask):
    # With the exact posterior as proposal, log p(x, z) - log q(z) is the same for every draw z, and
    # equals log p(x) only if the DMM's Pyro program is exactly the LGSSM's joint density.
    model, _ = linear_model()
    model.eval()
    x = torch.randn(BATCH, 5, 3, dtype=F64)
    rows = [[True, False, True, True, False], [True] * 5, [False, True, False, True, True]]
    mask = torch.tensor(rows) if with_mask else None
    num_samples = 6
    exact = exact_log_marginal(model, x, mask)  # (batch,)
    z = sample_exact_posterior(model, x, mask, num_samples, generator=torch.Generator().manual_seed(0))
    system = as_lgssm(model, x.shape[1])
    smoothed = smooth(system.params, x - system.obs_offsets, mask)
    log_q = markov_gaussian_log_prob(smoothed, z - system.prior_means)  # (S, batch)
    log_p = torch.stack([log_joint(model, x, mask, z[s]) for s in range(num_samples)])  # (S, batch)
    weights = log_p - log_q
    assert torch.allclose(weights, exact.expand_as(weights), atol=1e-8, rtol=0)
    estimate = torch.logsumexp(weights, 0) - math.log(num_samples)
    assert torch.allclose(estimate, exact, atol=1e-8, rtol=0)
    assert torch.allclose(smoothed.log_marginal, exact, atol=1e-8)
    if with_mask:  # the marginal is that of the observed frames only
        assert not torch.allclose(exact, exact_log_marginal(model, x))


def test_elbo_is_below_the_exact_marginal():
    model, guide = linear_model(seed=1)
    model.eval(), guide.eval()
    x = torch.randn(BATCH, 5, 3, dtype=F64)
    exact = float(exact_log_marginal(model, x).detach().sum())
    repeats, particles = 12, 64
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    estimates = torch.tensor([-elbo.loss(model, guide, x) for _ in range(repeats)], dtype=F64)
    stderr = float(estimates.std() / math.sqrt(repeats))
    assert float(estimates.mean()) <= exact + 3 * stderr
    meanfield = -TraceMeanField_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1).loss(
        model, guide, x)
    assert meanfield <= exact + 3 * stderr * math.sqrt(repeats)


def test_non_linear_models_have_no_lgssm():
    model, _, _ = build()
    with pytest.raises(ValueError, match="model: expected transition='linear'"):
        exact_log_marginal(model, torch.rand(2, 3, 7))


# ------------------------------------------------------------------------------------ training, configuration
def test_a_few_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    patterns = (torch.rand(4, 1, 8) > 0.5).float()
    data = patterns.expand(4, 6, 8).roll(1, dims=1).repeat(4, 1, 1)  # (16, 6, 8)
    model, guide = build_dmm((8,), DMMConfig(**SMALL))
    optim = torch.optim.Adam(list(model.parameters()) + list(guide.parameters()), lr=0.02)
    elbo = TraceMeanField_ELBO()
    losses = []
    for _ in range(30):
        optim.zero_grad()
        loss = elbo.differentiable_loss(model, guide, data)
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])


def test_config_and_input_validation():
    for field, value in (("guide", "st-x"), ("num_flows", -1), ("z_dim", 0), ("transition", "nl"),
                         ("likelihood", "poisson"), ("frame_network", "resnet"), ("obs_scale", 0.0),
                         ("conv_channels", ()), ("emission_hidden", (0,)), ("guide_frame_dropout", 1.0)):
        with pytest.raises(ValueError, match=f"^{field}: expected"):
            DMMConfig(**{field: value})
    with pytest.raises(ValueError, match="^guide_frame_dropout: expected 0 unless mask_feature"):
        DMMConfig(guide_frame_dropout=0.2)
    with pytest.raises(ValueError, match="frame_shape"):
        build_dmm((4, 4), DMMConfig(**SMALL))
    model, guide, _ = build()
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, T, 7\)"):
        model(torch.rand(2, 3, 6))
    with pytest.raises(ValueError, match=r"mask: expected a bool tensor of shape \(2, 3\)"):
        guide(torch.rand(2, 3, 7), torch.ones(2, 4, dtype=torch.bool))


def test_every_config_field_has_help_text():
    lines = inspect.getsource(DMMConfig).splitlines()
    for field in fields(DMMConfig):
        row = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{field.name}:"))
        assert "#" in lines[row] or lines[row - 1].strip().startswith("#"), field.name


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
def test_the_elman_recurrence_has_nn_rnns_values_and_gradients(nonlinearity, reverse):
    from pyro_models.dmm.chains import active_rows
    from pyro_models.dmm.networks import elman_rnn, reverse_padded

    torch.manual_seed(0)
    rnn = torch.nn.RNN(5, 7, nonlinearity=nonlinearity, batch_first=True).double()
    e, h_0 = torch.randn(3, 6, 5, dtype=F64), torch.randn(3, 7, dtype=F64, requires_grad=True)
    lengths = torch.tensor([6, 4, 2])  # decreasing: the rows still running are a prefix
    valid = (torch.arange(6) < lengths.unsqueeze(-1)).unsqueeze(-1).to(F64)
    weights = torch.randn(3, 6, 7, dtype=F64) * valid  # a loss of the real steps
    expected = rnn(reverse_padded(e, lengths) if reverse else e, h_0.unsqueeze(0))[0]
    expected = reverse_padded(expected, lengths) if reverse else expected
    results = []
    for out in (expected, elman_rnn(rnn, e, h_0, active_rows(lengths, 3, 6), reverse)):
        grads = torch.autograd.grad((weights * out).sum(), [h_0, *rnn.parameters()])
        results.append((out * valid, grads))
    (expected, expected_grads), (out, grads) = results
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(expected_grads, grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
