"""Which direction normalization holds beyond the horizon? The untrained L3RS under each `normalize` over a λ
grid, at 1x and 5x a task's horizon, next to AdamW with a cosine schedule; prints JSON.

Every run starts from the same pretrained weights and uses the same training seeds and batch order; the final
validation loss on the whole validation split is what is compared. No meta-training: this isolates what the
normalization alone does to long runs (the mixer's deviations are zero, the mix uniform).

    python benchmarks/normalization.py [--tasks cnn04-mnist59,mnistcnn-digits] [--multiples 1,5]
        [--seeds 1000,1001] [--lrs 0.001,0.003,0.01,0.03] [--normalize rms,snr] [--workers 2] > out.json
"""

from __future__ import annotations

import argparse
import json
from multiprocessing import Pool
from typing import Any

import torch

from l3rs import tasks
from l3rs.evaluate.methods import Method, make_optimizer
from l3rs.finetune import finetune
from l3rs.functional import Config
from l3rs.io import machine


def _run(job: tuple[str, float, str, int, float]) -> dict[str, Any]:
    torch.set_num_threads(1)
    task_name, multiple, method, seed, lr = job
    task = tasks.get(task_name)
    steps = round(task.horizon * multiple)
    # the evaluation's own factories: AdamW-cosine as a baseline runs, the untrained L3RS as `l3rs-untrained`
    if method == "adamw-cosine":
        kind, config = Method(method, "adamw", cosine=True), Config()
    else:
        kind, config = Method(method, "untrained"), Config(normalize=method.removeprefix("l3rs-"),
                                                           reference_horizon=task.horizon)
    make = make_optimizer(kind, {"lr": lr}, task.head, config)
    result = finetune(task, make, steps, seed, eval_every=steps)
    return {"task": task_name, "multiple": multiple, "method": method, "lr": lr, "seed": seed,
            "val_loss": result.final_val_loss, "seconds": result.seconds}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="cnn04-mnist59,mnistcnn-digits")
    parser.add_argument("--multiples", default="1,5")
    parser.add_argument("--seeds", default="1000,1001")
    parser.add_argument("--lrs", default="0.001,0.003,0.01,0.03")
    parser.add_argument("--normalize", default="rms,snr")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    methods = ["adamw-cosine", *(f"l3rs-{n}" for n in args.normalize.split(","))]
    jobs = [(t, m, method, int(s), lr) for t in args.tasks.split(",") for m in _floats(args.multiples)
            for method in methods for lr in _floats(args.lrs) for s in args.seeds.split(",")]
    with Pool(args.workers) as pool:
        runs = pool.map(_run, jobs)
    cells: dict[tuple, list[float]] = {}
    for r in runs:
        cells.setdefault((r["task"], r["multiple"], r["method"], r["lr"]), []).append(r["val_loss"])
    table = [{"task": t, "multiple": m, "method": method, "lr": lr, "val_loss_mean": sum(v) / len(v),
              "val_losses": v} for (t, m, method, lr), v in cells.items()]
    best = {}
    for row in table:
        key = f"{row['task']} x{row['multiple']:g} {row['method']}"
        if key not in best or row["val_loss_mean"] < best[key]["val_loss_mean"]:
            best[key] = {"lr": row["lr"], "val_loss_mean": row["val_loss_mean"]}
    print(json.dumps({"settings": vars(args), "machine": machine(), "best": best, "table": table}, indent=1))


if __name__ == "__main__":
    main()
