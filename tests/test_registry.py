"""The registry and the layers: every registered model trains through one path, its flags come from its
configs and reach them, other models' flags are refused, compilable models compile to the eager loss,
and ``pyro_models`` never imports training, plotting or the command line."""
import ast
import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
import typing
from dataclasses import fields

import pytest
import torch

from inference.cli.command_line import flag_owners, model_parser, parse_train_args
from inference.runs.experiment import RunSpec, load_run, train
from inference.recipes.registry import recipes
from inference.trainer import TrainConfig, Trainer
from pyro_models.datasets import ImageData, SequenceData

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = tuple(recipes())
GROUPS = ("data", "config", "options", "train")
FORBIDDEN = ("inference", "matplotlib", "tqdm", "scripts")  # tqdm: progress is the trainer's business
LOADED_FORBIDDEN = ("inference", "matplotlib", "scripts")  # (Pyro itself imports tqdm)


def tiny_train(**overrides) -> TrainConfig:
    base = dict(epochs=1, batch_size=4, progress=False, train_eval_size=4, eval_batch_size=4)
    return TrainConfig(**{**base, **overrides})


def example_data(recipe, num: int = 8, seed: int = 0):
    config, shape = recipe.example()
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((num,) + tuple(shape), generator=generator)
    data = SequenceData(x[:-2], x[-2:], "random") if len(shape) > 3 or recipe.sequences else ImageData(x[:-2], x[-2:], "random")
    return config, data


def test_import_pyro_models_imports_no_training_plotting_or_matplotlib():
    code = ("import sys, pyro_models, pyro_models.lgssm, pyro_models.datasets.configs, pyro_models.imputation; "
            f"bad = [m for m in sys.modules if m.split('.')[0] in {LOADED_FORBIDDEN!r}]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_module_of_pyro_models_imports_inference_or_scripts():
    for folder, _, files in os.walk(os.path.join(ROOT, "pyro_models")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            for node in ast.walk(ast.parse(open(path).read())):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                assert not any(m.split(".")[0] in FORBIDDEN for m in modules), (path, modules)


def test_the_training_layer_imports_no_layer_above_it():
    """inference/training/ (the SVI step and loop) knows nothing of recipes, evaluation or the command
    line (it writes its checkpoints and metrics through runs/rundir.py, the run folder, and nothing else)."""
    above = ("recipes", "evaluation", "cli")
    folder = os.path.join(ROOT, "inference", "training")
    for name in os.listdir(folder):
        if name.endswith(".py"):
            for node in ast.walk(ast.parse(open(os.path.join(folder, name)).read())):
                if isinstance(node, ast.ImportFrom) and node.level == 2:  # from ..X import ...
                    assert (node.module or "").split(".")[0] not in above, (name, node.module)
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("inference."):
                    assert node.module.split(".")[1] not in above, (name, node.module)


def test_no_script_imports_another_script_or_edits_sys_path():
    scripts = {n[:-3] for n in os.listdir(os.path.join(ROOT, "scripts")) if n.endswith(".py")}
    for folder in ("scripts", "benchmarks"):
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith(".py"):
                text = open(os.path.join(ROOT, folder, name)).read()
                assert "sys.path" not in text, name
                tree = ast.parse(text)
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        assert not any(a.name in scripts for a in node.names), name


@pytest.mark.parametrize("name", MODELS)
def test_recipe_is_complete(name):
    recipe = recipes()[name]
    assert recipe.example is not None and recipe.guides, name
    config, _ = recipe.example()
    assert isinstance(config, recipe.config)
    assert getattr(recipe.config(), "guide") in recipe.guides


def _candidates(annotation, default, choices):
    """Values other than ``default`` to try for a field (the first that validates is used)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        inner = next(a for a in args if a is not type(None))
        return _candidates(inner, default if default is not None else {int: 1, float: 0.5, str: "x"}.get(inner, 1), choices) + (
            [] if default is None else [None])
    if choices:
        return [c for c in choices if c != default]
    if annotation is bool:
        return [not default]
    if annotation is int:
        return [default + 2, default + 1, default * 2, 1, 0]
    if annotation is float:
        return [default * 0.5 if default else 0.5, default + 0.25, default * 0.9, 0.05]
    if origin is tuple:
        return [tuple(v + 1 for v in default) or (3,), (3,)]
    return [default + "x" if default else "x"]


def _cli_text(value):
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


@pytest.mark.parametrize("name", MODELS)
def test_every_flag_reaches_its_config_field(name):
    recipe = recipes()[name]
    defaults = {"data": recipe.data.config, "config": recipe.config(), "options": recipe.options(), "train": recipe.training.defaults}
    reached, unchangeable = 0, []
    for group in GROUPS:
        cls = type(defaults[group])
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name in ("device",) or (group == "config" and f.name in recipe.cli.unused_fields):
                continue  # no other device may exist here; a field this model does not read has no flag
            default = getattr(defaults[group], f.name)
            for value in _candidates(hints[f.name], default, f.metadata.get("choices")):
                flag = "--" + f.name.replace("_", "-")
                argv = [name, "--out", "x"] + ([flag if value else "--no-" + flag[2:]] if hints[f.name] is bool else [flag, _cli_text(value)])
                if f.name == "check_every_step" and recipe.training.defaults.jit:
                    argv.append("--no-jit")  # Pyro's checks do not run in a compiled loss: refused with jit
                try:
                    spec = parse_train_args(argv, "")
                except SystemExit:
                    continue  # this value is invalid for the field; try the next
                expected = os.path.abspath(value) if f.name in ("data_dir", "data_path") else value  # stored absolute
                assert getattr(getattr(spec.spec, group), f.name) == expected, (group, f.name, value)
                reached += 1
                break
            else:
                unchangeable.append(f.name)
    # A model with one guide cannot change it; one that cannot be compiled refuses --jit; --tensorboard
    # is refused without the optional extra.
    optional = set() if importlib.util.find_spec("tensorboard") is not None else {"tensorboard"}
    assert set(unchangeable) <= {"guide"} | (set() if recipe.compilable else {"jit"}) | optional, unchangeable
    assert reached > 10


@pytest.mark.parametrize("name", MODELS)
def test_flags_of_other_models_are_refused(name, capsys):
    own = {o for a in model_parser(recipes()[name])._actions for o in a.option_strings}
    others = sorted(f for f in flag_owners() if f not in own)
    assert others or len(MODELS) == 1
    for option in others:
        with pytest.raises(SystemExit) as exit_info:
            parse_train_args([name, option, "1", "--out", "x"], "")
        assert exit_info.value.code == 2
        message = capsys.readouterr().err
        assert option in message and "does not apply" in message and message.count("\n") == 1, message


def test_kvae_z_dim_is_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        parse_train_args(["kvae", "--z-dim", "3", "--out", "x"], "")
    assert "--z-dim does not apply to kvae" in capsys.readouterr().err


@pytest.mark.parametrize("name", MODELS)
def test_bad_value_names_the_flag(name, capsys):
    with pytest.raises(SystemExit):
        parse_train_args([name, "--batch-size", "0", "--out", "x"], "")
    assert capsys.readouterr().err.startswith("error: --batch-size: expected >= 1, got 0")


@pytest.mark.parametrize("name", [n for n in MODELS if not recipes()[n].compilable])
def test_jit_is_refused_for_models_that_cannot_compile(name):
    recipe = recipes()[name]
    config, _ = recipe.example()
    with pytest.raises(ValueError, match="jit: .* cannot be compiled"):
        train(RunSpec(name, config, tiny_train(jit=True)), None, data=example_data(recipe)[1])


@pytest.mark.parametrize("name", [n for n in MODELS if recipes()[n].compilable])
def test_compiled_loss_equals_eager_over_many_steps(name):
    recipe = recipes()[name]
    config, data = example_data(recipe, num=16)
    steps, runs = 12, []
    for jit in (False, True):
        torch.manual_seed(0)
        model, guide = recipe.build(tuple(data.train.shape[1:]), config)
        trainer = Trainer(model, guide, tiny_train(jit=jit))
        trainer.setup(data.train[:4])
        torch.manual_seed(1)
        losses = [trainer.step(data.train[(4 * i) % 12 : (4 * i) % 12 + 4]) for i in range(steps)]
        grads = torch.cat([p.grad.flatten() for p in trainer.params if p.grad is not None])
        runs.append((losses, grads, torch.cat([p.detach().flatten() for p in trainer.params])))
    (eager, eager_grad, eager_params), (compiled, compiled_grad, compiled_params) = runs
    assert compiled == pytest.approx(eager, rel=1e-5)  # the value the trainer reports and guards, every step
    assert torch.allclose(compiled_grad, eager_grad, rtol=1e-3, atol=1e-5)
    # Adam divides by the gradient's running scale, so float noise in a near-zero gradient (a compiled
    # convolution's backward sums in another order) can move that parameter by up to lr per step;
    # every other parameter agrees to float precision.
    lr = tiny_train().lr
    close = torch.isclose(compiled_params, eager_params, rtol=1e-4, atol=1e-6)
    assert close.float().mean() > 0.95 and (compiled_params - eager_params).abs().max() <= lr * steps


MODEL_GUIDES = [(name, guide) for name in MODELS for guide in recipes()[name].guides]


@pytest.mark.parametrize("name, guide", MODEL_GUIDES)
def test_every_model_and_guide_trains_loads_and_imputes_through_one_path(name, guide, tmp_path):
    recipe = recipes()[name]
    config, data = example_data(recipe)
    config = dataclasses.replace(config, guide=guide)
    options = recipe.options(**({"warm_start_steps": 2, "dynamics_fit_steps": 2, "dynamics_lstm_steps": 2} if hasattr(recipe.options(), "warm_start_steps") else {}))
    out = str(tmp_path / "run")
    history = train(RunSpec(name, config, tiny_train(), options=options), out, data=data)
    assert math.isfinite(history[-1]["test_elbo"])
    run = load_run(out, data=data)
    assert run.spec.config == config and run.spec.model == name
    assert not run.model.training and not run.guide.training
    x = data.test
    mask = torch.ones(x.shape[:2] if recipe.sequences else x.shape, dtype=torch.bool)
    mask[:, 1:3] = False
    run.model.train(), run.guide.train()
    result = recipe.impute(run.model, run.guide, x, mask, num_samples=2)
    assert run.model.training and run.guide.training  # the imputer restored the modes it found
    keep = mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim())).expand_as(x)
    assert torch.equal(result.imputed[keep], x[keep]) and result.samples.shape == (2, *x.shape)
    assert torch.isfinite(result.imputed).all() and set(result.estimates)


def test_a_run_with_machine_settings_this_machine_lacks_loads_here(tmp_path):
    """device and tensorboard are settings of the machine a run trained on: a run stored with
    ``device="cuda"`` and ``tensorboard=True`` loads on a CPU-only machine without the extra."""
    import json

    recipe = recipes()["vae"]
    config, data = example_data(recipe)
    out = str(tmp_path / "run")
    train(RunSpec("vae", config, tiny_train()), out, data=data)
    stored = json.load(open(os.path.join(out, "config.json")))
    stored["train"].update(device="cuda:1", tensorboard=True)
    json.dump(stored, open(os.path.join(out, "config.json"), "w"))
    trained = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["objective"]
    run = load_run(out, data=data)
    assert run.spec.train.device == "cuda:1" and run.spec.train.tensorboard
    loaded = {f"model.{k}": v for k, v in run.model.state_dict().items()}
    assert all(torch.equal(loaded[k], trained[k]) for k in loaded if torch.is_tensor(loaded[k]))


def test_importing_the_trainer_loads_no_plotting():
    code = "import inference.trainer, sys; assert 'matplotlib' not in sys.modules, 'matplotlib'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_repeat_on_another_number_of_processes_says_so(tmp_path, capsys):
    import json

    recipe = recipes()["vae"]
    config, data = example_data(recipe)
    out = str(tmp_path / "run")
    train(RunSpec("vae", config, tiny_train()), out, data=data)
    stored = json.load(open(os.path.join(out, "config.json")))
    assert stored["world_size"] == 1
    parse_train_args(["--config", out, "--out", str(tmp_path / "again")], "")
    assert "note:" not in capsys.readouterr().err  # the same world: nothing to say
    stored["world_size"] = 2
    json.dump(stored, open(os.path.join(out, "config.json"), "w"))
    parse_train_args(["--config", out, "--out", str(tmp_path / "again")], "")
    err = capsys.readouterr().err
    assert "was trained on 2 process(es), this run uses 1" in err and len(err.strip().splitlines()) == 1
