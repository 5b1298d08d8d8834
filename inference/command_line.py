"""The command line of ``scripts/train.py``, generated from the registry: one sub-command per model,
whose flags are the fields of its data config, model config, recipe options and ``TrainConfig`` (with
the model's training defaults). A flag of another model is an error naming it; library errors are
printed as one line naming the flag (``--debug`` or ``PYRO_MODELS_DEBUG=1`` for the traceback)."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from dataclasses import fields
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence

from .cli import OneLineParser, add_dataclass_flags, build_config, flag, flag_error, given, unknown_flag_error
from .experiment import RunSpec
from .recipe import Recipe
from .registry import recipes
from .trainer import TrainConfig, TrainingDiverged

DEBUG_ENV = "PYRO_MODELS_DEBUG"
GROUPS = (("data", "data"), ("config", "model"), ("options", "recipe options"), ("train", "training"))
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
EXIT_USAGE, EXIT_DIVERGED = 2, 1


class TrainArgs(NamedTuple):
    spec: RunSpec
    out: str
    resume: bool


def _defaults(recipe: Recipe) -> Dict[str, object]:
    """The default instance of each flag group of ``recipe``."""
    return {"data": recipe.data_config, "config": recipe.config(), "options": recipe.options(),
            "train": recipe.train_defaults}


def model_parser(recipe: Recipe, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of ``train.py MODEL``: every field of the recipe's configs as a flag."""
    p = OneLineParser(prog=prog, description=f"{recipe.name}: {recipe.summary}",
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = _defaults(recipe)
    for prefix, title in GROUPS:
        add_dataclass_flags(p.add_argument_group(title), type(defaults[prefix]), defaults[prefix], prefix + ".")
    if recipe.shortcuts:
        group = p.add_argument_group("shortcuts (set several model fields at once; explicit flags win)")
        for name, (targets, text) in recipe.shortcuts.items():
            group.add_argument(flag(name), dest="shortcut." + name, type=int, default=argparse.SUPPRESS, help=text)
    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, help="the run directory")
    run.add_argument("--resume", action="store_true", help="continue the run stored in --out (lr, clip-norm, epochs may change)")
    run.add_argument("--debug", action="store_true", help=f"show tracebacks (or set {DEBUG_ENV}=1)")
    return p


def flag_owners() -> Dict[str, List[str]]:
    """Every flag of every model -> the models that have it."""
    owners: Dict[str, List[str]] = {}
    for name, recipe in recipes().items():
        for action in model_parser(recipe)._actions:
            for option in action.option_strings:
                owners.setdefault(option, []).append(name)
    return owners


def top_parser(doc: str) -> argparse.ArgumentParser:
    p = OneLineParser(prog="train.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                      usage="train.py MODEL [flags]  (train.py MODEL --help for its flags)")
    lines = "\n".join(f"  {name:10s} {recipe.summary}" for name, recipe in recipes().items())
    p.add_argument("model", choices=tuple(recipes()), metavar="MODEL", help="the model to train (listed below)")
    p.epilog = "models:\n" + lines
    return p


def _fail(parser: argparse.ArgumentParser, message: str) -> None:
    parser.exit(EXIT_USAGE, f"error: {message}\n")


def _spec(recipe: Recipe, namespace: argparse.Namespace, parser: argparse.ArgumentParser) -> RunSpec:
    built, all_defaults = {}, _defaults(recipe)
    for prefix, _ in GROUPS:
        defaults = all_defaults[prefix]
        values = given(namespace, prefix + ".")
        if prefix == "config":
            for name, value in given(namespace, "shortcut.").items():
                for target in recipe.shortcuts[name][0]:
                    values.setdefault(target, value)
        try:
            built[prefix] = build_config(type(defaults), defaults, values)
        except (ValueError, TypeError) as error:
            _fail(parser, flag_error(error, [f.name for f in fields(type(defaults))]))
    try:
        return RunSpec(recipe.name, built["config"], built["train"], built["data"], built["options"])
    except ValueError as error:
        _fail(parser, flag_error(error, all_field_names()))


def parse_train_args(argv: Optional[Sequence[str]], doc: str) -> TrainArgs:
    """Parse ``train.py MODEL [flags]`` into a :class:`TrainArgs`; exits with one line on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = top_parser(doc)
    if not argv or argv[0].startswith("-"):
        if any(a in ("-h", "--help") for a in argv[:1]) or not argv:
            top.print_help()
            top.exit(0 if argv else EXIT_USAGE)
        _fail(top, f"the first argument is the model, one of {tuple(recipes())}; got {argv[0]!r}")
    if argv[0] not in recipes():
        _fail(top, f"model: expected one of {tuple(recipes())}, got {argv[0]!r}")
    recipe = recipes()[argv[0]]
    parser = model_parser(recipe, prog=f"train.py {recipe.name}")
    namespace, unknown = parser.parse_known_args(argv[1:])
    if unknown:
        _fail(parser, unknown_flag_error(unknown, recipe.name, flag_owners()))
    return TrainArgs(_spec(recipe, namespace, parser), namespace.out, namespace.resume)


def all_field_names() -> List[str]:
    """Every config field name of every registered model (for translating library errors)."""
    names = {f.name for f in fields(TrainConfig)}
    for recipe in recipes().values():
        for defaults in _defaults(recipe).values():
            names.update(f.name for f in fields(type(defaults)))
    return sorted(names)


def main_guard(main: Callable[..., int], argv=None, renames: Optional[Mapping[str, str]] = None) -> int:
    """Run ``main(argv)``; a library error becomes one line on stderr naming the flag, and exit code 2
    (1 when training diverged). ``renames``: Python argument names whose flag is not ``--name``
    (e.g. ``{"path": "--out"}``). Tracebacks with ``--debug`` or ``PYRO_MODELS_DEBUG=1``."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    renames = {"path": "--out", "resume": "--resume", "resume=True": "--resume", **(renames or {})}
    try:
        return main(argv)
    except TrainingDiverged as error:
        if debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"error: {translate(error, renames)}", file=sys.stderr)
        return EXIT_USAGE


def translate(error: Exception, renames: Mapping[str, str]) -> str:
    """A library error's message with Python argument names turned into flags."""
    message = flag_error(error, all_field_names())
    head, sep, rest = message.partition(": ")
    if sep and head in renames:
        message = renames[head] + sep + rest
    for python, cli in renames.items():
        if "=" in python:
            message = message.replace(python, cli)
    return " ".join(message.split())
