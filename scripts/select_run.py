#!/usr/bin/env python
"""Choose among HRSSM runs (e.g. seeds) without labels, and show how each rule's choice scores.

    python scripts/evaluate.py boundaries --run runs/hrssm-s0     # once per run: writes RUN/boundaries.json
    python scripts/select_run.py runs/hrssm-s0 runs/hrssm-s1 runs/hrssm-s2 [--rule segmentation-gap]

Rules (``inference/recipes/hrssm/boundaries.py``): ``segmentation-gap``, the ELBO with the model's own boundaries minus
the ELBO with none (label-free); ``elbo``, the held-out ELBO. Prints every run's numbers (F1 and segments
for reference, where the data have events) and the pick.
"""
from __future__ import annotations

import json
import os
import sys

from inference.recipes.hrssm.boundaries import SELECTION_RULES, rank_runs, segmentation_gap
from inference.cli.flags import HelpFormatter, OneLineParser
from inference.cli.command_line import main_guard

RESULT = "boundaries.json"


def read_results(runs) -> dict:
    results = {}
    for run in runs:
        path = os.path.join(run, RESULT)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"runs: {run} has no {RESULT}; run scripts/evaluate.py boundaries --run {run} first")
        with open(path) as f:
            results[run] = json.load(f)
    return results


def main(argv=None) -> int:
    p = OneLineParser(prog="select_run.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", help="HRSSM run directories, each evaluated (RUN/boundaries.json)")
    p.add_argument("--rule", choices=SELECTION_RULES, default=SELECTION_RULES[0], help="the rule that picks")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    results = read_results(args.runs)
    order = rank_runs(results, args.rule)
    for run in order:
        r = results[run]
        f1 = f"F1 {r['boundary_f1']:.3f}, segments {r['mean_segments']:.2f}, " if "boundary_f1" in r else ""
        print(f"{run}: {f1}held-out ELBO {r['test_elbo']:.1f}, segmentation gap {segmentation_gap(r):.1f} nats/sequence")
    print(f"pick ({args.rule}): {order[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main, renames={"runs": "RUN"}))
