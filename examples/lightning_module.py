"""A LightningModule trained with L3RS: ``configure_optimizers`` returns it, `L3RSCallback` feeds the loss
in every precision and logs the learned step size.

    python examples/lightning_module.py --precision bf16-mixed --steps 50

Needs ``pip install l3rs[lightning]``.
"""

from __future__ import annotations

import argparse
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from l3rs import L3RS
from l3rs.integrations.lightning import L3RSCallback


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 1e-2, total_steps: int | None = None) -> None:
        super().__init__()
        self.lr, self.total_steps = lr, total_steps
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True)
        return loss

    def configure_optimizers(self) -> L3RS:
        # or L3RS.from_pretrained("runs/mine/best", self.named_parameters(), total_steps=...)
        return L3RS(self.named_parameters(), lr=self.lr, total_steps=self.total_steps)


def data(n: int = 256, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :3].argmax(1) + (x[:, 3] > 1).long()) % 3
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g)


def main(steps: int = 50, precision: str = "32-true", out: str = "runs/lightning-example",
         callbacks: list[pl.Callback] | None = None, **trainer_kwargs: Any) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    module = Classifier(total_steps=steps)
    callbacks = [L3RSCallback()] if callbacks is None else callbacks
    trainer = pl.Trainer(max_steps=steps, precision=precision, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=out, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, data())
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed, ...")
    a = parser.parse_args()
    trainer = main(a.steps, a.precision)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(f"after {trainer.global_step} steps: {metrics}")
