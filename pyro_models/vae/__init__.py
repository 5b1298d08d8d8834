"""The VAE family: the model (:mod:`.model`), its guides by name (:mod:`.guides`), bottom-half and
random-pixel imputation (:mod:`.impute`)."""
from __future__ import annotations

import warnings
from typing import Sequence, Tuple

from torch import nn

from ..kl_weights import KLWeights, sample_latent
from ..checks import IMAGE_RANK, check_shape
from ..networks import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder
from .guides import IAFGuide, NormalGuide
from .impute import impute  # the function, as every model package exports its imputer
from .model import ARCHITECTURES, GUIDES, VAE, VAEConfig, generate


def build_vae(x_shape: Sequence[int], config: VAEConfig, architecture: str = "vae") -> Tuple[VAE, nn.Module]:
    """The model and guide on images of shape ``x_shape = (C, H, W)``, with the networks of
    ``architecture`` in ``ARCHITECTURES`` (``vae``: MLP, ``conv-vae``: conv); the same order of arguments
    as every model's builder (``build_dmm(frame_shape, config)``, ``build_kvae``, ``build_hrssm``).
    The older order ``build_vae(name, x_shape, config)`` still works, with a ``DeprecationWarning``."""
    if isinstance(x_shape, str):  # build_vae(name, x_shape, config), the order before 2026-12
        warnings.warn("build_vae(name, x_shape, config) is deprecated: call build_vae(x_shape, config, architecture)",
                      DeprecationWarning, stacklevel=2)
        x_shape, config, architecture = config, architecture, x_shape
    name = architecture
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture: expected one of {tuple(ARCHITECTURES)}, got {name!r}")
    x_shape = check_shape("x_shape", x_shape, ranks=(IMAGE_RANK,))
    if ARCHITECTURES[name] == "mlp":
        encoder = MLPEncoder(x_shape, config.hidden_dims, config.z_dim, config.min_scale)
        decoder = MLPDecoder(config.z_dim, config.hidden_dims[::-1], x_shape)
    else:
        encoder = ConvEncoder(x_shape, config.channels, config.z_dim, config.min_scale)
        decoder = ConvDecoder(config.z_dim, config.channels, x_shape)
    model = VAE(decoder, config.z_dim, x_shape, config.likelihood)
    if config.guide == "normal":
        guide: nn.Module = NormalGuide(encoder, model.kl_weights)
    else:
        guide = IAFGuide(encoder, config.z_dim, config.num_flows, config.flow_hidden_dims, model.kl_weights)
    return model, guide


__all__ = ["ARCHITECTURES", "GUIDES", "VAE", "IAFGuide", "KLWeights", "NormalGuide", "VAEConfig", "build_vae", "generate", "impute",
           "sample_latent"]
