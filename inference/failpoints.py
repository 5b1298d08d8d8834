"""Fail points: named places where a test can make the process die as ``kill -9`` would, to check that
every run can be resumed or restarted from wherever it stopped.

``PYRO_MODELS_FAILPOINT=NAME:N`` kills the process (SIGKILL, no clean-up) the N-th time it reaches the
fail point NAME. Fail points: ``step`` (after an optimiser step), ``checkpoint`` (a new checkpoint
written to its temporary file, the previous one not yet moved), ``warm_start`` (after a warm-start step).
Unset, a fail point costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "PYRO_MODELS_FAILPOINT"
POINTS = ("step", "checkpoint", "warm_start")
_counts: Counter = Counter()


def reach(name: str) -> None:
    """Count one visit of fail point ``name``; die there if ``PYRO_MODELS_FAILPOINT`` says so."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target not in POINTS:
        raise ValueError(f"{ENV}: expected NAME:N with NAME one of {POINTS}, got {spec!r}")
    if target != name:
        return
    _counts[name] += 1
    if _counts[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
