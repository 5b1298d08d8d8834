"""The deep Markov model recipe (Krishnan, Shalit, Sontag 2017): KL annealing with a minimum factor,
global gradient-norm clipping, a per-epoch imputation report, and the imputer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from pyro_models.datasets.configs import SequenceDataConfig
from pyro_models.datasets.polyphonic import random_transposer
from pyro_models.dmm import GUIDES, DMMConfig, build_dmm, impute
from pyro_models.imputation import expand_mask, missing_mse

from ...evaluation import plots
from ..recipe import CommandLine, Context, DataPlan, Preset, Recipe, TrainingPlan, frames_per_sequence, report_mask, sequence_builder
from ...runs.rundir import metric_or_none
from ...training.schedules import LinearKLAnnealing
from ...training import Callback, TrainConfig, Trainer

# Adam with a global gradient-norm clip of 10 on the loss per frame, as Pyro's DMM example clips.
# scripts/impute.py's draws per example: the DMM's estimate is the mean of E[x_t | z_t] over draws of z (with
# one draw its forecast of JSB chorales lost to the key frequencies; with 32 it beats them, docs/benchmarks.md)
IMPUTE_SAMPLES = 32
DMM_TRAIN_DEFAULTS = TrainConfig(epochs=20, batch_size=20, lr=8e-4, clip_norm=10.0, mean_loss=True)


@dataclass
class DMMOptions:
    """Training options of the DMM beyond the optimiser."""

    kl_annealing_epochs: int = 0  # anneal the KL weight linearly over this many epochs (0: off)
    min_kl_weight: float = 0.2  # the KL weight at the start of the annealing (Krishnan et al.'s minimum factor)
    report_drop_prob: float = 0.5  # each epoch, the imputation error with frames dropped with this probability
    # piano rolls, training only: each training sequence moved by a uniform draw of -k..k semitones every
    # time it is drawn (data augmentation; held-out data and the training ELBO reported are untransposed)
    transpose_semitones: int = 0

    def __post_init__(self):
        for name in ("kl_annealing_epochs", "transpose_semitones"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        for name in ("min_kl_weight", "report_drop_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected in [0, 1], got {getattr(self, name)}")


class DMMReport(Callback):
    """Each epoch, on the first held-out sequences: the mean squared error of the posterior-predictive
    imputation of frames dropped with ``drop_prob`` (``impute_mse``) and, for image frames, a strip of
    truth / observed / imputed frames (figure)."""

    def __init__(self, drop_prob: float, num_sequences: int = 64, num_samples: int = 4, seed: int = 0):
        self.drop_prob, self.num_sequences, self.num_samples, self.seed = drop_prob, num_sequences, num_samples, seed

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: Trainer, epoch: int) -> Dict[str, Any]:
        x, known, mask, generator = report_mask(trainer, self.num_sequences, self.drop_prob, self.seed)
        lengths = trainer.test_lengths
        lengths = lengths[: x.shape[0]].to(x.device) if lengths is not None else None
        result = impute(trainer.model, trainer.guide, x, mask, num_samples=self.num_samples, generator=generator,
                        lengths=lengths)
        if trainer.run is not None and x.dim() == 5:
            plots.image_rows([x[0], x[0], result.imputed[0]], ["truth", "observed", "imputed"],
                             trainer.run.figure_path("imputation", epoch),
                             f"epoch {epoch}: frames dropped with p = {self.drop_prob} (blue)",
                             observed=[None, expand_mask(mask, x)[0], None])
        return {"impute_mse": metric_or_none(missing_mse(x, result.imputed, mask, known))}


def _callbacks(context: Context) -> List[Callback]:
    options = context.options
    callbacks: List[Callback] = [DMMReport(options.report_drop_prob, seed=context.train.seed)]
    if options.kl_annealing_epochs > 0:
        callbacks.insert(0, LinearKLAnnealing(context.model.kl_weights, options.kl_annealing_epochs, options.min_kl_weight))
    return callbacks


def _batch_transform(context: Context):
    shift = context.options.transpose_semitones
    if shift == 0:
        return None
    frame_shape = tuple(context.data.train.shape[2:])
    if len(frame_shape) != 1:
        raise ValueError(f"transpose_semitones: applies to piano-roll frames (keys,), got frames of shape {frame_shape}")
    return random_transposer(shift)


def _jit_refusal(config: DMMConfig, options: DMMOptions, train: TrainConfig) -> Optional[str]:
    if options.kl_annealing_epochs > 0:
        return "a compiled ELBO freezes the KL weight read while tracing; use kl_annealing_epochs 0"
    return None


def _example():
    config = DMMConfig(z_dim=3, transition_dim=8, emission_hidden=(8,), rnn_dim=8, conv_channels=(4,), flow_hidden=(8,))
    return config, (5, 6)


ST_R_JSB = ("--data", "jsb", "--eval-every", "10", "--lr", "1e-3", "--lr-decay", "0.9", "--lr-decay-every", "150",
            "--kl-annealing-epochs", "200", "--weight-decay", "1.7e-3", "--seed", "0")
PRESETS = {  # the runs behind docs/benchmarks.md's numbers; add --data-dir (the polyphonic folder) and --out
    "jsb-st-r": Preset(ST_R_JSB + ("--epochs", "2000"),
                       "JSB test NLL 6.580 nats per step (importance-sampled, K = 10,000; 6.646 with K = 500; bound 6.938) "
                       "at the best validation epoch, 1510, after 0.81 h on one CPU thread"),
    "jsb-gaps": Preset(ST_R_JSB + ("--epochs", "2380", "--mask-feature", "--guide-frame-dropout", "0.4"),
                       "imputations of missing JSB frames that beat the key frequencies and the last observed frame at "
                       "every drop probability, 0.1 to 1.0 (1.23 h; impute.py averages 32 draws)"),
    "nottingham-st-r": Preset(("--data", "nottingham", "--epochs", "400", "--eval-every", "10", "--lr", "1e-3", "--lr-decay", "0.9",
                               "--lr-decay-every", "50", "--kl-annealing-epochs", "70", "--weight-decay", "1.7e-3",
                               "--rnn-nonlinearity", "tanh", "--seed", "0"),
                              "the Nottingham row of docs/benchmarks.md (about 2 h on one CPU thread)"),
}

RECIPES = (
    Recipe(
        name="dmm", summary="deep Markov model (Krishnan et al. 2017) on sequences", config=DMMConfig, build=sequence_builder(build_dmm),
        data=DataPlan(SequenceDataConfig(data="bouncing-balls"), ragged=True),
        training=TrainingPlan(DMM_TRAIN_DEFAULTS, callbacks=_callbacks, units_per_example=frames_per_sequence,
                              jit_refusal=_jit_refusal, batch_transform=_batch_transform),
        cli=CommandLine(presets=PRESETS), guides=GUIDES, options=DMMOptions,
        impute=impute, impute_defaults=lambda data: {"num_samples": IMPUTE_SAMPLES}, example=_example,
        width_fields=("transition_dim", "emission_hidden", "rnn_dim", "conv_channels"),
    ),
)
