"""Using a trained HRSSM: its segmentation of a sequence, boundary probabilities, jumpy imagination, the
ELBO of a given segmentation, and missing-frame imputation. Every function runs in eval mode and
restores the modes it found."""
from __future__ import annotations

from typing import NamedTuple, Optional

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask

from ..imputation import Imputation, frames_inside, last_observed, replay_rows
from ..modes import eval_mode as _eval_mode
from .boundaries import Segmentation, _segmentation, apply_constraints, boundaries_from_trace, decode_boundaries
from .config import BINARY_THRESHOLD, PEAK_THRESHOLD, check_input
from .guides import HRSSMGuide
from .model import HRSSM


def posterior_boundaries(guide: HRSSMGuide, x: torch.Tensor, sample: bool = False,
                         mask: Optional[torch.Tensor] = None, peaks: bool = True,
                         threshold: float = PEAK_THRESHOLD) -> Segmentation:
    """The segmentation of ``x (batch, T, *frame_shape)`` (observed frames ``mask (batch, T)``; None: all)
    under the guide: ``sample=True`` draws it (one trace of the guide); ``sample=False`` reads it without
    noise (:func:`~.boundaries.decode_boundaries`): a boundary where q(m_t = 1 | X) exceeds ``threshold``
    at a local peak over time (``peaks``; ``peaks=False, threshold=0.5`` is the official evaluation's
    per-frame argmax), the constraints applied as in sampling. Runs in eval mode (batch norm on running
    statistics; the mode is restored after)."""
    check_input(x, mask, guide.frame_shape, guide.config)
    with torch.no_grad(), _eval_mode(guide):
        if sample:
            return boundaries_from_trace(poutine.trace(guide).get_trace(x, mask), guide.config,
                                         guide.temperature.free_tensor(x))
        if guide.boundary_posterior is None or x.shape[1] == 1:
            return _segmentation(x.new_ones(x.shape[:2]))
        raw = decode_boundaries(guide.boundary_logits(x, mask)[:, 1:], peaks, threshold)
        return _segmentation(apply_constraints(raw, guide.config, guide.temperature.free_tensor(x)))


def start_probabilities(guide: HRSSMGuide, x: torch.Tensor) -> torch.Tensor:
    """q(frame t starts a segment | X) of ``x (batch, T, *frame_shape)`` for t = 2..T, as
    ``(batch, T - 1)``: the guide's boundary probabilities before the hard constraints. Eval mode."""
    check_input(x, None, guide.frame_shape, guide.config)
    if guide.boundary_posterior is None or x.shape[1] == 1:
        raise ValueError("start_probabilities: needs a guide with boundaries and T >= 2")
    with torch.no_grad(), _eval_mode(guide):
        return torch.sigmoid(guide.boundary_logits(x)[:, 1:])


@torch.no_grad()
def jumpy_rollout(model: HRSSM, guide: HRSSMGuide, prefix: torch.Tensor, num_segments: int,
                  sample: bool = True) -> torch.Tensor:
    """Jumpy imagination (paper: jumpy imagination; official ``jumpy_generation``): infer the states of
    ``prefix (batch, T0, *frame_shape)`` with the guide, then roll the abstract level forward from its
    last (c, z), one UPDATE per future segment (``c = GRU_z(z, c)``, ``z ~ p(z | c)``), and decode each
    segment's first frame (``h = W_a [c, z]``, or with ``observation_reset=False`` the GRU step from the
    previous segment's h and s; ``s ~ p(s | h)``). Draws (``sample=True``) or prior means.
    Returns frame means ``(batch, num_segments, *frame_shape)``; the prefix is taken to end a segment.
    Runs in eval mode (restored after)."""
    if num_segments < 1:
        raise ValueError(f"num_segments: expected >= 1, got {num_segments}")
    with _eval_mode(model, guide):
        guide_trace = poutine.trace(guide).get_trace(prefix)
        states = poutine.replay(model, trace=guide_trace)(prefix)
        c, z, h, s = states.c[:, -1], states.z[:, -1], states.h[:, -1], states.s[:, -1]
        features = []
        for _ in range(num_segments):
            c = model.abstract.belief(z, c)
            loc, scale = model.abstract(c)
            z = dist.Normal(loc, scale).sample() if sample else loc
            a = model.observation.init(c, z)
            h = a if model.config.observation_reset else model.observation.update(s, a, h)
            loc, scale = model.observation(h)
            s = dist.Normal(loc, scale).sample() if sample else loc
            features.append(model.state_feature(h, s))
        return model.frame_mean(torch.stack(features, dim=1))


class SegmentationELBO(NamedTuple):
    """Terms of :func:`segmentation_elbo`, each ``(batch,)`` in nats per sequence:
    ``elbo = log_likelihood + log_prior_boundaries - kl_abstract - kl_observation``."""

    elbo: torch.Tensor
    log_likelihood: torch.Tensor
    log_prior_boundaries: torch.Tensor
    kl_abstract: torch.Tensor
    kl_observation: torch.Tensor


@torch.no_grad()
def segmentation_elbo(model: HRSSM, guide: HRSSMGuide, x: torch.Tensor, starts: torch.Tensor,
                      num_samples: int = 4) -> SegmentationELBO:
    """The ELBO of ``x (batch, T, *frame_shape)`` when q(M | X) is a point mass on the segmentation
    ``starts (batch, T)`` (0/1, 1 where a frame starts a segment; column 0 is ignored, forced values are
    re-applied): ``E_q(Z,S|M,X)[log p(X | S) + log p(M | S)] - KL_z - KL_s``, where log p(M | S) scores the
    hard boundaries under the prior's Bernoulli at free steps and the KLs are analytic given each draw
    (as ``TraceMeanField_ELBO``), averaged over ``num_samples`` draws of (Z, S). It compares
    segmentations under one trained model: the guide's own, the true events, none. Eval mode."""
    check_input(x, None, model.frame_shape, model.config)
    if tuple(starts.shape) != tuple(x.shape[:2]):
        raise ValueError(f"starts: expected shape {tuple(x.shape[:2])} (batch, T), got {tuple(starts.shape)}")
    if num_samples < 1:
        raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
    steps = x.shape[1]
    fixed = {f"m_{t}": (starts[:, t] > BINARY_THRESHOLD).to(x.dtype) for t in range(1, steps)}
    totals = torch.zeros(4, x.shape[0], dtype=x.dtype, device=x.device)  # loglik, log p(M), KL_z, KL_s
    with _eval_mode(model, guide):
        for _ in range(num_samples):
            guide_trace = poutine.trace(poutine.condition(guide, data=fixed)).get_trace(x)
            model_trace = poutine.trace(poutine.replay(poutine.condition(model, data=fixed), trace=guide_trace)).get_trace(x)
            totals[0] += model_trace.nodes["x"]["fn"].log_prob(x)
            for t in range(1, steps + 1):
                if t < steps:
                    site = model_trace.nodes[f"m_{t}"]
                    log_p = dist.Bernoulli(logits=site["fn"].logits).log_prob(site["value"])
                    totals[1] += scale_and_mask(log_p, site["scale"], site["mask"])
                for row, name in ((2, f"z_{t}"), (3, f"s_{t}")):
                    q_site, p_site = guide_trace.nodes[name], model_trace.nodes[name]
                    kl = torch.distributions.kl_divergence(q_site["fn"], p_site["fn"])
                    totals[row] += scale_and_mask(kl, q_site["scale"], q_site["mask"])  # as TraceMeanField_ELBO
    loglik, log_prior, kl_z, kl_s = totals / num_samples
    return SegmentationELBO(loglik + log_prior - kl_z - kl_s, loglik, log_prior, kl_z, kl_s)


def observed_sites(last: torch.Tensor):
    """``rows(name)`` for :class:`~pyro_models.imputation.ReplayRows`: the sequences whose draw at a site
    comes from the guide, given each one's last observed frame ``last (batch,)`` (0-based; -1: none).
    Frame sites ``z_k``, ``s_k`` (frame k - 1) up to the last observed frame; a boundary ``m_k`` (between
    frames k - 1 and k) where the frame after it is observed too. Past the last observed frame nothing
    more is observed, so the exact posterior there is the model's own process given the states at that
    frame (boundaries from p(m_t | s_t), new z_t at them, s_t from its transition), which the guide, which
    reads the missing frames as zero features, only approximates."""
    def rows(name: str) -> Optional[torch.Tensor]:
        kind, _, step = name.partition("_")
        if not step.isdigit():
            return None
        if kind in ("z", "s"):
            return int(step) - 1 <= last
        return int(step) <= last if kind == "m" else None
    return rows


@torch.no_grad()
def impute(model: HRSSM, guide: HRSSMGuide, x: torch.Tensor, mask: torch.Tensor, num_samples: int = 16,
           generator=None, lengths: Optional[torch.Tensor] = None) -> Imputation:
    """Fill the frames of ``x (batch, T, *frame_shape)`` where ``mask (batch, T)`` (bool) is False: draw
    (M, Z, S) from the guide given the observed frames only up to each sequence's last observed frame and
    from the model's own process after it (:func:`observed_sites`), run the model on that draw and decode
    E[x_t | s_t], ``num_samples`` times. The content of missing frames is never read. Eval mode.
    ``lengths (batch,)``: sequences of their own lengths; steps past an end are neither read nor filled."""
    check_input(x, mask, model.frame_shape, model.config, lengths)  # the mask's shape and dtype included
    if num_samples < 1:
        raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
    untouched = mask
    if lengths is not None:
        inside = frames_inside(None, lengths, x.shape[1])
        mask, untouched = mask & inside, mask | ~inside  # past the end: not observed, and not filled either
    keep = untouched.reshape(untouched.shape + (1,) * len(model.frame_shape))  # (batch, T, 1, ...)
    rows = observed_sites(last_observed(mask))
    draws = []
    with _eval_mode(model, guide):
        for _ in range(num_samples):
            guide_trace = poutine.trace(guide).get_trace(x, mask, lengths)
            states = replay_rows(model, guide_trace, rows)(x, mask, lengths)
            draws.append(torch.where(keep, x, model.frame_mean(states.f)))
    samples = torch.stack(draws)  # (num_samples, batch, T, *frame_shape)
    imputed = samples.mean(0)
    return Imputation(mask, imputed, samples, {"posterior_mean": imputed})


impute_frames = impute  # the name of earlier versions

