import gzip
import os
import struct
import sys

import numpy as np

import pyro
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def clean_pyro():
    """Every test starts with an empty param store, validation on and a fixed seed."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def repo_root():
    return ROOT


@pytest.fixture
def tiny_images():
    """Small generated image data: 120 train, 40 held out, (1, 12, 12)."""
    from pyro_models.datasets import make_shapes

    images = make_shapes(160, size=12, seed=1)
    return images[:120], images[120:]


def pytest_configure(config):
    # One intra-op thread: many tiny ops (Kalman steps, GRU cells) and OpenMP spin-waiting make more
    # threads slower, and badly so when another process shares the cores.
    torch.set_num_threads(1)


def write_idx(path, array, compress):
    """Write ``array`` (uint8) as an IDX file, gzipped when ``compress``."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist_dir(tmp_path):
    """A folder holding a 40-image stand-in for the official test set (t10k-images-idx3-ubyte.gz)."""
    images = np.random.default_rng(0).integers(0, 256, size=(40, 28, 28))
    write_idx(str(tmp_path / "t10k-images-idx3-ubyte.gz"), images, True)
    return tmp_path
