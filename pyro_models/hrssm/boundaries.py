"""The boundary variables m_t of the HRSSM: the hard constraints on segments (N_max, l_max), the
boundary sites shared by model and guide, the UPDATE-step context of the z_t sites, and segmentations
read from traces."""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional, Tuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace

from ..distributions import LogitRelaxedBernoulliStraightThrough
from .config import BINARY_THRESHOLD, PEAK_THRESHOLD, HRSSMConfig


class SegmentCounter:
    """The segment count ``n`` and current segment length ``l`` of each sequence while its boundaries
    are drawn, and the boundaries the constraints force.

    Frame 1 opens segment 1 (n = l = 1). For the boundary after frame ``index + 1`` (0-based ``index``),
    with ``r = T - 1 - index`` frames left after it:

    * forced 1 (READ) when ``l >= max_length`` (paper, prior on temporal structure);
    * forced 0 (COPY) when ``n >= max_segments`` (same; the paper lets N_max win a tie), or when
      ``r > (max_segments - n) * max_length``: a boundary now would leave more frames than the remaining
      segments can hold (a look-ahead the paper does not have; without it, N_max and l_max can conflict
      later and one of them must give: the official code lets l_max win, the paper N_max).

    For ``T <= max_segments * max_length`` the two are never forced at once and every sequence ends with
    at most N_max segments of at most l_max frames (by induction on the invariant
    ``r <= (l_max - l) + (N_max - n) l_max``).
    ``free`` (a 0-d bool tensor, default True) False forces COPY wherever l_max does not force a READ
    (the boundary warm-up, ``HRSSMConfig.boundary_warmup_steps``): segments are then l_max frames long,
    ceil(T / l_max) <= N_max of them. A tensor, not a Python bool, so that a compiled loss reads it.
    Counts are integers and never carry gradients.
    """

    def __init__(self, batch_size: int, num_steps: int, config: HRSSMConfig, device=None,
                 free: Optional[torch.Tensor] = None, lengths: Optional[torch.Tensor] = None):
        self.num_steps, self.max_segments, self.max_length = num_steps, config.max_segments, config.max_length
        self.lengths = lengths  # (batch,): each sequence's own T; no boundary after its last frame
        self.free = free
        self.count = torch.ones(batch_size, dtype=torch.long, device=device)
        self.length = torch.ones(batch_size, dtype=torch.long, device=device)

    def forced(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Boolean ``(force_copy, force_read)``, each ``(batch,)``, for the boundary after frame ``index``."""
        steps = self.num_steps if self.lengths is None else self.lengths
        remaining = steps - 1 - index
        force_read = self.length >= self.max_length
        room = (self.max_segments - self.count) * self.max_length  # frames the segments still allowed can hold
        force_copy = (self.count >= self.max_segments) | (remaining > room)
        if self.lengths is not None:  # past a sequence's end: no boundary (no site, no KL)
            past = remaining <= 0
            force_copy, force_read = force_copy | past, force_read & ~past
        if self.free is not None:
            force_copy = force_copy | ~self.free
        return force_copy & ~force_read, force_read

    def update(self, read: torch.Tensor) -> None:
        """Record the boundary ``read (batch,)`` (1: the next frame starts a segment)."""
        new = read.detach() > BINARY_THRESHOLD
        self.count = self.count + new.long()
        self.length = torch.where(new, torch.ones_like(self.length), self.length + 1)


def _resolve(value: torch.Tensor, force_copy: torch.Tensor, force_read: torch.Tensor) -> torch.Tensor:
    """``value`` where free, 1 where a READ is forced, 0 where a COPY is forced (a new tensor)."""
    return torch.where(force_read, torch.ones_like(value), torch.where(force_copy, torch.zeros_like(value), value))


def sample_boundary(name: str, logits: torch.Tensor, temperature: torch.Tensor, counter: SegmentCounter,
                    index: int) -> torch.Tensor:
    """The boundary site ``name`` after frame ``index`` (0-based) and the gate it implies, ``(batch,)``.

    The site is ``LogitRelaxedBernoulliStraightThrough(temperature, logits)``, masked where the constraints
    force the boundary (deterministic there in model and guide: no KL). The tensor ``rsample`` returns is
    passed to the site untouched: it carries its relaxed value in a private attribute that ``log_prob``
    reads, and any operation on it would drop it. The gate (forced values filled in) is derived apart.
    """
    force_copy, force_read = counter.forced(index)
    with poutine.mask(mask=~(force_copy | force_read)):
        m = pyro.sample(name, LogitRelaxedBernoulliStraightThrough(temperature, logits))
    read = _resolve(m, force_copy, force_read)
    counter.update(read)
    return read


def update_site(read: torch.Tensor, gradient_weight: float):
    """The context of a ``z_t`` site: masked to UPDATE steps (``read (batch,)`` > 0.5; a COPY adds no
    z-KL) and, for ``gradient_weight`` w > 0, scaled there by ``w * read + (1 - w) * read.detach()``:
    1 in the forward pass (``read`` is the hard gate), so the ELBO's value is unchanged, while w times
    the KL's gradient reaches the boundary logits through the straight-through sample, as the gated
    terms' gradients do. The official code multiplies this KL by the detached gate (w = 0), so q(M | X)
    never sees what an UPDATE costs in z. Only UPDATE steps get this gradient (a COPY step's
    counterfactual KL is not computed), so w > 0 biases q(M | X) towards fewer segments."""
    update = read.detach() > BINARY_THRESHOLD
    stack = contextlib.ExitStack()
    stack.enter_context(poutine.mask(mask=update))
    if gradient_weight > 0:  # not read.requires_grad: a compiled loss is traced on inputs that need no grad
        gate = gradient_weight * read + (1.0 - gradient_weight) * read.detach()
        stack.enter_context(poutine.scale(scale=torch.where(update, gate, torch.ones_like(read))))
    return stack


def apply_constraints(raw: torch.Tensor, config: HRSSMConfig, free: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Segment starts ``(batch, T)`` (1 where a frame starts a segment; frame 1 always does) from raw 0/1
    boundaries ``raw (batch, T - 1)`` (``raw[:, t]``: after frame t + 1), with the forced values of
    :class:`SegmentCounter` (``free`` as there) filled in, as the model and guide do."""
    batch, steps = raw.shape[0], raw.shape[1] + 1
    counter = SegmentCounter(batch, steps, config, raw.device, free)
    starts = [raw.new_ones(batch)]
    for index in range(steps - 1):
        force_copy, force_read = counter.forced(index)
        read = _resolve((raw[:, index].detach() > BINARY_THRESHOLD).to(raw.dtype), force_copy, force_read)
        counter.update(read)
        starts.append(read)
    return torch.stack(starts, dim=1)


def check_threshold(threshold: float) -> None:
    """A probability threshold for :func:`decode_boundaries`: in (0, 1), else ``ValueError``."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold: expected in (0, 1), got {threshold}")


def decode_boundaries(logits: torch.Tensor, peaks: bool = True, threshold: float = PEAK_THRESHOLD) -> torch.Tensor:
    """Noise-free raw boundaries ``(batch, T - 1)`` (float 0/1) from the boundary logits ``logits
    (batch, T - 1)`` of q(m_t | X) (frames 2..T): where the probability exceeds ``threshold`` and, with
    ``peaks``, is also a local maximum over time (``>`` the previous frame's, ``>=`` the next one's, so
    of a tie the earlier frame wins). ``peaks=False, threshold=0.5`` is the per-frame argmax of the
    official evaluation. The constraints are not applied (:func:`apply_constraints`)."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected (batch, T - 1), got shape {tuple(logits.shape)}")
    check_threshold(threshold)
    raw = logits > torch.logit(torch.tensor(threshold, dtype=logits.dtype, device=logits.device))
    if peaks:
        floor = torch.full_like(logits[:, :1], -float("inf"))
        before = torch.cat([floor, logits[:, :-1]], dim=1)  # (batch, T - 1): logit of the frame before
        after = torch.cat([logits[:, 1:], floor], dim=1)  # (batch, T - 1): of the frame after
        raw = raw & (logits > before) & (logits >= after)
    return raw.to(logits.dtype)


class Segmentation(NamedTuple):
    """``starts (batch, T)`` float 0/1 (frame t starts a segment; ``starts[:, 0] = 1``) and
    ``num_segments (batch,)`` long."""

    starts: torch.Tensor
    num_segments: torch.Tensor


def _segmentation(starts: torch.Tensor) -> Segmentation:
    return Segmentation(starts, starts.detach().round().long().sum(-1))


def _num_steps(trace: Trace) -> int:
    steps = [int(name[2:]) for name in trace.nodes if name.startswith("z_") and name[2:].isdigit()]
    if not steps:
        raise ValueError("trace: no z_t sites found; expected a trace of an HRSSM model or guide")
    return max(steps)


def boundaries_from_trace(trace: Trace, config: HRSSMConfig, free: Optional[torch.Tensor] = None) -> Segmentation:
    """The segmentation drawn in a trace of the guide (or of the model): the ``m_t`` site values with the
    constraints re-applied (at forced steps the site holds the unused raw draw); ``free`` as the trace's
    (``BoundaryTemperature.free_tensor``, during the boundary warm-up)."""
    steps = _num_steps(trace)
    z_value = trace.nodes["z_1"]["value"]
    batch = z_value.shape[-2]
    if not config.boundaries or steps == 1:
        return _segmentation(z_value.new_ones(batch, steps))
    raw = torch.stack([trace.nodes[f"m_{t}"]["value"].detach() for t in range(1, steps)], dim=-1)
    return _segmentation(apply_constraints(raw, config, free))
