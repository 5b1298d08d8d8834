"""Data configurations: which data set a run trains on, as dataclasses the command line is generated
from and a run directory stores (``config.json``), so that a run's data can be rebuilt exactly."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

from . import BINARIZE_MODES, DATASETS, ImageData, load_image_data
from .sequences import SEQUENCE_DATASETS, SequenceData, drop_frames, load_sequence_data, past_the_end

MIN_STEPS = 2  # frames per sequence a sequence model needs
DROP_SEED = 2024  # the draw of train_drop_prob's gaps
TEST_SHARE = 5  # generated sequence sets hold out 1 / TEST_SHARE as many sequences as they train on


def _absolute_paths(config) -> None:
    """Store ``data_dir`` and ``data_path`` as absolute paths, so that a run's data are found again from
    any working directory."""
    for name in ("data_dir", "data_path"):
        value = getattr(config, name)
        if value is not None:
            setattr(config, name, os.path.abspath(value))


@dataclass
class ImageDataConfig:
    """Images ``(N, C, H, W)`` in [0, 1] for the VAE family."""

    data: str = field(default="shapes", metadata={"choices": DATASETS})  # the data set
    data_dir: Optional[str] = None  # folder of the MNIST IDX files (torchvision layout or flat), for data mnist
    data_path: Optional[str] = None  # an .npz file with an 'images' array, for data npz
    num_shapes: int = 6000  # size of the generated shapes set (data shapes)
    binarize: str = field(default="none", metadata={"choices": BINARIZE_MODES})  # none keeps grey values; static thresholds once; dynamic redraws every batch
    download: bool = True  # try to download MNIST when its files are missing

    def __post_init__(self):
        _absolute_paths(self)
        if self.data not in DATASETS:
            raise ValueError(f"data: expected one of {DATASETS}, got {self.data!r}")
        if self.binarize not in BINARIZE_MODES:
            raise ValueError(f"binarize: expected one of {BINARIZE_MODES}, got {self.binarize!r}")
        if self.num_shapes < 2:
            raise ValueError(f"num_shapes: expected >= 2 (one held out), got {self.num_shapes}")

    def load(self, seed: int = 0) -> ImageData:
        """The train and held-out images (generated ones drawn from ``seed``)."""
        return load_image_data(self.data, self.data_dir, self.data_path, num_shapes=self.num_shapes, seed=seed,
                               download=self.download)


@dataclass
class SequenceDataConfig:
    """Sequences ``(N, T, *frame_shape)`` in [0, 1] for the sequence models."""

    data: str = field(default="bouncing-balls", metadata={"choices": SEQUENCE_DATASETS})  # the data set
    data_dir: Optional[str] = None  # folder of the MNIST IDX files (data mnist-rows), or of a polyphonic-music set (jsb, nottingham, piano, musedata: its JSON, pickle or .mat file, or the file itself)
    data_path: Optional[str] = None  # an .npz file with a 'sequences' array (optional: 'events', and 'mask' (N, T) with 1 = frame observed), for data npz
    num_sequences: int = 5000  # generated training sequences (1/5 as many held out)
    num_steps: int = 20  # frames per generated sequence (>= 2)
    cache_dir: str = "data/cache"  # where generated sequence sets are cached
    download: bool = True  # try to download MNIST when its files are missing
    train_drop_prob: float = 0.0  # train on gaps: each training frame missing with this probability (a fixed draw; held-out sequences stay as they are)

    def __post_init__(self):
        _absolute_paths(self)
        if not 0.0 <= self.train_drop_prob < 1.0:
            raise ValueError(f"train_drop_prob: expected a probability in [0, 1), got {self.train_drop_prob}")
        if self.data not in SEQUENCE_DATASETS:
            raise ValueError(f"data: expected one of {SEQUENCE_DATASETS}, got {self.data!r}")
        if self.num_sequences < 1:
            raise ValueError(f"num_sequences: expected >= 1, got {self.num_sequences}")
        if self.num_steps < MIN_STEPS:
            raise ValueError(f"num_steps: expected >= {MIN_STEPS} (a sequence model needs two frames), got {self.num_steps}")

    @property
    def num_test(self) -> int:
        return max(1, self.num_sequences // TEST_SHARE)

    def load(self, seed: int = 0) -> SequenceData:
        """The train and held-out sequences (generated sets use their own fixed seeds, not ``seed``), with
        ``train_drop_prob`` of the training frames dropped (a draw fixed by ``DROP_SEED``, the same for
        every training seed)."""
        data = load_sequence_data(self.data, self.data_dir, self.data_path, num_train=self.num_sequences,
                                  num_test=self.num_test, num_steps=self.num_steps, cache_dir=self.cache_dir,
                                  download=self.download)
        if self.train_drop_prob == 0.0:
            return data
        train, mask = drop_frames(data.train, data.train_mask, self.train_drop_prob, DROP_SEED)
        if data.train_lengths is not None:  # no frame is observed past a sequence's end
            mask = mask & ~past_the_end(data.train_lengths, train.shape[1])
        return data._replace(train=train, train_mask=mask)


DataConfig = Union[ImageDataConfig, SequenceDataConfig]
