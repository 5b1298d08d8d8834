"""Training on sequences with gaps: frame masks read from a user's .npz or drawn by train_drop_prob, the
masked ELBO of every sequence model, and runs that never read the content of a missing frame."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from inference.training.elbo import elbo_terms
from inference.runs.experiment import RunSpec, load_run, model_inputs, train
from inference.recipes.registry import recipes
from inference.trainer import TrainConfig
from pyro_models.datasets import SequenceData, load_sequence_npz
from pyro_models.datasets.configs import SequenceDataConfig
from pyro_models.modes import eval_mode

SEQUENCE_MODELS = [name for name, recipe in recipes().items() if recipe.sequences]
MODEL_GUIDES = [(name, guide) for name in SEQUENCE_MODELS for guide in recipes()[name].guides]


def tiny_train(**overrides) -> TrainConfig:
    return TrainConfig(**{**dict(epochs=1, batch_size=4, progress=False, train_eval_size=4, eval_batch_size=4), **overrides})


def gappy_data(recipe, num: int = 10, seed: int = 0, junk: float = None):
    """Random sequences of the recipe's example shape with frames missing at random in both splits (the
    first frame always observed); the missing frames hold 0, or ``junk`` (any value) where given."""
    config, shape = recipe.example()
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((num,) + tuple(shape), generator=generator)
    mask = torch.rand(x.shape[:2], generator=generator) > 0.3
    mask[:, 0] = True
    fill = torch.full_like(x, 0.0 if junk is None else junk)
    x = torch.where(mask.reshape(mask.shape + (1,) * (x.dim() - 2)), x, fill)
    return config, SequenceData(x[:-2], x[-2:], "random", train_mask=mask[:-2], test_mask=mask[-2:])


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_npz_mask_marks_gaps_that_may_hold_nan(tmp_path):
    sequences = np.random.default_rng(0).random((10, 6, 4)).astype(np.float32)
    mask = np.ones((10, 6), dtype=np.int64)
    mask[[1, 4, 9], [2, 0, 5]] = 0
    sequences[mask == 0] = np.nan
    data = load_sequence_npz(_write_npz(tmp_path / "gaps.npz", sequences=sequences, mask=mask))
    assert data.train_mask.dtype == torch.bool and data.train_mask.shape == (9, 6) and data.test_mask.shape == (1, 6)
    assert torch.equal(torch.cat([data.train_mask, data.test_mask]), torch.from_numpy(mask == 1))
    full = torch.cat([data.train, data.test])
    assert torch.isfinite(full).all() and (full[torch.from_numpy(mask == 0)] == 0).all()
    assert torch.equal(full[torch.from_numpy(mask == 1)], torch.from_numpy(sequences[mask == 1]))


def test_npz_nan_without_a_mask_points_to_the_mask(tmp_path):
    sequences = np.zeros((4, 3, 2), dtype=np.float32)
    sequences[0, 1] = np.nan
    with pytest.raises(ValueError, match=r"mark missing frames with a 0/1 array 'mask' of shape \(N, T\) = \(4, 3\)"):
        load_sequence_npz(_write_npz(tmp_path / "nan.npz", sequences=sequences))


@pytest.mark.parametrize("mask, message", [
    (np.ones((4, 2)), r"\['mask'\]: expected shape \(N, T\) = \(4, 3\)"),
    (np.full((4, 3), 2), r"\['mask'\]: values must be 0/1 or bool"),
])
def test_npz_bad_mask_is_an_error_naming_it(tmp_path, mask, message):
    with pytest.raises(ValueError, match=message):
        load_sequence_npz(_write_npz(tmp_path / "bad.npz", sequences=np.zeros((4, 3, 2), np.float32), mask=mask))


def test_train_drop_prob_draws_fixed_gaps_at_its_rate_in_the_training_split_only(tmp_path):
    config = SequenceDataConfig(num_sequences=60, num_steps=20, cache_dir=str(tmp_path), train_drop_prob=0.3)
    complete = dataclasses.replace(config, train_drop_prob=0.0).load()
    data = config.load()
    frames = data.train_mask.numel()  # 1,200 frames: the missing share has std sqrt(0.3 * 0.7 / 1200) = 0.013
    assert abs(float((~data.train_mask).float().mean()) - 0.3) < 4 * math.sqrt(0.3 * 0.7 / frames)
    gone = ~data.train_mask
    assert (data.train[gone] == 0).all() and torch.equal(data.train[~gone], complete.train[~gone])
    assert data.test_mask is None and torch.equal(data.test, complete.test)
    assert torch.equal(config.load().train_mask, data.train_mask)  # the same draw every time
    with pytest.raises(ValueError, match=r"train_drop_prob: expected a probability in \[0, 1\), got 1.0"):
        SequenceDataConfig(train_drop_prob=1.0)


def test_a_split_without_gaps_gets_an_all_true_mask_when_the_other_has_them():
    recipe = recipes()[SEQUENCE_MODELS[0]]
    _, data = gappy_data(recipe)
    data = data._replace(test_mask=None)
    x, mask = model_inputs(data, "test")
    assert torch.equal(x, data.test) and mask.all() and mask.shape == data.test.shape[:2]
    assert torch.equal(model_inputs(data, "train")[1], data.train_mask)
    assert model_inputs(data._replace(train_mask=None), "train") is data.train


@pytest.mark.parametrize("name, guide", MODEL_GUIDES)
def test_masked_elbo_reads_observed_frames_only(name, guide):
    recipe = recipes()[name]
    config, data = gappy_data(recipe)
    model, guide_fn = recipe.build(tuple(data.train.shape[1:]), dataclasses.replace(config, guide=guide))
    x, mask = data.train, data.train_mask
    junk = torch.where(mask.reshape(mask.shape + (1,) * (x.dim() - 2)), x, torch.rand_like(x))
    changed = x.clone()
    changed[:, 0] = 1 - changed[:, 0]  # an observed frame

    def elbo(inputs):
        torch.manual_seed(1)
        with eval_mode(model, guide_fn):
            return float(elbo_terms(model, guide_fn, inputs, mask).elbo)

    assert elbo(junk) == pytest.approx(elbo(x), rel=1e-6, abs=1e-4)
    assert abs(elbo(changed) - elbo(x)) > 1e-3


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_every_sequence_model_trains_on_gaps_without_reading_them(name, tmp_path):
    recipe = recipes()[name]
    options = recipe.options(**({"warm_start_steps": 2, "dynamics_fit_steps": 2, "dynamics_lstm_steps": 2} if hasattr(recipe.options(), "warm_start_steps") else {}))
    histories = []
    for run, junk in (("zeros", None), ("junk", 0.7)):
        config, data = gappy_data(recipe, junk=junk)
        out = str(tmp_path / run)
        histories.append(train(RunSpec(name, config, tiny_train(epochs=2), options=options), out, data=data))
    for key in ("train_elbo", "test_elbo", "kl"):
        assert math.isfinite(histories[0][-1][key])
        assert histories[0][-1][key] == pytest.approx(histories[1][-1][key], rel=1e-5), key
    loaded = load_run(out, data=data)
    assert torch.equal(loaded.data.train_mask, data.train_mask)


def test_the_imputation_strip_draws_the_datas_own_gaps_as_missing(tmp_path, monkeypatch):
    """The figure's mask is the experiment's mask AND the data's own (a frame the data lack is neither shown
    as observed nor given to the imputer), as the scores have it."""
    from inference.evaluation import imputation, plots
    from inference.runs.experiment import Run, RunSpec
    from inference.trainer import TrainConfig
    from pyro_models.datasets import SequenceData
    from pyro_models.dmm import DMMConfig, build_dmm
    from pyro_models.imputation import expand_mask

    x = torch.rand(3, 8, 1, 6, 6)
    own = torch.ones(3, 8, dtype=torch.bool)
    own[0, 5] = False  # a frame the data lack, after the frames always given
    data = SequenceData(x, x.clone(), "gappy", train_mask=own.clone(), test_mask=own.clone())
    config = DMMConfig(z_dim=2, transition_dim=4, emission_hidden=(4,), rnn_dim=4)
    model, guide = build_dmm((1, 6, 6), config)
    run = Run(model, guide, RunSpec("dmm", config, TrainConfig()), data, str(tmp_path))
    (tmp_path / "figures").mkdir()
    shown = {}
    monkeypatch.setattr(plots, "image_rows", lambda rows, labels, path, title, observed=None: shown.setdefault("observed", observed[1]))
    imputation.figures(run, "random", [{"setting": 0.0, "posterior_mean": 0.1}], metric="mse")
    expected = imputation.make_mask(run, "random", 0.0, x[:1].shape, 0) & own[:1]
    assert not expected[0, 5] and torch.equal(shown["observed"], expand_mask(expected, x[:1])[0])
