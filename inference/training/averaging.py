"""Polyak averaging of the trained weights: an exponential moving average of every parameter, the weights
that held-out scores, reports and ``best.pt`` use when ``TrainConfig.ema_decay > 0``.

After optimiser step ``n`` (counted from 1) each average moves towards its parameter::

    decay_n = min(ema_decay, (1 + n) / (10 + n))        # short memory while the weights change fast
    average <- decay_n * average + (1 - decay_n) * parameter

(the warm-up of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``; Polyak & Juditsky 1992 for
the averaging itself, which Kingma et al. 2016 used for the IAF VAE's reported likelihoods). Training
always steps the raw weights: scoring swaps the averages in and puts the raw weights back
(:meth:`WeightAverage.swapped`), so a run with averaging trains draw for draw as one without it.
Buffers (batch-norm statistics) are not averaged.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List

import torch

WARMUP_OFFSET = (1, 10)  # decay_n = (1 + n) / (10 + n) caps the decay at step n (TensorFlow's warm-up)


class WeightAverage:
    """The moving averages of ``params`` (the tensors the optimiser steps, in place) with ``decay`` in (0, 1)."""

    def __init__(self, params: List[torch.Tensor], decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay: expected a number in (0, 1), got {decay}")
        self.params, self.decay = params, decay
        self.averages = [p.detach().clone() for p in params]
        self.steps = 0
        self._active = False  # inside swapped()

    def current_decay(self) -> float:
        """The decay of the next update (step ``steps + 1``)."""
        low, high = WARMUP_OFFSET
        n = self.steps + 1
        return min(self.decay, (low + n) / (high + n))

    @torch.no_grad()
    def update(self) -> None:
        """Move every average towards its parameter; call after each optimiser step."""
        weight = 1.0 - self.current_decay()
        for average, param in zip(self.averages, self.params):
            average.lerp_(param.detach(), weight)
        self.steps += 1

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The averages in the parameters' place (copied into the same tensors, so compiled graphs and the
        optimiser keep theirs) for the block; the raw weights back afterwards, also on an error. A block
        inside another swapped block changes nothing."""
        if self._active:
            yield
            return
        raw = [p.detach().clone() for p in self.params]
        _copy(self.params, self.averages)
        self._active = True
        try:
            yield
        finally:
            _copy(self.params, raw)
            self._active = False

    def state_dict(self) -> Dict[str, Any]:
        return {"steps": self.steps, "decay": self.decay}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """The step count of ``state``; the averages are read from the parameters, which the caller has set
        to the stored averaged weights (:meth:`take_from_params`)."""
        self.steps = int(state["steps"])

    def take_from_params(self) -> None:
        """Set every average to its parameter's current value (restoring: the averaged weights were loaded)."""
        _copy(self.averages, self.params)


@torch.no_grad()
def _copy(targets: List[torch.Tensor], sources: List[torch.Tensor]) -> None:
    for target, source in zip(targets, sources):
        target.detach().copy_(source.detach())
