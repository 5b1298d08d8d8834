"""Data loaders: IDX reading and layouts, shapes, npz, binarisation, bad input."""
import os

import numpy as np
import pytest
import torch

from conftest import write_idx
from pyro_models.datasets import binarizer, check_images, load_image_data, load_npz, make_shapes, read_idx
from pyro_models.datasets.mnist import TEST_IMAGES, TRAIN_IMAGES, load_mnist


@pytest.fixture
def fake_images():
    return np.random.default_rng(0).integers(0, 256, size=(20, 28, 28)).astype(np.uint8)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, fake_images, compress):
    path = str(tmp_path / ("images" + (".gz" if compress else "")))
    write_idx(path, fake_images, compress)
    assert np.array_equal(read_idx(path), fake_images)


def test_read_idx_rejects_other_files(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"\x01\x02\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(path))


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_test_set_only_split(tmp_path, fake_images, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    os.makedirs(folder, exist_ok=True)
    write_idx(str(folder / (TEST_IMAGES + ".gz")), fake_images, True)
    train, test = load_mnist(str(tmp_path), download=False)
    assert train.shape == (18, 1, 28, 28) and test.shape == (2, 1, 28, 28)  # 90% / 10%, in order
    assert torch.allclose(test[0, 0] * 255, torch.from_numpy(fake_images[18]).float())
    assert train.max() <= 1 and train.min() >= 0


def test_train_and_test_files(tmp_path, fake_images):
    write_idx(str(tmp_path / TEST_IMAGES), fake_images[:5], False)
    write_idx(str(tmp_path / (TRAIN_IMAGES + ".gz")), fake_images, True)
    train, test = load_mnist(str(tmp_path), download=False)
    assert train.shape[0] == 20 and test.shape[0] == 5


def test_missing_mnist_says_where_to_put_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MNIST[/\\]raw"):
        load_mnist(str(tmp_path), download=False)


@pytest.mark.parametrize("size", [12, 28])
def test_shapes_deterministic(size):
    a, b = make_shapes(10, size=size, seed=3), make_shapes(10, size=size, seed=3)
    assert torch.equal(a, b) and a.shape == (10, 1, size, size)
    assert a.min() >= 0 and a.max() <= 1 and a.mean() > 0.01
    assert not torch.equal(a, make_shapes(10, size=size, seed=4))


@pytest.mark.parametrize("shape", [(6, 9, 9), (6, 3, 9, 9)])
def test_npz_loader(tmp_path, shape):
    path = tmp_path / "mine.npz"
    np.savez(path, images=np.random.default_rng(0).random(shape))
    data = load_image_data("npz", data_path=str(path))
    assert data.train.dim() == 4 and data.train.shape[0] + data.test.shape[0] == 6


@pytest.mark.parametrize(
    "array, message",
    [
        (np.full((4, 5, 5), np.nan), "NaN"),
        (np.full((4, 5, 5), 2.0), r"\[0, 1\]"),
        (np.zeros((4, 5)), "expected shape"),
        (np.zeros((2, 1, 3, 5, 5)), "expected shape"),
    ],
)
def test_bad_images(array, message):
    with pytest.raises(ValueError, match=message):
        check_images(array)


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_path"):
        load_npz(str(tmp_path / "none.npz"))
    np.savez(tmp_path / "wrong.npz", pictures=np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="'images'"):
        load_npz(str(tmp_path / "wrong.npz"))
    with pytest.raises(ValueError, match="unknown data set"):
        load_image_data("cifar")
    with pytest.raises(ValueError, match="data_dir"):
        load_image_data("mnist")


def test_binarizers():
    images = torch.rand(50, 1, 6, 6)
    assert torch.equal(binarizer("none")(images), images)
    static = binarizer("static")(images)
    assert torch.equal(static, (images > 0.5).float())
    # (a generator seeded apart from the global one that drew `images`: the same stream would give u == p)
    generator = torch.Generator().manual_seed(123)
    dynamic = binarizer("dynamic")(images, generator)
    assert set(dynamic.unique().tolist()) <= {0.0, 1.0}
    # Bernoulli draws: the mean of the binary pixels tracks the grey mean (MC tolerance ~5 SE).
    assert abs(dynamic.mean() - images.mean()) < 5 * 0.5 / (images.numel() ** 0.5)
    with pytest.raises(ValueError, match="binarisation"):
        binarizer("otsu")
