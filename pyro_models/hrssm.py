"""The hierarchical recurrent state-space model (HRSSM) of Variational Temporal Abstraction (Kim, Ahn,
Bengio, NeurIPS 2019, arXiv 1910.00775), in Pyro, following the official code (taesupkim/vta) where the
paper leaves a detail open.

Equations are cited by the paper's headings (section 3): "Generative process", "Prior on temporal
structure", "Hierarchical transitions", "Observation transition" and, for inference, "Sequence
decomposition", "State inference", "Observation abstraction predictor".

Generative process (paper: "Generative process"), for frames t = 1..T::

    c_1 = 0,  z_1 ~ N(mu_z(c_1), sigma_z(c_1)),  h_1 = W_a [c_1, z_1]                          (INIT)
    for t > 1:
      m_{t-1} = 0 (COPY):    c_t = c_{t-1},  z_t = z_{t-1},  h_t = GRU_s([s_{t-1}, a_t], h_{t-1})
      m_{t-1} = 1 (UPDATE):  c_t = GRU_z(z_{t-1}, c_{t-1}),  z_t ~ N(mu_z(c_t), sigma_z(c_t)),
                             h_t = a_t                                                     (INIT)
      where a_t = W_a [c_t, z_t]                         (the abstract feature)
    s_t ~ N(mu_s(h_t), sigma_s(h_t)),  f_t = W_f [h_t, s_t]
    x_t ~ N(sigmoid(decoder(f_t)), obs_scale^2 I)        (Gaussian, fixed standard deviation)
    m_t ~ Bern(sigmoid(w_m . f_t + b_m)), t < T,  with the hard constraints below

``m_t = 1`` marks a boundary after frame t: frame t + 1 starts a new segment ("READ" in the official
code). Shapes: frames ``x (batch, T, *frame_shape)`` with ``frame_shape`` ``(C, H, W)`` (conv encoder and
decoder) or ``(D,)`` (MLPs); ``c_t (batch, abstract_belief_size)``, ``z_t (batch, abstract_state_size)``,
``h_t (batch, observation_belief_size)``, ``s_t (batch, observation_state_size)``.

Hard constraints (paper: "Prior on temporal structure", made always satisfiable, see
:class:`SegmentCounter`): with ``n`` segments so far and the current one ``l`` frames long, ``m_t = 1``
is forced once ``l >= max_length`` (l_max) and ``m_t = 0`` once ``n >= max_segments`` (N_max) or when a
boundary now would leave more frames than the remaining ``N_max - n`` segments can hold. They act on the
prior and on the guide, so every sample of either has at most N_max segments of at most l_max frames.
Forced steps are deterministic in both, so their boundary site is masked out (no KL).

Inference (paper: "Learning and inference"): q(M, Z, S | X) = q(M | X) q(Z | M, X) q(S | Z, M, X) with
per-frame CNN (or MLP) features e_t shared by the three factors:

* q(m_t | X): a non-causal Conv1d stack over (e_1..e_T) gives one logit per frame; the boundary is drawn
  from ``LogitRelaxedBernoulliStraightThrough(temperature, logits)`` (hard 0/1 forward, gradient of the relaxed
  sample backward; the two-class Gumbel-softmax of the official code). Constraints as above.
* q(z_t | M, X) = N(. | psi^fwd_{t-1}, psi^bwd_t): a forward GRU over e (never reset) and a backward GRU
  reset at segment starts (it sees the current segment only). Used at UPDATE steps only.
* q(s_t | z_t, M, X) = N(. | phi^fwd_t, z_t): a forward GRU over e reset at segment starts.

ELBO sites: ``m_t`` (t = 1..T-1), ``z_t``, ``s_t`` (t = 1..T) and the observed ``x`` (all frames, event
``(T, *frame_shape)``), inside one ``pyro.plate("sequences", batch)``, time under ``pyro.markov``. The
``z_t`` site is masked (``poutine.mask``) at COPY steps in model and guide, so COPY adds no KL; with
``TraceMeanField_ELBO`` the z and s KLs are analytic, the boundary KL is the one-sample estimate
``log q(y_t) - log p(y_t)`` of the relaxed sample's logit y_t (as the official code, which scores the
log-space sample; Pyro's ``RelaxedBernoulliStraightThrough`` would score the clamped sigmoid(y_t),
biased below temperature ~0.3). Model and guide share the
signature ``(x, mask=None)``. ``mask (batch, T)`` bool marks observed frames: a missing frame adds no
likelihood term (model) and is read as the feature e_t = 0 by every posterior factor (guide), so its
content is never seen; :func:`impute_frames` draws it from the posterior predictive.

``boundaries=False`` gives the plain RSSM baseline with the same networks: every step is an UPDATE (no
boundary sites, no boundary networks, no observation-level GRU).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import pyro
import pyro.distributions as dist
from pyro.distributions.util import scale_and_mask
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from torch import nn

from inference.trainer import Callback, Trainer

from .distributions import LogitRelaxedBernoulliStraightThrough
from .networks import GaussianHead, mlp, per_frame

# Convolutions of the frame encoder and decoder (official: 4x4, stride 2, padding 1, which halves or
# doubles an even size exactly).
CONV_KERNEL, CONV_STRIDE, CONV_PADDING = 4, 2, 1
IMAGE_DIMS, VECTOR_DIMS = 3, 1  # frame_shape (C, H, W) or (D,)
BINARY_THRESHOLD = 0.5  # hard 0/1 gates (floats carrying gradients) are read as booleans with "> 0.5"


# -------------------------------------------------------------------------------------------- config
@dataclass
class HRSSMConfig:
    """Sizes and constants of the HRSSM. Defaults are the official code's (taesupkim/vta, ``train.py``
    and ``hssm.py``) unless marked otherwise; see ``docs/hrssm.md`` for the sources."""

    abstract_belief_size: int = 128  # c_t (official belief_size)
    abstract_state_size: int = 8  # z_t (official state_size)
    observation_belief_size: int = 128  # h_t, and the abstract feature a_t = W_a [c_t, z_t]
    observation_state_size: int = 8  # s_t
    feature_size: int = 128  # frame features e_t and state features f_t (official: = belief_size)
    conv_channels: int = 128  # image frames: channels of every conv layer (official: = belief_size)
    conv_layers: int = 3  # image frames: stride-2 layers (32 -> 4), then a valid conv to 1x1
    mlp_hidden: Tuple[int, ...] = (128,)  # vector frames: encoder widths (decoder reversed); not official
    batch_norm: bool = True  # in the frame encoder/decoder and q(M|X) (official)
    boundary_layers: int = 3  # hidden Conv1d layers of q(M | X) (official num_layers)
    boundary_kernel: int = 3  # their kernel size over time (odd: centred, non-causal)
    boundaries: bool = True  # False: the RSSM baseline (every step UPDATE)
    max_segments: int = 5  # N_max (official seg_num)
    max_length: int = 8  # l_max (official seg_len)
    temperature_max: float = 1.0  # boundary temperature at step 0 (official max_beta)
    temperature_min: float = 0.1  # its floor (official min_beta)
    temperature_decay: float = 0.999  # multiplied in ...
    temperature_decay_steps: float = 100.0  # ... every this many steps (official beta_anneal), smoothly
    obs_scale: float = 0.5  # std of x_t on [0, 1] pixels = the official std 1 on pixels scaled to [-1, 1]
    kl_weight_abstract: float = 1.0  # weights of the z, s and m KL terms in training (official: all 1)
    kl_weight_observation: float = 1.0
    kl_weight_boundary: float = 1.0
    # Weight in [0, 1] of the straight-through gradient of an UPDATE step's z-KL: the KL is scaled by
    # w * gate + (1 - w) * detached gate (= 1 forward, so the ELBO's value is unchanged); backward,
    # q(M | X) sees w times what the UPDATE costs. 0: detached (official).
    update_kl_gradient: float = 0.0
    min_scale: float = 1e-4  # floor of every state standard deviation (not official: sigmoid alone)

    def __post_init__(self):
        positive_ints = ("abstract_belief_size", "abstract_state_size", "observation_belief_size",
                         "observation_state_size", "feature_size", "conv_channels", "conv_layers",
                         "boundary_kernel", "max_segments", "max_length")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.boundary_layers < 0:
            raise ValueError(f"boundary_layers: expected >= 0, got {self.boundary_layers}")
        if self.boundary_kernel % 2 == 0:
            raise ValueError(f"boundary_kernel: expected an odd size (centred over time), got {self.boundary_kernel}")
        if not self.mlp_hidden or min(self.mlp_hidden) < 1:
            raise ValueError(f"mlp_hidden: expected one or more widths >= 1, got {self.mlp_hidden}")
        if not 0 < self.temperature_min <= self.temperature_max:
            raise ValueError(
                f"temperature_min, temperature_max: expected 0 < min <= max, "
                f"got {self.temperature_min}, {self.temperature_max}"
            )
        if not 0 < self.temperature_decay <= 1 or not self.temperature_decay_steps > 0:
            raise ValueError(
                f"temperature_decay: expected in (0, 1] and temperature_decay_steps > 0, "
                f"got {self.temperature_decay}, {self.temperature_decay_steps}"
            )
        for name in ("obs_scale", "min_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")
        if not 0.0 <= self.update_kl_gradient <= 1.0:
            raise ValueError(f"update_kl_gradient: expected in [0, 1], got {self.update_kl_gradient}")
        for name in ("kl_weight_abstract", "kl_weight_observation", "kl_weight_boundary"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")

    @property
    def max_steps(self) -> Optional[int]:
        """The longest sequence the constraints can segment (N_max * l_max); None without boundaries."""
        return self.max_segments * self.max_length if self.boundaries else None


def annealed_temperature(step: int, config: HRSSMConfig) -> float:
    """The official schedule: ``(max - min) * decay^(step / decay_steps) + min``."""
    decay = config.temperature_decay ** (step / config.temperature_decay_steps)
    return (config.temperature_max - config.temperature_min) * decay + config.temperature_min


class BoundaryTemperature(nn.Module):
    """The temperature of the relaxed boundaries, shared by model and guide (q and p of a boundary are
    scored at the same temperature). ``value`` is a Python float, saved with the modules' state."""

    def __init__(self, value: float):
        super().__init__()
        self.value = float(value)

    def tensor(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.value, dtype=like.dtype, device=like.device)

    def get_extra_state(self) -> Any:
        return {"value": self.value}

    def set_extra_state(self, state: Any) -> None:
        self.value = float(state["value"])


class TemperatureAnnealing(Callback):
    """Sets the boundary temperature to :func:`annealed_temperature` before every training step (its
    own step count is saved in checkpoints) and reports it each epoch."""

    def __init__(self, temperature: BoundaryTemperature, config: HRSSMConfig):
        self.temperature, self.config, self.step = temperature, config, 0

    def before_step(self, trainer: Trainer, batch: torch.Tensor) -> None:
        self.temperature.value = annealed_temperature(self.step, self.config)
        self.step += 1

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> Dict[str, Any]:
        return {"temperature": self.temperature.value}

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step = state["step"]


# ----------------------------------------------------------------------------------- constraints
class SegmentCounter:
    """The segment count ``n`` and current segment length ``l`` of each sequence while its boundaries
    are drawn, and the boundaries the constraints force.

    Frame 1 opens segment 1 (n = l = 1). For the boundary after frame ``index + 1`` (0-based ``index``),
    with ``r = T - 1 - index`` frames left after it:

    * forced 1 (READ) when ``l >= max_length`` (paper, prior on temporal structure);
    * forced 0 (COPY) when ``n >= max_segments`` (same; the paper lets N_max win a tie), or when
      ``r > (max_segments - n) * max_length``: a boundary now would leave more frames than the remaining
      segments can hold (a look-ahead the paper does not have; without it, N_max and l_max can conflict
      later and one of them must give: the official code lets l_max win, the paper N_max).

    For ``T <= max_segments * max_length`` the two are never forced at once and every sequence ends with
    at most N_max segments of at most l_max frames (by induction on the invariant
    ``r <= (l_max - l) + (N_max - n) l_max``).
    Counts are integers and never carry gradients.
    """

    def __init__(self, batch_size: int, num_steps: int, config: HRSSMConfig, device=None):
        self.num_steps, self.max_segments, self.max_length = num_steps, config.max_segments, config.max_length
        self.count = torch.ones(batch_size, dtype=torch.long, device=device)
        self.length = torch.ones(batch_size, dtype=torch.long, device=device)

    def forced(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Boolean ``(force_copy, force_read)``, each ``(batch,)``, for the boundary after frame ``index``."""
        remaining = self.num_steps - 1 - index
        force_read = self.length >= self.max_length
        room = (self.max_segments - self.count) * self.max_length  # frames the segments still allowed can hold
        force_copy = (self.count >= self.max_segments) | (remaining > room)
        return force_copy & ~force_read, force_read

    def update(self, read: torch.Tensor) -> None:
        """Record the boundary ``read (batch,)`` (1: the next frame starts a segment)."""
        new = read.detach() > BINARY_THRESHOLD
        self.count = self.count + new.long()
        self.length = torch.where(new, torch.ones_like(self.length), self.length + 1)


def _resolve(value: torch.Tensor, force_copy: torch.Tensor, force_read: torch.Tensor) -> torch.Tensor:
    """``value`` where free, 1 where a READ is forced, 0 where a COPY is forced (a new tensor)."""
    return torch.where(force_read, torch.ones_like(value), torch.where(force_copy, torch.zeros_like(value), value))


def sample_boundary(name: str, logits: torch.Tensor, temperature: torch.Tensor, counter: SegmentCounter,
                    index: int) -> torch.Tensor:
    """The boundary site ``name`` after frame ``index`` (0-based) and the gate it implies, ``(batch,)``.

    The site is ``LogitRelaxedBernoulliStraightThrough(temperature, logits)``, masked where the constraints
    force the boundary (deterministic there in model and guide: no KL). The tensor ``rsample`` returns is
    passed to the site untouched: it carries its relaxed value in a private attribute that ``log_prob``
    reads, and any operation on it would drop it. The gate (forced values filled in) is derived apart.
    """
    force_copy, force_read = counter.forced(index)
    with poutine.mask(mask=~(force_copy | force_read)):
        m = pyro.sample(name, LogitRelaxedBernoulliStraightThrough(temperature, logits))
    read = _resolve(m, force_copy, force_read)
    counter.update(read)
    return read


def update_site(read: torch.Tensor, gradient_weight: float):
    """The context of a ``z_t`` site: masked to UPDATE steps (``read (batch,)`` > 0.5; a COPY adds no
    z-KL) and, for ``gradient_weight`` w > 0, scaled there by ``w * read + (1 - w) * read.detach()``:
    1 in the forward pass (``read`` is the hard gate), so the ELBO's value is unchanged, while w times
    the KL's gradient reaches the boundary logits through the straight-through sample, as the gated
    terms' gradients do. The official code multiplies this KL by the detached gate (w = 0), so q(M | X)
    never sees what an UPDATE costs in z. Only UPDATE steps get this gradient (a COPY step's
    counterfactual KL is not computed), so w > 0 biases q(M | X) towards fewer segments."""
    update = read.detach() > BINARY_THRESHOLD
    stack = contextlib.ExitStack()
    stack.enter_context(poutine.mask(mask=update))
    if gradient_weight > 0 and read.requires_grad:
        gate = gradient_weight * read + (1.0 - gradient_weight) * read.detach()
        stack.enter_context(poutine.scale(scale=torch.where(update, gate, torch.ones_like(read))))
    return stack


def apply_constraints(raw: torch.Tensor, config: HRSSMConfig) -> torch.Tensor:
    """Segment starts ``(batch, T)`` (1 where a frame starts a segment; frame 1 always does) from raw 0/1
    boundaries ``raw (batch, T - 1)`` (``raw[:, t]``: after frame t + 1), with the forced values of
    :class:`SegmentCounter` filled in, as the model and guide do."""
    batch, steps = raw.shape[0], raw.shape[1] + 1
    counter = SegmentCounter(batch, steps, config, raw.device)
    starts = [raw.new_ones(batch)]
    for index in range(steps - 1):
        force_copy, force_read = counter.forced(index)
        read = _resolve((raw[:, index].detach() > BINARY_THRESHOLD).to(raw.dtype), force_copy, force_read)
        counter.update(read)
        starts.append(read)
    return torch.stack(starts, dim=1)


class Segmentation(NamedTuple):
    """``starts (batch, T)`` float 0/1 (frame t starts a segment; ``starts[:, 0] = 1``) and
    ``num_segments (batch,)`` long."""

    starts: torch.Tensor
    num_segments: torch.Tensor


def _segmentation(starts: torch.Tensor) -> Segmentation:
    return Segmentation(starts, starts.detach().round().long().sum(-1))


def _num_steps(trace: Trace) -> int:
    steps = [int(name[2:]) for name in trace.nodes if name.startswith("z_") and name[2:].isdigit()]
    if not steps:
        raise ValueError("trace: no z_t sites found; expected a trace of an HRSSM model or guide")
    return max(steps)


def boundaries_from_trace(trace: Trace, config: HRSSMConfig) -> Segmentation:
    """The segmentation drawn in a trace of the guide (or of the model): the ``m_t`` site values with the
    constraints re-applied (at forced steps the site holds the unused raw draw)."""
    steps = _num_steps(trace)
    z_value = trace.nodes["z_1"]["value"]
    batch = z_value.shape[-2]
    if not config.boundaries or steps == 1:
        return _segmentation(z_value.new_ones(batch, steps))
    raw = torch.stack([trace.nodes[f"m_{t}"]["value"].detach() for t in range(1, steps)], dim=-1)
    return _segmentation(apply_constraints(raw, config))


# -------------------------------------------------------------------------------------- networks
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
    constraints): a
    non-causal stack of ``boundary_layers`` Conv1d over time (kernel ``boundary_kernel``, batch norm,
    ELU), then a Conv1d to one logit per frame (official PostBoundaryDetector, two-class logits there).
    ``forward(e (batch, T, F)) -> (batch, T)``: the logit that frame t starts a segment (that of
    ``m_{t-1}``; column 0 is unused)."""

    def __init__(self, config: HRSSMConfig):
        super().__init__()
        size, kernel, bn = config.feature_size, config.boundary_kernel, config.batch_norm
        layers: List[nn.Module] = []
        for _ in range(config.boundary_layers):
            layers += _block(nn.Conv1d(size, size, kernel, padding=kernel // 2, bias=not bn), size, bn, nn.BatchNorm1d)
        layers.append(nn.Conv1d(size, 1, kernel, padding=kernel // 2))
        self.net = nn.Sequential(*layers)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.net(e.transpose(1, 2)).squeeze(1)  # (batch, F, T) -> (batch, 1, T) -> (batch, T)


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

    def features(self, e: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """``[psi^fwd_{t-1}, psi^bwd_t]`` ``(batch, T, 2C)`` for ``e (batch, T, F)``, ``starts (batch, T)``."""
        fwd, _ = self.forward_rnn(e)  # (batch, T, C)
        fwd = torch.cat([torch.zeros_like(fwd[:, :1]), fwd[:, :-1]], dim=1)  # shifted: psi^fwd_{t-1}
        state, bwd = e.new_zeros(e.shape[0], fwd.shape[-1]), []
        for t in reversed(range(e.shape[1])):
            state = self.backward_cell(e[:, t], state)
            bwd.append(state)
            state = (1.0 - starts[:, t, None]) * state  # frame t opens its segment: t - 1 does not see it
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


# ---------------------------------------------------------------------------------- model, guide
def check_input(x: torch.Tensor, mask: Optional[torch.Tensor], frame_shape: Tuple[int, ...],
                config: HRSSMConfig) -> None:
    """Raise ``ValueError`` unless ``x`` is a float ``(batch, T, *frame_shape)`` with batch, T >= 1 and T
    within what the constraints can segment, and ``mask`` (if given) a bool ``(batch, T)``."""
    expected = f"(batch, T, {', '.join(map(str, frame_shape))})"
    if not torch.is_tensor(x):
        raise ValueError(f"x: expected a tensor of shape {expected}, got {type(x).__name__}")
    if x.dim() != len(frame_shape) + 2 or tuple(x.shape[2:]) != frame_shape or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x: expected shape {expected} with batch, T >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
    steps = x.shape[1]
    if config.boundaries and steps > config.max_steps:
        raise ValueError(
            f"x: T = {steps} frames cannot be split into at most max_segments = {config.max_segments} segments "
            f"of at most max_length = {config.max_length} frames (T <= {config.max_steps}); raise either"
        )
    if mask is not None:
        if not torch.is_tensor(mask) or tuple(mask.shape) != tuple(x.shape[:2]):
            shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
            raise ValueError(f"mask: expected shape {tuple(x.shape[:2])} (batch, T), got {shape}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask: expected a bool tensor (True: frame observed), got {mask.dtype}")


def _frame_network(kind: str, frame_shape: Tuple[int, ...], config: HRSSMConfig) -> nn.Module:
    image = len(frame_shape) == IMAGE_DIMS
    if kind == "encoder":
        return (ConvFrameEncoder if image else MLPFrameEncoder)(frame_shape, config)
    return (ConvFrameDecoder if image else MLPFrameDecoder)(frame_shape, config)


class HRSSMStates(NamedTuple):
    """The model's states along a sequence (values of one draw): ``starts (batch, T)`` (1: frame t starts
    a segment), ``c (batch, T, C)``, ``z (batch, T, Z)``, ``h (batch, T, H)``, ``s (batch, T, S)``, state
    features ``f (batch, T, F)``."""

    starts: torch.Tensor
    c: torch.Tensor
    z: torch.Tensor
    h: torch.Tensor
    s: torch.Tensor
    f: torch.Tensor


class _KLScaled:
    """Mixin: ``poutine.scale`` by a KL weight, in training mode only (evaluation scores the true ELBO);
    weight 0 masks the site's log densities out (``poutine.scale`` needs a positive scale)."""

    def _kl_scale(self, weight: float):
        if not self.training or weight == 1.0:
            return contextlib.nullcontext()
        return poutine.scale(scale=weight) if weight > 0 else poutine.mask(mask=False)


class HRSSM(_KLScaled, nn.Module):
    """The model p(X, Z, S, M) = prod_t p(x_t | s_t) p(m_t | s_t) p(s_t | s_{<t}, z_t, m_{<t})
    p(z_t | z_{<t}, m_{<t}) (paper: "Generative process"; see the module docstring).
    ``forward(x, mask=None)`` returns :class:`HRSSMStates`."""

    def __init__(self, frame_shape: Sequence[int], config: HRSSMConfig, temperature: BoundaryTemperature):
        super().__init__()
        self.frame_shape, self.config, self.temperature = tuple(frame_shape), config, temperature
        self.abstract = AbstractTransition(config)
        self.observation = ObservationTransition(config, recurrent=config.boundaries)
        self.state_feature = StateFeature(config)
        self.decoder = _frame_network("decoder", self.frame_shape, config)
        self.boundary_prior = BoundaryPrior(config) if config.boundaries else None

    def frame_mean(self, f: torch.Tensor) -> torch.Tensor:
        """E[x_t | s_t] ``(batch, T, *frame_shape)`` for state features ``f (batch, T, F)``."""
        return torch.sigmoid(per_frame(self.decoder, f, 1))

    def observation_dist(self, f: torch.Tensor, mask: Optional[torch.Tensor] = None) -> dist.Distribution:
        """p(x | S): batch ``(batch,)``, event ``(T, *frame_shape)``; frames where ``mask (batch, T)`` is
        False add nothing to the log density."""
        frames = dist.Normal(self.frame_mean(f), self.config.obs_scale).to_event(len(self.frame_shape))  # batch (batch, T)
        return (frames if mask is None else frames.mask(mask)).to_event(1)

    def latents(self, batch_size: int, num_steps: int, like: torch.Tensor) -> HRSSMStates:
        """The latent process: sites ``z_t``, ``s_t`` (t = 1..T) and ``m_t`` (t < T) in time order, under
        ``pyro.markov``; must run inside the ``sequences`` plate. ``like``: dtype and device."""
        cfg = self.config
        c = like.new_zeros(batch_size, cfg.abstract_belief_size)
        read = like.new_ones(batch_size)  # frame 1 starts a segment
        counter = SegmentCounter(batch_size, num_steps, cfg, like.device) if cfg.boundaries else None
        temperature = self.temperature.tensor(like)
        z = h = s = None
        trajectory: List[Tuple[torch.Tensor, ...]] = []
        for t in pyro.markov(range(num_steps)):
            gate = read.unsqueeze(-1)  # hard 0/1 forward, straight-through gradient backward
            if t > 0:  # UPDATE: new belief; COPY: keep it
                c = gate * self.abstract.belief(z, c) + (1.0 - gate) * c
            loc, scale = self.abstract(c)
            with self._kl_scale(cfg.kl_weight_abstract), update_site(read, cfg.update_kl_gradient):
                z_new = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))
            z = z_new if t == 0 else gate * z_new + (1.0 - gate) * z  # COPY: exactly z_{t-1}
            a = self.observation.init(c, z)
            if t == 0 or self.observation.cell is None:  # INIT (the RSSM baseline always is)
                h = a
            else:  # INIT at a segment's start, else the observation-level GRU
                h = gate * a + (1.0 - gate) * self.observation.update(s, a, h)
            loc, scale = self.observation(h)
            with self._kl_scale(cfg.kl_weight_observation):
                s = pyro.sample(f"s_{t + 1}", dist.Normal(loc, scale).to_event(1))
            f = self.state_feature(h, s)
            trajectory.append((read, c, z, h, s, f))
            if counter is not None and t + 1 < num_steps:
                with self._kl_scale(cfg.kl_weight_boundary):
                    read = sample_boundary(f"m_{t + 1}", self.boundary_prior(f), temperature, counter, t)
        return HRSSMStates(*(torch.stack(values, dim=1) for values in zip(*trajectory)))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> HRSSMStates:
        check_input(x, mask, self.frame_shape, self.config)
        pyro.module("hrssm", self)
        batch, steps = x.shape[:2]
        with pyro.plate("sequences", batch):
            states = self.latents(batch, steps, x)
            pyro.sample("x", self.observation_dist(states.f, mask), obs=x)
        return states


class HRSSMGuide(_KLScaled, nn.Module):
    """The guide q(M, Z, S | X) = q(M | X) q(Z | M, X) q(S | Z, M, X) (paper: "Learning and inference";
    see the module docstring). ``forward(x, mask=None)`` returns the segment starts ``(batch, T)`` it drew."""

    def __init__(self, frame_shape: Sequence[int], config: HRSSMConfig, temperature: BoundaryTemperature):
        super().__init__()
        self.frame_shape, self.config, self.temperature = tuple(frame_shape), config, temperature
        self.encoder = _frame_network("encoder", self.frame_shape, config)
        self.boundary_posterior = BoundaryPosterior(config) if config.boundaries else None
        self.abstract_posterior = AbstractPosterior(config)
        self.observation_posterior = ObservationPosterior(config)

    def features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Frame features e ``(batch, T, feature_size)`` of ``x (batch, T, *frame_shape)``; 0 at frames where
        ``mask (batch, T)`` is False (missing)."""
        e = per_frame(self.encoder, x, len(self.frame_shape))
        return e if mask is None else e * mask.unsqueeze(-1).to(e.dtype)

    def boundary_logits(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``(batch, T)`` of q(frame t starts a segment | X) before the constraints (column 0 unused)."""
        if self.boundary_posterior is None:
            raise ValueError("boundary_logits: this guide was built with boundaries=False")
        return self.boundary_posterior(self.features(x, mask))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_input(x, mask, self.frame_shape, self.config)
        pyro.module("hrssm_guide", self)
        cfg = self.config
        batch, steps = x.shape[:2]
        e = self.features(x, mask)
        with pyro.plate("sequences", batch):
            starts = [x.new_ones(batch)]
            if self.boundary_posterior is not None and steps > 1:
                logits = self.boundary_posterior(e)
                counter, temperature = SegmentCounter(batch, steps, cfg, x.device), self.temperature.tensor(x)
                for t in pyro.markov(range(steps - 1)):
                    with self._kl_scale(cfg.kl_weight_boundary):
                        starts.append(sample_boundary(f"m_{t + 1}", logits[:, t + 1], temperature, counter, t))
            else:
                starts = starts * steps
            starts = torch.stack(starts, dim=1)  # (batch, T), the gates, not the site values
            psi = self.abstract_posterior.features(e, starts)
            phi = self.observation_posterior.features(e, starts)
            z = None
            for t in pyro.markov(range(steps)):
                read = starts[:, t]
                gate = read.unsqueeze(-1)
                loc, scale = self.abstract_posterior(psi[:, t])
                with self._kl_scale(cfg.kl_weight_abstract), update_site(read, cfg.update_kl_gradient):
                    z_new = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))
                z = z_new if t == 0 else gate * z_new + (1.0 - gate) * z
                loc, scale = self.observation_posterior(phi[:, t], z)
                with self._kl_scale(cfg.kl_weight_observation):
                    pyro.sample(f"s_{t + 1}", dist.Normal(loc, scale).to_event(1))
        return starts


def build_hrssm(frame_shape: Sequence[int], config: HRSSMConfig) -> Tuple[HRSSM, HRSSMGuide]:
    """Model and guide for frames of ``frame_shape``: ``(C, H, W)`` images (H, W multiples of
    2^conv_layers) or ``(D,)`` vectors. They share one :class:`BoundaryTemperature` (``model.temperature``),
    starting at ``config.temperature_max``; :class:`TemperatureAnnealing` anneals it."""
    frame_shape = tuple(int(n) for n in frame_shape)
    if len(frame_shape) not in (IMAGE_DIMS, VECTOR_DIMS) or min(frame_shape) < 1:
        raise ValueError(f"frame_shape: expected (C, H, W) or (D,) with positive sizes, got {frame_shape}")
    temperature = BoundaryTemperature(config.temperature_max)
    return HRSSM(frame_shape, config, temperature), HRSSMGuide(frame_shape, config, temperature)


# ------------------------------------------------------------------------------- using the model
def posterior_boundaries(guide: HRSSMGuide, x: torch.Tensor, sample: bool = False) -> Segmentation:
    """The segmentation of ``x (batch, T, *frame_shape)`` under the guide: ``sample=True`` draws it (one
    trace of the guide); ``sample=False`` takes the most probable boundary at every free step
    (logit > 0, the official evaluation's noise-free argmax), the constraints applied as in sampling.
    Runs in eval mode (batch norm on running statistics; the mode is restored after)."""
    check_input(x, None, guide.frame_shape, guide.config)
    with torch.no_grad(), _eval_mode(guide):
        if sample:
            return boundaries_from_trace(poutine.trace(guide).get_trace(x), guide.config)
        if guide.boundary_posterior is None or x.shape[1] == 1:
            return _segmentation(x.new_ones(x.shape[:2]))
        logits = guide.boundary_logits(x)
        return _segmentation(apply_constraints((logits[:, 1:] > 0).to(x.dtype), guide.config))


def start_probabilities(guide: HRSSMGuide, x: torch.Tensor) -> torch.Tensor:
    """q(frame t starts a segment | X) of ``x (batch, T, *frame_shape)`` for t = 2..T, as
    ``(batch, T - 1)``: the guide's boundary probabilities before the hard constraints. Eval mode."""
    check_input(x, None, guide.frame_shape, guide.config)
    if guide.boundary_posterior is None or x.shape[1] == 1:
        raise ValueError("start_probabilities: needs a guide with boundaries and T >= 2")
    with torch.no_grad(), _eval_mode(guide):
        return torch.sigmoid(guide.boundary_logits(x)[:, 1:])


def generate(model: HRSSM, batch_size: int, num_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A Pyro program sampling from the prior (sites ``z_t``, ``s_t``, ``m_t``, ``x``). Returns the frame
    means ``(batch, T, *frame_shape)`` and the segment starts ``(batch, T)``."""
    like = next(model.parameters())
    if batch_size < 1 or num_steps < 1 or (model.config.boundaries and num_steps > model.config.max_steps):
        raise ValueError(
            f"generate: expected batch_size >= 1 and 1 <= num_steps <= {model.config.max_steps or 'any'}, "
            f"got {batch_size}, {num_steps}"
        )
    with pyro.plate("sequences", batch_size):
        states = model.latents(batch_size, num_steps, like)
        pyro.sample("x", model.observation_dist(states.f))
    return model.frame_mean(states.f), states.starts


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module):
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


@torch.no_grad()
def jumpy_rollout(model: HRSSM, guide: HRSSMGuide, prefix: torch.Tensor, num_segments: int,
                  sample: bool = True) -> torch.Tensor:
    """Jumpy imagination (paper: jumpy imagination; official ``jumpy_generation``): infer the states of
    ``prefix (batch, T0, *frame_shape)`` with the guide, then roll the abstract level forward from its
    last (c, z), one UPDATE per future segment (``c = GRU_z(z, c)``, ``z ~ p(z | c)``), and decode each
    segment's first frame (``h = W_a [c, z]``, ``s ~ p(s | h)``). Draws (``sample=True``) or prior means.
    Returns frame means ``(batch, num_segments, *frame_shape)``; the prefix is taken to end a segment.
    Runs in eval mode (restored after)."""
    if num_segments < 1:
        raise ValueError(f"num_segments: expected >= 1, got {num_segments}")
    with _eval_mode(model, guide):
        guide_trace = poutine.trace(guide).get_trace(prefix)
        states = poutine.replay(model, trace=guide_trace)(prefix)
        c, z = states.c[:, -1], states.z[:, -1]
        features = []
        for _ in range(num_segments):
            c = model.abstract.belief(z, c)
            loc, scale = model.abstract(c)
            z = dist.Normal(loc, scale).sample() if sample else loc
            h = model.observation.init(c, z)
            loc, scale = model.observation(h)
            s = dist.Normal(loc, scale).sample() if sample else loc
            features.append(model.state_feature(h, s))
        return model.frame_mean(torch.stack(features, dim=1))


class SegmentationELBO(NamedTuple):
    """Terms of :func:`segmentation_elbo`, each ``(batch,)`` in nats per sequence:
    ``elbo = log_likelihood + log_prior_boundaries - kl_abstract - kl_observation``."""

    elbo: torch.Tensor
    log_likelihood: torch.Tensor
    log_prior_boundaries: torch.Tensor
    kl_abstract: torch.Tensor
    kl_observation: torch.Tensor


@torch.no_grad()
def segmentation_elbo(model: HRSSM, guide: HRSSMGuide, x: torch.Tensor, starts: torch.Tensor,
                      num_samples: int = 4) -> SegmentationELBO:
    """The ELBO of ``x (batch, T, *frame_shape)`` when q(M | X) is a point mass on the segmentation
    ``starts (batch, T)`` (0/1, 1 where a frame starts a segment; column 0 is ignored, forced values are
    re-applied): ``E_q(Z,S|M,X)[log p(X | S) + log p(M | S)] - KL_z - KL_s``, where log p(M | S) scores the
    hard boundaries under the prior's Bernoulli at free steps and the KLs are analytic given each draw
    (as ``TraceMeanField_ELBO``), averaged over ``num_samples`` draws of (Z, S). It compares
    segmentations under one trained model: the guide's own, the true events, none. Eval mode."""
    check_input(x, None, model.frame_shape, model.config)
    if tuple(starts.shape) != tuple(x.shape[:2]):
        raise ValueError(f"starts: expected shape {tuple(x.shape[:2])} (batch, T), got {tuple(starts.shape)}")
    if num_samples < 1:
        raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
    steps = x.shape[1]
    fixed = {f"m_{t}": (starts[:, t] > BINARY_THRESHOLD).to(x.dtype) for t in range(1, steps)}
    totals = torch.zeros(4, x.shape[0], dtype=x.dtype, device=x.device)  # loglik, log p(M), KL_z, KL_s
    with _eval_mode(model, guide):
        for _ in range(num_samples):
            guide_trace = poutine.trace(poutine.condition(guide, data=fixed)).get_trace(x)
            model_trace = poutine.trace(poutine.replay(poutine.condition(model, data=fixed), trace=guide_trace)).get_trace(x)
            totals[0] += model_trace.nodes["x"]["fn"].log_prob(x)
            for t in range(1, steps + 1):
                if t < steps:
                    site = model_trace.nodes[f"m_{t}"]
                    log_p = dist.Bernoulli(logits=site["fn"].logits).log_prob(site["value"])
                    totals[1] += scale_and_mask(log_p, site["scale"], site["mask"])
                for row, name in ((2, f"z_{t}"), (3, f"s_{t}")):
                    q_site, p_site = guide_trace.nodes[name], model_trace.nodes[name]
                    kl = torch.distributions.kl_divergence(q_site["fn"], p_site["fn"])
                    totals[row] += scale_and_mask(kl, q_site["scale"], q_site["mask"])  # as TraceMeanField_ELBO
    loglik, log_prior, kl_z, kl_s = totals / num_samples
    return SegmentationELBO(loglik + log_prior - kl_z - kl_s, loglik, log_prior, kl_z, kl_s)


class FrameImputation(NamedTuple):
    """Posterior-predictive imputation of missing frames: ``imputed (batch, T, *frame_shape)`` (observed
    frames kept, missing ones the mean of the draws), ``samples (num_samples, batch, T, *frame_shape)``
    (frame means E[x_t | s_t] of each posterior draw, observed frames kept) and ``error``, the mean
    squared error of ``imputed`` on the missing frames (0.0 when none is missing)."""

    imputed: torch.Tensor
    samples: torch.Tensor
    error: float


@torch.no_grad()
def impute_frames(model: HRSSM, guide: HRSSMGuide, x: torch.Tensor, mask: torch.Tensor,
                  num_samples: int = 16) -> FrameImputation:
    """Fill the frames of ``x (batch, T, *frame_shape)`` where ``mask (batch, T)`` (bool) is False: draw
    (M, Z, S) from the guide given the observed frames only, run the model on that draw and decode
    E[x_t | s_t], ``num_samples`` times. The content of missing frames is never read. Eval mode."""
    check_input(x, mask, model.frame_shape, model.config)
    if num_samples < 1:
        raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
    keep = mask.reshape(mask.shape + (1,) * len(model.frame_shape))  # (batch, T, 1, ...)
    draws = []
    with _eval_mode(model, guide):
        for _ in range(num_samples):
            guide_trace = poutine.trace(guide).get_trace(x, mask)
            states = poutine.replay(model, trace=guide_trace)(x, mask)
            draws.append(torch.where(keep, x, model.frame_mean(states.f)))
    samples = torch.stack(draws)
    imputed = samples.mean(0)
    missing = ~keep.expand_as(x)
    error = float(((imputed - x)[missing] ** 2).mean()) if missing.any() else 0.0
    return FrameImputation(imputed, samples, error)


__all__ = [
    "HRSSM",
    "HRSSMConfig",
    "HRSSMGuide",
    "HRSSMStates",
    "FrameImputation",
    "BoundaryTemperature",
    "Segmentation",
    "SegmentationELBO",
    "SegmentCounter",
    "TemperatureAnnealing",
    "annealed_temperature",
    "apply_constraints",
    "boundaries_from_trace",
    "build_hrssm",
    "check_input",
    "generate",
    "impute_frames",
    "jumpy_rollout",
    "posterior_boundaries",
    "sample_boundary",
    "segmentation_elbo",
    "update_site",
]
