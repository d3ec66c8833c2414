"""How reliable is the α sweep? Per-seed validation losses of the untrained L3RS at 4x (`--multiple`) a task's
horizon over the sweep's points and half steps (λ0 / step^(k/2), `sweeps.sweep_step`: the grid's ratio at 4x, its
square root at 2x), on more training seeds than meta-training uses; then what
`l3rs.meta.sweeps.horizon_exponent_fit` (the library's own code) fits from every pair of them. Prints JSON.

λ0 is the task's swept one for `--prior` (`--lr0` skips that sweep; give the prior the task's meta-training
keeps, `lr0_sweep.prior` in its optimizer.json). The pairs replay the library's seed count, its steps down, its
margin and its half steps on the stored losses, so the spread of α over pairs is the spread a meta-training
run meets.

    python benchmarks/alpha_sweep.py [--tasks minilm-chatterbot] [--prior adam] [--seeds 6] [--lr0 3e-4]
        [--multiple 2] [--margins 0.1,0.2] [--workers 2] > out.json

`--margins` replays the pairs with other margins too (how much lower than λ0's each seed's loss at the sweep's best
point must be for α > 0, unless their mean is SWEEP_MEAN_MARGIN lower; the library's is SWEEP_MARGIN at either
multiple): how often each one fits α > 0 on the same losses. `--stored out.json` replays an earlier output's losses
instead of running (the library's rule may have changed since: its "margin" field is the rule of its day, until
session 34 a margin on the mean).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from l3rs import tasks
from l3rs.io import machine
from l3rs.meta.config import MetaConfig
from l3rs.meta.distributed import Runner
from l3rs.meta.sweeps import (
    LONG_SWEEP,
    LONG_SWEEP_POINTS,
    LONG_SWEEP_SEEDS,
    SWEEP_MARGIN,
    SWEEP_MEAN_MARGIN,
    grid_ratio,
    horizon_exponent_fit,
    sweep_seeds,
    sweep_step,
)
from l3rs.meta.train import initial_vector, optimizer_config, tune_lr0
from l3rs.meta.unroll import Job, Result, Worker


def half_steps(lr0: float, step: float) -> list[float]:
    """Every λ the α sweep can run: its steps down from λ0 and the half steps between them."""
    return [lr0 / step ** (k / 2) for k in range(2 * LONG_SWEEP_POINTS - 1)]


def per_seed_losses(task: str, lr0: float, seeds: int, workers: int, prior: str,
                    multiple: float) -> tuple[float, list[list[float]]]:
    """(the sweep's step, losses[seed][k]) of the untrained L3RS at λ0 / step^(k/2), k < 2 LONG_SWEEP_POINTS − 1,
    at `multiple` x the horizon."""
    cfg = MetaConfig(workers=workers)
    family = tasks.family(task)
    horizon = family.base.horizon
    config = optimizer_config(cfg, horizon)
    step = sweep_step(grid_ratio(cfg.lr0_grid), multiple)
    lrs = half_steps(lr0, step)
    steps = round(multiple * horizon)
    run_seeds = sweep_seeds(cfg, seeds)
    runner = Runner(Worker(family, config, cfg.first_order, cfg.val_subset, None), workers)
    try:
        tensors = sum(p.requires_grad for p in family.base.model_fn(0).parameters())
        vector = initial_vector(config, cfg.seed, tensors, prior)  # meta-training's untrained optimizer
        results = runner([Job(None, r, vector, lr, steps, steps, "val_loss") for r in run_seeds for lr in lrs])
    finally:
        runner.close()
    return step, [[results[i * len(lrs) + k].objective for k in range(len(lrs))] for i in range(seeds)]


def replay(losses: list[list[float]], seeds: tuple[int, ...], lr0: float, step: float, multiple: float,
           margin: float) -> float:
    """The α `horizon_exponent_fit` fits at `multiple` x with `margin` when its training seeds are `seeds` of the
    table."""
    cfg = MetaConfig()
    run_seeds = sweep_seeds(cfg, LONG_SWEEP_SEEDS)

    def run(jobs: list[Job]) -> list[Result]:
        def loss(job: Job) -> float:
            k = round(2 * math.log(lr0 / job.lr0) / math.log(step))
            return losses[seeds[run_seeds.index(job.run_seed)]][k]
        return [Result(loss(j), 0.0, None, None, j.steps) for j in jobs]

    return horizon_exponent_fit(cfg, 1, torch.zeros(1), lr0, run, multiple=multiple,
                                margin=margin)["horizon_exponent"]


def fits_by_margin(losses: list[list[float]], lr0: float, step: float, multiple: float,
                   margins: list[float]) -> dict[str, dict[str, Any]]:
    """Per margin: the α every pair of the table's seeds fits, how many fit α > 0, and their range."""
    pairs = list(itertools.combinations(range(len(losses)), LONG_SWEEP_SEEDS))
    by_margin = {}
    for margin in margins:
        alphas = [replay(losses, pair, lr0, step, multiple, margin) for pair in pairs]
        by_margin[f"{margin:g}"] = {
            "alpha_by_seeds": {",".join(map(str, p)): a for p, a in zip(pairs, alphas, strict=True)},
            "alpha_nonzero": sum(a > 0 for a in alphas), "alpha_min": min(alphas), "alpha_max": max(alphas)}
    return by_margin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="cnn04-mnist59,mnistcnn-digits,minilm-chatterbot,mlp-mnist1d-shift")
    parser.add_argument("--seeds", type=int, default=6, help="training seeds per point (the sweep uses the first)")
    parser.add_argument("--lr0", type=float, default=None, help="λ0 (default: each task's λ0 sweep)")
    parser.add_argument("--prior", default="uniform",
                        help="the untrained optimizer's mix: uniform or a base's name (no +warmup)")
    parser.add_argument("--multiple", type=float, default=LONG_SWEEP, help="of the horizon (default 4)")
    parser.add_argument("--margins", default="",
                        help="comma-separated margins to replay the pairs with besides the library's")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stored", default=None, metavar="JSON",
                        help="replay this script's earlier output with today's margins instead of running")
    args = parser.parse_args()
    if args.stored:
        stored = json.loads(Path(args.stored).read_text())
        args.multiple = stored["multiple"]
    margin = SWEEP_MARGIN
    margins = sorted({margin, *(float(m) for m in args.margins.split(",") if m)})
    out: dict[str, Any] = {"machine": machine(), "multiple": args.multiple, "sweep_seeds": LONG_SWEEP_SEEDS,
                           "margin": margin, "mean_margin": SWEEP_MEAN_MARGIN, "tasks": {}}
    if args.stored:
        out |= {"machine": stored["machine"], "replayed": args.stored}  # the losses' machine, not this one's
    for task in stored["tasks"] if args.stored else args.tasks.split(","):
        if args.stored:
            row = stored["tasks"][task]
            lr0, prior, losses, step = row["lr0"], row["prior"], row["losses"], row["lrs"][0] / row["lrs"][2]
        else:
            lr0 = args.lr0 or tune_lr0(tasks.family(task), MetaConfig(workers=args.workers, priors=(args.prior,)))
            prior = args.prior
            step, losses = per_seed_losses(task, lr0, args.seeds, args.workers, prior, args.multiple)
        by_margin = fits_by_margin(losses, lr0, step, args.multiple, margins)
        out["tasks"][task] = {
            "lr0": lr0, "prior": prior, "lrs": half_steps(lr0, step), "losses": losses,
            "mean": [statistics.mean(col) for col in zip(*losses, strict=True)],
            **by_margin[f"{margin:g}"], "by_margin": by_margin}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
