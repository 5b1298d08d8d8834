"""Boundary scoring against true events, with hand-computed cases."""
import pytest
import torch

from inference.recipes.hrssm.boundaries import boundary_scores
from pyro_models.hrssm import decode_boundaries
from pyro_models.datasets import color_balls


def row(*frames, steps=10):
    x = torch.zeros(steps)
    x[list(frames)] = 1
    return x


@pytest.mark.parametrize("one_to_one", [False, True])
@pytest.mark.parametrize("tolerance, expected_matched", [(0, 1), (1, 2), (2, 3)])
def test_tolerance(tolerance, expected_matched, one_to_one):
    starts = torch.stack([row(0, 3, 6, 9)])
    events = torch.stack([row(3, 5, 7)])  # 3 exact, 6 off by one from 5 and 7, 9 off by two from 7
    scores = boundary_scores(starts, events, tolerance, one_to_one)
    if one_to_one or tolerance == 0:  # every boundary has at most one event in reach
        assert scores.num_correct == scores.num_recalled == expected_matched
        assert scores.precision == pytest.approx(expected_matched / 3)
        assert scores.recall == pytest.approx(expected_matched / 3)
    elif tolerance == 1:  # window: 3 and 6 correct; 6 recalls both 5 and 7
        assert (scores.num_correct, scores.num_recalled) == (2, 3)
        assert (scores.precision, scores.recall) == (pytest.approx(2 / 3), 1.0)
    else:  # window, +-2: 3, 6 and 9 correct (9 reaches 7); every event recalled
        assert (scores.num_correct, scores.num_recalled) == (3, 3)


def test_window_rule_counts_neighbours_one_to_one_does_not():
    starts = torch.stack([row(0, 4, 5, 6, 9)])
    events = torch.stack([row(5)])
    window = boundary_scores(starts, events, tolerance=1)
    assert (window.num_correct, window.num_recalled) == (3, 1)
    assert (window.precision, window.recall, window.f1) == (pytest.approx(3 / 4), 1.0, pytest.approx(6 / 7))
    matched = boundary_scores(starts, events, tolerance=1, one_to_one=True)
    assert (matched.num_correct, matched.precision, matched.recall) == (1, pytest.approx(1 / 4), 1.0)
    assert matched.f1 == pytest.approx(0.4)
    assert window.mean_segments == matched.mean_segments == 5.0


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
    # The task's scale: boundaries at random with the true rate score about 0.37 at +-1 frame (window
    # rule); one-to-one matching scores lower.
    window, matched = boundary_scores(random, events), boundary_scores(random, events, one_to_one=True)
    assert 0.32 < window.f1 < 0.42 and 0.25 < matched.f1 < window.f1


def _result(own, none, elbo):
    return {"segmentation_elbo": {"own": own, "true_events": own, "none": none}, "test_elbo": elbo}


def test_rank_runs_by_segmentation_gap_or_elbo():
    from inference.recipes.hrssm.boundaries import rank_runs, segmentation_gap

    results = {"a": _result(-100.0, -120.0, -110.0), "b": _result(-90.0, -92.0, -95.0), "c": _result(-50.0, -55.0, -60.0)}
    assert segmentation_gap(results["a"]) == 20.0
    assert rank_runs(results) == ["a", "c", "b"]  # gaps 20, 5, 2
    assert rank_runs(results, "elbo") == ["c", "b", "a"]
    with pytest.raises(ValueError, match="rule"):
        rank_runs(results, "f1")
    with pytest.raises(ValueError, match="results"):
        rank_runs({})


# ----------------------------------------------------------------------------- reading q(m_t | X) without noise
@pytest.mark.parametrize("probs, peaks, threshold, expected", [
    ([0.45, 0.45, 0.10], True, 0.4, [1, 0, 0]),  # one event split over two frames: one boundary, the earlier
    ([0.45, 0.45, 0.10], False, 0.5, [0, 0, 0]),  # ... which the per-frame argmax misses
    ([0.60, 0.70, 0.20], True, 0.4, [0, 1, 0]),  # both above 0.5: one boundary at the peak
    ([0.60, 0.70, 0.20], False, 0.5, [1, 1, 0]),  # ... which the argmax marks twice
    ([0.30, 0.35, 0.30], True, 0.4, [0, 0, 0]),  # a peak below the threshold
    ([0.90, 0.10, 0.90], True, 0.4, [1, 0, 1]),  # two peaks two frames apart are both kept
    ([0.10, 0.20, 0.50], True, 0.4, [0, 0, 1]),  # the last frame can be a peak
    ([0.50, 0.20, 0.10], True, 0.4, [1, 0, 0]),  # and the first
    ([0.50, 0.20, 0.10], True, 0.6, [0, 0, 0]),
])
def test_decode_boundaries_by_hand(probs, peaks, threshold, expected):
    logits = torch.logit(torch.tensor([probs], dtype=torch.float64))
    assert decode_boundaries(logits, peaks, threshold).tolist() == [[float(v) for v in expected]]


@pytest.mark.parametrize("peaks", [False, True])
@pytest.mark.parametrize("threshold", [0.3, 0.5])
def test_decode_boundaries_against_a_loop(peaks, threshold):
    torch.manual_seed(0)
    logits = torch.randn(50, 12)
    logits[:, 5] = logits[:, 4]  # ties
    p = torch.sigmoid(logits).tolist()
    expected = [[float(row[t] > threshold and (not peaks or ((t == 0 or row[t] > row[t - 1])
                                                           and (t == len(row) - 1 or row[t] >= row[t + 1]))))
                 for t in range(len(row))] for row in p]
    assert decode_boundaries(logits, peaks, threshold).tolist() == expected
    if peaks:  # a free boundary never has a neighbour
        raw = decode_boundaries(logits, peaks, threshold)
        assert not (raw[:, 1:] * raw[:, :-1]).any()


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.5])
def test_decode_boundaries_refuses_a_threshold_outside_the_unit_interval(threshold):
    with pytest.raises(ValueError, match="threshold: expected in \\(0, 1\\)"):
        decode_boundaries(torch.zeros(2, 3), threshold=threshold)
    with pytest.raises(ValueError, match="logits: expected"):
        decode_boundaries(torch.zeros(3))


def test_runs_on_data_without_events_are_scored_and_selected_without_labels(tmp_path):
    """``evaluate.py boundaries`` on unlabelled data writes the segmentation ELBOs that the label-free rule
    of ``select_run.py`` reads (it once crashed there)."""
    from inference.recipes.hrssm.boundaries import rank_runs, segmentation_gap
    from inference.recipes.hrssm import BoundaryEvaluation, score_boundaries
    from inference.recipes.registry import recipes
    from inference.runs.experiment import RunSpec, load_run, train
    from inference.trainer import TrainConfig
    from pyro_models.datasets import SequenceData

    config, shape = recipes()["hrssm"].example()
    x = torch.rand((6,) + tuple(shape), generator=torch.Generator().manual_seed(0))
    data = SequenceData(x[:4], x[4:], "random")  # no events
    results = {}
    for seed in (0, 1):
        out = str(tmp_path / f"run{seed}")
        train(RunSpec("hrssm", config, TrainConfig(epochs=1, batch_size=2, seed=seed, progress=False,
                                                   train_eval_size=2, eval_batch_size=2)), out, data=data)
        result, _ = score_boundaries(load_run(out, data=data), BoundaryEvaluation(num_test=2, batch_size=2))
        assert "boundary_f1" not in result and "note" in result
        assert set(result["segmentation_elbo"]) == {"own", "none"}
        results[out] = result
    assert all(torch.isfinite(torch.tensor(segmentation_gap(r))) for r in results.values())
    assert sorted(rank_runs(results)) == sorted(results)


def test_the_decoupled_colour_balls_change_colour_away_from_the_bounces():
    from pyro_models.datasets.balls import HIT_CLEARANCE, color_balls

    n = 1000
    bounces, hits = color_balls(n, seed=3)
    frames, changes = color_balls(n, seed=3, changes="random")
    control, would_be = color_balls(n, seed=3, changes="random", change_colors=False)
    assert (bounces.sum(2) > 0).tolist() == (frames.sum(2) > 0).tolist()  # the same ball, frame by frame
    assert (control.sum(2) > 0).tolist() == (frames.sum(2) > 0).tolist() and (would_be == changes).all()
    colour = frames.max(axis=(3, 4))  # (N, T, 3): the ball's colour
    assert ((colour[:, 1:] != colour[:, :-1]).any(-1) == changes[:, 1:].astype(bool)).all()  # events = changes
    assert ((control.max(axis=(3, 4))[:, 1:] == control.max(axis=(3, 4))[:, :-1]).all())  # the control: one colour
    for shift in range(-HIT_CLEARANCE, HIT_CLEARANCE + 1):  # never within the clearance of a wall hit
        assert not (changes.astype(bool) & torch.from_numpy(hits).roll(shift, 1).numpy().astype(bool))[:, HIT_CLEARANCE:-HIT_CLEARANCE].any()
    gaps = [b - a for row in changes for a, b in zip(row.nonzero()[0], row.nonzero()[0][1:])]
    assert min(gaps) >= 3
    # as many changes as wall hits: 2.49 hits per sequence; the mean count's standard error is about 0.04
    assert abs(changes.sum(1).mean() - hits.sum(1).mean()) < 0.2


def test_cue_scores_and_their_chance_level():
    from inference.recipes.hrssm.boundaries import cue_scores, random_boundaries

    generator = torch.Generator().manual_seed(0)
    events = (torch.rand(200, 20, generator=generator) < 0.15).long()
    events[:, 0] = 0
    other = events.roll(5, 1)
    other[:, :5] = 0
    starts = events.clone()
    starts[:, 0] = 1
    drawn = random_boundaries(starts, generator)
    assert torch.equal(drawn[:, 1:].sum(1), starts[:, 1:].bool().sum(1)) and drawn[:, 0].all()
    scores = cue_scores(starts, {"own": events, "other": other}, tolerance=1)
    assert scores["own"]["f1"] == 1.0 and scores["own"]["share"] == 1.0
    assert scores["own"]["random_f1"] < 0.7 and abs(scores["other"]["f1"] - scores["other"]["random_f1"]) < 0.15
