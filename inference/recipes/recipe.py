"""What the trainer, the scripts and the benchmarks need of a model, declared once per model.

A :class:`Recipe` names a model's config dataclass, its guides and options, its imputer and evaluations,
and three parts by who reads them: how it trains (:class:`TrainingPlan`: defaults, callbacks, an
optional preparation such as the KVAE's warm start, whether it can be compiled), the data it takes
(:class:`DataPlan`) and what the command line adds (:class:`CommandLine`: shortcuts, presets). The registry
(:mod:`inference.recipes.registry`) maps model names to recipes; nothing else in the library branches on a
model's name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from pyro_models.imputation import random_frame_mask

from ..runs.rundir import RunDir
from ..training import BatchTransform, Callback, TrainConfig


@dataclass
class NoOptions:
    """A recipe without options of its own."""


class Context(NamedTuple):
    """Everything one training run is made of, handed to a recipe's hooks."""

    model: torch.nn.Module
    guide: torch.nn.Module
    data: Any  # ImageData or SequenceData, as trained on
    data_config: Any  # how the data were loaded (None for data handed in directly)
    config: Any  # the model's config dataclass
    options: Any  # the recipe's options dataclass
    train: TrainConfig
    run: Optional[RunDir]


def _no_callbacks(context: Context) -> List[Callback]:
    return []


def _one_unit(data) -> int:
    return 1


def frames_per_sequence(data) -> float:
    """``units_per_example`` of a sequence model: the frames T of ``data.train (N, T, *frame)``, or for
    sequences of different lengths their mean length (so a sequence's loss is weighted by its length)."""
    lengths = getattr(data, "train_lengths", None)
    return data.train.shape[1] if lengths is None else float(lengths.float().mean())


def report_mask(trainer, num_sequences: int, drop_prob: float, seed: int):
    """What a sequence model's per-epoch imputation report works on: the first ``num_sequences`` held-out
    sequences ``x``, the frames they hold ``known (n, T)`` (None: all; for ragged sequences not the steps past
    their ends, ``trainer.test_lengths``), the imputation mask (frames
    dropped with ``drop_prob`` by a generator seeded with ``seed``, and the data's own gaps) and that
    generator, for the imputer's draws. Returns ``(x, known, mask, generator)``."""
    x = trainer.test_data[:num_sequences].to(trainer.device)
    known = trainer.test_mask[:num_sequences].to(trainer.device) if trainer.test_mask is not None else None
    lengths = trainer.test_lengths
    if lengths is not None:  # ragged sequences: only the steps inside a sequence are frames it holds
        valid = torch.arange(x.shape[1], device=x.device) < lengths[:num_sequences].to(x.device).unsqueeze(-1)
        known = valid if known is None else known & valid
    generator = torch.Generator().manual_seed(seed)
    mask = random_frame_mask(x.shape[0], x.shape[1], drop_prob, generator=generator).to(x.device)
    return x, known, (mask if known is None else mask & known), generator


DATA_KINDS = ("images", "sequences")


def always_compiled(config, options, train: TrainConfig) -> Optional[str]:
    """``Recipe.jit_refusal`` of a model whose loss can always be compiled."""
    return None


def never_compiled(reason: str) -> Callable[[Any, Any, TrainConfig], Optional[str]]:
    """``Recipe.jit_refusal`` of a model whose loss cannot be compiled, for ``reason``."""
    return lambda config, options, train: reason


def sequence_builder(build_for_frames: Callable[[Tuple[int, ...], Any], Tuple[torch.nn.Module, torch.nn.Module]]):
    """A recipe's ``build`` for a sequence model from ``build_for_frames(frame_shape, config)``: an example's
    shape ``(T, *frame_shape)`` loses its time axis."""
    def build(shape: Tuple[int, ...], config):
        return build_for_frames(tuple(shape[1:]), config)  # (T, *frame_shape) -> frame_shape
    return build


class Preset(NamedTuple):
    """A named recipe behind a reported number: ``flags``, the command-line arguments of ``train.py MODEL``
    it stands for (so a preset reads like the command it replaces), and ``result``: what it reached, where
    (a line for ``--help`` and the README)."""

    flags: Tuple[str, ...]
    result: str


@dataclass(frozen=True)
class TrainingPlan:
    """How a model trains (what :func:`inference.runs.experiment.train` hands the trainer).

    ``defaults``: the model's :class:`TrainConfig` defaults. ``callbacks(context)``: training callbacks in
    order (KL schedules, reports). ``prepare(context)``: runs once before the first epoch of a new run
    (not on resume), e.g. a warm start; it may write its record into ``context.run``.
    ``batch_transform(context)``: the transform applied to each training batch, or None; called before the
    run folder exists (``context.run`` is None), so it may refuse the data with ``ValueError``. ``units_per_example(data)``:
    the divisor of ``TrainConfig.mean_loss`` (frames per sequence). ``jit_refusal(config, options,
    train)``: the one answer to "can the training loss be compiled" (``TrainConfig.jit``): why not for
    these settings (e.g. a KL schedule whose weights a trace would freeze; :func:`never_compiled` for a
    model that cannot be at all), or None. ``vectorized_particles``: whether model and guide run under a
    particle plate left of their own (Pyro's vectorised particles; otherwise one particle a pass).
    """

    defaults: TrainConfig = field(default_factory=TrainConfig)
    callbacks: Callable[[Context], List[Callback]] = _no_callbacks
    prepare: Optional[Callable[[Context], None]] = None
    batch_transform: Optional[Callable[[Context], Optional[BatchTransform]]] = None
    units_per_example: Callable[[Any], float] = _one_unit
    jit_refusal: Callable[[Any, Any, TrainConfig], Optional[str]] = field(
        default_factory=lambda: never_compiled("its ELBO reads Python values that a trace would freeze"))
    vectorized_particles: bool = True


@dataclass(frozen=True)
class DataPlan:
    """The data a model takes.

    ``config``: the default data configuration (its class decides how data are loaded). ``kind``:
    "images" (``(N, C, H, W)``, pixel masks) or "sequences" (``(N, T, *frame)``, frame masks ``(N, T)``).
    ``prepare(data, data_config, seed)``: the data as trained on (e.g. static binarisation), or None.
    ``validate(config, data)``: raise ``ValueError`` when the loaded data cannot be modelled with
    ``config`` (e.g. sequences longer than the HRSSM's segments can hold); runs before the run folder.
    ``ragged``: whether the model takes ``lengths (batch,)`` after ``mask`` (sequences of different
    lengths, nothing scored past a sequence's end); data with lengths are refused for a model without.
    """

    config: Any
    kind: str = "sequences"
    prepare: Optional[Callable[[Any, Any, int], Any]] = None
    validate: Optional[Callable[[Any, Any], None]] = None
    ragged: bool = False

    def __post_init__(self):
        if self.kind not in DATA_KINDS:
            raise ValueError(f"kind: expected one of {DATA_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class CommandLine:
    """What ``scripts/train.py MODEL`` adds to the flags generated from the config classes.

    ``shortcuts``: flags that set several config fields at once, ``{name: (fields, help)}``.
    ``unused_fields``: fields of a config class that several models share which this model does not read:
    no flag, so that setting one is refused by name (e.g. the MLP VAE's ``channels``, which only conv-vae
    reads). ``moved_to_options``: fields that moved from the model's config to the recipe's options: a
    stored run's config.json that still has them under "config" is read with them under "options".
    ``presets``: the recipes behind reported numbers, by name, as :class:`Preset` (command-line flags):
    ``train.py MODEL --preset NAME`` starts from them, and flags given after override them.
    """

    shortcuts: Mapping[str, Tuple[Tuple[str, ...], str]] = field(default_factory=dict)
    unused_fields: Tuple[str, ...] = ()
    moved_to_options: Tuple[str, ...] = ()
    presets: Mapping[str, "Preset"] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """One model's description (see the module docstring), in parts by who reads them: ``training`` (the
    trainer, :class:`TrainingPlan`), ``data`` (loading, :class:`DataPlan`), ``cli`` (the command line,
    :class:`CommandLine`), and the model's own:

    ``build(shape, config) -> (model, guide)``: ``shape`` is an example's shape, ``data.train.shape[1:]``.
    ``guides``: the guides by name (the config's ``guide`` field). ``options``: the options dataclass of
    the recipe (training-time settings with flags like the config's); ``NoOptions`` if none.
    ``validate(config, options)``: raise ``ValueError`` (naming the arguments) when the two do not fit
    together; runs when a :class:`~inference.runs.experiment.RunSpec` is made, before any work.
    ``impute(model, guide, x, mask, num_samples, generator)``: the model's imputer, returning
    :class:`pyro_models.imputation.Imputation`; ``impute_defaults(data)``: keyword arguments of ``impute``
    chosen for the model (the VAE's starting fill from the training data; the DMM's number of draws), so
    every caller starts from the same place.
    ``evaluations``: the model's own evaluations by name, ``{name: (options_class, fn)}`` with
    ``fn(run, options) -> dict`` (JSON-able; it may write figures into the run); ``scripts/evaluate.py``
    generates its flags from ``options_class``.
    ``example``: a small model config and an example's shape ``(config, shape)`` for smoke tests and
    benchmarks (the registry-wide tests train every model on it).
    ``width_fields``: the config fields (ints, or tuples of ints) that set the networks' width, which
    :func:`widened` scales (for benchmarks of how time and memory grow with width).
    """

    name: str
    summary: str
    config: type
    build: Callable[[Tuple[int, ...], Any], Tuple[torch.nn.Module, torch.nn.Module]]
    data: DataPlan
    training: TrainingPlan = field(default_factory=TrainingPlan)
    cli: CommandLine = field(default_factory=CommandLine)
    guides: Sequence[str] = ()
    options: type = NoOptions
    validate: Optional[Callable[[Any, Any], None]] = None
    impute: Optional[Callable[..., Any]] = None
    impute_defaults: Callable[[Any], Dict[str, Any]] = lambda data: {}
    evaluations: Mapping[str, Tuple[type, Callable[..., Dict[str, Any]]]] = field(default_factory=dict)
    example: Optional[Callable[[], Tuple[Any, Tuple[int, ...]]]] = None
    width_fields: Tuple[str, ...] = ()

    @property
    def sequences(self) -> bool:
        """Whether the model takes sequences (``(N, T, *frame)``, masks per frame), not images."""
        return self.data.kind == "sequences"

    @property
    def compilable(self) -> bool:
        """Whether the training loss of the default settings can be compiled."""
        return self.training.jit_refusal(self.config(), self.options(), self.training.defaults) is None

    def check_compilable(self, config, options, train: TrainConfig) -> None:
        """Raise ``ValueError`` naming ``jit`` when ``train.jit`` is set and the recipe cannot honour it."""
        reason = self.training.jit_refusal(config, options, train) if train.jit else None
        if reason:
            raise ValueError(f"jit: {self.name} cannot be compiled here: {reason}")


def widened(recipe: Recipe, config, factor: float):
    """``config`` with every field of ``recipe.width_fields`` multiplied by ``factor`` (each entry of a
    tuple; at least 1)."""
    def scale(value):
        if isinstance(value, tuple):
            return tuple(scale(v) for v in value)
        return max(1, int(round(value * factor)))
    return dataclasses.replace(config, **{name: scale(getattr(config, name)) for name in recipe.width_fields})
