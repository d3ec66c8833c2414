"""`l3rs quickstart`: the whole story on the default task, sized for ~10 minutes on 2 CPU cores.

    prepare (load / pretrain the backbone, time a step) -> meta-train L3RS (default estimator)
    -> evaluate against LR-tuned baselines on held-out seeds, an unseen shift and 1x/2x/5x horizons
    -> print the summary and write report.md / report.html

`--budget-minutes` sizes every stage together (evaluation horizons, seeds, baselines and meta-training time)
and refuses, in one line naming the minimum, a budget below the smallest quickstart; Ctrl-C stops cleanly
(exit 130) and `--resume` continues (meta-training resumes from its last checkpoint; a finished stage is not
redone).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from l3rs import meta, tasks
from l3rs.errors import UsageError
from l3rs.evaluate import BASELINES as ALL_BASELINES
from l3rs.evaluate import Method, evaluate
from l3rs.evaluate.runs import MIN_EVAL_POINTS
from l3rs.evaluate.tuning import planned_runs
from l3rs.io import single_thread
from l3rs.report.tables import plus_minus, vs_best_text
from l3rs.results import EvaluationResult, Stat, VsBest

DEFAULT_TASK = "mnistcnn-digits"
DEFAULT_OUT = "runs/quickstart"
DEFAULT_BUDGET_MINUTES = 12.0
SHIFT = "rotated"
# The baselines a quickstart can afford (the full protocol: `l3rs evaluate --baselines all`).
BASELINES = ("adamw", "adamw-cosine-head", "sgd-cosine-head", "l3rs-untrained", "schedulefree-adamw", "prodigy")
# Fine-tuning steps per run: shorter than the task's default so that the whole protocol (LR sweeps of every
# baseline at 1x, 2x and 5x this horizon, 5 seeds each) fits in ~12 minutes on 2 cores.
QUICK_HORIZON = 60


@dataclass(frozen=True)
class Tier:
    """One size of the quickstart's evaluation; the budget picks the largest that fits."""

    horizons: tuple[float, ...]
    seeds: int
    baselines: tuple[str, ...]
    shift: bool


TIERS = (  # smallest first: the smallest is the smallest budget the quickstart accepts
    Tier((1,), 2, ("adamw",), False),
    Tier((1,), 3, ("adamw", "schedulefree-adamw", "prodigy"), True),
    Tier((1, 2), 5, BASELINES, True),
    Tier((1, 2, 5), 5, BASELINES, True),
)
META_MIN_SHARE = 0.3  # meta-training gets at least this share of the budget (but the smallest tier)
META_MIN_UNROLLS = 60  # ... and at least this many horizon-long runs' time (λ0, β and α sweeps + validation: ~54)
META_MIN_SECONDS = 5.0
PARALLEL_GAIN = 1.6  # two single-threaded worker processes vs one process running everything


class Timing(NamedTuple):
    """Measured on this machine before planning."""

    step: float  # one fine-tuning step (forward, backward, AdamW)
    validation: float  # one pass over the validation split
    startup: float = 0.0  # starting a Python process that imports the evaluation (a worker pool's cost)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--task", default=DEFAULT_TASK, help=f"task (default {DEFAULT_TASK})")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--budget-minutes", type=float, default=DEFAULT_BUDGET_MINUTES,
                        help=f"total wall-clock budget (default {DEFAULT_BUDGET_MINUTES:g})")
    parser.add_argument("--estimator", choices=("es", "pes", "bptt"), default=None,
                        help="meta-training estimator (default: l3rs.meta.MetaConfig's)")
    parser.add_argument("--horizon", type=int, default=QUICK_HORIZON,
                        help=f"fine-tuning steps of the meta-training runs (default {QUICK_HORIZON})")
    parser.add_argument("--seeds", type=int, default=None,
                        help="held-out evaluation seeds (default: as many as the budget affords, up to 5)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes for meta-training and evaluation runs (default: up to 2)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted quickstart in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _stage(name: str, budget_s: float | None = None) -> None:
    extra = f" (budget {budget_s / 60:.1f} min)" if budget_s else ""
    print(f"\n== {name}{extra}", flush=True)


def measure(task: Any, steps: int = 15) -> Timing:
    """Median wall time of a fine-tuning step and of a validation pass, single-threaded as the worker
    processes run them, and a process start, to size the stages (measured with all threads, a digits step
    took 18 ms instead of the workers' 32: the quickstart's evaluation took twice its estimate)."""
    with single_thread():
        return _measure(task, steps)


def _measure(task: Any, steps: int) -> Timing:
    model = task.model_fn(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_times, validation_times = [], []
    for x, y in task.batches(0, steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        task.loss(model(x), y).backward()
        opt.step()
        step_times.append(time.perf_counter() - start)
    for _ in range(3):
        start = time.perf_counter()
        task.evaluate(model)
        validation_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import l3rs.evaluate.runs"], check=True)
    return Timing(sorted(step_times)[len(step_times) // 2], sorted(validation_times)[1],
                  time.perf_counter() - start)


def evaluation_seconds(tier: Tier, horizon: int, seeds: int, timing: Timing, workers: int,
                       has_shift: bool) -> float:
    """Wall time of the evaluation a tier asks for: every scenario's sweeps, seeds, validation passes, and
    fixed costs (a worker pool per scenario, the report's figures), each counted as one process start."""
    methods = [Method("l3rs", "l3rs", tuned=False)] + [ALL_BASELINES[n] for n in tier.baselines]
    runs = planned_runs(methods, seeds)
    curve_runs = seeds * len(methods)  # validated MIN_EVAL_POINTS times (and tested); tuning runs once
    multiples = list(tier.horizons) + ([1.0] if tier.shift and has_shift else [])
    total = horizon * timing.step  # the coefficient trace
    for multiple in multiples:
        steps = max(1, round(multiple * horizon))
        passes = curve_runs * (min(steps, MIN_EVAL_POINTS) + 1) + runs - curve_runs
        total += runs * steps * timing.step + passes * timing.validation
    fixed = timing.startup * (1 + (len(multiples) if workers > 1 else 0))
    return total / (PARALLEL_GAIN if workers > 1 else 1.0) + fixed


def min_meta_seconds(horizon: int, timing: Timing) -> float:
    return max(META_MIN_SECONDS, META_MIN_UNROLLS * horizon * timing.step)


def _overridden(tier: Tier, seeds: int | None, baselines: Sequence[str] | None,
                horizons: Sequence[float] | None) -> Tier:
    """`tier` with the seeds, baselines and horizons a caller fixed."""
    return Tier(tuple(horizons or tier.horizons), seeds or tier.seeds, tuple(baselines or tier.baselines),
                tier.shift)


def plan(horizon: int, budget_s: float, seeds: int | None, timing: Timing, workers: int,
         has_shift: bool, baselines: Sequence[str] | None = None,
         horizons: Sequence[float] | None = None) -> dict[str, Any] | None:
    """The largest tier whose evaluation leaves meta-training its share; meta-training gets the rest of
    `budget_s`. None when not even the smallest tier fits. `seeds`, `baselines` and `horizons` override the
    tiers' own."""
    for index in reversed(range(len(TIERS))):
        tier = _overridden(TIERS[index], seeds, baselines, horizons)
        eval_s = evaluation_seconds(tier, horizon, tier.seeds, timing, workers, has_shift)
        meta_s = budget_s - eval_s
        if meta_s >= min_meta_seconds(horizon, timing) and (index == 0 or meta_s >= META_MIN_SHARE * budget_s):
            return {"step_seconds": timing.step, "validation_seconds": timing.validation,
                    "eval_seconds_estimate": eval_s, "meta_seconds": meta_s, "horizon": horizon,
                    "seeds": tier.seeds, "baselines": list(tier.baselines),
                    "horizons": list(tier.horizons), "shift": tier.shift and has_shift}
    return None


def smallest_seconds(horizon: int, seeds: int | None, timing: Timing, workers: int, has_shift: bool,
                     baselines: Sequence[str] | None = None, horizons: Sequence[float] | None = None) -> float:
    """The budget of the smallest tier (besides preparing); `seeds`, `baselines`, `horizons` as in `plan`."""
    tier = _overridden(TIERS[0], seeds, baselines, horizons)
    return (evaluation_seconds(tier, horizon, tier.seeds, timing, workers, has_shift)
            + min_meta_seconds(horizon, timing))


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


def _prepare(task_spec: str, out: Path, budget_minutes: float, seeds: int | None, workers: int, resume: bool,
             horizon: int, start: float) -> tuple[Any, dict[str, Any]]:
    """Load the task (pretraining its backbone if needed), measure, and plan; refuse a budget too small."""
    family = tasks.family(task_spec)
    plan_file = out / "plan.json"
    if resume and plan_file.exists():
        return family, json.loads(plan_file.read_text())
    timing = measure(family.base)
    has_shift = f"{task_spec}:{SHIFT}" in tasks.names()
    spent = time.perf_counter() - start
    stages = plan(horizon, 60 * budget_minutes - spent, seeds, timing, workers, has_shift)
    if stages is None:
        needed = spent + smallest_seconds(horizon, seeds, timing, workers, has_shift)
        raise UsageError(f"quickstart: --budget-minutes {budget_minutes:g} is below the smallest quickstart of "
                         f"{task_spec} on this machine (preparing took {spent:.0f} s, a step "
                         f"{1000 * timing.step:.1f} ms): {math.ceil(needed / 6) / 10:g} minutes")
    if out.exists() and not resume:
        shutil.rmtree(out)  # a quickstart without --resume starts over
    out.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps(stages, indent=1))
    return family, stages


def quickstart(task_spec: str = DEFAULT_TASK, out: str | Path = DEFAULT_OUT,
               budget_minutes: float = DEFAULT_BUDGET_MINUTES, estimator: str | None = None,
               seeds: int | None = None, workers: int = 2, resume: bool = False, progress: bool = True,
               horizon: int = QUICK_HORIZON) -> dict[str, Any]:
    """Run every stage within `budget_minutes`; returns the headline figures (also in out/headline.json).

    The budget sizes everything together: the evaluation tier (horizons, seeds, baselines, shift) and the
    meta-training time. `seeds` (default: the tier's) overrides the evaluation seeds."""
    start = time.perf_counter()
    out = Path(out)
    _stage(f"1/3 prepare: {task_spec} (pretrained backbone, data)")
    family, stages = _prepare(task_spec, out, budget_minutes, seeds, workers, resume, horizon, start)
    print(f"one step ≈ {1000 * stages['step_seconds']:.0f} ms; horizon {stages['horizon']} steps; evaluation "
          f"(horizons ×{', ×'.join(f'{h:g}' for h in stages['horizons'])}, {stages['seeds']} seeds, "
          f"{len(stages['baselines'])} baselines) ≈ {stages['eval_seconds_estimate'] / 60:.1f} min", flush=True)

    _stage("2/3 meta-train L3RS", stages["meta_seconds"])
    meta_dir = out / "meta"
    best = meta_dir / "best"
    if not (out / "meta.done").exists():
        # the CLI's recipe (sampled run lengths, base schedule, multi-horizon selection), only shorter runs and
        # the planned budget: short truncations tuned to one horizon won at 1x and lost at 5x (docs/RESULTS.md)
        defaults = meta.MetaConfig()
        cfg = meta.MetaConfig(estimator=estimator or defaults.estimator, iterations=1_000_000,
                              horizon=stages["horizon"], budget_minutes=stages["meta_seconds"] / 60, workers=workers)
        best = meta.train(family, meta_dir, cfg, resume=resume and (meta_dir / "checkpoint.safetensors").exists(),
                          progress=progress)
        (out / "meta.done").write_text("")

    shifts = [SHIFT] if stages["shift"] else []
    _stage("3/3 evaluate on held-out seeds" + (f" and the unseen shift :{SHIFT}" if shifts else ""))
    result = evaluate(best, task_spec, out / "eval", horizons=stages["horizons"], seeds=stages["seeds"],
                      baselines=stages["baselines"], shifts=shifts, progress=progress, workers=workers)
    head = headline(result)
    head.update(wall_seconds=time.perf_counter() - start, budget_seconds=60 * budget_minutes, task=task_spec)
    (out / "headline.json").write_text(json.dumps(head, indent=1))
    print_table(head)
    print(f"\nreport: {out / 'eval' / 'report.md'} (and report.html); total {head['wall_seconds'] / 60:.1f} min "
          f"of a {budget_minutes:g}-minute budget")
    return head


def run(args: argparse.Namespace) -> int:
    if not args.budget_minutes > 0:
        raise UsageError(f"quickstart: --budget-minutes must be > 0, got {args.budget_minutes:g}")
    if args.seeds is not None and args.seeds < 1:
        raise UsageError("quickstart: --seeds must be >= 1")
    if args.horizon < 1:
        raise UsageError("quickstart: --horizon must be >= 1")
    quickstart(args.task, args.out, args.budget_minutes, args.estimator, args.seeds, args.workers, args.resume,
               not args.no_progress, args.horizon)
    return 0
