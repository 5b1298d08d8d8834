"""Generated videos of one bouncing ball, in pure numpy, deterministic for a seed.

* :func:`bouncing_balls`: the Kalman VAE data (Fraccaro et al. 2017): binary ``(N, T, size, size)``
  frames of a disc bouncing inside an always-on one-pixel wall outline.
* :func:`color_balls`: the VTA-style data: RGB ``(N, T, 3, size, size)`` frames of a disc on black
  whose colour changes at every wall hit (``changes="bounces"``) or at random frames away from the wall
  hits (``changes="random"``: the two causes of a boundary apart), and the ``(N, T)`` change events.

Physics is exact without sub-steps: a ball moving at constant velocity between two walls follows
the straight "unfolded" line ``start + velocity * time`` reflected (folded) back into the box, so
positions at all frames are computed at once, and the number of wall hits between two frames is the
change of the fold count. Positions are in pixels, ``(x, y)`` with ``x`` along columns; the centre of
pixel ``(row i, column j)`` is ``(j + 0.5, i + 0.5)``; a pixel belongs to a ball of centre ``c`` when
its centre lies within ``radius`` of ``c`` (a radius-3 disc covers 26 to 32 pixels, 28.3 on average).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

OUTLINE_WIDTH = 1  # pixels of the always-on wall outline of bouncing_balls
# The initial position of bouncing_balls is N(size / 2, (size / START_SPREAD_DIVISOR)^2) per axis, clipped
# into the box: 10 px for 32 x 32 frames, as the original (N(16, 10^2)).
START_SPREAD_DIVISOR = 3.2
# The saturated colours of color_balls (channel values 0 or 1, so frames stay exactly binary per channel):
# red, green, blue, yellow, cyan, magenta; num_colors takes the first ones.
PALETTE = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=np.float32
)
MIN_COLORS = 2
CHANGES = ("bounces", "random")  # when color_balls changes the ball's colour
HIT_CLEARANCE = 2  # changes="random": no colour change within this many frames of a wall hit
CHUNK_SEQUENCES = 500  # sequences rasterised at once (bounds the temporary memory)
SPATIAL_AXES = 2  # (x, y)
RGB_CHANNELS = 3


def _check_common(name: str, num_sequences: int, num_steps: int, radius: float, speed) -> None:
    if num_sequences < 1 or num_steps < 1:
        raise ValueError(
            f"{name}: num_sequences and num_steps must be >= 1, got {num_sequences}, {num_steps}"
        )
    if radius <= 0:
        raise ValueError(f"{name}: radius must be > 0, got {radius}")
    if len(speed) != 2 or not 0 <= speed[0] <= speed[1]:
        raise ValueError(f"{name}: speed must be a range (low, high) with 0 <= low <= high, got {speed}")


def _check_box(name: str, size: int, low: float, high: float) -> None:
    if high <= low:
        raise ValueError(f"{name}: size {size} leaves no room to move a ball of this radius")


def _fold(unfolded: np.ndarray, low: float, high: float) -> Tuple[np.ndarray, np.ndarray]:
    """Reflect unfolded coordinates ``(...)`` into ``[low, high]``.

    Returns the positions ``(...)`` and the fold counts ``(...)`` (int64): how many times the unfolded
    line has crossed a wall; the hits between two times are the difference of their counts.
    """
    length = high - low
    shifted = unfolded - low
    folds = np.floor(shifted / length).astype(np.int64)
    phase = np.mod(shifted, 2 * length)  # in [0, 2 * length): out along the box, then back
    positions = low + np.where(phase <= length, phase, 2 * length - phase)
    return positions, folds


def _trajectories(start: np.ndarray, velocity: np.ndarray, num_steps: int, dt: float, low: float, high: float):
    """Centres ``(N, T, 2)`` and per-axis fold counts ``(N, T, 2)`` from ``start`` and ``velocity`` ``(N, 2)``."""
    times = np.arange(num_steps) * dt
    unfolded = start[:, None, :] + velocity[:, None, :] * times[None, :, None]
    return _fold(unfolded, low, high)


def _velocities(rng: np.random.Generator, num_sequences: int, speed) -> np.ndarray:
    """``(N, 2)`` velocities of speed ``U(speed)`` in a uniformly random direction."""
    magnitude = rng.uniform(speed[0], speed[1], size=num_sequences)
    angle = rng.uniform(0.0, 2 * np.pi, size=num_sequences)
    return magnitude[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)


def _discs(centres: np.ndarray, size: int, radius: float) -> np.ndarray:
    """Filled discs: ``centres (..., 2)`` as ``(x, y)`` -> bool masks ``(..., size, size)``."""
    pixel_centres = np.arange(size) + 0.5
    dx2 = (pixel_centres - centres[..., 0, None]) ** 2  # (..., size) over columns
    dy2 = (pixel_centres - centres[..., 1, None]) ** 2  # (..., size) over rows
    return dy2[..., :, None] + dx2[..., None, :] <= radius**2


def bouncing_balls(
    num_sequences: int,
    num_steps: int = 20,
    size: int = 32,
    radius: float = 3,
    speed: Tuple[float, float] = (10.0, 15.0),
    dt: float = 0.2,
    seed: int = 0,
) -> np.ndarray:
    """The Kalman VAE's bouncing ball: float32 ``(num_sequences, num_steps, size, size)`` in {0, 1}.

    One ball of ``radius`` pixels starts at ``N(size / 2, (size / START_SPREAD_DIVISOR)^2)`` per axis
    (clipped so the ball lies inside the outline), moves at ``U(speed)`` pixels per second in a uniform
    direction, ``velocity * dt`` per frame (2 to 3 px with the defaults), and reflects elastically off
    the walls; it never touches the one-pixel outline drawn on every frame.
    """
    _check_common("bouncing_balls", num_sequences, num_steps, radius, speed)
    if dt <= 0:
        raise ValueError(f"bouncing_balls: dt must be > 0, got {dt}")
    low, high = OUTLINE_WIDTH + radius, size - OUTLINE_WIDTH - radius
    _check_box("bouncing_balls", size, low, high)
    rng = np.random.default_rng(seed)
    start = rng.normal(size / 2, size / START_SPREAD_DIVISOR, size=(num_sequences, SPATIAL_AXES))
    start = np.clip(start, low, high)
    centres, _ = _trajectories(start, _velocities(rng, num_sequences, speed), num_steps, dt, low, high)
    frames = np.empty((num_sequences, num_steps, size, size), dtype=np.float32)
    for begin in range(0, num_sequences, CHUNK_SEQUENCES):
        end = begin + CHUNK_SEQUENCES
        frames[begin:end] = _discs(centres[begin:end], size, radius)
    frames[..., :OUTLINE_WIDTH, :] = 1.0
    frames[..., -OUTLINE_WIDTH:, :] = 1.0
    frames[..., :, :OUTLINE_WIDTH] = 1.0
    frames[..., :, -OUTLINE_WIDTH:] = 1.0
    return frames


def _color_indices(rng: np.random.Generator, events: np.ndarray, num_colors: int) -> np.ndarray:
    """``(N, T)`` palette indices: a uniform first colour, then a different one at every event."""
    first = rng.integers(num_colors, size=events.shape[0])
    shifts = rng.integers(1, num_colors, size=events.shape) * events  # 1..K-1 steps: always another colour
    return (first[:, None] + np.cumsum(shifts, axis=1)) % num_colors


def wall_hits(folds: np.ndarray) -> np.ndarray:
    """``(N, T)`` int64: 1 at every frame whose step from the frame before hit a wall (``folds (N, T, 2)``)."""
    hits = np.zeros(folds.shape[:2], dtype=np.int64)
    hits[:, 1:] = (np.diff(folds, axis=1) != 0).any(axis=2)
    return hits


def random_changes(rng: np.random.Generator, hits: np.ndarray, rate: float, min_gap: int,
                   clearance: int = HIT_CLEARANCE) -> np.ndarray:
    """``(N, T)`` int64 change frames independent of the bounces: frame ``t >= 1`` changes with probability
    ``rate`` when no wall hit of ``hits (N, T)`` lies within ``clearance`` frames of it and the previous
    change is at least ``min_gap`` frames before it."""
    num, steps = hits.shape
    near = hits.astype(bool)
    for shift in range(1, clearance + 1):  # a hit within +-shift frames
        near[:, shift:] |= hits[:, :-shift].astype(bool)
        near[:, :-shift] |= hits[:, shift:].astype(bool)
    draws = rng.random((num, steps))
    events = np.zeros((num, steps), dtype=np.int64)
    last = np.full(num, -min_gap)
    for t in range(1, steps):
        change = ~near[:, t] & (t - last >= min_gap) & (draws[:, t] < rate)
        events[change, t], last[change] = 1, t
    return events


def color_balls(
    num_sequences: int,
    num_steps: int = 20,
    size: int = 32,
    radius: float = 3,
    speed: Tuple[float, float] = (2.0, 3.5),
    num_colors: int = 4,
    seed: int = 0,
    change_colors: bool = True,
    changes: str = "bounces",
    change_rate: float = 0.5,
    min_gap: int = 3,
) -> Tuple[np.ndarray, np.ndarray]:
    """VTA-style coloured ball: frames float32 ``(N, T, 3, size, size)`` in {0, 1} and events int64 ``(N, T)``.

    One ball of ``radius`` pixels on black (no outline) starts uniformly inside the frame, moves at
    ``U(speed)`` pixels per frame in a uniform direction and reflects elastically off the frame's edges.
    Its colour is one of the first ``num_colors`` of ``PALETTE``; on every step with a wall hit (one
    change also when two walls are hit at a corner) it changes to a different one.
    ``events[n, t] = 1`` iff the colour of frame ``t`` differs from that of frame ``t - 1``
    (``events[:, 0] = 0``): 2.49 per 20-frame sequence on average with the defaults.

    ``changes="random"`` decouples the colour from the motion: the same trajectories (the same ``seed``
    gives the same positions and wall hits as ``changes="bounces"``), but the colour changes at random
    frames (:func:`random_changes`: probability ``change_rate`` at each frame at least ``HIT_CLEARANCE``
    frames from any wall hit and ``min_gap`` frames after the previous change; about 2.5 changes per 20
    frames with the defaults, as many as wall hits), so a boundary at a change and one at a bounce differ.

    ``change_colors=False`` is the control: the same trajectories with the first colour kept throughout;
    ``events`` then marks where the colour would have changed (the wall hits, or the random frames), so
    boundaries can be scored against what is *not* an event.
    """
    _check_common("color_balls", num_sequences, num_steps, radius, speed)
    if not MIN_COLORS <= num_colors <= len(PALETTE):
        raise ValueError(f"color_balls: num_colors must be in [{MIN_COLORS}, {len(PALETTE)}], got {num_colors}")
    if changes not in CHANGES or not 0 < change_rate <= 1 or min_gap < 1:
        raise ValueError(f"color_balls: expected changes in {CHANGES}, change_rate in (0, 1] and min_gap >= 1, "
                         f"got {changes!r}, {change_rate}, {min_gap}")
    low, high = radius, size - radius
    _check_box("color_balls", size, low, high)
    rng = np.random.default_rng(seed)
    start = rng.uniform(low, high, size=(num_sequences, SPATIAL_AXES))
    centres, folds = _trajectories(start, _velocities(rng, num_sequences, speed), num_steps, 1.0, low, high)
    events = wall_hits(folds)
    if changes == "random":  # drawn after the trajectories, so these stay those of changes="bounces"
        events = random_changes(rng, events, change_rate, min_gap)
    colors = PALETTE[_color_indices(rng, events if change_colors else np.zeros_like(events), num_colors)]  # (N, T, 3)
    frames = np.empty((num_sequences, num_steps, RGB_CHANNELS, size, size), dtype=np.float32)
    for begin in range(0, num_sequences, CHUNK_SEQUENCES):
        end = begin + CHUNK_SEQUENCES
        masks = _discs(centres[begin:end], size, radius)[:, :, None]  # (n, T, 1, size, size)
        np.multiply(masks, colors[begin:end, :, :, None, None], out=frames[begin:end])
    return frames, events
