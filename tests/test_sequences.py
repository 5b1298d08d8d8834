"""Sequence data: generated balls (physics, raster, events), layouts, npz, MNIST rows, caching."""
import gzip
import math
import os
import struct

import numpy as np
import pytest
import torch

from pyro_models.datasets import balls, sequences
from pyro_models.datasets.balls import OUTLINE_WIDTH, PALETTE, bouncing_balls, color_balls
from pyro_models.datasets.mnist import TEST_IMAGES
from pyro_models.datasets.sequences import (
    DEFAULT_SEED,
    SEQUENCE_DATASETS,
    TEST_SEED_OFFSET,
    check_sequences,
    generate_sequences,
    load_sequence_data,
    load_sequence_npz,
)

SIZE, RADIUS = 32, 3
# Pixels of a radius-3 disc rasterised at any sub-pixel position (pixel centre inside the circle):
# 26 to 32, pi * 9 = 28.3 on average; its bounding box is 5 or 6 pixels wide and high.
DISC_AREA = (26, 32)
DISC_EXTENT = (5, 6)
# The centroid of a rasterised radius-3 disc is within 0.27 px of the true centre (measured); margin:
CENTROID_TOLERANCE = 0.35
KVAE_STEP = (10.0 * 0.2, 15.0 * 0.2)  # px per frame: speed U(10, 15) px/s times dt 0.2 s
VTA_MAX_SPEED = 3.5  # px per frame
EVENTS_PER_SEQUENCE = (2.2, 2.8)  # measured 2.49 over 5,000 sequences (20 frames, defaults)


def blobs(mask):
    """Number of 4-connected components of a small bool image (flood fill by repeated dilation)."""
    remaining, count = mask.copy(), 0
    while remaining.any():
        grown = np.zeros_like(remaining)
        grown[tuple(np.argwhere(remaining)[0])] = True
        while True:
            wider = grown.copy()
            wider[1:] |= grown[:-1]
            wider[:-1] |= grown[1:]
            wider[:, 1:] |= grown[:, :-1]
            wider[:, :-1] |= grown[:, 1:]
            wider &= remaining
            if np.array_equal(wider, grown):
                break
            grown = wider
        remaining &= ~grown
        count += 1
    return count


def centroid(mask):
    """(x, y) centre of the ``True`` pixels of ``mask (H, W)``, pixel centres at half-integers."""
    rows, cols = np.nonzero(mask)
    return np.array([cols.mean() + 0.5, rows.mean() + 0.5])


def interior(frames):
    """The pixels inside the one-pixel outline: ``(..., H - 2, W - 2)``."""
    return frames[..., OUTLINE_WIDTH:-OUTLINE_WIDTH, OUTLINE_WIDTH:-OUTLINE_WIDTH]


# ---------------------------------------------------------------------------------------------------
# Generators


def test_bouncing_balls_deterministic_shapes():
    a, b = bouncing_balls(6, seed=3), bouncing_balls(6, seed=3)
    assert a.shape == (6, 20, SIZE, SIZE) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, bouncing_balls(6, seed=4))
    assert set(np.unique(a)) == {0.0, 1.0}
    assert bouncing_balls(2, num_steps=5, size=20, seed=0).shape == (2, 5, 20, 20)


def test_color_balls_deterministic_shapes():
    (a, events), (b, again) = color_balls(6, seed=3), color_balls(6, seed=3)
    assert a.shape == (6, 20, 3, SIZE, SIZE) and a.dtype == np.float32
    assert events.shape == (6, 20) and events.dtype == np.int64 and (events[:, 0] == 0).all()
    assert np.array_equal(a, b) and np.array_equal(events, again)
    assert not np.array_equal(a, color_balls(6, seed=4)[0])
    assert set(np.unique(a)) <= {0.0, 1.0} and set(np.unique(events)) <= {0, 1}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: bouncing_balls(0), "num_sequences"),
        (lambda: bouncing_balls(2, speed=(3.0, 1.0)), "speed"),
        (lambda: bouncing_balls(2, size=8), "no room"),
        (lambda: bouncing_balls(2, dt=0.0), "dt"),
        (lambda: color_balls(2, num_colors=1), "num_colors"),
        (lambda: color_balls(2, radius=-1), "radius"),
    ],
)
def test_generator_arguments_checked(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def reference_path(start, velocity, num_steps, low, high):
    """Frame-by-frame motion with explicit reflections (a wall hit reflects the overshoot)."""
    position, velocity, path = start.copy(), velocity.copy(), [start.copy()]
    for _ in range(num_steps - 1):
        position = position + velocity
        for axis in range(2):
            while not low <= position[axis] <= high:
                wall = low if position[axis] < low else high
                position[axis] = 2 * wall - position[axis]
                velocity[axis] = -velocity[axis]
        path.append(position.copy())
    return np.array(path)


def test_fold_matches_explicit_reflections():
    rng = np.random.default_rng(0)
    low, high = 4.0, 28.0
    for _ in range(20):
        start, velocity = rng.uniform(low, high, 2), rng.uniform(-9, 9, 2)  # up to 3 px per frame
        centres, _ = balls._trajectories(start[None], velocity[None], 30, 1.0, low, high)
        assert np.allclose(centres[0], reference_path(start, velocity, 30, low, high), atol=1e-9)


def test_bouncing_balls_outline_and_one_full_disc():
    frames = bouncing_balls(40, seed=1)
    edges = np.concatenate([frames[..., 0, :], frames[..., -1, :], frames[..., :, 0], frames[..., :, -1]], -1)
    assert (edges == 1).all()  # the outline is on in every frame
    inside = interior(frames) > 0
    areas = inside.sum(axis=(-1, -2))
    assert areas.min() >= DISC_AREA[0] and areas.max() <= DISC_AREA[1]
    assert abs(areas.mean() - math.pi * RADIUS**2) < 1.0
    for mask in inside.reshape(-1, SIZE - 2, SIZE - 2)[::7]:
        assert blobs(mask) == 1
        rows, cols = np.nonzero(mask)
        # a full disc, never cut by the outline: its bounding box is a whole disc's
        assert np.ptp(rows) + 1 in DISC_EXTENT and np.ptp(cols) + 1 in DISC_EXTENT


def test_bouncing_balls_step_length():
    frames = interior(bouncing_balls(60, seed=2)) > 0
    centres = np.array([[centroid(f) for f in video] for video in frames]) + OUTLINE_WIDTH  # (N, T, 2)
    low, high = OUTLINE_WIDTH + RADIUS, SIZE - OUTLINE_WIDTH - RADIUS
    margin = KVAE_STEP[1] + CENTROID_TOLERANCE
    far = ((centres > low + margin) & (centres < high - margin)).all(axis=-1)  # no bounce possible
    free = far[:, 1:] & far[:, :-1]
    steps = np.linalg.norm(np.diff(centres, axis=1), axis=-1)[free]
    assert free.mean() > 0.2
    assert steps.min() >= KVAE_STEP[0] - 2 * CENTROID_TOLERANCE
    assert steps.max() <= KVAE_STEP[1] + 2 * CENTROID_TOLERANCE
    assert (np.linalg.norm(np.diff(centres, axis=1), axis=-1) <= KVAE_STEP[1] + 2 * CENTROID_TOLERANCE).all()


def ball_colors(frames):
    """``(N, T, 3)`` colour of the ball in each frame (all lit pixels share one colour)."""
    lit = frames.max(axis=2) > 0  # (N, T, H, W)
    colors = np.zeros(frames.shape[:2] + (3,), dtype=np.float32)
    for n, t in np.ndindex(*frames.shape[:2]):
        pixels = frames[n, t][:, lit[n, t]]  # (3, pixels)
        assert (pixels == pixels[:, :1]).all()
        colors[n, t] = pixels[:, 0]
    return colors, lit


def test_color_balls_events_are_colour_changes_at_walls():
    frames, events = color_balls(60, seed=5)
    colors, lit = ball_colors(frames)
    assert (lit.sum(axis=(-1, -2)) >= DISC_AREA[0]).all()
    palette = {tuple(c) for c in PALETTE[:4]}
    assert {tuple(c) for c in colors.reshape(-1, 3)} <= palette
    changed = (colors[:, 1:] != colors[:, :-1]).any(axis=-1)
    assert np.array_equal(events[:, 1:].astype(bool), changed)
    for n, t in zip(*np.nonzero(events)):
        x, y = centroid(lit[n, t])
        gap = min(x - RADIUS, y - RADIUS, SIZE - RADIUS - x, SIZE - RADIUS - y)
        assert gap <= VTA_MAX_SPEED + CENTROID_TOLERANCE  # it hit a wall since the previous frame


def test_color_balls_event_rate():
    _, events = color_balls(500, seed=7)
    mean = events.sum(axis=1).mean()
    assert EVENTS_PER_SEQUENCE[0] < mean < EVENTS_PER_SEQUENCE[1]


# ---------------------------------------------------------------------------------------------------
# Layouts and validation


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((2, 3, 7), (2, 3, 7)),
        ((2, 3, 5, 6), (2, 3, 1, 5, 6)),
        ((2, 3, 1, 5, 6), (2, 3, 1, 5, 6)),
        ((2, 3, 3, 5, 6), (2, 3, 3, 5, 6)),
        ((2, 3, 5, 6, 3), (2, 3, 3, 5, 6)),
    ],
)
def test_check_sequences_layouts(shape, expected):
    array = np.random.default_rng(0).random(shape)
    sequences = check_sequences(array)
    assert tuple(sequences.shape) == expected and sequences.dtype == torch.float32
    if shape[-1] == 3 and len(shape) == 5 and shape[2] not in (1, 3):  # channels-last moved, not reshaped
        assert torch.equal(sequences[1, 2, :, 4, 0], torch.tensor(array[1, 2, 4, 0], dtype=torch.float32))


@pytest.mark.parametrize(
    "array, message",
    [
        (np.full((2, 3, 5, 5), np.nan), "NaN"),
        (np.full((2, 3, 5, 5), 1.5), r"\[0, 1\].*max 1\.5"),
        (np.full((2, 3, 4), -0.1), r"\[0, 1\].*min -0\.1"),
        (np.zeros((4, 5)), r"expected shape .*got \(4, 5\)"),
        (np.zeros((1, 2, 3, 4, 5, 6)), "expected shape"),
        (np.zeros((2, 3, 2, 5, 4)), r"5-d array .*got \(2, 3, 2, 5, 4\)"),
        (np.zeros((0, 3, 5, 5)), "non-empty"),
        (np.zeros((2, 0, 4)), "non-empty"),
    ],
)
def test_check_sequences_rejects(array, message):
    with pytest.raises(ValueError, match=message) as error:
        check_sequences(array, "my_array")
    assert "my_array" in str(error.value)


# ---------------------------------------------------------------------------------------------------
# Loaders


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    array, events = rng.random((10, 4, 5, 6, 3)), rng.integers(0, 2, (10, 4))
    np.savez(tmp_path / "mine.npz", sequences=array, events=events)
    data = load_sequence_data("npz", data_path=str(tmp_path / "mine.npz"))
    assert data.name == "npz" and data.train.shape == (9, 4, 3, 5, 6) and data.test.shape == (1, 4, 3, 5, 6)
    back = torch.cat([data.train, data.test]).permute(0, 1, 3, 4, 2)
    assert torch.equal(back, torch.from_numpy(array).float())
    assert torch.equal(torch.cat([data.train_events, data.test_events]), torch.from_numpy(events))
    np.savez(tmp_path / "vectors.npz", sequences=rng.random((3, 4, 2)))
    plain = load_sequence_npz(str(tmp_path / "vectors.npz"))
    assert plain.train.shape == (2, 4, 2) and plain.train_events is None and plain.test_events is None


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_path"):
        load_sequence_npz(str(tmp_path / "none.npz"))
    np.savez(tmp_path / "wrong.npz", images=np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="'sequences'"):
        load_sequence_npz(str(tmp_path / "wrong.npz"))
    np.savez(tmp_path / "events.npz", sequences=np.zeros((3, 4, 5, 5)), events=np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"\['events'\]: expected shape \(N, T\) = \(3, 4\).*got \(3, 5\)"):
        load_sequence_npz(str(tmp_path / "events.npz"))
    np.savez(tmp_path / "values.npz", sequences=np.zeros((3, 4, 2)), events=np.full((3, 4), 2))
    with pytest.raises(ValueError, match="0 or 1"):
        load_sequence_npz(str(tmp_path / "values.npz"))
    np.savez(tmp_path / "one.npz", sequences=np.zeros((1, 4, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        load_sequence_npz(str(tmp_path / "one.npz"))


def test_loader_errors():
    with pytest.raises(ValueError, match="unknown sequence data set 'moving-mnist'.*bouncing-balls"):
        load_sequence_data("moving-mnist")
    with pytest.raises(ValueError, match="data_dir"):
        load_sequence_data("mnist-rows")
    with pytest.raises(ValueError, match="data_path"):
        load_sequence_data("npz")
    assert SEQUENCE_DATASETS == ("bouncing-balls", "color-balls", "color-balls-constant", "color-balls-random",
                                 "color-balls-random-constant", "mnist-rows", "npz", "jsb", "nottingham", "piano", "musedata")


def test_generated_seeds_and_layout():
    data = load_sequence_data("bouncing-balls", num_train=3, num_test=2, num_steps=5)
    assert DEFAULT_SEED == 1234 and DEFAULT_SEED + TEST_SEED_OFFSET == 5678  # the KVAE's seeds
    assert np.array_equal(data.train.numpy(), bouncing_balls(3, num_steps=5, seed=1234)[:, :, None])
    assert np.array_equal(data.test.numpy(), bouncing_balls(2, num_steps=5, seed=5678)[:, :, None])
    assert data.train_events is None and data.name == "bouncing-balls"
    colors = load_sequence_data("color-balls", num_train=3, num_test=2, num_steps=6, seed=9)
    assert colors.train.shape == (3, 6, 3, SIZE, SIZE) and colors.test_events.shape == (2, 6)
    assert colors.train_events.dtype == torch.int64
    assert torch.equal(check_sequences(colors.train), colors.train)


def test_mnist_rows(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(20, 28, 28)).astype(np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">3I", *images.shape)
    with gzip.open(tmp_path / (TEST_IMAGES + ".gz"), "wb") as f:
        f.write(header + images.tobytes())
    data = load_sequence_data("mnist-rows", data_dir=str(tmp_path), download=False)
    assert data.train.shape == (18, 28, 28) and data.test.shape == (2, 28, 28)  # T = 28 rows of D = 28
    assert torch.allclose(data.test[0] * 255, torch.from_numpy(images[18]).float())


def test_cache(tmp_path, monkeypatch):
    arguments = dict(num_sequences=4, num_steps=6, seed=11)
    fresh, fresh_events = generate_sequences("color-balls", **arguments)
    cached, cached_events = generate_sequences("color-balls", cache_dir=str(tmp_path), **arguments)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".npz")  # written, no temporary file left
    assert torch.equal(fresh, cached) and torch.equal(fresh_events, cached_events)

    def refuse(**_):
        raise AssertionError("regenerated although cached")

    monkeypatch.setitem(sequences.GENERATORS, "color-balls", (color_balls, refuse))
    again, again_events = generate_sequences("color-balls", cache_dir=str(tmp_path), **arguments)
    assert torch.equal(again, fresh) and torch.equal(again_events, fresh_events)
    with pytest.raises(AssertionError, match="regenerated"):  # other arguments: another file
        generate_sequences("color-balls", cache_dir=str(tmp_path), **dict(arguments, seed=12))
    monkeypatch.undo()

    data = load_sequence_data("bouncing-balls", num_train=3, num_test=2, num_steps=4, cache_dir=str(tmp_path))
    reloaded = load_sequence_data("bouncing-balls", num_train=3, num_test=2, num_steps=4, cache_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == 3  # + train and test of bouncing balls
    assert torch.equal(data.train, reloaded.train) and torch.equal(data.test, reloaded.test)
    assert reloaded.train.dtype == torch.float32 and reloaded.train.shape == (3, 4, 1, SIZE, SIZE)


def test_corrupt_cache_file_is_regenerated(tmp_path):
    arguments = dict(num_sequences=2, num_steps=3, seed=0)
    first, _ = generate_sequences("bouncing-balls", cache_dir=str(tmp_path), **arguments)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not a zip file")
    second, _ = generate_sequences("bouncing-balls", cache_dir=str(tmp_path), **arguments)
    assert torch.equal(first, second) and path.stat().st_size > len(b"not a zip file")


def test_constant_colour_control_keeps_trajectories_and_marks_wall_hits(tmp_path):
    """color-balls-constant: the same balls as color-balls (same positions and wall hits), one colour
    per sequence; its events are the wall hits of color-balls, where the colour would have changed."""
    from pyro_models.datasets.sequences import load_sequence_data

    changing = load_sequence_data("color-balls", num_train=30, num_test=5, cache_dir=str(tmp_path))
    constant = load_sequence_data("color-balls-constant", num_train=30, num_test=5, cache_dir=str(tmp_path))
    lit = lambda x: x.amax(dim=2) > 0  # (N, T, H, W): where the ball is
    assert torch.equal(lit(changing.train), lit(constant.train))
    assert torch.equal(changing.train_events, constant.train_events) and constant.train_events.sum() > 0
    colour = constant.train.amax(dim=(3, 4))  # (N, T, 3): the ball's colour in each frame
    assert torch.equal(colour, colour[:, :1].expand_as(colour))  # never changes
    changed = changing.train.amax(dim=(3, 4))
    assert (changed[:, 1:] != changed[:, :-1]).any(-1).sum() > 0
