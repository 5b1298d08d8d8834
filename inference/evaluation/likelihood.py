"""Held-out log-likelihood by importance sampling, for any model and guide of the library.

With the guide as proposal and K draws z_k ~ q(z | x),

    log p(x) ~= log (1/K) sum_k p(x, z_k) / q(z_k | x)          (Burda et al. 2016, the IWAE bound)

whose expectation is a lower bound on log p(x) that tightens as K grows (K = 1: the ELBO) and converges
to log p(x). The log-weights come from Pyro traces: the guide is traced with K particles in a plate left
of every plate the model uses, the model is replayed on its draws, and every site's log density is summed
over all plates but the particle plate and the data plate (dim -1, where every model of this library puts
its examples). Reported per example (images) and per time step (sequences: the sum over sequences divided
by the sum of their lengths, the convention of the sequence-modelling literature), each with its Monte
Carlo standard error (delta method on the mean weight).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, NamedTuple, Optional, Tuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from pyro_models.modes import eval_mode

from ..training.batching import cut_to_length

SPLITS = ("train", "valid", "test")


class LogWeights(NamedTuple):
    """``log_weights (K, batch)``: log p(x, z_k) - log q(z_k | x) of each draw and example."""

    log_weights: torch.Tensor

    @property
    def estimate(self) -> torch.Tensor:
        """log (1/K) sum_k w_k per example, ``(batch,)``."""
        return torch.logsumexp(self.log_weights, 0) - math.log(self.log_weights.shape[0])

    @property
    def stderr(self) -> torch.Tensor:
        """The Monte Carlo standard error of :attr:`estimate` per example, ``(batch,)``: sd(w) / (sqrt(K)
        mean(w)), computed with weights scaled by their maximum."""
        k = self.log_weights.shape[0]
        if k < 2:
            return torch.full(self.log_weights.shape[1:], math.nan, dtype=self.log_weights.dtype)
        w = torch.exp(self.log_weights - self.log_weights.max(0).values)  # (K, batch), max 1
        return w.std(0) / (math.sqrt(k) * w.mean(0))


def _plate_nesting(model, guide, args) -> int:
    """How many plates the model and guide nest (Pyro's ``max_plate_nesting``), from one trace of each."""
    guide_trace = poutine.trace(guide).get_trace(*args)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
    dims = [frame.dim for trace in (guide_trace, model_trace) for site in trace.nodes.values()
            if site["type"] == "sample" for frame in site["cond_indep_stack"] if frame.vectorized]
    return -min(dims) if dims else 0


def _per_example(trace, batch: int, particle_dim: bool = True) -> torch.Tensor:
    """The trace's log density per particle and example, ``(P, batch)``: every sample site's log_prob
    (scaled and masked as the trace has it) summed over all dims but the first (particles; without
    ``particle_dim`` one particle, added) and the last (the data plate)."""
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site) or site["infer"].get("_deterministic"):
            continue
        log_prob = site["log_prob"] if particle_dim else site["log_prob"].unsqueeze(0)
        if log_prob.dim() < 2 or log_prob.shape[-1] != batch:
            raise ValueError(f"site {site['name']!r}: expected its log density on (particles, ..., batch = {batch}), "
                             f"got shape {tuple(log_prob.shape)}; is it inside the data plate at dim -1?")
        total = total + log_prob.reshape(log_prob.shape[0], -1, batch).sum(1)
    return total


@torch.no_grad()
def log_weights(model, guide, args: Tuple, num_samples: int, particles_per_pass: int = 16,
                vectorize: bool = True) -> LogWeights:
    """The importance log-weights of ``num_samples`` draws of ``guide`` for the model's arguments
    ``args`` (a batch: ``args[0]`` has the examples on axis 0), in eval mode (no KL weights), drawn
    ``particles_per_pass`` at a time (memory); without ``vectorize`` one draw a pass and no particle plate
    (for a model that cannot run under one, ``Recipe.vectorized_particles``)."""
    if num_samples < 1 or particles_per_pass < 1:
        raise ValueError(f"num_samples, particles_per_pass: expected >= 1, got {num_samples}, {particles_per_pass}")
    batch = args[0].shape[0]
    with eval_mode(model, guide):
        if not vectorize:
            return LogWeights(torch.cat([_one_draw(model, guide, args, batch) for _ in range(num_samples)]).double())
        nesting = _plate_nesting(model, guide, args)
        chunks = []
        for start in range(0, num_samples, particles_per_pass):
            size = min(particles_per_pass, num_samples - start)
            plate = pyro.plate("importance_particles", size, dim=-(nesting + 1))
            guide_trace = poutine.trace(plate(guide)).get_trace(*args)
            model_trace = poutine.trace(poutine.replay(plate(model), trace=guide_trace)).get_trace(*args)
            model_trace.compute_log_prob(), guide_trace.compute_log_prob()
            chunks.append(_per_example(model_trace, batch) - _per_example(guide_trace, batch))  # (P, batch)
    return LogWeights(torch.cat(chunks).double())


def _one_draw(model, guide, args: Tuple, batch: int) -> torch.Tensor:
    """The log-weights ``(1, batch)`` of one draw of ``guide``, traced without a particle plate."""
    guide_trace = poutine.trace(guide).get_trace(*args)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
    model_trace.compute_log_prob(), guide_trace.compute_log_prob()
    return _per_example(model_trace, batch, particle_dim=False) - _per_example(guide_trace, batch, particle_dim=False)


@dataclass
class LikelihoodOptions:
    """Options of ``scripts/evaluate.py likelihood``."""

    split: str = field(default="test", metadata={"choices": SPLITS})  # the split scored
    k: int = 100  # importance samples per example (the IWAE's K; K = 1 is the ELBO)
    particles_per_pass: int = 20  # samples drawn at once (memory: particles x batch x T x latent sizes)
    batch_size: int = 20  # examples scored at once (sequences of different lengths: sorted by length)
    checkpoint: str = field(default="best", metadata={"choices": ("best", "last")})  # best: the epoch with the best validation ELBO where the run kept one, else the last
    seed: int = 0  # the draws

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {self.split!r}")
        for name in ("k", "particles_per_pass", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")


def split_likelihood(model, guide, inputs: Tuple, options: LikelihoodOptions, lengths_arg: Optional[int] = None,
                     progress: bool = True, vectorize: bool = True) -> Dict[str, Any]:
    """Importance-sampled log-likelihood of every example of ``inputs`` (the model's arguments, examples
    on axis 0; ``lengths_arg``: where the sequence lengths are, for ragged sequences). Returns the totals
    and, for sequences, per time step, with standard errors, K and the ELBO (K = 1's expectation, here
    the mean log-weight) beside them."""
    torch.manual_seed(options.seed)
    x = inputs[0]
    order = torch.arange(x.shape[0])
    if lengths_arg is not None:
        order = torch.argsort(inputs[lengths_arg], descending=True, stable=True)
    estimates, variances, elbos = [], [], []
    for start in tqdm(range(0, x.shape[0], options.batch_size), desc="importance sampling", leave=False,
                      disable=not progress):
        index = order[start : start + options.batch_size]
        batch = cut_to_length(tuple(None if t is None else t[index] for t in inputs), lengths_arg)
        result = log_weights(model, guide, batch, options.k, options.particles_per_pass, vectorize)
        estimates.append(result.estimate), variances.append(result.stderr ** 2)
        elbos.append(result.log_weights.mean(0))
    log_lik, elbo = float(torch.cat(estimates).sum()), float(torch.cat(elbos).sum())
    stderr = math.sqrt(float(torch.cat(variances).sum()))
    out: Dict[str, Any] = {"k": options.k, "examples": int(x.shape[0]), "log_lik": log_lik, "log_lik_stderr": stderr,
                           "elbo": elbo, "log_lik_per_example": log_lik / x.shape[0], "elbo_per_example": elbo / x.shape[0]}
    if x.dim() >= 3:  # sequences (N, T, ...): per time step
        steps = int(inputs[lengths_arg].sum()) if lengths_arg is not None else x.shape[0] * x.shape[1]
        out.update(steps=steps, nll_per_step=-log_lik / steps, nll_per_step_stderr=stderr / steps,
                   neg_elbo_per_step=-elbo / steps)
    return out


def evaluate_likelihood(run, options: LikelihoodOptions) -> Dict[str, Any]:
    """``scripts/evaluate.py likelihood``: :func:`split_likelihood` on ``options.split`` of a loaded run."""
    from ..runs.experiment import LENGTHS_ARG, data_splits, model_inputs  # (experiment imports the registry)

    if options.split not in data_splits(run.data):
        raise ValueError(f"split: the run's data have the splits {data_splits(run.data)}, got {options.split!r}")
    inputs = model_inputs(run.data, options.split)
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    lengths_arg = LENGTHS_ARG if getattr(run.data, "ragged", False) else None
    result = split_likelihood(run.model, run.guide, inputs, options, lengths_arg,
                              vectorize=run.recipe.training.vectorized_particles)
    return {"split": options.split, "checkpoint": options.checkpoint, **result}
