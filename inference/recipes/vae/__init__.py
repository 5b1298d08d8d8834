"""The recipes of the VAE family (``vae``: MLP, ``conv-vae``: convolutional): data preparation
(binarisation), KL schedules, the per-epoch report, and the imputer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from pyro_models.datasets import ImageData, binarizer
from pyro_models.datasets.configs import ImageDataConfig
from pyro_models.imputation import missing_mse
from pyro_models.modes import eval_mode
from pyro_models.vae import GUIDES, VAEConfig, build_vae
from pyro_models.vae.impute import bottom_half_mask, impute

from ...evaluation import plots
from .analysis import ACTIVE_UNIT_THRESHOLD, decoder_weight_norms, latent_stats
from ..recipe import CommandLine, Context, DataPlan, Preset, Recipe, TrainingPlan
from .schedules import KL_SCHEDULES, FreeBitsConfig, make_kl_schedule
from ...training import Callback, TrainConfig, Trainer


@dataclass
class VAEOptions:
    """Training options of the VAE family."""

    kl_schedule: str = field(default="none", metadata={"choices": KL_SCHEDULES})  # none: the ELBO; linear: KL annealing beta = epoch / epochs; free-bits: soft free bits
    free_bits_target: float = FreeBitsConfig.target  # lambda of soft free bits, nats per latent dimension

    def __post_init__(self):
        if self.kl_schedule not in KL_SCHEDULES:
            raise ValueError(f"kl_schedule: expected one of {KL_SCHEDULES}, got {self.kl_schedule!r}")
        if not self.free_bits_target > 0:
            raise ValueError(f"free_bits_target: expected > 0, got {self.free_bits_target}")


class VAEReport(Callback):
    """Each epoch, on the held-out set: reconstructions, prior samples, bottom-half imputation, KL per
    dimension and decoder weight norms (figures), plus ``active_units``, ``kl_per_dim``,
    ``impute_mse`` and ``impute_baseline_mse`` (metrics; on the first ``impute_images`` held-out images,
    ``num_images``, logged beside them; ``scripts/impute.py`` scores every held-out image).

    ``fill (C, H, W)``: the mean training image, the imputation's starting point and baseline.
    """

    def __init__(self, fill: torch.Tensor, num_images: int = 8, num_samples: int = 32, stats_size: int = 1000):
        self.fill, self.num_images, self.num_samples, self.stats_size = fill, num_images, num_samples, stats_size

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: Trainer, epoch: int) -> Dict[str, Any]:
        model, guide, run = trainer.model, trainer.guide, trainer.run
        test = trainer.test_data[: self.stats_size].to(trainer.device)
        x = test[: self.num_images]
        with eval_mode(model, guide):
            stats = latent_stats(model, guide, test)
            mask = bottom_half_mask(x.shape, device=x.device)
            imputation = impute(model, guide, x, mask, self.num_samples, fill=self.fill.to(x.device))
            if run is not None:
                self._figures(trainer, epoch, x, mask, imputation, stats)
        return {
            "active_units": stats.active_units,
            "kl_per_dim": [round(v, 5) for v in stats.kl_per_dim.tolist()],
            "impute_mse": missing_mse(x, imputation.imputed, mask),
            "impute_baseline_mse": missing_mse(x, imputation.estimates["fill"], mask),
            "impute_images": int(x.shape[0]),
        }

    def _figures(self, trainer, epoch, x, mask, imputation, stats) -> None:
        model, guide, run = trainer.model, trainer.guide, trainer.run
        z_mean = guide.posterior(x).sample((self.num_samples,)).mean(0) if not guide.factorised else guide.posterior(x).mean
        plots.image_rows([x, model.mean_image(z_mean)], ["data", "reconstruction"], run.figure_path("reconstructions", epoch),
                         f"epoch {epoch}: held-out images and the decoder mean at E_q[z|x]")
        z = model.prior(2 * self.num_images, x).sample()
        plots.image_grid(model.mean_image(z), run.figure_path("samples", epoch), self.num_images, f"epoch {epoch}: samples, decoder mean of z ~ p(z)")
        error, baseline = missing_mse(x, imputation.imputed, mask), missing_mse(x, imputation.estimates["fill"], mask)
        plots.image_rows([x, x, imputation.imputed], ["truth", "observed", "imputed"], run.figure_path("imputation", epoch),
                         f"epoch {epoch}: bottom half imputed (missing pixels in blue), MSE on the missing pixels of "
                         f"these {x.shape[0]} images {error:.4f}; mean-image fill {baseline:.4f}",
                         observed=[None, mask, None])
        kind = "exact" if guide.factorised else "Gaussian moment-matched"
        plots.bars(stats.kl_per_dim, run.figure_path("kl_per_dim", epoch),
                   f"epoch {epoch}: KL per dimension ({kind})\n{stats.active_units} active units "
                   f"(Cov_x E[z|x] > {ACTIVE_UNIT_THRESHOLD})", "latent dimension", "KL (nats)")
        plots.bars(decoder_weight_norms(model.decoder.input_layer), run.figure_path("decoder_weight_norms", epoch),
                   f"epoch {epoch}: column norms of the decoder's first layer", "latent dimension", "L2 norm")


def prepare_images(data: ImageData, data_config: Optional[ImageDataConfig], seed: int) -> ImageData:
    """Static binarisation of both splits; for ``dynamic``, one fixed draw of the held-out split (the
    training split is redrawn every batch by the trainer)."""
    mode = data_config.binarize if data_config is not None else "none"
    transform = binarizer(mode)
    if mode == "static":
        return ImageData(transform(data.train), transform(data.test), data.name)
    if mode == "dynamic":
        return ImageData(data.train, transform(data.test, torch.Generator().manual_seed(seed)), data.name)
    return data


def _callbacks(context: Context) -> List[Callback]:
    callbacks: List[Callback] = [VAEReport(fill=_impute_defaults(context.data)["fill"])]
    free_bits = FreeBitsConfig(target=context.options.free_bits_target)
    schedule = make_kl_schedule(context.options.kl_schedule, context.model.kl_weights, context.train.epochs, free_bits)
    return ([schedule] if schedule is not None else []) + callbacks


def _batch_transform(context: Context):
    dynamic = context.data_config is not None and context.data_config.binarize == "dynamic"
    return binarizer("dynamic") if dynamic else None


def _validate(config: VAEConfig, options: VAEOptions) -> None:
    if options.kl_schedule == "free-bits" and config.guide != "normal":
        raise ValueError(f"kl_schedule, guide: 'free-bits' needs the factorised guide 'normal' (per-dimension KL "
                         f"weights are undefined for flows), got guide {config.guide!r}")


def _jit_refusal(config: VAEConfig, options: VAEOptions, train: TrainConfig) -> Optional[str]:
    if options.kl_schedule != "none":
        return f"a compiled ELBO freezes the KL weights read while tracing; use kl_schedule 'none' (got {options.kl_schedule!r})"
    return None


def _example():
    return VAEConfig(z_dim=3, hidden_dims=(16,), channels=(4, 8), num_flows=1, flow_hidden_dims=(8,)), (1, 12, 12)


PRESETS = {  # the runs behind docs/benchmarks.md's numbers (MNIST: add --data-dir and --out)
    "vae": {"mnist": Preset(("--data", "mnist", "--epochs", "10", "--seed", "0"),
                            "held-out ELBO -131.19 nats per image after 10 epochs (seeds 0-2: -130.97 +- 0.90), against "
                            "-131.57 for a hand-written PyTorch VAE"),
            "mnist-iaf": Preset(("--data", "mnist", "--epochs", "10", "--guide", "iaf", "--seed", "0"),
                                "held-out ELBO -130.65 nats per image after 10 epochs (seeds 0-2: -129.97 +- 0.81)")},
    "conv-vae": {},
}


def _recipe(name: str, summary: str) -> Recipe:
    return Recipe(
        name=name, summary=summary, config=VAEConfig, build=lambda shape, config: build_vae(shape, config, name),
        data=DataPlan(ImageDataConfig(), kind="images", prepare=prepare_images),
        training=TrainingPlan(TrainConfig(), callbacks=_callbacks, jit_refusal=_jit_refusal, batch_transform=_batch_transform),
        cli=CommandLine(unused_fields=("channels",) if name == "vae" else ("hidden_dims",), presets=PRESETS[name]),
        guides=GUIDES, options=VAEOptions, validate=_validate, impute=impute, impute_defaults=_impute_defaults,
        example=_example, width_fields=("hidden_dims",) if name == "vae" else ("channels",),
    )


def _impute_defaults(data) -> Dict[str, Any]:
    """Missing pixels start at the mean training image (the floor a user would compute), not at a grey
    guess from the batch's observed pixels, which leaves a region no image observes (a bottom half) at 0.5."""
    return {"fill": data.train.mean(0)}


RECIPES = (
    _recipe("vae", "MLP VAE (Kingma & Welling 2014) on images"),
    _recipe("conv-vae", "convolutional VAE on images"),
)
