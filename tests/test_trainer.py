"""The SVI trainer: learning, determinism, resume, NaN handling, run directory."""
import json
import os
import re

import pyro
import pytest
import torch

from inference.runs.rundir import RunDir, atomic_write_bytes
from inference.trainer import Callback, TrainConfig, Trainer, TrainingDiverged
from inference.training import TIMINGS
from inference.runs.experiment import RunSpec, train
from inference.recipes.vae import VAEOptions
from pyro_models.datasets import ImageData
from pyro_models.vae import VAEConfig, build_vae

SMALL = VAEConfig(z_dim=4, hidden_dims=(48,))


def config(**overrides):
    base = dict(epochs=2, batch_size=20, lr=3e-3, progress=False, train_eval_size=40, eval_batch_size=25)
    base.update(overrides)
    return TrainConfig(**base)


def train_vae(name, data, vae_config, train_config, out, kl_schedule="none", resume=False):
    """Train through the library's one path (registry recipe, run directory) on data handed in."""
    spec = RunSpec(name, vae_config, train_config, options=VAEOptions(kl_schedule=kl_schedule))
    return train(spec, out, resume=resume, data=data)


def without_time(history):
    return [{k: v for k, v in m.items() if k not in TIMINGS} for m in history]


def test_training_lowers_held_out_loss(tiny_images):
    train, test = tiny_images
    model, guide = build_vae((1, 12, 12), SMALL, "vae")
    trainer = Trainer(model, guide, config(epochs=6, lr=1e-2))
    before = trainer.evaluate(test)["elbo"]
    history = trainer.fit(train, test)
    # From about -100 nats to about -60: a margin no noise explains.
    assert history[-1]["test_elbo"] > before + 10
    assert history[-1]["test_elbo"] > history[0]["test_elbo"]


@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_same_seed_same_metrics(tiny_images, elbo):
    train, test = tiny_images
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model, guide = build_vae((1, 12, 12), SMALL, "vae")
        runs.append(without_time(Trainer(model, guide, config(elbo=elbo, seed=5)).fit(train, test)))
    assert runs[0] == runs[1]


def test_resume_continues_the_run_exactly(tiny_images, tmp_path):
    data = ImageData(*tiny_images, "tiny")
    straight = train_vae("vae", data, SMALL, config(epochs=3), str(tmp_path / "a"), kl_schedule="free-bits")
    train_vae("vae", data, SMALL, config(epochs=2), str(tmp_path / "b"), kl_schedule="free-bits")
    resumed = train_vae("vae", data, SMALL, config(epochs=3), str(tmp_path / "b"), kl_schedule="free-bits", resume=True)
    assert len(resumed) == 1 and resumed[0]["epoch"] == 3
    assert without_time(resumed) == without_time(straight[2:])
    with open(tmp_path / "b" / "metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2, 3]


def test_run_directory_contents(tiny_images, tmp_path):
    data = ImageData(*tiny_images, "tiny")
    train_vae("conv-vae", data, VAEConfig(z_dim=3, channels=(4, 8)), config(epochs=1), str(tmp_path / "run"), kl_schedule="linear")
    run = tmp_path / "run"
    assert json.load(open(run / "config.json"))["options"]["kl_schedule"] == "linear"
    metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
    for key in ("epoch", "train_elbo", "test_elbo", "kl", "beta", "active_units", "kl_per_dim", "impute_mse"):
        assert key in metrics[0]
    assert metrics[0]["beta"] == 1.0  # epoch 1 of 1
    figures = set(os.listdir(run / "figures"))
    for name in ("reconstructions", "samples", "imputation", "kl_per_dim", "decoder_weight_norms"):
        assert f"{name}_epoch001.png" in figures
    assert "elbo_curves.png" in figures
    assert (run / "checkpoint.pt").exists()


def test_a_folder_holding_a_run_continues_it_or_refuses_another(tiny_images, tmp_path):
    data = ImageData(*tiny_images, "tiny")
    out = str(tmp_path / "run")
    first = train_vae("vae", data, SMALL, config(epochs=1), out)
    before = open(os.path.join(out, "config.json")).read()
    assert train_vae("vae", data, SMALL, config(epochs=1), out) == []  # the same run, done: nothing to do
    with pytest.raises(ValueError, match="epochs: the run in .* has done 1 epochs"):
        RunDir(out, json.loads(before), resume=True).__class__.preflight(out, {**json.loads(before), "train": {
            **json.loads(before)["train"], "epochs": 0}}, resume=True)
    with pytest.raises(FileExistsError, match="different run .* resume=True"):
        train_vae("vae", data, VAEConfig(z_dim=3, hidden_dims=(48,)), config(epochs=1), out)
    with pytest.raises(ValueError, match="resume: only .* may change, but config.z_dim: 4 -> 3"):
        train_vae("vae", data, VAEConfig(z_dim=3, hidden_dims=(48,)), config(epochs=2), out, resume=True)
    assert [m["epoch"] for m in RunDir(out, json.loads(before), resume=True).read_metrics()] == [1]  # nothing changed
    assert first[0]["epoch"] == 1
    with pytest.raises(FileNotFoundError, match="no run to continue"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("mine")
        RunDir(str(tmp_path / "other"), {}, resume=True)


def test_fewer_epochs_than_done_changes_nothing(tiny_images, tmp_path):
    data = ImageData(*tiny_images, "tiny")
    out = str(tmp_path / "run")
    train_vae("vae", data, SMALL, config(epochs=2), out)
    files = {name: open(os.path.join(out, name), "rb").read() for name in ("config.json", "metrics.jsonl", "checkpoint.pt")}
    with pytest.raises(ValueError, match="epochs: the run in .* has done 2 epochs; pass epochs > 2"):
        train_vae("vae", data, SMALL, config(epochs=1), out, resume=True)
    assert files == {name: open(os.path.join(out, name), "rb").read() for name in files}


def test_resume_with_a_new_learning_rate_is_recorded_and_applied(tiny_images, tmp_path):
    data = ImageData(*tiny_images, "tiny")
    out = str(tmp_path / "run")
    train_vae("vae", data, SMALL, config(epochs=2, lr_decay=0.5), out)
    resumed = train_vae("vae", data, SMALL, config(epochs=3, lr=1e-3, lr_decay=0.5, clip_norm=5.0), out, resume=True)
    assert resumed[0]["lr"] == pytest.approx(1e-3 * 0.5 ** 2)  # the staircase of the new base rate at epoch 3
    stored = json.load(open(os.path.join(out, "config.json")))
    assert stored["train"]["lr"] == 1e-3 and stored["train"]["clip_norm"] == 5.0
    (record,) = stored["resumes"]
    assert record["after_epoch"] == 2 and record["changes"]["train.lr"] == [3e-3, 1e-3]
    assert set(record["changes"]) == {"train.lr", "train.clip_norm", "train.epochs"}


def test_linear_kl_schedule_continues_across_a_resume(tiny_images, tmp_path):
    data = ImageData(*tiny_images, "tiny")
    out = str(tmp_path / "run")
    first = train_vae("vae", data, SMALL, config(epochs=2), out, kl_schedule="linear")
    extended = train_vae("vae", data, SMALL, config(epochs=4), out, kl_schedule="linear", resume=True)
    assert [m["beta"] for m in first + extended] == [0.5, 1.0, 1.0, 1.0]  # the stored schedule goes on, unbent


def test_a_run_that_failed_before_its_first_checkpoint_starts_again(tiny_images, tmp_path):
    train, test = tiny_images
    out = str(tmp_path / "run")
    model, guide = build_vae((1, 12, 12), SMALL, "vae")
    with pytest.raises(TrainingDiverged, match="start the run again"):
        Trainer(model, guide, config(epochs=1), RunDir(out, {"what": "x"}), callbacks=[PoisonAtEpoch(1)]).fit(train, test)
    for resume in (False, True):  # the same folder, with or without resume: a fresh start
        run = RunDir(out, {"what": "x"}, resume=resume)
        assert run.mode == "restart" and not run.resuming and run.read_metrics() == []


def test_a_corrupt_newest_checkpoint_falls_back_on_the_one_before(tiny_images, tmp_path):
    data = ImageData(*tiny_images, "tiny")
    straight = train_vae("vae", data, SMALL, config(epochs=3), str(tmp_path / "a"))
    out = str(tmp_path / "b")
    train_vae("vae", data, SMALL, config(epochs=2), out)
    with open(os.path.join(out, "checkpoint.pt"), "wb") as f:
        f.write(b"truncated")
    with pytest.warns(UserWarning, match="checkpoint.pt is unreadable.*resuming from checkpoint.prev.pt \\(epoch 1\\)"):
        resumed = train_vae("vae", data, SMALL, config(epochs=3), out, resume=True)
    assert [m["epoch"] for m in resumed] == [2, 3] and without_time(resumed) == without_time(straight[1:])
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        with open(os.path.join(out, name), "wb") as f:
            f.write(b"")
    stored = json.load(open(os.path.join(out, "config.json")))
    with pytest.raises(ValueError, match="no readable checkpoint"):
        RunDir(out, stored, resume=True).load_checkpoint()


class PoisonAtEpoch(Callback):
    """Turns a decoder weight into NaN at the start of ``epoch``."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, epoch):
        if epoch == self.epoch:
            with torch.no_grad():
                trainer.model.decoder.net[0].weight[0, 0] = float("nan")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_images, tmp_path):
    train, test = tiny_images
    model, guide = build_vae((1, 12, 12), SMALL, "vae")
    run = RunDir(str(tmp_path / "run"), {"what": "nan test"})
    trainer = Trainer(model, guide, config(epochs=3), run, callbacks=[PoisonAtEpoch(2)])
    with pytest.raises(TrainingDiverged, match=r"loss is nan in epoch 2.*checkpoint\.pt \(epoch 1\)"):
        trainer.fit(train, test)
    state = run.load_checkpoint()
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["objective"].values() if torch.is_tensor(v) and v.is_floating_point())
    assert len(run.read_metrics()) == 1


@pytest.mark.parametrize("clip_norm, advice", [(None, "set clip_norm"), (7.0, r"clip_norm \(now 7\)")])
def test_nan_before_any_checkpoint(tiny_images, clip_norm, advice):
    model, guide = build_vae((1, 12, 12), SMALL, "vae")
    trainer = Trainer(model, guide, config(epochs=1, clip_norm=clip_norm), callbacks=[PoisonAtEpoch(1)])
    with pytest.raises(TrainingDiverged, match="no checkpoint was written yet") as stop:
        trainer.fit(*tiny_images)
    assert re.search(advice, str(stop.value)), str(stop.value)  # the advice fits the run's settings


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = str(tmp_path / "file.bin")
    atomic_write_bytes(path, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_bytes(path, broken)
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_bad_train_config():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)


def test_lr_decay_is_a_staircase(tiny_images):
    model, guide = build_vae((1, 12, 12), SMALL, "vae")
    history = Trainer(model, guide, config(epochs=3, lr_decay=0.5, lr_decay_every=2)).fit(*tiny_images)
    assert [m["lr"] for m in history] == pytest.approx([3e-3, 3e-3, 1.5e-3])


def test_gradient_clipping_bounds_the_applied_gradient(tiny_images):
    clip = 0.5
    before, applied = [], []

    class Spy(Callback):
        def on_after_backward(self, trainer):  # before clipping
            before.append(float(torch.cat([p.grad.flatten() for p in trainer.params if p.grad is not None]).norm()))

    model, guide = build_vae((1, 12, 12), SMALL, "vae")
    trainer = Trainer(model, guide, config(epochs=1, clip_norm=clip), callbacks=[Spy()])
    trainer.setup(tiny_images[0][:20])
    step = trainer.optimizer.step

    def spy_step(*args, **kwargs):  # after clipping, what Adam is given
        applied.append(float(torch.cat([p.grad.flatten() for p in trainer.params if p.grad is not None]).norm()))
        return step(*args, **kwargs)

    trainer.optimizer.step = spy_step
    for i in range(3):
        trainer.step(tiny_images[0][20 * i : 20 * (i + 1)])
    assert min(before) > clip  # the clip was active at every step ...
    assert applied == pytest.approx([clip] * 3, rel=1e-4)  # ... and the applied norm is exactly the clip


def test_dynamic_binarisation_draws_binary_batches(tiny_images):
    seen = []

    class Spy(Callback):
        def on_train_batch_start(self, trainer, batch):
            seen.append(batch[0])  # the batch: the model's arguments, (x,) here

    data = ImageData(*tiny_images, "tiny")
    model, guide = build_vae((1, 12, 12), SMALL, "vae")
    from pyro_models.datasets import binarizer

    Trainer(model, guide, config(epochs=1), callbacks=[Spy()], batch_transform=binarizer("dynamic")).fit(data.train, data.test)
    batch = torch.cat(seen)
    assert set(batch.unique().tolist()) <= {0.0, 1.0}


def test_jit_with_kl_schedule_is_refused(tiny_images):
    with pytest.raises(ValueError, match="jit"):
        train_vae("vae", ImageData(*tiny_images, "tiny"), SMALL, config(jit=True), None, kl_schedule="linear")


@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_jit_matches_eager_over_many_steps(tiny_images, elbo):
    # The step's returned loss (the NaN guard's number and train_objective), the gradients and the
    # parameters of a compiled run equal the eager run's at every step, not only the first.
    steps, batch = 30, 20
    data = tiny_images[0]
    runs = []
    for jit in (False, True):
        torch.manual_seed(1)
        model, guide = build_vae((1, 12, 12), SMALL, "vae")
        trainer = Trainer(model, guide, config(jit=jit, elbo=elbo))
        trainer.setup(data[:batch])
        torch.manual_seed(2)
        losses, grads = [], []
        for i in range(steps):
            start = (i * batch) % (len(data) - batch)
            losses.append(trainer.step(data[start : start + batch]))
            grads.append(torch.cat([p.grad.flatten() for p in trainer.params if p.grad is not None]))
        runs.append((losses, grads, [p.detach().clone() for p in trainer.params]))
    (eager_losses, eager_grads, eager_params), (jit_losses, jit_grads, jit_params) = runs
    assert jit_losses == pytest.approx(eager_losses, rel=1e-5)
    assert all(loss > 0 for loss in jit_losses)  # a Bernoulli VAE's loss: KL + NLL, both >= 0
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(eager_grads, jit_grads))
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(eager_params, jit_params))


def test_jit_run_reports_the_eager_objective(tiny_images):
    data = ImageData(*tiny_images, "tiny")
    eager = train_vae("vae", data, SMALL, config(epochs=1), None)
    compiled = train_vae("vae", data, SMALL, config(jit=True, epochs=1), None)
    for key in ("train_objective", "train_elbo", "test_elbo"):
        assert compiled[0][key] == pytest.approx(eager[0][key], rel=1e-4), key


@pytest.mark.parametrize("name, elbo", [("vae", "trace"), ("vae", "meanfield"), ("conv-vae", "meanfield")])
def test_jit_loss_equals_eager_loss(name, elbo):
    # Same seed, same draws: the traced loss, its gradients and the batch-norm statistics it updates
    # equal the eager ones.
    torch.manual_seed(0)
    x = torch.rand(8, 1, 12, 12)
    results = []
    for jit in (False, True):
        torch.manual_seed(1)
        model, guide = build_vae((1, 12, 12), VAEConfig(z_dim=3, hidden_dims=(16,), channels=(4, 8)), name)
        trainer = Trainer(model, guide, config(jit=jit, elbo=elbo))
        trainer.setup(x)
        losses = []
        for _ in range(2):  # the second call runs the compiled graph
            torch.manual_seed(2)
            trainer.optimizer.zero_grad()
            loss = trainer.loss(x)
            loss.backward()
            losses.append(loss.item())
        grads = [p.grad.clone() for p in trainer.params]
        results.append((losses, grads, [b.clone().float() for b in trainer.svi.buffers]))
    (eager_losses, eager_grads, eager_buffers), (jit_losses, jit_grads, jit_buffers) = results
    assert jit_losses == pytest.approx(eager_losses, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(eager_grads, jit_grads))  # float noise on ~0 grads
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(eager_buffers, jit_buffers))


def test_mean_loss_divides_the_gradient(tiny_images):
    x = tiny_images[0][:10]
    grads = []
    for mean_loss in (False, True):
        torch.manual_seed(0)
        model, guide = build_vae((1, 12, 12), SMALL, "vae")
        trainer = Trainer(model, guide, config(mean_loss=mean_loss), units_per_example=3)
        trainer.setup(x)
        trainer.optimizer.step = lambda: None  # keep the parameters: compare gradients only
        torch.manual_seed(1)
        trainer.step(x)
        grads.append(torch.cat([p.grad.flatten() for p in trainer.params if p.grad is not None]))
    assert torch.allclose(grads[0] / 30, grads[1], rtol=1e-4, atol=1e-7)


def test_a_run_stored_before_a_field_existed_continues(tmp_path):
    """A config.json written before a config field was added (here: tensorboard and the VAE's
    num_flows) still matches the same spec: missing fields are read at their defaults, not as changes."""
    from pyro_models.datasets.configs import ImageDataConfig

    def spec(epochs):
        return RunSpec("vae", VAEConfig(z_dim=2, hidden_dims=(8,)), TrainConfig(epochs=epochs, progress=False, batch_size=10),
                       ImageDataConfig(data="shapes", num_shapes=30))
    out = str(tmp_path / "run")
    train(spec(1), out)
    path = os.path.join(out, "config.json")
    with open(path) as f:
        stored = json.load(f)
    del stored["train"]["tensorboard"], stored["config"]["num_flows"]
    with open(path, "w") as f:
        json.dump(stored, f)
    assert train(spec(1), out) == []  # the same run, done: not refused as another run
    assert [m["epoch"] for m in train(spec(2), out, resume=True)] == [2]
    stored["config"]["z_dim"] = 3  # a real change is still one
    with open(path, "w") as f:
        json.dump(stored, f)
    with pytest.raises(FileExistsError, match="different run"):
        train(spec(2), out)



class ValidationProbe(torch.nn.Module):
    """z ~ N(loc, 1), x ~ N(z, 1) (model) or z ~ N(loc, 1) (guide), recording at each training-mode call
    whether Pyro's and torch's argument validation were on."""

    def __init__(self, name, seen, observe):
        super().__init__()
        self.name, self.seen, self.observe = name, seen, observe
        self.loc = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        from pyro.infer.util import is_validation_enabled

        pyro.module(self.name, self)
        if self.training and self.observe:
            self.seen.append((is_validation_enabled(), torch.distributions.Distribution._validate_args))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pyro.distributions.Normal(self.loc, 1.0))
            if self.observe:
                pyro.sample("x", pyro.distributions.Normal(z, 1.0), obs=x)


@pytest.mark.parametrize("every_step", [False, True])
def test_argument_validation_runs_on_each_epochs_first_step_or_every_step(every_step):
    seen = []
    model, guide = ValidationProbe("model", seen, True), ValidationProbe("guide", seen, False)
    data = torch.randn(40)
    Trainer(model, guide, config(epochs=2, batch_size=10, elbo="trace", check_every_step=every_step)).fit(data, data[:10])
    first_epoch = [True] * 4 if every_step else [True, False, False, False]
    assert [on for on, _ in seen] == first_epoch * 2  # 2 epochs of 4 steps
    assert all(torch_on == on for on, torch_on in seen)  # torch's distributions follow Pyro's switch
    assert pyro.infer.util.is_validation_enabled()  # the global setting (conftest's) is left as it was


def test_a_run_of_a_bare_trainer_loads_its_weights_and_load_run_says_how(tiny_images, tmp_path):
    from inference.runs.experiment import load_run
    from inference.runs.rundir import read_checkpoint
    from inference.training import load_weights

    train, test = tiny_images
    model, guide = build_vae((1, 12, 12), SMALL, "vae")
    run = RunDir(str(tmp_path / "mine"), {"note": "my run"})
    Trainer(model, guide, config(epochs=1), run).fit(train, test)
    again, again_guide = build_vae((1, 12, 12), SMALL, "vae")
    load_weights(again, again_guide, read_checkpoint(run.path))
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(again_guide.parameters(), guide.parameters()))
    with pytest.raises(ValueError, match="written by a Trainer of your own .*load_weights"):
        load_run(run.path)


def test_compiled_training_on_ragged_sequences_traces_a_bounded_number_of_shapes(monkeypatch):
    """Each batch of ragged sequences is cut to its longest, so a compiled run could trace once per length
    (an HRSSM run on JSB grew to 20 GB and was killed): compiled, batches are cut to a multiple of
    COMPILED_LENGTH_MULTIPLE steps, and the step keeps only MAX_COMPILED traces."""
    from inference.training import step as step_module
    from inference.training.batching import COMPILED_LENGTH_MULTIPLE
    from pyro_models.dmm import DMMConfig, build_dmm

    num, steps = 24, 3 * COMPILED_LENGTH_MULTIPLE
    lengths = torch.arange(num) % steps + 1  # every length from 1 to 48 ... and again
    x = (torch.rand(num, steps, 4, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    x = x * (torch.arange(steps) < lengths.unsqueeze(-1)).unsqueeze(-1)
    model, guide = build_dmm((4,), DMMConfig(z_dim=2, transition_dim=4, emission_hidden=(4,), rnn_dim=4))
    config = TrainConfig(epochs=1, batch_size=4, jit=True, progress=False, train_eval_size=4, eval_batch_size=8)
    traced = []
    original = step_module.SVIStep._trace
    monkeypatch.setattr(step_module.SVIStep, "_trace", lambda self, key, given: traced.append(key) or original(self, key, given))
    trainer = Trainer(model, guide, config, lengths_arg=2)
    trainer.fit((x, None, lengths), (x[:4], None, lengths[:4]))
    cut = {key[0][0][1] for key in traced}  # the time axis of each traced batch
    assert cut <= {COMPILED_LENGTH_MULTIPLE, 2 * COMPILED_LENGTH_MULTIPLE, steps} and len(traced) <= 6, cut
    monkeypatch.setattr(step_module, "MAX_COMPILED", 2)
    for length in (5, 20, 40):  # three shapes: the oldest trace goes
        trainer.svi.loss((x[:4, :length], None, lengths[:4].clamp(max=length)))
    assert len(trainer.svi._compiled) == 2


def test_adams_first_moment_decay_is_a_setting(tiny_images):
    train, test = tiny_images
    model, guide = build_vae((1, 12, 12), SMALL, "vae")
    trainer = Trainer(model, guide, config(beta1=0.96))
    trainer.setup(train[:20])
    assert trainer.optimizer.param_groups[0]["betas"] == (0.96, 0.999)
    with pytest.raises(ValueError, match=r"beta1: expected a number in \[0, 1\), got 1.0"):
        config(beta1=1.0)
