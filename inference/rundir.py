"""A run directory: ``config.json``, ``metrics.jsonl`` (one JSON object per epoch), atomically written
checkpoints, and ``figures/``."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, List, Optional

import torch

CONFIG, METRICS, CHECKPOINT = "config.json", "metrics.jsonl", "checkpoint.pt"
# Settings that may differ when a run is resumed (e.g. training it for more epochs).
RESUMABLE_CHANGES = frozenset({"epochs", "resume", "progress", "device"})


def atomic_write_bytes(path: str, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``: readers
    see the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


class RunDir:
    """The folder of one training run.

    A new run refuses a folder that already holds a run (pass ``resume=True`` to continue it). On
    resume the stored config must match the new one except for :data:`RESUMABLE_CHANGES`.
    """

    def __init__(self, path: str, config: Dict[str, Any], resume: bool = False):
        self.path = path
        self.figures = os.path.join(path, "figures")
        self.preflight(path, resume)
        os.makedirs(self.figures, exist_ok=True)
        if resume:
            self._check_same_config(config)
        self.write_json(CONFIG, config)

    @staticmethod
    def preflight(path: str, resume: bool = False) -> None:
        """Raise what creating the run directory ``path`` would raise, before any work starts: a new run
        in a folder holding one, or a resume without a checkpoint."""
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f"path: {path} exists and is not a folder")
        if os.path.exists(os.path.join(path, CONFIG)) and not resume:
            raise FileExistsError(f"path: {path} already holds a run; pass resume=True to continue it or choose another folder")
        if resume and not os.path.exists(os.path.join(path, CHECKPOINT)):
            raise FileNotFoundError(f"resume: no checkpoint at {os.path.join(path, CHECKPOINT)} to continue from")

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.path, CHECKPOINT)

    def figure_path(self, name: str, epoch: Optional[int] = None) -> str:
        suffix = "" if epoch is None else f"_epoch{epoch:03d}"
        return os.path.join(self.figures, f"{name}{suffix}.png")

    def _check_same_config(self, config: Dict[str, Any]) -> None:
        with open(os.path.join(self.path, CONFIG)) as f:
            stored = json.load(f)
        stored, config = _flatten(stored), _flatten(json.loads(json.dumps(config, default=str)))
        changed = {k for k in set(stored) | set(config) if stored.get(k) != config.get(k)}
        changed = {k for k in changed if k.split(".")[-1] not in RESUMABLE_CHANGES}
        if changed:
            details = ", ".join(f"{k}: {stored.get(k)!r} -> {config.get(k)!r}" for k in sorted(changed))
            raise ValueError(f"resume: the config differs from the stored run ({details})")

    def write_json(self, name: str, payload: Dict[str, Any]) -> None:
        text = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
        atomic_write_bytes(os.path.join(self.path, name), lambda f: f.write(text))

    def log_metrics(self, metrics: Dict[str, Any]) -> None:
        with open(os.path.join(self.path, METRICS), "a") as f:
            f.write(json.dumps(metrics, sort_keys=True) + "\n")

    def read_metrics(self) -> List[Dict[str, Any]]:
        path = os.path.join(self.path, METRICS)
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop metric lines after ``last_epoch`` (written after the checkpoint a resume starts from)."""
        kept = [m for m in self.read_metrics() if m.get("epoch", 0) <= last_epoch]
        text = "".join(json.dumps(m, sort_keys=True) + "\n" for m in kept).encode()
        atomic_write_bytes(os.path.join(self.path, METRICS), lambda f: f.write(text))

    def save_checkpoint(self, state: Dict[str, Any]) -> None:
        atomic_write_bytes(self.checkpoint_path, lambda f: torch.save(state, f))

    def load_checkpoint(self, map_location=None) -> Dict[str, Any]:
        return torch.load(self.checkpoint_path, map_location=map_location, weights_only=False)
