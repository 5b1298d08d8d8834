#!/usr/bin/env python
"""Run a model's own evaluation on a trained run; each model declares its evaluations in its recipe.

    python scripts/evaluate.py boundaries --run runs/hrssm [--num-test 500] [--tolerance 1]

``boundaries`` (HRSSM): precision / recall / F1 of the guide's noise-free segment starts (the peaks of
q(m_t | X) above --threshold; --no-peaks --threshold 0.5 is the official per-frame argmax, also reported
under "argmax") against the data's true events within +-tolerance frames (``boundary_f1``: the window
rule of the VTA evaluation;
``boundary_f1_one_to_one``: stricter one-to-one matching; see inference/boundaries.py), segments per
sequence, the held-out ELBO (nats per sequence) and the ELBO with the boundaries fixed to the guide's own,
to the true events and to none; on color-balls runs, under "control", the same scores on the same
held-out balls without colour changes, against the wall hits; figures under RUN/figures/: boundaries_eval.png,
boundary_probabilities.png, jumpy.png and, when the run logged it, f1_vs_time.png.

Prints the result and writes it to RUN/NAME.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from inference.cli import OneLineParser, add_dataclass_flags, build_config, flag_error, given
from inference.command_line import main_guard
from inference.experiment import load_run, read_spec
from inference.registry import recipes


def evaluations():
    """Every evaluation name -> (model names, options class, function)."""
    found = {}
    for name, recipe in recipes().items():
        for what, (options, fn) in recipe.evaluations.items():
            found.setdefault(what, ([], options, fn))[0].append(name)
    return found


def parse_args(argv=None):
    known = evaluations()
    argv = list(sys.argv[1:] if argv is None else argv)
    top = OneLineParser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("what", choices=tuple(known), help="the evaluation; " + "; ".join(f"{k}: {', '.join(v[0])}" for k, v in known.items()))
    if not argv or argv[0] not in known:
        top.parse_args(argv[:1] or ["--help"])
    models, options_cls, fn = known[argv[0]]
    p = OneLineParser(prog=f"evaluate.py {argv[0]}", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                      description=f"{argv[0]} ({', '.join(models)})")
    p.add_argument("--run", required=True, help="a run directory (scripts/train.py MODEL --out RUN)")
    p.add_argument("--data-dir", help="MNIST folder, for runs on MNIST")
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
    result = fn(load_run(args.run, data_dir=args.data_dir), options)
    print(json.dumps(result, indent=2))
    out = os.path.join(args.run, f"{what}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main, renames={"path": "--run"}))
