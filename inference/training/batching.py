"""Batches of sequences of different lengths: formed from sequences of similar length (bucketing) and cut
to their own longest sequence, so that a step computes no more padding than it must.

Pyro's ``examples/dmm.py`` pads every batch of a random permutation to its longest sequence; on the JSB
chorales (lengths 25-160) a random batch of 20 holds about twice as many padded steps as real ones.
Sorting within windows of a few batches keeps the epoch random (every example once, the windows and the
batch order drawn afresh each epoch) while the steps of a batch are mostly real.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Inputs = Tuple[Optional[torch.Tensor], ...]

COMPILED_LENGTH_MULTIPLE = 16  # compiled training on ragged sequences: batches cut to a multiple of 16 steps


def bucketed_order(lengths: torch.Tensor, batch_size: int, bucket_batches: int,
                   generator: torch.Generator) -> torch.Tensor:
    """A permutation of the examples ``(N,)`` whose consecutive runs of ``batch_size`` have similar
    ``lengths (N,)``: a random permutation, cut into windows of ``bucket_batches * batch_size``, each
    window sorted by length (stable) and cut into batches, each batch longest first (a model that runs
    only the sequences not yet ended, a prefix of the rows, then needs no reordering), then the full
    batches shuffled and a short one last. Every draw comes from ``generator``; ``bucket_batches = 1``
    gives random batches."""
    num = lengths.numel()
    order = torch.randperm(num, generator=generator)
    window = batch_size * bucket_batches
    batches = []
    for start in range(0, num, window):
        chunk = order[start : start + window]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]  # similar lengths side by side
        batches += [batch.flip(0) for batch in chunk.split(batch_size)]  # longest first within each batch
    # the batches shuffled, a short one (the last window's rest) last, so that cutting the order into
    # consecutive runs of batch_size gives back exactly these batches
    full = [b for b in batches if b.numel() == batch_size]
    short = [b for b in batches if b.numel() != batch_size]
    shuffled = torch.randperm(len(full), generator=generator)
    return torch.cat([full[i] for i in shuffled.tolist()] + short)


def cut_to_length(inputs: Inputs, lengths_arg: Optional[int], multiple: int = 1) -> Inputs:
    """A batch of ragged sequences cut to its own longest sequence: every input of two or more axes
    ``(batch, T, ...)`` loses the steps past ``max(inputs[lengths_arg])``, rounded up to a ``multiple``
    of steps (at most T; the steps kept past every sequence's end are padding, which changes no number);
    unchanged when ``lengths_arg`` is None. A compiled step traces once per batch shape, so rounding
    bounds how many traces a run makes (:data:`COMPILED_LENGTH_MULTIPLE`)."""
    if lengths_arg is None:
        return inputs
    longest = -(-int(inputs[lengths_arg].max()) // multiple) * multiple  # ceil to a multiple
    return tuple(t[:, :longest] if t is not None and t.dim() >= 2 else t for t in inputs)  # (batch, T, ...) -> (batch, longest, ...)
