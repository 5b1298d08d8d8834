"""Configuration of the HRSSM, the boundary temperature and its schedule, and input validation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

import torch
from torch import nn

from ..imputation import check_lengths

# Convolutions of the frame encoder and decoder (official: 4x4, stride 2, padding 1, which halves or
# doubles an even size exactly).
CONV_KERNEL, CONV_STRIDE, CONV_PADDING = 4, 2, 1
IMAGE_DIMS, VECTOR_DIMS = 3, 1  # frame_shape (C, H, W) or (D,)
# Both guides draw relaxed straight-through boundaries, then q(Z | M, X) q(S | Z, M, X): "relaxed", the
# paper's q(M | X) from a centred (non-causal) Conv1d stack; "causal", an online segmenter whose q(m | X)
# for frame t reads frames 1..t only (left-padded convolutions).
GUIDES = ("relaxed", "causal")
LIKELIHOODS = ("gaussian", "bernoulli")
BINARY_THRESHOLD = 0.5  # hard 0/1 gates (floats carrying gradients) are read as booleans with "> 0.5"
# Reading a segmentation from q(m_t = 1 | X) without noise (``posterior_boundaries``): a frame starts a
# segment where its probability is a local peak over time above PEAK_THRESHOLD. One event's probability
# is often split over two neighbouring frames, so the per-frame argmax (> 0.5, the official evaluation)
# misses it when both are below 0.5 and marks it twice when both are above. 0.4 was chosen on six
# trained runs, where F1 is flat from 0.35 to 0.45; two further seeds were scored after it was fixed
# (docs/benchmarks.md, "Reading the boundaries: peaks").
PEAK_THRESHOLD = 0.4
BOUNDARY_WARMUP_STEPS = 1250  # the default boundary warm-up with boundaries (BoundarySchedule.boundary_warmup_steps=None)
# The default copy-step period with boundaries (BoundarySchedule.copy_step_every=None): every 8th step after the
# warm-up draws no free boundary. 8 was measured against 4 and off (docs/benchmarks.md, "Copy steps").
COPY_STEP_EVERY = 8


@dataclass
class HRSSMConfig:
    """Sizes and constants of the HRSSM. Defaults are the official code's (taesupkim/vta, ``train.py``
    and ``hssm.py``) unless marked otherwise; see ``docs/hrssm.md`` for the sources."""

    abstract_belief_size: int = 128  # size of the abstract belief c_t (official belief_size)
    abstract_state_size: int = 8  # size of the abstract state z_t (official state_size)
    observation_belief_size: int = 128  # size of the observation belief h_t and of the abstract feature a_t = W_a [c_t, z_t]
    observation_state_size: int = 8  # size of the observation state s_t
    feature_size: int = 128  # frame features e_t and state features f_t (official: = belief_size)
    conv_channels: int = 128  # image frames: channels of every conv layer (official: = belief_size)
    conv_layers: int = 3  # image frames: stride-2 layers (32 -> 4), then a valid conv to 1x1
    mlp_hidden: Tuple[int, ...] = (128,)  # vector frames: encoder widths (decoder reversed); not official
    batch_norm: bool = True  # in the frame encoder/decoder and q(M|X) (official)
    boundary_layers: int = 3  # hidden Conv1d layers of q(M | X) (official num_layers)
    boundary_kernel: int = 3  # their kernel size over time (odd: centred, non-causal)
    boundaries: bool = True  # False: the RSSM baseline (every step UPDATE)
    observation_reset: bool = True  # True: a segment's start re-initialises h_t = a_t and the guide's phi (the paper); False: the observation level carries h_t and phi across boundaries (not the paper; docs/hrssm.md)
    max_segments: int = 5  # N_max (official seg_num)
    max_length: int = 8  # l_max (official seg_len)
    likelihood: str = field(default="gaussian", metadata={"choices": LIKELIHOODS})  # p(x_t | s_t): gaussian (the paper's, fixed std obs_scale) or bernoulli (binary frames, e.g. piano rolls)
    obs_scale: float = 0.5  # std of x_t on [0, 1] pixels = the official std 1 on pixels scaled to [-1, 1] (likelihood gaussian)
    # Training weight of the z-KL terms: 0.5 makes a new abstract state (an UPDATE) cheaper than the ELBO
    # prices it (not official: all three KL weights 1; evaluation always scores the true ELBO).
    kl_weight_abstract: float = 0.5
    kl_weight_observation: float = 1.0  # training weight of the s-KL terms
    kl_weight_boundary: float = 1.0  # training weight of the boundary (m) KL terms
    # Weight in [0, 1] of the straight-through gradient of an UPDATE step's z-KL: the KL is scaled by
    # w * gate + (1 - w) * detached gate (= 1 forward, so the ELBO's value is unchanged); backward,
    # q(M | X) sees w times what the UPDATE costs. 0: detached (official, and the default: w > 0 pushes
    # q towards fewer segments, and on this library's defaults 0.25 left three seeds of five with too
    # few, docs/benchmarks.md "w = 0 on seven seeds").
    update_kl_gradient: float = 0.0
    min_scale: float = 1e-4  # floor of every state standard deviation (not official: sigmoid alone)
    # False: q(S | Z, M, X) reads each image frame's channel maximum (its shapes without their colours,
    # through an encoder of its own), so a change of colour can reach the frames only through a new
    # abstract state, i.e. a boundary (not the paper; docs/hrssm.md "What trains the boundaries")
    observation_colour: bool = True
    guide: str = field(default="relaxed", metadata={"choices": GUIDES})  # relaxed: the paper's q(M | X) over the whole sequence; causal: q(M | X) reads past frames only

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
        for name in ("obs_scale", "min_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")
        if not 0.0 <= self.update_kl_gradient <= 1.0:
            raise ValueError(f"update_kl_gradient: expected in [0, 1], got {self.update_kl_gradient}")
        if not self.observation_reset and not self.boundaries:
            raise ValueError("observation_reset: False applies to boundaries only; the RSSM baseline (boundaries=False) "
                             "re-initialises h_t at every step")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood: expected one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.guide not in GUIDES:
            raise ValueError(f"guide: expected one of {GUIDES}, got {self.guide!r}")
        for name in ("kl_weight_abstract", "kl_weight_observation", "kl_weight_boundary"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")

    @property
    def max_steps(self) -> Optional[int]:
        """The longest sequence the constraints can segment (N_max * l_max); None without boundaries."""
        return self.max_segments * self.max_length if self.boundaries else None


@dataclass
class BoundarySchedule:
    """The HRSSM's training schedule of its boundaries (the recipe's options, as the other models' KL
    schedules are): the temperature of the relaxed boundaries, annealed step by step as the official code
    does, the warm-up without free boundaries and the copy steps after it. ``boundaries``, the model's
    switch, resolves the defaults of the last two (None: on with boundaries, 0 for the RSSM baseline)."""

    temperature_max: float = 1.0  # boundary temperature at step 0 (official max_beta)
    temperature_min: float = 0.1  # its floor (official min_beta)
    temperature_decay: float = 0.999  # the boundary temperature is multiplied by this ...
    temperature_decay_steps: float = 100.0  # ... every this many steps (official beta_anneal), smoothly
    # Training steps at the start with no free boundary: every m_t is a COPY unless l_max forces a READ,
    # so the observation level learns the dynamics before any boundary is drawn (not official, which is
    # 0: off). None (the default) resolves to 1,250 steps (10 epochs of 2,000 sequences in batches of
    # 16, docs/benchmarks.md) with boundaries and to 0 for the RSSM baseline (boundaries=False).
    boundary_warmup_steps: Optional[int] = None
    # After the warm-up, every k-th training step is drawn as a warm-up step (no free boundary), so the
    # observation level keeps learning the dynamics across the whole sequence instead of only within the
    # segments the boundaries cut (not official; 0: off, every step after the warm-up has free boundaries).
    # None (the default) resolves to 8 (COPY_STEP_EVERY) with boundaries and to 0 for the RSSM baseline.
    copy_step_every: Optional[int] = None

    def __post_init__(self):
        if not 0 < self.temperature_min <= self.temperature_max:
            raise ValueError(f"temperature_min, temperature_max: expected 0 < min <= max, "
                             f"got {self.temperature_min}, {self.temperature_max}")
        if not 0 < self.temperature_decay <= 1 or not self.temperature_decay_steps > 0:
            raise ValueError(f"temperature_decay: expected in (0, 1] and temperature_decay_steps > 0, "
                             f"got {self.temperature_decay}, {self.temperature_decay_steps}")
        # None stays None (not resolved in place): ``warmup_steps`` and ``copy_period`` resolve it
        if self.boundary_warmup_steps is not None and self.boundary_warmup_steps < 0:
            raise ValueError(f"boundary_warmup_steps: expected >= 0, got {self.boundary_warmup_steps}")
        if self.copy_step_every is not None and (self.copy_step_every < 0 or self.copy_step_every == 1):
            raise ValueError(f"copy_step_every: expected 0 (off) or >= 2 (1 would never draw a free boundary), "
                             f"got {self.copy_step_every}")

    def check(self, config: "HRSSMConfig") -> None:
        """Raise ``ValueError`` when a boundary schedule is set for a model without boundaries."""
        for name in ("boundary_warmup_steps", "copy_step_every"):  # None (the default) and 0 are falsy
            if getattr(self, name) and not config.boundaries:
                raise ValueError(f"{name}: applies to boundaries only; expected 0 with boundaries=False, "
                                 f"got {getattr(self, name)}")

    def warmup_steps(self, boundaries: bool = True) -> int:
        """The boundary warm-up in steps: ``boundary_warmup_steps``, or where that is None (the default)
        ``BOUNDARY_WARMUP_STEPS`` with ``boundaries`` and 0 for the RSSM baseline, which has none to hold back."""
        return _resolved(self.boundary_warmup_steps, BOUNDARY_WARMUP_STEPS, boundaries)

    def copy_period(self, boundaries: bool = True) -> int:
        """The copy-step period k (0: off): ``copy_step_every``, or where that is None (the default)
        ``COPY_STEP_EVERY`` with ``boundaries`` and 0 for the RSSM baseline."""
        return _resolved(self.copy_step_every, COPY_STEP_EVERY, boundaries)

    def free_boundaries_at(self, step: int, boundaries: bool = True) -> bool:
        """Whether training step ``step`` (0-based) draws free boundaries: not during the warm-up, nor on
        every ``copy_period``-th step after it (its last step of each period)."""
        after, period = step - self.warmup_steps(boundaries), self.copy_period(boundaries)
        if after < 0:
            return False
        return not (period and after % period == period - 1)

    def temperature_at(self, step: int) -> float:
        """The official schedule: ``(max - min) * decay^(step / decay_steps) + min``."""
        decay = self.temperature_decay ** (step / self.temperature_decay_steps)
        return (self.temperature_max - self.temperature_min) * decay + self.temperature_min


def _resolved(value: Optional[int], default: int, boundaries: bool) -> int:
    """A boundary schedule's value: ``value`` where set, else ``default`` with boundaries and 0 without."""
    if value is not None:
        return value
    return default if boundaries else 0


class BoundaryTemperature(nn.Module):
    """The boundary schedule's state, shared by model and guide: the temperature of the relaxed
    boundaries (q and p of a boundary are scored at the same temperature) and whether free boundaries
    may be drawn (``free_boundaries``; False during ``BoundarySchedule.boundary_warmup_steps``, when every boundary the
    constraints do not force is a COPY). ``value`` and ``free_boundaries`` read and set them as Python
    values; both are held in 0-d buffers (not persistent: the state dict keeps the Python values, as
    before), which the model and guide read, so a compiled loss (``TrainConfig.jit``) takes their
    current values as inputs instead of freezing the ones it had when traced."""

    def __init__(self, value: float, free_boundaries: bool = True):
        super().__init__()
        self.register_buffer("current", torch.tensor(float(value)), persistent=False)
        self.register_buffer("free", torch.tensor(float(free_boundaries)), persistent=False)

    @property
    def value(self) -> float:
        return float(self.current)

    @value.setter
    def value(self, value: float) -> None:
        self.current.fill_(float(value))

    @property
    def free_boundaries(self) -> bool:
        return bool(self.free > BINARY_THRESHOLD)

    @free_boundaries.setter
    def free_boundaries(self, free: bool) -> None:
        self.free.fill_(float(free))

    def tensor(self, like: torch.Tensor) -> torch.Tensor:
        """The temperature as a 0-d tensor of ``like``'s dtype and device."""
        return self.current.to(dtype=like.dtype, device=like.device)

    def free_tensor(self, like: torch.Tensor) -> torch.Tensor:
        """Whether free boundaries may be drawn, a 0-d bool tensor on ``like``'s device."""
        return self.free.to(device=like.device) > BINARY_THRESHOLD

    def get_extra_state(self) -> Any:
        return {"value": self.value, "free_boundaries": self.free_boundaries}

    def set_extra_state(self, state: Any) -> None:
        self.value = float(state["value"])
        self.free_boundaries = bool(state.get("free_boundaries", True))  # checkpoints from before the warm-up


def check_input(x: torch.Tensor, mask: Optional[torch.Tensor], frame_shape: Tuple[int, ...],
                config: HRSSMConfig, lengths: Optional[torch.Tensor] = None) -> None:
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
    if lengths is not None:
        check_lengths(lengths, x.shape[0], steps)
