"""Costs of the built-in tasks and the text task's fine-tuning gap; print JSON (the figures in docs/tasks.md).

    python benchmarks/tasks.py [--seeds 3] [--lrs 1e-4,3e-4,1e-3,3e-3] [--out runs/tasks.json]

Measures, for every built-in task: one AdamW fine-tuning step at the task's batch size (median CPU and wall
seconds, 1 thread). For `minilm-chatterbot`, also: building the frozen-block cache cold (in a fresh cache
dir) and warm; one AdamW step and one L3RS unroll step at 1 and 2 threads; and validation/test accuracy of
a fresh head (chance), nearest class mean on the pretrained sentence embedding (zero-shot: no gradient
step), AdamW on the head only, and AdamW on top block + head, at the task's horizon, the LR picked per
method by mean final validation loss over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from l3rs import tasks
from l3rs.functional import Config
from l3rs.io import machine, save_json
from l3rs.meta.unroll import unroll
from l3rs.tasks import Task, text


def _clear_caches() -> None:
    for fn in (text.splits, text.encoded, text.top_blocks_state):
        fn.cache_clear()


def cache_seconds(root: Path) -> dict:
    """Cold build into the empty cache dir `root` (transformers import included), then a warm reload."""
    out = {}
    for label in ("cold", "warm"):
        _clear_caches()
        start = time.perf_counter()
        text.splits(text.RECIPE)
        text.top_blocks_state(text.RECIPE.trainable_blocks)
        out[f"{label}_main_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        text.splits(text.RECIPE, heldout=True)
        out[f"{label}_heldout_s"] = round(time.perf_counter() - start, 2)
    out["cache_mb"] = round(sum(p.stat().st_size for p in root.rglob("*.safetensors")) / 2**20, 1)
    return out


def _median_step(run_steps, steps: int) -> dict:
    """Median CPU and wall seconds per step of `run_steps(n)`, timed as one call per step after warm-up."""
    cpu, wall = [], []
    run_steps(3)
    for _ in range(steps):
        c, w = time.process_time(), time.perf_counter()
        run_steps(1)
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return {"cpu_s": round(statistics.median(cpu), 4), "wall_s": round(statistics.median(wall), 4)}


def _adamw_steps(task: Task):
    model = task.model_fn(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = iter(task.batches(0, 10_000))

    def run(n: int) -> None:
        for _ in range(n):
            x, y = next(batches)
            loss = task.loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return run


def step_seconds(task: Task, steps: int) -> dict:
    """AdamW and L3RS unroll steps of `task` at 1 and 2 threads, and a first-order meta-gradient unroll."""
    model, adamw = task.model_fn(0), _adamw_steps(task)

    config = Config()
    meta = config.init_meta(sum(p.requires_grad for p in model.parameters()))

    def l3rs(graph: str | None):
        def run(n: int) -> None:
            value, _ = unroll(task, meta, 1e-4, n, seed=0, config=config, horizon=task.horizon, graph=graph,
                              objective="train_loss")
            if graph is not None:
                value.backward()
        return run

    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out[f"adamw_{threads}t"] = _median_step(adamw, steps)
        out[f"l3rs_unroll_{threads}t"] = _median_step(l3rs(None), steps)
    torch.set_num_threads(1)
    first = _median_step(l3rs("first"), max(3, steps // 3))
    out["l3rs_unroll_first_order_1t_note"] = "one 1-step unroll with graph='first' + backward (fixed costs included)"
    out["l3rs_unroll_first_order_1t"] = first
    return out


@torch.no_grad()
def nearest_mean(task: Task) -> dict:
    """Zero-shot: class means of the pretrained sentence embedding (pooled top block) on train."""
    model = task.model_fn(0).eval()

    def embed(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(model.embed(x), dim=-1)

    x, y = task.train
    means = torch.stack([embed(x[y == c]).mean(0) for c in range(int(y.max()) + 1)])
    means = torch.nn.functional.normalize(means, dim=-1)
    return {s: float((embed(task.split(s)[0]) @ means.T).argmax(-1).eq(task.split(s)[1]).float().mean())
            for s in ("val", "test")}


def finetune(task: Task, lr: float, seed: int, head_only: bool) -> dict:
    model = task.model_fn(seed)
    params = [p for n, p in model.named_parameters() if n in task.head or not head_only]
    opt = torch.optim.AdamW(params, lr=lr)
    for x, y in task.batches(seed, task.horizon):
        loss = task.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    val, test = task.evaluate(model, "val"), task.evaluate(model, "test")
    return {"val_loss": val["loss"], "val_acc": val["metric"], "test_acc": test["metric"]}


def accuracy(task: Task, seeds: int, lrs: list[float]) -> dict:
    fresh = [task.evaluate(task.model_fn(s))["metric"] for s in range(seeds)]
    out: dict = {"fresh_head_val_acc": round(statistics.mean(fresh), 3), "nearest_mean": nearest_mean(task)}
    for label, head_only in (("adamw_head_only", True), ("adamw_block_and_head", False)):
        sweep = {lr: [finetune(task, lr, s, head_only) for s in range(seeds)] for lr in lrs}
        best = min(sweep, key=lambda lr: statistics.mean(r["val_loss"] for r in sweep[lr]))
        summary = {k: (round(statistics.mean(r[k] for r in sweep[best]), 4),
                       round(statistics.stdev(r[k] for r in sweep[best]), 4) if seeds > 1 else 0.0)
                   for k in ("val_loss", "val_acc", "test_acc")}
        out[label] = {"best_lr": best, "mean_std": summary,
                      "val_loss_by_lr": {lr: round(statistics.mean(r["val_loss"] for r in rs), 4)
                                         for lr, rs in sweep.items()}}
    return out


def run(seeds: int, lrs: list[float], step_samples: int, cache: Path) -> dict:
    """The text task's figures, built in the empty cache dir `cache`."""
    result = {"recipe": asdict(text.RECIPE), "load_before": os.getloadavg(), "cache": cache_seconds(cache)}
    main_task = text.make_family().base
    result["step"] = step_seconds(main_task, step_samples)
    torch.set_num_threads(1)
    result["accuracy"] = {"main": accuracy(main_task, seeds, lrs),
                          "heldout": accuracy(text.make_family(heldout=True).base, seeds, lrs)}
    result["load_after"] = os.getloadavg()
    result["machine"] = machine()
    return result



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3")
    parser.add_argument("--step-samples", type=int, default=20)
    parser.add_argument("--tasks", default="mnistcnn-digits,cnn04-mnist59,cnn04-digits,mlp-mnist1d-shift,"
                        "mlp-mnist1d-warp,effnet-mnist,minilm-top3-chatterbot",
                        help="built-in tasks whose AdamW step is timed too (their usual cache dir)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lrs = [float(v) for v in args.lrs.split(",")]
    torch.set_num_threads(1)
    steps = {name: _median_step(_adamw_steps(tasks.get(name)), args.step_samples)
             for name in args.tasks.split(",") if name}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["L3RS_CACHE"] = tmp  # a cold cache, used for the whole text run
        result = run(args.seeds, lrs, args.step_samples, Path(tmp))
    result["adamw_step_1t"] = steps
    if args.out:
        save_json(result, Path(args.out))
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
