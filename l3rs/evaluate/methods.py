"""The methods an evaluation compares, and the optimizer factory `finetune` builds each one from.

- baselines: SGD-momentum(0.9) and AdamW x {constant, cosine} x {one LR, head LR = lr x multiplier};
  `atmo`, a fixed mix of the SGD and Adam directions (mix and LR tuned), built from L3RS itself with a
  constant mixer; `l3rs-untrained` (λ0 tuned by the same grid).
- what users pick instead of tuning, at their documented defaults (no sweep): `schedulefree-adamw`
  (AdamWScheduleFree, lr 0.0025, linear warm-up over the first 5% of the run: its README recommends warm-up
  without a length), `prodigy` (lr 1 with the cosine schedule its README recommends), `dog` and `ldog`
  (DoG / per-layer L-DoG with the polynomial-decay iterate averaging, γ = 8, that their README says they
  must be combined with; the averaged weights are the ones evaluated). `schedulefree-adamw-tuned` tunes the
  LR on the AdamW grid. Schedule-free and averaged weights are swapped in by `finetune` around each
  evaluation; BatchNorm running statistics are not recomputed at those weights (schedule-free's caveat).
- the meta-trained optimizer `l3rs` (no tuning: it is told the new horizon) and its re-meta-trained
  ablations: `l3rs-global` (one set of coefficients for all tensors), `l3rs-adam-only` (a learned
  layer-wise LR schedule for Adam), `l3rs-no-features` (a learned constant per tensor).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dog
import prodigyopt
import schedulefree
import torch

from l3rs.finetune import MakeOptimizer
from l3rs.functional import Config
from l3rs.mixer import depth
from l3rs.optim import L3RS

ATMO_CONFIG = Config(bases=("sgd", "adam"), features="none", scope="global", schedule="constant",
                     step_budget="free", weight_decay=0.0)  # ATMO: fixed, as the paper (no decay)
SCHEDULEFREE_LR = 0.0025  # AdamWScheduleFree's default
SCHEDULEFREE_WARMUP = 0.05  # share of the run
AVERAGING_GAMMA = 8.0  # dog.PolynomialDecayAverager's default


@dataclass(frozen=True)
class Method:
    """A method under evaluation: its optimizer kind and what gets tuned."""

    name: str
    kind: str  # "sgd" | "adamw" | "atmo" | "untrained" | "schedulefree" | "prodigy" | "dog" | "ldog" | "l3rs"
    cosine: bool = False
    head: bool = False
    path: str | None = None  # of the saved optimizer, for kind "l3rs"
    tuned: bool = True  # False: runs as given (meta-trained, or an LR-free optimizer at its defaults)

    @property
    def is_baseline(self) -> bool:
        """Tuned classical baselines: the pool the "best tuned baseline" of a scenario is drawn from."""
        return self.tuned and self.kind in ("sgd", "adamw", "atmo", "schedulefree")

    @property
    def reusable(self) -> bool:
        """Its tuning and runs do not depend on the optimizer under evaluation (l3rs methods load it,
        `l3rs-untrained` uses its Config), so a previous evaluation of the same task holds them."""
        return self.kind not in ("l3rs", "untrained")


def meta_trained(name: str, path: str | os.PathLike) -> Method:
    """A saved L3RS optimizer (the one under evaluation, or an ablation): never tuned."""
    return Method(name, "l3rs", path=str(path), tuned=False)


def _baselines() -> dict[str, Method]:
    out = {}
    for kind in ("sgd", "adamw"):
        for cosine in (False, True):
            for head in (False, True):
                name = kind + ("-cosine" if cosine else "") + ("-head" if head else "")
                out[name] = Method(name, kind, cosine, head)
    out["atmo"] = Method("atmo", "atmo")
    out["l3rs-untrained"] = Method("l3rs-untrained", "untrained")
    out["schedulefree-adamw"] = Method("schedulefree-adamw", "schedulefree", tuned=False)
    out["schedulefree-adamw-tuned"] = Method("schedulefree-adamw-tuned", "schedulefree")
    for kind in ("prodigy", "dog", "ldog"):
        out[kind] = Method(kind, kind, tuned=False)
    return out


BASELINES = _baselines()
ABLATIONS: dict[str, Callable[[Config], Config]] = {
    "l3rs-global": lambda c: dataclasses.replace(c, scope="global", step_budget="free"),
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


class IterateAverage:
    """An optimizer whose evaluated weights are the polynomial-decay average of its iterates (Shamir & Zhang,
    2013; as dog.PolynomialDecayAverager, but over the parameters alone): `eval()` swaps the average in,
    `train()` swaps the iterates back."""

    def __init__(self, optimizer: torch.optim.Optimizer, gamma: float = AVERAGING_GAMMA) -> None:
        self.optimizer, self.gamma, self.t = optimizer, gamma, 1
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.average = [p.detach().clone() for p in self.params]
        self.iterates: list[torch.Tensor] | None = None  # the training weights while the average is in

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        weight = (1 + self.gamma) / (self.t + self.gamma)
        for average, p in zip(self.average, self.params, strict=True):
            average.lerp_(p, weight)
        self.t += 1

    @torch.no_grad()
    def eval(self) -> None:
        if self.iterates is None:
            self.iterates = [p.detach().clone() for p in self.params]
            for p, average in zip(self.params, self.average, strict=True):
                p.copy_(average)

    @torch.no_grad()
    def train(self) -> None:
        if self.iterates is not None:
            for p, iterate in zip(self.params, self.iterates, strict=True):
                p.copy_(iterate)
            self.iterates = None


def _lr_free(kind: str, params: list[torch.nn.Parameter], lr: float | None, total_steps: int) -> Any:
    """An LR-free / schedule-free optimizer at its documented defaults (`lr`: a tuned schedule-free LR)."""
    if kind == "schedulefree":
        return schedulefree.AdamWScheduleFree(params, lr=lr or SCHEDULEFREE_LR,
                                              warmup_steps=round(SCHEDULEFREE_WARMUP * total_steps))
    if kind == "prodigy":
        opt = prodigyopt.Prodigy(params, lr=1.0)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    return IterateAverage(dog.DoG(params) if kind == "dog" else dog.LDoG(params))


def make_optimizer(method: Method, hp: dict[str, float], head: Sequence[str], config: Config,
                   train_size: int | None = None) -> MakeOptimizer:
    """The `finetune` factory for `method` with hyper-parameters `hp` (lr, and head multiplier or mix); a
    meta-trained L3RS is told the scenario's `train_size` as it is told the run's length."""

    def make(named: Any, total_steps: int) -> Any:
        named = [(n, p) for n, p in named if p.requires_grad]
        if method.kind in ("schedulefree", "prodigy", "dog", "ldog"):
            return _lr_free(method.kind, [p for _, p in named], hp.get("lr"), total_steps)
        if method.kind == "l3rs":
            return L3RS.from_pretrained(method.path, named, total_steps=total_steps, train_size=train_size)
        if method.kind == "untrained":
            return L3RS(named, lr=hp["lr"], total_steps=total_steps, config=config, head=head)
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
