"""MNIST from IDX files.

Looked for, in order, under ``root``:

1. torchvision's layout, ``root/MNIST/raw/``;
2. a flat folder, ``root/`` itself (e.g. ``../shared/data/mnist/``).

File names are the official ones (``train-images-idx3-ubyte``, ``t10k-images-idx3-ubyte``, and their
label files), gzipped or not. When only the official test set (``t10k``) is present, its first 9,000
images are the training split and its last 1,000 the held-out split. When no file is found, the
official files are downloaded into ``root/MNIST/raw/`` where a network exists; offline, a
``FileNotFoundError`` says exactly where to put them.
"""
from __future__ import annotations

import gzip
import zlib
import os
import struct
import urllib.request
from typing import Optional, Tuple

import numpy as np
import torch

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
TRAIN_IMAGES = "train-images-idx3-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
# When only the official test set exists, this fraction of it (9,000 of 10,000) trains; the rest is held out.
TEST_ONLY_TRAIN_FRACTION = 0.9
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (gzipped when the name ends in ``.gz``) into an array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as error:  # a truncated or corrupt gzip file
        raise ValueError(f"{path}: unreadable ({type(error).__name__}: {error}); download it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4]!r})")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{dtype_code:02x}")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=_IDX_DTYPES[dtype_code], offset=4 + 4 * ndim)
    expected = int(np.prod(shape))
    if array.size != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} values), file holds {array.size}")
    return array.reshape(shape)


def _find(folder: str, stem: str) -> Optional[str]:
    for name in (stem, stem + ".gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _candidate_folders(root: str) -> Tuple[str, str]:
    return os.path.join(root, "MNIST", "raw"), root


def _download(root: str, stem: str) -> str:
    folder = os.path.join(root, "MNIST", "raw")
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, stem + ".gz")
    errors = []
    for mirror in MIRRORS:
        try:
            with urllib.request.urlopen(mirror + stem + ".gz", timeout=10) as response:
                payload = response.read()
            tmp = target + ".part"
            with open(tmp, "wb") as f:
                f.write(payload)
            os.replace(tmp, target)
            return target
        except OSError as error:  # URLError and socket timeouts are OSErrors
            errors.append(f"{mirror}: {error}")
    raise FileNotFoundError(
        f"MNIST file {stem}[.gz] was not found under {os.path.abspath(root)} and could not be "
        f"downloaded ({'; '.join(errors)}). Put the official IDX files (gzipped or not) in "
        f"{os.path.abspath(folder)} or directly in {os.path.abspath(root)}; the official test set "
        f"alone ({TEST_IMAGES}.gz) is enough for a 9,000 / 1,000 split."
    )


def locate_mnist(root: str, download: bool = True) -> Tuple[Optional[str], str]:
    """Paths of the train and test image files under ``root`` (train may be ``None``)."""
    for folder in _candidate_folders(root):
        test = _find(folder, TEST_IMAGES)
        if test is not None:
            return _find(folder, TRAIN_IMAGES), test
    if not download:
        raise FileNotFoundError(
            f"No MNIST IDX files under {os.path.abspath(root)}: expected {TEST_IMAGES}[.gz] "
            f"(and optionally {TRAIN_IMAGES}[.gz]) in {os.path.join(os.path.abspath(root), 'MNIST', 'raw')} "
            f"or in {os.path.abspath(root)}."
        )
    test = _download(root, TEST_IMAGES)
    train = _download(root, TRAIN_IMAGES)
    return train, test


def load_mnist(root: str, download: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out MNIST images as float tensors ``(N, 1, 28, 28)`` in [0, 1].

    With both official files: 60,000 train / 10,000 held out. With the test file only: its first
    ``TEST_ONLY_TRAIN_FRACTION`` (9,000 images) train, the last 1,000 are held out.
    """
    train_path, test_path = locate_mnist(root, download=download)
    test = torch.from_numpy(read_idx(test_path).astype(np.float32) / 255.0).unsqueeze(1)
    if train_path is None:
        split = int(round(TEST_ONLY_TRAIN_FRACTION * test.shape[0]))
        return test[:split], test[split:]
    train = torch.from_numpy(read_idx(train_path).astype(np.float32) / 255.0).unsqueeze(1)
    return train, test
