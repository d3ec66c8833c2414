"""What a saved optimizer does over one run: its step size λ and base mix μ per tensor, step by step."""

from __future__ import annotations

import os
from typing import Any

from l3rs.finetune import finetune
from l3rs.optim import L3RS
from l3rs.results import EVAL_SEED, Trace


class CoefficientRecorder:
    """A `finetune` step callback: records `opt.coefficients()` at step 1, every `every` steps and the last."""

    def __init__(self, every: int, total: int) -> None:
        self.every, self.total = every, total
        self.steps: list[int] = []
        self.lr: list[list[float]] = []
        self.mix: list[list[list[float]]] = []

    def __call__(self, step: int, opt: L3RS) -> None:
        if step == 1 or step % self.every == 0 or step == self.total:
            coefficients = opt.coefficients()
            self.steps.append(step)
            self.lr.append([c["lr"] for c in coefficients.values()])
            self.mix.append([list(c["mix"].values()) for c in coefficients.values()])


def trace(optimizer_dir: str | os.PathLike, task: Any, steps: int, every: int | None = None,
          seed: int = EVAL_SEED, device: Any = None) -> Trace:
    """Fine-tune `task` with the saved optimizer for `steps` steps, recording its coefficients: what each
    tensor's step size and base mix were, and when (the data behind the λ heatmap and the μ plots)."""
    recorder = CoefficientRecorder(every or max(1, steps // 50), steps)
    made: list[L3RS] = []

    def make(named: Any, total_steps: int) -> L3RS:
        made.append(L3RS.from_pretrained(optimizer_dir, named, total_steps=total_steps,
                                         train_size=task.train_size))
        return made[0]

    run = finetune(task, make, steps, seed, device=device, on_step=recorder)
    return Trace(task=task.name, horizon=steps, seed=seed, names=made[0].param_names,
                 bases=list(made[0].config.bases), steps=recorder.steps, lr=recorder.lr, mix=recorder.mix,
                 diverged=run.diverged, final_val_loss=run.final_val_loss)
