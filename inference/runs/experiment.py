"""One path from data to a trained run for every registered model, and back: :func:`train` assembles
a run from a recipe (data, model and guide, preparation, callbacks, trainer); :func:`load_run` returns
the model, guide, configs and data of any run directory."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import pyro
import torch

from pyro_models.datasets import SequenceData
from pyro_models.datasets.sequences import check_lengths_array
from pyro_models.datasets.configs import MIN_STEPS

from ..training import distributed
from ..recipes.recipe import Context, Recipe
from ..recipes.registry import get_recipe
from .rundir import BEST, CONFIG, RunDir, read_checkpoint
from ..training import Callback, TrainConfig, Trainer, load_weights

RUN_FORMAT = 2  # config.json layout: model, format, config, options, train, data
WORLD_SIZE_KEY = "world_size"  # config.json: the number of processes the run trains on (absent: 1)
EXAMPLE_SHAPE_KEY = "example_shape"  # config.json: one training image's or frame's shape, which the networks' sizes follow


def example_shape(data) -> List[int]:
    """The shape the networks are built for: an image's ``(C, H, W)`` or a sequence's frame shape."""
    return list(data.train.shape[2:] if isinstance(data, SequenceData) else data.train.shape[1:])


def check_example_shape(stored: Optional[Dict[str, Any]], data, path: str) -> None:
    """Raise ``ValueError`` naming ``data`` when the run stored in ``path`` (its ``config.json`` as
    ``stored``) was trained on examples of another shape than ``data``'s (the data changed under it)."""
    expected = (stored or {}).get(EXAMPLE_SHAPE_KEY)
    if expected is not None and list(expected) != example_shape(data):
        kind = "frames" if isinstance(data, SequenceData) else "examples"
        raise ValueError(f"data: the run in {path} was trained on {kind} of shape {tuple(expected)}, but the data "
                         f"now hold {kind} of shape {tuple(example_shape(data))}; restore the run's data "
                         "(or pass data of that shape), or start a new run in another folder")


def dataclass_from_json(cls, stored: Dict[str, Any]):
    """A config dataclass ``cls`` from its JSON form (lists back to tuples); unknown keys are an error."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(stored) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown} (expected some of {sorted(known)})")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})


@dataclass
class RunSpec:
    """Everything that defines a training run; stored as the run's ``config.json``."""

    model: str
    config: Any  # the model's config dataclass
    train: TrainConfig
    data: Any = None  # the data config (None: data handed in directly)
    options: Any = None  # the recipe's options (None: their defaults)

    def __post_init__(self):
        recipe = get_recipe(self.model)
        for name, cls in (("config", recipe.config), ("options", recipe.options), ("data", type(recipe.data.config))):
            value = getattr(self, name)
            if value is None and name != "data":
                setattr(self, name, cls())
            elif value is not None and not isinstance(value, cls):
                raise ValueError(f"{name}: expected a {cls.__name__} for model {self.model!r}, got {type(value).__name__}")
        if not isinstance(self.train, TrainConfig):
            raise ValueError(f"train: expected a TrainConfig, got {type(self.train).__name__}")
        if recipe.validate is not None:
            recipe.validate(self.config, self.options)
        recipe.check_compilable(self.config, self.options, self.train)

    @property
    def recipe(self) -> Recipe:
        return get_recipe(self.model)

    def to_json(self) -> Dict[str, Any]:
        return {"model": self.model, "format": RUN_FORMAT, "config": asdict(self.config), "train": asdict(self.train),
                "options": asdict(self.options), "data": asdict(self.data) if self.data is not None else None}

    @classmethod
    def from_json(cls, stored: Dict[str, Any]) -> "RunSpec":
        if not isinstance(stored, dict):
            raise ValueError(f"config.json: expected a JSON object (a run's config), got {type(stored).__name__}")
        if stored.get("format") != RUN_FORMAT:
            raise ValueError(f"config.json: format {stored.get('format')!r} is not this library's run format {RUN_FORMAT}")
        recipe = get_recipe(stored["model"])
        stored = _moved_to_options(stored, recipe)
        data = stored.get("data")
        return cls(stored["model"], dataclass_from_json(recipe.config, stored["config"]),
                   dataclass_from_json(TrainConfig, stored["train"]),
                   dataclass_from_json(type(recipe.data.config), data) if data is not None else None,
                   dataclass_from_json(recipe.options, stored.get("options") or {}))


def _moved_to_options(stored: Dict[str, Any], recipe: Recipe) -> Dict[str, Any]:
    """``stored`` with the config fields that ``recipe.cli.moved_to_options`` moved read as options."""
    config = dict(stored.get("config") or {})
    moved = {name: config.pop(name) for name in recipe.cli.moved_to_options if name in config}
    if not moved:
        return stored
    return {**stored, "config": config, "options": {**(stored.get("options") or {}), **moved}}


def normalised_config(stored: Dict[str, Any]) -> Dict[str, Any]:
    """A stored ``config.json`` with the fields added to the configs since it was written at their
    defaults (which keep what the run did), so that comparing it with a new spec sees real changes only;
    one this library cannot read is returned as it is (the comparison then reports it)."""
    try:
        return {WORLD_SIZE_KEY: 1, **stored, **json.loads(json.dumps(RunSpec.from_json(stored).to_json()))}
    except (KeyError, TypeError, ValueError):
        return stored


LENGTHS_ARG = 2  # ragged sequences: the model's arguments are (x, mask, lengths)


def model_inputs(data, split: str):
    """The model's arguments for ``split`` ("train", "valid" or "test") of ``data``: the examples;
    ``(x, mask)`` when the sequences have gaps in any split (a split without gaps gets an all-True mask);
    ``(x, mask or None, lengths)`` when the sequences have lengths of their own."""
    x = getattr(data, split)
    mask = getattr(data, f"{split}_mask", None)
    if getattr(data, "ragged", False):
        return x, mask, getattr(data, f"{split}_lengths")
    masks = [getattr(data, f"{name}_mask", None) for name in ("train", "valid", "test")]
    if all(m is None for m in masks):
        return x
    return x, (torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask)


def data_splits(data) -> Tuple[str, ...]:
    """The splits ``data`` holds: ("train", "test"), with "valid" between them when it has one."""
    return ("train", "valid", "test") if getattr(data, "valid", None) is not None else ("train", "test")


def check_data(recipe: Recipe, data, config=None) -> None:
    """Raise ``ValueError`` naming ``data`` when ``data`` does not suit ``recipe``'s model: images for an
    image model, sequences of at least two frames for a sequence model, examples in both splits."""
    sequences = isinstance(data, SequenceData)
    if sequences != recipe.sequences:
        want = "sequences (N, T, *frame)" if recipe.sequences else "images (N, C, H, W)"
        raise ValueError(f"data: {recipe.name} trains on {want}, got {type(data).__name__} of shape {tuple(data.train.shape)}")
    if data.train.shape[0] < 1 or data.test.shape[0] < 1:
        raise ValueError(f"data: expected >= 1 training and held-out examples, got {data.train.shape[0]} and {data.test.shape[0]}")
    if sequences and data.train.shape[1] < MIN_STEPS:
        raise ValueError(f"data: {recipe.name} needs sequences of >= {MIN_STEPS} frames, got T = {data.train.shape[1]}")
    for split in data_splits(data) if sequences else ():
        mask, x = getattr(data, f"{split}_mask"), getattr(data, split)
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2])):
            raise ValueError(f"data: {split}_mask must be bool of shape (N, T) = {tuple(x.shape[:2])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        lengths = getattr(data, f"{split}_lengths")
        if mask is not None and not _observes_a_frame(mask, lengths):
            raise ValueError(f"data: {split}_mask observes no frame{' inside the sequences' if lengths is not None else ''}: "
                             "nothing can be learned or scored (a mask is True, 1, where a frame is observed and "
                             "False, 0, where it is missing)")
        if (lengths is None) != (data.train_lengths is None):
            raise ValueError(f"data: every split or none needs lengths; train_lengths is "
                             f"{'set' if data.train_lengths is not None else 'None'}, {split}_lengths is not")
        if lengths is not None:
            check_lengths_array(lengths, tuple(x.shape[:2]), f"data: {split}_lengths")
    if sequences and data.ragged and not recipe.data.ragged:
        raise ValueError(f"data: {recipe.name} does not model sequences of different lengths yet; the data "
                         f"{data.name!r} have them (train on equal lengths, or pad them and mark the padding as "
                         "missing frames with a mask)")
    if recipe.data.validate is not None and config is not None:
        recipe.data.validate(config, data)


def _observes_a_frame(mask: torch.Tensor, lengths: Optional[torch.Tensor]) -> bool:
    """Whether ``mask (N, T)`` is True at some frame inside the sequences' ``lengths (N,)`` (None: all T)."""
    if lengths is None:
        return bool(mask.any())
    inside = torch.arange(mask.shape[1]) < torch.as_tensor(lengths).reshape(-1, 1)  # (N, T)
    return bool((mask & inside).any())


BYTES_PER_PARAMETER = 16  # float32 weights, gradients and Adam's two moments


def check_size(recipe: Recipe, shape: Tuple[int, ...], config) -> None:
    """Raise ``ValueError`` naming the width fields when the networks of ``config`` for examples of
    ``shape`` would not fit in this machine's free memory: they are built on PyTorch's ``meta`` device
    first (shapes only, no memory), so a mistyped width fails in one line instead of in the allocator."""
    try:
        with torch.device("meta"):
            model, guide = recipe.build(shape, config)
        modules = torch.nn.ModuleList([m for m in (model, guide) if isinstance(m, torch.nn.Module)])
        count = sum(p.numel() for p in modules.parameters())
    except Exception:  # a model that cannot be built without memory: no estimate, nothing refused
        return
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if count * BYTES_PER_PARAMETER > free:
        raise ValueError(f"{recipe.width_fields[0] if recipe.width_fields else 'config'}: the networks would hold "
                         f"{count:,} parameters ({count * BYTES_PER_PARAMETER / 2**30:,.1f} GiB with gradients and "
                         f"Adam's moments), more than this machine's {free / 2**30:.1f} GiB of free memory; check the widths")


def build(spec: RunSpec, data) -> Context:
    """Model and guide of ``spec`` for ``data`` (seeded by ``spec.train.seed``), in a :class:`Context`."""
    recipe = spec.recipe
    check_data(recipe, data, spec.config)
    check_size(recipe, tuple(data.train.shape[1:]), spec.config)
    pyro.clear_param_store()  # a new run: no parameters left over from another model in this process
    torch.manual_seed(spec.train.seed)  # network initialisation
    if recipe.data.prepare is not None:
        data = recipe.data.prepare(data, spec.data, spec.train.seed)
    model, guide = recipe.build(tuple(data.train.shape[1:]), spec.config)
    return Context(model, guide, data, spec.data, spec.config, spec.options, spec.train, None)


class ELBOCurves(Callback):
    """Draws ``RUN/figures/elbo_curves.png`` (the ELBO of each split against the epoch) on scoring epochs."""

    def __init__(self, run: RunDir):
        self.run = run

    def on_train_epoch_end(self, trainer: Trainer, epoch: int, metrics: Dict[str, Any]) -> None:
        if "test_elbo" in metrics:
            from ..evaluation import plots  # matplotlib, only when a figure is drawn

            plots.curves(self.run.read_metrics(), ["train_elbo", "valid_elbo", "test_elbo"],
                         self.run.figure_path("elbo_curves"), "ELBO (nats per example) on each split")


def run_callbacks(run: Optional[RunDir], train_config: TrainConfig) -> List[Callback]:
    """What a run directory adds to a recipe's callbacks: the ELBO curves, then TensorBoard (last, to see
    every metric and figure of the epoch). None without a run directory (and on ranks other than 0)."""
    if run is None:
        return []
    callbacks: List[Callback] = [ELBOCurves(run)]
    if train_config.tensorboard:
        from .tensorboard import TensorBoardLogger

        callbacks.append(TensorBoardLogger(run))
    return callbacks


def check_machine(train_config: TrainConfig) -> None:
    """Raise ``ValueError`` unless this machine can run ``train_config``'s runtime settings: the device, and
    TensorBoard's extra when asked for. Checked before a run starts, never when a stored run is read."""
    train_config.check_machine()
    if train_config.tensorboard:
        from .tensorboard import require

        require()


def train(spec: RunSpec, out: Optional[str] = None, resume: bool = False, data=None) -> List[Dict[str, Any]]:
    """Train the run ``spec`` on ``data`` (default: loaded from ``spec.data``); returns the metrics of
    every epoch run here. ``out``: the run directory (None: no files); ``resume`` continues it.

    Under ``torchrun`` (several ranks) every rank trains its shard and rank 0 alone writes ``out``
    (:mod:`inference.training.distributed`); a check that fails on rank 0 stops every rank."""
    if spec.data is None and data is None:
        raise ValueError("data: pass the data or a data config in spec.data")
    check_machine(spec.train)
    with distributed.process_group(spec.train.device) as world:
        return _train(spec, out, resume, data, world)


def _load_data(spec: RunSpec, world: distributed.World):
    """``spec``'s data: rank 0 first (it may generate and cache them), then the others."""
    data = distributed.on_main(lambda: spec.data.load(seed=spec.train.seed), world, share=False)
    return data if data is not None else spec.data.load(seed=spec.train.seed)


def _open_run(out: Optional[str], stored: Dict[str, Any], resume: bool, world: distributed.World):
    """``(run, resuming)``: rank 0's run directory (None elsewhere and without ``out``) and every rank's mode."""
    run = None
    if out is None:
        return run, False

    def open_run() -> bool:
        nonlocal run
        run = RunDir(out, stored, resume=resume, normalise=normalised_config)
        return run.resuming

    resuming = distributed.on_main(open_run, world)  # every rank learns rank 0's mode
    return run, resuming


def _train(spec: RunSpec, out: Optional[str], resume: bool, data, world: distributed.World) -> List[Dict[str, Any]]:
    recipe = spec.recipe  # the spec checked compilability and consistency when it was made
    stored = {**spec.to_json(), WORLD_SIZE_KEY: world.size}  # config.json
    if out is not None:  # before any work: a wrong folder fails fast
        distributed.on_main(lambda: RunDir.preflight(out, stored, resume, normalised_config), world)
    data = data if data is not None else _load_data(spec, world)
    if out is not None:
        check_example_shape(RunDir.stored_config(out), data, out)
    context = build(spec, data)
    stored[EXAMPLE_SHAPE_KEY] = example_shape(context.data)
    # before the run folder: a transform may refuse the data (its hook sees no run)
    transform = recipe.training.batch_transform(context) if recipe.training.batch_transform is not None else None
    run, resuming = _open_run(out, stored, resume, world)
    try:
        context = context._replace(run=run)
        if recipe.training.prepare is not None and not resuming:
            device = distributed.rank_device(spec.train.device, world)
            context.model.to(device), context.guide.to(device)
            recipe.training.prepare(context)  # on every rank alike; the trainer then broadcasts rank 0's parameters
        ragged = getattr(context.data, "ragged", False)
        trainer = Trainer(context.model, context.guide, spec.train, run,
                          recipe.training.callbacks(context) + run_callbacks(run, spec.train), batch_transform=transform,
                          units_per_example=recipe.training.units_per_example(context.data), world=world, resume_dir=out,
                          lengths_arg=LENGTHS_ARG if ragged else None, vectorize_particles=recipe.training.vectorized_particles)
        valid = model_inputs(context.data, "valid") if "valid" in data_splits(context.data) else None
        return trainer.fit(model_inputs(context.data, "train"), model_inputs(context.data, "test"), resume=resuming,
                           valid=valid)
    finally:
        if run is not None:
            run.close()


class Run(NamedTuple):
    """A trained run: ``model`` and ``guide`` (eval mode), its :class:`RunSpec`, its data, its path."""

    model: torch.nn.Module
    guide: torch.nn.Module
    spec: RunSpec
    data: Any
    path: str

    @property
    def recipe(self) -> Recipe:
        return self.spec.recipe


def read_spec(path: str) -> RunSpec:
    """The :class:`RunSpec` stored in the run directory ``path``."""
    config_path = os.path.join(path, CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"path: {os.path.abspath(path)} holds no run ({CONFIG} not found)")
    stored = RunDir.stored_config(path)
    if isinstance(stored, dict) and "model" not in stored and "format" not in stored:
        raise ValueError(f"path: {path} was written by a Trainer of your own (its {CONFIG} holds no RunSpec), so "
                         "load_run cannot rebuild its model; build the model and guide as you did, then "
                         "inference.training.load_weights(model, guide, read_checkpoint(path))")
    return RunSpec.from_json(stored)


CHECKPOINTS = ("last", "best")


def load_run(path: str, data_dir: Optional[str] = None, data=None, checkpoint: str = "last") -> Run:
    """Model, guide (eval mode, trained weights), spec and data of the run directory ``path`` of any
    registered model. ``data_dir`` overrides where the stored data config finds its files; ``data``
    replaces the stored data altogether (required when the run was trained on data handed in).
    ``checkpoint``: "last" (the newest epoch) or "best" (the epoch with the best validation ELBO, for runs
    on data with a validation split)."""
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint: expected one of {CHECKPOINTS}, got {checkpoint!r}")
    spec = read_spec(path)
    state = read_checkpoint(path, map_location="cpu")  # before the data: a run without weights fails fast
    if checkpoint == "best":
        best = os.path.join(path, BEST)
        if not os.path.isfile(best):
            raise FileNotFoundError(f"checkpoint: {path} has no {BEST} (only runs on data with a validation split keep one)")
        state = torch.load(best, map_location="cpu", weights_only=False)
    if data is None:
        if spec.data is None:
            raise ValueError(f"data: the run in {path} was trained on data handed in directly; pass them as data")
        data_config = spec.data if data_dir is None else type(spec.data)(**{**asdict(spec.data), "data_dir": data_dir})
        data = data_config.load(seed=spec.train.seed)
    check_example_shape(RunDir.stored_config(path), data, path)
    context = build(spec, data)
    load_weights(context.model, context.guide, state)
    context.model.eval(), context.guide.eval()
    return Run(context.model, context.guide, spec, context.data, path)


