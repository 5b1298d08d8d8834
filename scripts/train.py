#!/usr/bin/env python
"""Train a model of this library with SVI.

    python scripts/train.py vae --data shapes --epochs 5 --out runs/vae-shapes
    python scripts/train.py conv-vae --data mnist --data-dir ../shared/data/mnist --guide iaf --out runs/cvae
    python scripts/train.py vae --data mnist --data-dir ../shared/data/mnist --kl-schedule free-bits --out runs/fb
    python scripts/train.py kvae --data bouncing-balls --out runs/kvae      # the original recipe's defaults
    python scripts/train.py hrssm --data color-balls --out runs/hrssm       # --no-boundaries: the RSSM

Trainer flags left out take the model family's defaults (VAE: batch 128, Adam 1e-3, 10 epochs; KVAE:
the original recipe, batch 32, Adam 0.007 x0.85 every 20 epochs, clip 150, 80 epochs).

Writes a run directory (--out): config.json, metrics.jsonl, checkpoint.pt, figures/. --resume continues it.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataclasses import fields, replace  # noqa: E402

from inference.hrssm_experiment import HRSSM_TRAIN_DEFAULTS, train_hrssm  # noqa: E402
from inference.kvae_experiment import KVAE_TRAIN_DEFAULTS, LSTM_FROZEN_EPOCHS, train_kvae  # noqa: E402
from inference.kvae_warmstart import WarmStartConfig, warm_start_for  # noqa: E402
from inference.schedules import KL_SCHEDULES, FreeBitsConfig  # noqa: E402
from inference.trainer import TrainConfig, TrainingDiverged  # noqa: E402
from inference.vae_experiment import train_vae  # noqa: E402
from pyro_models.datasets import BINARIZE_MODES, DATASETS, SEQUENCE_DATASETS, load_image_data, load_sequence_data  # noqa: E402
from pyro_models.hrssm import HRSSMConfig  # noqa: E402
from pyro_models.kvae import KVAEConfig  # noqa: E402
from pyro_models.vae import ARCHITECTURES, GUIDES, VAEConfig  # noqa: E402

MODELS = (*ARCHITECTURES, "kvae", "hrssm")
DATA_CHOICES = {**{m: DATASETS for m in ARCHITECTURES}, "kvae": SEQUENCE_DATASETS, "hrssm": SEQUENCE_DATASETS}
TRAIN_DEFAULTS = {**{m: TrainConfig() for m in ARCHITECTURES}, "kvae": KVAE_TRAIN_DEFAULTS, "hrssm": HRSSM_TRAIN_DEFAULTS}
DEFAULT_SEQUENCES = {"kvae": "bouncing-balls", "hrssm": "color-balls"}


def int_tuple(text: str):
    return tuple(int(v) for v in text.split(",") if v)


def parse_args(argv=None) -> argparse.Namespace:
    vae_defaults, kvae_defaults, hrssm_defaults, fb = VAEConfig(), KVAEConfig(), HRSSMConfig(), FreeBitsConfig()
    warm_defaults = WarmStartConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=MODELS)
    data = p.add_argument_group("data")
    data.add_argument("--data", choices=sorted(set(DATASETS) | set(SEQUENCE_DATASETS)),
                      help="vae, conv-vae: mnist|shapes|npz (default shapes); kvae: " + "|".join(SEQUENCE_DATASETS) + " (default bouncing-balls)")
    data.add_argument("--data-dir", help="folder of the MNIST IDX files (torchvision layout or flat)")
    data.add_argument("--data-path", help="an .npz file with an 'images' array (--data npz)")
    data.add_argument("--binarize", choices=BINARIZE_MODES, default="none")
    data.add_argument("--num-shapes", type=int, default=6000, help="size of the generated shapes set")
    data.add_argument("--num-sequences", type=int, default=5000, help="kvae, hrssm: generated training sequences (1/5 as many held out)")
    data.add_argument("--num-steps", type=int, default=20, help="kvae, hrssm: frames per generated sequence")
    data.add_argument("--cache-dir", default="data/cache", help="where generated sequence sets are cached")
    data.add_argument("--no-download", action="store_true", help="never try to download MNIST")
    model = p.add_argument_group("model")
    model.add_argument("--guide", choices=GUIDES, default=vae_defaults.guide)
    model.add_argument("--z-dim", type=int, default=vae_defaults.z_dim)
    model.add_argument("--hidden-dims", type=int_tuple, default=vae_defaults.hidden_dims, help="MLP widths, e.g. 512,512")
    model.add_argument("--channels", type=int_tuple, default=vae_defaults.channels, help="conv filters, e.g. 32,64,128")
    model.add_argument("--likelihood", choices=("bernoulli", "gaussian"), default=vae_defaults.likelihood)
    model.add_argument("--num-flows", type=int, default=vae_defaults.num_flows)
    model.add_argument("--a-dim", type=int, default=kvae_defaults.a_dim, help="kvae")
    model.add_argument("--kvae-z-dim", type=int, default=kvae_defaults.z_dim, help="kvae: LGSSM state size")
    model.add_argument("--num-bases", type=int, default=kvae_defaults.num_bases, help="kvae: K")
    model.add_argument("--decoder-channels", type=int, default=kvae_defaults.decoder_channels, help="kvae: sub-pixel block width")
    model.add_argument("--recon-weight", type=float, default=kvae_defaults.recon_weight, help="kvae: training weight of log p(x|a)")
    model.add_argument("--lstm-frozen-epochs", type=int, default=LSTM_FROZEN_EPOCHS, help="kvae")
    model.add_argument("--kl-warmup-epochs", type=int, default=0, help="kvae: scale the KL by min(1, epoch / N) (0: off, the recipe)")
    model.add_argument("--warm-start-steps", type=int, default=warm_defaults.autoencoder_steps,
                       help="kvae: autoencoder steps of the warm start against collapse (0: no warm start, the original recipe)")
    model.add_argument("--dynamics-fit-steps", type=int, default=warm_defaults.dynamics_steps,
                       help="kvae: warm start, steps fitting the LGSSM to the codes")
    model.add_argument("--no-boundaries", action="store_true", help="hrssm: every step UPDATE (the RSSM baseline)")
    model.add_argument("--belief-size", type=int, default=hrssm_defaults.abstract_belief_size, help="hrssm: c_t, h_t and feature widths")
    model.add_argument("--state-size", type=int, default=hrssm_defaults.abstract_state_size, help="hrssm: z_t and s_t sizes")
    model.add_argument("--conv-channels", type=int, default=hrssm_defaults.conv_channels, help="hrssm: frame encoder/decoder width")
    model.add_argument("--max-segments", type=int, default=hrssm_defaults.max_segments, help="hrssm: N_max")
    model.add_argument("--max-length", type=int, default=hrssm_defaults.max_length, help="hrssm: l_max")
    model.add_argument("--temperature-decay-steps", type=float, default=hrssm_defaults.temperature_decay_steps,
                       help=f"hrssm: the boundary temperature is multiplied by {hrssm_defaults.temperature_decay} every this many steps")
    model.add_argument("--update-kl-gradient", type=float, default=hrssm_defaults.update_kl_gradient,
                       help="hrssm: weight in [0, 1] of the z-KL gradient of an UPDATE reaching q(M|X) through the "
                            "straight-through gate (0: detached, official)")
    objective = p.add_argument_group("objective")
    objective.add_argument("--elbo", choices=("trace", "meanfield"))
    objective.add_argument("--num-particles", type=int)
    objective.add_argument("--jit", action="store_true")
    objective.add_argument("--kl-schedule", choices=KL_SCHEDULES, default="none")
    objective.add_argument("--free-bits-target", type=float, default=fb.target, help="lambda, nats per dimension")
    train = p.add_argument_group("training (unset: the model family's defaults)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--lr-decay", type=float)
    train.add_argument("--lr-decay-every", type=int)
    train.add_argument("--clip-norm", type=float)
    train.add_argument("--device", help="cpu or cuda")
    train.add_argument("--seed", type=int)
    train.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run stored in --out")
    return p.parse_args(argv)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The model family's defaults, overridden by every trainer flag given."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    given.update(progress=not args.no_progress, jit=args.jit)
    return replace(TRAIN_DEFAULTS[args.model], **given)


def run_vae(args: argparse.Namespace, config: TrainConfig):
    vae_config = VAEConfig(
        z_dim=args.z_dim, hidden_dims=args.hidden_dims, channels=args.channels,
        likelihood=args.likelihood, guide=args.guide, num_flows=args.num_flows,
    )
    data = load_image_data(args.data or "shapes", args.data_dir, args.data_path, num_shapes=args.num_shapes,
                           seed=config.seed, download=not args.no_download)
    return train_vae(args.model, data, vae_config, config, args.out, args.kl_schedule,
                     FreeBitsConfig(target=args.free_bits_target), args.binarize, args.resume)


def sequence_data(args: argparse.Namespace):
    """The sequence data set of the flags, and the arguments that rebuild it (stored in config.json)."""
    data_args = dict(name=args.data or DEFAULT_SEQUENCES[args.model], data_dir=args.data_dir, data_path=args.data_path,
                     num_train=args.num_sequences, num_test=max(1, args.num_sequences // 5), num_steps=args.num_steps,
                     cache_dir=args.cache_dir, download=not args.no_download)
    return load_sequence_data(**data_args), data_args


def run_hrssm(args: argparse.Namespace, config: TrainConfig):
    hrssm_config = HRSSMConfig(
        abstract_belief_size=args.belief_size, observation_belief_size=args.belief_size, feature_size=args.belief_size,
        abstract_state_size=args.state_size, observation_state_size=args.state_size, conv_channels=args.conv_channels,
        max_segments=args.max_segments, max_length=args.max_length, boundaries=not args.no_boundaries,
        temperature_decay_steps=args.temperature_decay_steps,
        update_kl_gradient=args.update_kl_gradient,
    )
    data, data_args = sequence_data(args)
    return train_hrssm(data, hrssm_config, config, args.out, args.resume, {"data_args": data_args})


def run_kvae(args: argparse.Namespace, config: TrainConfig):
    kvae_config = KVAEConfig(a_dim=args.a_dim, z_dim=args.kvae_z_dim, num_bases=args.num_bases,
                             decoder_channels=args.decoder_channels, recon_weight=args.recon_weight)
    data, data_args = sequence_data(args)
    return train_kvae(data, kvae_config, config, args.out, args.lstm_frozen_epochs, args.resume, {"data_args": data_args},
                      kl_warmup_epochs=args.kl_warmup_epochs, warm=warm_start_for(config, args.warm_start_steps, args.dynamics_fit_steps))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.data is not None and args.data not in DATA_CHOICES[args.model]:
        print(f"error: --data {args.data} is not available for {args.model}; choose one of {DATA_CHOICES[args.model]}", file=sys.stderr)
        return 2
    config = train_config(args)
    try:
        history = {"kvae": run_kvae, "hrssm": run_hrssm}.get(args.model, run_vae)(args, config)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if history:
        last = history[-1]
        print(f"done: epoch {last['epoch']}, test ELBO {last['test_elbo']:.2f} nats/example; run in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
