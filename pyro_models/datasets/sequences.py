"""Sequence (video and vector-sequence) data sets: generated balls, MNIST rows, a user's ``.npz``.

Every loader returns a :class:`SequenceData` of float32 tensors ``(N, T, *frame_shape)`` in [0, 1]:
frames ``(C, H, W)`` for videos, vectors ``(D,)`` for ``mnist-rows`` and vector ``.npz`` data; and,
where the data set has them, int64 ``(N, T)`` 0/1 events (``color-balls``: colour changes).
Generated data sets are deterministic for their seeds and can be cached on disk (``cache_dir``).

Sequences may have gaps: a bool frame mask ``(N, T)`` per split (True = frame observed; None = every
frame observed), read from a user's ``.npz`` (``mask``) or drawn by :func:`drop_frames`. Missing frames
hold zeros in memory (whatever the file had there, NaN included), so nothing downstream can read them.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
import warnings
import zipfile
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import numpy as np
import torch

from .balls import bouncing_balls, color_balls
from ..imputation import random_frame_mask, zero_missing
from .mnist import load_mnist
from .polyphonic import POLYPHONIC_DATASETS, load_polyphonic

SEQUENCE_DATASETS = ("bouncing-balls", "color-balls", "color-balls-constant", "color-balls-random",
                     "color-balls-random-constant", "mnist-rows", "npz") + POLYPHONIC_DATASETS
DEFAULT_SEED = 1234  # the Kalman VAE's training seed
TEST_SEED_OFFSET = 4444  # held-out data use seed + TEST_SEED_OFFSET: 5678 by default, as the KVAE
TEST_FRACTION = 0.1  # of a user's .npz sequences held out (the last ones, at least one)
CHANNEL_COUNTS = (1, 3)  # grey or RGB frames
CHANNELS_AXIS = 2  # of (N, T, C, H, W)
VECTOR_NDIM, GREY_NDIM, COLOR_NDIM = 3, 4, 5  # (N, T, D), (N, T, H, W), (N, T, C, H, W) or (N, T, H, W, C)
RGB_CHANNELS = 3
CACHE_VERSION = 1  # bump when a generator's output changes, so stale cache files are not read
CACHE_HASH_CHARS = 16
NPY_MAGIC = b"\x93NUMPY"  # the first bytes of an .npy file
_LAYOUTS = "(N, T, D), (N, T, H, W), (N, T, C, H, W) with C in {1, 3} or (N, T, H, W, 3)"


class SequenceData(NamedTuple):
    """Train and held-out sequences ``(N, T, *frame_shape)`` float32 in [0, 1], events ``(N, T)`` or None,
    and frame masks ``(N, T)`` bool (True = observed; None: no gaps) with zeros in the missing frames.

    Sequences of different lengths: ``*_lengths (N,)`` int64 in [1, T] (None: every sequence has T
    frames); each split is padded with zeros past each sequence's end. A validation split (``valid``,
    with its own mask and lengths) selects the best epoch when present; ``test`` is then touched only
    for the final numbers."""

    train: torch.Tensor
    test: torch.Tensor
    name: str
    train_events: Optional[torch.Tensor] = None
    test_events: Optional[torch.Tensor] = None
    train_mask: Optional[torch.Tensor] = None
    test_mask: Optional[torch.Tensor] = None
    train_lengths: Optional[torch.Tensor] = None
    test_lengths: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    valid_mask: Optional[torch.Tensor] = None
    valid_lengths: Optional[torch.Tensor] = None

    @property
    def ragged(self) -> bool:
        """Whether the sequences have lengths of their own."""
        return self.train_lengths is not None

    def frames_held(self, split: str) -> Optional[torch.Tensor]:
        """The frames ``split`` holds, ``(N, T)`` bool: its own gaps (``*_mask``) and not the steps past the
        ends of ragged sequences; None: every frame."""
        known = getattr(self, f"{split}_mask")
        lengths = getattr(self, f"{split}_lengths")
        if lengths is None:
            return known
        inside = ~past_the_end(lengths, getattr(self, split).shape[1])
        return inside if known is None else known & inside


def check_lengths_array(array, shape: Tuple[int, int], argument: str = "lengths") -> torch.Tensor:
    """Validate sequence lengths (integers in [1, T]) for sequences of ``shape (N, T)``; return int64 ``(N,)``."""
    lengths = torch.as_tensor(np.asarray(array))
    if tuple(lengths.shape) != (shape[0],):
        raise ValueError(f"{argument}: expected shape (N,) = ({shape[0]},) to match the sequences, got {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point and not torch.equal(lengths, lengths.round()):
        raise ValueError(f"{argument}: expected whole numbers, got e.g. {lengths[lengths != lengths.round()][:3].tolist()}")
    if lengths.dtype == torch.bool or lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > shape[1]):
        raise ValueError(f"{argument}: expected lengths in [1, T = {shape[1]}], got min {int(lengths.min())}, "
                         f"max {int(lengths.max())}")
    return lengths.to(torch.int64)


def past_the_end(lengths: torch.Tensor, num_steps: int) -> torch.Tensor:
    """``(N, T)`` bool, True at the steps past each sequence's end."""
    return torch.arange(num_steps) >= lengths.unsqueeze(-1)


def _to_layout(sequences: torch.Tensor, argument: str) -> torch.Tensor:
    """``(N, T, D)`` / ``(N, T, C, H, W)`` unchanged, ``(N, T, H, W)`` -> channel axis added,
    channels-last ``(N, T, H, W, 3)`` -> ``(N, T, 3, H, W)``; anything else raises."""
    shape = tuple(sequences.shape)
    if sequences.dim() == GREY_NDIM:
        return sequences.unsqueeze(CHANNELS_AXIS)
    if sequences.dim() == COLOR_NDIM and shape[CHANNELS_AXIS] not in CHANNEL_COUNTS:
        if shape[-1] == RGB_CHANNELS:
            return sequences.movedim(-1, CHANNELS_AXIS)
        raise ValueError(
            f"{argument}: a 5-d array needs 1 or 3 channels on axis 2 (N, T, C, H, W) or 3 on the last "
            f"axis (N, T, H, W, 3), got {shape}"
        )
    if sequences.dim() in (VECTOR_NDIM, COLOR_NDIM):
        return sequences
    raise ValueError(f"{argument}: expected shape {_LAYOUTS}, got {shape} ({sequences.dim()}-d)")


def check_unit_interval(values: torch.Tensor, argument: str, what: str) -> None:
    """Raise ``ValueError`` naming ``argument`` unless every value is finite and in [0, 1] (``what``:
    the noun in the message, e.g. "images")."""
    if not torch.isfinite(values).all():
        count = int((~torch.isfinite(values)).sum())
        raise ValueError(f"{argument}: {count} values are NaN or infinite; {what} must be finite")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"{argument}: values must lie in [0, 1], got min {low:.4g}, max {high:.4g}")


def check_sequences(array, argument: str = "sequences") -> torch.Tensor:
    """Validate sequences and return them as contiguous float32 ``(N, T, D)`` or ``(N, T, C, H, W)``.

    Accepts ``(N, T, D)``, ``(N, T, H, W)`` (a channel axis is added), ``(N, T, C, H, W)`` with C in
    {1, 3}, or channels-last ``(N, T, H, W, 3)`` (when axis 2 is not 1 or 3); every axis non-empty;
    values finite and in [0, 1]. Raises ``ValueError`` naming ``argument`` otherwise.
    """
    sequences = _to_layout(torch.as_tensor(np.asarray(array), dtype=torch.float32), argument)
    if sequences.numel() == 0:
        raise ValueError(
            f"{argument}: every axis must be non-empty (N >= 1, T >= 1), got {tuple(sequences.shape)}"
        )
    check_unit_interval(sequences, argument, "sequences")
    return sequences.contiguous()


def check_events(array, sequences: torch.Tensor, argument: str = "events") -> torch.Tensor:
    """Validate 0/1 events against ``sequences (N, T, ...)``; return int64 ``(N, T)``."""
    events = torch.as_tensor(np.asarray(array))
    expected = tuple(sequences.shape[:2])
    if tuple(events.shape) != expected:
        raise ValueError(
            f"{argument}: expected shape (N, T) = {expected} to match the sequences, got {tuple(events.shape)}"
        )
    if not ((events == 0) | (events == 1)).all():
        raise ValueError(f"{argument}: values must be 0 or 1, got {sorted(events.unique().tolist())[:10]}")
    return events.to(torch.int64)


def check_frame_mask(array, shape: Tuple[int, int], argument: str = "mask") -> torch.Tensor:
    """Validate a frame mask (bool, or 0/1 numbers; True / 1 = observed) of ``shape (N, T)``; return it
    as a bool tensor."""
    mask = torch.as_tensor(np.asarray(array))
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{argument}: expected shape (N, T) = {tuple(shape)} to match the sequences, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        bad = mask[(mask != 0) & (mask != 1)]
        raise ValueError(f"{argument}: values must be 0/1 or bool (1 = frame observed), got e.g. {bad[:5].tolist()}")
    return mask.bool()


def drop_frames(sequences: torch.Tensor, mask: Optional[torch.Tensor], drop_prob: float,
                seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gaps drawn at random: each frame of ``sequences (N, T, ...)`` missing with ``drop_prob``, on top of
    an existing ``mask (N, T)`` (or None), the draw fixed by ``seed``. Returns the sequences with zeros
    in their missing frames and the combined mask."""
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"drop_prob: expected a probability in [0, 1), got {drop_prob}")
    kept = random_frame_mask(*sequences.shape[:2], drop_prob, num_given=0, generator=torch.Generator().manual_seed(seed))
    mask = kept if mask is None else mask & kept
    return zero_missing(sequences, mask), mask


# ---------------------------------------------------------------------------------------------------
# Generated data sets, with an optional disk cache


def _bouncing(**arguments) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    return bouncing_balls(**arguments)[:, :, None], None  # (N, T, 1, H, W), no events


def _colors(**arguments) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    return color_balls(**arguments)


def _constant_colors(**arguments) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The control: ``color-balls`` with no colour change; its events are the wall hits (no event happens)."""
    return color_balls(change_colors=False, **arguments)


def _random_colors(**arguments) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``color-balls`` trajectories whose colour changes at random frames away from the wall hits."""
    return color_balls(changes="random", **arguments)


def _random_constant_colors(**arguments) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The control of ``color-balls-random``: no colour change; its events are the random frames."""
    return color_balls(changes="random", change_colors=False, **arguments)


# name -> (generator whose signature defines the cache key, adapter returning ((N, T, C, H, W), events))
GENERATORS: Dict[str, Tuple[Callable, Callable]] = {
    "bouncing-balls": (bouncing_balls, _bouncing),
    "color-balls": (color_balls, _colors),
    "color-balls-constant": (color_balls, _constant_colors),
    "color-balls-random": (color_balls, _random_colors),
    "color-balls-random-constant": (color_balls, _random_constant_colors),
}

# name -> its control: the same trajectories (same generator arguments and seed) in which nothing
# happens; its "events" mark where the data set's events would have been (the wall hits). Scoring a
# model trained on the data set on its control shows how far the boundaries follow the events
# themselves rather than what they coincide with (a colour changes exactly at a bounce).
CONTROLS: Dict[str, str] = {"color-balls": "color-balls-constant", "color-balls-random": "color-balls-random-constant"}

# name -> {cue: the generated set whose events mark that cue on the same trajectories}: the causes a
# boundary may follow. On color-balls both are the wall hits; on color-balls-random they are apart; on a
# control, "colour_changes" marks where the colour would have changed.
CUES: Dict[str, Dict[str, str]] = {
    "color-balls": {"colour_changes": "color-balls", "wall_hits": "color-balls-constant"},
    "color-balls-constant": {"colour_changes": "color-balls-constant", "wall_hits": "color-balls-constant"},
    "color-balls-random": {"colour_changes": "color-balls-random", "wall_hits": "color-balls-constant"},
    "color-balls-random-constant": {"colour_changes": "color-balls-random-constant", "wall_hits": "color-balls-constant"},
}


def _cache_key(name: str, arguments: dict) -> Tuple[str, str]:
    """The JSON description of a generation (every argument, defaults included) and its file name."""
    generator = GENERATORS[name][0]
    bound = inspect.signature(generator).bind(**arguments)
    bound.apply_defaults()
    description = json.dumps({"name": name, "version": CACHE_VERSION, **bound.arguments}, sort_keys=True)
    digest = hashlib.sha256(description.encode()).hexdigest()[:CACHE_HASH_CHARS]
    return description, f"{name}-n{bound.arguments['num_sequences']}-s{bound.arguments['seed']}-{digest}.npz"


def _save(path: str, description: str, frames: np.ndarray, events: Optional[np.ndarray]) -> None:
    """Write atomically (a temporary file in the same folder, then ``os.replace``); binary frames are
    bit-packed along the last axis."""
    binary = bool(np.all((frames == 0) | (frames == 1)))
    payload = {
        "key": np.array(description),
        "shape": np.array(frames.shape),
        "packed": np.array(binary),
        "frames": np.packbits(frames.astype(bool), axis=-1) if binary else frames,
    }
    if events is not None:
        payload["events"] = events
    handle, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".part")
    try:
        with os.fdopen(handle, "wb") as f:
            np.savez(f, **payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load(path: str, description: str) -> Optional[Tuple[np.ndarray, Optional[np.ndarray]]]:
    """The cached ``(frames, events)`` at ``path``, or None when absent, unreadable or for other arguments."""
    try:
        with np.load(path) as archive:
            if str(archive["key"]) != description:
                return None
            shape = tuple(int(n) for n in archive["shape"])
            frames = archive["frames"]
            if bool(archive["packed"]):
                frames = np.unpackbits(frames, axis=-1, count=shape[-1]).astype(np.float32)
            events = archive["events"] if "events" in archive.files else None
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return frames.reshape(shape), events


def generate_sequences(
    name: str, cache_dir: Optional[str] = None, **arguments
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Generate ``name`` in ``GENERATORS`` with ``arguments`` (those of its generator function).

    Returns float32 frames ``(N, T, C, H, W)`` and int64 events ``(N, T)`` (None for bouncing balls).
    With ``cache_dir``, a file keyed by every generator argument is read when present, else written.
    """
    if name not in GENERATORS:
        raise ValueError(f"unknown generated data set {name!r}; choose one of {tuple(GENERATORS)}")
    description, file_name = _cache_key(name, arguments)
    path = os.path.join(cache_dir, file_name) if cache_dir is not None else None
    cached = _load(path, description) if path is not None and os.path.isfile(path) else None
    if cached is None:
        cached = GENERATORS[name][1](**arguments)
        if path is not None:
            try:
                os.makedirs(cache_dir, exist_ok=True)
                _save(path, description, *cached)
            except OSError as error:  # the cache only saves time: go on without it, and say so
                warnings.warn(f"cache_dir: could not cache the generated data in {cache_dir} ({error.strerror}); "
                              "they were generated and are used without a cache")
    frames, events = cached
    return torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)), (
        None if events is None else torch.from_numpy(events.astype(np.int64))
    )


# ---------------------------------------------------------------------------------------------------
# Loaders


def open_npz(path: str):
    """``np.load(path)`` of a user's ``.npz`` file, with one clear error for a file that is missing, not an
    ``.npz`` archive, or holds pickled objects."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data_path: no such file {os.path.abspath(path)}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            single = f.read(len(NPY_MAGIC)) == NPY_MAGIC
        what = "holds a single array (np.save)" if single else "is not a zip file"
        raise ValueError(f"data_path: {path} {what}, not an .npz archive of named arrays (np.savez)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"data_path: {path} is not a readable .npz archive ({str(error).splitlines()[0][:100]})") from None
    if not hasattr(archive, "files"):
        raise ValueError(f"data_path: {path} holds a single array, not an .npz archive of named arrays (np.savez)")
    return archive


def _read_npz_sequences(archive, path: str,
                        lengths: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The ``sequences`` of an open archive and its optional frame ``mask``: missing frames, and frames past
    the end of a sequence (``lengths``), may hold anything (NaN included) and are zeroed before the values
    are checked."""
    sequences = _to_layout(torch.as_tensor(np.asarray(archive["sequences"]), dtype=torch.float32), f"{path}['sequences']")
    if lengths is not None and sequences.numel():
        sequences = zero_missing(sequences, ~past_the_end(lengths, sequences.shape[1]))
    if "mask" not in archive:
        if sequences.numel() > 0 and torch.isnan(sequences).any():
            raise ValueError(f"{path}['sequences']: {int(torch.isnan(sequences).sum())} values are NaN; mark missing "
                             f"frames with a 0/1 array 'mask' of shape (N, T) = {tuple(sequences.shape[:2])} (1 = observed)")
        return check_sequences(sequences, f"{path}['sequences']"), None
    mask = check_frame_mask(archive["mask"], sequences.shape[:2], f"{path}['mask']")
    if lengths is not None:  # no frame is observed past a sequence's end
        mask = mask & ~past_the_end(lengths, sequences.shape[1])
    return check_sequences(zero_missing(sequences, mask), f"{path}['sequences']"), mask


def load_sequence_npz(path: str, test_fraction: float = TEST_FRACTION) -> SequenceData:
    """A user's sequences: ``np.load(path)['sequences']`` in any layout of :func:`check_sequences`,
    with optional 0/1 ``events (N, T)``, an optional frame ``mask (N, T)`` (bool or 0/1, 1 = observed;
    missing frames may hold NaN) and optional ``lengths (N,)`` (sequence i has ``lengths[i]`` frames; what
    lies past its end is never read and may hold anything, NaN included). The last ``test_fraction`` (at
    least one) are held out."""
    with open_npz(path) as archive:
        if "sequences" not in archive:
            raise ValueError(f"{path}: expected an array named 'sequences', found {sorted(archive.files)}")
        lengths = None
        if "lengths" in archive:
            shape = tuple(np.shape(archive["sequences"])[:2])
            lengths = check_lengths_array(archive["lengths"], shape, f"{path}['lengths']")
        sequences, mask = _read_npz_sequences(archive, path, lengths)
        events = check_events(archive["events"], sequences, f"{path}['events']") if "events" in archive else None
    num_test = max(1, int(round(test_fraction * len(sequences))))
    if num_test >= len(sequences):
        raise ValueError(f"{path}: need at least 2 sequences to hold one out, got {len(sequences)}")
    split = len(sequences) - num_test

    def halves(t):
        return (None, None) if t is None else (t[:split], t[split:])

    return SequenceData(sequences[:split], sequences[split:], "npz", *halves(events), *halves(mask), *halves(lengths))


def load_mnist_rows(data_dir: str, download: bool = True) -> SequenceData:
    """MNIST images read row by row: ``(N, 28, 28)``, T = 28 rows of D = 28 pixels, splits of
    :func:`load_mnist`."""
    train, test = load_mnist(data_dir, download=download)  # (N, 1, 28, 28)
    return SequenceData(train.squeeze(1).contiguous(), test.squeeze(1).contiguous(), "mnist-rows")


def load_polyphonic_data(name: str, data_dir: str) -> SequenceData:
    """A polyphonic-music benchmark (:mod:`.polyphonic`) with its train / valid / test splits and lengths."""
    splits = load_polyphonic(name, data_dir)
    (train, train_lengths), (valid, valid_lengths), (test, test_lengths) = (splits[s] for s in ("train", "valid", "test"))
    return SequenceData(train, test, name, train_lengths=train_lengths, test_lengths=test_lengths, valid=valid,
                        valid_lengths=valid_lengths)


def load_sequence_data(
    name: str,
    data_dir: Optional[str] = None,
    data_path: Optional[str] = None,
    num_train: int = 5000,
    num_test: int = 1000,
    num_steps: int = 20,
    seed: int = DEFAULT_SEED,
    cache_dir: Optional[str] = None,
    download: bool = True,
) -> SequenceData:
    """Load ``name`` in ``SEQUENCE_DATASETS``.

    ``bouncing-balls`` / ``color-balls``: ``num_train`` sequences of ``num_steps`` frames from ``seed``
    and ``num_test`` from ``seed + TEST_SEED_OFFSET`` (1234 and 5678 by default, as the KVAE), cached
    under ``cache_dir`` when given. ``mnist-rows``: from ``data_dir`` (all its images); ``npz``: from
    ``data_path``; ``jsb``, ``nottingham``, ``piano``, ``musedata``: from ``data_dir`` (:mod:`.polyphonic`). ``num_train``, ``num_test``, ``num_steps`` and ``seed`` apply to generated sets only.
    """
    if name in GENERATORS:
        if num_train < 1 or num_test < 1:
            raise ValueError(f"num_train, num_test: expected >= 1 for data {name!r}, got {num_train}, {num_test}")
        common = dict(num_steps=num_steps, cache_dir=cache_dir)
        train, train_events = generate_sequences(name, num_sequences=num_train, seed=seed, **common)
        test, test_events = generate_sequences(name, num_sequences=num_test, seed=seed + TEST_SEED_OFFSET, **common)
        return SequenceData(train, test, name, train_events, test_events)
    if name == "mnist-rows":
        if data_dir is None:
            raise ValueError("data_dir: data 'mnist-rows' needs a folder holding the MNIST IDX files, got None")
        return load_mnist_rows(data_dir, download=download)
    if name == "npz":
        if data_path is None:
            raise ValueError("data_path: data 'npz' needs an .npz file with a 'sequences' array, got None")
        return load_sequence_npz(data_path)
    if name in POLYPHONIC_DATASETS:
        if data_dir is None:
            raise ValueError(f"data_dir: data {name!r} needs the folder (or file) holding it, got None")
        return load_polyphonic_data(name, data_dir)
    raise ValueError(f"unknown sequence data set {name!r}; choose one of {SEQUENCE_DATASETS}")


__all__ = [
    "SEQUENCE_DATASETS",
    "SequenceData",
    "check_events",
    "check_frame_mask",
    "drop_frames",
    "check_sequences",
    "generate_sequences",
    "load_mnist_rows",
    "load_polyphonic_data",
    "load_sequence_data",
    "load_sequence_npz",
]
