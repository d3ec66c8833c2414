"""Held-out validation of meta-training: which checkpoint ships as `best/`, and when it is checked.

Full runs on held-out head seeds (>= VALIDATION_SEED) of the family's base task at each validation horizon,
scored against the untrained optimizer on the same seeds. One run's final loss is noisy (on cnn04 rounding alone
moves it by up to 5%, the seed by 10-30%: docs/RESULTS.md, sessions 17 and 19), so each seed's value is kept
next to the mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from torch import Tensor

from l3rs.meta.config import MetaConfig
from l3rs.meta.unroll import Job, grouped_objectives, mean_objectives

VALIDATION_SEED = 2**61  # held-out seeds are >= this; training seeds (seed_of) are below it


class Validation(NamedTuple):
    values: list[float | None]  # mean objective per validation horizon (inf: a run diverged; None: not run)
    by_seed: list[list[float] | None]  # per validation horizon, each validation seed's objective
    steps: int  # fine-tuning steps spent

    def merge(self, other: Validation) -> Validation:
        """One validation from two that ran disjoint horizons."""
        values = [a if a is not None else b for a, b in zip(self.values, other.values, strict=True)]
        by_seed = [a if a is not None else b for a, b in zip(self.by_seed, other.by_seed, strict=True)]
        return Validation(values, by_seed, self.steps + other.steps)


def validate(cfg: MetaConfig, horizon: int, vector: Tensor, lr0: float, run: Any,
             horizon_exponent: float = 0.0, backbone_warmup: float = 0.0,
             only: Sequence[int] | None = None) -> Validation:
    """Full unrolls on held-out head seeds of the family's base task (val loss, or error for val_metric), at the
    validation horizons whose indices are in `only` (all by default; the others read None).

    The base task, not perturbed family samples: the kept checkpoint must be the best for the environment
    the optimizer is made for (perturbed samples only diversify the meta-gradient)."""
    objective = "val_metric" if cfg.objective == "val_metric" else "val_loss"
    picked = range(len(cfg.validation_horizons)) if only is None else sorted(only)
    lengths = [max(1, round(cfg.validation_horizons[i] * horizon)) for i in picked]
    seeds = cfg.validation_seeds
    jobs = [Job(None, VALIDATION_SEED + k, vector, lr0, n, n, objective, horizon_exponent=horizon_exponent,
                backbone_warmup=backbone_warmup) for n in lengths for k in range(seeds)]
    results = run(jobs)
    values: list[float | None] = [None] * len(cfg.validation_horizons)
    by_seed: list[list[float] | None] = [None] * len(cfg.validation_horizons)
    for i, mean, row in zip(picked, mean_objectives(results, seeds), grouped_objectives(results, seeds), strict=True):
        values[i], by_seed[i] = mean, row
    return Validation(values, by_seed, sum(r.steps for r in results))


def validation_score(values: list[float], untrained: list[float]) -> float:
    """The worst validation horizon's log(value / untrained value). The untrained optimizer scores 0: a
    meta-trained checkpoint is kept only when it beats it at every horizon (a mean let a large gain at 4x
    buy a loss at 1x)."""
    if not all(map(math.isfinite, values)):
        return math.inf
    return max(math.log(max(v, 1e-12) / max(u, 1e-12)) for v, u in zip(values, untrained, strict=True))


def clears_noise(by_seed: list[list[float]], untrained_by_seed: list[list[float]] | None, margin: float) -> bool:
    """Whether a checkpoint is at least `margin` (relative) lower than the untrained optimizer on every validation
    seed at every validation horizon: only then may it replace the untrained optimizer. A mean over 2 seeds can
    rest on one of them: effnet-mnist kept a checkpoint whose mean gains (11% at 1x, 16% at 4x) were 0.3% and
    0.9% on one seed each, and it cost 37% on rotated digits (docs/RESULTS.md, sessions 30-31); one run's final
    loss moves by several % with rounding alone on image tasks. None: a state saved before per-seed values were
    kept (the mean alone decides, as then)."""
    if untrained_by_seed is None:
        return True
    return all(v <= (1 - margin) * u for values, untrained in zip(by_seed, untrained_by_seed, strict=True)
               for v, u in zip(values, untrained, strict=True))


def validation_due(iteration: int, every: int) -> bool:
    """Every `every` iterations, and twice before the first of those (at a quarter and a half): the first
    iterations often help most before a noisy meta-gradient overshoots, so they get their own checks."""
    return iteration % every == 0 or (iteration < every and iteration in (every // 4, every // 2))


def validation_steps(cfg: MetaConfig, horizon: int) -> float:
    """Fine-tuning steps of one validation (budgets plan for it)."""
    return cfg.validation_seeds * sum(cfg.validation_horizons) * horizon
