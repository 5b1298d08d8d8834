"""Shape grids for the VAE models and guides, schedules, imputation and bad input."""
import math

import pyro
import pytest
import torch
from pyro.infer import Predictive

from inference.recipes.vae.analysis import batch_kl_per_dim, latent_stats
from inference.training.elbo import make_elbo
from pyro_models.imputation import missing_mse
from pyro_models.vae.impute import bottom_half_mask, impute, random_pixel_mask
from inference.recipes.vae.schedules import FreeBitsConfig, SoftFreeBits, free_bits_update, make_kl_schedule
from pyro_models.vae import VAEConfig, build_vae

SMALL = dict(z_dim=5, hidden_dims=(32,), channels=(8, 16), flow_hidden_dims=(16,))


@pytest.mark.parametrize("name", ["vae", "conv-vae"])
@pytest.mark.parametrize("guide", ["normal", "iaf"])
@pytest.mark.parametrize("x_shape", [(1, 12, 12), (3, 16, 16), (1, 9, 14)])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_model_guide_shapes(name, guide, x_shape, likelihood, elbo):
    model, g = build_vae(x_shape, VAEConfig(guide=guide, likelihood=likelihood, **SMALL), name)
    x = torch.rand(4, *x_shape)
    z = g(x)
    assert z.shape == (4, 5)
    assert model(x).shape == (4, *x_shape)
    loss = make_elbo(elbo).differentiable_loss(model, g, x)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in g.parameters())


@pytest.mark.parametrize("num_particles", [1, 3])
def test_vectorised_particles(num_particles):
    model, guide = build_vae((1, 8, 8), VAEConfig(**SMALL), "vae")
    loss = make_elbo("trace", num_particles=num_particles).differentiable_loss(model, guide, torch.rand(6, 1, 8, 8))
    assert torch.isfinite(loss)


def test_kl_weights_act_in_training_mode_only():
    model, guide = build_vae((1, 8, 8), VAEConfig(**SMALL), "vae")
    x = torch.rand(6, 1, 8, 8)
    elbo = make_elbo("meanfield")

    def loss_at(beta, training):
        model.kl_weights.beta = beta
        model.train(training), guide.train(training)
        pyro.set_rng_seed(3)
        return elbo.differentiable_loss(model, guide, x).item()

    kl = torch.distributions.kl_divergence(guide.posterior(x), model.prior(6, x)).sum().item()
    # Same noise, so the likelihood term is equal: the difference is (1 - beta) * KL exactly.
    assert loss_at(1.0, True) - loss_at(0.25, True) == pytest.approx(0.75 * kl, rel=1e-4)
    assert loss_at(0.25, False) == pytest.approx(loss_at(1.0, True), rel=1e-6)


def test_per_dimension_weights_weigh_the_analytic_kl():
    model, guide = build_vae((1, 8, 8), VAEConfig(**SMALL), "vae")
    x = torch.rand(6, 1, 8, 8)
    elbo = make_elbo("meanfield")
    gamma = torch.tensor([0.0, 0.5, 1.0, 0.1, 0.9])
    per_dim = torch.distributions.kl_divergence(guide.posterior(x).base_dist, model.prior(6, x).base_dist).sum(0)
    pyro.set_rng_seed(1)
    full = elbo.differentiable_loss(model, guide, x).item()
    model.kl_weights.per_dim = True
    model.kl_weights.gamma.copy_(gamma)
    pyro.set_rng_seed(1)
    weighted = elbo.differentiable_loss(model, guide, x).item()
    assert full - weighted == pytest.approx(((1 - gamma) * per_dim).sum().item(), rel=1e-4)


def test_free_bits_rule():
    config = FreeBitsConfig(target=0.5, threshold=0.1, rate=0.1)
    gamma = torch.tensor([0.5, 0.5, 0.5, 1.0, 0.02])
    kl = torch.tensor([0.1, 0.5, 2.0, 2.0, 0.45])  # low, in band, high, high (clamped), at the low edge
    updated = free_bits_update(gamma, kl, config)
    expected = torch.tensor([0.45, 0.5, 0.55, 1.0, 0.018])
    assert torch.allclose(updated, expected)
    # Clamped to [0, 1] whatever the number of steps.
    for _ in range(100):
        gamma = free_bits_update(gamma, torch.tensor([3.0, 0.0, 3.0, 0.0, 3.0]), config)
    assert gamma.min() >= 0 and gamma.max() <= 1


def test_free_bits_needs_factorised_guide():
    model, guide = build_vae((1, 8, 8), VAEConfig(guide="iaf", **SMALL), "vae")

    class FakeTrainer:
        pass

    trainer = FakeTrainer()
    trainer.guide = guide
    with pytest.raises(ValueError, match="factorised guide"):
        SoftFreeBits(model.kl_weights, FreeBitsConfig()).on_fit_start(trainer)


def test_unknown_names():
    with pytest.raises(ValueError, match="guide"):
        VAEConfig(guide="mixture")
    with pytest.raises(ValueError, match="likelihood"):
        VAEConfig(likelihood="poisson")
    with pytest.raises(ValueError, match="architecture"):
        build_vae((1, 8, 8), VAEConfig(), "gan")
    with pytest.raises(ValueError, match="kl_schedule"):
        make_kl_schedule("cyclic", None, 3)


def test_wrong_image_shape_is_named():
    model, guide = build_vae((1, 8, 8), VAEConfig(**SMALL), "vae")
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, 1, 8, 8\), got \(4, 1, 8, 9\)"):
        model(torch.rand(4, 1, 8, 9))
    with pytest.raises(ValueError, match="mask"):
        model(torch.rand(4, 1, 8, 8), torch.ones(4, 8, 8, dtype=torch.bool))


def test_mask_all_observed_scores_like_no_mask():
    model, guide = build_vae((1, 8, 8), VAEConfig(**SMALL), "vae")
    model.eval(), guide.eval()
    x = torch.rand(3, 1, 8, 8)
    z = guide(x)
    conditioned = pyro.poutine.condition(model, data={"z": z})
    with_mask = pyro.poutine.trace(conditioned).get_trace(x, torch.ones_like(x, dtype=torch.bool))
    without = pyro.poutine.trace(conditioned).get_trace(x)
    assert with_mask.log_prob_sum().item() == pytest.approx(without.log_prob_sum().item(), rel=1e-6)


@pytest.mark.parametrize("mask_kind", ["bottom", "random"])
def test_imputation_keeps_observed_pixels(mask_kind):
    model, guide = build_vae((1, 8, 8), VAEConfig(**SMALL), "vae")
    x = torch.rand(4, 1, 8, 8)
    mask = bottom_half_mask(x.shape) if mask_kind == "bottom" else random_pixel_mask(x.shape, 0.5, torch.Generator().manual_seed(0))
    result = impute(model, guide, x, mask, num_samples=5, fill=x.mean(0), num_rounds=2)
    assert torch.equal(result.imputed[mask], x[mask])
    assert torch.equal(result.samples[:, mask], x[mask].expand(5, -1))
    assert result.samples.shape == (5, 4, 1, 8, 8)
    assert not torch.equal(result.imputed[~mask], x.mean(0).expand_as(x)[~mask])  # something was imputed
    assert missing_mse(x, result.imputed, mask) >= 0 and missing_mse(x, result.estimates["fill"], mask) > 0
    assert torch.equal(result.estimates["posterior_mean"], result.imputed) and torch.equal(result.mask, mask)


def test_predictive_samples_missing_pixels_only():
    model, guide = build_vae((1, 6, 6), VAEConfig(**SMALL), "vae")
    model.eval(), guide.eval()
    x = torch.rand(2, 1, 6, 6)
    mask = bottom_half_mask(x.shape)
    draws = Predictive(model, guide=guide, num_samples=4)(x, mask)
    assert "x_units_unobserved" in draws and "x_mean" in draws


def test_predictive_returns_x_in_the_datas_layout_with_a_mask_or_without():
    """``x`` is (samples, batch, C, H, W) either way, and with a mask, like every site, padded by Pyro's
    ``Predictive`` to the model's plate nesting (a size-1 axis for the pixels' plate); its observed pixels
    are the data and its missing ones the draws of ``x_units_unobserved`` (the site's plate layout)."""
    model, guide = build_vae((1, 6, 6), VAEConfig(**SMALL), "vae")
    model.eval(), guide.eval()
    x = torch.rand(2, 1, 6, 6)
    mask = bottom_half_mask(x.shape)
    plain = Predictive(model, guide=guide, num_samples=3, return_sites=["x", "z"])(x)
    draws = Predictive(model, guide=guide, num_samples=3, return_sites=["x", "z", "x_units_unobserved"])(x, mask)
    assert plain["x"].shape == (3, 2, 1, 6, 6) and draws["x"].shape == (3, 1, 2, 1, 6, 6)
    assert draws["z"].shape == (3, 1) + plain["z"].shape[1:]  # the same padding as the latents
    drawn = draws["x"].squeeze(1)
    assert torch.equal(drawn[:, mask], x[mask].expand(3, -1))
    missing = draws["x_units_unobserved"].reshape(3, 36, 2).transpose(1, 2).reshape(3, 2, 1, 6, 6)  # (samples, pixels, batch) -> data layout
    assert torch.equal(drawn[:, ~mask], missing[:, ~mask])
    assert not torch.equal(drawn[:, ~mask], x[~mask].expand(3, -1))


def test_imputation_bad_mask():
    model, guide = build_vae((1, 6, 6), VAEConfig(**SMALL), "vae")
    x = torch.rand(2, 1, 6, 6)
    with pytest.raises(ValueError, match="mask"):
        impute(model, guide, x, torch.ones(2, 6, 6, dtype=torch.bool), fill=x.mean(0))
    with pytest.raises(ValueError, match="drop_prob"):
        random_pixel_mask(x.shape, 1.5)


@pytest.mark.parametrize("guide_name", ["normal", "iaf"])
def test_latent_stats(guide_name):
    model, guide = build_vae((1, 8, 8), VAEConfig(guide=guide_name, **SMALL), "vae")
    x = torch.rand(30, 1, 8, 8)
    model.eval(), guide.eval()
    stats = latent_stats(model, guide, x, batch_size=7)
    assert stats.kl_per_dim.shape == (5,) and (stats.kl_per_dim >= 0).all()
    assert 0 <= stats.active_units <= 5
    if guide_name == "normal":  # exact: the mean over the batch of the analytic per-dimension KL
        exact = torch.distributions.kl_divergence(guide.posterior(x).base_dist, model.prior(30, x).base_dist).mean(0)
        assert torch.allclose(stats.kl_per_dim, exact, rtol=1e-5)
        assert torch.allclose(batch_kl_per_dim(model, guide, x), exact, rtol=1e-5)


def test_plain_pyro_svi_trains_the_modules():
    # The models register their networks with pyro.module, so Pyro's own SVI loop works unchanged.
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import Adam

    model, guide = build_vae((1, 8, 8), VAEConfig(**SMALL), "vae")
    before = guide.encoder.head.loc.weight.detach().clone()
    svi = SVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO())
    assert torch.isfinite(torch.tensor(svi.step(torch.rand(6, 1, 8, 8))))
    assert not torch.equal(before, guide.encoder.head.loc.weight)


def test_iaf_guide_starts_as_the_normal_guide():
    model, iaf = build_vae((1, 8, 8), VAEConfig(guide="iaf", **SMALL), "vae")
    x = torch.rand(6, 1, 8, 8)
    q = iaf.posterior(x)
    base_q = q.base_dist
    z = q.rsample()
    assert torch.allclose(q.log_prob(z), base_q.log_prob(z), atol=1e-5)
    prior = model.prior(6, x)
    assert torch.allclose(torch.distributions.kl_divergence(q, prior), torch.distributions.kl_divergence(base_q, prior), atol=1e-5)


def test_imputation_experiments_start_the_vae_from_the_mean_training_image():
    """``scripts/impute.py`` (``impute_batch``) starts missing pixels at the mean training image, the floor a
    user computes, not at the batch's mean observed pixel (0.5 grey where no image observes, e.g. a bottom half)."""
    from inference.evaluation.imputation import impute_batch
    from inference.runs.experiment import Run, RunSpec
    from inference.trainer import TrainConfig
    from pyro_models.datasets import ImageData

    train = torch.rand(20, 1, 6, 6) * 0.2  # dark training images: their mean is far from 0.5
    data = ImageData(train, torch.rand(4, 1, 6, 6), "tiny")
    model, guide = build_vae((1, 6, 6), VAEConfig(z_dim=2, hidden_dims=(8,)), "vae")
    run = Run(model, guide, RunSpec("vae", VAEConfig(z_dim=2, hidden_dims=(8,)), TrainConfig()), data, "nowhere")
    mask = torch.ones(4, 1, 6, 6, dtype=torch.bool)
    mask[..., 3:, :] = False  # the bottom half, missing in every image
    result = impute_batch(run, data.test, mask, num_samples=2)
    fill = result.estimates["fill"]
    assert torch.equal(fill[~mask], train.mean(0).expand_as(fill)[~mask])
    assert torch.equal(fill[mask], data.test[mask])


def test_build_vae_takes_the_order_of_every_builder_and_still_the_old_one():
    torch.manual_seed(0)
    new = build_vae((1, 8, 8), VAEConfig(**SMALL), "conv-vae")
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="build_vae"):
        old = build_vae("conv-vae", (1, 8, 8), VAEConfig(**SMALL))
    for a, b in zip(new, old):
        assert type(a) is type(b)
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("architecture", ["vae", "conv-vae"])
def test_generate_samples_the_prior_and_returns_the_means(architecture):
    """generate(model, batch) is a Pyro program: z from N(0, I), x from p(x | z); the draws of x average
    to the returned means (Bernoulli pixels: within 5 standard errors)."""
    import pyro.poutine as poutine
    from pyro_models.vae import generate

    model, _ = build_vae((1, 8, 8), VAEConfig(**SMALL), architecture)
    pyro.set_rng_seed(0)
    trace = poutine.trace(generate).get_trace(model, 4000)
    z, x, means = trace.nodes["z"]["value"], trace.nodes["x"]["value"], trace.nodes["_RETURN"]["value"]
    assert z.shape == (4000, SMALL["z_dim"]) and x.shape == means.shape == (4000, 1, 8, 8)
    assert abs(float(z.mean())) < 5 / math.sqrt(z.numel()) and abs(float(z.var()) - 1) < 0.05
    gap = float((x - means).mean())  # E[x - E[x | z]] = 0; sd of each term <= 1/2
    assert abs(gap) < 5 * 0.5 / math.sqrt(x.numel())
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, 0)


def test_a_trained_vae_imputes_a_bottom_half_better_than_the_mean_training_image(tmp_path):
    """``scripts/impute.py``'s protocol (``imputation.evaluate``, bottom halves missing) on a VAE trained a
    few epochs on images whose bottom half mirrors their top (the generated shapes, folded): the
    posterior-predictive error is below the mean-image floor, the first thing a user compares with."""
    from inference.evaluation import imputation
    from inference.runs.experiment import RunSpec, load_run, train
    from inference.trainer import TrainConfig
    from pyro_models.datasets import ImageData, load_image_data

    shapes = load_image_data("shapes", num_shapes=1200, image_size=12, seed=0)
    mirrored = lambda x: torch.cat([x[..., :6, :], x[..., :6, :].flip(-2)], dim=-2)  # (N, 1, 12, 12)
    data = ImageData(mirrored(shapes.train), mirrored(shapes.test), "mirrored shapes")
    spec = RunSpec("vae", VAEConfig(z_dim=8, hidden_dims=(64,)),
                   TrainConfig(epochs=10, batch_size=50, lr=3e-3, progress=False, train_eval_size=50, eval_batch_size=150))
    train(spec, str(tmp_path / "run"), data=data)
    run = load_run(str(tmp_path / "run"), data=data)
    row = imputation.evaluate(run, "bottom-half", metric="mse", num_test=100)[0]
    assert row["posterior_mean"] < 0.8 * row["floor_mean_image"], row
