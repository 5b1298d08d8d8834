"""Hooks into training, named after PyTorch Lightning's (``on_fit_start``, ``on_train_epoch_start``, ...),
and the one dispatcher the trainer calls them through."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterable, List

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Trainer
    from .data import Inputs


class Callback:
    """Hooks into training, in the order the trainer calls them. ``on_validation_epoch_end`` may return
    extra metrics for ``metrics.jsonl``; ``state_dict``/``load_state_dict`` travel in checkpoints under the
    callback's ``name`` (its class name unless set)."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def on_fit_start(self, trainer: "Trainer") -> None:
        """Parameters and optimiser exist, nothing is restored yet."""

    def on_train_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        pass

    def on_train_batch_start(self, trainer: "Trainer", batch: "Inputs") -> None:
        pass

    def on_after_backward(self, trainer: "Trainer") -> None:
        """Gradients are computed, not yet clipped or applied (e.g. to freeze parameters)."""

    def on_train_batch_end(self, trainer: "Trainer", loss: float) -> None:
        """After each optimiser step, with the step's loss per example."""

    def on_validation_epoch_end(self, trainer: "Trainer", epoch: int) -> Dict[str, Any]:
        """On epochs that score the held-out data (``eval_every``): the model's reports, as metrics."""
        return {}

    def on_train_epoch_end(self, trainer: "Trainer", epoch: int, metrics: Dict[str, Any]) -> None:
        """After the epoch's metrics line and checkpoint are written (e.g. to log them elsewhere)."""

    def on_fit_end(self, trainer: "Trainer") -> None:
        """When ``fit`` returns (also when it stops with an error)."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class CallbackList:
    """The callbacks of a run, called in order: ``callbacks.call("on_train_epoch_start", trainer, epoch)``;
    their states keyed by name (a second callback of one name gets ``name#2``)."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks: List[Callback] = list(callbacks)

    def __iter__(self):
        return iter(self.callbacks)

    def append(self, callback: Callback) -> None:
        self.callbacks.append(callback)

    def call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)

    def metrics(self, trainer: "Trainer", epoch: int) -> Dict[str, Any]:
        """Every callback's ``on_validation_epoch_end`` metrics, merged in order."""
        merged: Dict[str, Any] = {}
        for callback in self.callbacks:
            merged.update(callback.on_validation_epoch_end(trainer, epoch))
        return merged

    def keys(self) -> List[str]:
        seen: Dict[str, int] = {}
        keys = []
        for callback in self.callbacks:
            seen[callback.name] = seen.get(callback.name, 0) + 1
            keys.append(callback.name if seen[callback.name] == 1 else f"{callback.name}#{seen[callback.name]}")
        return keys

    def state_dict(self) -> Dict[str, Dict[str, Any]]:
        return {key: callback.state_dict() for key, callback in zip(self.keys(), self.callbacks)}

    def load_state_dict(self, state) -> None:
        """Each callback's state by name (checkpoints before names: a list, by position)."""
        if isinstance(state, list):
            state = dict(zip(self.keys(), state))
        for key, callback in zip(self.keys(), self.callbacks):
            if key in state:
                callback.load_state_dict(state[key])
