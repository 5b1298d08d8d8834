"""How the models of this library register their networks with Pyro."""
from __future__ import annotations

import pyro
import torch


def register(name: str, module: torch.nn.Module) -> None:
    """``pyro.module(name, module)``, except under Pyro's ``module_local_params`` setting, where parameters
    stay in their modules and whoever optimises them takes ``module.parameters()`` (Pyro's ELBO-as-module
    route, ``Trace_ELBO()(model, guide)``, which this library's trainer takes). Under plain ``pyro.infer.SVI``
    the modules are registered in the param store as usual."""
    if not pyro.settings.get("module_local_params"):
        pyro.module(name, module)
