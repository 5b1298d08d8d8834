"""The SVI step: Pyro's ELBO as a module over the model and guide, Adam over that module's parameters,
clipping, and the optional compiled loss.

The loss is ``elbo(model, guide)``, Pyro's :class:`~pyro.infer.elbo.ELBOModule`, run under
``pyro.settings.context(module_local_params=True)`` (the route of Pyro's ``examples/svi_lightning.py``):
the parameters live in the modules, the optimiser holds the module's ``parameters()``, and no global
param store sits between the two. A ``PyroModule`` runs only in the mode it was built in, so a model or
guide holding one built without that setting (``AutoNormal(model)`` in a plain session) trains through
the global store instead, with the same results; build it under
``pyro.settings.context(module_local_params=True)`` (or set the setting first) for the local route. The models of this library register themselves with
:func:`pyro_models.params.register`, which is a no-op in that mode (``pyro.module``'s per-parameter
messages were most of the SVI overhead, ``docs/benchmarks.md``). ``pyro.param`` sites outside modules
(a function guide's ``pyro.param("loc", ...)``) still live in the global store: a dry run finds them,
they are optimised and checkpointed with the rest, and restored in place, so the optimiser keeps
training the tensors the guide reads.
"""
from __future__ import annotations

from collections import OrderedDict
import contextlib
import math
import warnings
from typing import Callable, Dict, List, Optional

import pyro
import torch
from pyro import poutine
from pyro.nn import PyroModule
from pyro.params.param_store import user_param_name

from . import distributed
from ..runs import failpoints
from .averaging import WeightAverage
from .elbo import make_elbo
from .config import TrainConfig
from .data import Data, as_inputs

ADAM_BETA2 = 0.999  # Adam's second-moment decay (PyTorch's default and every reference recipe's)
MAX_COMPILED = 32  # traced losses kept (one per batch shape; ragged batches are cut to COMPILED_LENGTH_MULTIPLE)


class NonFinite(RuntimeError):
    """A loss or gradient norm that is NaN or infinite; the optimiser has not moved."""


def built_for_local_params(*objs) -> bool:
    """Whether every ``PyroModule`` inside ``objs`` (e.g. an autoguide) was built under Pyro's
    ``module_local_params`` setting: such a module runs only in the mode it was built in."""
    for module in modules(*objs):
        for sub in module.modules():
            if isinstance(sub, PyroModule) and not hasattr(sub._pyro_context, "param_state"):
                return False
    return True


def local_params(enabled: bool = True):
    """Pyro's module-local parameter mode (``enabled``) or the global param store, for a block."""
    return pyro.settings.context(module_local_params=enabled)


def modules(*objs) -> List[torch.nn.Module]:
    """The ``nn.Module`` among ``objs`` (a model or guide may be a plain function)."""
    return [o for o in objs if isinstance(o, torch.nn.Module)]


def _cloned(value):
    """A copy of nested dicts of tensors (a ``state_dict`` may hold a module's extra state as a dict)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return type(value)((k, _cloned(v)) for k, v in value.items())
    return value


class SVIStep:
    """SVI on ``model``/``guide`` with ``config``: ``setup(batch)`` once, then ``step(batch)``.

    ``units_per_example``: with ``config.mean_loss`` the gradient step uses the loss divided by ``batch *
    units_per_example`` (e.g. frames per sequence). ``world``: gradients are all-reduced over its ranks
    each step (:mod:`inference.training.distributed`). ``vectorize_particles``: draw ``num_particles`` at
    once (False: one after another, for models that cannot broadcast over a particle dimension)."""

    def __init__(self, model: Callable, guide: Callable, config: TrainConfig, units_per_example: float = 1,
                 world: Optional[distributed.World] = None, vectorize_particles: bool = True):
        self.model, self.guide, self.config = model, guide, config
        self.units_per_example = units_per_example
        self.world = world if world is not None else distributed.current_world()
        self.objective = make_elbo(config.elbo, config.num_particles, vectorize_particles)(model, guide)  # an nn.Module
        # module-local parameters, unless a PyroModule (an autoguide) was built for the global store
        self.local = built_for_local_params(model, guide)
        self.params: List[torch.Tensor] = []
        self.store_params: Dict[str, torch.Tensor] = {}  # pyro.param sites outside modules (unconstrained)
        self.buffers: List[torch.Tensor] = []
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None
        self.average: Optional[WeightAverage] = None  # Polyak averages of params (config.ema_decay > 0)
        self._compiled: "OrderedDict[tuple, Callable]" = OrderedDict()  # batch shape -> traced loss (config.jit), newest last

    def set_mode(self, training: bool) -> None:
        for module in modules(self.model, self.guide):
            module.train(training)

    def setup(self, batch: Data) -> None:
        """Create every parameter (a dry run on ``batch`` in eval mode: lazily built ones such as an
        autoguide's appear) and build Adam over them: the modules' ``parameters()`` and the ``pyro.param``
        sites outside modules."""
        batch = as_inputs(batch, "batch")
        self.set_mode(False)  # a dry run that leaves batch-norm statistics alone
        with local_params(self.local), torch.no_grad(), poutine.trace(param_only=True) as capture:
            self.objective.elbo.differentiable_loss(self.model, self.guide, *batch)
        self.set_mode(True)
        params = [p for p in self.objective.parameters() if p.requires_grad]  # a shared submodule once
        seen = {id(p) for p in params}
        for name, site in capture.trace.nodes.items():
            value = site["value"]
            value = value.unconstrained() if hasattr(value, "unconstrained") else value  # the optimised tensor
            # pyro.module-registered names ("module$$$param") are module parameters, found above
            if id(value) not in seen and user_param_name(name) == name:
                seen.add(id(value))
                params.append(value)
                self.store_params[name] = value
        self.params = params
        self.buffers = list(self.objective.buffers())  # a shared buffer once: one graph input
        # fused: one kernel over every parameter (3x faster than the per-tensor loop on a CPU for the DMM's
        # 0.7M parameters; the same update up to float rounding)
        self.optimizer = torch.optim.Adam(params, lr=self.config.lr, amsgrad=self.config.amsgrad, betas=(self.config.beta1, ADAM_BETA2),
                                          weight_decay=self.config.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=self.config.lr_decay_every,
                                                         gamma=self.config.lr_decay)
        self.average = WeightAverage(params, self.config.ema_decay) if self.config.ema_decay > 0 else None

    # ------------------------------------------------------------------------------ state
    def weights(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """The trained values: the objective module's ``state_dict`` and the ``pyro.param`` sites."""
        return {"objective": self.objective.state_dict(),
                "pyro_params": {name: value.detach().clone() for name, value in self.store_params.items()}}

    def load_weights(self, state: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """Restore :meth:`weights` in place: the optimiser keeps the tensors it steps."""
        self.objective.load_state_dict(state["objective"])
        with torch.no_grad():
            for name, value in state.get("pyro_params", {}).items():
                self.store_params[name].copy_(value)

    def averaged(self):
        """A block in which the parameters hold their Polyak averages (``config.ema_decay > 0``; otherwise
        the raw weights): what held-out scores, reports and ``best.pt`` use."""
        return self.average.swapped() if self.average is not None else contextlib.nullcontext()

    def averaged_weights(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """A copy of :meth:`weights` as :meth:`averaged` has them (the raw weights without averaging)."""
        with self.averaged():
            return _cloned(self.weights())

    def averaging_state(self) -> Dict[str, object]:
        """The averages for a checkpoint: ``averaged`` (:meth:`averaged_weights`) and ``average`` (the step
        count); empty without averaging."""
        if self.average is None:
            return {}
        return {"averaged": self.averaged_weights(), "average": self.average.state_dict()}

    def load_averaging_state(self, state: Dict[str, object]) -> None:
        """Restore :meth:`averaging_state`; call after the raw weights are loaded (either checkpoint format).
        A checkpoint written without averaging starts the averages at those weights."""
        if self.average is None:
            return
        if "averaged" not in state:
            self.average.take_from_params()
            return
        with self.average.swapped():  # the raw weights come back afterwards
            self.load_weights(state["averaged"])
            self.average.take_from_params()
        self.average.load_state_dict(state["average"])

    # ------------------------------------------------------------------------------ the step
    def loss(self, batch: Data) -> torch.Tensor:
        """The ELBO's differentiable loss on ``batch`` (summed over examples), compiled when ``jit``.

        Compilation (``torch.jit.trace``, once per batch shape; the :data:`MAX_COMPILED` shapes used last
        are kept) takes every parameter and buffer as a
        graph input, as ``pyro.ops.jit`` does. Python values read while tracing (e.g. KL weights) are
        frozen. The graph runs without TorchScript's optimising passes, which may reorder independent
        random ops (seen on the HRSSM: the z_t and s_t noise of different steps swapped), so a compiled step
        draws exactly the eager step's numbers; on CPU it was also the faster executor (HRSSM at width 32,
        one thread: 0.80x the eager step unoptimised, 0.88x optimised).
        """
        batch = as_inputs(batch, "batch")
        with local_params(self.local):
            if not self.config.jit:
                return self.objective(*batch)
            key = tuple(None if t is None else (tuple(t.shape), t.dtype) for t in batch)
            if key not in self._compiled:
                self._compiled[key] = self._trace(key, [t for t in batch if t is not None])
                if len(self._compiled) > MAX_COMPILED:  # a trace of an unrolled sequence model is large
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(key)
            with torch.jit.optimized_execution(False):  # the recorded op order: the eager run's random draws
                return self._compiled[key](*self.params, *self.buffers, *[t for t in batch if t is not None])

    def _trace(self, key: tuple, given: List[torch.Tensor]) -> Callable:
        """The loss traced for batches like ``key``, its side effects (random draws, batch-norm statistics)
        undone, so that the compiled step that follows is the step an eager run would take."""
        def loss_fn(*inputs):  # inputs: params, buffers, batch; used by identity in the traces
            data = iter(inputs[len(inputs) - len(given):])
            return self.objective(*(None if t is None else next(data) for t in key))

        rng_state, buffers = torch.get_rng_state(), [b.clone() for b in self.buffers]
        with pyro.validation_enabled(False), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(loss_fn, (*self.params, *self.buffers, *given), check_trace=False)
            for buffer, saved in zip(self.buffers, buffers):
                buffer.copy_(saved)
        torch.set_rng_state(rng_state)
        return traced

    def step(self, batch: Data, validate: bool = True, after_backward: Optional[Callable[[], None]] = None) -> float:
        """One SVI step on ``batch``; returns the loss per example (the negative training objective).
        ``validate``: under Pyro's and torch's argument validation as set globally; False: without it.
        ``after_backward()`` runs when the gradients exist, before they are all-reduced and clipped.
        Raises :class:`NonFinite`, before the optimiser moves, when the loss or gradient norm is not finite."""
        batch = as_inputs(batch, "batch")
        size = batch[0].shape[0]
        with contextlib.nullcontext() if validate else pyro.validation_enabled(False):
            loss = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        scaled = loss / (size * self.units_per_example) if self.config.mean_loss else loss
        scaled.backward()
        if after_backward is not None:
            after_backward()
        checks = [loss.detach()]
        if self.world.parallel:  # one all-reduce: the gradients of the global batch and its loss
            checks[0] = distributed.all_reduce_gradients(self.params, loss, self.world, average=self.config.mean_loss)
            size *= self.world.size  # equal shards: every rank's batch has this rank's size
        if self.config.clip_norm is not None:
            checks.append(torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_norm))
        values = torch.stack([c.float().reshape(()) for c in checks]).tolist()  # the step's one host synchronisation
        if not math.isfinite(values[0]):
            raise NonFinite(f"loss is {values[0]}")
        if len(values) > 1 and not math.isfinite(values[1]):
            raise NonFinite(f"gradient norm is {values[1]}")
        self.optimizer.step()
        if self.average is not None:
            self.average.update()
        failpoints.reach("step")
        return values[0] / size

    def apply_learning_rate(self, epoch: int) -> None:
        """The staircase rate of ``epoch`` from this config's ``lr`` (which may differ from a stored run's):
        ``lr * lr_decay ** (epoch // lr_decay_every)``, as an uninterrupted run with this ``lr`` has it."""
        rate = self.config.lr * self.config.lr_decay ** (epoch // self.config.lr_decay_every)
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["lr"] = self.config.lr, rate
        self.scheduler.base_lrs = [self.config.lr] * len(self.optimizer.param_groups)
