"""The HRSSM recipe (Variational Temporal Abstraction): the official optimisation, the boundary
temperature schedule, the boundary report, the imputer and the boundary evaluation."""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from pyro_models.datasets.configs import SequenceDataConfig
from pyro_models.datasets.sequences import CONTROLS, CUES
from pyro_models.hrssm import (GUIDES, PEAK_THRESHOLD, BoundarySchedule, HRSSMConfig, build_hrssm, impute,
                                jumpy_rollout, posterior_boundaries, segmentation_elbo, start_probabilities)
from pyro_models.hrssm.boundaries import check_threshold
from pyro_models.hrssm.config import BINARY_THRESHOLD, BoundaryTemperature
from pyro_models.imputation import frames_inside

from ...evaluation import plots
from .boundaries import boundary_metrics, boundary_scores, cue_scores
from ...training.elbo import elbo_terms
from ...runs.rundir import STATE
from ..recipe import CommandLine, Context, DataPlan, Preset, Recipe, TrainingPlan, always_compiled, frames_per_sequence, sequence_builder
from ...training import Callback, TrainConfig, Trainer

# The official recipe (taesupkim/vta): Adam 5e-4, clip 10 on the loss averaged over batch and steps.
# Batch 16 instead of 64 on a CPU machine.
# Compiled by default: the traced step is 0.80x the eager one at width 32 on one CPU thread (it skips
# Pyro's Python tracing of ~120 sites a step; docs/benchmarks.md) and draws the same numbers (tested).
# Not official: the rate halves every 16 epochs, so that the boundaries, once they have found the
# events, stop moving (docs/benchmarks.md, "HRSSM on the colour-changing balls").
HRSSM_TRAIN_DEFAULTS = TrainConfig(epochs=20, batch_size=16, lr=5e-4, lr_decay=0.5, lr_decay_every=16, clip_norm=10.0,
                                   mean_loss=True, eval_batch_size=64, jit=True)
# The guide draws every boundary before the states (q(M | X) comes first, as the paper's factorisation
# q(M | X) q(Z | M, X) q(S | Z, M, X)), so Pyro cannot verify the mean-field site order from the
# traces; the analytic z and s KLs are still right (docs/hrssm.md).
MEAN_FIELD_WARNING = "Failed to verify mean field restriction"
# the schedule's fields, in the model's config before they became the recipe's options (read from older runs)
SCHEDULE_FIELDS = tuple(f.name for f in dataclasses.fields(BoundarySchedule))


class TemperatureAnnealing(Callback):
    """The boundary schedule (:class:`BoundarySchedule`, the recipe's options): before every training
    step, sets the boundary temperature to ``schedule.temperature_at(step)`` and allows free boundaries
    once the warm-up is done, except on the COPY steps (``schedule.free_boundaries_at``; after such a step
    free boundaries are allowed again, so evaluation and checkpoints never see one); ``boundaries``: the
    model's switch, which resolves the schedule's defaults. Its step count is saved in checkpoints; it
    reports the temperature each epoch."""

    def __init__(self, temperature: BoundaryTemperature, schedule: BoundarySchedule, boundaries: bool = True):
        self.temperature, self.schedule, self.boundaries, self.step = temperature, schedule, boundaries, 0

    def on_train_batch_start(self, trainer: Trainer, batch) -> None:
        self.temperature.value = self.schedule.temperature_at(self.step)
        self.temperature.free_boundaries = self.schedule.free_boundaries_at(self.step, self.boundaries)
        self.step += 1

    def on_train_batch_end(self, trainer: Trainer, loss: float) -> None:
        # the step just taken was after the warm-up
        self.temperature.free_boundaries = self.step > self.schedule.warmup_steps(self.boundaries)

    def on_validation_epoch_end(self, trainer: Trainer, epoch: int) -> Dict[str, Any]:
        return {"temperature": self.temperature.value}

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step = state["step"]


class HRSSMReport(Callback):
    """Each epoch, on the first held-out sequences: boundary precision / recall / F1 (+-1 frame; window
    rule, and one-to-one as ``*_one_to_one``) of the guide's noise-free boundaries (the peaks of
    q(m_t | X), :func:`posterior_boundaries`; the official per-frame argmax's F1 as
    ``boundary_f1_argmax``) against the true events when the data have them, the
    mean number of segments and the label-free segmentation gap (:func:`epoch_segmentation_gap`) as
    metrics; the frames of two sequences with their inferred boundaries (figure)."""

    def __init__(self, test_events: Optional[torch.Tensor], num_sequences: int = 200, tolerance: int = 1,
                 gap_sequences: int = 100):
        self.test_events, self.num_sequences, self.tolerance = test_events, num_sequences, tolerance
        self.gap_sequences = gap_sequences

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: Trainer, epoch: int) -> Dict[str, Any]:
        x = trainer.test_data[: self.num_sequences].to(trainer.device)
        mask = trainer.test_mask[: self.num_sequences].to(trainer.device) if trainer.test_mask is not None else None
        lengths = getattr(trainer, "test_lengths", None)  # sequences of different lengths
        inside = None if lengths is None else frames_inside(None, lengths[: x.shape[0]].to(x.device), x.shape[1])
        mask = mask if inside is None else (inside if mask is None else mask & inside)  # past an end: no frame
        starts = posterior_boundaries(trainer.guide, x, mask=mask).starts.cpu()
        if inside is not None:  # segments inside each sequence only
            starts = starts * inside.cpu().to(starts.dtype)
        metrics: Dict[str, Any] = {"mean_segments": float(starts.sum(1).mean())}
        if self.test_events is not None:
            events = self.test_events[: x.shape[0]]
            metrics.update(boundary_metrics(starts, events, self.tolerance))
            if trainer.guide.boundary_posterior is not None:  # the official per-frame argmax, for comparison
                argmax = posterior_boundaries(trainer.guide, x, mask=mask, peaks=False, threshold=BINARY_THRESHOLD).starts.cpu()
                metrics["boundary_f1_argmax"] = boundary_scores(argmax, events, self.tolerance).f1
        if mask is None and self.gap_sequences > 0 and trainer.guide.boundary_posterior is not None:
            n = min(self.gap_sequences, x.shape[0])
            metrics["segmentation_gap"] = epoch_segmentation_gap(trainer.model, trainer.guide, x[:n], starts[:n].to(x.device))
        if trainer.run is not None and x.dim() == 5:
            boundary_figure(trainer.run.figure_path("boundaries", epoch), x, starts, self.test_events,
                            f"epoch {epoch}, held-out frames")
        return metrics


GAP_SEED = 0  # common random numbers for the two segmentations of the per-epoch gap
GAP_SAMPLES = 2  # draws of (Z, S) per segmentation in the per-epoch gap


def epoch_segmentation_gap(model, guide, x: torch.Tensor, starts: torch.Tensor) -> float:
    """The segmentation gap (``inference.recipes.hrssm.boundaries.segmentation_gap``: the ELBO with q(M | X) a point
    mass on the guide's own boundaries ``starts (batch, T)`` minus that with none; nats per sequence)
    of ``x (batch, T, *frame_shape)``, both with the same random draws (seed ``GAP_SEED``), in a forked
    random state so that training draws what it would have drawn without it. Label-free."""
    elbos = []
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        for segmentation in (starts, torch.zeros_like(starts)):
            torch.manual_seed(GAP_SEED)
            elbos.append(float(segmentation_elbo(model, guide, x, segmentation, GAP_SAMPLES).elbo.mean()))
    return elbos[0] - elbos[1]


BOUNDARY_RGB, EVENT_RGB, BOTH_RGB = (0.1, 0.3, 1.0), (1.0, 0.55, 0.0), (0.0, 0.75, 0.2)  # frame colours of boundary_figure


def boundary_figure(path: str, x: torch.Tensor, starts: torch.Tensor, events: Optional[torch.Tensor], title: str,
                    num_shown: int = 2) -> str:
    """Frames of the first sequences of ``x (N, T, C, H, W)``, one row each, content as it is: a frame that
    starts a segment (``starts (N, T)``) framed blue, a true event (``events (N, T)``, when given) orange,
    both green; the title says so."""
    rows, labels, colours = [], [], []
    for n in range(min(num_shown, x.shape[0])):
        start = starts[n].bool().tolist()
        event = events[n].bool().tolist() if events is not None else [False] * len(start)
        colours.append([BOTH_RGB if s and e else BOUNDARY_RGB if s else EVENT_RGB if e else None
                        for s, e in zip(start, event)])
        rows.append(x[n])
        counts = f"{sum(start)} segments" + (f", {sum(event)} true events" if events is not None else "")
        labels.append(f"sequence {n + 1}\n{counts}")
    key = "frames starting a segment framed blue" + (", true events orange, both green" if events is not None else "")
    return plots.image_rows(rows, labels, path, f"{title}: {key}", frame_colours=colours)


@dataclass
class BoundaryEvaluation:
    """Options of the boundary evaluation (``scripts/evaluate.py boundaries``)."""

    num_test: int = 1000  # held-out sequences scored (the first ones)
    tolerance: int = 1  # a boundary counts when a true event is within this many frames
    batch_size: int = 64  # sequences per batch
    prefix: int = 5  # frames given to the jumpy rollout
    num_shown: int = 4  # sequences in the boundary-probability figure
    peaks: bool = True  # a boundary only at a local peak of q(m_t = 1 | X) over time (False: every frame above the threshold)
    threshold: float = PEAK_THRESHOLD  # a boundary where q(m_t = 1 | X) exceeds this (0.5 without peaks: the official argmax)

    def __post_init__(self):
        for name in ("num_test", "batch_size", "prefix", "num_shown"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.tolerance < 0:
            raise ValueError(f"tolerance: expected >= 0, got {self.tolerance}")
        check_threshold(self.threshold)


def _batched(x: torch.Tensor, size: int):
    return [x[i : i + size] for i in range(0, len(x), size)]


@torch.no_grad()
def score_boundaries(run, options: BoundaryEvaluation) -> Tuple[Dict[str, Any], torch.Tensor]:
    """Boundary scores of the guide's noise-free segmentation of the held-out sequences against the true
    events (when the data have them), segments per sequence, the held-out ELBO (nats per sequence) and
    the segmentation ELBOs; and the segment starts ``(N, T)``."""
    model, guide, data = run.model, run.guide, run.data
    x = data.test[: options.num_test]
    starts = _read_boundaries(guide, x, options.batch_size, options.peaks, options.threshold)
    elbo = sum(float(elbo_terms(model, guide, b).elbo) for b in _batched(x, options.batch_size)) / len(x)
    result = {"num_test": len(x), "tolerance": options.tolerance, "peaks": options.peaks, "threshold": options.threshold,
              "test_elbo": elbo, "mean_segments": float(starts.sum(1).mean())}
    if guide.boundary_posterior is not None:  # label-free: the segmentation gap of run selection
        events = data.test_events[: options.num_test] if data.test_events is not None else None
        result["segmentation_elbo"] = compare_segmentations(model, guide, x, starts, events, options.batch_size)
    if data.test_events is None:
        result["note"] = "the data have no true events: no boundary F1"
        return result, starts
    cues = _cue_events(run, getattr(run.spec.data, "data", None), options.num_test)
    if cues:
        result["cues"] = cue_scores(starts, cues, options.tolerance)
    events = data.test_events[: options.num_test]
    scores = boundary_scores(starts, events, options.tolerance)
    result.update(boundary_metrics(starts, events, options.tolerance), num_predicted=scores.num_predicted,
                  num_events=scores.num_events)
    if guide.boundary_posterior is not None:  # the official per-frame argmax beside it, the control, the segmentation ELBOs
        argmax = _read_boundaries(guide, x, options.batch_size, peaks=False, threshold=BINARY_THRESHOLD)
        result["argmax"] = {"mean_segments": float(argmax.sum(1).mean()), **boundary_metrics(argmax, events, options.tolerance)}
        control = score_on_control(run, options)
        if control is not None:
            result["control"] = control
    return result, starts


def score_on_control(run, options: BoundaryEvaluation) -> Optional[Dict[str, Any]]:
    """The same trained guide on the control of the run's data (``CONTROLS``: the same held-out
    trajectories with nothing happening, e.g. no colour change): segments per sequence and the scores
    of its boundaries against where the events would have been. High scores there mean the boundaries
    follow what the events coincide with (the bounces), not the events. None without a control."""
    data_config = run.spec.data
    if data_config is None or getattr(data_config, "data", None) not in CONTROLS:
        return None
    control = dataclasses.replace(data_config, data=CONTROLS[data_config.data]).load(seed=run.spec.train.seed)
    x, events = control.test[: options.num_test], control.test_events[: options.num_test]
    starts = _read_boundaries(run.guide, x, options.batch_size, options.peaks, options.threshold)
    result = {"data": CONTROLS[data_config.data], "mean_segments": float(starts.sum(1).mean()),
              **boundary_metrics(starts, events, options.tolerance)}
    cues = _cue_events(run, CONTROLS[data_config.data], options.num_test)
    if cues:
        result["cues"] = cue_scores(starts, cues, options.tolerance)
    return result


def _cue_events(run, name: Optional[str], num_test: int) -> Dict[str, torch.Tensor]:
    """``{cue: events (n, T)}`` of the held-out sequences of the generated set ``name`` (``CUES``: its colour
    changes and its wall hits, on the same trajectories), generated with the run's data settings; {} for
    data without cues."""
    if name not in CUES or run.spec.data is None:
        return {}
    cues = {}
    for cue, source in CUES[name].items():
        data = dataclasses.replace(run.spec.data, data=source).load(seed=run.spec.train.seed)
        cues[cue] = data.test_events[:num_test]
    return cues


def _read_boundaries(guide, x: torch.Tensor, batch_size: int, peaks: bool, threshold: float) -> torch.Tensor:
    """Noise-free segment starts ``(N, T)`` of ``x (N, T, ...)`` (:func:`posterior_boundaries`), in batches."""
    return torch.cat([posterior_boundaries(guide, b, peaks=peaks, threshold=threshold).starts
                      for b in _batched(x, batch_size)])


def compare_segmentations(model, guide, x, starts, events, batch_size: int) -> Dict[str, float]:
    """Mean ELBO (nats per sequence) of ``x`` with q(M | X) replaced by a point mass on: the guide's own
    noise-free boundaries, the true events (when ``events`` is not None), and no boundaries (forced ones only)."""
    candidates = {"own": starts, "none": torch.zeros_like(starts)}
    if events is not None:
        candidates["true_events"] = events.to(x.dtype)
    return {name: sum(float(segmentation_elbo(model, guide, xb, sb).elbo.sum())
                      for xb, sb in zip(_batched(x, batch_size), _batched(seg, batch_size))) / len(x)
            for name, seg in candidates.items()}


def boundary_figures(run, options: BoundaryEvaluation, starts: torch.Tensor) -> None:
    """Under ``RUN/figures``: boundary probabilities over time, F1 against training time (when logged),
    the held-out frames with their boundaries, and a jumpy rollout."""
    model, guide, data = run.model, run.guide, run.data
    folder = os.path.join(run.path, "figures")
    x = data.test[: starts.shape[0]]
    if guide.boundary_posterior is not None and x.shape[1] > 1:
        probs = start_probabilities(guide, x[: options.num_shown])  # (n, T - 1): frames 2..T
        events = data.test_events[: options.num_shown, 1:] if data.test_events is not None else None
        plots.boundary_probabilities(probs, os.path.join(folder, "boundary_probabilities.png"),
                                     "held-out sequences: probability that frame t starts a segment", events)
    history = plots.read_metrics(run.path)
    if history and all("boundary_f1" in m for m in history):
        plots.metric_against_time(history, "boundary_f1", os.path.join(folder, "f1_vs_time.png"),
                                  f"boundary F1 (+-{options.tolerance} frame, window rule) on held-out sequences while training")
    if x.dim() == 5:
        boundary_figure(os.path.join(folder, "boundaries_eval.png"), x, starts, data.test_events, "held-out frames")
        frames = jumpy_rollout(model, guide, x[:1, : options.prefix], num_segments=min(8, x.shape[1]))
        plots.image_rows([x[0, : options.prefix], frames[0].clamp(0, 1)], ["prefix", "one frame per segment"],
                         os.path.join(folder, "jumpy.png"), "jumpy imagination")


def warmup_warning(run) -> Optional[str]:
    """A warning when the run has trained no further than its boundary warm-up (its boundaries are then
    only the forced ones, and their scores say nothing about what the model learned); None otherwise."""
    try:
        with open(os.path.join(run.path, STATE)) as f:
            epochs = int(json.load(f).get("epoch", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    steps = epochs * -(-run.data.train.shape[0] // run.spec.train.batch_size)  # batches per epoch, ceil
    warmup = run.spec.options.warmup_steps(run.spec.config.boundaries)
    if steps > warmup:
        return None
    return (f"this run trained {steps} steps ({epochs} epochs), within its boundary warm-up of {warmup} steps: "
            "its boundaries are only those l_max forces, so these scores do not measure learned boundaries")


def evaluate_boundaries(run, options: BoundaryEvaluation) -> Dict[str, Any]:
    """The boundary evaluation: scores (see :func:`score_boundaries`) and figures; a ``warning`` first
    when the run never left its boundary warm-up."""
    result, starts = score_boundaries(run, options)
    boundary_figures(run, options, starts)
    warning = warmup_warning(run)
    return result if warning is None else {"warning": warning, **result}


def _callbacks(context: Context) -> List[Callback]:
    warnings.filterwarnings("ignore", message=MEAN_FIELD_WARNING)
    return [TemperatureAnnealing(context.model.temperature, context.options, context.config.boundaries),
            HRSSMReport(context.data.test_events)]


def _validate_data(config: HRSSMConfig, data) -> None:
    steps = max(getattr(data, split).shape[1] for split in ("train", "valid", "test") if getattr(data, split, None) is not None)
    if config.boundaries and steps > config.max_steps:
        raise ValueError(f"max_segments, max_length: sequences of T = {steps} frames need max_segments * max_length >= {steps}, "
                         f"got {config.max_segments} * {config.max_length} = {config.max_steps}")


def _example():
    config = HRSSMConfig(abstract_belief_size=8, abstract_state_size=3, observation_belief_size=8, observation_state_size=3,
                         feature_size=8, conv_channels=4, conv_layers=2, max_segments=3, max_length=3)
    return config, (6, 3, 16, 16)


BELIEF_FIELDS = ("abstract_belief_size", "observation_belief_size", "feature_size")
STATE_FIELDS = ("abstract_state_size", "observation_state_size")

PRESETS = {  # the runs behind docs/benchmarks.md's numbers; add --seed and --out
    "color-balls": Preset(("--data", "color-balls", "--num-sequences", "2000", "--belief-size", "32", "--conv-channels", "32",
                           "--max-segments", "6", "--max-length", "16", "--temperature-decay-steps", "4", "--epochs", "40"),
                          "boundary F1 0.92, 0.86, 0.87, 0.89, 0.84 against the colour changes on seeds 0-4 (about 27 CPU "
                          "minutes a run)"),
    "jsb": Preset(("--data", "jsb", "--epochs", "250", "--eval-every", "5", "--lr", "1e-3", "--lr-decay", "0.9",
                   "--lr-decay-every", "20", "--likelihood", "bernoulli", "--max-segments", "10", "--max-length", "16",
                   "--abstract-belief-size", "64", "--observation-belief-size", "64", "--feature-size", "64",
                   "--mlp-hidden", "128", "--boundary-warmup-steps", "300", "--temperature-decay-steps", "4", "--seed", "0"),
                  "JSB test NLL 8.044 nats per step (importance-sampled, K = 100; bound 8.244); add --data-dir; "
                  "about 40 minutes on one thread"),
}

RECIPES = (
    Recipe(
        name="hrssm", summary="hierarchical recurrent state-space model (Kim et al. 2019) on sequences",
        config=HRSSMConfig, build=sequence_builder(build_hrssm),
        data=DataPlan(SequenceDataConfig(data="color-balls"), validate=_validate_data, ragged=True),
        training=TrainingPlan(HRSSM_TRAIN_DEFAULTS, callbacks=_callbacks, units_per_example=frames_per_sequence,
                              jit_refusal=always_compiled, vectorized_particles=False),
        cli=CommandLine(
            shortcuts={"belief_size": (BELIEF_FIELDS, "sets c_t, h_t and feature widths at once: " + ", ".join(BELIEF_FIELDS)),
                       "state_size": (STATE_FIELDS, "sets the z_t and s_t sizes at once: " + ", ".join(STATE_FIELDS))},
            moved_to_options=SCHEDULE_FIELDS, presets=PRESETS),
        guides=GUIDES, options=BoundarySchedule, validate=lambda config, schedule: schedule.check(config),
        impute=impute, example=_example, evaluations={"boundaries": (BoundaryEvaluation, evaluate_boundaries)},
        width_fields=(*BELIEF_FIELDS, "conv_channels"),
    ),
)
