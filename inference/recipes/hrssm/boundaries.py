"""Scoring inferred segment boundaries against true event times (Variational Temporal Abstraction,
Kim et al. 2019, sec. 5: boundaries on the colour-changing balls).

A predicted boundary at frame t means a segment starts at t (t >= 1; frame 0 always starts one and is
not scored). Two rules, both within ``tolerance`` frames:

* **window** (the default; the definition of the task and of the VTA evaluation): a predicted boundary
  is correct when some true event lies within ``tolerance`` frames of it, and an event is recalled
  when some predicted boundary does. Two boundaries next to one event are both correct.
* **one-to-one** (``one_to_one=True``, stricter): each event matches at most one boundary and each
  boundary at most one event, closest pairs first, so over-segmentation costs precision.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

import torch


class BoundaryScores(NamedTuple):
    precision: float  # num_correct / num_predicted
    recall: float  # num_recalled / num_events
    f1: float
    num_predicted: int
    num_events: int
    num_correct: int  # predicted boundaries counted correct
    num_recalled: int  # events counted found (= num_correct under one-to-one matching)
    mean_segments: float  # segments per sequence, frame 0's included


def _one_to_one(predicted: torch.Tensor, events: torch.Tensor, tolerance: int) -> Tuple[int, int]:
    """Matched pairs in one sequence (closest first): ``predicted`` and ``events`` are frame indices (1-D)."""
    pairs = sorted(
        (abs(int(p) - int(e)), int(p), int(e)) for p in predicted for e in events if abs(int(p) - int(e)) <= tolerance
    )
    used_p, used_e, matched = set(), set(), 0
    for _, p, e in pairs:
        if p not in used_p and e not in used_e:
            used_p.add(p), used_e.add(e)
            matched += 1
    return matched, matched


def _window(predicted: torch.Tensor, events: torch.Tensor, tolerance: int) -> Tuple[int, int]:
    """(correct boundaries, recalled events) in one sequence: each within ``tolerance`` of the other kind."""
    if predicted.numel() == 0 or events.numel() == 0:
        return 0, 0
    near = (predicted[:, None] - events[None, :]).abs() <= tolerance  # (predicted, events)
    return int(near.any(1).sum()), int(near.any(0).sum())


def boundary_scores(starts: torch.Tensor, events: torch.Tensor, tolerance: int = 1,
                    one_to_one: bool = False) -> BoundaryScores:
    """Precision, recall and F1 of ``starts (N, T)`` (1 where a segment starts) against
    ``events (N, T)`` (1 where a true event happens), within ``tolerance`` frames, by the window rule or,
    with ``one_to_one``, by one-to-one matching (see the module docstring)."""
    if starts.shape != events.shape or starts.dim() != 2:
        raise ValueError(f"starts and events: expected equal shapes (N, T), got {tuple(starts.shape)} and {tuple(events.shape)}")
    if tolerance < 0:
        raise ValueError(f"tolerance: expected >= 0, got {tolerance}")
    starts, events = starts.bool(), events.bool()
    predicted, actual = starts[:, 1:], events[:, 1:]  # frame 0 is not a boundary
    count = _one_to_one if one_to_one else _window
    correct = recalled = 0
    for n in range(starts.shape[0]):
        c, r = count(predicted[n].nonzero().flatten() + 1, actual[n].nonzero().flatten() + 1, tolerance)
        correct, recalled = correct + c, recalled + r
    num_predicted, num_events = int(predicted.sum()), int(actual.sum())
    precision = correct / num_predicted if num_predicted else 0.0
    recall = recalled / num_events if num_events else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    mean_segments = float((predicted.sum(1) + 1).float().mean())
    return BoundaryScores(precision, recall, f1, num_predicted, num_events, correct, recalled, mean_segments)


def boundary_metrics(starts: torch.Tensor, events: torch.Tensor, tolerance: int = 1) -> Dict[str, float]:
    """Flat metrics for logs and JSON: ``boundary_precision``, ``boundary_recall``, ``boundary_f1`` (window
    rule) and the same names ending in ``_one_to_one``; ``starts``, ``events`` as in :func:`boundary_scores`."""
    metrics: Dict[str, float] = {}
    for one_to_one, suffix in ((False, ""), (True, "_one_to_one")):
        scores = boundary_scores(starts, events, tolerance, one_to_one)
        metrics.update({f"boundary_{name}{suffix}": getattr(scores, name) for name in ("precision", "recall", "f1")})
    return metrics


RANDOM_DRAWS = 20  # draws of random boundaries behind each cue's chance level


def random_boundaries(starts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Boundaries ``(N, T)`` as many per sequence as ``starts (N, T)`` has (frame 0 aside), at frames drawn
    uniformly without replacement from 1..T-1: the chance level of a segmentation of that count."""
    num, steps = starts.shape
    counts = starts[:, 1:].bool().sum(1)
    ranks = torch.rand(num, steps - 1, generator=generator).argsort(1).argsort(1)  # a random order of the frames
    chosen = ranks < counts[:, None]  # (N, T - 1)
    out = torch.zeros_like(starts, dtype=torch.bool)
    out[:, 1:], out[:, 0] = chosen, starts[:, 0].bool()
    return out


def cue_scores(starts: torch.Tensor, cues: Dict[str, torch.Tensor], tolerance: int = 1,
               draws: int = RANDOM_DRAWS, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """How far the boundaries ``starts (N, T)`` follow each cue (``{name: events (N, T)}``, e.g. colour
    changes and wall hits): ``f1`` and ``recall`` (window rule, ``tolerance`` frames), ``share`` (of the
    boundaries, the fraction within ``tolerance`` of an event of the cue: the window precision) and
    ``random_f1`` (the mean F1 of ``draws`` random segmentations with the same count per sequence: the
    level a segmentation blind to the cue reaches)."""
    generator = torch.Generator().manual_seed(seed)
    chance = [random_boundaries(starts, generator) for _ in range(draws)]
    result = {}
    for name, events in cues.items():
        scores = boundary_scores(starts, events, tolerance)
        result[name] = {"f1": scores.f1, "share": scores.precision, "recall": scores.recall,
                        "random_f1": sum(boundary_scores(r, events, tolerance).f1 for r in chance) / draws}
    return result


# ----------------------------------------------------------------------------- choosing among runs
SELECTION_RULES = ("segmentation-gap", "elbo")


def segmentation_gap(result: Dict) -> float:
    """How much the model prefers its own boundaries to none (nats per sequence): the ELBO with q(M | X) a
    point mass on the guide's boundaries minus the ELBO with no boundary at all, from a run's
    ``boundaries.json`` (``scripts/evaluate.py boundaries``). Label-free: no true event is used. A model
    whose segments carry no information (e.g. boundaries at the walls' bounces or at random) gains
    little from them; one whose abstract states track the events gains the cost of re-describing each
    event without a new z."""
    elbo = result.get("segmentation_elbo")
    if elbo is None:
        raise ValueError("runs: a boundaries.json without segmentation ELBOs (an RSSM run without boundaries, or one "
                         "written before they were scored for unlabelled data); run scripts/evaluate.py boundaries again")
    return float(elbo["own"] - elbo["none"])


def rank_runs(results: Dict[str, Dict], rule: str = "segmentation-gap") -> list:
    """The run names of ``results`` (name -> its ``boundaries.json``), best first by ``rule``:
    ``segmentation-gap`` (:func:`segmentation_gap`) or ``elbo`` (the held-out ELBO)."""
    if rule not in SELECTION_RULES:
        raise ValueError(f"rule: expected one of {SELECTION_RULES}, got {rule!r}")
    if not results:
        raise ValueError("results: expected at least one run")
    key = segmentation_gap if rule == "segmentation-gap" else (lambda r: float(r["test_elbo"]))
    return sorted(results, key=lambda name: key(results[name]), reverse=True)
