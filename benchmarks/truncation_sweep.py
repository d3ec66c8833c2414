"""Effect of the bptt truncation length on early progress; prints JSON.

For each truncation, meta-train L3RS on `mnistcnn-digits` (horizon 60, 40 iterations, λ0 3e-4, one worker,
one thread: deterministic), then compare its mean validation curve on held-out seeds 1000-1002 with AdamW at
the learning rate the quickstart's sweep picks at 1x (1e-3), and report the speed-up (SPEC §6).

    python benchmarks/truncation_sweep.py [--truncations 25,15,60] [--out runs/truncation]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from l3rs import L3RS, meta, tasks
from l3rs.evaluate.stats import speedup
from l3rs.finetune import finetune
from l3rs.io import machine

HORIZON, SEEDS, EVERY = 60, (1000, 1001, 1002), 5


def mean_curve(task: tasks.Task, make) -> tuple[list[float], list[int]]:
    runs = [finetune(task, make, HORIZON, s, eval_every=EVERY) for s in SEEDS]
    return [sum(r.val_loss[i] for r in runs) / len(runs) for i in range(len(runs[0].val_loss))], runs[0].eval_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--truncations", default="25,15,60")
    parser.add_argument("--out", default="runs/truncation")
    args = parser.parse_args()
    torch.set_num_threads(1)
    family, task = tasks.family("mnistcnn-digits"), tasks.get("mnistcnn-digits")
    adamw, steps = mean_curve(task, lambda named, total: torch.optim.AdamW([p for _, p in named], lr=1e-3))
    rows = []
    for k in (int(x) for x in args.truncations.split(",")):
        cfg = meta.MetaConfig(estimator="bptt", horizon=HORIZON, iterations=40, lr0=3e-4, workers=1,
                              validation_seeds=3, truncation=k)
        best = meta.train(family, f"{args.out}/t{k}", cfg, progress=False)
        ours, _ = mean_curve(task, lambda named, total, best=best: L3RS.from_pretrained(best, named, total_steps=total))
        gain = dataclasses.asdict(speedup(adamw, ours, steps))
        rows.append({"truncation": k, "l3rs_val_loss": ours, "speedup": gain})
    print(json.dumps({"eval_steps": steps, "adamw_val_loss": adamw, "rows": rows, "machine": machine()}, indent=1))


if __name__ == "__main__":
    main()
