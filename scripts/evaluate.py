#!/usr/bin/env python
"""Run a model's own evaluation on a trained run; each model declares its evaluations in its recipe.

    python scripts/evaluate.py boundaries --run runs/hrssm [--num-test 500] [--tolerance 1]

``boundaries`` (HRSSM): precision / recall / F1 of the guide's noise-free segment starts (the peaks of
q(m_t | X) above --threshold; --no-peaks --threshold 0.5 is the official per-frame argmax, also reported
under "argmax") against the data's true events within +-tolerance frames (``boundary_f1``: the window
rule of the VTA evaluation;
``boundary_f1_one_to_one``: stricter one-to-one matching; see inference/recipes/hrssm/boundaries.py), segments per
sequence, the held-out ELBO (nats per sequence) and the ELBO with the boundaries fixed to the guide's own,
to the true events and to none; on color-balls runs, under "control", the same scores on the same
held-out balls without colour changes, against the wall hits; figures under RUN/figures/: boundaries_eval.png,
boundary_probabilities.png, jumpy.png and, when the run logged it, f1_vs_time.png.

``likelihood`` (every model): the held-out log-likelihood by importance sampling with the guide as
proposal (-k K draws per example: the IWAE bound, K = 1 the ELBO), per example and, for sequences, per
time step, with its Monte Carlo standard error; ``--split train|valid|test``; the run's best epoch by
validation ELBO where it kept one (``--checkpoint last`` for the newest).

    python scripts/evaluate.py likelihood --run runs/jsb-dmm -k 500 [--split test]

Prints the result and writes it to RUN/NAME.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from inference.cli.flags import OneLineParser, add_dataclass_flags, build_config, flag_error, given
from inference.cli.command_line import main_guard
from inference.runs.experiment import load_run, read_spec
from inference.evaluation.likelihood import LikelihoodOptions, evaluate_likelihood
from inference.runs.rundir import BEST
from inference.recipes.registry import recipes


def evaluations():
    """Every evaluation name -> (model names, options class, function): those every model has
    (``likelihood``), then each model's own."""
    found = {"likelihood": (list(recipes()), LikelihoodOptions, evaluate_likelihood)}
    for name, recipe in recipes().items():
        for what, (options, fn) in recipe.evaluations.items():
            found.setdefault(what, ([], options, fn))[0].append(name)
    return found


def parse_args(argv=None):
    known = evaluations()
    argv = ["--k" if a == "-k" else a for a in (sys.argv[1:] if argv is None else argv)]  # -k K, the IWAE's name
    top = OneLineParser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("what", choices=tuple(known), help="the evaluation; " + "; ".join(f"{k}: {', '.join(v[0])}" for k, v in known.items()))
    if not argv or argv[0] not in known:
        top.parse_args(argv[:1] or ["--help"])
    models, options_cls, fn = known[argv[0]]
    p = OneLineParser(prog=f"evaluate.py {argv[0]}", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                      description=f"{argv[0]} ({', '.join(models)})")
    p.add_argument("--run", required=True, help="a run directory (scripts/train.py MODEL --out RUN)")
    p.add_argument("--data-dir", help="where the run's data are now, when they moved (MNIST, polyphonic music)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_dataclass_flags(p, options_cls, options_cls(), "options.")
    args = p.parse_args(argv[1:])
    try:
        options = build_config(options_cls, options_cls(), given(args, "options."))
    except ValueError as error:
        p.error(flag_error(error, [f for f in vars(options_cls())]))
    return argv[0], models, fn, options, args


def main(argv=None) -> int:
    what, models, fn, options, args = parse_args(argv)
    spec = read_spec(args.run)
    if spec.model not in models:
        raise ValueError(f"path: {args.run} holds a {spec.model} run; {what} evaluates {', '.join(models)} runs")
    checkpoint = getattr(options, "checkpoint", "last")
    if checkpoint == "best" and not os.path.isfile(os.path.join(args.run, BEST)):
        checkpoint = "last"  # a run without a validation split keeps no best epoch
        if hasattr(options, "checkpoint"):
            options.checkpoint = checkpoint
    result = fn(load_run(args.run, data_dir=args.data_dir, checkpoint=checkpoint), options)
    print(json.dumps(result, indent=2))
    out = os.path.join(args.run, f"{what}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main, renames={"path": "--run"}))
