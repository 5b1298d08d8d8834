"""Fail points: named places where a test can make the process die as ``kill -9`` would, to check that
every run can be resumed or restarted from wherever it stopped.

``PYRO_MODELS_FAILPOINT=NAME:N[:ACTION]`` acts the N-th time the process reaches the fail point NAME:
``kill`` (the default: SIGKILL, no clean-up), ``stop`` (SIGSTOP: the process halts, holding what it holds,
until a test continues or kills it) or ``interrupt`` (SIGINT, as Ctrl-C). Fail points: ``step`` (after an optimiser step), ``checkpoint`` (a new checkpoint
written to its temporary file, the previous one not yet moved), ``warm_start`` (after a warm-start step).
Unset, a fail point costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "PYRO_MODELS_FAILPOINT"
POINTS = ("step", "checkpoint", "warm_start")
ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "interrupt": signal.SIGINT}
_counts: Counter = Counter()


def reach(name: str) -> None:
    """Count one visit of fail point ``name``; die there if ``PYRO_MODELS_FAILPOINT`` says so."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, rest = spec.partition(":")
    count, _, action = rest.partition(":")
    if target not in POINTS or (action or "kill") not in ACTIONS:
        raise ValueError(f"{ENV}: expected NAME:N[:ACTION] with NAME one of {POINTS} and ACTION one of "
                         f"{tuple(ACTIONS)}, got {spec!r}")
    if target != name:
        return
    _counts[name] += 1
    if _counts[name] == int(count or 1):
        os.kill(os.getpid(), ACTIONS[action or "kill"])
