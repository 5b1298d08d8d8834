"""Assembles an HRSSM training run (Variational Temporal Abstraction): sequence data with optional
true events, model and guide, the boundary-temperature schedule, a boundary report, the trainer."""
from __future__ import annotations

import warnings
from dataclasses import asdict
from typing import Any, Dict, List, Optional

import pyro
import torch

from pyro_models.datasets import load_sequence_data
from pyro_models.hrssm import HRSSMConfig, TemperatureAnnealing, build_hrssm, posterior_boundaries

from . import plots
from .boundaries import boundary_metrics
from .rundir import RunDir, config_from_json, load_trained_modules, read_run_config
from .trainer import Callback, TrainConfig, Trainer

# The official recipe (taesupkim/vta): Adam 5e-4, clip 10 on the loss averaged over batch and steps.
# Batch 16 instead of 64 on a CPU machine.
HRSSM_TRAIN_DEFAULTS = TrainConfig(epochs=20, batch_size=16, lr=5e-4, clip_norm=10.0, mean_loss=True, eval_batch_size=64)


class HRSSMReport(Callback):
    """Each epoch, on the first held-out sequences: boundary precision / recall / F1 (+-1 frame; window
    rule, and one-to-one as ``*_one_to_one``) against the true events when the data have them, and the
    mean number of segments (metrics); the frames of two sequences with their inferred boundaries
    (figure)."""

    def __init__(self, test_events: Optional[torch.Tensor], num_sequences: int = 200, tolerance: int = 1):
        self.test_events, self.num_sequences, self.tolerance = test_events, num_sequences, tolerance

    @torch.no_grad()
    def on_epoch_end(self, trainer: Trainer, epoch: int) -> Dict[str, Any]:
        x = trainer.test_data[: self.num_sequences].to(trainer.device)
        starts = posterior_boundaries(trainer.guide, x).starts.cpu()
        metrics: Dict[str, Any] = {"mean_segments": float(starts.sum(1).mean())}
        if self.test_events is not None:
            metrics.update(boundary_metrics(starts, self.test_events[: x.shape[0]], self.tolerance))
        if trainer.run is not None and x.dim() == 5:
            boundary_figure(trainer.run.figure_path("boundaries", epoch), x, starts, self.test_events,
                            f"epoch {epoch}: frames starting a segment in blue")
        return metrics


def boundary_figure(path: str, x: torch.Tensor, starts: torch.Tensor, events: Optional[torch.Tensor], title: str,
                    num_shown: int = 2) -> str:
    """Frames of the first sequences of ``x (N, T, C, H, W)``, each above a copy whose segment starts
    (``starts (N, T)``) are drawn in colour; the true event count in the label when ``events`` is given."""
    rows, labels, observed = [], [], []
    for n in range(min(num_shown, x.shape[0])):
        marks = starts[n].bool().reshape(-1, 1, 1, 1).expand_as(x[n])
        rows += [x[n], x[n]]
        events_text = f" ({int(events[n].sum())} true events)" if events is not None else ""
        labels += [f"sequence {n + 1}", "boundaries" + events_text]
        observed += [None, ~marks]
    return plots.image_rows(rows, labels, path, title, observed=observed)


def train_hrssm(data, config: HRSSMConfig, train_config: TrainConfig, out: Optional[str], resume: bool = False,
                extra_config: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """Train an HRSSM (or, with ``config.boundaries=False``, the RSSM baseline) on ``data`` (a
    ``SequenceData``); returns the per-epoch metrics. Put the arguments of ``load_sequence_data``
    under ``extra_config["data_args"]`` so that :func:`load_hrssm_run` can rebuild the data."""
    pyro.clear_param_store()
    torch.manual_seed(train_config.seed)
    model, guide = build_hrssm(tuple(data.train.shape[2:]), config)
    run_config = {"model": "hrssm", "data": data.name, "num_train": data.train.shape[0], "num_test": data.test.shape[0],
                  "hrssm": asdict(config), "train": asdict(train_config), **(extra_config or {})}
    run = RunDir(out, run_config, resume=resume) if out is not None else None
    # The guide draws every boundary before the states (q(M | X) comes first), so Pyro cannot verify
    # the mean-field site order; the analytic z and s KLs are still right (docs/hrssm.md).
    warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
    callbacks = [TemperatureAnnealing(model.temperature, config), HRSSMReport(data.test_events)]
    trainer = Trainer(model, guide, train_config, run, callbacks, units_per_example=data.train.shape[1])
    return trainer.fit(data.train, data.test, resume=resume)


def load_hrssm_run(path: str, data_dir: Optional[str] = None):
    """The trained model, guide (eval mode) and data of the HRSSM run directory ``path``."""
    stored = read_run_config(path, "hrssm")
    data = load_sequence_data(**{**stored["data_args"], **({"data_dir": data_dir} if data_dir is not None else {})})
    model, guide = build_hrssm(tuple(data.train.shape[2:]), config_from_json(HRSSMConfig, stored["hrssm"]))
    load_trained_modules(path, model, guide)
    return model, guide, data
