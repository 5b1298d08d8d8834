"""The trainer's public names, from :mod:`inference.training` (kept as this module so that
``from inference.trainer import Trainer, TrainConfig`` reads as it always has). Importing it loads no
plotting library."""
from .training import (BatchTransform, Callback, CallbackList, Data, Inputs, TrainConfig, Trainer,  # noqa: F401
                       TrainingDiverged, as_inputs, place, take)
