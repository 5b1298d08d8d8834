"""Command-line flags generated from config dataclasses.

Every field of a config dataclass becomes a flag ``--field-name`` with its type, its default (shown in
``--help``) and its help text: the field's trailing ``# comment`` in the class source (or the comment
lines right above it). Choices come from ``field(metadata={"choices": ...})``; booleans get
``--name/--no-name``; tuples of ints are comma-separated. Values are parsed into the dataclass, whose own
validation then runs; its ``ValueError`` names a Python argument, which :func:`flag_error` translates
into the flag.
"""
from __future__ import annotations

import argparse
import inspect
import re
import typing
from dataclasses import fields, replace
from functools import lru_cache
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s?(.*))?$")
COMMENT_LINE = re.compile(r"^\s+#\s?(.*)$")
NONE_WORDS = ("none", "None", "")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The scripts' help: the module docstring as written, and every flag's default."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``error: MESSAGE; see PROG --help``, and which
    takes no abbreviated flags (an abbreviation of one model's flag could be another model's flag)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def flag(name: str) -> str:
    """``field_name`` -> ``--field-name``."""
    return "--" + name.replace("_", "-")


@lru_cache(maxsize=None)
def field_help(cls) -> Dict[str, str]:
    """Help text of each field of ``cls``: its trailing comment, or the comment lines above it."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    helps: Dict[str, str] = {}
    pending: List[str] = []
    for line in lines:
        comment = COMMENT_LINE.match(line)
        if comment:
            pending.append(comment.group(1).strip())
            continue
        match = FIELD_LINE.match(line)
        if match and match.group(1) not in helps and "(" not in line.split(":")[0]:
            text = (match.group(2) or "").strip() or " ".join(pending)
            if text:
                helps[match.group(1)] = text
        pending = []
    return helps


INT_RANGE = (-(2**63), 2**63)  # what a torch or NumPy integer holds; a flag outside it is refused at parse time


def _int64(text: str) -> int:
    """An integer that fits in 64 bits."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not INT_RANGE[0] <= value < INT_RANGE[1]:
        raise argparse.ArgumentTypeError(f"expected an integer of at most 64 bits, got {text}")
    return value


_int64.__name__ = "int"  # argparse names the type in its messages


def _int_tuple(text: str) -> Tuple[int, ...]:
    """Comma-separated integers of at most 64 bits; an empty text is the empty tuple (the config says
    whether it may be)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return tuple(_int64(p) for p in parts)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers of at most 64 bits, got {text!r}") from None


def _optional(parse):
    def parse_optional(text: str):
        return None if text in NONE_WORDS else parse(text)
    parse_optional.__name__ = getattr(parse, "__name__", "value")
    return parse_optional


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _parser_for(annotation) -> Tuple[Any, bool]:
    """The argparse ``type`` of a field annotation, and whether it is a boolean flag."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        parse, is_bool = _parser_for(inner)
        return _optional(parse), is_bool
    if annotation is bool:
        return None, True
    if annotation is int:
        return _int64, False
    if annotation is float:
        return _finite_float, False
    if origin in (tuple, Tuple):
        return _int_tuple, False
    return str, False


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def add_dataclass_flags(parser: argparse._ActionsContainer, cls, defaults, dest_prefix: str,
                        skip: Sequence[str] = ()) -> List[str]:
    """Add one flag per field of ``cls`` but those in ``skip`` (defaults from the instance ``defaults``) to
    ``parser``; each flag stores into ``dest_prefix + field``. Returns the field names."""
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    names = []
    for f in fields(cls):
        if f.name in skip:
            continue
        parse, is_bool = _parser_for(hints[f.name])
        default = getattr(defaults, f.name)
        text = helps.get(f.name, f.name.replace("_", " "))
        kwargs: Dict[str, Any] = dict(dest=dest_prefix + f.name, default=argparse.SUPPRESS,
                                      help=f"{text} (default: {_show(default)})".replace("%", "%%"))  # argparse formats help with %
        if is_bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=parse, metavar=f.name.upper())
            if "choices" in f.metadata:
                kwargs.update(choices=tuple(f.metadata["choices"]), metavar=None)
        parser.add_argument(flag(f.name), **kwargs)
        names.append(f.name)
    return names


def given(namespace: argparse.Namespace, dest_prefix: str) -> Dict[str, Any]:
    """The values of the flags stored under ``dest_prefix`` that were given on the command line."""
    return {k[len(dest_prefix):]: v for k, v in vars(namespace).items() if k.startswith(dest_prefix)}


def build_config(cls, defaults, values: Mapping[str, Any]):
    """``defaults`` (an instance of ``cls``) with ``values`` replaced; runs the dataclass's validation."""
    return replace(defaults, **values)


def flag_error(error: Exception, names: Iterable[str]) -> str:
    """A library error message with its leading Python argument names (``lr: ...``, ``a, b: ...``)
    turned into flags (``--lr: ...``) where they are among ``names``."""
    message = str(error)
    head, sep, rest = message.partition(": ")
    words = [w.strip() for w in head.split(",")]
    known = set(names)
    if sep and words and all(w in known for w in words):
        return ", ".join(flag(w) for w in words) + ": " + rest
    return message


def unknown_flag_error(unknown: Sequence[str], model: str, owners: Mapping[str, Sequence[str]]) -> str:
    """One line for the first unknown argument: a flag of other models, or no flag at all."""
    word = unknown[0]
    name = word.split("=", 1)[0]
    if name in owners:
        return f"{name} does not apply to {model} (it is a flag of {', '.join(owners[name])}); see train.py {model} --help"
    if name.startswith("-"):
        return f"{name} is not a flag of train.py {model}; see train.py {model} --help"
    return f"unexpected argument {word!r}; see train.py {model} --help"
