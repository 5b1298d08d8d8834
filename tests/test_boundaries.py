"""Boundary scoring against true events, with hand-computed cases."""
import pytest
import torch

from inference.boundaries import boundary_scores
from pyro_models.datasets import color_balls


def row(*frames, steps=10):
    x = torch.zeros(steps)
    x[list(frames)] = 1
    return x


@pytest.mark.parametrize("tolerance, expected_matched", [(0, 1), (1, 2), (2, 3)])
def test_tolerance(tolerance, expected_matched):
    starts = torch.stack([row(0, 3, 6, 9)])
    events = torch.stack([row(3, 5, 7)])  # 3 exact, 6 off by one from 5 and 7, 9 off by two from 7
    scores = boundary_scores(starts, events, tolerance)
    assert scores.num_matched == expected_matched
    assert scores.precision == pytest.approx(expected_matched / 3) and scores.recall == pytest.approx(expected_matched / 3)


def test_one_to_one_matching_penalises_over_segmentation():
    starts = torch.stack([row(0, 4, 5, 6)])
    events = torch.stack([row(5)])
    scores = boundary_scores(starts, events, tolerance=1)
    assert (scores.num_matched, scores.precision, scores.recall) == (1, pytest.approx(1 / 3), 1.0)
    assert scores.f1 == pytest.approx(0.5)
    assert scores.mean_segments == 4.0


def test_frame_zero_is_not_scored_and_empty_cases():
    scores = boundary_scores(torch.stack([row(0)]), torch.stack([row(0)]))
    assert scores.num_predicted == 0 and scores.num_events == 0 and scores.f1 == 0.0
    with pytest.raises(ValueError, match="equal shapes"):
        boundary_scores(torch.zeros(2, 5), torch.zeros(2, 6))


def test_true_events_score_one_and_random_boundaries_score_low():
    _, events = color_balls(200, seed=3)
    events = torch.as_tensor(events)
    perfect = events.clone()
    perfect[:, 0] = 1
    assert boundary_scores(perfect, events).f1 == 1.0
    rate = events[:, 1:].float().mean()
    random = (torch.rand(events.shape, generator=torch.Generator().manual_seed(0)) < rate).long()
    # The task's scale: boundaries at random with the true rate score about 0.37 at +-1 frame.
    assert 0.2 < boundary_scores(random, events).f1 < 0.5
