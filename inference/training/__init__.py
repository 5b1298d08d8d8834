"""Training: the settings (:mod:`.config`), the SVI step as a module (:mod:`.step`), callbacks
(:mod:`.callbacks`), checkpoints (:mod:`.checkpoint`), batches (:mod:`.data`) and the loop (:mod:`.loop`)."""
from .callbacks import Callback, CallbackList
from .checkpoint import load_weights
from .config import RUNTIME, TrainConfig
from .data import Data, Inputs, as_inputs, place, take
from .loop import TIMINGS, BatchTransform, Interrupted, RunStorageError, Trainer, TrainingDiverged
from .step import SVIStep, local_params

__all__ = ["BatchTransform", "Callback", "CallbackList", "Data", "Inputs", "RUNTIME", "Interrupted", "RunStorageError", "SVIStep", "TIMINGS", "TrainConfig",
           "Trainer", "TrainingDiverged", "as_inputs", "load_weights", "local_params", "place", "take"]
