#!/usr/bin/env python
"""Which HRSSM recipe puts its boundaries at events rather than at bounces: recipe variants x seeds on the
colour-changing balls whose colours change apart from the wall hits (``color-balls-random``), one table.

Every cell is the documented command with the variant's flags added, then the boundary evaluation::

    python scripts/train.py hrssm --preset color-balls --data color-balls-random --seed S --out RUNS/VARIANT-sS FLAGS...
    python scripts/evaluate.py boundaries --run RUNS/VARIANT-sS --num-test 400

A cell whose run folder already holds a finished evaluation is read, not recomputed; an unfinished run
continues from its checkpoint (``train.py`` continues a folder that holds the same run). Prints, per
variant and seed, the boundary F1 against the colour changes and against the wall hits, each beside
what random boundaries with the same count give, and the segments per sequence on the data and on its
control (no colour change), and writes them as JSON. One thread per job; ``--jobs 2`` runs two cells
side by side.

    python benchmarks/hrssm_events.py --variants default no-observation-colour --seeds 0 1 2 3 4 [--jobs 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

from common import RESULTS, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ("--preset", "color-balls", "--data", "color-balls-random")
NUM_TEST = 400  # held-out sequences scored per cell (the documented evaluation)
# name -> (flags added to BASE, what the variant changes)
VARIANTS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "default": ((), "the color-balls preset as documented"),
    "observation-width-128": (("--observation-belief-size", "128"), "the observation level 4x wider (h_t 128)"),
    "beta-s-1.5": (("--kl-weight-observation", "1.5"), "the s-KL weighted 1.5 in training"),
    "observation-width-128-z-kl-0.25": (("--observation-belief-size", "128", "--kl-weight-abstract", "0.25"),
                                        "the observation level 4x wider, and a new abstract state priced at a "
                                        "quarter of its KL in training (half by default): more boundaries where "
                                        "s_t would take in a colour change"),
    "observation-width-128-no-copy-steps": (("--observation-belief-size", "128", "--copy-step-every", "0"),
                                            "the observation level 4x wider, without copy steps (they teach s_t to "
                                            "take in colour changes; a wide level predicts the bounces without them)"),
    "observation-width-256-no-copy-steps": (("--observation-belief-size", "256", "--copy-step-every", "0"),
                                            "the observation level 8x wider, without copy steps"),
    "no-observation-colour-width-128-no-copy-steps": (("--no-observation-colour", "--observation-belief-size", "128",
                                                       "--copy-step-every", "0"),
                                                      "colours through z only, the observation level 4x wider, "
                                                      "without copy steps (a copy step holds z, so it cannot show a "
                                                      "colour change at all)"),
    "observation-width-128-beta-s-1.5": (("--observation-belief-size", "128", "--kl-weight-observation", "1.5"),
                                         "the observation level 4x wider, and s_t's taking in a colour change made "
                                         "dearer (its KL weighted 1.5 in training) than a new segment"),
    "no-observation-colour": (("--no-observation-colour",),
                              "q(S | Z, M, X) reads the frames' channel maximum: colours reach the frames through z only"),
    "no-observation-colour-width-128": (("--no-observation-colour", "--observation-belief-size", "128"),
                                        "both of the above"),
    "no-observation-colour-z-kl-1": (("--no-observation-colour", "--kl-weight-abstract", "1"),
                                     "colours through z only, and a new abstract state priced at its full KL in "
                                     "training (the default halves it), so a boundary costs more where z need not change"),
    "no-observation-colour-width-128-z-kl-1": (("--no-observation-colour", "--observation-belief-size", "128",
                                                "--kl-weight-abstract", "1"),
                                               "colours through z only, the observation level 4x wider, the z-KL at "
                                               "its full weight"),
    "no-observation-colour-no-reset-z-kl-1": (("--no-observation-colour", "--no-observation-reset", "--kl-weight-abstract", "1"),
                                              "colours through z only; a boundary re-draws z and nothing else (the "
                                              "observation level runs on across it), at z's full KL: a new segment "
                                              "pays only where a new z is needed"),
}
CUES = ("colour_changes", "wall_hits")


def cell_dir(runs: str, variant: str, seed: int) -> str:
    return os.path.join(runs, f"{variant}-s{seed}")


def commands(runs: str, variant: str, seed: int, extra: Tuple[str, ...] = (), num_test: int = NUM_TEST) -> List[List[str]]:
    """The two commands of a cell: train (or continue; ``extra`` flags last), then evaluate the boundaries."""
    out = cell_dir(runs, variant, seed)
    train = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "hrssm", *BASE, "--seed", str(seed),
             "--no-progress", "--out", out, *VARIANTS[variant][0], *extra]
    evaluate = [sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), "boundaries", "--run", out,
                "--num-test", str(num_test)]
    return [train, evaluate]


def run_cell(runs: str, variant: str, seed: int, extra: Tuple[str, ...] = (), num_test: int = NUM_TEST) -> Optional[dict]:
    """The cell's scores, computing what is missing; None when a command failed (its log says why)."""
    out = cell_dir(runs, variant, seed)
    scores = os.path.join(out, "boundaries.json")
    if not os.path.isfile(scores):
        os.makedirs(runs, exist_ok=True)
        with open(out + ".log", "a") as log:
            for command in commands(runs, variant, seed, extra, num_test):
                log.write("$ " + " ".join(command) + "\n")
                log.flush()
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode != 0:
                    print(f"{variant} seed {seed}: failed, see {out}.log")
                    return None
    with open(scores) as f:
        return summary(json.load(f))


def summary(result: dict) -> dict:
    """The numbers of the table from an ``evaluate.py boundaries`` result."""
    row = {"segments": result["mean_segments"], "control_segments": result["control"]["mean_segments"]}
    for cue in CUES:
        row[f"f1_{cue}"] = result["cues"][cue]["f1"]
        row[f"random_f1_{cue}"] = result["cues"][cue]["random_f1"]
        row[f"share_{cue}"] = result["cues"][cue]["share"]
    return row


def table(rows: Dict[str, Dict[int, dict]]) -> str:
    lines = ["| variant | seed | F1 colour changes (random) | F1 wall hits (random) | segments | control segments |",
             "| --- | --- | --- | --- | --- | --- |"]
    for variant, seeds in rows.items():
        for seed, r in sorted(seeds.items()):
            lines.append(f"| {variant} | {seed} | {r['f1_colour_changes']:.3f} ({r['random_f1_colour_changes']:.3f}) | "
                         f"{r['f1_wall_hits']:.3f} ({r['random_f1_wall_hits']:.3f}) | {r['segments']:.2f} | "
                         f"{r['control_segments']:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["default"], choices=tuple(VARIANTS),
                   help="; ".join(f"{k}: {v[1]}" for k, v in VARIANTS.items()) + " (default: default)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="data and training seeds (default: 0)")
    p.add_argument("--jobs", type=int, default=1, help="cells run side by side, one thread each (default: 1)")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "hrssm-events"), help="where the cells' runs go")
    p.add_argument("--out", default=os.path.join(RESULTS, "hrssm_events.json"))
    p.add_argument("--num-test", type=int, default=NUM_TEST, help=f"held-out sequences scored (default: {NUM_TEST})")
    p.add_argument("--extra", default="", help="flags added to every training command, e.g. \"--epochs 60\" "
                   "(a table is one budget: say it beside the numbers)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cells = [(v, s) for v in args.variants for s in args.seeds]
    extra = tuple(args.extra.split())
    if args.dry_run:
        for variant, seed in cells:
            for command in commands(args.runs, variant, seed, extra, args.num_test):
                print(" ".join(command))
        return {}
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda cell: run_cell(args.runs, *cell, extra, args.num_test), cells))
    rows: Dict[str, Dict[int, dict]] = {}
    for (variant, seed), row in zip(cells, results):
        if row is not None:
            rows.setdefault(variant, {})[seed] = row
    print(table(rows))
    write_json(args.out, {"base": list(BASE), "extra": list(extra), "num_test": args.num_test,
                          "variants": {v: {"flags": list(VARIANTS[v][0]), "rows": rows.get(v, {})} for v in args.variants}})
    return rows


if __name__ == "__main__":
    main()
