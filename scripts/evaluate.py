#!/usr/bin/env python
"""Evaluate a trained HRSSM: boundaries against the true events, segments, held-out ELBO, jumpy imagination.

    python scripts/evaluate.py boundaries --run runs/hrssm [--num-test 500] [--tolerance 1]

Prints and writes RUN/boundaries.json: precision / recall / F1 of the inferred segment starts (the
guide's noise-free boundaries) against the data's true events within +-tolerance frames
(``boundary_f1``: the window rule of the VTA evaluation, a boundary counts when an event is within
reach; ``boundary_f1_one_to_one``: stricter one-to-one matching; see inference/boundaries.py), the mean
number of segments per sequence, the held-out ELBO (nats per sequence) and, with true events,
``segmentation_elbo``: the ELBO with the boundaries fixed to the guide's own, to the true events, and
to none (``pyro_models.hrssm.segmentation_elbo``), which says whether the model prefers the events.
Draws, under RUN/figures/: boundaries_eval.png (frames with the inferred boundaries),
boundary_probabilities.png (q(segment start at t | X) over time, true events dashed), jumpy.png (a
prefix, then one imagined frame per future segment) and, when the run logged it, f1_vs_time.png (each
epoch's boundary F1 against training time, evaluation included).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from inference import plots  # noqa: E402
from inference.boundaries import boundary_metrics, boundary_scores  # noqa: E402
from inference.elbo import elbo_terms  # noqa: E402
from inference.hrssm_experiment import boundary_figure, load_hrssm_run  # noqa: E402
from pyro_models.hrssm import jumpy_rollout, posterior_boundaries, segmentation_elbo, start_probabilities  # noqa: E402


@torch.no_grad()
def evaluate_boundaries(model, guide, data, num_test: int, tolerance: int, batch_size: int):
    x = data.test[:num_test]
    starts = torch.cat([posterior_boundaries(guide, x[i : i + batch_size]).starts for i in range(0, len(x), batch_size)])
    elbo = sum(float(elbo_terms(model, guide, x[i : i + batch_size]).elbo) for i in range(0, len(x), batch_size)) / len(x)
    result = {"num_test": len(x), "tolerance": tolerance, "test_elbo": elbo, "mean_segments": float(starts.sum(1).mean())}
    if data.test_events is not None:
        events = data.test_events[:num_test]
        scores = boundary_scores(starts, events, tolerance)
        result.update(boundary_metrics(starts, events, tolerance), num_predicted=scores.num_predicted,
                      num_events=scores.num_events)
        if guide.boundary_posterior is not None:
            result["segmentation_elbo"] = compare_segmentations(model, guide, x, starts, events, batch_size)
    return result, starts


def compare_segmentations(model, guide, x, starts, events, batch_size: int) -> dict:
    """Mean ELBO (nats per sequence) of ``x`` with q(M | X) replaced by a point mass on: the guide's own
    noise-free boundaries, the true events, and no boundaries (forced ones only)."""
    candidates = {"own": starts, "true_events": events.to(x.dtype), "none": torch.zeros_like(starts)}
    return {name: sum(float(segmentation_elbo(model, guide, x[i : i + batch_size], seg[i : i + batch_size]).elbo.sum())
                      for i in range(0, len(x), batch_size)) / len(x)
            for name, seg in candidates.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("boundaries",))
    p.add_argument("--run", required=True, help="an HRSSM run directory (scripts/train.py hrssm --out RUN)")
    p.add_argument("--data-dir", help="MNIST folder, for runs on mnist-rows")
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--tolerance", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--prefix", type=int, default=5, help="frames given to the jumpy rollout")
    p.add_argument("--num-shown", type=int, default=4, help="sequences in the boundary-probability figure")
    args = p.parse_args(argv)
    model, guide, data = load_hrssm_run(args.run, args.data_dir)
    result, starts = evaluate_boundaries(model, guide, data, args.num_test, args.tolerance, args.batch_size)
    print(json.dumps(result, indent=2))
    figures = os.path.join(args.run, "figures")
    x = data.test[: starts.shape[0]]
    if guide.boundary_posterior is not None and x.shape[1] > 1:
        probs = start_probabilities(guide, x[: args.num_shown])  # (n, T - 1): frames 2..T
        events = data.test_events[: args.num_shown, 1:] if data.test_events is not None else None
        plots.boundary_probabilities(probs, os.path.join(figures, "boundary_probabilities.png"),
                                     "held-out sequences: probability that frame t starts a segment", events)
    history = plots.read_metrics(args.run)
    if history and all("boundary_f1" in m for m in history):
        plots.metric_against_time(history, "boundary_f1", os.path.join(figures, "f1_vs_time.png"),
                                  f"boundary F1 (+-{args.tolerance} frame, window rule) on held-out sequences while training")
    if x.dim() == 5:
        boundary_figure(os.path.join(figures, "boundaries_eval.png"), x, starts, data.test_events, "held-out frames; segment starts in blue")
        frames = jumpy_rollout(model, guide, x[:1, : args.prefix], num_segments=min(8, x.shape[1]))
        plots.image_rows([x[0, : args.prefix], frames[0].clamp(0, 1)], ["prefix", "one frame per segment"],
                         os.path.join(figures, "jumpy.png"), "jumpy imagination")
    out = os.path.join(args.run, "boundaries.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
