"""One fine-tuning run of a task with any optimizer: the loop shared by ES meta-training and evaluation.

    result = finetune(task, make_optimizer, steps=200, seed=0, eval_every=20)

`make_optimizer(named_parameters, total_steps)` returns a torch optimizer, or (optimizer, lr_scheduler).
L3RS gets the loss through ``step(loss=...)``; other optimizers step plainly. `on_step(step, optimizer)`, if
given, is called after every optimizer (and scheduler) step, e.g. to record what the optimizer did.
Optimizers that evaluate other weights than they train (schedule-free, iterate averaging) expose `train()` /
`eval()`: the loop calls `eval()` right before every evaluation and `train()` right after it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from l3rs.optim import L3RS

MakeOptimizer = Callable[[Any, int], Any]
OnStep = Callable[[int, Any], None]


@dataclass
class RunResult:
    """Curves and final numbers of one run (val_* curves are sampled at `eval_steps`)."""

    seed: int = 0
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_metric: list[float] = field(default_factory=list)
    test_metric: float | None = None
    seconds: float = 0.0
    diverged: bool = False

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1] if self.val_loss else math.inf

    @property
    def final_val_metric(self) -> float:
        return self.val_metric[-1] if self.val_metric else 0.0


def _evaluate(task: Any, model: torch.nn.Module, split: str) -> tuple[float, float]:
    out = task.evaluate(model, split=split)
    loss = out["loss"]
    return (loss if math.isfinite(loss) else math.inf), out["metric"]


def finetune(
    task: Any,
    make_optimizer: MakeOptimizer,
    steps: int,
    seed: int = 0,
    *,
    eval_every: int | None = None,
    test: bool = False,
    device: torch.device | str | None = None,
    model: torch.nn.Module | None = None,
    on_step: OnStep | None = None,
) -> RunResult:
    """Fine-tune `task.model_fn(seed)` for `steps` steps on batches seeded by `seed`.

    Validation is measured every `eval_every` steps (and always at the end); a non-finite training loss
    stops the run and marks it diverged (final validation loss = inf).
    """
    start = time.perf_counter()
    model = task.model_fn(seed) if model is None else model
    if device is not None:
        model = model.to(device)
    dev = next(model.parameters()).device
    model.train()
    made = make_optimizer(model.named_parameters(), steps)
    opt, sched = made if isinstance(made, tuple) else (made, None)
    _switch(opt, "train")
    res = RunResult(seed=seed)
    for step, (x, y) in enumerate(task.batches(seed, steps), start=1):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model(x), y)
        loss.backward()
        value = float(loss.detach())
        res.train_loss.append(value)
        if not math.isfinite(value):
            res.diverged = True
            break
        if isinstance(opt, L3RS):
            opt.step(loss=loss.detach())
        else:
            opt.step()
        if sched is not None:
            sched.step()
        if on_step is not None:
            on_step(step, opt)
        if eval_every and step % eval_every == 0 and step != steps:
            _switch(opt, "eval")
            _record(task, model, res, step)
            _switch(opt, "train")
    if res.diverged:
        res.eval_steps.append(len(res.train_loss))
        res.val_loss.append(math.inf)
        res.val_metric.append(0.0)
    else:
        _switch(opt, "eval")  # the run is over: its result is the evaluated weights
        _record(task, model, res, steps)
        if test and task.test is not None:
            res.test_metric = task.evaluate(model, split="test")["metric"]
    res.seconds = time.perf_counter() - start
    return res


def _switch(opt: Any, mode: str) -> None:
    """Call `opt.train()` / `opt.eval()` where the optimizer has them (plain torch optimizers do not)."""
    switch = getattr(opt, mode, None)
    if callable(switch):
        switch()


def _record(task: Any, model: torch.nn.Module, res: RunResult, step: int) -> None:
    loss, metric = _evaluate(task, model, "val")
    res.eval_steps.append(step)
    res.val_loss.append(loss)
    res.val_metric.append(metric)
