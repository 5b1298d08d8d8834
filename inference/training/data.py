"""A training set as the model's arguments: tensors whose first axis indexes examples, cut into batches
and placed on the training device."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

Data = Union[torch.Tensor, Tuple[torch.Tensor, ...]]  # examples on axis 0; a tuple: the model's arguments
Inputs = Tuple[Optional[torch.Tensor], ...]  # the model's arguments; None: left at its default
DEVICE_DATA_SHARE = 0.25  # a data set up to this share of a GPU's memory is held on the GPU (see place)


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
