"""--tensorboard: event files TensorBoard reads back, with the epoch metrics, per-step loss and learning
rate, the figures and the config; a clear error when the extra is not installed."""
import json
import os

import pytest

from inference.runs.experiment import RunSpec, train
from inference.recipes.registry import get_recipe
from inference.runs.experiment import check_machine
from inference.trainer import TrainConfig

import test_registry  # tests/test_registry.py: the registry's tiny example data


def tiny(**overrides) -> TrainConfig:
    return TrainConfig(**{**dict(epochs=2, batch_size=4, progress=False, train_eval_size=4, eval_batch_size=4), **overrides})


def test_tensorboard_events_hold_the_runs_metrics_steps_figures_and_config(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = get_recipe("vae")
    config, data = test_registry.example_data(recipe, num=10)
    out = str(tmp_path / "run")
    train(RunSpec("vae", config, tiny(epochs=1, tensorboard=True)), out, data=data)
    train(RunSpec("vae", config, tiny(epochs=2, tensorboard=True)), out, resume=True, data=data)
    events = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    for name in ("test_elbo", "train_elbo", "kl"):
        logged = [(e.step, e.value) for e in events.Scalars(f"epoch/{name}")]
        assert logged == [(m["epoch"], pytest.approx(m[name], rel=1e-6)) for m in metrics], name
    steps = [e.step for e in events.Scalars("step/loss")]
    assert steps == list(range(1, 2 * 2 + 1))  # 8 examples, batch 4: 2 steps per epoch, one history over the resume
    assert [e.step for e in events.Scalars("step/lr")] == steps and "epoch/lr" in scalars
    assert any(tag.startswith("figures/") for tag in events.Tags()["images"])
    assert "config" in " ".join(events.Tags()["tensors"])  # the config as text (and the HPARAMS summary)


def test_tensorboard_without_the_extra_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    settings = TrainConfig(tensorboard=True)  # a setting of the machine: a stored run with it still loads
    with pytest.raises(ValueError, match=r"tensorboard: the TensorBoard extra is not installed; pip install"):
        check_machine(settings)  # checked when training starts
