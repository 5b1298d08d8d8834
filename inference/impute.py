"""Posterior predictive imputation of missing pixels with ``pyro.infer.Predictive`` and ``obs_mask``.

The model is called as ``model(x, mask)``: pixels where ``mask`` is True are observed, the others
become the latent site ``x_unobserved`` and are drawn from the posterior predictive. Amortised guides
read a whole image, so missing pixels are first filled (with the mean training image) and the fill is
refined by a few rounds of encode -> decode (the Markov chain of Rezende et al. 2014, sec. 5.3).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from pyro.infer import Predictive


class Imputation(NamedTuple):
    """Results for images ``(batch, C, H, W)``."""

    imputed: torch.Tensor  # observed pixels kept, missing ones replaced by the posterior-predictive mean
    samples: torch.Tensor  # (num_samples, batch, C, H, W) posterior-predictive draws of the missing pixels (observed kept)
    error: float  # mean squared error on the missing pixels
    baseline_error: float  # the same for the mean-image fill


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


def _missing_mse(estimate: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> float:
    missing = ~mask
    if not missing.any():
        return 0.0
    return float(((estimate - truth)[missing] ** 2).mean())


@torch.no_grad()
def impute_images(model, guide, x: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor, num_samples: int = 32, num_rounds: int = 3) -> Imputation:
    """Impute the pixels of ``x (batch, C, H, W)`` where ``mask`` (same shape, bool) is False.

    ``fill (C, H, W)``: the initial guess for missing pixels and the baseline (the mean training image).
    Observed pixels of the result equal ``x`` exactly.
    """
    if mask.shape != x.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor of shape {tuple(x.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    if fill.shape != x.shape[1:]:
        raise ValueError(f"fill: expected shape {tuple(x.shape[1:])}, got {tuple(fill.shape)}")
    for module in (model, guide):
        if isinstance(module, torch.nn.Module):
            module.eval()
    baseline = torch.where(mask, x, fill.expand_as(x))
    current = baseline
    predictive = Predictive(model, guide=guide, num_samples=num_samples, return_sites=["x_mean", "x"])
    for _ in range(num_rounds):
        draws = predictive(current, mask)
        mean = draws["x_mean"].reshape((num_samples,) + x.shape).mean(0)
        current = torch.where(mask, x, mean)
    # Predictive's "x" lives in the site layout (pixels, batch); bring it back to (batch, C, H, W).
    pixels = draws["x"].reshape(num_samples, -1, x.shape[0]).transpose(-1, -2).reshape((num_samples,) + x.shape)
    samples = torch.where(mask, x, pixels)
    return Imputation(current, samples, _missing_mse(current, x, mask), _missing_mse(baseline, x, mask))
