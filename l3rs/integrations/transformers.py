"""Hugging Face `transformers.Trainer` integration.

Two ways to hand the Trainer an L3RS; add `L3RSCallback` in both::

    # 1. build it yourself (untrained, or meta-trained with pretrained=dir)
    opt = l3rs_optimizer(model, lr=1e-4, pretrained="runs/x/best", weight_decay=0.01)
    Trainer(model, args, ..., optimizers=(opt, None), callbacks=[L3RSCallback()])

    # 2. let the Trainer build it (kwargs as for l3rs_optimizer)
    Trainer(model, args, ..., optimizer_cls_and_kwargs=(L3RSFactory, {"lr": 1e-4}), callbacks=[L3RSCallback()])

The Trainer calls a bare ``optimizer.step()``, so `L3RSCallback` feeds the loss through
`L3RS.observe_loss`: it reads ``outputs.loss`` of each training forward pass of the model (what the Trainer
optimizes unless you pass ``compute_loss_func`` or override ``compute_loss``; then call
``observe_loss`` there, or the callback warns). The Trainer also steps an LR scheduler (linear decay by
default) that would scale λ0 on top of the schedule L3RS learned: the callback keeps λ0 constant (and warns
once if the scheduler tried to change it; ``lr_scheduler_type="constant"`` avoids the warning).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sized
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from l3rs.optim import L3RS

__all__ = ["L3RSCallback", "L3RSFactory", "l3rs_optimizer", "param_groups"]


def param_groups(model: torch.nn.Module, weight_decay: float | None = None) -> list[dict[str, Any]]:
    """Named param groups. None: one group at the optimizer's own decay (every tensor, as meta-training
    decays them); a number: that decay on matrices only (not biases or norm weights), as nanoGPT does."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if weight_decay is None:
        return [{"params": named}] if named else []
    decayed = [(n, p) for n, p in named if p.ndim >= 2]
    plain = [(n, p) for n, p in named if p.ndim < 2]
    return [g for g in ({"params": decayed, "weight_decay": weight_decay},
                        {"params": plain, "weight_decay": 0.0}) if g["params"]]


def l3rs_optimizer(model: torch.nn.Module, lr: float | None = None, *, pretrained: str | os.PathLike | None = None,
                   weight_decay: float | None = None, total_steps: int | None = None, **kwargs: Any) -> L3RS:
    """An L3RS for `model`: untrained (lr defaults to 1e-3) or loaded from the optimizer directory `pretrained`
    (lr defaults to the λ0 it was meta-trained with). `kwargs` go to `L3RS` (e.g. state_dtype)."""
    groups = param_groups(model, weight_decay)
    if pretrained is not None:
        return L3RS.from_pretrained(pretrained, groups, total_steps, lr=lr, **kwargs)
    return L3RS(groups, lr=1e-3 if lr is None else lr, total_steps=total_steps, **kwargs)


class L3RSFactory:
    """For ``Trainer(optimizer_cls_and_kwargs=(L3RSFactory, kwargs))``: the Trainer instantiates it and calls it
    with its model and `kwargs` (those of `l3rs_optimizer`), instead of passing unnamed param groups."""

    def __call__(self, model: torch.nn.Module, **kwargs: Any) -> L3RS:
        return l3rs_optimizer(model, **kwargs)


def _unwrap(optimizer: Any) -> L3RS:
    """The L3RS inside accelerate's AcceleratedOptimizer (or itself)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, L3RS):
        raise TypeError(f"L3RSCallback needs the Trainer's optimizer to be an L3RS, got {type(inner).__name__}")
    return inner


def _loss_of(output: Any) -> torch.Tensor | None:
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


class L3RSCallback(TrainerCallback):
    """Feeds each training step's loss to the L3RS and keeps λ0 constant (see the module docstring).

    Also sets ``total_steps`` to the Trainer's ``max_steps`` and ``train_size`` to the training dataset's length
    when the optimizer has none (a meta-trained optimizer steps smaller on a smaller training set).
    """

    def __init__(self) -> None:
        self._hook: Any = None
        self._optimizer: L3RS | None = None
        self._lr0: list[Any] = []
        self._losses_seen = 0
        self._warned: set[str] = set()

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=2)

    def _observe(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        loss = _loss_of(output)
        if module.training and loss is not None and self._optimizer is not None:
            self._optimizer.observe_loss(loss)
            self._losses_seen += 1

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        opt = self._optimizer = _unwrap(optimizer)
        if opt.total_steps is None and state.max_steps > 0:
            opt.total_steps = state.max_steps
        dataset = getattr(kwargs.get("train_dataloader"), "dataset", None)
        if opt.train_size is None and isinstance(dataset, Sized) and len(dataset) > 0:
            opt.train_size = len(dataset)
        # the scheduler was built before this call: "initial_lr" is λ0 before it scaled anything
        self._lr0 = [g.get("initial_lr", g["lr"]) for g in opt.param_groups]
        self._pin_lr0()
        self._hook = model.register_forward_hook(self._observe)

    def _pin_lr0(self) -> None:
        assert self._optimizer is not None
        for group, lr0 in zip(self._optimizer.param_groups, self._lr0, strict=True):
            if group["lr"] != lr0:
                self._warn("scheduler", "L3RS learns its own step-size schedule, but the Trainer's LR scheduler "
                           "changes λ0: L3RSCallback keeps λ0 constant (use lr_scheduler_type='constant' to "
                           "silence this); the Trainer's logged learning_rate is not the step size used")
                group["lr"] = lr0

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self._pin_lr0()
        if self._losses_seen == 0:
            self._warn("loss", "no training loss reached L3RS: the model's outputs carry no .loss (custom "
                       "compute_loss?); its loss features stay frozen. Call optimizer.observe_loss(loss) where "
                       "the loss is computed")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
