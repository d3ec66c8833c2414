"""Fine-tuning tasks for meta-training and evaluating learned optimizers.

`get(name)` returns a Task (pretrained model factory + in-memory data splits), `family(name)` a
TaskFamily to sample tasks from during meta-training, `names()` lists the built-ins (see
`l3rs.tasks.builtin` for what each one is, including the shifted "unseen dataset" variants), and any
spec may also be "package.module:function" returning a Task or TaskFamily.
"""

from .core import (
    Task,
    TaskError,
    TaskFamily,
    UnknownTaskError,
    accuracy,
    functional_model,
    init_head,
    model_device,
)
from .pretraining import cache_dir, pretrain, pretrained_model
from .registry import describe, family, get, names, register, resolve

__all__ = [
    "Task",
    "TaskError",
    "TaskFamily",
    "UnknownTaskError",
    "accuracy",
    "cache_dir",
    "describe",
    "family",
    "functional_model",
    "get",
    "init_head",
    "model_device",
    "names",
    "pretrain",
    "pretrained_model",
    "register",
    "resolve",
]
