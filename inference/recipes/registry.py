"""The registry: model names -> :class:`~inference.recipes.recipe.Recipe`. The trainer, the scripts and the
benchmarks read it and contain no per-model branches. Adding a model means its own files plus one
line below: the module that defines its ``RECIPES``."""
from __future__ import annotations

import importlib
from typing import Dict

from .recipe import Recipe

RECIPE_MODULES = (
    "inference.recipes.vae",
    "inference.recipes.kvae",
    "inference.recipes.hrssm",
    "inference.recipes.dmm",
)

_REGISTRY: Dict[str, Recipe] = {}


def recipes() -> Dict[str, Recipe]:
    """Every registered recipe by model name, in registration order."""
    if not _REGISTRY:
        for module in RECIPE_MODULES:
            for recipe in importlib.import_module(module).RECIPES:
                if recipe.name in _REGISTRY:
                    raise ValueError(f"model name {recipe.name!r} registered twice (again by {module})")
                _REGISTRY[recipe.name] = recipe
    return _REGISTRY


def get_recipe(name: str) -> Recipe:
    """The recipe of model ``name``; ``ValueError`` listing the registered names otherwise."""
    registry = recipes()
    if name not in registry:
        raise ValueError(f"model: expected one of {tuple(registry)}, got {name!r}")
    return registry[name]
