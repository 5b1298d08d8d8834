"""Image data sets (MNIST from IDX files, generated shapes, a user's own ``.npz``) and sequence data sets
(generated bouncing balls and colour-changing balls, MNIST rows as time steps, a user's ``.npz``;
see :mod:`.sequences`).

Every loader returns an :class:`ImageData` of float tensors ``(N, C, H, W)`` in [0, 1]. Binarisation
(``none`` keeps grey values, as the seeds do; ``static`` thresholds once at 0.5; ``dynamic`` draws
Bernoulli pixels afresh for every training batch) is applied by :func:`binarizer`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

from .balls import bouncing_balls, color_balls
from .mnist import load_mnist, read_idx  # noqa: F401
from .sequences import (
    SEQUENCE_DATASETS,
    SequenceData,
    check_events,
    check_sequences,
    check_unit_interval,
    generate_sequences,
    load_mnist_rows,
    load_sequence_data,
    load_sequence_npz,
    open_npz,
)
from .shapes import make_shapes

DATASETS = ("mnist", "shapes", "npz")
BINARIZE_MODES = ("none", "static", "dynamic")
STATIC_THRESHOLD = 0.5
IMAGE_CHANNELS = (1, 3)  # grey or RGB


class ImageData(NamedTuple):
    """Train and held-out images, each ``(N, C, H, W)`` float32 in [0, 1]."""

    train: torch.Tensor
    test: torch.Tensor
    name: str


def check_images(images, argument: str = "images") -> torch.Tensor:
    """Validate an image array and return it as float32 ``(N, C, H, W)``.

    Accepts ``(N, H, W)`` (a channel axis is added), ``(N, C, H, W)`` with C in {1, 3}, or channels-last
    ``(N, H, W, C)`` with C in {1, 3} when axis 1 is not a channel count (moved to ``(N, C, H, W)``);
    values must be finite and in [0, 1]. Raises ``ValueError`` naming ``argument`` otherwise.
    """
    images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if images.dim() == 3:
        images = images.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    elif images.dim() == 4 and images.shape[1] not in IMAGE_CHANNELS:
        if images.shape[-1] not in IMAGE_CHANNELS:
            raise ValueError(f"{argument}: a 4-d array needs 1 or 3 channels on axis 1 (N, C, H, W) or on the last "
                             f"axis (N, H, W, C), got {tuple(images.shape)}")
        images = images.movedim(-1, 1).contiguous()  # (N, H, W, C) -> (N, C, H, W)
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(
            f"{argument}: expected shape (N, H, W) or (N, C, H, W) with N > 0, got {tuple(images.shape)}"
        )
    check_unit_interval(images, argument, "images")
    return images


def load_npz(path: str, test_fraction: float = 0.1) -> ImageData:
    """A user's array: ``np.load(path)['images']`` of shape (N, H, W) or (N, C, H, W) in [0, 1].

    The last ``test_fraction`` of the images (at least one) are held out.
    """
    with open_npz(path) as archive:
        if "images" not in archive:
            raise ValueError(f"{path}: expected an array named 'images', found {sorted(archive.files)}")
        images = check_images(archive["images"], f"{path}['images']")
    num_test = max(1, int(round(test_fraction * len(images))))
    if num_test >= len(images):
        raise ValueError(f"{path}: need at least 2 images to hold one out, got {len(images)}")
    return ImageData(images[:-num_test], images[-num_test:], "npz")


def load_image_data(
    name: str,
    data_dir: Optional[str] = None,
    data_path: Optional[str] = None,
    num_shapes: int = 6000,
    image_size: int = 28,
    seed: int = 0,
    download: bool = True,
) -> ImageData:
    """Load ``name`` in ``DATASETS``: ``mnist`` from ``data_dir``, ``shapes`` generated, ``npz`` from
    ``data_path``."""
    if name == "mnist":
        if data_dir is None:
            raise ValueError("data_dir: data 'mnist' needs a folder holding the IDX files, got None")
        train, test = load_mnist(data_dir, download=download)
        return ImageData(train, test, name)
    if name == "shapes":
        images = make_shapes(num_shapes, size=image_size, seed=seed)
        num_test = max(1, num_shapes // 10)
        return ImageData(images[:-num_test], images[-num_test:], name)
    if name == "npz":
        if data_path is None:
            raise ValueError("data_path: data 'npz' needs an .npz file with an 'images' array, got None")
        return load_npz(data_path)
    raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")


def binarizer(mode: str) -> Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]:
    """The pixel transform for ``mode`` in ``BINARIZE_MODES``: ``f(images, generator) -> images``.

    ``dynamic`` draws ``Bernoulli(images)`` with ``generator`` (fresh pixels every call); ``static``
    thresholds at ``STATIC_THRESHOLD``; ``none`` returns grey values unchanged.
    """
    if mode == "none":
        return lambda images, generator=None: images
    if mode == "static":
        return lambda images, generator=None: (images > STATIC_THRESHOLD).to(images.dtype)
    if mode == "dynamic":
        return lambda images, generator=None: torch.bernoulli(images, generator=generator)
    raise ValueError(f"unknown binarisation {mode!r}; choose one of {BINARIZE_MODES}")


__all__ = [
    "SEQUENCE_DATASETS",
    "SequenceData",
    "bouncing_balls",
    "check_events",
    "check_sequences",
    "color_balls",
    "generate_sequences",
    "load_mnist_rows",
    "load_sequence_data",
    "load_sequence_npz",
    "BINARIZE_MODES",
    "DATASETS",
    "ImageData",
    "binarizer",
    "check_images",
    "load_image_data",
    "load_mnist",
    "load_npz",
    "make_shapes",
    "read_idx",
]
