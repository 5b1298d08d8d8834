"""Module modes: a context that switches modules to eval mode and restores the modes it found."""
from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def eval_mode(*modules):
    """Run the body with every ``nn.Module`` of ``modules`` in eval mode (non-modules are ignored); each
    module's own mode is restored afterwards, also when the body raises."""
    modules = [m for m in modules if isinstance(m, nn.Module)]
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
