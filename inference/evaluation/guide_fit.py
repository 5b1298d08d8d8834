"""Compare variational families on one fixed model: the inference gap (Cremer, Li and Duvenaud 2018,
"Inference suboptimality in variational autoencoders").

A held-out ELBO of a run scores the model and its guide together: two guides trained from scratch also
train two different models. To compare the guides alone, hold one trained model fixed and fit each
guide to it on the true ELBO (the model in eval mode, so a training-only reconstruction weight is off);
the fitted guides' held-out ELBOs then differ only by how close each family gets to that model's
posterior. A family that contains another (the KVAE's structured guide, whose context correction starts
at zero, contains the factorised one) started from the other's fitted weights can only gain, up to
optimisation noise.

Pure functions of a model, a guide and inputs: nothing here knows of run directories or the command line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping

import pyro
import torch
from pyro import poutine

from pyro_models.modes import eval_mode

from ..training.elbo import make_elbo
from ..training import Inputs, take


@dataclass
class GuideFitConfig:
    """How a guide is fitted to a fixed model."""

    epochs: int = 5  # passes over the training inputs
    batch_size: int = 32  # sequences (examples) per step
    lr: float = 1e-3  # Adam's learning rate for the guide's parameters
    clip_norm: float = 10.0  # the guide's gradient norm is clipped to this
    seed: int = 0  # batches and the guide's noise: the same for every guide fitted with this seed

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        for name in ("lr", "clip_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a number > 0, got {getattr(self, name)}")


def load_matching(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> List[str]:
    """Copy into ``module`` every entry of ``state`` whose name and shape match one of its own; returns
    the names copied (the rest of ``module`` keeps its initial values)."""
    own = module.state_dict()

    def fits(key, value) -> bool:
        if key not in own:
            return False
        return not torch.is_tensor(value) or (torch.is_tensor(own[key]) and own[key].shape == value.shape)

    shared = {k: v for k, v in state.items() if fits(k, v)}  # extra states (not tensors) copied by name
    module.load_state_dict({**own, **shared})
    return sorted(shared)


def example_elbos(model, guide, inputs: Inputs, num_samples: int = 1, batch_size: int = 64) -> torch.Tensor:
    """The true ELBO of every example ``(N,)``, nats, averaged over ``num_samples`` draws of the guide (model
    and guide in eval mode; their modes are restored). Per example, so that two guides scored with the same
    seed can be compared pairwise (their difference's standard error over the examples). Sites must be
    batched over the examples on their first axis (a plate), as every model here is; a site without
    that axis (a global latent) is shared equally among the examples."""
    if num_samples < 1:
        raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
    size = inputs[0].shape[0]
    out = torch.zeros(size)
    with eval_mode(model, guide), torch.no_grad():
        for start in range(0, size, batch_size):
            batch = take(inputs, slice(start, start + batch_size))
            n = batch[0].shape[0]
            for _ in range(num_samples):
                guide_trace = poutine.trace(guide).get_trace(*batch)
                model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*batch)
                total = _per_example(model_trace, n) - _per_example(guide_trace, n)
                out[start:start + n] += total.cpu() / num_samples
    return out


def _per_example(trace, n: int) -> torch.Tensor:
    """Sum over a trace's sample sites of log p (scaled), per example ``(n,)``."""
    trace.compute_log_prob()
    total = torch.zeros(n)
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        log_prob = site["log_prob"].detach().cpu()
        if log_prob.dim() >= 1 and log_prob.shape[0] == n:
            total += log_prob.reshape(n, -1).sum(-1)
        else:
            total += log_prob.sum() / n
    return total


def fit_guide(model, guide, inputs: Inputs, config: GuideFitConfig) -> List[float]:
    """Fit ``guide``'s parameters to the fixed ``model`` by maximising the true ELBO on ``inputs`` (the
    model in eval mode, its parameters untouched); returns the loss (negative ELBO, nats per example) of
    every step. The modes the modules had are restored."""
    params = [p for p in guide.parameters() if p.requires_grad]
    if not params:
        raise ValueError("guide: has no parameters to fit")
    frozen = {id(p) for p in model.parameters()}
    if any(id(p) in frozen for p in params):
        raise ValueError("guide: shares parameters with the model; only a guide's own parameters can be fitted alone")
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    pyro.set_rng_seed(config.seed)
    elbo, size, losses = make_elbo("trace"), inputs[0].shape[0], []
    with eval_mode(model):
        was_training = guide.training
        guide.train()
        try:
            for _ in range(config.epochs):
                order = torch.randperm(size, generator=generator)
                for start in range(0, size, config.batch_size):
                    batch = take(inputs, order[start:start + config.batch_size])
                    loss = elbo.differentiable_loss(model, guide, *batch) / batch[0].shape[0]
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
                    optimizer.step()
                    losses.append(loss.item())
        finally:
            guide.train(was_training)
            model.zero_grad(set_to_none=True)  # the model's gradients were computed, never applied
    return losses

