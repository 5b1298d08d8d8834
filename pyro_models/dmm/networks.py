"""The DMM's networks, one module per factor (its docstring names the factor), and the frame networks
they use: MLPs for vector frames ``(D,)`` or flattened image frames, 3x3 stride-2 convolutions for image
frames ``(C, H, W)`` (``frame_network="conv"``)."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..distributions import likelihood_mean, pixel_likelihood
from ..networks import GaussianHead, conv_spatial_sizes, mlp
from .chains import active_rows, longest_first
from .config import IMAGE_DIMS, DMMConfig

CONV_KERNEL, CONV_STRIDE, CONV_PADDING = 3, 2, 1  # each layer halves H and W (rounding up)


def uses_conv(frame_shape: Sequence[int], config: DMMConfig) -> bool:
    """Whether frames of ``frame_shape`` go through convolutions (image frames with ``frame_network="conv"``)."""
    return len(frame_shape) == IMAGE_DIMS and config.frame_network == "conv"


def _identity_linear(size: int) -> nn.Linear:
    """A ``size -> size`` linear layer that starts as the identity map."""
    layer = nn.Linear(size, size)
    nn.init.eye_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


# ------------------------------------------------------------------------------------ frame networks
class ConvFrameEncoder(nn.Module):
    """Image frames ``(frames, C, H, W)`` -> features ``(frames, feature_dim)``: 3x3 stride-2 convolutions
    with ``conv_channels`` filters and ReLU, flattened (no batch norm: a frame's features never depend on
    the other frames of the batch, so a missing frame cannot leak through batch statistics)."""

    def __init__(self, frame_shape: Sequence[int], channels: Sequence[int]):
        super().__init__()
        c, h, w = frame_shape
        layers: List[nn.Module] = []
        for c_in, c_out in zip([c, *channels[:-1]], channels):
            layers += [nn.Conv2d(c_in, c_out, CONV_KERNEL, CONV_STRIDE, CONV_PADDING), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Flatten())
        bottom_h, bottom_w = conv_spatial_sizes(h, w, len(channels))[-1]
        self.feature_dim = channels[-1] * bottom_h * bottom_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (frames, C, H, W) -> (frames, channels[-1] * h' * w')


class ConvFrameDecoder(nn.Module):
    """z ``(frames, z_dim)`` -> one value per pixel ``(frames, C, H, W)``: a linear map (ReLU) to the
    encoder's last feature map, 3x3 stride-2 transposed convolutions (ReLU) retracing the encoder's
    spatial sizes exactly, then a 3x3 convolution to ``C`` channels."""

    def __init__(self, z_dim: int, channels: Sequence[int], frame_shape: Sequence[int]):
        super().__init__()
        c, h, w = frame_shape
        sizes = conv_spatial_sizes(h, w, len(channels))  # [(H, W), ..., (h', w')]
        self.start = (channels[-1],) + sizes[-1]
        self.input_layer = nn.Linear(z_dim, int(torch.Size(self.start).numel()))
        deepest_first = list(channels[::-1])
        layers: List[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(deepest_first, deepest_first[1:] + deepest_first[-1:])):
            out_size, in_size = sizes[-2 - i], sizes[-1 - i]
            # A stride-2, kernel-3, padding-1 transposed convolution gives 2 * in - 1 + output_padding.
            padding = tuple(o - (CONV_STRIDE * n - 1) for o, n in zip(out_size, in_size))
            layers += [nn.ConvTranspose2d(c_in, c_out, CONV_KERNEL, CONV_STRIDE, CONV_PADDING, output_padding=padding),
                       nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels[0], c, CONV_KERNEL, padding=CONV_PADDING)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.input_layer(z)).reshape((-1,) + self.start)  # (frames, channels[-1], h', w')
        return self.out(self.body(h))  # (frames, C, H, W)


class FrameEncoder(nn.Module):
    """Per-frame features e_t of the guide's RNN: frames ``(frames, *frame_shape)`` -> ``(frames,
    feature_dim)``. Convolutions (:class:`ConvFrameEncoder`) or the flattened frame through an MLP of
    ``encoder_hidden`` widths (ReLU after each); with ``encoder_hidden=()`` the flattened frame itself
    (the paper's and Pyro's DMM feed x_t to the RNN)."""

    def __init__(self, frame_shape: Sequence[int], config: DMMConfig):
        super().__init__()
        if uses_conv(frame_shape, config):
            conv = ConvFrameEncoder(frame_shape, config.conv_channels)
            self.net, self.feature_dim = conv, conv.feature_dim
            return
        frame_dim = int(torch.Size(frame_shape).numel())
        layers: List[nn.Module] = [nn.Flatten()]  # (frames, *frame_shape) -> (frames, frame_dim)
        if config.encoder_hidden:
            layers += [mlp([frame_dim, *config.encoder_hidden]), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.feature_dim = config.encoder_hidden[-1] if config.encoder_hidden else frame_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ------------------------------------------------------------------------------------ model factors
class GatedTransition(nn.Module):
    """Factor p(z_t | z_{t-1}) = N(mu(z_{t-1}), diag sigma(z_{t-1})^2), the gated transition function
    (the paper's gated transition function, one of its generative models)::

        g_t = sigmoid(MLP_g(z_{t-1}))                   gate, (..., z_dim)
        h_t = MLP_h(z_{t-1})                            proposed mean (one ReLU hidden layer each)
        mu = (1 - g_t) * (W z_{t-1} + b) + g_t * h_t
        sigma = softplus(W_s ReLU(h_t) + b_s) + min_scale

    (The paper's softplus gives the variance; here it gives the standard deviation, as in Pyro's
    example.) ``W`` starts as the identity, so an untrained transition keeps z_{t-1}'s mean where the
    gate is closed."""

    def __init__(self, config: DMMConfig):
        super().__init__()
        z, hidden = config.z_dim, config.transition_dim
        self.gate = mlp([z, hidden, z])
        self.proposed_mean = mlp([z, hidden, z])
        self.linear_loc = _identity_linear(z)
        self.scale = nn.Linear(z, z)
        self.min_scale = config.min_scale

    def forward(self, z_prev: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """loc, scale ``(..., z_dim)`` for ``z_prev (..., z_dim)``."""
        gate = torch.sigmoid(self.gate(z_prev))
        proposed = self.proposed_mean(z_prev)
        loc = (1.0 - gate) * self.linear_loc(z_prev) + gate * proposed
        return loc, F.softplus(self.scale(F.relu(proposed))) + self.min_scale


class LinearTransition(nn.Module):
    """Factor p(z_t | z_{t-1}) = N(A z_{t-1} + b, diag s^2) (the paper's linear transition; with a linear
    Gaussian emission the DMM is an LGSSM, :mod:`.linear`). ``A`` starts as the identity, ``b`` at 0,
    ``s`` at ``transition_scale``; all learned."""

    def __init__(self, config: DMMConfig):
        super().__init__()
        self.linear = _identity_linear(config.z_dim)
        self.log_scale = nn.Parameter(torch.full((config.z_dim,), math.log(config.transition_scale)))

    def forward(self, z_prev: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """loc, scale ``(..., z_dim)`` for ``z_prev (..., z_dim)``."""
        loc = self.linear(z_prev)
        return loc, self.log_scale.exp().expand_as(loc)


def build_transition(config: DMMConfig) -> nn.Module:
    return GatedTransition(config) if config.transition == "gated" else LinearTransition(config)


class Emitter(nn.Module):
    """Factor p(x_t | z_t) = prod_i Bernoulli(x_ti; sigmoid(F(z_t)_i)) (grey values allowed,
    :class:`~pyro_models.distributions.GreyBernoulli`) or prod_i N(x_ti; F(z_t)_i, r_i^2), the emission
    function F of the paper (eq. 1): an MLP of ``emission_hidden`` widths (ReLU), a
    :class:`ConvFrameDecoder`, or ``emission="linear"`` F(z_t) = C z_t + d. ``forward`` returns F(z_t)
    ``(frames, *frame_shape)`` for ``z (frames, z_dim)``; ``r (frame_shape)`` is learned."""

    def __init__(self, frame_shape: Sequence[int], config: DMMConfig):
        super().__init__()
        self.frame_shape, self.likelihood = tuple(frame_shape), config.likelihood
        frame_dim = int(torch.Size(frame_shape).numel())
        if config.emission == "linear":
            self.net: nn.Module = nn.Linear(config.z_dim, frame_dim)
        elif uses_conv(frame_shape, config):
            if config.emission_dropout > 0:
                raise ValueError(f"emission_dropout: applies to the MLP emission, not to the convolutional one of "
                                 f"image frames {tuple(frame_shape)} (frame_network 'conv'), got {config.emission_dropout}")
            self.net = ConvFrameDecoder(config.z_dim, config.conv_channels, frame_shape)
        else:
            self.net = mlp([config.z_dim, *config.emission_hidden, frame_dim], dropout=config.emission_dropout)
        gaussian = config.likelihood == "gaussian"
        initial = torch.full(self.frame_shape, math.log(config.obs_scale))
        self.log_scale: Optional[nn.Parameter] = nn.Parameter(initial) if gaussian else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).reshape((-1,) + self.frame_shape)  # (frames, ...) -> (frames, *frame_shape)

    def distribution(self, params: torch.Tensor):
        """The per-element distribution of frames with parameters ``params (..., *frame_shape)``."""
        return pixel_likelihood(self.likelihood, params, self.log_scale)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """E[x_t | z_t] ``(..., *frame_shape)`` (Bernoulli probabilities or Normal means)."""
        return likelihood_mean(self.likelihood, params)


# ------------------------------------------------------------------------------------ guide factors
def reverse_padded(e: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """Each sequence of ``e (batch, T, F)`` reversed within its own length (``lengths (batch,)``; None: T),
    the padding left where it was: its own inverse."""
    if lengths is None:
        return e.flip(1)
    steps = torch.arange(e.shape[1], device=e.device)  # (T,)
    index = torch.where(steps < lengths.unsqueeze(-1), lengths.unsqueeze(-1) - 1 - steps, steps)  # (batch, T)
    return e.gather(1, index.unsqueeze(-1).expand_as(e))


class _ElmanRecurrence(torch.autograd.Function):
    """h_t = f(a_t + W_hh h_{t-1}) over the steps in order (or h_t = f(a_t + W_hh h_{t+1}) against it), with a
    hand-written backward pass (see :func:`elman_rnn`)."""

    @staticmethod
    def forward(ctx, pre, w_hh, h_0, relu: bool, active: List[int], reverse: bool):
        # pre (N, T, H): the input projections a_t, bias included; w_hh (H, H); h_0 (N, H); active[t]: the
        # rows inside their sequence at step t, a prefix (the others' outputs are left at 0). Against time,
        # a row starts from h_0 at its own last step. Buffers are time-major, (T, N, H), so that a step's
        # rows are one contiguous block that the products write into directly.
        pre = pre.transpose(0, 1).contiguous()  # (N, T, H) -> (T, N, H)
        out = torch.zeros_like(pre)
        h = h_0[:0]
        w_t = w_hh.t()
        for t in (reversed(range(pre.shape[0])) if reverse else range(pre.shape[0])):
            rows = active[t]
            h_in = h[:rows] if h.shape[0] >= rows else torch.cat([h, h_0[h.shape[0] : rows]])  # new rows start at h_0
            h = torch.addmm(pre[t, :rows], h_in, w_t, out=out[t, :rows])
            h.relu_() if relu else h.tanh_()
        ctx.save_for_backward(out, w_hh, h_0)
        ctx.relu, ctx.active, ctx.reverse = relu, active, reverse
        return out.transpose(0, 1)  # (N, T, H)

    @staticmethod
    def backward(ctx, grad_out):
        out, w_hh, h_0 = ctx.saved_tensors  # out (T, N, H)
        grad_out = grad_out.transpose(0, 1).contiguous()  # (N, T, H) -> (T, N, H)
        # f'(a_t) from the output: relu' = 1[h > 0], tanh' = 1 - h^2
        slope = (out > 0).to(out.dtype) if ctx.relu else 1.0 - out * out
        d_pre = torch.zeros_like(out)  # dL/da_t
        d_first = torch.zeros_like(h_0)  # dL/da of each row at the step that read h_0 (its first)
        steps = list(reversed(range(out.shape[0])) if ctx.reverse else range(out.shape[0]))  # loop order
        d_input = out.new_zeros(0, out.shape[-1])  # dL/d(the state the step after read), its rows
        for i in range(len(steps) - 1, -1, -1):
            t, rows = steps[i], ctx.active[steps[i]]
            # the step after read this step's state in its first rows (rows it started itself read h_0)
            carry = d_input[:rows] if d_input.shape[0] >= rows else F.pad(d_input, (0, 0, 0, rows - d_input.shape[0]))
            d_a = torch.add(grad_out[t, :rows], carry, out=d_pre[t, :rows]).mul_(slope[t, :rows])
            before = ctx.active[steps[i - 1]] if i > 0 else 0  # rows the step before ran; the rest started here
            if rows > before:
                d_first[before:rows] = d_a[before:]
            if i > 0:
                d_input = d_a @ w_hh
        # dL/dW_hh = sum_t d_a_t^T (the state step t read): the output of the step before in loop order (its
        # rows past their end are 0), or h_0 for the rows a step starts: one product for each
        flat = (-1, out.shape[-1])  # (T - 1, N, H) -> ((T - 1) N, H)
        later, earlier = (d_pre[:-1], out[1:]) if ctx.reverse else (d_pre[1:], out[:-1])
        d_w = later.reshape(flat).t() @ earlier.reshape(flat) + d_first.t() @ h_0
        return d_pre.transpose(0, 1), d_w, d_first @ w_hh, None, None, None


def elman_rnn(rnn: nn.RNN, e: torch.Tensor, h_0: torch.Tensor, active: Optional[List[int]] = None,
              reverse: bool = False) -> torch.Tensor:
    """The outputs ``(N, T, H)`` of the one-layer ``rnn`` (batch first) over ``e (N, T, F)`` from ``h_0 (N,
    H)``: ``rnn(e, h_0)``'s values and gradients (``tests/test_dmm.py``), computed as the recurrence needs.
    The input projections of every step are one product; the loop does one product a step forward and
    one backward; the recurrent weight's gradient is one product over all steps (autograd through
    ``nn.RNN`` on the CPU computes it step by step: a quarter of a DMM step at the paper's widths).
    ``active[t]``: how many rows (a prefix: rows sorted by decreasing length) are inside their sequence at
    step t; the others are not computed and their outputs are 0 (None: every row, every step). ``reverse``:
    run against time, each row from its own last step (``rnn`` over each sequence reversed within its
    length, outputs in time order)."""
    pre = F.linear(e, rnn.weight_ih_l0, rnn.bias_ih_l0 + rnn.bias_hh_l0)  # (N, T, H), every step at once
    active = [e.shape[0]] * e.shape[1] if active is None else active
    return _ElmanRecurrence.apply(pre, rnn.weight_hh_l0, h_0, rnn.nonlinearity == "relu", active, reverse)


class SequenceContext(nn.Module):
    """The RNN states the combiner reads, from frame features ``e (batch, T, F)``: h^left_t of a forward RNN
    over e_{1:t} (``left``: st-l, st-lr, mf-lr) and h^right_t of a backward RNN over e_{t:T} (``right``:
    st-r, st-lr, mf-lr), each with a learned initial state. With ``lengths (batch,)`` the backward RNN
    starts at each sequence's own last frame, so padding is never read. Returns ``(batch, T, directions,
    rnn_dim)``, left first."""

    def __init__(self, feature_dim: int, config: DMMConfig, left: bool, right: bool):
        super().__init__()
        if not (left or right):
            raise ValueError("SequenceContext: expected left, right or both, got neither")

        def rnn() -> nn.RNN:
            return nn.RNN(feature_dim, config.rnn_dim, config.rnn_layers, nonlinearity=config.rnn_nonlinearity,
                          batch_first=True)

        self.left = rnn() if left else None
        self.right = rnn() if right else None
        shape = (int(left) + int(right), config.rnn_layers, 1, config.rnn_dim)
        self.h_0 = nn.Parameter(torch.zeros(shape))  # (directions, layers, 1, rnn_dim)

    @staticmethod
    def run(rnn: nn.RNN, e: torch.Tensor, h_0: torch.Tensor, lengths: Optional[torch.Tensor],
            active: Optional[List[int]], reverse: bool) -> torch.Tensor:
        """``rnn``'s outputs ``(batch, T, rnn_dim)`` over ``e`` from ``h_0 (layers, batch, rnn_dim)``, against
        time when ``reverse`` (from each sequence's own end): one layer through :func:`elman_rnn` (``active``:
        see there), more (or under ``torch.jit.trace``) through ``nn.RNN`` on each sequence reversed within
        its length."""
        if rnn.num_layers == 1 and not torch.jit.is_tracing():  # (a trace cannot record a Python autograd function)
            return elman_rnn(rnn, e, h_0[0], active, reverse)
        if not reverse:
            return rnn(e, h_0)[0]
        return reverse_padded(rnn(reverse_padded(e, lengths), h_0)[0], lengths)

    def forward(self, e: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        if lengths is None:
            return self.states(e, None, None)
        active = active_rows(lengths, e.shape[0], e.shape[1])
        order = longest_first(lengths)  # the sequences still running: a prefix of the rows
        if order is None:  # sorted already
            return self.states(e, lengths, active)
        states = self.states(e[order], lengths[order], active)
        return states[torch.argsort(order)]  # the batch's own order

    def states(self, e: torch.Tensor, lengths: Optional[torch.Tensor], active: Optional[List[int]]) -> torch.Tensor:
        """:meth:`forward` on a batch whose ``lengths`` (if any) decrease, ``active`` from :func:`active_rows`."""
        batch = e.shape[0]
        h_0 = self.h_0.expand(-1, -1, batch, -1).contiguous()  # (directions, layers, batch, rnn_dim)
        states = []
        if self.left is not None:
            states.append(self.run(self.left, e, h_0[0], lengths, active, reverse=False))  # (batch, T, rnn_dim)
        if self.right is not None:
            states.append(self.run(self.right, e, h_0[-1], lengths, active, reverse=True))  # over e_L, ..., e_t
        return torch.stack(states, dim=2)  # (batch, T, directions, rnn_dim)


class Combiner(nn.Module):
    """Factor q(z_t | z_{t-1}, x_{t:T}) (``"st-r"``), q(z_t | z_{t-1}, x_{1:t}) (``"st-l"``) or
    q(z_t | z_{t-1}, x_{1:T}) (``"st-lr"``), the combiner function (paper: "Combiner function")::

        h_comb = (tanh(W z_{t-1} + b) + sum of the RNN states at t) / (1 + number of states)
        q = N(W_mu h_comb + b_mu, diag(softplus(W_s h_comb + b_s) + min_scale)^2)

    i.e. 1/2 (tanh(.) + h^right_t) for st-r, 1/2 (tanh(.) + h^left_t) for st-l and 1/3 (tanh(.) +
    h^left_t + h^right_t) for st-lr."""

    def __init__(self, config: DMMConfig):
        super().__init__()
        self.z_to_hidden = nn.Linear(config.z_dim, config.rnn_dim)
        self.head = GaussianHead(config.rnn_dim, config.z_dim, config.min_scale)

    def hidden(self, z_prev: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """h_comb ``(..., batch, rnn_dim)`` for ``z_prev (..., batch, z_dim)``, ``context (batch, n, rnn_dim)``."""
        return (torch.tanh(self.z_to_hidden(z_prev)) + context.sum(-2)) / (context.shape[-2] + 1)


class MeanFieldCombiner(nn.Module):
    """Factor q(z_t | x_{1:T}) (``"mf-lr"``): h_comb = 1/2 (h^left_t + h^right_t), no z_{t-1};
    q = N(W_mu h_comb + b_mu, diag(softplus(W_s h_comb + b_s) + min_scale)^2)."""

    def __init__(self, config: DMMConfig):
        super().__init__()
        self.head = GaussianHead(config.rnn_dim, config.z_dim, config.min_scale)

    def hidden(self, z_prev: Optional[torch.Tensor], context: torch.Tensor) -> torch.Tensor:
        """h_comb ``(batch, rnn_dim)`` for ``context (batch, n, rnn_dim)``; ``z_prev`` is not read."""
        return context.mean(-2)
