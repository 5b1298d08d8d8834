#!/usr/bin/env python
"""The floors a sequence model of piano rolls must beat: models without dynamics, scored per time step.

    OMP_NUM_THREADS=1 python benchmarks/frame_floors.py --data jsb --data-dir ../shared/data/polyphonic --epochs 50

* **key frequency**: every key an independent Bernoulli with its training frequency (the best frame-wise
  model without latent structure); exact test NLL per step.
* **frame-wise VAE**: the library's MLP VAE (``vae``) trained on the frames of the training sequences as
  images ``(1, 1, 88)``, one frame at a time: a latent-variable model of a frame with no dynamics. Its test
  NLL per step is the importance-sampled log-likelihood of every test frame (``inference.evaluation.likelihood``, the
  guide as proposal), with the negative ELBO beside it; trained ``--epochs`` epochs (the validation
  frames' best negative ELBO over the epochs is reported beside it, to show it did not overfit).

Writes ``benchmarks/results/frame_floors_DATA.json`` and prints one table row per floor.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

from common import RESULTS, machine_info, write_json

from inference.runs.experiment import RunSpec, load_run, train
from inference.evaluation.likelihood import LikelihoodOptions, split_likelihood
from inference.trainer import TrainConfig
from pyro_models.datasets import ImageData
from pyro_models.datasets.configs import SequenceDataConfig
from pyro_models.datasets.polyphonic import POLYPHONIC_DATASETS
from pyro_models.vae import VAEConfig


def frames(data, split: str) -> torch.Tensor:
    """The frames inside the sequences of ``split``, as images ``(frames, 1, 1, keys)``."""
    held = data.frames_held(split)
    x = getattr(data, split)
    return (x.flatten(0, 1) if held is None else x[held]).reshape(-1, 1, 1, x.shape[-1])


def key_frequency_nll(train: torch.Tensor, test: torch.Tensor) -> float:
    """Test NLL per frame (nats) of independent Bernoulli keys at their training frequencies (clamped to
    one count in the training frames, so that an unseen key is not infinitely surprising)."""
    eps = 1.0 / train.shape[0]
    p = train.mean(0).clamp(eps, 1 - eps)
    log_lik = test * p.log() + (1 - test) * (1 - p).log()
    return float(-log_lik.sum() / test.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=POLYPHONIC_DATASETS, default="jsb")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--z-dim", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("-k", type=int, default=500, help="importance samples per test frame")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    data = SequenceDataConfig(data=args.data, data_dir=args.data_dir).load()
    train_frames, valid_frames, test_frames = (frames(data, s) for s in ("train", "valid", "test"))
    rows = [{"floor": "key frequency (independent Bernoulli keys)", "nll_per_step": key_frequency_nll(
        train_frames.flatten(1), test_frames.flatten(1)), "exact": True}]
    config = VAEConfig(z_dim=args.z_dim, hidden_dims=(args.hidden, args.hidden))
    spec = RunSpec("vae", config, TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, seed=args.seed,
                                              progress=False, eval_every=5))
    with tempfile.TemporaryDirectory() as folder:
        run_dir = os.path.join(folder, "vae")
        metrics = train(spec, run_dir, data=ImageData(train_frames, valid_frames, f"{args.data}-frames"))
        best = max((m for m in metrics if "test_elbo" in m), key=lambda m: m["test_elbo"])  # "test" = validation frames here
        run = load_run(run_dir, data=ImageData(train_frames, test_frames, f"{args.data}-frames"))
    result = split_likelihood(run.model, run.guide, (test_frames,), LikelihoodOptions(k=args.k, batch_size=500),
                              progress=False)
    rows.append({"floor": f"frame-wise VAE (z {args.z_dim}, MLP {args.hidden}x2, {args.epochs} epochs)",
                 "nll_per_step": -result["log_lik_per_example"], "nll_per_step_stderr": result["log_lik_stderr"] / test_frames.shape[0],
                 "neg_elbo_per_step": -result["elbo_per_example"], "k": args.k, "valid_neg_elbo_best": -best["test_elbo"], "valid_best_epoch": best["epoch"],
                 "valid_neg_elbo_last": -metrics[-1]["test_elbo"]})
    for row in rows:
        print(f"{row['floor']}: test NLL {row['nll_per_step']:.3f} nats per step"
              + (f" (negative ELBO {row['neg_elbo_per_step']:.3f})" if "neg_elbo_per_step" in row else ""))
    write_json(args.out or os.path.join(RESULTS, f"frame_floors_{args.data}.json"),
               {"data": args.data, "test_frames": int(test_frames.shape[0]), "rows": rows, "machine": machine_info()})


if __name__ == "__main__":
    main()
