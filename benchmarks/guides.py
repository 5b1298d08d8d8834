#!/usr/bin/env python
"""Train one model with each of its guides on the same data, seeds and budget, and compare them side by
side: held-out ELBO and the model's task metric (imputation error for sequence models at one drop
probability, boundary F1 for the HRSSM when the data have events), per seed and as mean and range over
the seeds, as a table, JSON and a figure.

    python benchmarks/guides.py kvae --epochs 5 --seeds 0 1 2 -- --num-sequences 500 --decoder-channels 32
    python benchmarks/guides.py dmm --epochs 3 -- --data mnist-rows --data-dir ../shared/data/mnist

Arguments after ``--`` are ``scripts/train.py MODEL`` flags shared by every guide's run (``--guide`` and
``--seed`` are set here). Each run goes to ``RUNS/MODEL/GUIDE-sSEED`` (a folder holding the same run is
continued, not redone).

``--refit-epochs E`` adds the comparison of the guides alone (:mod:`inference.evaluation.guide_fit`): each trained
model is held fixed and every guide is fitted to it for E epochs on the true ELBO, starting from the
trained guide's weights where they fit; the held-out ELBOs of the fitted guides on one model differ only
by the variational family.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import pyro

from common import RESULTS, machine_info, write_json  # benchmarks/common.py (the script's own folder)

from inference.evaluation import imputation, plots
from inference.cli.command_line import parse_train_args
from inference.runs.experiment import load_run, model_inputs, train
from inference.evaluation.guide_fit import GuideFitConfig, example_elbos, fit_guide, load_matching
from inference.recipes.registry import recipes
from inference.trainer import as_inputs

DROP_PROB = 0.5  # the imputation metric's drop probability


def task_metrics(run, last: dict, num_test: int, metric: str) -> dict:
    """The model's task metric for this run: boundary F1 when the epoch report has it, else the imputation
    error of the recipe's imputer at ``DROP_PROB`` (sequence models)."""
    if "boundary_f1" in last:
        return {"boundary_f1": last["boundary_f1"]}
    if not run.recipe.sequences or run.recipe.impute is None:
        return {}
    rows = imputation.evaluate(run, "random", num_test=num_test, metric=metric)
    row = next(r for r in rows if r["setting"] == DROP_PROB)
    return {f"impute_{metric}_{name}": value for name, value in row.items() if name != "setting"}


def run_folder(args, guide: str, seed: int) -> str:
    return os.path.join(args.runs, args.model, f"{guide}-s{seed}")


def show(row: dict) -> None:
    print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)


def train_one(args, guide: str, seed: int, shared) -> dict:
    """Train (or continue) the run of ``guide`` at ``seed`` and return its row."""
    out = run_folder(args, guide, seed)
    spec = parse_train_args([args.model, *shared, "--guide", guide, "--epochs", str(args.epochs),
                             "--seed", str(seed), "--no-progress", "--out", out], "").spec
    train(spec, out)  # a finished run in the folder: nothing to do
    history = plots.read_metrics(out)
    last = history[-1]
    row = {"guide": guide, "seed": seed, "test_elbo": last["test_elbo"], "kl": last["kl"],
           "train_minutes": sum(m["time_s"] for m in history) / 60,
           **{k: last[k] for k in ("mean_segments",) if k in last},
           **task_metrics(load_run(out), last, args.num_test, args.metric)}
    show(row)
    return row


def refit_rows(args, trained_with: str, seed: int) -> list:
    """Hold the model of the run ``trained_with`` at ``seed`` fixed and fit each guide to it; one row per
    guide: the held-out ELBO of the trained guide (amortised, as trained) and of the fitted one, and the
    fitted one's paired difference from the first guide's, with its standard error over the held-out
    sequences (every guide scored on the same draws of the noise: common random numbers)."""
    run = load_run(run_folder(args, trained_with, seed))
    train_inputs, test_inputs = (as_inputs(model_inputs(run.data, split)) for split in ("train", "test"))

    def scores(guide):
        pyro.set_rng_seed(seed)
        return example_elbos(run.model, guide, test_inputs, num_samples=args.refit_samples)

    as_trained = scores(run.guide).mean().item()
    rows, first = [], None
    for name in run.recipe.guides:
        pyro.set_rng_seed(seed)  # a guide's fresh parts start from the same draw
        guide = run.recipe.build(tuple(run.data.train.shape[1:]), replace(run.spec.config, guide=name))[1]
        load_matching(guide, run.guide.state_dict())
        losses = fit_guide(run.model, guide, train_inputs, GuideFitConfig(epochs=args.refit_epochs, lr=args.refit_lr, seed=seed))
        fitted = scores(guide)
        first = fitted if first is None else first
        difference = fitted - first
        rows.append({"seed": seed, "model_trained_with": trained_with, "guide": name, "test_elbo_as_trained": as_trained,
                     "test_elbo_fitted": fitted.mean().item(), "minus_first_guide": difference.mean().item(),
                     "minus_first_guide_se": (difference.std() / len(difference) ** 0.5).item(),
                     "final_train_loss": losses[-1]})
        show(rows[-1])
    return rows


def summarise(rows) -> list:
    """Per guide: the mean, min and max over seeds of every numeric column."""
    summary = []
    for guide in dict.fromkeys(r["guide"] for r in rows):
        mine = [r for r in rows if r["guide"] == guide]
        entry = {"guide": guide, "seeds": len(mine)}
        for key in mine[0]:
            values = [r[key] for r in mine if isinstance(r.get(key), (int, float)) and r[key] is not None]
            if key != "seed" and len(values) == len(mine) and not isinstance(mine[0][key], bool):
                entry.update({f"{key}_mean": sum(values) / len(values), f"{key}_min": min(values), f"{key}_max": max(values)})
        summary.append(entry)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=tuple(recipes()))
    p.add_argument("--epochs", type=int, default=5, help="the budget of every guide's run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per guide and seed")
    p.add_argument("--num-test", type=int, default=200, help="held-out sequences for the imputation metric")
    p.add_argument("--metric", choices=tuple(imputation.METRICS), default="hamming")
    p.add_argument("--runs", default=os.path.join(RESULTS, "guides"))
    p.add_argument("--refit-epochs", type=int, default=0, help="also fit every guide to each trained model for this many epochs (0: not)")
    p.add_argument("--refit-lr", type=float, default=1e-3, help="Adam's learning rate of the refit")
    p.add_argument("--refit-samples", type=int, default=4, help="draws per held-out sequence when scoring a fitted guide")
    p.add_argument("--out", default=None, help="JSON path (default RESULTS/guides_MODEL.json)")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, shared = p.parse_args(argv[:split]), argv[split + 1 :]  # after --: scripts/train.py flags
    rows = [train_one(args, guide, seed, shared) for seed in args.seeds for guide in recipes()[args.model].guides]
    summary = summarise(rows)
    for row in summary:
        show(row)
    guides = recipes()[args.model].guides
    refits = [r for seed in args.seeds for trained in guides for r in refit_rows(args, trained, seed)] if args.refit_epochs else []
    figure = os.path.join(args.runs, args.model, "guides.png")
    plots.bars_by_name({r["guide"]: r["test_elbo_mean"] for r in summary}, figure,
                       f"{args.model}: held-out ELBO by guide ({args.epochs} epochs, seeds {args.seeds}, bars: range)",
                       "held-out ELBO (nats)", spread={r["guide"]: (r["test_elbo_min"], r["test_elbo_max"]) for r in summary})
    write_json(args.out or os.path.join(RESULTS, f"guides_{args.model}.json"),
               {"model": args.model, "epochs": args.epochs, "seeds": args.seeds, "train_args": shared, "rows": rows,
                "summary": summary, "refit_epochs": args.refit_epochs, "refit_lr": args.refit_lr, "refit_samples": args.refit_samples, "refits": refits, "figure": figure, **machine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
