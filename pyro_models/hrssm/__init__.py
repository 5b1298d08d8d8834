"""The HRSSM of Variational Temporal Abstraction (Kim, Ahn, Bengio 2019): the model (:mod:`.model`), its
guides (:mod:`.guides`), networks (:mod:`.networks`), boundary constraints (:mod:`.boundaries`) and
evaluation (:mod:`.evaluation`)."""
from __future__ import annotations

from typing import Sequence, Tuple

from ..checks import check_shape
from .boundaries import (SegmentCounter, Segmentation, apply_constraints, boundaries_from_trace, decode_boundaries,
                         sample_boundary, update_site)
from .config import GUIDES, IMAGE_DIMS, PEAK_THRESHOLD, BoundarySchedule, BoundaryTemperature, HRSSMConfig, check_input
from .evaluation import (SegmentationELBO, impute, impute_frames, jumpy_rollout, posterior_boundaries,
                         segmentation_elbo, start_probabilities)
from .guides import HRSSMGuide
from .model import HRSSM, HRSSMStates, generate


def build_hrssm(frame_shape: Sequence[int], config: HRSSMConfig) -> Tuple[HRSSM, HRSSMGuide]:
    """Model and guide for frames of ``frame_shape``: ``(C, H, W)`` images (H, W multiples of
    2^conv_layers) or ``(D,)`` vectors. They share one :class:`BoundaryTemperature` (``model.temperature``),
    starting at ``BoundarySchedule().temperature_max`` (the official 1.0); the training recipe anneals it with
    its :class:`BoundarySchedule`."""
    frame_shape = check_shape("frame_shape", frame_shape)
    if not config.observation_colour and (len(frame_shape) != IMAGE_DIMS or frame_shape[0] < 2):
        raise ValueError(f"observation_colour: False needs image frames with colour channels (C >= 2, H, W), "
                         f"got frame_shape {tuple(frame_shape)}")
    temperature = BoundaryTemperature(BoundarySchedule().temperature_max)
    return HRSSM(frame_shape, config, temperature), HRSSMGuide(frame_shape, config, temperature)


__all__ = [
    "GUIDES",
    "HRSSM",
    "HRSSMConfig",
    "HRSSMGuide",
    "HRSSMStates",
    "PEAK_THRESHOLD",
    "impute",
    "BoundaryTemperature",
    "Segmentation",
    "SegmentationELBO",
    "SegmentCounter",
    "BoundarySchedule",
    "apply_constraints",
    "boundaries_from_trace",
    "build_hrssm",
    "check_input",
    "decode_boundaries",
    "generate",
    "impute_frames",
    "jumpy_rollout",
    "posterior_boundaries",
    "sample_boundary",
    "segmentation_elbo",
    "start_probabilities",
    "update_site",
]
