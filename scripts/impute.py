#!/usr/bin/env python
"""Missing-frame imputation with a trained Kalman VAE (the paper's Figure 3 protocol).

    python scripts/impute.py --run runs/kvae --mask random          # drop probability 0.1 ... 1.0
    python scripts/impute.py --run runs/kvae --mask consecutive     # k = 1, 3, ..., 15 missing frames

The first 4 frames are always observed. For every setting it prints and writes (RUN/imputation_MASK.json)
the fraction of wrongly predicted pixels over the missing frames for smoothing and filtering, next to
the trivial floors (the training set's majority frame, i.e. the walls only; the last observed frame),
and draws the error curves and image strips (truth / observed / smoothed / filtered / a posterior
predictive draw) into RUN/figures/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from inference import plots  # noqa: E402
from inference.kvae_experiment import load_kvae_run  # noqa: E402
from inference.kvae_impute import (  # noqa: E402
    consecutive_frame_mask,
    hamming_error,
    kalman_impute,
    last_observed_floor,
    posterior_predictive,
    random_frame_mask,
    static_floor,
)

DROP_PROBS = [round(0.1 * i, 1) for i in range(1, 11)]
NUM_GIVEN = 4


def settings(kind: str, num_steps: int):
    if kind == "random":
        return DROP_PROBS
    return list(range(1, num_steps - NUM_GIVEN + 1, 2))


def make_mask(kind: str, value, batch: int, num_steps: int, seed: int) -> torch.Tensor:
    if kind == "random":
        return random_frame_mask(batch, num_steps, value, NUM_GIVEN, torch.Generator().manual_seed(seed))
    return consecutive_frame_mask(batch, num_steps, value, NUM_GIVEN)


def evaluate(model, guide, data, kind: str, batch_size: int, seed: int):
    """Errors per setting: smoothing, filtering and the two floors."""
    test = data.test
    walls = static_floor(data.train, test)  # the training set's majority frame, computed once (an expanded view)
    rows = []
    for value in settings(kind, test.shape[1]):
        totals = {"smoothing": [], "filtering": [], "floor_walls_only": [], "floor_last_observed": []}
        mask = make_mask(kind, value, test.shape[0], test.shape[1], seed)
        for start in range(0, test.shape[0], batch_size):
            x, m = test[start : start + batch_size], mask[start : start + batch_size]
            result = kalman_impute(model, guide, x, m)
            weight = int((~m).sum())  # average over missing frames, not batches
            totals["smoothing"].append((hamming_error(x, result.smoothed, m), weight))
            totals["filtering"].append((hamming_error(x, result.filtered, m), weight))
            totals["floor_walls_only"].append((hamming_error(x, walls[start : start + batch_size], m), weight))
            totals["floor_last_observed"].append((hamming_error(x, last_observed_floor(x, m), m), weight))
        row = {"setting": value}
        for name, parts in totals.items():
            parts = [(e, w) for e, w in parts if w > 0]
            row[name] = sum(e * w for e, w in parts) / max(1, sum(w for _, w in parts))
        rows.append(row)
        print(f"{kind} {value}: smoothing {row['smoothing']:.4f}, filtering {row['filtering']:.4f}, "
              f"walls only {row['floor_walls_only']:.4f}, last observed {row['floor_last_observed']:.4f}")
    return rows


def figures(run: str, model, guide, data, kind: str, rows, seed: int) -> None:
    xs = [r["setting"] for r in rows]
    series = {k: [r[k] for r in rows] for k in ("smoothing", "filtering", "floor_walls_only", "floor_last_observed")}
    label = "drop probability" if kind == "random" else "consecutive missing frames k"
    plots.error_curves(xs, series, os.path.join(run, "figures", f"imputation_{kind}.png"), label,
                       f"KVAE imputation, {kind} masks (cf. paper's Fig. 3)")
    middle = xs[len(xs) // 2]
    x = data.test[:1]
    mask = make_mask(kind, middle, 1, x.shape[1], seed)
    result = kalman_impute(model, guide, x, mask)
    draw = posterior_predictive(model, result, x, mask, num_samples=1, generator=torch.Generator().manual_seed(seed))[0]
    observed = mask[0].reshape((-1,) + (1,) * (x.dim() - 2)).expand_as(x[0])
    if x.dim() == 5:
        plots.image_rows([x[0], x[0], result.smoothed[0], result.filtered[0], draw[0]],
                         ["truth", "observed", "smoothed", "filtered", "sampled"],
                         os.path.join(run, "figures", f"imputation_{kind}_strip.png"),
                         f"{kind} mask, setting {middle}: missing frames in blue", observed=[None, observed, None, None, None])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a KVAE run directory (scripts/train.py kvae --out RUN)")
    p.add_argument("--mask", choices=("random", "consecutive"), default="random")
    p.add_argument("--data-dir", help="MNIST folder, for runs on mnist-rows")
    p.add_argument("--num-test", type=int, help="use only the first N held-out sequences")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    args = p.parse_args(argv)
    model, guide, data = load_kvae_run(args.run, data_dir=args.data_dir)
    if args.num_test is not None:
        data = data._replace(test=data.test[: args.num_test])
    rows = evaluate(model, guide, data, args.mask, args.batch_size, args.seed)
    figures(args.run, model, guide, data, args.mask, rows, args.seed)
    out = os.path.join(args.run, f"imputation_{args.mask}.json")
    with open(out, "w") as f:
        json.dump({"mask": args.mask, "num_test": int(data.test.shape[0]), "seed": args.seed, "rows": rows}, f, indent=2)
    print(f"wrote {out} and figures in {os.path.join(args.run, 'figures')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
