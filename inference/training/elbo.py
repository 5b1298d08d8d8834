"""ELBO choice and per-term evaluation.

An objective is an ELBO choice (:data:`ELBOS`); :func:`elbo_terms` splits a one-sample ELBO estimate
into the log-likelihood of observed sites and the KL estimate of latent sites, for any model/guide
pair with a common signature.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from pyro import poutine
from torch.distributions import kl_divergence
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from pyro.util import warn_if_nan


class _TensorValued:
    """``differentiable_loss`` whose value is a tensor computed from the traces, also under
    ``torch.jit.trace``.

    Pyro's ``Trace_ELBO.differentiable_loss`` returns ``loss + (surrogate - torch_item(surrogate))``,
    where ``torch_item`` is a Python float. A trace records that float as a constant, so a compiled loss
    returns 2 L(theta) - L(theta at trace time): the gradient is right but the value drifts from step 1 on.
    Here the value is ``surrogate + (loss - surrogate).detach()``, every part a traced tensor: the same
    value and gradient as Pyro's ELBO in eager mode, and the right value when compiled.
    """

    def _tensor_loss_particle(self, model_trace, guide_trace):
        """``(loss, surrogate_loss)`` of one particle, both tensors (``loss`` detached)."""
        raise NotImplementedError

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = surrogate = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss_particle, surrogate_particle = self._tensor_loss_particle(model_trace, guide_trace)
            loss = loss + loss_particle / self.num_particles
            surrogate = surrogate + surrogate_particle / self.num_particles
        if is_validation_enabled():
            warn_if_nan(surrogate, "loss")
        return surrogate + (loss - surrogate).detach()


def _log_prob_sum(trace) -> torch.Tensor:
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] == "sample":
            total = total + site["log_prob_sum"]
    return total


class TensorTrace_ELBO(_TensorValued, Trace_ELBO):
    """Pyro's ``Trace_ELBO`` (Monte Carlo KL) with a tensor-valued loss (see :class:`_TensorValued`)."""

    def _tensor_loss_particle(self, model_trace, guide_trace):
        _, surrogate = self._differentiable_loss_particle(model_trace, guide_trace)
        loss = -(_log_prob_sum(model_trace) - _log_prob_sum(guide_trace))
        return torch.as_tensor(loss).detach(), surrogate


class TensorTraceMeanField_ELBO(_TensorValued, TraceMeanField_ELBO):
    """Pyro's ``TraceMeanField_ELBO`` (analytic KL where known) with a tensor-valued loss; its surrogate
    equals its loss, so the value is the surrogate's own (see :class:`_TensorValued`).

    Without argument validation (every training step but each epoch's first, ``TrainConfig.check_every_step``)
    it scores only what the estimator reads: the observed sites' log-densities, and the model and guide
    densities of a latent site only where no analytic KL exists. Pyro's ``get_importance_trace`` scores
    every site of both traces first, and the mean-field loss then ignores the log-densities of every latent
    site with a KL (two per site and step: a DMM or HRSSM step holds hundreds). The value and gradient are
    Pyro's (``tests/test_elbo.py``); with validation on, Pyro's own path runs, with its checks.
    """

    def _tensor_loss_particle(self, model_trace, guide_trace):
        _, surrogate = self._differentiable_loss_particle(model_trace, guide_trace)
        return surrogate.detach(), surrogate

    def _get_trace(self, model, guide, args, kwargs):
        if is_validation_enabled() or isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):
            return super()._get_trace(model, guide, args, kwargs)
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace), graph_type="flat").get_trace(*args, **kwargs)
        return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)  # unscored

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        if is_validation_enabled():
            return super()._differentiable_loss_particle(model_trace, guide_trace)
        elbo = 0.0
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample":
                continue
            if model_site["is_observed"]:
                elbo = elbo + _site_log_prob_sum(model_site)
                continue
            guide_site = guide_trace.nodes[name]
            try:
                kl = scale_and_mask(kl_divergence(guide_site["fn"], model_site["fn"]), guide_site["scale"], guide_site["mask"])
                elbo = elbo - (kl.sum() if torch.is_tensor(kl) else kl * torch.Size(guide_site["fn"].batch_shape).numel())
            except NotImplementedError:  # Monte Carlo: log p(z) and the guide's entropy term at the draw
                elbo = elbo + _site_log_prob_sum(model_site) - _entropy_term_sum(guide_site)
        for name, guide_site in guide_trace.nodes.items():  # auxiliary guide sites
            if guide_site["type"] == "sample" and name not in model_trace.nodes:
                elbo = elbo - _entropy_term_sum(guide_site)
        elbo = torch.as_tensor(elbo)
        return -elbo.detach(), -elbo


def _site_log_prob_sum(site) -> torch.Tensor:
    """A site's scaled and masked log-density, summed (what ``Trace.compute_log_prob`` stores)."""
    log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    return scale_and_mask(log_p, site["scale"], site["mask"]).sum()


def _entropy_term_sum(site) -> torch.Tensor:
    """A guide site's entropy term of its score parts, scaled and masked, summed."""
    parts = site["fn"].score_parts(site["value"], *site["args"], **site["kwargs"])
    return parts.scale_and_mask(site["scale"], site["mask"]).entropy_term.sum()


ELBOS = {"trace": TensorTrace_ELBO, "meanfield": TensorTraceMeanField_ELBO}


def make_elbo(name: str, num_particles: int = 1, vectorize: bool = True) -> ELBO:
    """``trace`` (Monte Carlo KL) or ``meanfield`` (analytic KL where known, Monte Carlo otherwise).

    Particles are vectorised (``vectorize``; False: drawn one after another); ``max_plate_nesting`` is inferred from the first trace. (Compilation is
    the trainer's business: see ``TrainConfig.jit``.)
    """
    if name not in ELBOS:
        raise ValueError(f"elbo: expected one of {tuple(ELBOS)}, got {name!r}")
    if num_particles < 1:
        raise ValueError(f"num_particles: expected >= 1, got {num_particles}")
    return ELBOS[name](num_particles=num_particles, vectorize_particles=vectorize and num_particles > 1)


class ELBOTerms(NamedTuple):
    """Sums over a batch (nats): ``elbo = log_lik - kl``."""

    elbo: torch.Tensor
    log_lik: torch.Tensor
    kl: torch.Tensor


def elbo_terms(model, guide, *args, **kwargs) -> ELBOTerms:
    """One-sample estimate of the ELBO of ``model``/``guide`` at ``args``, split into the
    log-likelihood of observed sites (``pyro.factor`` sites included) and ``kl = log q - log p`` summed
    over latent sites. Site scales (``poutine.scale``) are applied."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    log_lik = torch.zeros(())
    kl = torch.zeros(())
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            log_lik = log_lik + site["log_prob_sum"].detach().cpu()
        elif name in guide_trace.nodes:
            kl = kl - site["log_prob_sum"].detach().cpu()
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and not site["is_observed"]:
            kl = kl + site["log_prob_sum"].detach().cpu()
    return ELBOTerms(log_lik - kl, log_lik, kl)
