"""One SVI trainer for every model of the project.

The trainer knows nothing of the model: it takes a model and a guide with one signature, an ELBO
choice, and data: a tensor whose first axis indexes examples, or a tuple of such tensors, the model's
arguments (e.g. sequences and their frame masks ``(x, mask)`` when the data have gaps); a batch is the
same rows of each, passed as ``model(*batch)``. Each step is SVI: the
ELBO's ``differentiable_loss`` (Pyro traces model and guide), back-propagation, global gradient-norm
clipping, and one ``torch.optim.Adam`` step over every parameter the traces touch. Model-specific
behaviour (KL schedules, figures, extra metrics) comes in through :class:`Callback` objects.

Every epoch writes one line of ``metrics.jsonl`` (nats per example, higher ELBO is better) and an
atomically written checkpoint; ``fit(resume=True)`` continues a run exactly where it stopped.

With a :class:`~inference.distributed.World` of several ranks (a ``torchrun`` launch), each rank trains
on its shard of every epoch and gradients are all-reduced each step (``inference.distributed`` says
exactly how); a 1-rank world is the plain single-process trainer, draw for draw.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.params.param_store import _MODULE_NAMESPACE_DIVIDER as MODULE_DIVIDER
from tqdm.auto import tqdm

from . import distributed, failpoints, plots
from .batching import bucketed_order, cut_to_length
from .distributed import World
from .elbo import ELBOS, elbo_terms, make_elbo
from .rundir import RunDir, read_checkpoint

BatchTransform = Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]
Data = Union[torch.Tensor, Tuple[torch.Tensor, ...]]  # examples on axis 0; a tuple: the model's arguments
DEVICE_DATA_SHARE = 0.25  # a data set up to this share of a GPU's memory is held on the GPU (see place)
Inputs = Tuple[Optional[torch.Tensor], ...]  # the model's arguments; None: left at its default


def as_inputs(data: Data, argument: str = "data") -> Inputs:
    """``data`` as a tuple of the model's arguments, checked to have the same examples on axis 0. An
    argument may be None (left at its default, e.g. no frame mask) except the first."""
    inputs = tuple(data) if isinstance(data, (tuple, list)) else (data,)
    sizes = {t.shape[0] for t in inputs if t is not None}
    if not inputs or inputs[0] is None or len(sizes) != 1:
        raise ValueError(f"{argument}: expected a tensor or a tuple of tensors with the same first axis, "
                         f"got shapes {[None if t is None else tuple(t.shape) for t in inputs]}")
    return inputs


def take(inputs: Inputs, index, device=None) -> Inputs:
    """The rows ``index`` (a slice or index tensor) of every tensor of ``inputs``, on ``device``; the copy
    to a GPU is asynchronous (``non_blocking``: the data are pinned or already there, see :func:`place`)."""
    out = []
    for t in inputs:
        if t is None:
            out.append(None)
            continue
        rows = t[index.to(t.device) if torch.is_tensor(index) else index]
        out.append(rows.to(device, non_blocking=True) if device is not None else rows)
    return tuple(out)


def place(inputs: Inputs, device: torch.device) -> Inputs:
    """Where a data set lives during training: on a CUDA ``device`` itself when it takes at most
    ``DEVICE_DATA_SHARE`` of the device's memory (then batches are cut there: no copy per step), else in
    pinned host memory (each batch copied asynchronously); on the CPU as it is."""
    if device.type != "cuda":
        return inputs
    size = sum(t.numel() * t.element_size() for t in inputs if t is not None)
    if size <= DEVICE_DATA_SHARE * torch.cuda.get_device_properties(device).total_memory:
        return tuple(None if t is None else t.to(device) for t in inputs)
    return tuple(None if t is None else t.pin_memory() for t in inputs)


@dataclass
class TrainConfig:
    """Optimisation settings shared by every model."""

    epochs: int = 10  # passes over the training set
    batch_size: int = 128  # examples per SVI step
    lr: float = 1e-3  # Adam's learning rate
    weight_decay: float = 0.0  # Adam's L2 penalty on every parameter (added to the gradient of the loss the step takes: per example and unit with mean_loss)
    amsgrad: bool = False  # Adam with the AMSGrad correction (the official VTA recipe's optimiser)
    lr_decay: float = 1.0  # the learning rate is multiplied by this, in (0, 1] ...
    lr_decay_every: int = 1  # ... every this many epochs (staircase)
    clip_norm: Optional[float] = None  # global gradient-norm clip; none: no clipping
    mean_loss: bool = False  # step on the loss per example and unit (e.g. per frame), not the batch sum
    elbo: str = field(default="meanfield", metadata={"choices": tuple(ELBOS)})  # meanfield: analytic KL where known, else Monte Carlo; trace: Monte Carlo KL
    num_particles: int = 1  # samples per ELBO estimate (vectorised)
    jit: bool = False  # compile the training loss with torch.jit.trace (models that declare themselves compilable)
    device: str = "cpu"  # cpu, cuda or cuda:N
    seed: int = 0  # seeds initialisation, batch order and every draw
    eval_batch_size: int = 500  # examples per batch when scoring held-out data (sequences of different lengths: at most batch_size, sorted by length, so a batch holds little padding)
    eval_every: int = 1  # score the held-out data (and run the per-epoch reports) every this many epochs, and at the last
    tensorboard: bool = False  # also log to RUN/tensorboard (needs the tensorboard extra)
    train_eval_size: int = 1000  # training examples scored in eval mode each epoch (train_elbo)
    progress: bool = True  # tqdm progress bars and one line per epoch
    bucket_batches: int = 8  # sequences of different lengths: each batch is drawn from a window of this many batches sorted by length, so a batch's sequences have similar lengths (1: no bucketing)
    check_every_step: bool = False  # every SVI step under Pyro's and torch's argument validation; off: each epoch's first step only (the checks cost 6-8% of an HRSSM step, docs/benchmarks.md; non-finite losses and gradients are caught at every step either way)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "lr_decay_every", "eval_batch_size", "train_eval_size", "num_particles",
                     "bucket_batches", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr: expected a finite number > 0, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay: expected a finite number >= 0, got {self.weight_decay}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay: expected in (0, 1], got {self.lr_decay}")
        if self.clip_norm is not None and not 0 < self.clip_norm < math.inf:
            raise ValueError(f"clip_norm: expected a finite number > 0 or None, got {self.clip_norm}")
        if self.jit and self.check_every_step:
            raise ValueError("check_every_step: Pyro's argument checks do not run inside a compiled loss; "
                             "expected jit False with it, got jit True")
        if self.elbo not in ELBOS:
            raise ValueError(f"elbo: expected one of {tuple(ELBOS)}, got {self.elbo!r}")
        if self.seed < 0:
            raise ValueError(f"seed: expected >= 0, got {self.seed}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device: expected cpu, cuda or cuda:N, got {self.device!r}") from None
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device: {self.device!r} requested but CUDA is not available here")
        if self.tensorboard:
            from . import tensorboard  # (imports this module: not at the top)

            if not tensorboard.available():
                raise ValueError(tensorboard.MISSING)


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; the last good checkpoint is kept."""


class Callback:
    """Hooks into training. ``on_epoch_end`` may return extra metrics for ``metrics.jsonl``."""

    def on_train_start(self, trainer: "Trainer") -> None:
        pass

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        pass

    def before_step(self, trainer: "Trainer", batch: Inputs) -> None:
        pass

    def after_backward(self, trainer: "Trainer") -> None:
        """Gradients are computed, not yet clipped or applied (e.g. to freeze parameters)."""

    def on_step_end(self, trainer: "Trainer", loss: float) -> None:
        """After each optimiser step, with the step's loss per example."""

    def on_epoch_end(self, trainer: "Trainer", epoch: int) -> Dict[str, Any]:
        return {}

    def after_epoch(self, trainer: "Trainer", epoch: int, metrics: Dict[str, Any]) -> None:
        """After the epoch's metrics line, checkpoint and figures are written (e.g. to log them elsewhere)."""

    def on_train_end(self, trainer: "Trainer") -> None:
        """When ``fit`` returns (also when it stops with an error)."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def _modules(*objs) -> List[torch.nn.Module]:
    return [o for o in objs if isinstance(o, torch.nn.Module)]


def _rng_state() -> Dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class Trainer:
    """SVI over ``model``/``guide`` (callables of a batch's tensors, ``model(*batch)``) with ``config``.

    ``run``: where config, metrics, checkpoints and figures go (``None``: nowhere).
    ``batch_transform(x, generator)``: applied to the first tensor of each training batch (e.g. dynamic
    binarisation).
    ``units_per_example``: with ``config.mean_loss``, the gradient step uses the loss divided by
    ``batch * units_per_example`` (e.g. the number of frames of a sequence), the convention of the
    original KVAE and VTA code, which their gradient-clipping thresholds assume.
    ``lengths_arg``: for sequences of different lengths, the position of their lengths ``(N,)`` among the
    model's arguments. Batches are then formed from sequences of similar length (:func:`bucketed_order`)
    and every batch, in training and evaluation, is cut to its own longest sequence
    (:func:`cut_to_length`); metrics gain per-step values (``*_per_step``: nats per time step).
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        config: TrainConfig,
        run: Optional[RunDir] = None,
        callbacks: Sequence[Callback] = (),
        batch_transform: Optional[BatchTransform] = None,
        units_per_example: int = 1,
        world: Optional[World] = None,
        resume_dir: Optional[str] = None,
        lengths_arg: Optional[int] = None,
    ):
        self.model, self.guide, self.config, self.run = model, guide, config, run
        self.lengths_arg = lengths_arg
        self.best: Optional[float] = None  # the best validation ELBO so far (with a validation split)
        self.units_per_example = units_per_example
        self.callbacks = list(callbacks)
        if config.tensorboard and run is not None:  # rank 0's run directory; last, to see every metric
            from .tensorboard import TensorBoardLogger

            self.callbacks.append(TensorBoardLogger(run))
        self.batch_transform = batch_transform
        self.world = world if world is not None else distributed.current_world()
        self.resume_dir = resume_dir if resume_dir is not None else (run.path if run is not None else None)
        self.device = torch.device(distributed.rank_device(config.device, self.world))
        for module in _modules(model, guide):
            module.to(self.device)
        self.elbo = make_elbo(config.elbo, config.num_particles)
        self._compiled: Dict[tuple, Callable] = {}  # batch shape -> traced loss (config.jit)
        self.generator = torch.Generator().manual_seed(config.seed)  # the epochs' order: the same on every rank
        # batch transforms draw from it too in one process (as always); from their own stream per rank otherwise
        self.transform_generator = (torch.Generator().manual_seed(distributed.rank_seed(config.seed, self.world))
                                    if self.world.parallel else self.generator)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None
        self.params: List[torch.Tensor] = []
        self.epoch = 0
        self.history: List[Dict[str, Any]] = []
        self.test_inputs: Inputs = ()

    # ----------------------------------------------------------------------------------------- set-up
    @property
    def test_data(self) -> Optional[torch.Tensor]:
        """The held-out examples (the first of the held-out inputs), for callbacks."""
        return self.test_inputs[0] if self.test_inputs else None

    @property
    def test_lengths(self) -> Optional[torch.Tensor]:
        """The held-out sequences' lengths ``(N,)`` when they are ragged (``lengths_arg``), else None."""
        return self.test_inputs[self.lengths_arg] if self.lengths_arg is not None and self.test_inputs else None

    @property
    def test_mask(self) -> Optional[torch.Tensor]:
        """The held-out data's mask (the second input, e.g. frames observed ``(N, T)``), or None."""
        return self.test_inputs[1] if len(self.test_inputs) > 1 else None

    def _setup_optimizer(self, batch: Data) -> None:
        """Collect every parameter model and guide use and build Adam: the ``parameters()`` of
        ``nn.Module`` models and guides, plus ``pyro.param`` sites found by a dry run (as Pyro's SVI
        does). Sites that ``pyro.module`` registered are taken from the modules themselves, so stale
        entries of the global param store (another model built under the same names) are ignored."""
        batch = as_inputs(batch, "batch")
        self._set_mode(False)  # a dry run that leaves batch-norm statistics alone
        with torch.no_grad(), poutine.trace(param_only=True) as param_capture:
            self.elbo.differentiable_loss(self.model, self.guide, *batch)
        self._set_mode(True)
        modules = torch.nn.ModuleList(_modules(self.model, self.guide))  # a submodule both share counts once
        params = [p for p in modules.parameters() if p.requires_grad]
        seen = {id(p) for p in params}
        for name, site in param_capture.trace.nodes.items():
            value = site["value"].unconstrained()
            if MODULE_DIVIDER not in name and id(value) not in seen:
                seen.add(id(value))
                params.append(value)
        self.params = params
        self.buffers = list(modules.buffers())  # the shared temperature once: one graph input
        # fused: one kernel over every parameter (3x faster than the per-tensor loop on a CPU for the DMM's
        # 0.7M parameters; the same update up to float rounding)
        self.optimizer = torch.optim.Adam(params, lr=self.config.lr, amsgrad=self.config.amsgrad,
                                          weight_decay=self.config.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=self.config.lr_decay_every, gamma=self.config.lr_decay
        )

    def _set_mode(self, training: bool) -> None:
        for module in _modules(self.model, self.guide):
            module.train(training)

    # ------------------------------------------------------------------------------------ the steps
    def loss(self, batch: Data) -> torch.Tensor:
        """The ELBO's differentiable loss on ``batch`` (summed over examples), compiled when ``jit``.

        Compilation (``torch.jit.trace``, once per batch shape) takes every parameter and buffer as a
        graph input, as ``pyro.ops.jit`` does, but keeps the list instead of looking each parameter up in
        the param store on every call. Python values read while tracing (e.g. KL weights) are frozen.
        The graph runs without TorchScript's optimising passes, which may reorder independent random
        ops (seen on the HRSSM: the z_t and s_t noise of different steps swapped), so a compiled step
        draws exactly the eager step's numbers; on CPU it was also the faster executor (HRSSM at width
        32, one thread: 0.80x the eager step unoptimised, 0.88x optimised).
        """
        batch = as_inputs(batch, "batch")
        if not self.config.jit:
            return self.elbo.differentiable_loss(self.model, self.guide, *batch)
        key = tuple(None if t is None else (tuple(t.shape), t.dtype) for t in batch)
        given = [t for t in batch if t is not None]  # the graph's data inputs; None arguments stay None
        if key not in self._compiled:
            def loss_fn(*inputs):  # inputs: params, buffers, batch; used by identity in the traces
                data = iter(inputs[len(inputs) - len(given):])
                return self.elbo.differentiable_loss(self.model, self.guide,
                                                     *(None if t is None else next(data) for t in key))

            # Tracing runs the loss once: undo its side effects (random draws, batch-norm statistics) so
            # the compiled step that follows is the step an eager run would take.
            rng_state, buffers = torch.get_rng_state(), [b.clone() for b in self.buffers]
            with pyro.validation_enabled(False), warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                self._compiled[key] = torch.jit.trace(loss_fn, (*self.params, *self.buffers, *given), check_trace=False)
                for buffer, saved in zip(self.buffers, buffers):
                    buffer.copy_(saved)
            torch.set_rng_state(rng_state)
        with torch.jit.optimized_execution(False):  # the recorded op order: the eager run's random draws
            return self._compiled[key](*self.params, *self.buffers, *given)

    def step(self, batch: Data, validate: bool = True) -> float:
        """One SVI step on ``batch``; returns the loss per example (the negative training objective).
        ``validate``: under Pyro's and torch's argument validation as set globally (``pyro.enable_validation``);
        False: without it, whatever the global setting."""
        batch = as_inputs(batch, "batch")
        size = batch[0].shape[0]
        with contextlib.nullcontext() if validate else pyro.validation_enabled(False):
            loss = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        scaled = loss / (size * self.units_per_example) if self.config.mean_loss else loss
        scaled.backward()
        for callback in self.callbacks:
            callback.after_backward(self)
        checks = [loss.detach()]
        if self.world.parallel:  # one all-reduce: the gradients of the global batch and its loss
            checks[0] = distributed.all_reduce_gradients(self.params, loss, self.world, average=self.config.mean_loss)
            size *= self.world.size  # equal shards: every rank's batch has this rank's size
        if self.config.clip_norm is not None:
            checks.append(torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_norm))
        values = torch.stack([c.float().reshape(()) for c in checks]).tolist()  # the step's one host synchronisation
        value = values[0]
        if not math.isfinite(value):  # stopped before the optimiser moves anything
            self._diverged(f"loss is {value}")
        if len(values) > 1 and not math.isfinite(values[1]):
            self._diverged(f"gradient norm is {values[1]}")
        self.optimizer.step()
        failpoints.reach("step")
        return value / size

    def _diverged(self, what: str) -> None:
        if self.run is not None and self.epoch > 0:
            where = (f"the last good checkpoint is {self.run.checkpoint_path} (epoch {self.epoch}). Lower lr or set "
                     "clip_norm, then resume=True (both may change on resume)")
        else:
            where = "no checkpoint was written yet. Lower lr or set clip_norm, then start the run again (the folder is reused)"
        raise TrainingDiverged(f"{what} in epoch {self.epoch + 1}: training stopped; {where}")

    @torch.no_grad()
    def evaluate(self, data: Data) -> Dict[str, float]:
        """Held-out ELBO, log-likelihood and KL, in nats per example, in eval mode (true ELBO); for ragged
        sequences also ``elbo_per_step`` (nats per time step: the sum over sequences divided by the sum of
        their lengths), scored in batches of sequences of similar length."""
        inputs = as_inputs(data)
        size = inputs[0].shape[0]
        mine = take(inputs, distributed.rows_of(size, self.world))  # this rank's examples (all in one process)
        if self.lengths_arg is not None:  # longest first: each batch cut to similar lengths
            mine = take(mine, torch.argsort(mine[self.lengths_arg], descending=True, stable=True))
        self._set_mode(False)
        totals = torch.zeros(3)
        step = self.config.eval_batch_size if self.lengths_arg is None else min(self.config.eval_batch_size,
                                                                                self.config.batch_size)
        for start in range(0, mine[0].shape[0], step):
            batch = cut_to_length(take(mine, slice(start, start + step), self.device), self.lengths_arg)
            terms = elbo_terms(self.model, self.guide, *batch)
            totals += torch.stack(list(terms)).detach().cpu()
        self._set_mode(True)
        totals = distributed.all_reduce_sum(totals.to(self.device), self.world).cpu()
        elbo, log_lik, kl = (totals / size).tolist()
        if not all(map(math.isfinite, (elbo, log_lik, kl))):
            self._diverged(f"held-out ELBO is {elbo}")
        result = {"elbo": elbo, "log_lik": log_lik, "kl": kl}
        if self.lengths_arg is not None:
            result["elbo_per_step"] = float(totals[0]) / int(inputs[self.lengths_arg].sum())
        return result

    def _epoch_order(self, train: Inputs) -> torch.Tensor:
        """This rank's examples of the epoch in batch order, drawn from ``self.generator`` (so a resumed run
        draws the same): a random permutation, or for ragged sequences :func:`bucketed_order`."""
        if self.lengths_arg is None:
            return distributed.shard(torch.randperm(train[0].shape[0], generator=self.generator), self.world)
        global_batch = self.config.batch_size * self.world.size  # consecutive global batches, then sharded
        order = bucketed_order(train[self.lengths_arg].cpu(), global_batch, self.config.bucket_batches, self.generator)
        return distributed.shard(order, self.world)

    def _train_epoch(self, train: Inputs, epoch: int) -> float:
        self._set_mode(True)
        order = self._epoch_order(train)
        num_batches = math.ceil(order.numel() / self.config.batch_size)
        total = 0.0
        bar = tqdm(
            range(num_batches), desc=f"epoch {epoch}/{self.config.epochs}", leave=False,
            disable=not (self.config.progress and self.world.main), dynamic_ncols=True,
        )
        for i in bar:
            index = order[i * self.config.batch_size : (i + 1) * self.config.batch_size]
            batch = cut_to_length(take(train, index, self.device), self.lengths_arg)
            if self.batch_transform is not None:
                batch = (self.batch_transform(batch[0], self.transform_generator), *batch[1:])
            for callback in self.callbacks:
                callback.before_step(self, batch)
            loss = self.step(batch, validate=self.config.check_every_step or i == 0)
            for callback in self.callbacks:
                callback.on_step_end(self, loss)
            total += loss * batch[0].shape[0]
            if i % 10 == 0:
                bar.set_postfix(loss=f"{loss:.2f}")
        return total / order.numel()

    # ------------------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict[str, Any]:
        return {
            "epoch": self.epoch,
            "modules": [m.state_dict() for m in _modules(self.model, self.guide)],
            "param_store": pyro.get_param_store().get_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "callbacks": [c.state_dict() for c in self.callbacks],
            "generator": self.generator.get_state(),
            "rng": _rng_state(),
            "config": asdict(self.config),
            "best_valid_elbo": self.best,
            **self._rank_states(),
        }

    def _rank_states(self) -> Dict[str, Any]:
        """In a parallel run, every rank's random state (gathered: a collective call on every rank)."""
        if not self.world.parallel:
            return {}
        mine = {"rng": _rng_state(), "transform_generator": self.transform_generator.get_state()}
        return {"world_size": self.world.size, "ranks": distributed.gather_objects(mine, self.world)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for module, module_state in zip(_modules(self.model, self.guide), state["modules"]):
            module.load_state_dict(module_state)
        pyro.get_param_store().set_state(state["param_store"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_learning_rate(state["epoch"])
        for callback, callback_state in zip(self.callbacks, state["callbacks"]):
            callback.load_state_dict(callback_state)
        self.generator.set_state(state["generator"])
        self.epoch = state["epoch"]
        self.best = state.get("best_valid_elbo")
        if not self.world.parallel:
            _set_rng_state(state["rng"])
        elif state.get("world_size") == self.world.size:
            _set_rng_state(state["ranks"][self.world.rank]["rng"])
            self.transform_generator.set_state(state["ranks"][self.world.rank]["transform_generator"])
        else:  # another number of ranks: a fresh, deterministic stream per rank and epoch (not draw-for-draw)
            seed = distributed.rank_seed(self.config.seed, self.world) + self.world.size * self.epoch
            pyro.set_rng_seed(seed)
            self.transform_generator.manual_seed(seed)

    def _apply_learning_rate(self, epoch: int) -> None:
        """The staircase rate of ``epoch`` from this config's ``lr`` (which may differ from the stored run's):
        ``lr * lr_decay ** (epoch // lr_decay_every)``, as an uninterrupted run with this ``lr`` has it."""
        rate = self.config.lr * self.config.lr_decay ** (epoch // self.config.lr_decay_every)
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["lr"] = self.config.lr, rate
        self.scheduler.base_lrs = [self.config.lr] * len(self.optimizer.param_groups)

    # ------------------------------------------------------------------------------------- the loop
    def fit(self, train: Data, test: Data, resume: bool = False, valid: Optional[Data] = None) -> List[Dict[str, Any]]:
        """Train for ``config.epochs`` epochs (continuing a stored run when ``resume``) on ``train``, scoring
        ``test`` (tensors or tuples of the model's arguments); returns the metrics of every epoch run here.
        With ``valid`` (a validation split), each epoch also scores it (``valid_elbo``) and the run keeps the
        weights of the epoch with the best validation ELBO as ``best.pt`` (model selection)."""
        train, test = as_inputs(train, "train"), as_inputs(test, "test")
        valid = as_inputs(valid, "valid") if valid is not None else None
        if train[0].shape[0] == 0 or test[0].shape[0] == 0:
            raise ValueError(f"train and test need examples, got {train[0].shape[0]} and {test[0].shape[0]}")
        if len(train) != len(test):
            raise ValueError(f"train and test: expected the same model arguments, got {len(train)} and {len(test)} tensors")
        pyro.set_rng_seed(distributed.rank_seed(self.config.seed, self.world))
        train, test = place(train, self.device), place(test, self.device)
        valid = place(valid, self.device) if valid is not None else None
        self.test_inputs = test
        train_eval = take(train, slice(0, self.config.train_eval_size), self.device)
        if self.batch_transform is not None:  # a fixed draw, so train_elbo is comparable across epochs
            train_eval = (self.batch_transform(train_eval[0], torch.Generator().manual_seed(self.config.seed)), *train_eval[1:])
        self._setup_optimizer(cut_to_length(take(train_eval, slice(0, self.config.batch_size)), self.lengths_arg))
        with torch.no_grad():
            distributed.broadcast_tensors([*self.params, *self.buffers], self.world)  # every rank starts from rank 0's
        for callback in self.callbacks:
            callback.on_train_start(self)
        if resume:
            if self.resume_dir is None:
                raise ValueError("resume needs a run directory")
            self.load_state_dict(read_checkpoint(self.resume_dir, map_location=self.device))
            if self.run is not None:
                self.run.truncate_metrics(self.epoch)
        try:
            while self.epoch < self.config.epochs:
                self.history.append(self._run_epoch(train, train_eval, test, self.epoch + 1, valid))
        finally:
            for callback in self.callbacks:
                callback.on_train_end(self)
        return self.history

    def _held_out_metrics(self, train_eval: Inputs, test: Inputs, valid: Optional[Inputs]) -> Dict[str, Any]:
        """``train_elbo``, ``test_elbo``, ``test_log_lik``, ``kl`` (nats per example), ``valid_elbo`` with a
        validation split, and for ragged sequences each ELBO per time step (``*_elbo_per_step``)."""
        scored = {"train": self.evaluate(train_eval), "test": self.evaluate(test)}
        if valid is not None:
            scored["valid"] = self.evaluate(valid)
        metrics = {f"{split}_elbo": result["elbo"] for split, result in scored.items()}
        metrics.update(test_log_lik=scored["test"]["log_lik"], kl=scored["test"]["kl"])
        for split, result in scored.items():
            if "elbo_per_step" in result:
                metrics[f"{split}_elbo_per_step"] = result["elbo_per_step"]
        return metrics

    def _keep_best(self, metrics: Dict[str, Any], epoch: int) -> None:
        """With a validation split, write ``best.pt`` (the weights) when this epoch's ``valid_elbo`` is the best."""
        if "valid_elbo" not in metrics or (self.best is not None and metrics["valid_elbo"] <= self.best):
            return
        self.best = metrics["valid_elbo"]
        if self.run is not None:
            self.run.save_best({"epoch": epoch, "valid_elbo": self.best, "param_store": pyro.get_param_store().get_state(),
                                "modules": [m.state_dict() for m in _modules(self.model, self.guide)]})

    def scores(self, epoch: int) -> bool:
        """Whether ``epoch`` scores the held-out data and runs the per-epoch reports (``eval_every``)."""
        return epoch % self.config.eval_every == 0 or epoch == self.config.epochs

    def _run_epoch(self, train, train_eval, test, epoch: int, valid: Optional[Inputs] = None) -> Dict[str, Any]:
        start = time.perf_counter()
        for callback in self.callbacks:
            callback.on_epoch_start(self, epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        objective = self._train_epoch(train, epoch)
        train_seconds = time.perf_counter() - start  # the SVI steps alone, without scoring and reports
        self.scheduler.step()
        with torch.no_grad():
            distributed.broadcast_tensors(self.buffers, self.world)  # e.g. batch-norm statistics, as DDP keeps them
        held_out = self._held_out_metrics(train_eval, test, valid) if self.scores(epoch) else {}
        metrics: Dict[str, Any] = {"epoch": epoch, "train_objective": -objective, **held_out, "lr": lr}
        for callback in self.callbacks if held_out else ():  # the reports run on scoring epochs
            metrics.update(callback.on_epoch_end(self, epoch))
        metrics["train_s"], metrics["time_s"] = train_seconds, time.perf_counter() - start
        self.epoch = epoch
        self._keep_best(metrics, epoch)
        state = self.state_dict() if self.run is not None or self.world.parallel else None  # collective when parallel
        if self.run is not None:
            self.run.log_metrics(metrics)
            self.run.save_checkpoint(state)
            if held_out:
                plots.curves(self.run.read_metrics(), ["train_elbo", "valid_elbo", "test_elbo"],
                             self.run.figure_path("elbo_curves"), "ELBO (nats per example) on each split")
        for callback in self.callbacks:
            callback.after_epoch(self, epoch, metrics)
        if self.config.progress and self.world.main and held_out:
            tqdm.write(
                f"epoch {epoch}: train ELBO {metrics['train_elbo']:.2f}, test ELBO {metrics['test_elbo']:.2f}, "
                f"KL {metrics['kl']:.2f} nats/example ({metrics['time_s']:.1f}s)"
            )
        return metrics
