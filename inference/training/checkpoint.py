"""What a checkpoint holds and how a trainer is restored from one: the weights (the objective module's
state and the ``pyro.param`` sites), the optimiser and its schedule, the callbacks' states by name, the
epoch order's generator, every random state (per rank in a parallel run) and the world size."""
from __future__ import annotations

import random
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Dict

import numpy as np
import pyro
import torch

from . import distributed

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Trainer

FORMAT = 2  # 1: the modules' states as a list and the whole param store (read by load_weights)


def rng_state() -> Dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def load_weights(model: torch.nn.Module, guide, state: Dict[str, Any]) -> None:
    """The trained weights of a checkpoint (or ``best.pt``) into ``model`` and ``guide``, whichever format
    wrote it: the objective module's ``model.``/``guide.`` entries, or the older list of module states. A
    run trained with Polyak averaging (``ema_decay``) gives its averaged weights, those its scores used."""
    state = state.get("averaged", state)
    if "objective" in state:
        for prefix, module in (("model.", model), ("guide.", guide)):
            if isinstance(module, torch.nn.Module):
                module.load_state_dict({k[len(prefix):]: v for k, v in state["objective"].items() if k.startswith(prefix)})
        return
    for module, module_state in zip([m for m in (model, guide) if isinstance(m, torch.nn.Module)], state["modules"]):
        module.load_state_dict(module_state)


class Checkpointer:
    """Assembles a :class:`~inference.training.loop.Trainer`'s checkpoint and restores one into it."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer

    def state(self) -> Dict[str, Any]:
        """The checkpoint of the epoch just finished (in a parallel run a collective call on every rank)."""
        t = self.trainer
        return {"format": FORMAT, "epoch": t.epoch, **t.svi.weights(),
                "optimizer": t.svi.optimizer.state_dict(), "scheduler": t.svi.scheduler.state_dict(),
                "callbacks": t.callbacks.state_dict(), "generator": t.generator.get_state(), "rng": rng_state(),
                "config": asdict(t.config), "best_valid_elbo": t.best, "world_size": t.world.size,
                **t.svi.averaging_state(), **self._rank_states()}

    def best(self, epoch: int, valid_elbo: float) -> Dict[str, Any]:
        """``best.pt``: the weights of the epoch with the best validation ELBO (its averages with
        ``ema_decay``: the weights the score was computed with)."""
        return {"format": FORMAT, "epoch": epoch, "valid_elbo": valid_elbo, **self.trainer.svi.averaged_weights()}

    def _rank_states(self) -> Dict[str, Any]:
        t = self.trainer
        if not t.world.parallel:
            return {}
        mine = {"rng": rng_state(), "transform_generator": t.transform_generator.get_state()}
        return {"ranks": distributed.gather_objects(mine, t.world)}

    def restore(self, state: Dict[str, Any]) -> None:
        """Continue from ``state``: weights in place, optimiser, the learning rate of its epoch under this
        config, callbacks, generators and random states (draw for draw on the same number of ranks)."""
        t = self.trainer
        if "objective" in state:
            t.svi.load_weights(state)
        else:  # format 1
            load_weights(t.model, t.guide, state)
            with torch.no_grad():
                for name, value in t.svi.store_params.items():
                    value.copy_(state["param_store"]["params"][name])
        t.svi.load_averaging_state(state)
        t.svi.optimizer.load_state_dict(state["optimizer"])
        t.svi.scheduler.load_state_dict(state["scheduler"])
        t.svi.apply_learning_rate(state["epoch"])
        t.callbacks.load_state_dict(state["callbacks"])
        t.generator.set_state(state["generator"])
        t.epoch, t.best = state["epoch"], state.get("best_valid_elbo")
        self._restore_random(state)

    def _restore_random(self, state: Dict[str, Any]) -> None:
        t = self.trainer
        if not t.world.parallel:
            set_rng_state(state["rng"])
        elif state.get("world_size") == t.world.size:
            set_rng_state(state["ranks"][t.world.rank]["rng"])
            t.transform_generator.set_state(state["ranks"][t.world.rank]["transform_generator"])
        else:  # another number of ranks: a fresh, deterministic stream per rank and epoch (not draw-for-draw)
            seed = distributed.rank_seed(t.config.seed, t.world) + t.world.size * t.epoch
            pyro.set_rng_seed(seed)
            t.transform_generator.manual_seed(seed)
