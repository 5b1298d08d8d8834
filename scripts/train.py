#!/usr/bin/env python
"""Train a model of this library with SVI.

    python scripts/train.py vae --data shapes --epochs 5 --out runs/vae-shapes
    python scripts/train.py conv-vae --data mnist --data-dir ../shared/data/mnist --guide iaf --out runs/cvae
    python scripts/train.py vae --data mnist --data-dir ../shared/data/mnist --kl-schedule free-bits --out runs/fb

Writes a run directory (--out): config.json, metrics.jsonl, checkpoint.pt, figures/. --resume continues it.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inference.schedules import KL_SCHEDULES, FreeBitsConfig  # noqa: E402
from inference.trainer import TrainConfig, TrainingDiverged  # noqa: E402
from inference.vae_experiment import train_vae  # noqa: E402
from pyro_models.datasets import BINARIZE_MODES, DATASETS, load_image_data  # noqa: E402
from pyro_models.vae import ARCHITECTURES, GUIDES, VAEConfig  # noqa: E402

MODELS = tuple(ARCHITECTURES)


def int_tuple(text: str):
    return tuple(int(v) for v in text.split(",") if v)


def parse_args(argv=None) -> argparse.Namespace:
    defaults, vae_defaults, fb = TrainConfig(), VAEConfig(), FreeBitsConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=MODELS)
    data = p.add_argument_group("data")
    data.add_argument("--data", choices=DATASETS, default="shapes")
    data.add_argument("--data-dir", help="folder of the MNIST IDX files (torchvision layout or flat)")
    data.add_argument("--data-path", help="an .npz file with an 'images' array (--data npz)")
    data.add_argument("--binarize", choices=BINARIZE_MODES, default="none")
    data.add_argument("--num-shapes", type=int, default=6000, help="size of the generated shapes set")
    data.add_argument("--no-download", action="store_true", help="never try to download MNIST")
    model = p.add_argument_group("model")
    model.add_argument("--guide", choices=GUIDES, default=vae_defaults.guide)
    model.add_argument("--z-dim", type=int, default=vae_defaults.z_dim)
    model.add_argument("--hidden-dims", type=int_tuple, default=vae_defaults.hidden_dims, help="MLP widths, e.g. 512,512")
    model.add_argument("--channels", type=int_tuple, default=vae_defaults.channels, help="conv filters, e.g. 32,64,128")
    model.add_argument("--likelihood", choices=("bernoulli", "gaussian"), default=vae_defaults.likelihood)
    model.add_argument("--num-flows", type=int, default=vae_defaults.num_flows)
    objective = p.add_argument_group("objective")
    objective.add_argument("--elbo", choices=("trace", "meanfield"), default=defaults.elbo)
    objective.add_argument("--num-particles", type=int, default=defaults.num_particles)
    objective.add_argument("--jit", action="store_true")
    objective.add_argument("--kl-schedule", choices=KL_SCHEDULES, default="none")
    objective.add_argument("--free-bits-target", type=float, default=fb.target, help="lambda, nats per dimension")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--lr-decay", type=float, default=defaults.lr_decay)
    train.add_argument("--lr-decay-every", type=int, default=defaults.lr_decay_every)
    train.add_argument("--clip-norm", type=float, default=defaults.clip_norm)
    train.add_argument("--device", default=defaults.device, help="cpu or cuda")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run stored in --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    train_config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay,
        lr_decay_every=args.lr_decay_every, clip_norm=args.clip_norm, elbo=args.elbo,
        num_particles=args.num_particles, jit=args.jit, device=args.device, seed=args.seed,
        progress=not args.no_progress,
    )
    vae_config = VAEConfig(
        z_dim=args.z_dim, hidden_dims=args.hidden_dims, channels=args.channels,
        likelihood=args.likelihood, guide=args.guide, num_flows=args.num_flows,
    )
    data = load_image_data(args.data, args.data_dir, args.data_path, num_shapes=args.num_shapes,
                           seed=args.seed, download=not args.no_download)
    try:
        history = train_vae(args.model, data, vae_config, train_config, args.out, args.kl_schedule,
                            FreeBitsConfig(target=args.free_bits_target), args.binarize, args.resume)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if history:
        last = history[-1]
        print(f"done: epoch {last['epoch']}, test ELBO {last['test_elbo']:.2f} nats/example; run in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
