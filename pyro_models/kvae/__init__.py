"""The Kalman VAE (Fraccaro et al. 2017): the model (:mod:`.model`), its guides (:mod:`.guides`), its
networks (:mod:`.networks`) and missing-frame imputation (:mod:`.impute`)."""
from __future__ import annotations

from typing import Sequence, Tuple

from .config import GUIDES, KVAEConfig
from .guides import KVAEGuide, StructuredKVAEGuide, TemporalContext
from .model import KVAE, KalmanDynamics, KalmanPrior, Latents, generate, generate_latents
from ..checks import check_shape
from .impute import impute  # the function, as pyro_models.dmm.impute and pyro_models.hrssm.impute are
from .networks import CappedGaussianHead, ConvFrameDecoder, ConvFrameEncoder, MLPFrameDecoder, MLPFrameEncoder


def build_kvae(frame_shape: Sequence[int], config: KVAEConfig) -> Tuple[KVAE, KVAEGuide]:
    """Model and guide for frames of ``frame_shape``: ``(C, H, W)`` images or ``(D,)`` vectors."""
    frame_shape = check_shape("frame_shape", frame_shape)
    model = KVAE(frame_shape, config)
    guide_class = StructuredKVAEGuide if config.guide == "structured" else KVAEGuide
    return model, guide_class(frame_shape, config, model.kl_weights)


__all__ = ["GUIDES", "KVAE", "impute", "KVAEConfig", "KVAEGuide", "StructuredKVAEGuide", "TemporalContext", "KalmanDynamics", "KalmanPrior", "Latents", "build_kvae", "generate",
           "generate_latents", "CappedGaussianHead", "ConvFrameDecoder", "ConvFrameEncoder", "MLPFrameDecoder",
           "MLPFrameEncoder"]
