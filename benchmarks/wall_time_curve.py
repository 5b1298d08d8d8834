#!/usr/bin/env python
"""A run's held-out bound per time step against the wall time it trained, beside published numbers.

    python benchmarks/wall_time_curve.py --run runs/jsb-dmm-st-r --reference "Krishnan et al. DMM (bound)=6.926" \\
        --reference "Pyro examples/dmm.py (bound)=6.87"

Reads ``RUN/metrics.jsonl`` (runs on sequences of different lengths log ``*_elbo_per_step``), adds up each
epoch's ``time_s`` (training, scoring and reports: the wall time a user waits) or with ``--clock cpu`` its
``cpu_s`` (the process's CPU time, which a neighbour's load on a shared machine does not inflate), and draws the negative
validation and test ELBO per time step (an upper bound on the NLL per step) against hours, with the
references as horizontal lines. Writes ``RUN/figures/nll_vs_wall_time.png`` and ``RUN/wall_time_curve.json``
(the curve, the best validation epoch and its test bound, the hours to reach each reference).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SPLITS = ("valid", "test")
SECONDS_PER_HOUR = 3600.0


CLOCKS = {"wall": "time_s", "cpu": "cpu_s"}  # --clock: the metric each epoch adds


def curve(metrics: List[Dict], clock: str = "wall") -> List[Dict]:
    """One point per scored epoch: epoch, hours so far on ``clock``, and the negative ELBO per step of each split."""
    hours, points = 0.0, []
    for m in metrics:
        hours += m[CLOCKS[clock]] / SECONDS_PER_HOUR
        if all(f"{s}_elbo_per_step" in m for s in SPLITS):
            points.append({"epoch": m["epoch"], "hours": hours, **{s: -m[f"{s}_elbo_per_step"] for s in SPLITS}})
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run on ragged sequences with a validation split")
    parser.add_argument("--reference", action="append", default=[], help="NAME=VALUE, a published number (nats per step)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="hours of wall time, or of the process's CPU time (default: %(default)s)")
    args = parser.parse_args()
    with open(os.path.join(args.run, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    if any(CLOCKS[args.clock] not in m for m in metrics):
        parser.error(f"--clock: {args.run} logged no {CLOCKS[args.clock]} in some epochs (runs before it existed); use --clock wall")
    points = curve(metrics, args.clock)
    if not points:
        raise SystemExit(f"error: {args.run} logged no per-step validation and test ELBO; see --help")
    references = {}
    for reference in args.reference:
        name, _, value = reference.rpartition("=")
        try:
            references[name] = float(value)
        except ValueError:
            parser.error(f"--reference: expected NAME=VALUE (nats per step), got {reference!r}")
        if not name:
            parser.error(f"--reference: expected NAME=VALUE (nats per step), got {reference!r}")
    best = min(points, key=lambda p: p["valid"])
    reached = {name: next((p["hours"] for p in points if p["test"] <= value), None) for name, value in references.items()}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for split in SPLITS:
        ax.plot([p["hours"] for p in points], [p[split] for p in points], label=f"-ELBO per step, {split}")
    for (name, value), style in zip(references.items(), ("--", ":", "-.", (0, (5, 1)))):
        ax.axhline(value, linestyle=style, linewidth=0.9, color="grey", label=f"{name}: {value}")
    ax.set_xlabel(f"{args.clock} time (hours, training + scoring, one CPU thread)")
    ax.set_ylabel("nats per time step")
    ax.set_ylim(min(min(p["test"] for p in points), *references.values(), 1e9) - 0.1, points[0]["test"] + 0.5)
    ax.set_title(f"{os.path.basename(os.path.normpath(args.run))}: negative ELBO (an upper bound on the NLL)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    figure = os.path.join(args.run, "figures", f"nll_vs_{args.clock}_time.png")
    os.makedirs(os.path.dirname(figure), exist_ok=True)
    fig.savefig(figure, dpi=120, bbox_inches="tight")
    result = {"run": args.run, "clock": args.clock, "best_valid_epoch": best, "hours_to_reach": reached, "references": references,
              "points": points}
    with open(os.path.join(args.run, f"{args.clock}_time_curve.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"best validation epoch {best['epoch']} after {best['hours']:.2f} h ({args.clock}): valid {best['valid']:.3f}, "
          f"test {best['test']:.3f} nats per step (bounds)")
    for name, hours in reached.items():
        print(f"{name}: " + ("not reached" if hours is None else f"test bound below it after {hours:.2f} h"))
    print(f"wrote {figure}")


if __name__ == "__main__":
    main()
