"""The command line of ``scripts/train.py``, generated from the registry: one sub-command per model,
whose flags are the fields of its data config, model config, recipe options and ``TrainConfig`` (with
the model's training defaults). A flag of another model is an error naming it; library errors are
printed as one line naming the flag (``--debug`` or ``PYRO_MODELS_DEBUG=1`` for the traceback)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import fields
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence

from .flags import OneLineParser, add_dataclass_flags, build_config, flag, flag_error, given, unknown_flag_error
from ..training import distributed
from ..runs.experiment import WORLD_SIZE_KEY, RunSpec
from ..recipes.recipe import Recipe
from ..recipes.registry import recipes
from ..training import Interrupted, RunStorageError, TrainConfig, TrainingDiverged

DEBUG_ENV = "PYRO_MODELS_DEBUG"
CONFIG_FLAG = "--config"
PRESET_FLAG = "--preset"
REPEAT_SUFFIX = "-repeat"  # --config without --out: the stored run's folder with this suffix
GROUPS = (("data", "data"), ("config", "model"), ("options", "recipe options"), ("train", "training"))
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 1, 130


class TrainArgs(NamedTuple):
    spec: RunSpec
    out: str
    resume: bool


def _defaults(recipe: Recipe, stored: Optional[RunSpec] = None) -> Dict[str, object]:
    """The default instance of each flag group of ``recipe``, or the groups of a ``stored`` run."""
    if stored is not None:
        return {"data": stored.data if stored.data is not None else recipe.data.config, "config": stored.config,
                "options": stored.options, "train": stored.train}
    return {"data": recipe.data.config, "config": recipe.config(), "options": recipe.options(),
            "train": recipe.training.defaults}


def model_parser(recipe: Recipe, prog: Optional[str] = None, stored: Optional[RunSpec] = None) -> argparse.ArgumentParser:
    """The parser of ``train.py MODEL``: every field of the recipe's configs as a flag (defaults: the
    recipe's, or those of a ``stored`` run for ``--config``)."""
    p = OneLineParser(prog=prog, description=f"{recipe.name}: {recipe.summary}",
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = _defaults(recipe, stored)
    for prefix, title in GROUPS:
        skip = recipe.cli.unused_fields if prefix == "config" else ()
        add_dataclass_flags(p.add_argument_group(title), type(defaults[prefix]), defaults[prefix], prefix + ".", skip)
    if recipe.cli.shortcuts:
        group = p.add_argument_group("shortcuts (set several model fields at once; explicit flags win)")
        for name, (targets, text) in recipe.cli.shortcuts.items():
            group.add_argument(flag(name), dest="shortcut." + name, type=int, metavar=name.upper(), default=argparse.SUPPRESS, help=text)
    if recipe.cli.presets:
        lines = "; ".join(f"{name}: {' '.join(preset.flags)} ({preset.result})" for name, preset in recipe.cli.presets.items())
        p.add_argument(PRESET_FLAG, choices=tuple(recipe.cli.presets), default=None,
                       help=f"start from a named recipe behind a reported number; flags given after it override it. {lines}")
    run = p.add_argument_group("run")
    run.add_argument("--out", required=stored is None, default=argparse.SUPPRESS if stored is None else None,
                     help="the run directory" + ("" if stored is None else " (default: the stored run's folder + '-repeat')"))
    run.add_argument(CONFIG_FLAG, metavar="RUN/config.json", default=None,
                     help="repeat a stored run: its config.json gives every default, flags override")
    run.add_argument("--resume", action="store_true",
                     help="continue the run stored in --out; its config.json gives every default (lr, clip-norm, epochs may change)")
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
                      usage="train.py MODEL [flags]  (train.py MODEL --help for its flags)\n       train.py --config RUN/config.json [--out NEW] [flags]  (repeat a stored run)")
    lines = "\n".join(f"  {name:10s} {recipe.summary}" for name, recipe in recipes().items())
    p.add_argument("model", choices=tuple(recipes()), metavar="MODEL", help="the model to train (listed below)")
    p.epilog = "models:\n" + lines
    return p


def _fail(parser: argparse.ArgumentParser, message: str) -> None:
    parser.exit(EXIT_USAGE, f"error: {message}\n")


def _spec(recipe: Recipe, namespace: argparse.Namespace, parser: argparse.ArgumentParser,
          stored: Optional[RunSpec] = None) -> RunSpec:
    built, all_defaults = {}, _defaults(recipe, stored)
    for prefix, _ in GROUPS:
        defaults = all_defaults[prefix]
        values = given(namespace, prefix + ".")
        if prefix == "config":
            for name, value in given(namespace, "shortcut.").items():
                for target in recipe.cli.shortcuts[name][0]:
                    values.setdefault(target, value)
        try:
            built[prefix] = build_config(type(defaults), defaults, values)
        except (ValueError, TypeError) as error:
            _fail(parser, flag_error(error, [f.name for f in fields(type(defaults))]))
    try:
        return RunSpec(recipe.name, built["config"], built["train"], built["data"], built["options"])
    except ValueError as error:
        _fail(parser, flag_error(error, all_field_names()))


def _flag_value(argv: Sequence[str], flag: str) -> Optional[str]:
    """The value of ``FLAG VALUE`` / ``FLAG=VALUE`` in ``argv`` (None when absent)."""
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1] if i + 1 < len(argv) else ""
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _config_path(argv: Sequence[str]) -> Optional[str]:
    """Where the defaults come from: ``--config PATH``, or with ``--resume`` the stored run in ``--out``
    (so ``train.py MODEL --resume --out RUN`` needs none of the run's flags again); None otherwise."""
    path = _flag_value(argv, CONFIG_FLAG)
    if path is not None or "--resume" not in argv:
        return path
    out = _flag_value(argv, "--out")
    stored = os.path.join(out, "config.json") if out else None
    return stored if stored and os.path.isfile(stored) else None


def _stored_spec(path: str, parser: argparse.ArgumentParser) -> RunSpec:
    """The run stored in ``path`` (a run's ``config.json``, or its folder); one line when it cannot be read."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            return RunSpec.from_json(json.load(f))
    except FileNotFoundError:
        _fail(parser, f"{CONFIG_FLAG}: no such file {os.path.abspath(path)} (expected a run's config.json)")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        _fail(parser, f"{CONFIG_FLAG}: {path} is not a run's config.json ({flag_error(error, all_field_names())})")


def _note_world_size(config_path: str) -> None:
    """One line on stderr when the stored run was trained on another number of processes than this one."""
    try:
        with open(config_path) as f:
            stored = int(json.load(f).get(WORLD_SIZE_KEY, 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return
    here = distributed.current_world().size
    if stored != here and distributed.main_process():
        print(f"note: {config_path} was trained on {stored} process(es), this run uses {here}: the global batch "
              f"of a step ({stored} x --batch-size) and the random draws differ, so the numbers will too",
              file=sys.stderr)


def _repeat_args(argv: List[str], path: str, top: argparse.ArgumentParser) -> TrainArgs:
    """``train.py [MODEL] --config RUN/config.json [--out NEW] [flags]``: the stored run, flags overriding."""
    stored = _stored_spec(path, top)
    if argv and not argv[0].startswith("-"):
        if argv[0] != stored.model:
            _fail(top, f"model: {path} is a {stored.model} run, got {argv[0]!r}")
        argv = argv[1:]
    recipe = recipes()[stored.model]
    parser = model_parser(recipe, prog=f"train.py {recipe.name} --config {path}", stored=stored)
    namespace, unknown = parser.parse_known_args(with_preset(recipe, argv, parser))
    if unknown:
        _fail(parser, unknown_flag_error(unknown, recipe.name, flag_owners()))
    run_folder = os.path.dirname(os.path.abspath(path)) if not os.path.isdir(path) else os.path.abspath(path)
    _note_world_size(os.path.join(run_folder, "config.json"))
    out = namespace.out if namespace.out is not None else run_folder.rstrip(os.sep) + REPEAT_SUFFIX  # --resume has --out
    return TrainArgs(_spec(recipe, namespace, parser, stored), out, namespace.resume)


def with_preset(recipe: Recipe, argv: List[str], parser: argparse.ArgumentParser) -> List[str]:
    """``argv`` with the flags of its ``--preset NAME`` put first, so that every flag given wins."""
    name = _flag_value(argv, PRESET_FLAG)
    if name is None or not recipe.cli.presets:  # a model without presets: --preset is another model's flag
        return argv
    if name not in recipe.cli.presets:
        _fail(parser, f"{PRESET_FLAG}: expected one of the presets of {recipe.name} ({', '.join(recipe.cli.presets)}), got {name!r}")
    return list(recipe.cli.presets[name].flags) + argv


def parse_train_args(argv: Optional[Sequence[str]], doc: str) -> TrainArgs:
    """Parse ``train.py MODEL [flags]`` (or ``train.py --config RUN/config.json [flags]``, which repeats a
    stored run) into a :class:`TrainArgs`; exits with one line on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = top_parser(doc)
    config_path = _config_path(argv)
    if config_path is not None and not any(a in ("-h", "--help") for a in argv[:1]):
        return _repeat_args(argv, config_path, top)
    if not argv or argv[0].startswith("-"):
        if any(a in ("-h", "--help") for a in argv[:1]) or not argv:
            top.print_help()
            top.exit(0 if argv else EXIT_USAGE)
        _fail(top, f"the first argument is the model, one of {tuple(recipes())}; got {argv[0]!r}")
    if argv[0] not in recipes():
        _fail(top, f"model: expected one of {tuple(recipes())}, got {argv[0]!r}")
    recipe = recipes()[argv[0]]
    parser = model_parser(recipe, prog=f"train.py {recipe.name}")
    namespace, unknown = parser.parse_known_args(with_preset(recipe, argv[1:], parser))
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
    except USER_ERRORS + (RunStorageError,) as error:
        if debug:
            raise
        print(f"error: {translate(error, renames)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # the file system: no space, read-only, ... (one line naming the path)
        if debug:
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        if debug:
            raise
        print("error: out of memory: lower the sizes (widths, --batch-size, the number of examples or frames) or free "
              "memory; the run folder keeps its last checkpoint", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as error:
        if debug:
            raise
        print(f"error: {error if isinstance(error, Interrupted) else 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED


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
