"""ELBO choice and per-term evaluation.

An objective is an ELBO choice (:data:`ELBOS`); :func:`elbo_terms` splits a one-sample ELBO estimate
into the log-likelihood of observed sites and the KL estimate of latent sites, for any model/guide
pair with a common signature.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}


def make_elbo(name: str, num_particles: int = 1) -> ELBO:
    """``trace`` (Monte Carlo KL) or ``meanfield`` (analytic KL where known, Monte Carlo otherwise).

    Particles are vectorised; ``max_plate_nesting`` is inferred from the first trace. (Compilation is
    the trainer's business: see ``TrainConfig.jit``.)
    """
    if name not in ELBOS:
        raise ValueError(f"elbo: expected one of {tuple(ELBOS)}, got {name!r}")
    if num_particles < 1:
        raise ValueError(f"num_particles: expected >= 1, got {num_particles}")
    return ELBOS[name](num_particles=num_particles, vectorize_particles=num_particles > 1)


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
