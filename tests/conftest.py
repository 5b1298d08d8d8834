import os
import sys

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
