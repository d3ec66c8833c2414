"""PyTorch Lightning integration.

Return an L3RS from ``configure_optimizers`` (``L3RS(self.named_parameters(), ...)``). Under the default
precision and ``bf16-mixed`` Lightning calls ``step(closure)`` and the closure's loss feeds the features.
Where it does not (``16-mixed``: the GradScaler calls a bare ``step()`` after running the closure itself;
manual optimization), add `L3RSCallback`: it hands every training loss to `L3RS.observe_loss` just before
backward. It also logs the mean learned λ per param group as ``l3rs/lr-<optimizer>-<group>``
(``LearningRateMonitor`` shows group "lr", which for L3RS is λ0, the scale the learned schedule multiplies).
An L3RS with averaged weights (``average`` > 0) needs the callback too: it validates the averaged weights
(`L3RS.eval` when validation starts, `L3RS.train` when it ends); call ``eval()`` yourself before testing or
saving the model after training.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from torch import Tensor

from l3rs.optim import L3RS

__all__ = ["L3RSCallback"]


def _l3rs_optimizers(trainer: pl.Trainer) -> list[tuple[int, L3RS]]:
    inner = [(i, getattr(o, "_optimizer", o)) for i, o in enumerate(trainer.optimizers)]
    return [(i, o) for i, o in inner if isinstance(o, L3RS)]


class L3RSCallback(pl.Callback):
    """Feeds the loss to the module's L3RS optimizers and logs their learned λ (see the module docstring)."""

    def __init__(self, log_lr: bool = True) -> None:
        self.log_lr = log_lr

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        for _, opt in _l3rs_optimizers(trainer):
            opt.observe_loss(loss)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for _, opt in _l3rs_optimizers(trainer):
            opt.eval()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for _, opt in _l3rs_optimizers(trainer):
            opt.train()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.log_lr:
            return
        for i, opt in _l3rs_optimizers(trainer):
            for g, lr in enumerate(opt.learned_lr()):
                pl_module.log(f"l3rs/lr-{i}-{g}", lr, on_step=True, on_epoch=False)
