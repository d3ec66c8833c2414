"""`l3rs quickstart`: the whole story on the default task, sized for ~10 minutes on 2 CPU cores.

    prepare (load / pretrain the backbone, time a step) -> meta-train L3RS (default estimator)
    -> evaluate against LR-tuned baselines on held-out seeds, an unseen shift and 1x/2x/5x horizons
    -> print the summary and write report.md / report.html

`--budget-minutes` scales every stage; Ctrl-C stops cleanly and `--resume` continues (meta-training resumes
from its last checkpoint; a finished stage is not redone).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from l3rs import meta, tasks
from l3rs.cli import UsageError
from l3rs.evaluate import BASELINES as ALL_BASELINES
from l3rs.evaluate import Method, evaluate
from l3rs.evaluate.tuning import planned_runs
from l3rs.report.tables import plus_minus, vs_best_text
from l3rs.results import EvaluationResult, Stat, VsBest

DEFAULT_TASK = "mnistcnn-digits"
DEFAULT_OUT = "runs/quickstart"
DEFAULT_BUDGET_MINUTES = 12.0
HORIZONS = (1, 2, 5)
SHIFT = "rotated"
# The baselines a quickstart can afford (the full protocol: `l3rs evaluate --baselines all`).
BASELINES = ("adamw", "adamw-cosine-head", "sgd-cosine-head", "l3rs-untrained", "schedulefree-adamw", "prodigy")
META_SHARE = 0.45  # of the budget left after preparing; the evaluation's runs get the rest
# Fine-tuning steps per run: shorter than the task's default so that the whole protocol (LR sweeps of every
# baseline at 1x, 2x and 5x this horizon, 3 seeds each) fits in ~10 minutes on 2 cores.
QUICK_HORIZON = 60


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--task", default=DEFAULT_TASK, help=f"task (default {DEFAULT_TASK})")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--budget-minutes", type=float, default=DEFAULT_BUDGET_MINUTES,
                        help=f"total wall-clock budget (default {DEFAULT_BUDGET_MINUTES:g})")
    parser.add_argument("--estimator", choices=("es", "pes", "bptt"), default=None,
                        help="meta-training estimator (default: l3rs.meta.MetaConfig's)")
    parser.add_argument("--horizon", type=int, default=QUICK_HORIZON,
                        help=f"fine-tuning steps of the meta-training runs (default {QUICK_HORIZON})")
    parser.add_argument("--seeds", type=int, default=3, help="held-out evaluation seeds (default 3)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes for meta-training and evaluation runs (default: up to 2)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted quickstart in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _stage(name: str, budget_s: float | None = None) -> None:
    extra = f" (budget {budget_s / 60:.1f} min)" if budget_s else ""
    print(f"\n== {name}{extra}", flush=True)


def step_seconds(task: Any, steps: int = 15) -> float:
    """Median wall time of one fine-tuning step (forward, backward, AdamW), to size the stages."""
    model = task.model_fn(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for x, y in task.batches(0, steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        task.loss(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def evaluation_steps(base_horizon: int, seeds: int, baselines: tuple[str, ...]) -> int:
    """Fine-tuning steps the evaluation will run (every scenario's sweeps and seeds)."""
    methods = [Method("l3rs", "l3rs", tuned=False)] + [ALL_BASELINES[n] for n in baselines]
    per_scenario = planned_runs(methods, seeds)
    return per_scenario * base_horizon * (sum(HORIZONS) + 1)


def plan(horizon: int, budget_s: float, seeds: int, step_s: float, workers: int) -> dict[str, Any]:
    """Split the budget: evaluation cost is fixed by the protocol, meta-training gets a share of the rest."""
    # measured: validation passes add ~50% to a single process; two workers win most of it back
    eval_s = evaluation_steps(horizon, seeds, BASELINES) * step_s * (1.5 if workers < 2 else 1.15)
    meta_s = max(min(45.0, 0.3 * budget_s), min(budget_s * META_SHARE, budget_s - eval_s))
    return {"step_seconds": step_s, "eval_seconds_estimate": eval_s, "meta_seconds": meta_s,
            "horizon": horizon, "seeds": seeds, "baselines": list(BASELINES),
            "horizons": list(HORIZONS), "shift": SHIFT}


def headline(result: EvaluationResult) -> dict[str, Any]:
    """The figures that matter, per scenario: L3RS vs the best tuned baseline (saved as headline.json)."""
    rows = []
    for scenario in result.scenarios:
        best = scenario.best_baseline
        ours, theirs = scenario.methods["l3rs"], scenario.methods[best]
        rows.append({
            "scenario": scenario.label, "steps": scenario.steps, "best_baseline": best,
            "l3rs_val_loss": ours.summary.val_loss.mean,
            "l3rs_val_loss_std": ours.summary.val_loss.std,
            "baseline_val_loss": theirs.summary.val_loss.mean,
            "baseline_val_loss_std": theirs.summary.val_loss.std,
            "l3rs_test_acc": ours.summary.test_metric.mean,
            "baseline_test_acc": theirs.summary.test_metric.mean,
            "speedup": ours.speedup.ratio, "speedup_text": ours.speedup.text,
            "ratio": ours.vs_best.ratio, "ratio_ci95": ours.vs_best.ratio_ci95,
            "speedup_ci95": ours.vs_best.speedup_ci95, "verdict": ours.vs_best.verdict,
            "lower_val_loss": (ours.summary.val_loss.mean or math.inf) < (theirs.summary.val_loss.mean or math.inf),
            "baselines_sweep_seconds": sum(m.tuning.seconds for m in scenario.methods.values() if m.kind != "l3rs"),
            "l3rs_run_seconds": ours.summary.seconds.mean,
        })
    return {"rows": rows, "meta_train_seconds": result.optimizer.info.get("meta_train_seconds")}


def print_table(head: dict[str, Any]) -> None:
    print("\n| scenario | best tuned baseline | its val loss | L3RS val loss | loss ratio [95% CI] | "
          "speed-up [95% CI] | verdict |")
    print("|---|---|---|---|---|---|---|")
    for r in head["rows"]:
        ratio, speed = vs_best_text(VsBest(r["ratio"], r["ratio_ci95"], r["speedup"] or 0.0, r["speedup_ci95"],
                                           r["verdict"]))
        theirs = plus_minus(Stat(r["baseline_val_loss"], r["baseline_val_loss_std"]))
        ours = plus_minus(Stat(r["l3rs_val_loss"], r["l3rs_val_loss_std"]))
        print(f"| {r['scenario']} | {r['best_baseline']} | {theirs} | {ours} | {ratio} | {speed} | {r['verdict']} |")
    row = head["rows"][0]
    meta = head["meta_train_seconds"] or 0.0
    print(f"\ncost at the meta-training horizon: L3RS meta-training {meta:.0f} s + one run "
          f"{row['l3rs_run_seconds']:.1f} s vs the baselines' LR sweeps {row['baselines_sweep_seconds']:.0f} s")


def quickstart(task_spec: str = DEFAULT_TASK, out: str | Path = DEFAULT_OUT,
               budget_minutes: float = DEFAULT_BUDGET_MINUTES, estimator: str | None = None, seeds: int = 3,
               workers: int = 2, resume: bool = False, progress: bool = True,
               horizon: int = QUICK_HORIZON) -> dict[str, Any]:
    """Run every stage; returns the headline figures (also written to out/headline.json)."""
    start = time.perf_counter()
    out = Path(out)
    if out.exists() and not resume:
        shutil.rmtree(out)  # a quickstart without --resume starts over
    out.mkdir(parents=True, exist_ok=True)
    budget_s = 60 * budget_minutes

    _stage(f"1/3 prepare: {task_spec} (pretrained backbone, data)")
    family = tasks.family(task_spec)
    task = family.base
    plan_file = out / "plan.json"
    if resume and plan_file.exists():
        stages = json.loads(plan_file.read_text())
    else:
        stages = plan(horizon, budget_s - (time.perf_counter() - start), seeds, step_seconds(task), workers)
        plan_file.write_text(json.dumps(stages, indent=1))
    print(f"one step ≈ {1000 * stages['step_seconds']:.0f} ms; horizon {stages['horizon']} steps; evaluation ≈ "
          f"{stages['eval_seconds_estimate'] / 60:.1f} min", flush=True)

    _stage("2/3 meta-train L3RS", stages["meta_seconds"])
    meta_dir = out / "meta"
    best = meta_dir / "best"
    if not (out / "meta.done").exists():
        defaults = meta.MetaConfig()
        # truncations of a quarter horizon: the bptt objective averages validation loss at every truncation
        # end, so short ones reward early progress (measured: speed-up 1.0x -> 2.2x at truncation 25 -> 15)
        cfg = meta.MetaConfig(estimator=estimator or defaults.estimator, iterations=1_000_000,
                              horizon=stages["horizon"], truncation=max(5, stages["horizon"] // 4),
                              budget_minutes=stages["meta_seconds"] / 60, workers=workers)
        best = meta.train(family, meta_dir, cfg, resume=resume and (meta_dir / "checkpoint.safetensors").exists(),
                          progress=progress)
        (out / "meta.done").write_text("")

    shifts = [SHIFT] if f"{task_spec}:{SHIFT}" in tasks.names() else []
    _stage("3/3 evaluate on held-out seeds, 1x/2x/5x horizons" + (f" and the unseen shift :{SHIFT}" if shifts else ""))
    result = evaluate(best, task_spec, out / "eval", horizons=HORIZONS, seeds=seeds, baselines=BASELINES,
                      shifts=shifts, progress=progress, workers=workers)
    head = headline(result)
    head["wall_seconds"] = time.perf_counter() - start
    head["task"] = task_spec
    (out / "headline.json").write_text(json.dumps(head, indent=1))
    print_table(head)
    print(f"\nreport: {out / 'eval' / 'report.md'} (and report.html); total {head['wall_seconds'] / 60:.1f} min")
    return head


def run(args: argparse.Namespace) -> int:
    if args.budget_minutes <= 0 or args.seeds < 1:
        raise UsageError("quickstart: --budget-minutes must be > 0 and --seeds >= 1")
    if args.horizon < 1:
        raise UsageError("quickstart: --horizon must be >= 1")
    quickstart(args.task, args.out, args.budget_minutes, args.estimator, args.seeds, args.workers, args.resume,
               not args.no_progress, args.horizon)
    return 0
