"""One suite, one table: for every built-in task, `l3rs meta-train` with the CLI defaults, then the evaluation
protocol (tuned baselines on 2 tuning seeds, paired evaluation seeds, bootstrap intervals); prints JSON.

    python benchmarks/suite.py [--tasks all|name,...] [--budget-minutes 55] [--horizons auto|1,2] [--seeds 5]
                               [--baselines auto|adamw,...|all] [--shifts rotated|heldout] [--out runs/suite]

Writes OUT/suite.md (one table: L3RS vs the best tuned baseline per task and scenario, with 95% intervals,
plus the break-even count per task) and OUT/suite.png (the final-loss ratio and its interval per task and
scenario). `--budget-minutes` is the whole suite's (default 55, so that it ends within an hour with the
overruns measured so far). Every task's step and validation times are measured first, giving its smallest
run (the quickstart's smallest evaluation tier plus meta-training's minimum); the tasks whose smallest runs
fit the budget together (cheapest first) run, the others are skipped and said so. When a task starts it gets
its smallest run plus an equal part of what the remaining tasks' smallest runs leave of the budget, and plans
it like `l3rs quickstart` plans its budget (the largest evaluation tier — horizons, baselines, shift — that
leaves meta-training its minimum and 30% of the share; meta-training gets the rest), so a slow task
(effnet-mnist's smallest run is 18-28 minutes on 2 cores) is not crowded out by an equal split.
--horizons/--baselines override the tiers'. The JSON says what each stage was planned to take and took.

Break-even: after how many fine-tuning jobs meta-training once + one L3RS run per job costs less CPU time
than, per job, sweeping the best baseline's LR (its tuning runs at 1x) + one run at the chosen LR.
Meta-training CPU time is measured with getrusage over the `l3rs meta-train` process tree; evaluation runs
are single-threaded, so their recorded wall seconds are CPU seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from l3rs import quickstart, tasks  # noqa: E402
from l3rs.evaluate import BASELINES, evaluate  # noqa: E402
from l3rs.io import finite, machine, save_json  # noqa: E402
from l3rs.meta.command import MIN_BUDGET_MINUTES  # noqa: E402
from l3rs.report.tables import plus_minus, vs_best_text  # noqa: E402
from l3rs.results import EvaluationResult, VsBest  # noqa: E402

WORKERS = 2
# 5 minutes below the hour the suite must fit: a task's stages overran their plan by up to 13% (session 13), and
# the last task's overrun has no later share to come out of (the whole suite took 61.6 min of a 60-min budget)
DEFAULT_BUDGET_MINUTES = 55.0


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def meta_train(task: str, out: Path, budget_minutes: float) -> tuple[Path, float]:
    """`l3rs meta-train` with the CLI defaults and a budget; returns (best optimizer dir, CPU seconds)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    before = children_cpu_seconds()
    subprocess.run([sys.executable, "-m", "l3rs", "meta-train", "--task", task, "--out", str(out),
                    "--budget-minutes", f"{budget_minutes:g}", "--no-progress"],
                   check=True, env=env, stdout=sys.stderr)
    return out / "best", children_cpu_seconds() - before


def break_even(meta_cpu_s: float, sweep_s: float, baseline_run_s: float, l3rs_run_s: float) -> int | None:
    """Fewest jobs n with meta + n·l3rs_run < n·(sweep + baseline_run); None when L3RS never catches up."""
    saving = sweep_s + baseline_run_s - l3rs_run_s
    return math.floor(meta_cpu_s / saving) + 1 if saving > 0 else None


def rows_of(task: str, result: EvaluationResult) -> list[dict[str, Any]]:
    """One row per scenario: L3RS against the best tuned baseline."""
    out = []
    for scenario in result.scenarios:
        ours = scenario.methods["l3rs"]
        out.append({"task": task, "scenario": scenario.label, "best_baseline": scenario.best_baseline,
                    "l3rs_val_loss": plus_minus(ours.summary.val_loss),
                    "baseline_val_loss": plus_minus(scenario.methods[scenario.best_baseline].summary.val_loss),
                    "ratio": ours.vs_best.ratio, "ratio_ci95": ours.vs_best.ratio_ci95,
                    "speedup": ours.vs_best.speedup, "speedup_ci95": ours.vs_best.speedup_ci95,
                    "verdict": ours.vs_best.verdict})
    return out


def cost_of(task: str, result: EvaluationResult, meta_cpu_s: float) -> dict[str, Any]:
    """Break-even at the meta-training horizon (the first scenario)."""
    first = result.scenarios[0]
    best, ours = first.methods[first.best_baseline], first.methods["l3rs"]
    sweep_s, base_run, l3rs_run = best.tuning.seconds, best.summary.seconds.mean, ours.summary.seconds.mean
    return {"task": task, "meta_train_cpu_seconds": meta_cpu_s, "best_baseline": first.best_baseline,
            "sweep_seconds_per_job": sweep_s, "baseline_run_seconds": base_run, "l3rs_run_seconds": l3rs_run,
            "break_even_jobs": break_even(meta_cpu_s, sweep_s, base_run, l3rs_run)}


def markdown(rows: list[dict[str, Any]], costs: list[dict[str, Any]]) -> str:
    lines = ["| task | scenario | best tuned baseline | its val loss | L3RS val loss | loss ratio [95% CI] | "
             "speed-up [95% CI] | verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio, speed = vs_best_text(_vs_best(r))
        lines.append(f"| {r['task']} | {r['scenario']} | {r['best_baseline']} | {r['baseline_val_loss']} | "
                     f"{r['l3rs_val_loss']} | {ratio} | {speed} | {r['verdict']} |")
    lines += ["", "| task | meta-training CPU s | best baseline | its LR sweep s per job | break-even (jobs) |",
              "|---|---|---|---|---|"]
    for c in costs:
        jobs = "never" if c["break_even_jobs"] is None else str(c["break_even_jobs"])
        lines.append(f"| {c['task']} | {c['meta_train_cpu_seconds']:.0f} | {c['best_baseline']} | "
                     f"{c['sweep_seconds_per_job']:.1f} | {jobs} |")
    return "\n".join(lines) + "\n"


def _vs_best(row: dict[str, Any]) -> VsBest:
    return VsBest(row["ratio"], row["ratio_ci95"], row["speedup"], row["speedup_ci95"], row["verdict"])


def figure(rows: list[dict[str, Any]], path: Path) -> Path:
    """Final-loss ratio vs the best tuned baseline with its 95% interval, one line per task and scenario."""
    colors = {"better": "#2ca02c", "tie": "#7f7f7f", "worse": "#d62728"}
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    for i, r in enumerate(rows):
        lo, hi = (min(v, 1e3) for v in r["ratio_ci95"])  # a diverged seed makes the interval infinite
        ratio = min(r["ratio"], 1e3)
        ax.errorbar(ratio, i, xerr=[[ratio - lo], [hi - ratio]], fmt="o", color=colors[r["verdict"]], capsize=3)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["scenario"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="L3RS final val loss / best tuned baseline's (95% CI; < 1 is better)",
           title="L3RS vs the best tuned baseline")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _list(text: str, every: list[str]) -> list[str]:
    return every if text == "all" else [x.strip() for x in text.split(",") if x.strip()]


def task_shifts(name: str, text: str, known: set[str]) -> list[str]:
    """The shifts `text` asks of task `name`: "auto" every variant it has, "none", "a,b" those of a, b it has,
    "a|b" the first of a, b it has (one shift per task, whichever kind it offers)."""
    if text == "auto":
        return [s.split(":", 1)[1] for s in sorted(known) if s.startswith(f"{name}:")]
    if "|" in text:
        return [s for s in (x.strip() for x in text.split("|")) if f"{name}:{s}" in known][:1]
    return [s for s in _list(text, []) if text != "none" and f"{name}:{s}" in known]


class Need(NamedTuple):
    """What a task's runs cost on this machine, measured before anything runs."""

    horizon: int  # fine-tuning steps of its base task
    timing: quickstart.Timing
    shifts: list[str]
    smallest_seconds: float  # its smallest evaluation tier plus meta-training's minimum


def measure_needs(names: list[str], args: argparse.Namespace) -> dict[str, Need]:
    known, out = set(tasks.names()), {}
    for name in names:
        base = tasks.family(name).base
        shifts, timing = task_shifts(name, args.shifts, known), quickstart.measure(base)
        out[name] = Need(base.horizon, timing, shifts, quickstart.smallest_seconds(
            base.horizon, args.seeds, timing, WORKERS, bool(shifts), _baselines(args), _horizons(args)))
    return out


def affordable(smallest: dict[str, float], budget_s: float) -> list[str]:
    """The tasks whose smallest runs fit the budget together, cheapest first (in the given order)."""
    kept, total = set(), 0.0
    for name in sorted(smallest, key=smallest.__getitem__):
        if total + smallest[name] <= budget_s:
            kept.add(name)
            total += smallest[name]
    return [name for name in smallest if name in kept]


def share_of(name: str, left_s: float, remaining: list[str], smallest: dict[str, float]) -> float:
    """A task's share of what is left: its smallest run plus an equal part of what the smallest runs of the
    remaining tasks (itself included) leave over, so an expensive task does not crowd out the others."""
    return smallest[name] + max(0.0, left_s - sum(smallest[n] for n in remaining)) / len(remaining)


def plan_task(need: Need, budget_s: float, args: argparse.Namespace) -> dict[str, Any] | None:
    """Quickstart-style plan of a task within `budget_s`, or None when it cannot fit."""
    return quickstart.plan(need.horizon, budget_s, args.seeds, need.timing, WORKERS,
                           bool(need.shifts), _baselines(args), _horizons(args))


def _baselines(args: argparse.Namespace) -> list[str] | None:
    return None if args.baselines == "auto" else _list(args.baselines, list(BASELINES))


def _horizons(args: argparse.Namespace) -> list[float] | None:
    return None if args.horizons == "auto" else [float(h) for h in args.horizons.split(",")]


def run_task(name: str, need: Need, share: float, args: argparse.Namespace,
             out: Path) -> tuple[dict[str, Any], EvaluationResult | None, float]:
    """Meta-train and evaluate one task within `share` seconds: (its stage record, result, meta CPU s)."""
    t0 = time.perf_counter()
    stage: dict[str, Any] = {"task": name, "budget_seconds": share, "smallest_seconds": need.smallest_seconds}
    planned = plan_task(need, share, args)
    if planned is None:  # the tasks before it overran their shares
        print(f"suite: {name} skipped: its share ({share / 60:.1f} min) is below its smallest run", file=sys.stderr)
        return {**stage, "skipped": "the tasks before it left less than its smallest run"}, None, 0.0
    minutes = max(MIN_BUDGET_MINUTES, planned["meta_seconds"] / 60)  # the CLI's smallest budget
    best, meta_cpu = meta_train(name, out / "meta", minutes)
    t1 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        result = evaluate(best, name, out / "eval", horizons=planned["horizons"], seeds=planned["seeds"],
                          baselines=planned["baselines"], shifts=need.shifts if planned["shift"] else [],
                          progress=False, workers=WORKERS)
    return {**stage, "plan": planned, "meta_train_seconds": t1 - t0, "evaluate_seconds": time.perf_counter() - t1,
            "seconds": time.perf_counter() - t0}, result, meta_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="all", help="'all' built-in tasks or comma-separated task specs")
    parser.add_argument("--budget-minutes", type=float, default=DEFAULT_BUDGET_MINUTES,
                        help=f"whole suite (default {DEFAULT_BUDGET_MINUTES:g}: within an hour, overruns included)")
    parser.add_argument("--horizons", default="auto", help="multiples of the horizon (default: planned)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--baselines", default="auto", help="comma-separated, 'all', or 'auto' (planned)")
    parser.add_argument("--shifts", default="rotated|heldout",
                        help="'auto', 'none', comma-separated variants, or 'a|b': the first of these a task has "
                             "(default rotated|heldout)")
    parser.add_argument("--out", default="runs/suite")
    args = parser.parse_args()
    torch.set_num_threads(1)  # single-threaded runs: their wall seconds are CPU seconds
    names = _list(args.tasks, [n for n in tasks.names() if ":" not in n])
    out, start, rows, costs, stages = Path(args.out), time.perf_counter(), [], [], []
    needs = measure_needs(names, args)
    smallest = {name: need.smallest_seconds for name, need in needs.items()}
    kept = affordable(smallest, 60 * args.budget_minutes - (time.perf_counter() - start))
    for name in names:
        if name not in kept:
            stages.append({"task": name, "smallest_seconds": smallest[name], "skipped": "its smallest run does not "
                           "fit the budget together with the cheaper tasks' smallest runs"})
            print(f"suite: {name} skipped: its smallest run needs {smallest[name] / 60:.1f} min", file=sys.stderr)
    for index, name in enumerate(kept):
        share = share_of(name, 60 * args.budget_minutes - (time.perf_counter() - start), kept[index:], smallest)
        stage, result, meta_cpu = run_task(name, needs[name], share, args, out / name)
        stages.append(stage)
        if result is not None:
            rows += rows_of(name, result)
            costs.append(cost_of(name, result, meta_cpu))
    table = out / "suite.md"
    out.mkdir(parents=True, exist_ok=True)
    skipped = [s["task"] for s in stages if "skipped" in s]
    table.write_text(markdown(rows, costs) + (f"\nSkipped (budget): {', '.join(skipped)}\n" if skipped else ""))
    report = {"settings": vars(args), "machine": machine(), "rows": rows, "break_even": costs, "stages": stages,
              "table": str(table), "figure": str(figure(rows, out / "suite.png")) if rows else None,
              "seconds": time.perf_counter() - start}
    save_json(report, out / "suite.json")
    print(json.dumps(finite(report), indent=1))


if __name__ == "__main__":
    main()
