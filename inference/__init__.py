"""Inference for the models of :mod:`pyro_models`: the SVI trainer, ELBO choices, KL schedules,
imputation, diagnostics and figures, and exact linear-Gaussian state-space inference."""
from .training.elbo import ELBOS, ELBOTerms, elbo_terms, make_elbo
from .training import Callback, TrainConfig, Trainer, TrainingDiverged

__all__ = ["ELBOS", "ELBOTerms", "Callback", "TrainConfig", "Trainer", "TrainingDiverged", "elbo_terms", "make_elbo"]
