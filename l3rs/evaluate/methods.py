"""The methods an evaluation compares, and the optimizer factory `finetune` builds each one from.

- baselines: SGD-momentum(0.9) and AdamW x {constant, cosine} x {one LR, head LR = lr x multiplier};
  `atmo`, a fixed mix of the SGD and Adam directions (mix and LR tuned), built from L3RS itself with a
  constant mixer; `l3rs-untrained` (λ0 tuned by the same grid).
- the meta-trained optimizer `l3rs` (no tuning: it is told the new horizon) and its re-meta-trained
  ablations: `l3rs-global` (one set of coefficients for all tensors), `l3rs-adam-only` (a learned
  layer-wise LR schedule for Adam), `l3rs-no-features` (a learned constant per tensor).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from l3rs.finetune import MakeOptimizer
from l3rs.functional import Config
from l3rs.mixer import depth
from l3rs.optim import L3RS

ATMO_CONFIG = Config(bases=("sgd", "adam"), features="none", scope="global")


@dataclass(frozen=True)
class Method:
    """A method under evaluation: its optimizer kind and what gets tuned."""

    name: str
    kind: str  # "sgd" | "adamw" | "atmo" | "untrained" | "l3rs" (a saved optimizer at `path`)
    cosine: bool = False
    head: bool = False
    path: str | None = None

    @property
    def tuned(self) -> bool:
        return self.kind != "l3rs"

    @property
    def is_baseline(self) -> bool:
        """Classical baselines: the pool the "best tuned baseline" of a scenario is drawn from."""
        return self.kind in ("sgd", "adamw", "atmo")


def _baselines() -> dict[str, Method]:
    out = {}
    for kind in ("sgd", "adamw"):
        for cosine in (False, True):
            for head in (False, True):
                name = kind + ("-cosine" if cosine else "") + ("-head" if head else "")
                out[name] = Method(name, kind, cosine, head)
    out["atmo"] = Method("atmo", "atmo")
    out["l3rs-untrained"] = Method("l3rs-untrained", "untrained")
    return out


BASELINES = _baselines()
ABLATIONS: dict[str, Callable[[Config], Config]] = {
    "l3rs-global": lambda c: dataclasses.replace(c, scope="global"),
    "l3rs-adam-only": lambda c: dataclasses.replace(c, bases=("adam",)),
    "l3rs-no-features": lambda c: dataclasses.replace(c, features="none"),
}


def atmo_meta(adam_share: float) -> dict[str, torch.Tensor]:
    """Meta-parameters of a constant mixer: λ = λ0 and μ = (1 − a, a) over (sgd, adam) for every tensor.

    The mixer's last layer has zero weights, so its output is its bias: [log step scale, mix logits].
    """
    meta = ATMO_CONFIG.init_meta(1)
    meta[f"layers.{depth(meta)}.bias"] = torch.tensor([0.0, math.log(1 - adam_share), math.log(adam_share)])
    return meta


def _cosine(total_steps: int) -> Callable[[int], float]:
    return lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total_steps) / total_steps))


def make_optimizer(method: Method, hp: dict[str, float], head: Sequence[str],
                   config: Config) -> MakeOptimizer:
    """The `finetune` factory for `method` with hyper-parameters `hp` (lr, and head multiplier or mix)."""

    def make(named: Any, total_steps: int) -> Any:
        named = [(n, p) for n, p in named if p.requires_grad]
        if method.kind == "l3rs":
            return L3RS.from_pretrained(method.path, named, total_steps=total_steps)
        if method.kind == "untrained":
            return L3RS(named, lr=hp["lr"], total_steps=total_steps, config=config)
        if method.kind == "atmo":
            return L3RS(named, lr=hp["lr"], total_steps=total_steps, config=ATMO_CONFIG,
                        meta=atmo_meta(hp["mix"]))
        multiplier = hp.get("head", 1.0)
        groups = [{"params": [p for n, p in named if (n in head) == is_head], "lr": hp["lr"] * m}
                  for is_head, m in ((False, 1.0), (True, multiplier))]
        groups = [g for g in groups if g["params"]]
        opt = (torch.optim.SGD(groups, lr=hp["lr"], momentum=0.9) if method.kind == "sgd"
               else torch.optim.AdamW(groups, lr=hp["lr"]))
        return (opt, torch.optim.lr_scheduler.LambdaLR(opt, _cosine(total_steps))) if method.cosine else opt

    return make
