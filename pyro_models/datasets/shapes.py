"""A procedurally generated image data set (filled discs, squares and triangles), so everything runs
offline. Deterministic for a given seed."""
from __future__ import annotations

import numpy as np
import torch


def make_shapes(num_images: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Grey images ``(num_images, 1, size, size)`` in [0, 1], one random shape each.

    Each image holds a disc, an axis-aligned square or a triangle, of random centre, radius and
    brightness (0.6 to 1.0), on a black background, with a one-pixel soft edge.
    """
    if num_images < 1 or size < 8:
        raise ValueError(f"make_shapes: need num_images >= 1 and size >= 8, got {num_images}, {size}")
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    images = np.empty((num_images, 1, size, size), dtype=np.float32)
    for i in range(num_images):
        kind = rng.integers(3)
        radius = rng.uniform(0.15, 0.35) * size
        cy, cx = rng.uniform(radius, size - radius, size=2)
        dy, dx = ys - cy, xs - cx
        if kind == 0:  # disc: signed distance to the circle
            distance = np.sqrt(dy**2 + dx**2) - radius
        elif kind == 1:  # square: Chebyshev distance
            distance = np.maximum(np.abs(dy), np.abs(dx)) - radius * 0.8
        else:  # triangle pointing up: max of three half-plane distances
            distance = np.maximum.reduce(
                [dy - radius * 0.5, -0.866 * dx - 0.5 * dy - radius * 0.5, 0.866 * dx - 0.5 * dy - radius * 0.5]
            )
        brightness = rng.uniform(0.6, 1.0)
        images[i, 0] = brightness * np.clip(0.5 - distance, 0.0, 1.0)
    return torch.from_numpy(images)
