"""A complete user task: your pretrained model + your data, usable everywhere a task name is.

    l3rs meta-train --task examples.user_task:make_task --out runs/mine --budget-minutes 3
    l3rs evaluate --optimizer runs/mine/best --task examples.user_task:make_task --out runs/mine-eval

(run from the repository root, or put the module anywhere on PYTHONPATH). Here the "pretrained" model is a
small MLP fitted on one half of sklearn's digits classes; the task fine-tunes it, with a new head, on the
other half. Swap in your own backbone loader and tensors.
"""

from __future__ import annotations

import functools

import torch
from sklearn.datasets import load_digits
from torch import nn

import l3rs


@functools.lru_cache(maxsize=1)
def _data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)


@functools.lru_cache(maxsize=1)
def _pretrained_backbone() -> dict[str, torch.Tensor]:
    """Stand-in for loading your checkpoint (use safetensors or torch.load(weights_only=True))."""
    x, y = _data()
    keep = y < 5
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[keep]), y[keep]).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def _model_fn(seed: int) -> nn.Module:
    model = _model()
    model.load_state_dict(_pretrained_backbone())
    gen = torch.Generator().manual_seed(seed)
    head = model[4]  # fresh head for every fine-tuning run, from `seed`
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.05)
        head.bias.zero_()
    return model


def make_task() -> l3rs.Task:
    x, y = _data()
    new = y >= 5
    x, y = x[new], y[new]  # classes 5-9 (the head stays 10-way; unused logits learn to stay low)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    tr, va, te = order[:500], order[500:700], order[700:]
    return l3rs.Task("digits-5to9", _model_fn, (x[tr], y[tr]), (x[va], y[va]), test=(x[te], y[te]),
                     batch_size=32, horizon=60, head=("4.weight", "4.bias"))
