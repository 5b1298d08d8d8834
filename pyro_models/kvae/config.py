"""Configuration of the Kalman VAE (sizes and fixed quantities)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

# "factorised": q(a | x) = prod_t q(a_t | x_t), the recognition model of eq. 6; "structured":
# q(a | x) = prod_t q(a_t | x_{1:T}), the frame's own mean corrected by a bidirectional GRU's context.
GUIDES = ("factorised", "structured")


@dataclass
class KVAEConfig:
    """Sizes and fixed quantities of the KVAE; defaults follow the original code (simonkamronn/kvae)."""

    a_dim: int = 2  # size of the encoded frame a_t (the LGSSM's observation)
    state_dim: int = 4  # size of the LGSSM state z_t
    num_bases: int = 3  # K, the number of (A, C) bases the LSTM mixes
    lstm_hidden: int = 50  # hidden units of the LSTM that gives the mixture weights alpha_t
    obs_noise: float = 0.03  # R = obs_noise * I (fixed)
    trans_noise: float = 0.08  # Q = trans_noise * I (fixed)
    init_cov: float = 20.0  # Cov(z_1) = init_cov * I (fixed)
    init_obs_scale: float = 0.05  # C^(k) ~ init_obs_scale * N(0, 1); A^(k) start at I
    encoder_var_cap: float = 0.03  # Var q(a_t | x_t) = cap * sigmoid(.): never above R
    recon_weight: float = 0.3  # weight of log p(x | a) in training (1 in evaluation)
    encoder_filters: int = 32  # images: conv layers of 3x3, stride 2
    encoder_layers: int = 3  # images: number of those conv layers
    decoder_start_channels: int = 32  # images: dense to (channels, H / 2^blocks, W / 2^blocks)
    decoder_channels: int = 128  # each block: 3x3 conv to this many channels, then sub-pixel x2
    decoder_blocks: int = 3  # images: number of sub-pixel blocks (H and W multiples of 2^blocks)
    mlp_hidden: Tuple[int, ...] = (128, 128)  # vector frames: encoder and decoder widths
    guide: str = field(default="factorised", metadata={"choices": GUIDES})  # factorised: q(a_t | x_t) (eq. 6); structured: q(a_t | x_{1:T}) through a bidirectional GRU
    context_hidden: int = 32  # structured guide: hidden units per direction of its GRU over frame features

    def __post_init__(self):
        for name in ("a_dim", "state_dim", "num_bases", "lstm_hidden", "encoder_layers", "decoder_blocks",
                     "encoder_filters", "decoder_start_channels", "decoder_channels", "context_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("obs_noise", "trans_noise", "init_cov", "encoder_var_cap"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")
        if not 0 < self.recon_weight:
            raise ValueError(f"recon_weight: expected > 0, got {self.recon_weight}")
        if not self.mlp_hidden or min(self.mlp_hidden) < 1:
            raise ValueError(f"mlp_hidden: expected one or more widths >= 1, got {self.mlp_hidden}")
        if self.guide not in GUIDES:
            raise ValueError(f"guide: expected one of {GUIDES}, got {self.guide!r}")
