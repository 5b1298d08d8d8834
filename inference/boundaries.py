"""Scoring inferred segment boundaries against true event times (Variational Temporal Abstraction,
Kim et al. 2019, sec. 5: boundaries on the colour-changing balls).

A predicted boundary at frame t (a segment starts at t, t >= 1; frame 0 always starts one and is not
scored) counts as correct when an unmatched true event lies within ``tolerance`` frames of it. Each
event matches at most one boundary and each boundary at most one event; pairs are matched closest
first (one-to-one, so over-segmentation costs precision).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class BoundaryScores(NamedTuple):
    precision: float
    recall: float
    f1: float
    num_predicted: int
    num_events: int
    num_matched: int
    mean_segments: float  # segments per sequence, frame 0's included


def _match(predicted: torch.Tensor, events: torch.Tensor, tolerance: int) -> int:
    """Matched pairs in one sequence: ``predicted`` and ``events`` are frame indices (1-D)."""
    pairs = sorted(
        (abs(int(p) - int(e)), int(p), int(e)) for p in predicted for e in events if abs(int(p) - int(e)) <= tolerance
    )
    used_p, used_e, matched = set(), set(), 0
    for _, p, e in pairs:
        if p not in used_p and e not in used_e:
            used_p.add(p), used_e.add(e)
            matched += 1
    return matched


def boundary_scores(starts: torch.Tensor, events: torch.Tensor, tolerance: int = 1) -> BoundaryScores:
    """Precision, recall and F1 of ``starts (N, T)`` (1 where a segment starts) against
    ``events (N, T)`` (1 where a true event happens), within ``tolerance`` frames."""
    if starts.shape != events.shape or starts.dim() != 2:
        raise ValueError(f"starts and events: expected equal shapes (N, T), got {tuple(starts.shape)} and {tuple(events.shape)}")
    if tolerance < 0:
        raise ValueError(f"tolerance: expected >= 0, got {tolerance}")
    starts, events = starts.bool(), events.bool()
    predicted, actual = starts[:, 1:], events[:, 1:]  # frame 0 is not a boundary
    matched = sum(
        _match(predicted[n].nonzero().flatten() + 1, actual[n].nonzero().flatten() + 1, tolerance) for n in range(starts.shape[0])
    )
    num_predicted, num_events = int(predicted.sum()), int(actual.sum())
    precision = matched / num_predicted if num_predicted else 0.0
    recall = matched / num_events if num_events else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    mean_segments = float((predicted.sum(1) + 1).float().mean())
    return BoundaryScores(precision, recall, f1, num_predicted, num_events, matched, mean_segments)
