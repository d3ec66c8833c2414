"""Hyper-parameter tuning of the baselines: an LR log grid scored by the mean final validation loss over
the tuning seeds, extended past an edge while the best LR sits on it; then the head multiplier or ATMO mix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from l3rs.evaluate.methods import Method
from l3rs.evaluate.runs import RunRequest, ScenarioRunner
from l3rs.results import Trial, Tuning

TUNE_SEEDS = (999, 998)  # head seeds of every tuning run: neither meta-training nor evaluation seeds
SGD_GRID = tuple(float(x) for x in np.logspace(-3, 0, 7))  # 1e-3 ... 1, half-decade steps
ADAM_GRID = tuple(float(x) for x in np.logspace(-4.5, -1.5, 7))  # 3e-5 ... 3e-2 (also λ0 of L3RS mixes)
MAX_EXTEND = 2  # grid points added past an edge when the best LR is on it
HEAD_MULTIPLIERS = (3.0, 10.0, 30.0)
ATMO_MIXES = (0.1, 0.25, 0.75, 0.9)  # Adam's share of the mix, tried at the best LR of the 0.5 sweep


def score(runner: ScenarioRunner, method: Method, settings: list[dict[str, float]]) -> list[Trial]:
    """Score each hyper-parameter setting by its mean final validation loss over the tuning seeds."""
    runner.prefetch([RunRequest(method, hp, seed, False) for hp in settings for seed in TUNE_SEEDS])
    out = []
    for hp in settings:
        runs = [runner.run(method, hp, seed) for seed in TUNE_SEEDS]
        losses = [r.final_val_loss for r in runs]
        out.append(Trial(hp, float(np.mean(losses)), losses, sum(len(r.train_loss) for r in runs),
                         sum(r.seconds for r in runs)))
    return out


def _best(trials: list[Trial]) -> Trial:
    return min(trials, key=lambda t: t.val_loss)  # first of ties; diverged runs (inf) lose


def sweep_lr(runner: ScenarioRunner, method: Method, hp: dict[str, float],
             grid: Sequence[float]) -> list[Trial]:
    """Score every LR of the log grid, extended past an edge while the best sits on it."""
    lrs = sorted(grid)
    scored = dict(zip(lrs, score(runner, method, [{**hp, "lr": lr} for lr in lrs]), strict=True))
    for _ in range(MAX_EXTEND):
        best = _best([scored[lr] for lr in lrs]).hp["lr"]
        if best not in (lrs[0], lrs[-1]) or len(lrs) < 2:
            break
        new = lrs[0] ** 2 / lrs[1] if best == lrs[0] else lrs[-1] ** 2 / lrs[-2]
        scored[new] = score(runner, method, [{**hp, "lr": new}])[0]
        lrs = sorted(scored)
    return [scored[lr] for lr in lrs]


def tuning(hp: dict[str, float], trials: list[Trial]) -> Tuning:
    return Tuning(hp, trials, sum(t.steps for t in trials), sum(t.seconds for t in trials))


def tune(runner: ScenarioRunner, method: Method) -> Tuning:
    """Tune the LR by the grid, then (at the best LR) the head multiplier or the ATMO mix."""
    if not method.tuned:
        return tuning({}, [])
    start = {"mix": 0.5} if method.kind == "atmo" else {"head": 1.0} if method.head else {}
    trials = sweep_lr(runner, method, start, SGD_GRID if method.kind == "sgd" else ADAM_GRID)
    best = _best(trials).hp
    if method.head:  # multiplier 1 is the sweep's best run: a head LR never has to look worse than one LR
        trials += score(runner, method, [{**best, "head": m} for m in HEAD_MULTIPLIERS])
    if method.kind == "atmo":
        trials += score(runner, method, [{**best, "mix": a} for a in ATMO_MIXES])
    return tuning(_best(trials).hp, trials)


def planned_runs(methods: list[Method], seeds: int) -> int:
    """Runs per scenario, for the progress bar's ETA and budgets (grid extensions past an edge add a few)."""
    sweeps = {(m.kind, m.cosine) for m in methods if m.tuned}
    extra = sum(len(HEAD_MULTIPLIERS) * m.head + len(ATMO_MIXES) * (m.kind == "atmo") for m in methods)
    return (len(sweeps) * len(SGD_GRID) + extra) * len(TUNE_SEEDS) + seeds * len(methods)
