"""Fitting a guide to a fixed model (inference.evaluation.guide_fit) against a conjugate model's analytic posterior.

Model: z ~ N(0, 1), x | z ~ N(z, 1), so p(x) = N(x; 0, 2) and p(z | x) = N(x / 2, 1 / 2). A guide
N(w x + b, s^2) with s learned contains the posterior: its fitted ELBO reaches log p(x). With s fixed
at 1 the inference gap is KL(N(m, 1) || N(m, 1/2)) = (1/2)(2 - 1 + log(1/2)) = 0.1534 nats.
"""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from inference.training.elbo import elbo_terms
from inference.evaluation.guide_fit import GuideFitConfig, example_elbos, fit_guide, load_matching

N_TRAIN, N_TEST = 2000, 20000
FIXED_SCALE_GAP = 0.5 * (2.0 - 1.0 + math.log(0.5))
# Monte Carlo: the per-example ELBO of the fixed-scale guide has std 1/sqrt(2) (half a chi-square with
# one degree of freedom), so its mean over N_TEST examples has std 0.005; the tolerance is 6 of those.
TOL = 0.03


class Model(nn.Module):
    """z ~ N(loc, 1), x | z ~ N(z, 1); ``loc`` (0) is a parameter the fit must leave alone."""

    def __init__(self):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        pyro.module("model", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(self.loc, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)


class Guide(nn.Module):
    """q(z | x) = N(w x + b, s^2), s learned or fixed at 1."""

    def __init__(self, learn_scale: bool):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))
        if learn_scale:
            self.log_scale = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("log_scale", torch.zeros(()))

    def forward(self, x):
        pyro.module("guide", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.w * x + self.b, self.log_scale.exp()))


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) + torch.randn(n, generator=g),)  # x = z + noise ~ N(0, 2)


@pytest.mark.parametrize("learn_scale, gap", [(True, 0.0), (False, FIXED_SCALE_GAP)])
def test_fitted_guide_reaches_the_analytic_inference_gap(learn_scale, gap):
    model, guide = Model(), Guide(learn_scale)
    model.train()
    guide.eval()
    train, test = data(N_TRAIN, 0), data(N_TEST, 1)
    before = example_elbos(model, guide, test).mean().item()
    losses = fit_guide(model, guide, train, GuideFitConfig(epochs=30, batch_size=100, lr=0.02, seed=0))
    assert len(losses) == 30 * N_TRAIN // 100
    log_evidence = dist.Normal(0.0, math.sqrt(2.0)).log_prob(test[0]).mean().item()
    after = example_elbos(model, guide, test).mean().item()
    assert after > before + 0.1  # the zero-initialised guide was far from the posterior
    assert abs((log_evidence - after) - gap) < TOL, (log_evidence, after, gap)
    assert abs(guide.w.item() - 0.5) < 0.05  # the posterior mean x / 2
    assert model.loc.item() == 0.0 and model.loc.grad is None  # the model is fixed
    assert model.training and not guide.training  # the modes found are restored


def test_fit_guide_refuses_a_guide_without_own_parameters():
    model = Model()
    with pytest.raises(ValueError, match="guide"):
        fit_guide(model, model, data(10, 0), GuideFitConfig(epochs=1))


@pytest.mark.parametrize("field, value", [("epochs", 0), ("batch_size", 0), ("lr", 0.0), ("clip_norm", -1.0)])
def test_guide_fit_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        GuideFitConfig(**{field: value})


def test_load_matching_copies_what_fits_and_keeps_the_rest():
    source = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    target = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5), nn.Linear(5, 2))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    copied = load_matching(target, source.state_dict())
    state = target.state_dict()
    assert copied == ["0.bias", "0.weight"]  # the first layer alone has the same names and shapes
    for key in state:
        if key in copied:
            assert torch.equal(state[key], source.state_dict()[key])
        else:
            assert torch.equal(state[key], before[key])


def test_example_elbos_are_the_analytic_evidence_under_the_exact_posterior():
    """With q(z | x) = p(z | x) every draw's ELBO is log p(x) exactly; and their mean over examples is
    the held-out ELBO of the same draws."""
    model, guide = Model(), Guide(learn_scale=True)
    with torch.no_grad():
        guide.w.fill_(0.5), guide.log_scale.fill_(0.5 * math.log(0.5))
    x = data(50, 3)
    per_example = example_elbos(model, guide, x, num_samples=3, batch_size=16)
    assert per_example.shape == (50,)
    assert torch.allclose(per_example, dist.Normal(0.0, math.sqrt(2.0)).log_prob(x[0]), atol=1e-4)
    pyro.set_rng_seed(0)
    mean = elbo_terms(Model(), Guide(learn_scale=False), *x).elbo.item() / x[0].shape[0]  # Pyro's traces, summed
    pyro.set_rng_seed(0)
    assert abs(example_elbos(Model(), Guide(learn_scale=False), x, batch_size=64).mean().item() - mean) < 1e-4
