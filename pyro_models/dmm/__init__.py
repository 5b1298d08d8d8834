"""The deep Markov model (Krishnan, Shalit, Sontag 2017): the model (:mod:`.model`), its guides, the
paper's inference networks (:mod:`.guides`), networks (:mod:`.networks`), missing-frame imputation
(:mod:`.impute`), the latent chain as one site (:mod:`.chains`) and the exact linear-Gaussian special case (:mod:`.linear`)."""
from __future__ import annotations

from typing import Sequence, Tuple

from ..checks import check_shape
from .config import GUIDES, DMMConfig, check_input
from .guides import DMMGuide
from .impute import impute
from .linear import LinearGaussianDMM, as_lgssm, exact_log_marginal, sample_exact_posterior
from .chains import PosteriorChain, TransitionChain, step_mask
from .model import DMM, generate
from .networks import (Combiner, ConvFrameDecoder, ConvFrameEncoder, Emitter, FrameEncoder, GatedTransition,
                       LinearTransition, MeanFieldCombiner, SequenceContext)


def build_dmm(frame_shape: Sequence[int], config: DMMConfig) -> Tuple[DMM, DMMGuide]:
    """Model and guide (``config.guide``) for frames of ``frame_shape``: ``(C, H, W)`` images or ``(D,)``
    vectors. They share one :class:`~pyro_models.kl_weights.KLWeights` (``model.kl_weights``)."""
    frame_shape = check_shape("frame_shape", frame_shape)
    model = DMM(frame_shape, config)
    return model, DMMGuide(frame_shape, config, model.kl_weights)


__all__ = [
    "DMM",
    "DMMConfig",
    "DMMGuide",
    "GUIDES",
    "Combiner",
    "ConvFrameDecoder",
    "ConvFrameEncoder",
    "Emitter",
    "FrameEncoder",
    "GatedTransition",
    "LinearGaussianDMM",
    "LinearTransition",
    "MeanFieldCombiner",
    "SequenceContext",
    "PosteriorChain",
    "TransitionChain",
    "as_lgssm",
    "build_dmm",
    "check_input",
    "exact_log_marginal",
    "generate",
    "impute",
    "sample_exact_posterior",
    "step_mask",
]
