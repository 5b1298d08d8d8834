"""The KVAE's networks: the frame encoder of q(a_t | x_t) and the frame decoder of p(x_t | a_t), for
image frames ``(C, H, W)`` (convolutions, sub-pixel upsampling) and vector frames ``(D,)`` (MLPs)."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..networks import mlp
from .config import KVAEConfig


class CappedGaussianHead(nn.Module):
    """Mean and standard deviation of q(a_t | x_t) from frame features ``(frames, features)``: dense
    layers to the mean and to the variance ``cap * sigmoid(.)`` (never above R)."""

    def __init__(self, features: int, config: KVAEConfig):
        super().__init__()
        self.loc = nn.Linear(features, config.a_dim)
        self.var = nn.Linear(features, config.a_dim)
        self.cap = config.encoder_var_cap

    def forward(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.loc(h), (self.cap * torch.sigmoid(self.var(h))).sqrt()


class ConvFrameEncoder(nn.Module):
    """Network of q(a_t | x_t) for image frames: ``layers`` 3x3 stride-2 convs with ReLU, then dense to
    the mean and the variance ``cap * sigmoid(.)`` of a_t."""

    def __init__(self, frame_shape: Sequence[int], config: KVAEConfig):
        super().__init__()
        c, h, w = frame_shape
        layers, channels = [], c
        for _ in range(config.encoder_layers):
            layers += [nn.Conv2d(channels, config.encoder_filters, 3, stride=2, padding=1), nn.ReLU()]
            channels = config.encoder_filters
            h, w = (h + 1) // 2, (w + 1) // 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = CappedGaussianHead(channels * h * w, config)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.body(x))  # (frames, C, H, W) -> (frames, features) -> loc, scale


class ConvFrameDecoder(nn.Module):
    """Network of p(x_t | a_t) for image frames: dense to ``(start_channels, H/2^B, W/2^B)``, then B
    blocks of [3x3 conv to ``channels``, ReLU, sub-pixel x2 upsampling], then a 1x1 conv to logits."""

    def __init__(self, frame_shape: Sequence[int], config: KVAEConfig):
        super().__init__()
        c, h, w = frame_shape
        factor = 2**config.decoder_blocks
        if h % factor or w % factor:
            raise ValueError(f"frame_shape: height and width must be multiples of 2^decoder_blocks = {factor}, got {h}x{w}")
        self.start = (config.decoder_start_channels, h // factor, w // factor)
        self.dense = nn.Linear(config.a_dim, int(torch.Size(self.start).numel()))
        blocks, channels = [], config.decoder_start_channels
        for _ in range(config.decoder_blocks):
            blocks += [nn.Conv2d(channels, config.decoder_channels, 3, padding=1), nn.ReLU(), nn.PixelShuffle(2)]
            channels = config.decoder_channels // 4
        self.body = nn.Sequential(*blocks)
        self.out = nn.Conv2d(channels, c, 1)

    @property
    def input_layer(self) -> nn.Linear:
        """The dense layer that reads a."""
        return self.dense

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.dense(a)).reshape((-1,) + self.start)  # (frames, start_channels, h, w)
        return self.out(self.body(h))  # (frames, C, H, W) logits


class MLPFrameEncoder(nn.Module):
    """Network of q(a_t | x_t) for vector frames ``(frames, D)``: MLP, then mean and capped variance."""

    def __init__(self, frame_shape: Sequence[int], config: KVAEConfig):
        super().__init__()
        self.body = nn.Sequential(mlp([frame_shape[0], *config.mlp_hidden]), nn.ReLU())
        self.head = CappedGaussianHead(config.mlp_hidden[-1], config)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.body(x))


class MLPFrameDecoder(nn.Module):
    """Network of p(x_t | a_t) for vector frames: MLP to ``D`` logits."""

    def __init__(self, frame_shape: Sequence[int], config: KVAEConfig):
        super().__init__()
        self.net = mlp([config.a_dim, *config.mlp_hidden[::-1], frame_shape[0]])

    @property
    def input_layer(self) -> nn.Linear:
        """The dense layer that reads a."""
        return self.net[0]

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.net(a)
