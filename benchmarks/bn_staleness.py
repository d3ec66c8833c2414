"""How much of a BatchNorm model's final validation loss is stale running statistics: each method fine-tunes the
task for --multiple times its horizon on each seed; its final validation loss is read as `l3rs evaluate` reads it
(eval mode, with the running statistics the run left) and again after recomputing every BatchNorm layer's
statistics at the final weights (one pass over the training split, a cumulative average, no gradient); print JSON.

    python benchmarks/bn_staleness.py --task effnet-mnist --multiple 5 --seeds 1000,1001,1002,1003 \
        --method l3rs=runs/effnet/best --method adamw-cosine:lr=0.00316 [--out FILE]

A method is NAME=PATH (a saved L3RS optimizer) or BASELINE:lr=X (a baseline of `l3rs evaluate` at that LR).
Per method: each seed's two losses, their means with 95% bootstrap intervals, and the stale share 1 − recomputed /
as-read of the mean losses. A model without BatchNorm reads the same twice.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from l3rs import tasks
from l3rs.evaluate.methods import BASELINES, make_optimizer, meta_trained
from l3rs.evaluate.stats import mean_ci
from l3rs.finetune import finetune
from l3rs.functional import Config
from l3rs.io import machine, save_json


def parse_method(spec: str) -> tuple[str, Any, dict[str, float]]:
    """NAME=PATH -> an L3RS optimizer; BASELINE:lr=X -> a baseline at that LR."""
    if "=" in spec and ":" not in spec.split("=", 1)[0]:
        name, path = spec.split("=", 1)
        return name, meta_trained(name, path), {}
    name, _, hp = spec.partition(":")
    if name not in BASELINES or not hp.startswith("lr="):
        raise SystemExit(f"bn_staleness: method {spec!r} is neither NAME=PATH nor BASELINE:lr=X "
                         f"(baselines: {', '.join(BASELINES)})")
    return f"{name}:{hp}", BASELINES[name], {"lr": float(hp[3:])}


@torch.no_grad()
def recomputed_statistics_loss(task: Any, model: torch.nn.Module, batch_size: int = 250) -> dict[str, float]:
    """Validation loss and metric after recomputing BatchNorm statistics on the training split (a copy)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the pass
    x, _ = task.split("train")
    model.train()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    model.eval()
    return task.evaluate(model, split="val")


def run(job: tuple[str, str, Any, dict[str, float], int, int]) -> dict[str, Any]:
    task_name, name, method, hp, steps, seed = job
    torch.set_num_threads(1)
    task = tasks.get(task_name)
    model = task.model_fn(seed)
    result = finetune(task, make_optimizer(method, hp, task.head, Config()), steps, seed, model=model)
    recomputed = recomputed_statistics_loss(task, model)
    return {"method": name, "seed": seed, "val_loss": result.final_val_loss, "val_metric": result.final_val_metric,
            "recomputed_val_loss": recomputed["loss"], "recomputed_val_metric": recomputed["metric"],
            "seconds": result.seconds}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    read, recomputed = ([r[key] for r in runs] for key in ("val_loss", "recomputed_val_loss"))
    mean_read, mean_recomputed = sum(read) / len(read), sum(recomputed) / len(recomputed)
    return {"val_loss": mean_read, "val_loss_ci95": mean_ci(read), "recomputed_val_loss": mean_recomputed,
            "recomputed_val_loss_ci95": mean_ci(recomputed), "stale_share": 1 - mean_recomputed / mean_read}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="effnet-mnist")
    parser.add_argument("--multiple", type=float, default=5.0, help="run length in multiples of the task's horizon")
    parser.add_argument("--seeds", default="1000,1001,1002,1003")
    parser.add_argument("--method", action="append", required=True, help="NAME=PATH or BASELINE:lr=X (repeat)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    task = tasks.get(args.task)
    steps, seeds = round(args.multiple * task.horizon), [int(s) for s in args.seeds.split(",")]
    methods = [parse_method(spec) for spec in args.method]
    jobs = [(args.task, name, method, hp, steps, seed) for name, method, hp in methods for seed in seeds]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        runs = list(pool.map(run, jobs))
    by_method = {name: [r for r in runs if r["method"] == name] for name, _, _ in methods}
    out = {"settings": {**vars(args), "steps": steps}, "machine": machine(),
           "methods": {name: {"summary": summary(rs), "runs": rs} for name, rs in by_method.items()},
           "seconds": time.perf_counter() - start}
    if args.out:
        save_json(out, Path(args.out))
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
