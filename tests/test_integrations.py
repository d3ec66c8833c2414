"""Hugging Face Trainer and PyTorch Lightning, offline on CPU with tiny models."""

from __future__ import annotations

import math
import os
import types
import warnings

import pytest
import torch
from pytorch_lightning.plugins import MixedPrecision

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from l3rs.integrations.lightning import L3RSCallback as LightningCallback  # noqa: E402
from l3rs.integrations.transformers import L3RSCallback, L3RSFactory, l3rs_optimizer  # noqa: E402
from l3rs.optim import L3RS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 4


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(config)


class Toy(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 50, (n, 8), generator=g)
        self.labels = (self.ids[:, 0] > 25).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def args(tmp_path, **kw) -> TrainingArguments:
    return TrainingArguments(str(tmp_path / "run"), max_steps=STEPS, per_device_train_batch_size=4, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, **kw)


def feature_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return trainer.optimizer.optimizer.state["l3rs"]["features"]


# ------------------------------------------------------------------------------------- HF Trainer
def test_trainer_feeds_every_loss_and_keeps_lr0_under_the_default_scheduler(tmp_path):
    model = tiny_bert()
    opt = l3rs_optimizer(model, lr=1e-3)
    trainer = Trainer(model, args(tmp_path), train_dataset=Toy(), optimizers=(opt, None),
                      callbacks=[L3RSCallback()])
    with pytest.warns(UserWarning, match="keeps λ0 constant"):  # the default linear schedule is pinned
        trainer.train()
    assert opt.step_count == STEPS and opt.total_steps == STEPS and opt.train_size == len(Toy())
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)
    logged = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(logged) == STEPS
    # the loss features saw the first step's loss (their reference) ...
    assert feature_state(trainer)["loss_ref"].item() == pytest.approx(math.log(logged[0]), abs=1e-4)
    # ... and the later ones: the EMAs moved from it
    assert not torch.allclose(feature_state(trainer)["loss_ema"], feature_state(trainer)["loss_ref"])


def test_trainer_builds_l3rs_through_optimizer_cls_and_kwargs_with_weight_decay(tmp_path):
    model = tiny_bert()
    trainer = Trainer(model, args(tmp_path, lr_scheduler_type="constant"), train_dataset=Toy(),
                      optimizer_cls_and_kwargs=(L3RSFactory, {"lr": 1e-3, "weight_decay": 0.1}),
                      callbacks=[L3RSCallback()])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*L3RS.*")  # constant schedule, loss found: no warning
        trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, L3RS) and opt.step_count == STEPS
    decays = {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]}
    assert decays["classifier.weight"] == 0.1 and decays["classifier.bias"] == 0.0


def test_l3rs_optimizer_without_weight_decay_keeps_the_optimizers_own_on_every_tensor():
    opt = l3rs_optimizer(tiny_bert(), lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [None]  # config.weight_decay, as meta-trained
    assert opt.config.weight_decay > 0


def test_trainer_with_a_meta_trained_optimizer(tmp_path):
    donor = L3RS(tiny_bert(1).named_parameters(), lr=2e-3, total_steps=10)
    for v in donor.meta.values():
        v.add_(0.3)
    donor.save_pretrained(tmp_path / "opt")
    model = tiny_bert()
    trainer = Trainer(model, args(tmp_path, lr_scheduler_type="constant"), train_dataset=Toy(),
                      optimizer_cls_and_kwargs=(L3RSFactory, {"pretrained": tmp_path / "opt"}),
                      callbacks=[L3RSCallback()])
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert opt.param_groups[0]["lr"] == 2e-3 and opt.total_steps == 10  # the saved λ0 and horizon
    assert torch.equal(opt.meta["layers.2.bias"], donor.meta["layers.2.bias"])


def test_hf_example_runs(tmp_path):
    from examples.hf_trainer import main

    trainer = main(steps=2, out=str(tmp_path / "run"))
    opt = trainer.optimizer.optimizer
    assert opt.step_count == 2 and "loss_ref" in opt.state["l3rs"]["features"]


# -------------------------------------------------------------------------------------- Lightning
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_module_feeds_the_loss_and_logs_learned_lr(tmp_path, precision):
    from examples.lightning_module import main

    trainer = main(steps=6, precision=precision, out=str(tmp_path))
    opt = trainer.optimizers[0]
    assert isinstance(opt, L3RS) and opt.step_count == 6
    assert "loss_ref" in opt.state["l3rs"]["features"]
    assert trainer.callback_metrics["l3rs/lr-0-0"].item() == pytest.approx(opt.learned_lr()[0], rel=1e-5)


def test_lightning_callback_is_what_feeds_the_loss_under_a_grad_scaler(tmp_path):
    from examples.lightning_module import main

    def fp16() -> MixedPrecision:  # "16-mixed" falls back to bf16 on CPU: build its GradScaler path by hand
        return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))

    without = main(steps=3, precision=None, out=str(tmp_path), callbacks=[], plugins=[fp16()])
    assert without.optimizers[0].step_count > 0
    assert "loss_ref" not in without.optimizers[0].state["l3rs"]["features"]  # the GradScaler's bare step()
    fed = main(steps=3, precision=None, out=str(tmp_path), callbacks=[LightningCallback(log_lr=False)],
               plugins=[fp16()])
    assert "loss_ref" in fed.optimizers[0].state["l3rs"]["features"]


def test_lightning_callback_validates_the_averaged_weights() -> None:
    model = torch.nn.Linear(3, 2)
    opt = L3RS(model.named_parameters(), lr=0.1, total_steps=10, average=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(4, 3)).square().sum().backward()
        opt.step()
    trained = model.weight.detach().clone()
    trainer, callback = types.SimpleNamespace(optimizers=[opt]), LightningCallback(log_lr=False)
    callback.on_validation_start(trainer, None)
    assert not torch.equal(model.weight, trained)  # the averaged weights
    callback.on_validation_end(trainer, None)
    assert torch.equal(model.weight, trained)
