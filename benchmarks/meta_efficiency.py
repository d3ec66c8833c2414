"""Which meta-gradient estimator gets furthest per CPU-minute? Prints one JSON document.

    python benchmarks/meta_efficiency.py --budget-seconds 90

On mnistcnn-digits (MNIST CNN -> sklearn digits): one shared λ0 sweep, then es, pes and bptt meta-train
with the same wall-clock budget and seed; each result is re-measured on held-out fine-tuning seeds (outside
the budget). Then the wall time of one meta-iteration at 1 and 2 worker processes.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from l3rs import L3RS, tasks
from l3rs.finetune import finetune
from l3rs.io import single_thread
from l3rs.meta import MetaConfig, train, tune_lr0

TASK = "mnistcnn-digits"
SETTINGS = {"es": {"meta_lr": 0.03}, "pes": {"meta_lr": 0.03}, "bptt": {}}  # bptt: first order, meta_lr 0.01


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (worker pools are shut down after each run)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def held_out(family: tasks.TaskFamily, make, horizon: int, seeds: range) -> float:
    with single_thread():  # like the meta-training jobs (and immune to a busy second core)
        return sum(finetune(family.base, make, horizon, seed=s).final_val_loss for s in seeds) / len(seeds)


def run_estimator(family, name: str, base: MetaConfig, budget: float, out: Path, seeds: range) -> dict:
    cfg = MetaConfig(**{**base.__dict__, "estimator": name, "budget_minutes": budget / 60, **SETTINGS[name]})
    cpu, wall = cpu_seconds(), time.perf_counter()
    best = train(family, out / name, cfg, progress=False)
    cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
    lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    latest = held_out(family, lambda n, t: L3RS.from_pretrained(out / name / "latest", n, total_steps=t),
                      cfg.horizon, seeds)
    best_loss = held_out(family, lambda n, t: L3RS.from_pretrained(best, n, total_steps=t), cfg.horizon,
                         seeds)
    return {"iterations": lines[-1]["iteration"], "fine_tuning_steps": lines[-1]["steps"],
            "wall_seconds": wall,
            "cpu_minutes": cpu / 60, "validation_curve": [(r["elapsed"], r["validation"]) for r in lines
                                                          if r["validation"] is not None],
            "held_out_val_loss_latest": latest, "held_out_val_loss_best": best_loss}


def iteration_seconds(family, name: str, base: MetaConfig, workers: int, out: Path) -> float:
    cfg = MetaConfig(**{**base.__dict__, "estimator": name, "iterations": 2, "validate_every": 1000,
                        "validation_seeds": 1, "workers": workers, **SETTINGS[name]})
    train(family, out / f"{name}-w{workers}", cfg, progress=False)
    lines = [json.loads(x) for x in (out / f"{name}-w{workers}" / "metrics.jsonl").read_text().splitlines()]
    return lines[1]["seconds"]  # iteration 1 (the last one also validates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-seconds", type=float, default=60, help="meta-training budget per estimator")
    parser.add_argument("--horizon", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="workers for the budgeted runs")
    parser.add_argument("--held-out-seeds", type=int, default=3)
    args = parser.parse_args()
    family = tasks.family(TASK)
    base = MetaConfig(horizon=args.horizon, iterations=10**6, seed=args.seed, workers=args.workers,
                      validate_every=10**6, lr0_grid=(1e-4, 3e-4, 1e-3, 3e-3), lr0_seeds=2)
    seeds = range(10_000, 10_000 + args.held_out_seeds)
    start = time.perf_counter()
    lr0 = tune_lr0(family, base)
    sweep_seconds = time.perf_counter() - start
    base = MetaConfig(**{**base.__dict__, "lr0": lr0})
    untrained = held_out(family, lambda n, t: L3RS(n, lr=lr0, total_steps=t), args.horizon, seeds)
    report = {"task": TASK, "horizon": args.horizon, "budget_seconds": args.budget_seconds, "seed": args.seed,
              "workers": args.workers, "lr0": lr0, "lr0_sweep_seconds": sweep_seconds,
              "held_out_val_loss_untrained": untrained, "estimators": {}, "iteration_seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in SETTINGS:
            report["estimators"][name] = run_estimator(family, name, base, args.budget_seconds, Path(tmp),
                                                       seeds)
        for name in SETTINGS:
            report["iteration_seconds"][name] = {w: iteration_seconds(family, name, base, w, Path(tmp))
                                                 for w in (1, 2)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
