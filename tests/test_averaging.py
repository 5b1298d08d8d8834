"""Polyak averaging (``TrainConfig.ema_decay``): the averages follow their recursion step by step, training
itself is untouched (the raw weights, losses and draws of a run without averaging), scores and ``best.pt``
use the averages, and a resumed run continues them exactly."""
import pytest
import torch

from inference.runs.experiment import RunSpec, load_run, train
from inference.runs.rundir import RunDir, read_checkpoint
from inference.recipes.vae import VAEOptions
from inference.trainer import Callback, TrainConfig, Trainer
from inference.training import TIMINGS
from inference.training.averaging import WeightAverage
from pyro_models.datasets import ImageData
from pyro_models.vae import VAEConfig, build_vae

SMALL = VAEConfig(z_dim=4, hidden_dims=(16,))
DECAY = 0.9


def config(**overrides):
    base = dict(epochs=2, batch_size=20, lr=3e-3, progress=False, train_eval_size=40, eval_batch_size=25)
    return TrainConfig(**{**base, **overrides})


def without_time(history, drop=()):
    return [{k: v for k, v in m.items() if k not in TIMINGS and k not in drop} for m in history]


class Recorder(Callback):
    """The raw parameters after every optimiser step."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, loss):
        self.steps.append([p.detach().clone() for p in trainer.params])


def test_the_averages_follow_their_recursion(tiny_images):
    train_x, test_x = tiny_images
    torch.manual_seed(0)
    model, guide = build_vae((1, 12, 12), SMALL, "vae")
    recorder = Recorder()
    trainer = Trainer(model, guide, config(ema_decay=DECAY), callbacks=[recorder])
    trainer.setup(train_x[:20])
    expected = [p.detach().clone() for p in trainer.params]  # the averages start at the initial weights
    trainer.fit(train_x, test_x)
    for n, raw in enumerate(recorder.steps, start=1):
        decay = min(DECAY, (1 + n) / (10 + n))
        expected = [decay * e + (1 - decay) * r for e, r in zip(expected, raw)]
    assert len(recorder.steps) > 10  # past the warm-up: the cap DECAY is reached at n = 80 only with decay 0.9
    for got, want, raw in zip(trainer.svi.average.averages, expected, recorder.steps[-1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, r) for a, r in zip(trainer.svi.average.averages, recorder.steps[-1]))


def test_averaging_leaves_training_alone_and_scores_the_averages(tiny_images):
    train_x, test_x = tiny_images
    runs = {}
    for decay in (0.0, DECAY):
        torch.manual_seed(0)
        model, guide = build_vae((1, 12, 12), SMALL, "vae")
        trainer = Trainer(model, guide, config(ema_decay=decay, epochs=3))
        runs[decay] = (trainer, trainer.fit(train_x, test_x))
    (plain, plain_history), (averaged, averaged_history) = runs[0.0], runs[DECAY]
    # the same steps on the same draws: raw weights and training objectives equal
    assert [m["train_objective"] for m in plain_history] == [m["train_objective"] for m in averaged_history]
    for p, q in zip(plain.params, averaged.params):
        assert torch.equal(p, q)
    # the held-out scores are those of the averaged weights, not the raw ones
    assert averaged_history[-1]["test_elbo"] != plain_history[-1]["test_elbo"]
    torch.manual_seed(7)
    with averaged.svi.averaged():
        swapped = [p.detach().clone() for p in averaged.params]
    for p, a in zip(swapped, averaged.svi.average.averages):
        assert torch.equal(p, a)
    for p, q in zip(plain.params, averaged.params):  # the raw weights are back
        assert torch.equal(p, q)


def test_a_swapped_block_restores_the_raw_weights_on_an_error():
    params = [torch.nn.Parameter(torch.ones(3))]
    average = WeightAverage(params, DECAY)
    with torch.no_grad():
        params[0].add_(1.0)
    average.update()
    with pytest.raises(RuntimeError, match="boom"):
        with average.swapped():
            assert not torch.equal(params[0], torch.full((3,), 2.0))
            with average.swapped():  # nested: nothing more
                pass
            raise RuntimeError("boom")
    assert torch.equal(params[0].detach(), torch.full((3,), 2.0))


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_a_decay_outside_the_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match="ema_decay: expected a number in \\[0, 1\\)"):
        config(ema_decay=decay)


def test_a_resumed_run_continues_the_averages_and_loads_them(tiny_images, tmp_path):
    data = ImageData(*tiny_images, "tiny")
    spec = lambda epochs: RunSpec("vae", SMALL, config(epochs=epochs, ema_decay=DECAY), options=VAEOptions())
    straight = train(spec(3), str(tmp_path / "a"), data=data)
    train(spec(2), str(tmp_path / "b"), data=data)
    resumed = train(spec(3), str(tmp_path / "b"), resume=True, data=data)
    assert without_time(resumed) == without_time(straight[2:])
    a, b = read_checkpoint(str(tmp_path / "a")), read_checkpoint(str(tmp_path / "b"))
    assert a["average"] == b["average"] and a["average"]["steps"] > 0
    tensors = lambda state: {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for mine, theirs in ((a["objective"], b["objective"]), (a["averaged"]["objective"], b["averaged"]["objective"])):
        assert tensors(mine).keys() == tensors(theirs).keys() and tensors(mine)
        for key, value in tensors(mine).items():
            assert torch.equal(value, theirs[key]), key
    # load_run gives the averaged weights: the ones the scores were computed with
    run = load_run(str(tmp_path / "a"), data=data)
    for key, value in tensors(run.model.state_dict()).items():
        assert torch.equal(value, a["averaged"]["objective"]["model." + key])
    raw, averaged = tensors(a["objective"]), a["averaged"]["objective"]
    assert any(not torch.equal(averaged[k], v) for k, v in raw.items())
