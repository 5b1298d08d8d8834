"""Configuration of the deep Markov model: sizes, the choices of transition, emission, likelihood and
guide, and their validation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from ..distributions import LIKELIHOODS
from ..imputation import check_lengths, check_mask

GUIDES = ("st-r", "st-l", "st-lr", "mf-lr")  # the paper's inference networks (Table 1)
TRANSITIONS = ("gated", "linear")
EMISSIONS = ("network", "linear")
FRAME_NETWORKS = ("mlp", "conv")
RNN_NONLINEARITIES = ("relu", "tanh")
IMAGE_DIMS, VECTOR_DIMS = 3, 1  # frame_shape (C, H, W) or (D,)


@dataclass
class DMMConfig:
    """Sizes and choices of the DMM; defaults follow Pyro's DMM example (``examples/dmm.py``) where it
    has the quantity. See ``docs/dmm.md``."""

    z_dim: int = 100  # size of the latent state z_t
    # p(z_t | z_{t-1}): "gated" (the paper's gated transition function) or "linear"
    # (N(A z_{t-1} + b, diag s^2), with emission="linear" and likelihood="gaussian" an LGSSM)
    transition: str = field(default="gated", metadata={"choices": TRANSITIONS})
    transition_dim: int = 200  # "gated": hidden width of the gate and proposed-mean MLPs
    transition_scale: float = 0.1  # "linear": initial transition standard deviation s (learned)
    # mean of p(x_t | z_t): "network" (MLP, or convolutions for image frames with frame_network="conv")
    # or "linear" (C z_t + d on the flattened frame)
    emission: str = field(default="network", metadata={"choices": EMISSIONS})
    emission_hidden: Tuple[int, ...] = (100, 100)  # "network" emission, MLP: hidden widths (ReLU)
    # "network" emission, MLP, training only: dropout on each hidden layer (a regulariser; held-out scores,
    # importance sampling and imputation run in eval mode, without it)
    emission_dropout: float = 0.0
    frame_network: str = field(default="mlp", metadata={"choices": FRAME_NETWORKS})  # image frames: "mlp" (flattened frames) or "conv"; vector frames: always "mlp"
    conv_channels: Tuple[int, ...] = (16, 32)  # "conv": filters of the 3x3 stride-2 layers (decoder reversed)
    likelihood: str = field(default="bernoulli", metadata={"choices": LIKELIHOODS})  # p(x_t | z_t): "bernoulli" (grey values allowed) or "gaussian"
    obs_scale: float = 0.1  # "gaussian": initial standard deviation r of each frame element (learned)
    guide: str = field(default="st-r", metadata={"choices": GUIDES})  # inference network (the paper's Table 1): st-r, st-l, st-lr or mf-lr
    rnn_dim: int = 600  # hidden size of the guide's RNN (each direction)
    rnn_layers: int = 1  # stacked layers of the guide's RNN
    rnn_nonlinearity: str = field(default="relu", metadata={"choices": RNN_NONLINEARITIES})  # of the guide's RNN: "relu" or "tanh"
    # guide, MLP frames: widths from the flattened frame to the RNN input; () feeds the frame itself
    encoder_hidden: Tuple[int, ...] = ()
    # guide: one more RNN input per frame, 1 where the frame is observed and 0 where it is missing, so that
    # a missing frame differs from an all-zero one (a silent frame of a piano roll)
    mask_feature: bool = False
    # guide, training only: each frame hidden from the guide with this probability (the model still scores
    # it), a fresh draw every step; teaches the guide to infer across gaps (needs mask_feature)
    guide_frame_dropout: float = 0.0
    num_flows: int = 0  # IAF steps on each q(z_t | ...), 0 = none
    flow_hidden: Tuple[int, ...] = (100,)  # autoregressive network widths of each IAF step
    fused_chain: bool = True  # structured guides without flows: draw the chain with a hand-written backward pass (autograd's values and gradients, several times faster; tests/test_ragged.py); False: autograd through every step
    min_scale: float = 1e-4  # floor of the standard deviations of the gated transition and the combiner

    def __post_init__(self):
        choices = (("transition", TRANSITIONS), ("emission", EMISSIONS), ("frame_network", FRAME_NETWORKS),
                   ("likelihood", LIKELIHOODS), ("guide", GUIDES), ("rnn_nonlinearity", RNN_NONLINEARITIES))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        for name in ("z_dim", "transition_dim", "rnn_dim", "rnn_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.num_flows < 0:
            raise ValueError(f"num_flows: expected >= 0, got {self.num_flows}")
        if not 0.0 <= self.emission_dropout < 1.0:
            raise ValueError(f"emission_dropout: expected a probability in [0, 1), got {self.emission_dropout}")
        if self.emission_dropout > 0 and self.emission != "network":
            raise ValueError(f"emission_dropout: applies to the MLP emission (emission 'network'), got emission "
                             f"{self.emission!r} with emission_dropout {self.emission_dropout}")
        if not 0.0 <= self.guide_frame_dropout < 1.0:
            raise ValueError(f"guide_frame_dropout: expected a probability in [0, 1), got {self.guide_frame_dropout}")
        if self.guide_frame_dropout > 0 and not self.mask_feature:
            raise ValueError("guide_frame_dropout: expected 0 unless mask_feature is set (a hidden frame would "
                             f"read as an all-zero frame), got {self.guide_frame_dropout}")
        for name in ("emission_hidden", "encoder_hidden", "conv_channels", "flow_hidden"):
            widths = getattr(self, name)
            if any(width < 1 for width in widths):
                raise ValueError(f"{name}: expected widths >= 1, got {widths}")
        for name in ("conv_channels", "flow_hidden"):
            if not getattr(self, name):
                raise ValueError(f"{name}: expected one or more widths, got {getattr(self, name)}")
        for name in ("transition_scale", "obs_scale", "min_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")


def check_input(x: torch.Tensor, mask: Optional[torch.Tensor], frame_shape: Tuple[int, ...],
                lengths: Optional[torch.Tensor] = None) -> None:
    """Raise ``ValueError`` unless ``x`` is a float ``(batch, T, *frame_shape)`` with batch, T >= 1, ``mask``
    (if given) a bool ``(batch, T)`` and ``lengths`` (if given) integers ``(batch,)`` in [1, T]."""
    expected = f"(batch, T, {', '.join(map(str, frame_shape))})"
    if not torch.is_tensor(x) or x.dim() != len(frame_shape) + 2 or tuple(x.shape[2:]) != tuple(frame_shape):
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"x: expected shape {expected}, got {got}")
    if x.shape[0] < 1 or x.shape[1] < 1 or not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor with batch, T >= 1, got {x.dtype} {tuple(x.shape)}")
    if mask is not None:
        check_mask(x, mask, frames=True)
    if lengths is not None:
        check_lengths(lengths, x.shape[0], x.shape[1])
