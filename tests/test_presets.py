"""Named presets: each recipe's presets parse into a run spec exactly as their flags written out do, a
flag given after a preset wins, and an unknown preset is one line naming the flag."""
import pytest

from inference.cli.command_line import parse_train_args
from inference.recipes.registry import recipes

PRESETS = [(model, name) for model, recipe in recipes().items() for name in recipe.cli.presets]
DATA_DIR = ["--data-dir", "/nonexistent/folder"]  # presets on downloaded data need a folder; never read here


def test_every_model_with_reported_numbers_has_presets():
    assert {model for model, _ in PRESETS} >= {"vae", "dmm", "kvae", "hrssm"}


@pytest.mark.parametrize("model, name", PRESETS)
def test_a_preset_is_the_command_it_stands_for(model, name):
    preset = recipes()[model].cli.presets[name]
    via_preset = parse_train_args([model, "--preset", name, *DATA_DIR, "--out", "runs/x"], "")
    written_out = parse_train_args([model, *preset.flags, *DATA_DIR, "--out", "runs/x"], "")
    assert via_preset.spec.to_json() == written_out.spec.to_json()
    assert via_preset.spec.to_json() != parse_train_args([model, *DATA_DIR, "--out", "runs/x"], "").spec.to_json()
    assert preset.result


def test_flags_after_a_preset_override_it():
    args = parse_train_args(["dmm", "--preset", "jsb-st-r", *DATA_DIR, "--epochs", "7", "--seed", "3", "--out", "runs/x"], "")
    assert args.spec.train.epochs == 7 and args.spec.train.seed == 3 and args.spec.train.lr == 1e-3


def test_an_unknown_preset_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_train_args(["dmm", "--preset", "nope", "--out", "runs/x"], "")
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--preset" in err and "jsb-st-r" in err and "'nope'" in err
