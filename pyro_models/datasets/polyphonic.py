"""The four polyphonic-music benchmarks of Boulanger-Lewandowski, Bengio and Vincent (2012) as piano rolls:
JSB chorales, Nottingham, Piano-midi.de and MuseData, with their standard train / valid / test splits.

A sequence is a piano roll ``(T, 88)``: one frame per time step, key k (MIDI note 21 + k) 1 where it sounds.
Sequences differ in length; a split is returned padded with zeros to its longest sequence, ``(N, T_max,
88)`` float32, with its ``lengths (N,)`` int64 (:class:`~.sequences.SequenceData`). Three forms are read,
whichever a folder holds (the first found in :data:`FILE_NAMES` order, or a file named directly):

* note lists as JSON, ``{"train" | "valid" | "test": [sequence, ...]}``, a sequence a list of time steps, a
  step the list of MIDI note numbers sounding then (possibly empty);
* the authors' original pickles (the same note lists; read with an unpickler that builds nothing but
  lists, tuples, dicts, numbers and strings, so a pickle cannot run code);
* the ``.mat`` piano rolls (``traindata`` / ``validdata`` / ``testdata`` cell arrays of ``(T, 88)``), which
  need scipy (not a requirement of this library).
"""
from __future__ import annotations

import io
import json
import os
import pickle
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

POLYPHONIC_DATASETS = ("jsb", "nottingham", "piano", "musedata")
SPLITS = ("train", "valid", "test")
LOWEST_NOTE, NUM_KEYS = 21, 88  # MIDI 21 (A0) .. 108 (C8), the 88 piano keys
FILE_NAMES: Dict[str, Tuple[str, ...]] = {  # what a download is called, by the form it has
    "jsb": ("jsb_chorales.json", "JSB Chorales.pickle", "JSB_Chorales.pickle", "jsb_chorales.pickle", "JSB_Chorales.mat"),
    "nottingham": ("nottingham.json", "Nottingham.pickle", "nottingham.pickle", "Nottingham.mat"),
    "piano": ("piano_midi.json", "Piano-midi.de.pickle", "piano_midi.pickle", "Piano_midi.mat"),
    "musedata": ("musedata.json", "MuseData.pickle", "musedata.pickle", "MuseData.mat"),
}
SAFE_BUILTINS = frozenset({"list", "tuple", "dict", "set", "frozenset", "int", "float", "str", "bytes"})


class _NoteListUnpickler(pickle.Unpickler):
    """Builds plain containers and numbers only: any other class in the pickle is refused."""

    def find_class(self, module, name):
        if module in ("builtins", "__builtin__") and name in SAFE_BUILTINS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to build {module}.{name} (a note-list pickle holds lists and numbers)")


def _read_json(path: str) -> Dict[str, list]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_pickle(path: str) -> Dict[str, list]:
    with open(path, "rb") as f:
        return _NoteListUnpickler(io.BytesIO(f.read()), encoding="latin1").load()


def _read_mat(path: str) -> Dict[str, list]:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ValueError(f"data_dir: {path} is a .mat file, which needs scipy (pip install scipy); the JSON or "
                         "pickle forms need nothing") from None
    mat = loadmat(path)
    rolls = {}
    for split in SPLITS:
        key = f"{split}data"
        if key not in mat:
            raise ValueError(f"data_dir: {path} has no '{key}' (expected traindata, validdata, testdata)")
        rolls[split] = [np.asarray(roll) for roll in mat[key].reshape(-1)]
    return rolls


READERS = {".json": _read_json, ".pickle": _read_pickle, ".pkl": _read_pickle, ".mat": _read_mat}


def find_file(name: str, data_dir: str) -> str:
    """The file of data set ``name`` in ``data_dir`` (a folder, or the file itself)."""
    if name not in FILE_NAMES:
        raise ValueError(f"data: expected one of {POLYPHONIC_DATASETS}, got {name!r}")
    if os.path.isfile(data_dir):
        return data_dir
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir: no such folder {os.path.abspath(data_dir)}")
    for file_name in FILE_NAMES[name]:
        path = os.path.join(data_dir, file_name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"data_dir: {os.path.abspath(data_dir)} holds none of {list(FILE_NAMES[name])} for data {name!r}")


def piano_roll(sequence, path: str, where: str) -> np.ndarray:
    """One sequence as a 0/1 piano roll ``(T, 88)`` float32: from a note list (steps of MIDI numbers) or
    from a ``(T, 88)`` array."""
    if isinstance(sequence, np.ndarray) and sequence.ndim == 2:
        if sequence.shape[1] != NUM_KEYS:
            raise ValueError(f"{path}: {where} has {sequence.shape[1]} keys per frame, expected {NUM_KEYS}")
        return (sequence > 0).astype(np.float32)
    roll = np.zeros((len(sequence), NUM_KEYS), dtype=np.float32)
    for t, notes in enumerate(sequence):
        keys = np.asarray(list(notes), dtype=np.int64) - LOWEST_NOTE
        if keys.size and (keys.min() < 0 or keys.max() >= NUM_KEYS):
            bad = int(keys.min() if keys.min() < 0 else keys.max()) + LOWEST_NOTE
            raise ValueError(f"{path}: {where}, step {t} has note {bad}, outside the piano (MIDI {LOWEST_NOTE}-"
                             f"{LOWEST_NOTE + NUM_KEYS - 1})")
        roll[t, keys] = 1.0
    return roll


def pad(rolls: Sequence[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rolls ``(T_i, D)`` padded with zeros to ``(N, T_max, D)`` float32, and their lengths ``(N,)`` int64."""
    lengths = torch.tensor([len(r) for r in rolls], dtype=torch.int64)
    out = torch.zeros(len(rolls), int(lengths.max()), rolls[0].shape[1])
    for i, roll in enumerate(rolls):
        out[i, : len(roll)] = torch.from_numpy(roll)
    return out, lengths


def load_polyphonic(name: str, data_dir: str) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """The three splits of ``name`` in :data:`POLYPHONIC_DATASETS` from ``data_dir``: ``{split: (rolls (N, T_max,
    88), lengths (N,))}``. Empty sequences are refused (a sequence model needs frames)."""
    path = find_file(name, data_dir)
    reader = READERS.get(os.path.splitext(path)[1].lower())
    if reader is None:
        raise ValueError(f"data_dir: {path}: expected a .json, .pickle or .mat file")
    try:
        raw = reader(path)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, UnicodeDecodeError) as error:
        if isinstance(error, ValueError) and str(error).startswith("data_dir"):
            raise
        raise ValueError(f"data_dir: {path} could not be read ({str(error).splitlines()[0][:120]})") from None
    if not isinstance(raw, dict) or any(split not in raw for split in SPLITS):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"data_dir: {path}: expected the splits {list(SPLITS)}, found {found}")
    splits = {}
    for split in SPLITS:
        rolls: List[np.ndarray] = [piano_roll(s, path, f"{split} sequence {i}") for i, s in enumerate(raw[split])]
        empty = [i for i, r in enumerate(rolls) if len(r) == 0]
        if not rolls or empty:
            raise ValueError(f"data_dir: {path}: the {split} split has {'no sequences' if not rolls else f'empty sequences {empty[:5]}'}")
        splits[split] = pad(rolls)
    return splits


def transpose(rolls: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Piano rolls ``(batch, T, keys)`` each moved by ``shifts (batch,)`` semitones (integers; positive:
    up), the keys vacated filled with silence and notes moved past either end of the keyboard dropped:
    ``out[b, t, k] = rolls[b, t, k - shifts[b]]``."""
    keys = torch.arange(rolls.shape[-1], device=rolls.device)  # (keys,)
    source = keys - shifts.to(rolls.device).long().unsqueeze(-1)  # (batch, keys)
    inside = (source >= 0) & (source < rolls.shape[-1])  # (batch, keys)
    index = source.clamp(0, rolls.shape[-1] - 1).unsqueeze(1).expand_as(rolls)  # (batch, T, keys)
    return rolls.gather(-1, index) * inside.unsqueeze(1).to(rolls.dtype)


def random_transposer(max_shift: int):
    """A training-batch transform ``f(rolls, generator) -> rolls`` that moves each piano roll of
    ``(batch, T, keys)`` by its own uniform draw from ``-max_shift .. max_shift`` semitones (data
    augmentation: a chorale in another key is still a chorale). Marked ``for_scoring = False``: the
    trainer scores the training data untransposed."""
    if max_shift < 0:
        raise ValueError(f"max_shift: expected >= 0, got {max_shift}")

    def transform(rolls: torch.Tensor, generator=None) -> torch.Tensor:
        shifts = torch.randint(-max_shift, max_shift + 1, (rolls.shape[0],), generator=generator)  # (batch,)
        return transpose(rolls, shifts)

    transform.for_scoring = False
    return transform
