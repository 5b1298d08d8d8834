"""Callbacks that report on a VAE-family model each epoch: figures and latent diagnostics."""
from __future__ import annotations

from typing import Any, Dict

import torch

from . import plots
from .analysis import ACTIVE_UNIT_THRESHOLD, decoder_weight_norms, latent_stats
from .impute import bottom_half_mask, impute_images
from .trainer import Callback, Trainer


class VAEReport(Callback):
    """Each epoch, on the held-out set: reconstructions, prior samples, bottom-half imputation, KL per
    dimension and decoder weight norms (figures), plus ``active_units``, ``kl_per_dim``,
    ``impute_mse`` and ``impute_baseline_mse`` (metrics).

    ``fill (C, H, W)``: the mean training image, the imputation's starting point and baseline.
    """

    def __init__(self, fill: torch.Tensor, num_images: int = 8, num_samples: int = 32, stats_size: int = 1000):
        self.fill, self.num_images, self.num_samples, self.stats_size = fill, num_images, num_samples, stats_size

    @torch.no_grad()
    def on_epoch_end(self, trainer: Trainer, epoch: int) -> Dict[str, Any]:
        model, guide, run = trainer.model, trainer.guide, trainer.run
        test = trainer.test_data[: self.stats_size].to(trainer.device)
        x = test[: self.num_images]
        model.eval(), guide.eval()
        stats = latent_stats(model, guide, test)
        mask = bottom_half_mask(x.shape, device=x.device)
        imputation = impute_images(model, guide, x, mask, self.fill.to(x.device), self.num_samples)
        if run is not None:
            self._figures(trainer, epoch, x, mask, imputation, stats)
        model.train(), guide.train()
        return {
            "active_units": stats.active_units,
            "kl_per_dim": [round(v, 5) for v in stats.kl_per_dim.tolist()],
            "impute_mse": imputation.error,
            "impute_baseline_mse": imputation.baseline_error,
        }

    def _figures(self, trainer, epoch, x, mask, imputation, stats) -> None:
        model, guide, run = trainer.model, trainer.guide, trainer.run
        z_mean = guide.posterior(x).sample((self.num_samples,)).mean(0) if not guide.factorised else guide.posterior(x).mean
        plots.image_rows([x, model.mean_image(z_mean)], ["data", "reconstruction"], run.figure_path("reconstructions", epoch),
                         f"epoch {epoch}: held-out images and the decoder mean at E_q[z|x]")
        z = model.prior(2 * self.num_images, x).sample()
        plots.image_grid(model.mean_image(z), run.figure_path("samples", epoch), self.num_images, f"epoch {epoch}: samples, decoder mean of z ~ p(z)")
        plots.image_rows([x, x, imputation.imputed], ["truth", "observed", "imputed"], run.figure_path("imputation", epoch),
                         f"epoch {epoch}: bottom half imputed (missing pixels in blue), MSE on missing pixels "
                         f"{imputation.error:.4f}; mean-image fill {imputation.baseline_error:.4f}",
                         observed=[None, mask, None])
        kind = "exact" if guide.factorised else "Gaussian moment-matched"
        plots.bars(stats.kl_per_dim, run.figure_path("kl_per_dim", epoch),
                   f"epoch {epoch}: KL per dimension ({kind})\n{stats.active_units} active units "
                   f"(Cov_x E[z|x] > {ACTIVE_UNIT_THRESHOLD})", "latent dimension", "KL (nats)")
        plots.bars(decoder_weight_norms(model.decoder.input_layer), run.figure_path("decoder_weight_norms", epoch),
                   f"epoch {epoch}: column norms of the decoder's first layer", "latent dimension", "L2 norm")


class FreezeParameters(Callback):
    """Leaves ``parameters`` untouched for the first ``epochs`` epochs: their gradients are dropped after
    every backward pass (gradients still flow through them to everything else), so Adam neither moves
    them nor accumulates their moments. The KVAE recipe freezes the dynamics LSTM for 10 epochs."""

    def __init__(self, parameters, epochs: int):
        self.parameters, self.epochs, self.frozen = list(parameters), epochs, epochs > 0

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.frozen = epoch <= self.epochs

    def after_backward(self, trainer: Trainer) -> None:
        if self.frozen:
            for p in self.parameters:
                p.grad = None

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> Dict[str, Any]:
        return {"frozen": self.frozen}


class KVAEReport(Callback):
    """Each epoch, on the first held-out sequences: reconstructions, the mixture weights alpha over time,
    the a-trajectories (figures), the imputation error at drop probability ``drop_prob``
    (``impute_smooth``, ``impute_filter``: fraction of wrong pixels on missing frames) and the
    reconstruction error from E_q[a | x] on all frames (``recon_error``; at the walls-only floor, the
    decoder ignores a: posterior collapse)."""

    def __init__(self, num_sequences: int = 64, num_shown: int = 4, drop_prob: float = 0.5, seed: int = 0):
        self.num_sequences, self.num_shown, self.drop_prob, self.seed = num_sequences, num_shown, drop_prob, seed

    @torch.no_grad()
    def on_epoch_end(self, trainer: Trainer, epoch: int) -> Dict[str, Any]:
        from .kvae_impute import hamming_error, kalman_impute, random_frame_mask

        model, guide, run = trainer.model, trainer.guide, trainer.run
        x = trainer.test_data[: self.num_sequences].to(trainer.device)
        mask = random_frame_mask(x.shape[0], x.shape[1], self.drop_prob, generator=torch.Generator().manual_seed(self.seed)).to(x.device)
        imputation = kalman_impute(model, guide, x, mask)
        a = guide.posterior(x).mean  # (n, T, a_dim)
        reconstruction = torch.sigmoid(model.frame_logits(a))
        metrics = {"impute_smooth": hamming_error(x, imputation.smoothed, mask),
                   "impute_filter": hamming_error(x, imputation.filtered, mask),
                   "recon_error": hamming_error(x, reconstruction, torch.zeros_like(mask))}
        if run is not None and x.dim() == 5:
            self._figures(trainer, epoch, x, mask, imputation, a, reconstruction)
        model.train(), guide.train()
        return metrics

    def _figures(self, trainer, epoch, x, mask, imputation, a, reconstruction) -> None:
        model, run = trainer.model, trainer.run
        shown, a = x[: self.num_shown], a[: self.num_shown]
        plots.image_rows([shown[0], reconstruction[0], shown[1], reconstruction[1]],
                         ["data", "reconstruction", "data", "reconstruction"], run.figure_path("reconstructions", epoch),
                         f"epoch {epoch}: two held-out sequences and their reconstructions from E_q[a|x]")
        plots.weight_panels(model.dynamics.alpha(a), run.figure_path("alpha", epoch), f"epoch {epoch}: mixture weights alpha_t")
        plots.trajectories(a, run.figure_path("a_trajectories", epoch), f"epoch {epoch}: E_q[a_t | x_t] of {self.num_shown} sequences, colour = time")
        frame_mask = mask[0].reshape((-1,) + (1,) * (x.dim() - 2)).expand_as(x[0])
        plots.image_rows([x[0], x[0], imputation.smoothed[0], imputation.filtered[0]],
                         ["truth", "observed", "smoothed", "filtered"], run.figure_path("imputation", epoch),
                         f"epoch {epoch}: frames dropped with p = {self.drop_prob} (blue)", observed=[None, frame_mask, None, None])
