"""Missing-frame imputation with a trained DMM: the guide reads the observed frames only, the model is
replayed on the guide's draws of z, and each frame's mean E[x_t | z_t] is decoded."""
from __future__ import annotations

from typing import Optional

import torch
from pyro import poutine

from ..imputation import Imputation, check_lengths, check_mask, expand_mask, last_observed
from .chains import step_mask
from ..modes import eval_mode
from .guides import DMMGuide
from .model import DMM

SEED_BOUND = 2**62  # a seed for the forked random state is drawn below this from ``generator``


def roll_out(model: DMM, z: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``z (batch, T, z_dim)`` with every step after ``last (batch,)`` redrawn from the model's transition,
    z_t ~ p(z_t | z_{t-1}) (from z_0 when nothing is observed, ``last = -1``). Past a sequence's last
    observed frame nothing more is observed, so given z_last this is the exact posterior of the rest, which
    a guide only approximates (the ST-R guide trained on gaps that end before the sequence does)."""
    previous = model.z_0.expand(z.shape[0], -1)  # (batch, z_dim)
    steps = []
    for t in range(z.shape[1]):
        current = z[:, t]
        if not bool((t <= last).all()):  # some sequence is past its last observed frame
            loc, scale = model.transition(previous)
            current = torch.where((t > last).unsqueeze(-1), loc + scale * torch.randn_like(loc), current)
        steps.append(current)
        previous = current
    return torch.stack(steps, dim=1)  # (batch, T, z_dim)


def _posterior_means(model: DMM, guide: DMMGuide, x: torch.Tensor, mask: torch.Tensor,
                     lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """E[x_t | z_t] ``(batch, T, *frame_shape)`` of one draw of z: from q(z | x_observed) up to each
    sequence's last observed frame, from the model's transition after it (:func:`roll_out`)."""
    guide_trace = poutine.trace(guide).get_trace(x, mask, lengths)
    z = roll_out(model, guide_trace.nodes["z"]["value"], last_observed(mask))  # (batch, T, z_dim)
    return model.frame_mean(z)


@torch.no_grad()
def impute(model: DMM, guide: DMMGuide, x: torch.Tensor, mask: torch.Tensor, num_samples: int = 16,
           generator: Optional[torch.Generator] = None, lengths: Optional[torch.Tensor] = None) -> Imputation:
    """Fill the frames of ``x (batch, T, *frame_shape)`` where ``mask (batch, T)`` (bool) is False.

    ``samples (num_samples, *x.shape)``: E[x_t | z_t] under ``num_samples`` draws of z, from q(z | x_observed)
    up to each sequence's last observed frame and from the model's transition after it (:func:`roll_out`),
    observed frames kept exactly; ``imputed``: their mean (``estimates["posterior_mean"]``). The content
    of missing frames is never read. Runs in eval mode (modes restored after); with ``generator`` the
    draws come from a random state seeded by it (the global one is left as it was). ``lengths (batch,)``:
    sequences of their own lengths; steps past a sequence's end are neither read nor filled (returned as
    they are in ``x``)."""
    check_mask(x, mask, frames=True)
    valid = None
    if lengths is not None:
        check_lengths(lengths, x.shape[0], x.shape[1])
        valid = step_mask(lengths, x.shape[1])
        mask, untouched = mask & valid, mask | ~valid  # past the end: not observed, and not filled either
    else:
        untouched = mask
    if num_samples < 1:
        raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
    keep = expand_mask(untouched, x)  # (batch, T, *frame_shape)
    shown = torch.where(keep, x, torch.zeros_like(x))
    devices = [x.device] if x.is_cuda else []
    with torch.random.fork_rng(devices=devices, enabled=generator is not None), eval_mode(model, guide):
        if generator is not None:
            torch.manual_seed(int(torch.randint(SEED_BOUND, (), generator=generator)))
        draws = [_posterior_means(model, guide, shown, mask, lengths) for _ in range(num_samples)]
    samples = torch.where(keep, x, torch.stack(draws))  # (num_samples, batch, T, *frame_shape)
    imputed = torch.where(keep, x, samples.mean(0))
    return Imputation(mask, imputed, samples, {"posterior_mean": imputed})
