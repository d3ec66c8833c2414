"""The evaluation protocol (SPEC §6): scenarios, tuned baselines, paired runs, comparisons; `evaluate`.

Scenarios: the task at each horizon multiple of the meta-training horizon, plus each "unseen" variant (the
task layer's rotated / inverted / label-permuted data, held-out pretraining seeds, or any other task spec)
at 1x. In each, every baseline is tuned (`l3rs.evaluate.tuning`), then every method runs on the same
evaluation seeds (same head initialization, same batch order: paired) and is compared with the best tuned
baseline (`l3rs.evaluate.stats`). Costs (steps, seconds) count the baselines' sweeps per scenario against
L3RS's one-off meta-training.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from l3rs import meta, report, tasks
from l3rs.evaluate.methods import ABLATIONS, BASELINES, Method, meta_trained
from l3rs.evaluate.reuse import missing_seeds, read_previous, reusable, same_machine, task_fingerprint
from l3rs.evaluate.runs import MIN_EVAL_POINTS, RunRequest, ScenarioRunner
from l3rs.evaluate.stats import BOOTSTRAP_SEED, RESAMPLES, compare, eval_grid, speedup, summarize
from l3rs.evaluate.tuning import ADAM_GRID, ATMO_MIXES, HEAD_MULTIPLIERS, SGD_GRID, TUNE_SEEDS, planned_runs, tune
from l3rs.functional import Config
from l3rs.io import machine
from l3rs.optim import L3RS, load_meta
from l3rs.results import (
    EVAL_SEED,
    Curves,
    EvaluationResult,
    MethodResult,
    OptimizerSummary,
    ScenarioResult,
    Settings,
    aligned,
    base_horizon,
    save,
)

SHIFT_SCENARIOS = ("heldout", "rotated", "inverted", "permuted", "fewer")  # task variants evaluated at 1x if offered


@dataclass
class Scenario:
    label: str
    task: Any
    multiple: float
    variant: str | None = None


def _spec_name(task_or_spec: Any) -> str | None:
    return task_or_spec if isinstance(task_or_spec, str) else None


def scenarios(task_or_spec: Any, horizons: Sequence[float], shifts: Sequence[str] | None) -> list[Scenario]:
    """The task at every horizon multiple, then each unseen variant at 1x (`shifts=None`: all available)."""
    task = tasks.get(task_or_spec)
    out = [Scenario(f"{task.name} x{m:g}", task, m) for m in horizons]
    spec, known = _spec_name(task_or_spec), set(tasks.names())
    if shifts is None:
        shifts = [s for s in SHIFT_SCENARIOS if spec is not None and f"{spec}:{s}" in known]
    for entry in shifts:
        variant = f"{spec}:{entry}" if spec is not None and f"{spec}:{entry}" in known else entry
        other = tasks.get(variant)
        out.append(Scenario(f"{other.name} x1", other, 1.0, entry))
    return out


def _check_fits(optimizer_dir: Path, task: Any) -> None:
    """Fail before any run if the optimizer was made for another model (CheckpointError names the tensors)."""
    L3RS.from_pretrained(optimizer_dir, task.model_fn(EVAL_SEED).named_parameters())


def run_scenario(scenario: Scenario, steps: int, methods: list[Method], seeds: int, config: Config, bar: Any,
                 device: Any, workers: int = 1, reused: dict[str, MethodResult] | None = None,
                 fingerprint: str | None = None) -> ScenarioResult:
    """Tune every method, run it on the evaluation seeds, and compare with the best tuned baseline; methods
    in `reused` (a previous evaluation's results) keep their tuning and runs instead of running again."""
    reused = reused or {}
    todo = [m for m in methods if m.name not in reused]
    runner = ScenarioRunner(scenario.task, steps, config, bar, device, workers)
    eval_seeds = range(EVAL_SEED, EVAL_SEED + seeds)
    try:
        tuned = {m.name: tune(runner, m) for m in todo} | {name: result.tuning for name, result in reused.items()}
        missing = {m.name: missing_seeds(reused[m.name], eval_seeds) if m.name in reused else list(eval_seeds)
                   for m in methods}
        runner.prefetch([RunRequest(m, tuned[m.name].hp, s, True) for m in methods for s in missing[m.name]])
    finally:
        runner.close()
    runs = {m.name: sorted((reused[m.name].runs if m.name in reused else [])
                           + [runner.run(m, tuned[m.name].hp, s, curves=True) for s in missing[m.name]],
                           key=lambda r: r.seed) for m in methods}
    grid = eval_grid(steps, runner.eval_every)
    loss_curves = {name: np.array([aligned(r, "val_loss", grid, math.inf) for r in seed_runs])
                   for name, seed_runs in runs.items()}
    metric_curves = {name: np.array([aligned(r, "val_metric", grid, 0.0) for r in seed_runs])
                     for name, seed_runs in runs.items()}
    means = {name: Curves(loss_curves[name].mean(axis=0).tolist(), metric_curves[name].mean(axis=0).tolist())
             for name in runs}
    pool = [m.name for m in methods if m.is_baseline] or [m.name for m in methods]
    best = min(pool, key=lambda name: means[name].val_loss[-1])
    out = {m.name: MethodResult(m.kind, tuned[m.name].hp, tuned[m.name], runs[m.name], summarize(runs[m.name]),
                                means[m.name], speedup(means[best].val_loss, means[m.name].val_loss, grid),
                                compare(loss_curves[m.name], loss_curves[best], grid))
           for m in methods}
    lowest = lowest_baseline(methods, {name: c.val_loss[-1] for name, c in means.items()}, best)
    vs_lowest = None if lowest is None else compare(loss_curves["l3rs"], loss_curves[lowest], grid)
    return ScenarioResult(scenario.label, scenario.task.name, scenario.variant, scenario.multiple, steps, grid,
                          best, out, fingerprint, lowest, vs_lowest, train_size=scenario.task.train_size)


def lowest_baseline(methods: list[Method], finals: dict[str, float], best: str) -> str | None:
    """The baseline, tuned or not (never a meta-trained L3RS), of lowest mean final val loss, unless it is
    `best` (the best tuned baseline, which the verdicts already compare with)."""
    lowest = min((m.name for m in methods if m.kind != "l3rs"), key=finals.__getitem__, default=best)
    return None if lowest == best else lowest


def meta_train_ablations(config: Config, info: dict[str, Any], task_or_spec: Any, out_dir: Path,
                         budget_minutes: float | None = None, progress: bool = True) -> dict[str, Path]:
    """Meta-train each ablation on the main optimizer's task family with its settings and time budget."""
    saved = info.get("meta_config") or {}
    fields = {f.name for f in dataclasses.fields(meta.MetaConfig)} - {"config"}
    kwargs = {k: v for k, v in {**info, **saved}.items() if k in fields}
    if budget_minutes is None and kwargs.get("budget_minutes") is None and info.get("meta_train_seconds"):
        budget_minutes = info["meta_train_seconds"] / 60
    if budget_minutes is not None:
        kwargs["budget_minutes"] = budget_minutes
    source = tasks.family(info["task"] if info.get("task") in tasks.names() else task_or_spec)
    return {name: Path(meta.train(source, out_dir / "ablations" / name,
                                  meta.MetaConfig(**{**kwargs, "config": ablate(config)}), progress=progress))
            for name, ablate in ABLATIONS.items()}


def _check_names(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    return list(names)


def evaluate(
    optimizer_dir: str | os.PathLike,
    task_or_spec: Any,
    out_dir: str | os.PathLike,
    horizons: Sequence[float] = (1, 2, 5),
    seeds: int = 5,
    baselines: Sequence[str] = tuple(BASELINES),
    ablations: bool = False,
    shifts: Sequence[str] | None = None,
    progress: bool = True,
    budget_minutes: float | None = None,
    device: Any = None,
    workers: int = 1,
    baselines_from: str | os.PathLike | None = None,
) -> EvaluationResult:
    """Evaluate a saved optimizer against tuned baselines; write evaluation.json, report.md and report.html.

    `horizons` are multiples of the meta-training horizon; `shifts` name unseen-data variants of the task
    (None: every variant the task layer offers; () for none); `budget_minutes` is each ablation's
    meta-training budget (default: the main optimizer's); `workers` > 1 runs independent fine-tuning runs in
    that many single-threaded processes. `baselines_from`: a previous evaluation.json of the same task, whose
    baselines are taken as they are where scenario, seeds, grids and device match (`l3rs.evaluate.reuse`;
    valid only while the baseline code and the task data are unchanged). Returns the result saved as
    evaluation.json.
    """
    optimizer_dir, out_dir = Path(optimizer_dir), Path(out_dir)
    if seeds < 1 or not horizons or any(m <= 0 for m in horizons):
        raise ValueError(f"need seeds >= 1 and positive horizon multiples, got {seeds=}, {horizons=}")
    names = _check_names(baselines)
    previous = None if baselines_from is None else read_previous(baselines_from)  # a bad file fails before any run
    saved = load_meta(optimizer_dir)
    info, config = saved["info"], saved["config"]
    plan = scenarios(task_or_spec, horizons, shifts)
    horizon = base_horizon(info, plan[0].task)
    for scenario in plan:
        _check_fits(optimizer_dir, scenario.task)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = [meta_trained("l3rs", optimizer_dir)]
    if ablations:
        paths = meta_train_ablations(config, info, task_or_spec, out_dir, budget_minutes, progress)
        methods += [meta_trained(name, p) for name, p in paths.items()]
    methods += [BASELINES[n] for n in names]
    meta_seconds = {m.name: float(load_meta(m.path)["info"].get("meta_train_seconds") or 0.0)
                    for m in methods if m.kind == "l3rs"}
    steps = [max(1, round(scenario.multiple * horizon)) for scenario in plan]
    settings = Settings(
        optimizer=str(optimizer_dir), task=_spec_name(task_or_spec) or plan[0].task.name,
        horizons=list(horizons), base_horizon=horizon, seeds=seeds,
        eval_seeds=list(range(EVAL_SEED, EVAL_SEED + seeds)), tune_seeds=list(TUNE_SEEDS), baselines=names,
        ablations=ablations, shifts=[s.variant for s in plan if s.variant],
        grids={"sgd": list(SGD_GRID), "adam": list(ADAM_GRID)}, head_multipliers=list(HEAD_MULTIPLIERS),
        atmo_mixes=list(ATMO_MIXES), device=str(device or "cpu"), min_eval_points=MIN_EVAL_POINTS,
        bootstrap={"resamples": RESAMPLES, "seed": BOOTSTRAP_SEED, "confidence": 0.95},
        baselines_from=None if baselines_from is None else str(baselines_from))
    prints = [task_fingerprint(s.task, EVAL_SEED) for s in plan]
    found = [reusable(previous, settings, s.label, n, methods, f) for s, n, f in zip(plan, steps, prints, strict=True)]
    for s, reused in zip(plan, found, strict=True):
        if reused is None:
            tqdm.write(f"evaluate: baselines of {s.label} not reused: {baselines_from} ran it on other data or "
                       "another pretrained model (or did not record which); running them here", file=sys.stderr)
    reuse = [reused or {} for reused in found]
    here = machine()
    if previous is not None and any(reuse) and not same_machine(previous.machine, here):
        tqdm.write(f"evaluate: {baselines_from} ran on another machine (or did not record its CPU): the reused "
                   "baselines are valid samples, but not seed for seed what this machine would run, so the paired "
                   "intervals are wider than a same-machine evaluation's", file=sys.stderr)
    settings.reused = [f"{s.label}/{name}" for s, reused in zip(plan, reuse, strict=True) for name in reused]
    planned = sum(n * (planned_runs([m for m in methods if m.name not in reused], seeds)
                       + sum(len(missing_seeds(r, settings.eval_seeds)) for r in reused.values()))
                  for n, reused in zip(steps, reuse, strict=True))
    bar = tqdm(total=planned, unit="step", desc="evaluate", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    with bar:
        results = [run_scenario(scenario, n, methods, seeds, config, bar, device, workers, reused, f)
                   for scenario, n, reused, f in zip(plan, steps, reuse, prints, strict=True)]
        bar.total = bar.n
    result = EvaluationResult(
        settings=settings, machine=here,
        optimizer=OptimizerSummary({k: v for k, v in info.items() if k not in ("tensor_names", "tensor_shapes")},
                                   meta_seconds),
        scenarios=results, trace=report.trace(optimizer_dir, plan[0].task, horizon, device=device),
        seconds=time.perf_counter() - start)
    save(result, out_dir / "evaluation.json")
    report.write(result, out_dir)
    return result
