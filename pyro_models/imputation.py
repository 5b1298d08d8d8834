"""One result type for imputation with every model of the library, images and sequences alike.

An imputer is a function ``impute(model, guide, x, mask, num_samples=..., generator=None)`` of a trained
model and guide, data ``x`` and a boolean ``mask`` (True = observed): a pixel mask of ``x``'s shape for
images, a frame mask ``(batch, T)`` for sequences. It never reads the content of a missing part, leaves
the observed parts untouched, runs in eval mode and restores the modules' modes afterwards
(:func:`pyro_models.modes.eval_mode`). Each model's imputer lives with the model
(``pyro_models.<model>.impute``).
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

import torch
from pyro.poutine.messenger import Messenger


class Imputation(NamedTuple):
    """Imputed data; every tensor has the observed parts of ``x`` exactly.

    ``mask``: the mask the imputation was given (``x.shape`` for images, ``(batch, T)`` for sequences).
    ``imputed``: ``x.shape``, missing parts replaced by the primary estimate (the posterior-predictive
    mean; for the KVAE, Kalman smoothing).
    ``samples``: ``(num_samples, *x.shape)``, posterior-predictive draws of the missing parts.
    ``estimates``: named estimates, each ``x.shape``, ``imputed`` among them under its own name (e.g.
    the KVAE's ``"smoothing"`` and ``"filtering"``).
    """

    mask: torch.Tensor
    imputed: torch.Tensor
    samples: torch.Tensor
    estimates: Dict[str, torch.Tensor]


def expand_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A frame mask ``(batch, T)`` (or an element mask of ``x``'s shape) broadcast to ``x.shape``."""
    return mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim())).expand_as(x)


def zero_missing(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with its missing parts (``mask`` False: a frame mask ``(batch, T)`` or an element mask of
    ``x``'s shape) set to 0, a new tensor: how data sets store gaps and how encoders are kept from
    reading them."""
    return torch.where(expand_mask(mask.to(x.device), x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def check_mask(x: torch.Tensor, mask: torch.Tensor, frames: bool) -> None:
    """Raise ``ValueError`` unless ``mask`` is bool of shape ``x.shape[:2]`` (``frames``) or ``x.shape``."""
    shape = tuple(x.shape[:2]) if frames else tuple(x.shape)
    if not torch.is_tensor(mask) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
        what = "(batch, T)" if frames else "that of x"
        got = f"{mask.dtype} {tuple(mask.shape)}" if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"mask: expected a bool tensor of shape {shape} {what}, got {got}")


def check_lengths(lengths: torch.Tensor, batch: int, num_steps: int) -> None:
    """Raise ``ValueError`` unless ``lengths`` is an integer tensor ``(batch,)`` with values in [1, num_steps]
    (``num_steps``: the padded length T; a batch is cut to its longest sequence, ``T`` = max)."""
    if not torch.is_tensor(lengths) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool \
            or tuple(lengths.shape) != (batch,):
        got = f"{lengths.dtype} {tuple(lengths.shape)}" if torch.is_tensor(lengths) else type(lengths).__name__
        raise ValueError(f"lengths: expected an integer tensor of shape ({batch},), got {got}")
    if batch and (int(lengths.min()) < 1 or int(lengths.max()) > num_steps):
        raise ValueError(f"lengths: expected values in [1, T = {num_steps}], got min {int(lengths.min())}, "
                         f"max {int(lengths.max())}")


def frames_inside(mask: Optional[torch.Tensor], lengths: Optional[torch.Tensor], steps: int) -> Optional[torch.Tensor]:
    """The frames observed inside their sequence ``(batch, T)``: ``mask`` (None: all) without the steps past
    the ends ``lengths (batch,)`` (None: no ends before T)."""
    if lengths is None:
        return mask
    valid = torch.arange(steps, device=lengths.device) < lengths.unsqueeze(-1)  # (batch, T)
    return valid if mask is None else mask & valid


def scored_parts(truth: torch.Tensor, mask: torch.Tensor, known: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Where an imputation of ``truth`` is scored, ``truth.shape`` bool: the parts missing from ``mask``
    (False) whose truth the data hold (``known``, a mask like ``mask``, e.g. a gappy data set's own
    frame mask; None: all)."""
    missing = ~expand_mask(mask, truth)
    return missing if known is None else missing & expand_mask(known.to(mask.device), truth)


def missing_mse(truth: torch.Tensor, estimate: torch.Tensor, mask: torch.Tensor,
                known: Optional[torch.Tensor] = None) -> float:
    """Mean squared error of ``estimate`` on the missing parts (``mask`` False; frame or element mask)
    whose truth is ``known`` (None: all); ``nan`` when nothing is scored."""
    missing = scored_parts(truth, mask, known)
    if not missing.any():
        return float("nan")
    return float(((estimate - truth)[missing] ** 2).mean())


def hamming_error(truth: torch.Tensor, estimate: torch.Tensor, mask: torch.Tensor,
                  known: Optional[torch.Tensor] = None) -> float:
    """Fraction of wrongly predicted binary pixels, ``(truth > 0.5) != (estimate > 0.5)``, over the
    missing parts whose truth is ``known`` (None: all); ``nan`` when nothing is scored."""
    missing = scored_parts(truth, mask, known)
    if not missing.any():
        return float("nan")
    return float(((truth > 0.5) != (estimate > 0.5))[missing].float().mean())


NUM_GIVEN = 4  # frames always observed at the start of a sequence in the KVAE paper's protocol


def random_frame_mask(batch: int, num_steps: int, drop_prob: float, num_given: int = NUM_GIVEN,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``(batch, num_steps)`` bool: the first ``num_given`` frames observed, each later frame missing with
    probability ``drop_prob``."""
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob: expected a probability in [0, 1], got {drop_prob}")
    if not 0 <= num_given <= num_steps:
        raise ValueError(f"num_given: expected 0 <= num_given <= num_steps = {num_steps}, got {num_given}")
    mask = torch.rand(batch, num_steps, generator=generator) >= drop_prob
    mask[:, :num_given] = True
    return mask


def consecutive_frame_mask(batch: int, num_steps: int, num_missing: int, num_given: int = NUM_GIVEN) -> torch.Tensor:
    """``(batch, num_steps)`` bool: ``num_missing`` frames missing right after the first ``num_given``
    (the KVAE paper's planning masks)."""
    if num_given + num_missing > num_steps or num_missing < 0 or num_given < 0:
        raise ValueError(f"num_missing: expected 0 <= k <= T - {num_given} = {num_steps - num_given}, got {num_missing}")
    mask = torch.ones(batch, num_steps, dtype=torch.bool)
    mask[:, num_given : num_given + num_missing] = False
    return mask


def majority_frame(train: torch.Tensor, like: torch.Tensor, train_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The pixel-wise majority frame of the (observed, ``train_mask (N, T)``; None: all) frames of the
    training sequences ``train (N, T, *frame)`` (for bouncing balls: the walls only), as a prediction for
    every frame of ``like (batch, T, *frame)``."""
    frames = train.float().flatten(0, 1) if train_mask is None else train.float()[train_mask]  # (frames, *frame)
    mode = (frames.mean(dim=0) > 0.5).to(like.dtype)
    return mode.expand_as(like)


def last_observed_frame(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every missing frame of ``x (batch, T, *frame)`` predicted by the last observed frame before it
    (``mask (batch, T)``; frame 0 must be observed)."""
    if not mask[:, 0].all():
        raise ValueError("mask: the first frame of every sequence must be observed for the last-frame floor")
    out = x.clone()
    for t in range(1, x.shape[1]):
        out[:, t] = torch.where(expand_mask(mask[:, t], x[:, t]), x[:, t], out[:, t - 1])
    return out


def last_observed(mask: torch.Tensor) -> torch.Tensor:
    """The index ``(batch,)`` of each sequence's last observed frame in ``mask (batch, T)``; -1 if none."""
    steps = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, steps, torch.full_like(steps, -1)).amax(dim=1)


class ReplayRows(Messenger):
    """Pyro's ``poutine.replay`` per sequence: at a site of ``trace`` (e.g. a guide's), the sequences that
    ``rows(name)`` marks, a ``(batch,)`` bool tensor, take the trace's value; the others keep the program's
    own draw (``rows`` None: every sequence takes it). The batch axis is each value's first. A site that
    every sequence replays is not drawn at all, one that none replays is drawn as without the handler, so
    the random stream is the one ``poutine.replay`` of the replayed sites alone would use. A mixed value is
    a new tensor: what a sampler attaches to its draws (the relaxed boundaries' logits) is not kept, so
    score such a trace's sites by their values only."""

    def __init__(self, trace, rows: Callable[[str], Optional[torch.Tensor]]):
        super().__init__()
        self.trace, self.rows = trace, rows

    def _replayed(self, msg) -> Optional[torch.Tensor]:
        if msg["is_observed"] or msg["name"] not in self.trace.nodes:
            return None
        rows = self.rows(msg["name"])
        return torch.ones((), dtype=torch.bool) if rows is None else rows

    def _pyro_sample(self, msg) -> None:
        rows = self._replayed(msg)
        if rows is None or msg["done"] or not bool(rows.any()):
            return
        value = self.trace.nodes[msg["name"]]["value"]
        if not bool(rows.all()):  # the program's own draw for the other sequences
            keep = rows.reshape(rows.shape + (1,) * (value.dim() - rows.dim()))  # (batch, 1, ...)
            value = torch.where(keep, value, msg["fn"](*msg["args"], **msg["kwargs"]))
        msg["value"], msg["infer"], msg["done"] = value, self.trace.nodes[msg["name"]]["infer"], True


def replay_rows(fn, trace, rows: Callable[[str], Optional[torch.Tensor]]):
    """``fn`` under :class:`ReplayRows`."""
    return ReplayRows(trace, rows)(fn)
