"""Guides built on ``pyro.param`` and Pyro's autoguides train through the trainer, are checkpointed once
and keep training after a resume: 2 epochs then a resume to 4 equal 4 uninterrupted epochs, values and
gradients, while a guide frozen at its epoch-2 values (the old failure) would not."""
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import autoguide

from inference.runs.rundir import RunDir
from inference.trainer import TrainConfig, Trainer

DIM, EXAMPLES = 3, 16


def model(x):
    """Global latents: loc ~ N(0, 1), log-scale ~ N(0, 1) (each (DIM,)); x_n ~ N(loc, exp(log-scale))."""
    loc = pyro.sample("loc", dist.Normal(torch.zeros(DIM), 1.0).to_event(1))
    log_scale = pyro.sample("log_scale", dist.Normal(torch.zeros(DIM), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(loc, log_scale.exp()).to_event(1), obs=x)


def param_guide(x):
    """A function guide of ``pyro.param`` sites only."""
    for name in ("loc", "log_scale"):
        mean = pyro.param(f"q_{name}_mean", torch.zeros(DIM))
        scale = pyro.param(f"q_{name}_scale", torch.ones(DIM), constraint=constraints.positive)
        pyro.sample(name, dist.Normal(mean, scale).to_event(1))


GUIDES = {
    "pyro.param": lambda: param_guide,
    "AutoNormal": lambda: autoguide.AutoNormal(model),
    "AutoDiagonalNormal": lambda: autoguide.AutoDiagonalNormal(model),
    "AutoLowRankMultivariateNormal": lambda: autoguide.AutoLowRankMultivariateNormal(model, rank=2),
    "AutoIAFNormal": lambda: autoguide.AutoIAFNormal(model, hidden_dim=[8], num_transforms=1),
}


def values(trainer):
    return [p.detach().clone() for p in trainer.params]


def train(guide_name, epochs, out, resume=False, local=True):
    """A fresh process's view: an empty param store, a new guide (built under module-local parameters or
    for the global store), then ``fit``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.settings.context(module_local_params=local):
        guide = GUIDES[guide_name]()
    x = 2.0 + 0.5 * torch.randn(EXAMPLES, DIM, generator=torch.Generator().manual_seed(1))
    config = TrainConfig(epochs=epochs, batch_size=4, lr=0.05, elbo="trace", progress=False, train_eval_size=4,
                         eval_batch_size=EXAMPLES)
    trainer = Trainer(model, guide, config, RunDir(out, {"guide": guide_name}, resume=resume))
    trainer.fit(x, x[:4], resume=resume)
    pyro.set_rng_seed(3)
    loss = trainer.loss(x)
    grads = torch.autograd.grad(loss, trainer.params)
    return trainer, values(trainer), grads


@pytest.mark.parametrize("local", [True, False])
@pytest.mark.parametrize("guide_name", GUIDES)
def test_a_resumed_run_equals_an_uninterrupted_one(guide_name, local, tmp_path):
    _, whole, whole_grads = train(guide_name, 4, str(tmp_path / "whole"), local=local)
    _, halfway, _ = train(guide_name, 2, str(tmp_path / "split"), local=local)
    trainer, resumed, resumed_grads = train(guide_name, 4, str(tmp_path / "split"), resume=True, local=local)
    assert trainer.svi.local == (local or guide_name == "pyro.param")
    assert trainer.epoch == 4 and len(resumed) == len(whole) >= 1
    for a, b, c in zip(resumed, whole, halfway):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # exactly the uninterrupted run's values
        assert not torch.equal(a, c)  # and they moved after the resume
    for a, b in zip(resumed_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if guide_name == "pyro.param":  # the guide reads the tensors the optimiser steps
        store = pyro.get_param_store()
        assert {id(store.get_param(n).unconstrained()) for n in store.keys()} == {id(p) for p in trainer.params}
