"""The untrained optimizer's sweeps that set λ0 and the horizon exponent α before meta-training (SPEC §5).

Both run the untrained L3RS on the environment itself (the family's base task, training head seeds), not on
perturbed samples: λ0 and α must suit the runs the optimizer is for. Every λ sees the same seeds (paired).
`run` maps a list of `Job`s to their `Result`s (a `Runner`, or any callable in tests).
"""

from __future__ import annotations

import math
import time
from typing import Any

from torch import Tensor

from l3rs.meta.config import MetaConfig
from l3rs.meta.unroll import Job, mean_objectives
from l3rs.seeds import seed_of

GRID_EXTENSIONS = 2  # grid steps added past an edge the λ0 sweep picks (the grid is a prior, not a bound)
LONG_SWEEP = 4.0  # multiple of the horizon of the second sweep that fits α (the longest validation horizon)
# The long sweep runs λ0 and LONG_SWEEP_POINTS - 1 grid steps below it (down to ~λ0/100: on cnn04 the best
# step at 5x was ~75x below the best at 1x) on one seed: as many steps as 2 seeds of 2.5 points would cost.
LONG_SWEEP_POINTS = 5
LONG_SWEEP_SEEDS = 1
# α > 0 only when a smaller step beats λ0 at the long horizon by more than this fraction: one seed's losses
# differ by 5-8% from seed to seed (cnn04, snr), and on a flat landscape the parabola would fit that noise
# (measured: α = 2.2 from losses 0.135, 0.145, 0.135, 0.130, 0.163)
LONG_SWEEP_MARGIN = 0.1


def _sweep_losses(cfg: MetaConfig, steps: int, vector: Tensor, lrs: list[float], run: Any,
                  seeds: int | None = None) -> tuple[list[float], int]:
    """(mean validation loss per λ0, steps spent) of the untrained L3RS over `steps`-step runs on `seeds`
    (default cfg.lr0_seeds) training seeds."""
    seeds = [seed_of(cfg.seed, "sweep-run", k) for k in range(seeds or cfg.lr0_seeds)]
    results = run([Job(None, r, vector, lr, steps, steps, "val_loss") for lr in lrs for r in seeds])
    return mean_objectives(results, len(seeds)), sum(r.steps for r in results)


def long_sweep_steps(horizon: int) -> int:
    """The fine-tuning steps `horizon_exponent_fit` spends (budgets plan for it)."""
    return LONG_SWEEP_POINTS * LONG_SWEEP_SEEDS * max(1, round(LONG_SWEEP * horizon))


def _argmin(values: list[float]) -> int:
    return min(range(len(values)), key=lambda i: values[i])


def lr0_sweep(cfg: MetaConfig, horizon: int, vector: Tensor, run: Any) -> dict[str, Any]:
    """Validation loss of the untrained L3RS over `cfg.lr0_grid` on `cfg.lr0_seeds` training seeds; a best
    λ0 at an edge of the grid extends it by up to GRID_EXTENSIONS steps of the grid's ratio."""
    start = time.perf_counter()
    grid = list(cfg.lr0_grid)
    losses, steps = _sweep_losses(cfg, horizon, vector, grid, run)
    for _ in range(GRID_EXTENSIONS if len(grid) > 1 else 0):
        best = _argmin(losses)
        if best not in (0, len(grid) - 1) or not math.isfinite(losses[best]):
            break
        top = best == len(grid) - 1
        lr = grid[-1] ** 2 / grid[-2] if top else grid[0] ** 2 / grid[1]
        (loss,), more = _sweep_losses(cfg, horizon, vector, [lr], run)
        grid, losses = ([*grid, lr], [*losses, loss]) if top else ([lr, *grid], [loss, *losses])
        steps += more
    best = _argmin(losses)
    return {"grid": grid, "val_loss": losses, "lr0": grid[best], "seconds": time.perf_counter() - start,
            "steps": steps}


def horizon_exponent_fit(cfg: MetaConfig, horizon: int, vector: Tensor, lr0: float, run: Any) -> dict[str, Any]:
    """α from the untrained L3RS's best λ at LONG_SWEEP x the horizon, λ* = λ0 · LONG_SWEEP^−α.

    λ0 and LONG_SWEEP_POINTS - 1 grid steps below it run at the long horizon; λ* is the vertex of the
    parabola through log(loss) over log(λ) at the best point and its two neighbours (the best point itself
    at an edge or where the three are not convex): α is continuous in [0, (points − 1) · log(ratio) /
    log(LONG_SWEEP)] with ratio the grid's mean step. α = 0 unless the best beats λ0 by LONG_SWEEP_MARGIN."""
    start = time.perf_counter()
    grid = cfg.lr0_grid
    ratio = (grid[-1] / grid[0]) ** (1 / (len(grid) - 1)) if len(grid) > 1 else math.sqrt(10.0)
    lrs = [lr0 / ratio**k for k in range(LONG_SWEEP_POINTS)]
    steps = max(1, round(LONG_SWEEP * horizon))
    losses, spent = _sweep_losses(cfg, steps, vector, lrs, run, LONG_SWEEP_SEEDS)
    best = _argmin(losses)
    below: float = best  # grid steps below λ0 of the best λ at the long horizon
    if 0 < best < len(losses) - 1 and all(map(math.isfinite, losses[best - 1:best + 2])):
        a, b, c = (math.log(max(v, 1e-12)) for v in losses[best - 1:best + 2])
        if a - 2 * b + c > 0:  # b is the lowest: the vertex lies within half a step of it
            below = best + 0.5 * (a - c) / (a - 2 * b + c)
    clear_gain = math.isfinite(losses[best]) and losses[best] * (1 + LONG_SWEEP_MARGIN) < losses[0]
    exponent = below * math.log(ratio) / math.log(LONG_SWEEP) if clear_gain else 0.0
    return {"multiple": LONG_SWEEP, "grid": lrs, "val_loss": losses, "horizon_exponent": exponent,
            "seconds": time.perf_counter() - start, "steps": spent}
