"""A run directory: ``config.json``, ``metrics.jsonl`` (one JSON object per epoch), atomically written
checkpoints, and ``figures/``."""
from __future__ import annotations

import errno
import fcntl
import io
import json
import math
import os
import pickle
import tempfile
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional

import torch

from . import failpoints

CONFIG, METRICS, CHECKPOINT = "config.json", "metrics.jsonl", "checkpoint.pt"
BEST = "best.pt"  # the weights of the epoch with the best validation ELBO (runs with a validation split)
PREVIOUS_CHECKPOINT, STATE = "checkpoint.prev.pt", "state.json"  # the checkpoint before; {"epoch": N} of the newest
HISTORY_KEY = "resumes"  # config.json: the changes made at each resume
# config.json keys that are records, not settings: the resume history, and the shape of the examples
# (checked on its own, with its own message, once the data are loaded)
UNCOMPARED = (HISTORY_KEY, "example_shape")
# Training settings that may change when a run is resumed: they change neither the model nor the data,
# and the trainer applies the new values from the resumed epoch on (the learning rate as the base of
# the staircase decay). Every change is recorded in config.json under HISTORY_KEY.
RESUMABLE_CHANGES = frozenset({"train.epochs", "train.lr", "train.clip_norm", "train.progress", "train.device",
                               "train.eval_batch_size", "train.tensorboard", "train.check_every_step",
                               "train.eval_every", "train.flush_denormal", "world_size"})
NEW, RESTART, RESUME, COMPLETE = "new", "restart", "resume", "complete"
TMP_PREFIX = ".tmp-"
LOCK = ".lock"  # held (flock) by the process that writes the run; the kernel frees it when that process dies
_HELD: Dict[str, List[int]] = {}  # this process's locks: real path of the folder -> [file descriptor, users]


class RunFolderBusy(FileExistsError):
    """Another process is writing the run folder."""


LOCK_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # what flock(LOCK_NB) reports for a lock held elsewhere


def _busy(path: str) -> RunFolderBusy:
    """The one-line error for ``path``'s lock being held, naming the holder's pid where it wrote one."""
    try:
        with open(os.path.join(path, LOCK)) as f:
            pid = f.read().strip()
    except OSError:
        pid = ""
    holder = f" (process {pid})" if pid else ""
    return RunFolderBusy(f"path: {path} is being written by another training{holder}; wait for it to finish or "
                         "choose another folder")


def check_writable(path: str) -> None:
    """Raise ``PermissionError`` naming ``path`` when the run folder (or, before it exists, the nearest
    existing folder above it) cannot be written: a read-only file system or missing permission."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == os.path.abspath(path) else f" (its folder {existing} cannot be written)"
        raise PermissionError(f"path: {path} cannot be written{where}: a read-only file system or no permission; "
                              "choose another folder")


def lock_folder(path: str) -> None:
    """Take ``path``'s run lock for this process (again: nothing to do), or raise :class:`RunFolderBusy`
    naming the process that holds it. A lock of a process that died is free: the kernel drops it."""
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    lock_path = os.path.join(path, LOCK)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in LOCK_HELD:
            raise _busy(path) from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD[key] = [fd, 1]


def unlock_folder(path: str) -> None:
    """One user of this process's lock of ``path`` is done; the last one gives the lock up."""
    key = os.path.realpath(path)
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        os.close(held[0])  # closing the descriptor releases the flock


def check_not_busy(path: str) -> None:
    """Raise :class:`RunFolderBusy` when another process holds ``path``'s lock (the lock is not kept)."""
    if not os.path.isfile(os.path.join(path, LOCK)) or os.path.realpath(path) in _HELD:
        return
    fd = os.open(os.path.join(path, LOCK), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in LOCK_HELD:
            raise _busy(path) from None
        raise
    finally:
        os.close(fd)


UNREADABLE = (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError)


def metric_or_none(value: float) -> Optional[float]:
    """A metric for ``metrics.jsonl``: ``None`` (JSON null) when it is undefined (NaN, e.g. an imputation
    error when no frame was missing), since JSON has no NaN."""
    return value if math.isfinite(value) else None


def atomic_write_bytes(path: str, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``: readers
    see the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


class RunDir:
    """The folder of one training run.

    Creating it decides the run's mode (:meth:`preflight`): a ``new`` run; a ``restart`` of a run that
    failed before its first checkpoint (its folder is reused, its metrics and figures cleared); a
    ``resume`` from the newest readable checkpoint, when asked for or when the folder holds the same run
    (the same config); or ``complete`` when that run has done its epochs already. On resume the config
    may differ from the stored one only in :data:`RESUMABLE_CHANGES`, and each change is recorded.
    """

    def __init__(self, path: str, config: Dict[str, Any], resume: bool = False,
                 normalise: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None):
        self.path = path
        self.figures = os.path.join(path, "figures")
        self._figures_given: Dict[str, None] = {}  # an ordered set of paths
        self.mode = self.preflight(path, config, resume, normalise)
        os.makedirs(self.figures, exist_ok=True)
        lock_folder(path)  # one writer: a second training into this folder is refused
        self._unlock = weakref.finalize(self, unlock_folder, path)
        self.repair_metrics()
        for name in os.listdir(path):  # temporary files of writes a kill interrupted
            if name.startswith(TMP_PREFIX):
                os.remove(os.path.join(path, name))
        if self.mode == RESTART:
            self._clear()
        if self.mode in (RESUME, COMPLETE):
            config = self._with_history(config)
        self.config = config  # as stored in config.json
        self.write_json(CONFIG, config)

    def close(self) -> None:
        """Give up the folder's lock (also done when this object is collected or the process ends)."""
        self._unlock()

    @property
    def resuming(self) -> bool:
        return self.mode in (RESUME, COMPLETE)

    # ----------------------------------------------------------------------------------- the mode
    @classmethod
    def preflight(cls, path: str, config: Dict[str, Any], resume: bool = False,
                  normalise: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None) -> str:
        """The mode a run of ``config`` in ``path`` would start in (see the class docstring); raises,
        before any work, what creating the run directory would raise: a folder that is a file, a new run
        in a folder holding another run, or a resume with a config changed beyond
        :data:`RESUMABLE_CHANGES` or with fewer epochs than done. ``normalise`` maps a stored config to
        the form ``config`` has (e.g. fields added since it was written, at their defaults) before they
        are compared."""
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f"path: {path} exists and is not a folder")
        if os.path.isdir(path):
            check_not_busy(path)
        check_writable(path)
        stored = cls.stored_config(path)
        if stored is not None and normalise is not None:
            stored = normalise(stored)
        done = cls.epochs_done(path)
        if stored is None and done == 0:
            if resume and os.path.isdir(path) and os.listdir(path):
                raise FileNotFoundError(f"resume: {path} holds no run to continue")
            return NEW
        changes = cls._changes(stored or {}, config)
        if done == 0:  # config.json without a readable checkpoint: the run failed before its first epoch ended
            leftovers = any(os.path.isfile(os.path.join(path, n)) for n in (CHECKPOINT, PREVIOUS_CHECKPOINT))
            if leftovers and changes:
                raise FileExistsError(f"path: {path} holds another run whose checkpoints are unreadable; remove the "
                                      "folder or choose another")
            if leftovers and resume:  # asked to continue: starting afresh would not be what was asked
                raise ValueError(f"resume: the checkpoints in {path} are unreadable, so there is nothing to continue; "
                                 "remove them to start the run again")
            return RESTART
        if not resume and changes:
            raise FileExistsError(f"path: {path} already holds a different run ({done} epochs done); pass resume=True "
                                  "to continue it (only training settings may change) or choose another folder")
        unsafe = {k: v for k, v in changes.items() if k not in RESUMABLE_CHANGES}
        if unsafe:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(unsafe.items()))
            raise ValueError(f"resume: only {sorted(k.split('.')[-1] for k in RESUMABLE_CHANGES)} may change, "
                             f"but {details}")
        epochs = _flatten(config).get("train.epochs")
        if epochs is not None and epochs < done:
            raise ValueError(f"epochs: the run in {path} has done {done} epochs; pass epochs > {done} to extend it "
                             f"(got {epochs}); nothing was changed")
        return COMPLETE if epochs is not None and epochs == done else RESUME

    @staticmethod
    def stored_config(path: str) -> Optional[Dict[str, Any]]:
        """The ``config.json`` stored in ``path`` (None when there is none; ``ValueError`` when unreadable)."""
        config_path = os.path.join(path, CONFIG)
        if not os.path.isfile(config_path):
            return None
        try:
            with open(config_path) as f:
                stored = json.load(f)
        except (OSError, ValueError) as error:
            raise ValueError(f"path: {config_path} is unreadable ({error}); remove the folder or choose another") from None
        if not isinstance(stored, dict):
            raise ValueError(f"path: {config_path} holds {type(stored).__name__} JSON, not a run's config (an object); "
                             "remove the folder or choose another")
        return stored

    @staticmethod
    def _changes(stored: Dict[str, Any], config: Dict[str, Any]) -> Dict[str, tuple]:
        """``{key: (stored, new)}`` for every flattened key that differs (the resume history ignored)."""
        old = _flatten({k: v for k, v in stored.items() if k not in UNCOMPARED})
        new = _flatten(json.loads(json.dumps({k: v for k, v in config.items() if k not in UNCOMPARED}, default=str)))
        return {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}

    @staticmethod
    def epochs_done(path: str) -> int:
        """Epochs of the newest checkpoint (0 when there is none)."""
        state = os.path.join(path, STATE)
        if os.path.isfile(state):
            try:
                with open(state) as f:
                    return int(json.load(f)["epoch"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable: fall back on the checkpoints themselves
        for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
            if os.path.isfile(os.path.join(path, name)):
                try:
                    return int(torch.load(os.path.join(path, name), map_location="cpu", weights_only=False)["epoch"])
                except UNREADABLE + (TypeError,):
                    continue
        return 0

    def _with_history(self, config: Dict[str, Any]) -> Dict[str, Any]:
        stored = self.stored_config(self.path) or {}
        history = list(stored.get(HISTORY_KEY, []))
        changes = self._changes(stored, config)
        if changes:
            history.append({"after_epoch": self.epochs_done(self.path),
                            "changes": {k: list(v) for k, v in sorted(changes.items())}})
        return {**config, HISTORY_KEY: history} if history else config

    def _clear(self) -> None:
        """Remove what a run that never finished an epoch left: metrics and figures."""
        if os.path.exists(os.path.join(self.path, METRICS)):
            os.remove(os.path.join(self.path, METRICS))
        for name in os.listdir(self.figures):
            os.remove(os.path.join(self.figures, name))

    # ----------------------------------------------------------------------------------- the files
    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.path, CHECKPOINT)

    def figure_path(self, name: str, epoch: Optional[int] = None) -> str:
        """Where the figure ``name`` (of ``epoch``) goes; remembered until :meth:`take_figures`."""
        suffix = "" if epoch is None else f"_epoch{epoch:03d}"
        path = os.path.join(self.figures, f"{name}{suffix}.png")
        self._figures_given[path] = None
        return path

    def take_figures(self) -> List[str]:
        """The figures written since the last call (paths handed out by :meth:`figure_path` that exist)."""
        given, self._figures_given = self._figures_given, {}
        return [path for path in given if os.path.isfile(path)]

    def write_json(self, name: str, payload: Dict[str, Any]) -> None:
        text = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
        atomic_write_bytes(os.path.join(self.path, name), lambda f: f.write(text))

    def log_metrics(self, metrics: Dict[str, Any]) -> None:
        """Append the epoch's line; one ``write`` of a whole line, flushed to disk (a kill or a full disk
        can still tear it: :meth:`repair_metrics` drops a torn line when the run is opened again)."""
        with open(os.path.join(self.path, METRICS), "a") as f:
            f.write(json.dumps(metrics, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> List[Dict[str, Any]]:
        """Every whole line of ``metrics.jsonl`` (a torn one, which a kill during an append leaves, skipped)."""
        return _read_metric_lines(os.path.join(self.path, METRICS))[0]

    def repair_metrics(self) -> None:
        """Rewrite ``metrics.jsonl`` without the lines that are not whole JSON objects (a torn last line left
        by a kill or a full disk during an append), with a warning naming the file."""
        path = os.path.join(self.path, METRICS)
        kept, torn = _read_metric_lines(path)
        if torn:
            warnings.warn(f"{path}: dropped {torn} unreadable line(s) (an append cut short)")
            text = "".join(json.dumps(m, sort_keys=True) + "\n" for m in kept).encode()
            atomic_write_bytes(path, lambda f: f.write(text))

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop metric lines after ``last_epoch`` (written after the checkpoint a resume starts from)."""
        kept = [m for m in self.read_metrics() if m.get("epoch", 0) <= last_epoch]
        text = "".join(json.dumps(m, sort_keys=True) + "\n" for m in kept).encode()
        atomic_write_bytes(os.path.join(self.path, METRICS), lambda f: f.write(text))

    def save_checkpoint(self, state: Dict[str, Any]) -> None:
        """Write ``state`` as the newest checkpoint, keeping the one before as ``checkpoint.prev.pt``: the new
        file is complete on disk before the old one is moved, so a kill at any moment leaves at least one
        readable checkpoint."""
        folder = os.path.abspath(self.path)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=CHECKPOINT)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_serialised(state))  # a full disk raises OSError(ENOSPC) here, naming no torch internals
                f.flush()
                os.fsync(f.fileno())
            failpoints.reach("checkpoint")
            if os.path.exists(self.checkpoint_path):
                os.replace(self.checkpoint_path, os.path.join(self.path, PREVIOUS_CHECKPOINT))
            os.replace(tmp, self.checkpoint_path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        self.write_json(STATE, {"epoch": state.get("epoch", 0)})

    def save_best(self, state: Dict[str, Any]) -> None:
        """Write ``state`` (the weights of the best epoch so far) as ``best.pt``, atomically."""
        data = _serialised(state)
        atomic_write_bytes(os.path.join(self.path, BEST), lambda f: f.write(data))

    def load_checkpoint(self, map_location=None) -> Dict[str, Any]:
        """The newest readable checkpoint (see :func:`read_checkpoint`)."""
        return read_checkpoint(self.path, map_location)


def _serialised(state: Dict[str, Any]) -> memoryview:
    """``torch.save(state)`` in memory: the file is then written by one plain ``write``, whose failures are
    the operating system's own (``OSError`` with its errno), not torch's zip writer's."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer()


def _read_metric_lines(path: str):
    """``(metrics, torn)``: the whole JSON objects of the file ``path`` and how many lines were not."""
    if not os.path.exists(path):
        return [], 0
    kept, torn = [], 0
    with open(path, errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError:
                torn += 1
                continue
            if isinstance(value, dict):
                kept.append(value)
            else:
                torn += 1
    return kept, torn


def read_checkpoint(path: str, map_location=None) -> Dict[str, Any]:
    """The newest readable checkpoint of the run directory ``path``: ``checkpoint.pt``, or, when it is
    missing or corrupt (a warning says so), ``checkpoint.prev.pt``; ``ValueError`` when neither can be
    read."""
    problems = []
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            problems.append(f"{name} is missing")
            continue
        try:
            state = torch.load(file, map_location=map_location, weights_only=False)
            if not isinstance(state, dict) or "epoch" not in state:
                raise ValueError("not a checkpoint of this library")
        except UNREADABLE as error:
            problems.append(f"{name} is unreadable ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
            continue
        if problems:
            warnings.warn(f"{'; '.join(problems)}: resuming from {name} (epoch {state['epoch']})")
        return state
    raise ValueError(f"path: no readable checkpoint in {path} ({'; '.join(problems)}); "
                     "remove the folder or choose another to start again")
