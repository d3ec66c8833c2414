"""l3rs: specialized learned optimizers (L3RS, arXiv 2408.09310) for fine-tuning pretrained PyTorch models."""

from __future__ import annotations

from typing import Any

from l3rs import bases, functional, mixer
from l3rs.functional import Config
from l3rs.optim import L3RS, CheckpointError
from l3rs.version import __version__

__all__ = ["L3RS", "CheckpointError", "Config", "Task", "TaskFamily", "__version__", "bases", "functional", "mixer",
           "tasks"]


def __getattr__(name: str) -> Any:
    # The task layer pulls in datasets and backbones: import it only when asked for.
    if name in ("Task", "TaskFamily", "tasks"):
        import importlib

        tasks = importlib.import_module("l3rs.tasks")
        return tasks if name == "tasks" else getattr(tasks, name)
    raise AttributeError(f"module 'l3rs' has no attribute {name!r}")
