"""One SVI trainer for every model of the project: the loop.

The trainer knows nothing of the model: it takes a model and a guide with one signature, an ELBO choice
and data, a tensor whose first axis indexes examples or a tuple of such tensors (the model's arguments,
e.g. ``(x, mask, lengths)``); a batch is the same rows of each, passed as ``model(*batch)``. Each step
is :class:`~.step.SVIStep`; what a model adds (KL schedules, reports, figures, TensorBoard) comes in
through :class:`~.callbacks.Callback` objects; what a checkpoint holds is :class:`~.checkpoint.Checkpointer`'s.

Every epoch writes one line of ``metrics.jsonl`` (nats per example, higher ELBO is better) and an
atomically written checkpoint; ``fit(resume=True)`` continues a run exactly where it stopped. With a
:class:`~inference.training.distributed.World` of several ranks (a ``torchrun`` launch) each rank trains on its
shard of every epoch and gradients are all-reduced each step; a 1-rank world is the plain
single-process trainer, draw for draw.
"""
from __future__ import annotations

import contextlib
import errno
import math
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import pyro
import torch
from tqdm.auto import tqdm

from . import distributed
from .batching import COMPILED_LENGTH_MULTIPLE, bucketed_order, cut_to_length
from .distributed import World
from .elbo import elbo_terms
from ..runs.rundir import RunDir, read_checkpoint
from .callbacks import Callback, CallbackList
from .checkpoint import Checkpointer
from .config import TrainConfig
from .data import Data, Inputs, as_inputs, place, take
from .step import NonFinite, SVIStep, local_params, modules

TIMINGS = ("train_s", "time_s", "cpu_s")  # the metrics that measure time, and so differ between identical runs
BatchTransform = Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; the last good checkpoint is kept."""


STORAGE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EIO)


class RunStorageError(OSError):
    """The run folder could not be written (no space, read-only); the message says what it still holds."""


class Interrupted(KeyboardInterrupt):
    """Training was stopped by Ctrl-C between two steps; the message names the checkpoint kept."""


def batch_slices(num: int, size: int) -> List[slice]:
    """Consecutive batches of ``size`` over ``num`` examples; a last batch of one example joins the one
    before it (batch norm cannot normalise one example in training mode)."""
    starts = list(range(0, num, size))
    if len(starts) > 1 and num - starts[-1] == 1:
        starts.pop()
    return [slice(start, end) for start, end in zip(starts, starts[1:] + [num])]


class Trainer:
    """SVI over ``model``/``guide`` (callables of a batch's tensors, ``model(*batch)``) with ``config``.

    ``run``: where config, metrics and checkpoints go (None: nowhere). ``callbacks``: in the order they
    are called. ``batch_transform(x, generator)``: applied to the first tensor of each training batch
    (e.g. dynamic binarisation), and with a fixed draw to the training examples scored each epoch unless
    it has ``for_scoring = False`` (an augmentation: the training data are then scored as they are).
    ``units_per_example``: see :class:`~.step.SVIStep`. ``lengths_arg``: for
    sequences of different lengths, the position of their lengths ``(N,)`` among the model's arguments;
    batches are then formed from sequences of similar length (:func:`~inference.training.batching.bucketed_order`),
    every batch is cut to its own longest sequence, and metrics gain ``*_per_step`` values (nats per time
    step). ``resume_dir``: where ``fit(resume=True)`` reads the checkpoint (default: ``run``).
    ``vectorize_particles``: False for models whose programs cannot broadcast over a particle dimension
    (``num_particles`` draws are then taken one after another).

    Ctrl-C (SIGINT) stops training between two steps with :class:`Interrupted`, which names the
    checkpoint kept; a second Ctrl-C stops at once.
    """

    def __init__(self, model: Callable, guide: Callable, config: TrainConfig, run: Optional[RunDir] = None,
                 callbacks: Sequence[Callback] = (), batch_transform: Optional[BatchTransform] = None,
                 units_per_example: float = 1, world: Optional[World] = None, resume_dir: Optional[str] = None,
                 lengths_arg: Optional[int] = None, vectorize_particles: bool = True):
        self.model, self.guide, self.config, self.run = model, guide, config, run
        self.callbacks = CallbackList(callbacks)
        self.batch_transform, self.lengths_arg = batch_transform, lengths_arg
        self.world = world if world is not None else distributed.current_world()
        self.resume_dir = resume_dir if resume_dir is not None else (run.path if run is not None else None)
        self.device = torch.device(distributed.rank_device(config.device, self.world))
        for module in modules(model, guide):
            module.to(self.device)
        self.svi = SVIStep(model, guide, config, units_per_example, self.world, vectorize_particles)
        self.checkpoints = Checkpointer(self)
        self.generator = torch.Generator().manual_seed(config.seed)  # the epochs' order: the same on every rank
        # batch transforms draw from it too in one process; from their own stream per rank otherwise
        self.transform_generator = (torch.Generator().manual_seed(distributed.rank_seed(config.seed, self.world))
                                    if self.world.parallel else self.generator)
        self.epoch = 0
        self.best: Optional[float] = None  # the best validation ELBO so far (with a validation split)
        self.history: List[Dict[str, Any]] = []
        self.test_inputs: Inputs = ()

    # ----------------------------------------------------------------------------- what callbacks read
    @property
    def params(self) -> List[torch.Tensor]:
        return self.svi.params

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        return self.svi.optimizer

    @property
    def test_data(self) -> Optional[torch.Tensor]:
        """The held-out examples (the first of the held-out inputs)."""
        return self.test_inputs[0] if self.test_inputs else None

    @property
    def test_lengths(self) -> Optional[torch.Tensor]:
        """The held-out sequences' lengths ``(N,)`` when they are ragged (``lengths_arg``), else None."""
        return self.test_inputs[self.lengths_arg] if self.lengths_arg is not None and self.test_inputs else None

    @property
    def test_mask(self) -> Optional[torch.Tensor]:
        """The held-out data's mask (the second input, e.g. frames observed ``(N, T)``), or None."""
        return self.test_inputs[1] if len(self.test_inputs) > 1 else None

    # ----------------------------------------------------------------------------------- steps
    def setup(self, batch: Data) -> None:
        """Create the parameters and the optimiser (:meth:`SVIStep.setup`) from a sample ``batch``."""
        self.svi.setup(batch)

    def loss(self, batch: Data) -> torch.Tensor:
        return self.svi.loss(batch)

    def step(self, batch: Data, validate: bool = True) -> float:
        """One SVI step on ``batch``; returns the loss per example. Raises :class:`TrainingDiverged` when it
        is not finite, before the optimiser moves."""
        try:
            return self.svi.step(batch, validate, lambda: self.callbacks.call("on_after_backward", self))
        except NonFinite as problem:
            self._diverged(str(problem))

    def _diverged(self, what: str) -> None:
        advice = ("Lower lr or set clip_norm" if self.config.clip_norm is None
                  else f"Lower lr or clip_norm (now {self.config.clip_norm:g})")
        if self.run is not None and self.epoch > 0:
            where = (f"the last good checkpoint is {self.run.checkpoint_path} (epoch {self.epoch}). {advice}, "
                     "then resume=True (both may change on resume)")
        else:
            where = f"no checkpoint was written yet. {advice}, then start the run again (the folder is reused)"
        raise TrainingDiverged(f"{what} in epoch {self.epoch + 1}: training stopped; {where}")

    @torch.no_grad()
    def evaluate(self, data: Data) -> Dict[str, float]:
        """Held-out ELBO, log-likelihood and KL, in nats per example, in eval mode (true ELBO; with the
        Polyak averages of the weights when ``ema_decay > 0``); for ragged
        sequences also ``elbo_per_step`` (the sum over sequences divided by the sum of their lengths),
        scored in batches of sequences of similar length."""
        inputs = as_inputs(data)
        size = inputs[0].shape[0]
        mine = take(inputs, distributed.rows_of(size, self.world))  # this rank's examples (all in one process)
        step = self.config.eval_batch_size
        if self.lengths_arg is not None:  # longest first: each batch cut to similar lengths
            mine = take(mine, torch.argsort(mine[self.lengths_arg], descending=True, stable=True))
            step = min(step, self.config.batch_size)
        self.svi.set_mode(False)
        totals = torch.zeros(3)
        with local_params(self.svi.local), self.svi.averaged():
            for start in range(0, mine[0].shape[0], step):
                batch = cut_to_length(take(mine, slice(start, start + step), self.device), self.lengths_arg)
                totals += torch.stack(list(elbo_terms(self.model, self.guide, *batch))).detach().cpu()
        self.svi.set_mode(True)
        totals = distributed.all_reduce_sum(totals.to(self.device), self.world).cpu()
        elbo, log_lik, kl = (totals / size).tolist()
        if not all(map(math.isfinite, (elbo, log_lik, kl))):
            self._diverged(f"held-out ELBO is {elbo}")
        result = {"elbo": elbo, "log_lik": log_lik, "kl": kl}
        if self.lengths_arg is not None:
            result["elbo_per_step"] = float(totals[0]) / int(inputs[self.lengths_arg].sum())
        return result

    def epoch_order(self, train: Inputs) -> torch.Tensor:
        """This rank's examples of the epoch in batch order, drawn from ``self.generator`` (so a resumed run
        draws the same): a random permutation, or for ragged sequences :func:`bucketed_order`."""
        if self.lengths_arg is None:
            return distributed.shard(torch.randperm(train[0].shape[0], generator=self.generator), self.world)
        global_batch = self.config.batch_size * self.world.size  # consecutive global batches, then sharded
        order = bucketed_order(train[self.lengths_arg].cpu(), global_batch, self.config.bucket_batches, self.generator)
        return distributed.shard(order, self.world)

    def train_epoch(self, train: Inputs, epoch: int) -> float:
        """One pass over ``train``; returns the mean loss per example."""
        self.svi.set_mode(True)
        order = self.epoch_order(train)
        total = 0.0
        slices = batch_slices(order.numel(), self.config.batch_size)
        bar = tqdm(range(len(slices)), desc=f"epoch {epoch}/{self.config.epochs}", leave=False,
                   disable=not (self.config.progress and self.world.main), dynamic_ncols=True)
        for i in bar:
            self._stop_if_interrupted()
            batch = cut_to_length(take(train, order[slices[i]], self.device), self.lengths_arg,
                                  COMPILED_LENGTH_MULTIPLE if self.config.jit else 1)  # a bounded number of traces
            if self.batch_transform is not None:
                batch = (self.batch_transform(batch[0], self.transform_generator), *batch[1:])
            self.callbacks.call("on_train_batch_start", self, batch)
            loss = self.step(batch, validate=self.config.check_every_step or i == 0)
            self.callbacks.call("on_train_batch_end", self, loss)
            total += loss * batch[0].shape[0]
            if i % 10 == 0:
                bar.set_postfix(loss=f"{loss:.2f}")
        return total / order.numel()

    # ------------------------------------------------------------------------------------- the loop
    def fit(self, train: Data, test: Data, resume: bool = False, valid: Optional[Data] = None) -> List[Dict[str, Any]]:
        """Train for ``config.epochs`` epochs (continuing a stored run when ``resume``) on ``train``, scoring
        ``test`` (tensors or tuples of the model's arguments); returns the metrics of every epoch run here.
        With ``valid`` (a validation split), each scoring epoch also scores it (``valid_elbo``) and the run
        keeps the weights of the epoch with the best validation ELBO as ``best.pt``."""
        self.config.check_machine()
        torch.set_flush_denormal(self.config.flush_denormal)  # process-wide; False where the CPU cannot
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
        train_eval = self._train_eval(train)
        self.setup(cut_to_length(take(train_eval, slice(0, self.config.batch_size)), self.lengths_arg))
        with torch.no_grad():
            distributed.broadcast_tensors([*self.svi.params, *self.svi.buffers], self.world)  # rank 0's start
        self.callbacks.call("on_fit_start", self)
        if resume:
            self._resume()
        try:
            with self._stop_on_sigint():
                while self.epoch < self.config.epochs:
                    self.history.append(self._run_epoch(train, train_eval, test, self.epoch + 1, valid))
        finally:
            self.callbacks.call("on_fit_end", self)
        return self.history

    @contextlib.contextmanager
    def _stop_on_sigint(self):
        """While training (in the main thread): a first Ctrl-C asks to stop before the next step, a second one
        stops at once."""
        self._interrupted = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self._interrupted = True
            signal.signal(signal.SIGINT, previous)  # a second Ctrl-C: the default, at once

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _stop_if_interrupted(self) -> None:
        if not getattr(self, "_interrupted", False):
            return
        if self.run is not None and self.epoch > 0:
            kept = f"{self.run.checkpoint_path} (epoch {self.epoch}) is kept; run the same command again to continue"
        elif self.run is not None:
            kept = "no epoch had finished, so no checkpoint was written; run the same command again to start over"
        else:
            kept = "nothing was written (no run folder)"
        raise Interrupted(f"interrupted in epoch {self.epoch + 1}: {kept}")

    def _train_eval(self, train: Inputs) -> Inputs:
        """The training examples scored each epoch (``train_elbo``); a fixed transform draw, so that the
        number is comparable across epochs."""
        train_eval = take(train, slice(0, self.config.train_eval_size), self.device)
        if self.batch_transform is None or not getattr(self.batch_transform, "for_scoring", True):
            return train_eval
        return (self.batch_transform(train_eval[0], torch.Generator().manual_seed(self.config.seed)), *train_eval[1:])

    def _resume(self) -> None:
        if self.resume_dir is None:
            raise ValueError("resume needs a run directory")
        self.checkpoints.restore(read_checkpoint(self.resume_dir, map_location=self.device))
        if self.run is not None:
            self.run.truncate_metrics(self.epoch)

    def scores(self, epoch: int) -> bool:
        """Whether ``epoch`` scores the held-out data and runs the reports (``eval_every``, and the last)."""
        return epoch % self.config.eval_every == 0 or epoch == self.config.epochs

    def _held_out_metrics(self, train_eval: Inputs, test: Inputs, valid: Optional[Inputs]) -> Dict[str, Any]:
        """``train_elbo``, ``test_elbo``, ``test_log_lik``, ``kl`` (nats per example), ``valid_elbo`` with a
        validation split, and for ragged sequences each ELBO per time step (``*_elbo_per_step``)."""
        scored = {"train": self.evaluate(train_eval), "test": self.evaluate(test)}
        if valid is not None:
            scored["valid"] = self.evaluate(valid)
        metrics = {f"{split}_elbo": result["elbo"] for split, result in scored.items()}
        metrics.update(test_log_lik=scored["test"]["log_lik"], kl=scored["test"]["kl"])
        metrics.update({f"{split}_elbo_per_step": result["elbo_per_step"]
                        for split, result in scored.items() if "elbo_per_step" in result})
        return metrics

    def _keep_best(self, metrics: Dict[str, Any], epoch: int) -> None:
        """With a validation split, write ``best.pt`` when this epoch's ``valid_elbo`` is the best so far."""
        if "valid_elbo" not in metrics or (self.best is not None and metrics["valid_elbo"] <= self.best):
            return
        self.best = metrics["valid_elbo"]
        if self.run is not None:
            self.run.save_best(self.checkpoints.best(epoch, self.best))

    @contextlib.contextmanager
    def _storage(self, epoch: int):
        """Around what an epoch writes into the run folder (reports' figures, the best weights, the metrics
        line, the checkpoint): a failed write (a full disk, a folder made read-only) becomes
        :class:`RunStorageError`, one line naming the path and what the folder still holds."""
        try:
            yield
        except OSError as error:
            if error.errno not in STORAGE_ERRNOS or self.run is None:
                raise
            done = self.run.epochs_done(self.run.path)
            kept = (f"{self.run.checkpoint_path} holds epoch {done}: make room, then the same command continues "
                    "from it" if done > 0 else "no checkpoint was written yet: make room, then the same command starts "
                    "the run again")
            raise RunStorageError(f"path: could not write epoch {epoch}'s files to {error.filename or self.run.path} "
                                  f"({error.strerror}); {kept}") from error

    def _run_epoch(self, train, train_eval, test, epoch: int, valid: Optional[Inputs] = None) -> Dict[str, Any]:
        start, cpu_start = time.perf_counter(), time.process_time()
        self.callbacks.call("on_train_epoch_start", self, epoch)
        lr = self.svi.optimizer.param_groups[0]["lr"]
        objective = self.train_epoch(train, epoch)
        train_seconds = time.perf_counter() - start  # the SVI steps alone, without scoring and reports
        self.svi.scheduler.step()
        with torch.no_grad():
            distributed.broadcast_tensors(self.svi.buffers, self.world)  # e.g. batch-norm statistics, as DDP keeps them
        held_out = self._held_out_metrics(train_eval, test, valid) if self.scores(epoch) else {}
        metrics: Dict[str, Any] = {"epoch": epoch, "train_objective": -objective, **held_out, "lr": lr}
        with self._storage(epoch):
            with self.svi.averaged():  # the reports and best.pt see the weights the scores used
                if held_out:  # the reports run on scoring epochs
                    metrics.update(self.callbacks.metrics(self, epoch))
                self._keep_best(metrics, epoch)
            # wall seconds of the steps and of the whole epoch; CPU seconds of the process (every thread), which
            # a neighbour's load on a shared machine does not inflate
            metrics["train_s"], metrics["time_s"] = train_seconds, time.perf_counter() - start
            metrics["cpu_s"] = time.process_time() - cpu_start
            self.epoch = epoch
            state = self.checkpoints.state() if self.run is not None or self.world.parallel else None  # collective
            if self.run is not None:
                self.run.log_metrics(metrics)
                self.run.save_checkpoint(state)
            self.callbacks.call("on_train_epoch_end", self, epoch, metrics)
        if self.config.progress and self.world.main and held_out:
            tqdm.write(f"epoch {epoch}: train ELBO {metrics['train_elbo']:.2f}, test ELBO {metrics['test_elbo']:.2f}, "
                       f"KL {metrics['kl']:.2f} nats/example ({metrics['time_s']:.1f}s)")
        return metrics
