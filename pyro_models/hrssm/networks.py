"""The HRSSM's networks, one module per factor (its docstring names the factor)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..networks import GaussianHead, mlp
from .config import CONV_KERNEL, CONV_PADDING, CONV_STRIDE, IMAGE_DIMS, HRSSMConfig


def _block(layer: nn.Module, channels: int, batch_norm: bool, norm: type) -> List[nn.Module]:
    return [layer, norm(channels), nn.ELU()] if batch_norm else [layer, nn.ELU()]


def _bottleneck(frame_shape: Sequence[int], layers: int) -> Tuple[int, int]:
    """The spatial size after ``layers`` stride-2 convolutions; H and W must be multiples of 2^layers."""
    _, height, width = frame_shape
    factor = CONV_STRIDE**layers
    if height % factor or width % factor:
        raise ValueError(
            f"frame_shape: height and width must be multiples of 2^conv_layers = {factor}, got {height}x{width}"
        )
    return height // factor, width // factor


class ConvFrameEncoder(nn.Module):
    """Per-frame features e_t = CNN(x_t) ``(frames, feature_size)`` for image frames ``(frames, C, H, W)``,
    shared by q(M | X), q(z_t | M, X) and q(s_t | z_t, M, X): ``conv_layers`` 4x4 stride-2 convolutions,
    then a valid convolution over the remaining ``(H / 2^L, W / 2^L)`` map to 1x1; batch norm and ELU
    after each (the official encoder for L = 3 on 32x32)."""

    def __init__(self, frame_shape: Sequence[int], config: HRSSMConfig):
        super().__init__()
        kernel = _bottleneck(frame_shape, config.conv_layers)
        layers: List[nn.Module] = []
        channels, bn = frame_shape[0], config.batch_norm
        for _ in range(config.conv_layers):
            conv = nn.Conv2d(channels, config.conv_channels, CONV_KERNEL, CONV_STRIDE, CONV_PADDING, bias=not bn)
            layers += _block(conv, config.conv_channels, bn, nn.BatchNorm2d)
            channels = config.conv_channels
        last = nn.Conv2d(channels, config.feature_size, kernel, bias=not bn)  # valid: (H / 2^L, W / 2^L) -> 1x1
        layers += _block(last, config.feature_size, bn, nn.BatchNorm2d)
        self.net = nn.Sequential(*layers, nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLPFrameEncoder(nn.Module):
    """Per-frame features e_t = MLP(x_t) ``(frames, feature_size)`` for vector frames ``(frames, D)``,
    shared by the three posterior factors (ELU after every layer)."""

    def __init__(self, frame_shape: Sequence[int], config: HRSSMConfig):
        super().__init__()
        self.net = nn.Sequential(mlp([frame_shape[0], *config.mlp_hidden, config.feature_size], nn.ELU), nn.ELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvFrameDecoder(nn.Module):
    """Network of p(x_t | s_t) for image frames: state feature f_t ``(frames, feature_size)`` -> one
    value per pixel ``(frames, C, H, W)`` (the mean is its sigmoid): a transposed convolution from 1x1 to
    ``(H / 2^L, W / 2^L)``, then L 4x4 stride-2 transposed convolutions, batch norm and ELU after all but
    the last (the official decoder, whose tanh on [-1, 1] pixels is this sigmoid on [0, 1])."""

    def __init__(self, frame_shape: Sequence[int], config: HRSSMConfig):
        super().__init__()
        kernel = _bottleneck(frame_shape, config.conv_layers)
        bn, width = config.batch_norm, config.conv_channels
        layers = _block(nn.ConvTranspose2d(config.feature_size, width, kernel, bias=not bn), width, bn, nn.BatchNorm2d)
        for _ in range(config.conv_layers - 1):
            conv = nn.ConvTranspose2d(width, width, CONV_KERNEL, CONV_STRIDE, CONV_PADDING, bias=not bn)
            layers += _block(conv, width, bn, nn.BatchNorm2d)
        layers.append(nn.ConvTranspose2d(width, frame_shape[0], CONV_KERNEL, CONV_STRIDE, CONV_PADDING))
        self.net = nn.Sequential(*layers)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f[:, :, None, None])  # (frames, F) -> (frames, F, 1, 1) -> (frames, C, H, W)


class MLPFrameDecoder(nn.Module):
    """Network of p(x_t | s_t) for vector frames: state feature f_t -> ``D`` values (mean: sigmoid)."""

    def __init__(self, frame_shape: Sequence[int], config: HRSSMConfig):
        super().__init__()
        self.net = mlp([config.feature_size, *config.mlp_hidden[::-1], frame_shape[0]], nn.ELU)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


class AbstractTransition(nn.Module):
    """Factor p(z_t | z_{<t}, m_{<t}) (paper: "Hierarchical transitions"): at an UPDATE the belief
    ``c_t = GRU_z(z_{t-1}, c_{t-1})`` (f_z-rnn, :meth:`belief`) and ``z_t ~ N(mu_z(c_t), sigma_z(c_t))``
    (:meth:`forward`); at a COPY the model carries both over."""

    def __init__(self, config: HRSSMConfig):
        super().__init__()
        self.cell = nn.GRUCell(config.abstract_state_size, config.abstract_belief_size)
        self.head = GaussianHead(config.abstract_belief_size, config.abstract_state_size, config.min_scale, scale_fn="sigmoid")

    def belief(self, z_prev: torch.Tensor, c_prev: torch.Tensor) -> torch.Tensor:
        return self.cell(z_prev, c_prev)  # (batch, Z), (batch, C) -> (batch, C)

    def forward(self, c: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.head(c)  # loc, scale (batch, Z)


class ObservationTransition(nn.Module):
    """Factor p(s_t | s_{<t}, z_t, m_{<t}) (paper: "Observation transition"): the abstract
    feature ``a_t = W_a [c_t, z_t]``
    (:meth:`init`) is the belief ``h_t`` at a segment's start (INIT); inside a segment
    ``h_t = GRU_s([s_{t-1}, a_t], h_{t-1})`` (f_s-rnn, :meth:`update`); ``s_t ~ N(mu_s(h_t), sigma_s(h_t))``.
    (The paper writes f_s-mlp(z_t) and s_{t-1} || z_t; the official code feeds a_t, which also sees c_t.)
    ``recurrent=False`` (the RSSM baseline, never inside a segment) builds no GRU."""

    def __init__(self, config: HRSSMConfig, recurrent: bool = True):
        super().__init__()
        belief, state = config.observation_belief_size, config.observation_state_size
        self.abstract_feature = nn.Linear(config.abstract_belief_size + config.abstract_state_size, belief)
        self.cell = nn.GRUCell(state + belief, belief) if recurrent else None
        self.head = GaussianHead(belief, state, config.min_scale, scale_fn="sigmoid")

    def init(self, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.abstract_feature(torch.cat([c, z], dim=-1))  # (batch, H)

    def update(self, s_prev: torch.Tensor, a: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        return self.cell(torch.cat([s_prev, a], dim=-1), h_prev)  # (batch, H)

    def forward(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.head(h)  # loc, scale (batch, S)


class StateFeature(nn.Module):
    """The feature ``f_t = W_f [h_t, s_t]`` ``(batch, feature_size)`` of the observation state, read by
    p(x_t | s_t) (decoder) and p(m_t | s_t) (boundary prior), as the official ``obs_feat``."""

    def __init__(self, config: HRSSMConfig):
        super().__init__()
        self.linear = nn.Linear(config.observation_belief_size + config.observation_state_size, config.feature_size)

    def forward(self, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([h, s], dim=-1))


class BoundaryPrior(nn.Module):
    """Factor p(m_t | s_t) = Bern(sigmoid(w_m . f_t + b_m)) (paper: "Prior on temporal structure", before
    the constraints): the logit ``(batch,)`` of a boundary after frame t from the state feature f_t."""

    def __init__(self, config: HRSSMConfig):
        super().__init__()
        self.linear = nn.Linear(config.feature_size, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear(f).squeeze(-1)


class BoundaryPosterior(nn.Module):
    """Factor q(M | X) = prod_t Bern(m_t | sigmoid(phi(X)_t)) (paper: "Sequence decomposition", before the
    constraints): a stack of ``boundary_layers`` Conv1d over time (kernel ``boundary_kernel``, batch norm,
    ELU), then a Conv1d to one logit per frame (official PostBoundaryDetector, two-class logits there).
    Centred (non-causal) convolutions for the ``relaxed`` guide; left-padded ones for the ``causal``
    guide, so that the logit of frame t reads frames 1..t only (an online segmenter).
    ``forward(e (batch, T, F)) -> (batch, T)``: the logit that frame t starts a segment (that of
    ``m_{t-1}``; column 0 is unused)."""

    def __init__(self, config: HRSSMConfig):
        super().__init__()
        size, kernel, bn = config.feature_size, config.boundary_kernel, config.batch_norm
        causal = config.guide == "causal"
        layers: List[nn.Module] = []
        for _ in range(config.boundary_layers):
            layers += _time_padding(kernel, causal)
            layers += _block(nn.Conv1d(size, size, kernel, bias=not bn), size, bn, nn.BatchNorm1d)
        layers += _time_padding(kernel, causal) + [nn.Conv1d(size, 1, kernel)]
        self.net = nn.Sequential(*layers)

    def forward(self, e: torch.Tensor, inside: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``(batch, T)`` for features ``e (batch, T, F)``; ``inside (batch, T)``: the steps of each
        sequence; every layer's output is 0 past its end, as the zero padding of a sequence alone."""
        h = e.transpose(1, 2)  # (batch, F, T)
        keep = None if inside is None else inside.unsqueeze(1).to(h.dtype)  # (batch, 1, T)
        for layer in self.net:
            h = layer(h)
            if keep is not None and isinstance(layer, nn.ELU):
                h = h * keep
        return h.squeeze(1)  # (batch, 1, T) -> (batch, T)


def _time_padding(kernel: int, causal: bool) -> List[nn.Module]:
    """Zero padding over time that keeps T: all on the past side (causal) or centred."""
    left = kernel - 1 if causal else kernel // 2
    return [nn.ConstantPad1d((left, kernel - 1 - left), 0.0)]


class AbstractPosterior(nn.Module):
    """Factor q(z_t | M, X) = N(mu(psi^fwd_{t-1}, psi^bwd_t), sigma(.)) (paper: "State inference"): psi^fwd is a
    forward
    GRU over the frame features (never reset; psi^fwd_0 = 0), psi^bwd a backward GRU reset at segment
    starts, so psi^bwd_t summarises frames t..end of t's segment."""

    def __init__(self, config: HRSSMConfig):
        super().__init__()
        belief = config.abstract_belief_size
        self.forward_rnn = nn.GRU(config.feature_size, belief, batch_first=True)
        self.backward_cell = nn.GRUCell(config.feature_size, belief)
        self.head = GaussianHead(2 * belief, config.abstract_state_size, config.min_scale, scale_fn="sigmoid")

    def features(self, e: torch.Tensor, starts: torch.Tensor, inside: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[psi^fwd_{t-1}, psi^bwd_t]`` ``(batch, T, 2C)`` for ``e (batch, T, F)``, ``starts (batch, T)``;
        ``inside (batch, T)``: the backward GRU starts at each sequence's own last frame."""
        fwd, _ = self.forward_rnn(e)  # (batch, T, C)
        fwd = torch.cat([torch.zeros_like(fwd[:, :1]), fwd[:, :-1]], dim=1)  # shifted: psi^fwd_{t-1}
        state, bwd = e.new_zeros(e.shape[0], fwd.shape[-1]), []
        for t in reversed(range(e.shape[1])):
            state = self.backward_cell(e[:, t], state)
            bwd.append(state)
            state = (1.0 - starts[:, t, None]) * state  # frame t opens its segment: t - 1 does not see it
            if inside is not None:  # past a sequence's end: its last frame starts from 0
                state = state * inside[:, t, None].to(state.dtype)
        return torch.cat([fwd, torch.stack(bwd[::-1], dim=1)], dim=-1)

    def forward(self, feature: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.head(feature)  # loc, scale (batch, Z)


class ObservationPosterior(nn.Module):
    """Factor q(s_t | z_t, M, X) = N(mu(phi^fwd_t, z_t), sigma(.)) (paper: "Observation abstraction
    predictor"): phi^fwd is a forward GRU
    over the frame features reset at segment starts. (The official code reads W_a [c_t, z_t] of the model
    instead of z_t; here the guide keeps its own networks.)"""

    def __init__(self, config: HRSSMConfig):
        super().__init__()
        belief = config.observation_belief_size
        self.cell = nn.GRUCell(config.feature_size, belief)
        state = config.observation_state_size
        self.head = GaussianHead(belief + config.abstract_state_size, state, config.min_scale, scale_fn="sigmoid")

    def features(self, e: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """phi^fwd ``(batch, T, H)`` for ``e (batch, T, F)``, ``starts (batch, T)``."""
        state, out = e.new_zeros(e.shape[0], self.cell.hidden_size), []
        for t in range(e.shape[1]):
            state = self.cell(e[:, t], (1.0 - starts[:, t, None]) * state)
            out.append(state)
        return torch.stack(out, dim=1)

    def forward(self, phi: torch.Tensor, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.head(torch.cat([phi, z], dim=-1))  # loc, scale (batch, S)


def _frame_network(kind: str, frame_shape: Tuple[int, ...], config: HRSSMConfig) -> nn.Module:
    image = len(frame_shape) == IMAGE_DIMS
    if kind == "encoder":
        return (ConvFrameEncoder if image else MLPFrameEncoder)(frame_shape, config)
    return (ConvFrameDecoder if image else MLPFrameDecoder)(frame_shape, config)
