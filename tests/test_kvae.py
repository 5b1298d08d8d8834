"""The Kalman VAE: its prior against an independent construction, shapes, causality of the dynamics
network, generation, imputation and its metrics."""
import pyro
import pytest
import torch

from inference.recipes.kvae import FreezeParameters
from inference.training.elbo import make_elbo
from pyro_models.imputation import consecutive_frame_mask, hamming_error, random_frame_mask
from pyro_models.imputation import last_observed_frame as last_observed_floor
from pyro_models.imputation import majority_frame as static_floor
from pyro_models.kvae.impute import kalman_impute, posterior_predictive
from inference.trainer import TrainConfig, Trainer
from pyro_models.kvae import KalmanPrior, KVAEConfig, build_kvae, generate, generate_latents

SMALL = dict(lstm_hidden=8, decoder_channels=8, decoder_start_channels=8, encoder_filters=8, mlp_hidden=(16,))


def kvae_off_identity():
    """A small KVAE (vector frames (6,)) and its guide, seeded, with dynamics moved away from the identity
    initialisation (A = I, C ~ 0.05 N(0, 1)), so that the Kalman quantities are not trivial."""
    torch.manual_seed(0)
    model, guide = build_kvae((6,), KVAEConfig(**SMALL))
    with torch.no_grad():
        model.dynamics.trans_bases.add_(0.2 * torch.randn_like(model.dynamics.trans_bases))
        model.dynamics.obs_bases.mul_(20)
    return model, guide


def dense_log_marginal(dynamics, a, observed=None):
    """log p(a) of one sequence a (T, D) by building the joint Gaussian of a explicitly (float64); with
    ``observed (T,)`` bool, log p(a of the observed steps): the joint's marginal on their rows."""
    a = a.double()
    alpha = dynamics.alpha(a.unsqueeze(0).float())[0]
    trans, obs = (m.double() for m in dynamics.matrices(alpha))
    steps, z_dim = a.shape[0], trans.shape[-1]
    # z = L w with w the stacked noise (z_1, w_2, ..., w_T): z_t = A_t z_{t-1} + w_t
    blocks = torch.zeros(steps * z_dim, steps * z_dim, dtype=torch.float64)
    for t in range(steps):
        product = torch.eye(z_dim, dtype=torch.float64)
        for s in range(t, -1, -1):
            blocks[t * z_dim:(t + 1) * z_dim, s * z_dim:(s + 1) * z_dim] = product
            product = product @ trans[s]
    noise = torch.block_diag(dynamics.init_cov.double(), *[dynamics.trans_cov.double()] * (steps - 1))
    z_cov = blocks @ noise @ blocks.T
    c = torch.block_diag(*obs)
    a_cov = c @ z_cov @ c.T + torch.block_diag(*[dynamics.obs_cov.double()] * steps)
    rows = torch.ones(steps, a.shape[1], dtype=torch.bool) if observed is None else observed[:, None].expand(-1, a.shape[1])
    rows = rows.reshape(-1)
    return torch.distributions.MultivariateNormal(torch.zeros(int(rows.sum()), dtype=torch.float64),
                                                  a_cov[rows][:, rows]).log_prob(a.reshape(-1)[rows])


def test_masked_kalman_prior_is_the_dense_marginal_of_the_observed_steps():
    model, guide = kvae_off_identity()
    a = torch.randn(3, 6, 2)
    mask = torch.tensor([[1, 1, 0, 1, 0, 1], [1, 0, 0, 0, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    prior = KalmanPrior(model.dynamics, (3,), 6, 2, mask=mask)
    expected = torch.stack([dense_log_marginal(model.dynamics, a[i], mask[i]) for i in range(3)])
    assert torch.allclose(prior.log_prob(a).double(), expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(prior.log_prob(a), KalmanPrior(model.dynamics, (3,), 6, 2).log_prob(a))
    x = torch.rand(3, 6, 6)  # the guide's log q leaves the missing steps out too
    trace = pyro.poutine.trace(guide).get_trace(x, mask)
    a_site = trace.nodes["a"]
    q = guide.posterior(x).base_dist.log_prob(a_site["value"]).sum(-1)  # (3, T)
    assert torch.allclose(a_site["fn"].log_prob(a_site["value"]), (q * mask).sum(-1))


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_kalman_prior_matches_dense_gaussian(steps):
    model, _ = kvae_off_identity()
    a = torch.randn(3, steps, 2)
    prior = KalmanPrior(model.dynamics, (3,), steps, 2)
    expected = torch.stack([dense_log_marginal(model.dynamics, a[i]) for i in range(3)])
    assert torch.allclose(prior.log_prob(a).double(), expected, rtol=1e-5, atol=1e-4)


def test_alpha_sees_only_the_past():
    model, _ = build_kvae((6,), KVAEConfig(**SMALL))
    a = torch.randn(2, 6, 2)
    changed = a.clone()
    changed[:, 3] += 5.0
    before, after = model.dynamics.alpha(a), model.dynamics.alpha(changed)
    assert torch.allclose(before[:, :4], after[:, :4])  # alpha_t uses a_0 .. a_{t-1}
    assert not torch.allclose(before[:, 4:], after[:, 4:])
    assert torch.allclose(before.sum(-1), torch.ones(2, 6))


@pytest.mark.parametrize("frame_shape", [(1, 16, 16), (3, 8, 8), (12,)])
@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_model_guide_shapes_and_gradients(frame_shape, elbo):
    model, guide = build_kvae(frame_shape, KVAEConfig(decoder_blocks=2, **SMALL))
    x = torch.rand(3, 5, *frame_shape)
    assert guide(x).shape == (3, 5, 2)
    loss = make_elbo(elbo).differentiable_loss(model, guide, x)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in list(model.named_parameters()) + list(guide.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.dynamics.lstm.weight_ih_l0.grad.abs().sum() > 0  # the dynamics network learns


def test_recon_weight_applies_in_training_only():
    model, guide = build_kvae((6,), KVAEConfig(recon_weight=0.3, **SMALL))
    x = torch.rand(2, 4, 6)

    def loss(training):
        model.train(training), guide.train(training)
        pyro.set_rng_seed(0)
        trace = pyro.poutine.trace(pyro.poutine.replay(model, pyro.poutine.trace(guide).get_trace(x))).get_trace(x)
        return trace.nodes["x"]["scale"]

    assert loss(True) == 0.3 and loss(False) == 1.0


def test_bad_input_is_named():
    model, guide = build_kvae((1, 8, 8), KVAEConfig(decoder_blocks=2, **SMALL))
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, T, 1, 8, 8\)"):
        model(torch.rand(2, 3, 1, 8, 9))
    with pytest.raises(ValueError, match="multiples"):
        build_kvae((1, 10, 10), KVAEConfig(**SMALL))
    with pytest.raises(ValueError, match="frame_shape"):
        build_kvae((4, 4), KVAEConfig(**SMALL))
    with pytest.raises(ValueError, match="a_dim"):
        KVAEConfig(a_dim=0)


def test_generation():
    model, _ = build_kvae((1, 8, 8), KVAEConfig(decoder_blocks=2, **SMALL))
    trace = pyro.poutine.trace(generate).get_trace(model, 3, 5)
    assert trace.nodes["_RETURN"]["value"].shape == (3, 5, 1, 8, 8)
    assert {f"a_{t}" for t in range(1, 6)} <= set(trace.nodes)
    latents = generate_latents(model.dynamics, 4, 6)
    assert latents.a.shape == (4, 6, 2) and latents.z.shape == (4, 6, 4) and latents.alpha.shape == (4, 6, 3)


def test_prior_sample_moments():
    # With alpha fixed by identical bases, a_1 ~ N(0, C init_cov C^T + R): check the covariance by MC.
    torch.manual_seed(0)
    model, _ = build_kvae((6,), KVAEConfig(**SMALL))
    with torch.no_grad():
        model.dynamics.obs_bases.copy_(model.dynamics.obs_bases[:1].expand_as(model.dynamics.obs_bases))
    a = KalmanPrior(model.dynamics, (), 1, 2).sample((20000,))[:, 0]  # (n, a_dim)
    c = model.dynamics.obs_bases[0]
    expected = c @ model.dynamics.init_cov @ c.T + model.dynamics.obs_cov
    # Monte Carlo tolerance: the sample covariance has relative sd about sqrt(2 / n) = 1%; allow 5%.
    assert torch.allclose(torch.cov(a.T), expected, rtol=0.05, atol=0.05 * float(expected.diagonal().max()))


def test_imputation_shapes_and_observed_steps():
    torch.manual_seed(0)
    model, guide = build_kvae((1, 8, 8), KVAEConfig(decoder_blocks=2, **SMALL))
    x = (torch.rand(3, 7, 1, 8, 8) > 0.8).float()
    mask = random_frame_mask(3, 7, 0.5, generator=torch.Generator().manual_seed(1))
    result = kalman_impute(model, guide, x, mask)
    assert result.smoothed.shape == x.shape and result.filtered.shape == x.shape and result.alpha.shape == (3, 7, 3)
    assert torch.equal(result.smoothed[:, -1], result.filtered[:, -1])  # smoothing = filtering at the end
    # Hiding the missing frames' content changes nothing: only observed frames are read.
    scrambled = torch.where(mask[..., None, None, None], x, torch.rand_like(x))
    assert torch.allclose(kalman_impute(model, guide, scrambled, mask).smoothed, result.smoothed)
    draws = posterior_predictive(model, result, x, mask, num_samples=4)
    assert draws.shape == (4, *x.shape) and (draws >= 0).all() and (draws <= 1).all()


def test_masks_metric_and_floors():
    mask = consecutive_frame_mask(2, 10, 3)
    assert mask[0].tolist() == [True] * 4 + [False] * 3 + [True] * 3
    random = random_frame_mask(500, 10, 1.0)
    assert random[:, :4].all() and not random[:, 4:].any()
    with pytest.raises(ValueError, match="num_missing"):
        consecutive_frame_mask(2, 10, 7)
    truth = torch.zeros(1, 3, 4)
    truth[0, 2, 0] = 1.0
    prediction = torch.zeros(1, 3, 4)
    mask = torch.tensor([[True, True, False]])
    assert hamming_error(truth, prediction, mask) == pytest.approx(0.25)
    x = torch.arange(6.0).reshape(1, 6, 1)
    floor = last_observed_floor(x, torch.tensor([[True, False, False, True, False, True]]))
    assert floor[0, :, 0].tolist() == [0.0, 0.0, 0.0, 3.0, 3.0, 5.0]
    train = torch.zeros(10, 4, 3)
    train[:, :, 0] = 1.0  # a pixel on in every frame, like the walls
    assert static_floor(train, torch.zeros(2, 5, 3))[1, 4].tolist() == [1.0, 0.0, 0.0]


def test_freeze_parameters_keeps_lstm_until_the_epoch():
    model, guide = build_kvae((6,), KVAEConfig(**SMALL))
    x = torch.rand(8, 5, 6)
    freeze = FreezeParameters(model.dynamics.lstm.parameters(), epochs=1)
    trainer = Trainer(model, guide, TrainConfig(epochs=2, batch_size=4, progress=False, train_eval_size=4), callbacks=[freeze])
    before = [p.detach().clone() for p in model.dynamics.lstm.parameters()]
    trainer.fit(x, x[:2])
    history = trainer.history
    assert history[0]["frozen"] and not history[1]["frozen"]
    assert not all(torch.equal(a, b) for a, b in zip(before, model.dynamics.lstm.parameters()))

    model2, guide2 = build_kvae((6,), KVAEConfig(**SMALL))
    before = [p.detach().clone() for p in model2.dynamics.lstm.parameters()]
    freeze2 = FreezeParameters(model2.dynamics.lstm.parameters(), epochs=5)
    Trainer(model2, guide2, TrainConfig(epochs=1, batch_size=4, progress=False, train_eval_size=4), callbacks=[freeze2]).fit(x, x[:2])
    assert all(torch.equal(a, b) for a, b in zip(before, model2.dynamics.lstm.parameters()))


def test_kl_warmup_scales_the_a_site_in_model_and_guide():
    model, guide = build_kvae((6,), KVAEConfig(**SMALL))
    x = torch.rand(2, 4, 6)
    model.kl_weights.beta = 0.25
    guide_trace = pyro.poutine.trace(guide).get_trace(x)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(model, guide_trace)).get_trace(x)
    assert guide_trace.nodes["a"]["scale"] == 0.25 and model_trace.nodes["a"]["scale"] == 0.25
    model.eval(), guide.eval()  # evaluation scores the true ELBO
    assert pyro.poutine.trace(guide).get_trace(x).nodes["a"]["scale"] == 1.0


def test_kalman_prior_gradients_match_dense_gaussian():
    # Through a (observations and the alpha network's inputs) and the dynamics parameters.
    model, _ = kvae_off_identity()
    a = torch.randn(2, 5, 2, requires_grad=True)
    params = [a, model.dynamics.obs_bases, model.dynamics.trans_bases, model.dynamics.a0]
    ours = torch.autograd.grad(KalmanPrior(model.dynamics, (2,), 5, 2).log_prob(a).sum(), params)
    dense = torch.autograd.grad(sum(dense_log_marginal(model.dynamics, a[i]) for i in range(2)), params)
    for x, y in zip(ours, dense):
        assert torch.allclose(x, y.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("frame_shape", [(1, 8, 8), (6,)])
def test_structured_guide_starts_factorised_and_reads_the_whole_sequence(frame_shape):
    config = KVAEConfig(decoder_blocks=2, context_hidden=5, **SMALL)
    torch.manual_seed(0)
    model, factorised = build_kvae(frame_shape, config)
    after_factorised = torch.rand(4)
    torch.manual_seed(0)
    _, structured = build_kvae(frame_shape, KVAEConfig(decoder_blocks=2, context_hidden=5, guide="structured", **SMALL))
    # common random numbers: the context is drawn from a fork, so the rest is the factorised run's
    assert torch.equal(torch.rand(4), after_factorised)
    for (name, p), q in zip(factorised.encoder.named_parameters(), structured.encoder.parameters()):
        assert torch.equal(p, q), name
    x = torch.rand(3, 7, *frame_shape)
    q_f, q_s = factorised.posterior(x).base_dist, structured.posterior(x).base_dist
    assert torch.allclose(q_f.loc, q_s.loc) and torch.allclose(q_f.scale, q_s.scale)  # the shift starts at zero
    with torch.no_grad():
        structured.context.shift.weight.normal_()
    later = x.clone()
    later[:, 5] = torch.rand_like(later[:, 5])
    moved = (structured.posterior(later).base_dist.loc - structured.posterior(x).base_dist.loc)[:, 1].abs().max()
    still = (factorised.posterior(later).base_dist.loc - factorised.posterior(x).base_dist.loc)[:, 1].abs().max()
    assert moved > 1e-4 and still == 0  # a_2 sees frame 6 through the GRU; the factorised q(a_2 | x_2) does not
    loss = make_elbo("meanfield").differentiable_loss(model, structured, x)
    loss.backward()
    for name, p in structured.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
