"""Posterior-predictive imputation of missing pixels with ``pyro.infer.Predictive`` and ``obs_mask``.

The model is called as ``model(x, mask)``: pixels where ``mask`` is True are observed, the others
become the latent site ``x_units_unobserved`` and are drawn from the posterior predictive. Amortised guides
read a whole image, so missing pixels are first filled (by default with the batch's mean observed
value per pixel, or a given ``fill`` such as the mean training image) and the fill is refined by a few
rounds of encode -> decode (the Markov chain of Rezende et al. 2014, sec. 5.3). The content of missing
pixels is never read.
"""
from __future__ import annotations

from typing import Optional

import torch
from pyro.infer import Predictive

from ..imputation import Imputation, check_mask
from ..modes import eval_mode

NUM_ROUNDS = 3  # encode -> decode refinements of the fill


def bottom_half_mask(shape, device=None) -> torch.Tensor:
    """Observed top half, missing bottom half: boolean ``shape = (batch, C, H, W)``."""
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    mask[..., shape[-2] // 2 :, :] = False
    return mask


def random_pixel_mask(shape, drop_prob: float, generator=None) -> torch.Tensor:
    """Each pixel missing with probability ``drop_prob``: boolean ``shape``."""
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob: expected a probability in [0, 1], got {drop_prob}")
    return torch.rand(shape, generator=generator) >= drop_prob


def _default_fill(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean observed value of each pixel over the batch (0.5 where no example observes it), ``(C, H, W)``."""
    weight = mask.to(x.dtype)
    count = weight.sum(0)
    mean = (torch.where(mask, x, torch.zeros_like(x))).sum(0) / count.clamp(min=1)
    return torch.where(count > 0, mean, torch.full_like(mean, 0.5))


@torch.no_grad()
def impute(model, guide, x: torch.Tensor, mask: torch.Tensor, num_samples: int = 32, generator=None,
           fill: Optional[torch.Tensor] = None, num_rounds: int = NUM_ROUNDS) -> Imputation:
    """Impute the pixels of ``x (batch, C, H, W)`` where ``mask`` (same shape, bool) is False.

    ``fill (C, H, W)``: the initial guess for missing pixels (default: the batch's mean observed pixel).
    ``estimates``: ``"posterior_mean"`` (= ``imputed``) and ``"fill"`` (the initial guess, a baseline).
    ``generator`` is unused (Pyro's global seed drives the draws). Observed pixels equal ``x`` exactly.
    """
    check_mask(x, mask, frames=False)
    if num_samples < 1 or num_rounds < 1:
        raise ValueError(f"num_samples, num_rounds: expected >= 1, got {num_samples}, {num_rounds}")
    fill = _default_fill(x, mask) if fill is None else fill.to(x)
    if fill.shape != x.shape[1:]:
        raise ValueError(f"fill: expected shape {tuple(x.shape[1:])}, got {tuple(fill.shape)}")
    baseline = torch.where(mask, x, fill.expand_as(x))
    current = baseline
    predictive = Predictive(model, guide=guide, num_samples=num_samples, return_sites=["x_mean", "x"])
    with eval_mode(model, guide):
        for _ in range(num_rounds):
            draws = predictive(current, mask)
            mean = draws["x_mean"].reshape((num_samples,) + x.shape).mean(0)
            current = torch.where(mask, x, mean)
    samples = torch.where(mask, x, draws["x"].reshape((num_samples,) + x.shape))  # x: (samples, batch, C, H, W)
    return Imputation(mask, current, samples, {"posterior_mean": current, "fill": baseline})
