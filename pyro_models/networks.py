"""Neural networks behind the distributions. Each module is one factor's network; its docstring names
the factor. Networks return distribution parameters; the Pyro models decide what the distribution is.

Shapes: images are ``(batch, C, H, W)``; latent codes ``(batch, z_dim)``.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def mlp(sizes: Sequence[int], activation=nn.ReLU, dropout: float = 0.0) -> nn.Sequential:
    """Linear layers of ``sizes[i] -> sizes[i+1]`` with ``activation`` between them (none at the end),
    each hidden activation followed by dropout with probability ``dropout`` (training mode only) when > 0,
    in the activation's slot so that the linear layers keep their indices (and a state dict its keys)."""
    layers: List[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.Sequential(activation(), nn.Dropout(dropout)) if dropout > 0 else activation())
    return nn.Sequential(*layers)


SCALE_FUNCTIONS = {"softplus": F.softplus, "sigmoid": torch.sigmoid}


class GaussianHead(nn.Module):
    """Maps a feature ``(batch, in_dim)`` to the ``loc`` and ``scale`` of a diagonal Normal
    ``(batch, out_dim)``; ``scale = f(linear) + min_scale`` with ``f`` softplus (the VAEs) or sigmoid
    (the official VTA code's latent distributions)."""

    def __init__(self, in_dim: int, out_dim: int, min_scale: float, scale_fn: str = "softplus"):
        super().__init__()
        if scale_fn not in SCALE_FUNCTIONS:
            raise ValueError(f"scale_fn: expected one of {tuple(SCALE_FUNCTIONS)}, got {scale_fn!r}")
        self.loc = nn.Linear(in_dim, out_dim)
        self.scale = nn.Linear(in_dim, out_dim)
        self.min_scale, self.scale_fn = min_scale, SCALE_FUNCTIONS[scale_fn]

    def forward(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.loc(h), self.scale_fn(self.scale(h)) + self.min_scale


class MLPEncoder(nn.Module):
    """Network of q(z | x): flattened image -> hidden layers (ReLU) -> (loc, scale) of z.

    ``features(x)`` returns the last hidden layer ``(batch, hidden_dims[-1])``, the context of flow guides.
    """

    def __init__(self, x_shape: Sequence[int], hidden_dims: Sequence[int], z_dim: int, min_scale: float):
        super().__init__()
        x_dim = int(torch.Size(x_shape).numel())
        self.body = nn.Sequential(mlp([x_dim, *hidden_dims]), nn.ReLU())
        self.head = GaussianHead(hidden_dims[-1], z_dim, min_scale)
        self.feature_dim = hidden_dims[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))  # (batch, C, H, W) -> (batch, C*H*W) -> (batch, hidden)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.features(x))


class MLPDecoder(nn.Module):
    """Network of p(x | z): z -> hidden layers (ReLU) -> one parameter per pixel ``(batch, C, H, W)``
    (Bernoulli logits or Normal means)."""

    def __init__(self, z_dim: int, hidden_dims: Sequence[int], x_shape: Sequence[int]):
        super().__init__()
        self.x_shape = tuple(x_shape)
        self.net = mlp([z_dim, *hidden_dims, int(torch.Size(x_shape).numel())])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).reshape(z.shape[:-1] + self.x_shape)  # (..., C*H*W) -> (..., C, H, W)

    @property
    def input_layer(self) -> nn.Linear:
        """The first layer, whose column norms show which latent dimensions the decoder uses."""
        return self.net[0]


def conv_spatial_sizes(height: int, width: int, num_layers: int) -> List[Tuple[int, int]]:
    """Spatial sizes after each stride-2, kernel-3, padding-1 convolution, input size first."""
    sizes = [(height, width)]
    for _ in range(num_layers):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.LeakyReLU())


def _deconv_block(c_in: int, c_out: int, out_size: Tuple[int, int], in_size: Tuple[int, int]) -> nn.Sequential:
    # A stride-2, kernel-3, padding-1 transposed convolution gives 2 * in - 1 + output_padding.
    padding = tuple(o - (2 * i - 1) for o, i in zip(out_size, in_size))
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=padding),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(),
    )


class ConvEncoder(nn.Module):
    """Network of q(z | x) for images: stride-2 conv blocks [conv 3x3, batch norm, LeakyReLU] with
    ``channels`` filters, flattened, then (loc, scale) of z (seed 003's encoder)."""

    def __init__(self, x_shape: Sequence[int], channels: Sequence[int], z_dim: int, min_scale: float):
        super().__init__()
        c, h, w = x_shape
        sizes = conv_spatial_sizes(h, w, len(channels))
        blocks = [_conv_block(c_in, c_out) for c_in, c_out in zip([c, *channels[:-1]], channels)]
        self.body = nn.Sequential(*blocks, nn.Flatten())
        self.feature_dim = channels[-1] * sizes[-1][0] * sizes[-1][1]
        self.head = GaussianHead(self.feature_dim, z_dim, min_scale)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (batch, C, H, W) -> (batch, channels[-1] * h' * w')

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.features(x))


class ConvDecoder(nn.Module):
    """Network of p(x | z) for images: linear map to the encoder's last feature map, transposed-conv
    blocks that retrace the encoder's spatial sizes exactly, then a 3x3 conv to one parameter per
    pixel ``(batch, C, H, W)`` (seed 003's decoder, generalised to any (C, H, W))."""

    def __init__(self, z_dim: int, channels: Sequence[int], x_shape: Sequence[int]):
        super().__init__()
        c, h, w = x_shape
        sizes = conv_spatial_sizes(h, w, len(channels))  # [(H, W), ..., (h', w')]
        self.x_shape = tuple(x_shape)
        self.start_shape = (channels[-1],) + sizes[-1]
        self.input_layer = nn.Linear(z_dim, channels[-1] * sizes[-1][0] * sizes[-1][1])
        reversed_channels = list(channels[::-1])  # deepest first
        blocks = []
        for i in range(len(channels)):
            c_in = reversed_channels[i]
            c_out = reversed_channels[i + 1] if i + 1 < len(channels) else channels[0]
            blocks.append(_deconv_block(c_in, c_out, sizes[-2 - i], sizes[-1 - i]))
        self.body = nn.Sequential(*blocks)
        self.out = nn.Conv2d(channels[0], c, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch_shape = z.shape[:-1]
        h = self.input_layer(z).reshape((-1,) + self.start_shape)  # (N, channels[-1], h', w')
        x = self.out(self.body(h))  # (N, C, H, W)
        return x.reshape(batch_shape + self.x_shape)


def per_frame(network: nn.Module, frames: torch.Tensor, frame_dims: int):
    """Apply ``network`` to ``frames (..., *frame)`` (``frame_dims`` trailing axes per frame) as one batch
    of frames, then restore the leading axes: ``(..., *out)``. Tuple outputs are reshaped element-wise."""
    lead = frames.shape[: frames.dim() - frame_dims]
    out = network(frames.reshape((-1,) + frames.shape[frames.dim() - frame_dims :]))  # (frames, *out)
    if isinstance(out, tuple):
        return tuple(o.reshape(lead + o.shape[1:]) for o in out)
    return out.reshape(lead + out.shape[1:])
