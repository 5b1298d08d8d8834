"""Imputation experiments for any registered model, through its recipe's imputer: masks of a kind and
strength, errors on the missing parts of held-out data for every estimate the imputer returns, next to
trivial floors, and figures (the KVAE paper's Figure 3 protocol for sequences).

Sequence models get frame masks: ``random`` (each frame after the first ``num_given`` missing with a
drop probability) or ``consecutive`` (k frames missing right after the first ``num_given``); floors:
the training set's majority frame (for bouncing balls, the walls only) and the last observed frame.
Image models get pixel masks: ``random`` (each pixel missing with a drop probability) or
``bottom-half``; floor: the mean training image.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from pyro_models.imputation import (NUM_GIVEN, Imputation, consecutive_frame_mask, expand_mask, hamming_error, last_observed_frame,
                                    majority_frame, missing_mse, random_frame_mask, scored_parts)
from pyro_models.vae.impute import bottom_half_mask, random_pixel_mask

from . import plots
from ..runs.experiment import Run
from ..recipes.recipe import Recipe

DROP_PROBS = tuple(round(0.1 * i, 1) for i in range(1, 11))
CONSECUTIVE_STRIDE = 2  # k = 1, 3, 5, ...
FRAME_MASKS, PIXEL_MASKS = ("random", "consecutive"), ("random", "bottom-half")
METRICS = {"hamming": hamming_error, "mse": missing_mse}
# what each metric's number is, for the axis of the error curves
METRIC_LABELS = {"hamming": "fraction of wrong values (0.5 threshold) on the missing parts",
                 "mse": "mean squared error on the missing parts"}


class Setting(NamedTuple):
    kind: str
    value: float


def mask_kinds(recipe: Recipe) -> Sequence[str]:
    return FRAME_MASKS if recipe.sequences else PIXEL_MASKS


def check_request(recipe: Recipe, kind: str, batch_size: int = 1, num_samples: Optional[int] = None, metric: str = "hamming",
                  num_test: int = 0) -> None:
    """Raise ``ValueError`` naming the argument unless an imputation experiment with these arguments
    can run for ``recipe``'s model (checked before any work)."""
    if recipe.impute is None:
        raise ValueError(f"model: {recipe.name} has no imputer")
    if kind not in mask_kinds(recipe):
        raise ValueError(f"kind: expected one of {tuple(mask_kinds(recipe))} for a {recipe.name} run, got {kind!r}")
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {tuple(METRICS)}, got {metric!r}")
    for name, value, low in (("batch_size", batch_size, 1), ("num_samples", num_samples, 1), ("num_test", num_test, 0)):
        if value is not None and value < low:
            raise ValueError(f"{name}: expected >= {low}, got {value}")


def settings(run: Run, kind: str) -> List[float]:
    """The strengths of mask ``kind`` for the run's held-out data."""
    check_request(run.recipe, kind)
    if kind == "random":
        return list(DROP_PROBS)
    if kind == "bottom-half":
        return [0.5]
    return list(range(1, run.data.test.shape[1] - NUM_GIVEN + 1, CONSECUTIVE_STRIDE))


def make_mask(run: Run, kind: str, value, shape: torch.Size, seed: int) -> torch.Tensor:
    """The boolean mask (True = observed) of ``kind`` at strength ``value`` for data of ``shape``."""
    generator = torch.Generator().manual_seed(seed)
    if run.recipe.sequences:
        if kind == "random":
            return random_frame_mask(shape[0], shape[1], value, NUM_GIVEN, generator)
        return consecutive_frame_mask(shape[0], shape[1], int(value), NUM_GIVEN)
    if kind == "random":
        return random_pixel_mask(shape, value, generator)
    return bottom_half_mask(shape)


def floors(run: Run, x: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Trivial predictions of ``x`` to compare with: the training set's majority frame and its mean frame
    (each pixel's or key's frequency: the best constant under squared error), and the last observed frame
    where every sequence's first frame is observed."""
    if run.recipe.sequences:
        known = run.data.frames_held("train")
        frames = run.data.train.flatten(0, 1) if known is None else run.data.train[known]  # (frames, *frame)
        result = {"floor_majority_frame": majority_frame(run.data.train, x, known),
                  "floor_mean_frame": frames.mean(0).expand_as(x)}
        if mask[:, 0].all():
            result["floor_last_observed"] = last_observed_frame(x, mask)
        return result
    return {"floor_mean_image": run.data.train.mean(0).expand_as(x)}


def held_out(run: Run, num_test: int = 0):
    """The first ``num_test`` (0: all) held-out examples, the mask of the parts they hold (None: all; not
    the steps past the ends of ragged sequences) and their lengths (None: not ragged)."""
    end = None if num_test == 0 else num_test
    known = run.data.frames_held("test") if run.recipe.sequences else None
    lengths = getattr(run.data, "test_lengths", None)
    return run.data.test[:end], (None if known is None else known[:end]), (None if lengths is None else lengths[:end])


def impute_batch(run: Run, x: torch.Tensor, mask: torch.Tensor, num_samples: Optional[int],
                 lengths: Optional[torch.Tensor] = None) -> Imputation:
    """The recipe's imputer on one batch, with the defaults it takes from the training data;
    ``num_samples`` None: the recipe's choice (``impute_defaults``), else 1."""
    extras = {"num_samples": 1, **run.recipe.impute_defaults(run.data)}
    if num_samples is not None:
        extras["num_samples"] = num_samples
    if lengths is not None:
        extras["lengths"] = lengths
    return run.recipe.impute(run.model, run.guide, x, mask, **extras)


def evaluate(run: Run, kind: str, batch_size: int = 250, seed: int = 0, num_samples: Optional[int] = None,
             metric: str = "hamming", num_test: int = 0) -> List[Dict[str, float]]:
    """One row per strength of mask ``kind``: the error (``metric``) on the missing parts of the held-out
    data (the first ``num_test``; 0: all), averaged over missing parts, for every estimate and floor."""
    check_request(run.recipe, kind, batch_size, num_samples, metric, num_test)
    test, known, lengths = held_out(run, num_test)
    score, rows = METRICS[metric], []
    for value in settings(run, kind):
        mask = make_mask(run, kind, value, test.shape, seed)
        if known is not None:  # the data's own gaps are missing too, and not scored
            mask = mask & known
        totals: Dict[str, List] = {}
        for start in range(0, test.shape[0], batch_size):
            part = slice(start, start + batch_size)
            x, m, k = test[part], mask[part], None if known is None else known[part]
            weight = int(scored_parts(x, m, k).sum())  # average over scored parts, not batches
            if weight == 0:
                continue
            batch_lengths = None if lengths is None else lengths[part]
            estimates = {**impute_batch(run, x, m, num_samples, batch_lengths).estimates, **floors(run, x, m)}
            for name, estimate in estimates.items():
                totals.setdefault(name, []).append((score(x, estimate, m, k), weight))
        row = {"setting": value}
        row.update({name: sum(e * w for e, w in parts) / sum(w for _, w in parts) for name, parts in totals.items()})
        rows.append(row)
    return rows


def figures(run: Run, kind: str, rows: List[Dict[str, float]], seed: int = 0, metric: str = "hamming") -> List[str]:
    """The error curves of ``rows`` (``metric`` on the axis) and, for image frames, a strip of one held-out
    example at the middle strength (truth / observed / each estimate / a posterior-predictive draw), whose
    mask is the experiment's and the data's own (a frame the data lack is drawn as missing, and is not
    given to the imputer). Returns the paths."""
    folder = os.path.join(run.path, "figures")
    xs = [r["setting"] for r in rows]
    names = [k for k in rows[0] if k != "setting"] if rows else []
    label = {"random": "drop probability", "consecutive": "consecutive missing frames k"}.get(kind, kind)
    paths = [plots.error_curves(xs, {k: [r.get(k, float("nan")) for r in rows] for k in names},
                                os.path.join(folder, f"imputation_{kind}.png"), label,
                                f"{run.spec.model} imputation, {kind} masks", METRIC_LABELS[metric])]
    middle = xs[len(xs) // 2]
    x, known, lengths = held_out(run, 1)
    mask = make_mask(run, kind, middle, x.shape, seed)
    if known is not None:  # the data's own gaps: missing in the figure as in the scores
        mask = mask & known
    result = impute_batch(run, x, mask, num_samples=1, lengths=lengths)
    images = x[0] if run.recipe.sequences else x
    if images.dim() == 4:  # (T, C, H, W) frames or (batch, C, H, W) images
        pick = (lambda t: t[0]) if run.recipe.sequences else (lambda t: t)
        rows_shown = [pick(x), pick(x)] + [pick(e) for e in result.estimates.values()] + [pick(result.samples[0])]
        labels = ["truth", "observed", *result.estimates, "sampled"]
        observed = [None, pick(expand_mask(mask, x))] + [None] * (len(rows_shown) - 2)
        paths.append(plots.image_rows(rows_shown, labels, os.path.join(folder, f"imputation_{kind}_strip.png"),
                                      f"{kind} mask, setting {middle}: missing parts in blue", observed=observed))
    return paths


def save(run: Run, kind: str, rows: List[Dict[str, float]], **details) -> str:
    """Write ``rows`` (and ``details``: metric, seed, ...) to ``RUN/imputation_KIND.json``; returns the path."""
    path = os.path.join(run.path, f"imputation_{kind}.json")
    with open(path, "w") as f:
        json.dump({"mask": kind, **details, "rows": rows}, f, indent=2)
    return path
