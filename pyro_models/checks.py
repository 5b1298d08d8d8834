"""Argument checks shared by the model builders and imputers: one clear ``ValueError`` naming the argument,
before any tensor is made."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

IMAGE_RANK, VECTOR_RANK = 3, 1  # (C, H, W) images, (D,) vectors


def check_shape(argument: str, shape: Sequence[int], ranks: Sequence[int] = (IMAGE_RANK, VECTOR_RANK)) -> Tuple[int, ...]:
    """``shape`` as a tuple of ints, or ``ValueError`` naming ``argument`` unless it has one of ``ranks``
    axes, each of a positive size."""
    layouts = {IMAGE_RANK: "(C, H, W)", VECTOR_RANK: "(D,)"}
    expected = " or ".join(layouts.get(rank, f"{rank} axes") for rank in ranks)
    try:
        shape = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{argument}: expected {expected} with positive sizes, got {shape!r}") from None
    if len(shape) not in ranks or min(shape, default=0) < 1:
        raise ValueError(f"{argument}: expected {expected} with positive sizes, got {shape}")
    return shape


def check_frames(x: torch.Tensor, frame_shape: Sequence[int]) -> None:
    """``ValueError`` naming ``x`` unless it is a float tensor ``(batch, T, *frame_shape)``."""
    expected = f"(batch, T, {', '.join(map(str, frame_shape))})"
    if not torch.is_tensor(x) or x.dim() != len(frame_shape) + 2 or tuple(x.shape[2:]) != tuple(frame_shape):
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"x: expected shape {expected}, got {got}")
