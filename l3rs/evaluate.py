"""Is a meta-trained L3RS optimizer worth it? Compare it with LR-tuned baselines, honestly; write a report.

    result = evaluate("runs/opt/best", "mlp-mnist1d-shift", "runs/eval", horizons=(1, 2, 5), seeds=5)

Protocol (SPEC §6). Every baseline gets its LR tuned on the validation split, at the evaluated horizon, by a
log grid (extended past an edge when the best LR sits on it), by the mean final validation loss over two
tuning head seeds (999, 998) that are neither meta-training nor evaluation seeds (1000, 1001, ...). Every
method then runs on the same evaluation seeds, i.e. the same head initialization and batch order (paired).
Validation uses the task's whole validation split (<= 1,000 examples for the built-in tasks), at least
`MIN_EVAL_POINTS` times per run. Methods:

- baselines: SGD-momentum(0.9) and AdamW x {constant, cosine} x {one LR, head LR = lr x {3, 10, 30}};
  `atmo`, a fixed mix of the SGD and Adam directions (mix and LR tuned), built from L3RS itself with a
  constant mixer; `l3rs-untrained` (λ0 tuned by the same grid).
- the meta-trained optimizer `l3rs` (no tuning: it is told the new horizon) and, with ``ablations=True``,
  re-meta-trained ablations: `l3rs-global` (one set of coefficients for all tensors), `l3rs-adam-only`
  (a learned layer-wise LR schedule for Adam), `l3rs-no-features` (a learned constant per tensor).

Scenarios: the task at each horizon multiple of the meta-training horizon, plus each "unseen" variant (the
task layer's rotated / inverted / label-permuted data, held-out pretraining seeds, or any other task spec)
at 1x. Speed-up = steps the best tuned baseline needs to reach its own final validation loss (mean curve over
seeds) / steps the method needs to reach it. Against the best tuned baseline every method gets the ratio of
mean final validation losses and the speed-up, each with a 95% paired-bootstrap interval over the evaluation
seeds, and a verdict read from the ratio's interval: better (hi < 1), worse (lo > 1), else tie. Costs (steps,
seconds) count the baselines' sweeps per scenario against L3RS's one-off meta-training. Everything lands in
``out_dir/evaluation.json`` + report.md/html.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from l3rs.finetune import MakeOptimizer, RunResult, finetune
from l3rs.functional import Config
from l3rs.io import machine, save_json
from l3rs.mixer import depth
from l3rs.optim import L3RS, load_meta

FORMAT_VERSION = 2  # of evaluation.json (2: tuning on several seeds, intervals and verdicts)
TUNE_SEEDS = (999, 998)  # head seeds of every tuning run: a candidate's score is its mean final val loss
EVAL_SEED = 1000  # evaluation seeds are EVAL_SEED, EVAL_SEED + 1, ... (disjoint from meta-training seeds)
SGD_GRID = tuple(float(x) for x in np.logspace(-3, 0, 7))  # 1e-3 ... 1, half-decade steps
ADAM_GRID = tuple(float(x) for x in np.logspace(-4.5, -1.5, 7))  # 3e-5 ... 3e-2 (also λ0 of L3RS mixes)
MAX_EXTEND = 2  # grid points added past an edge when the best LR is on it
HEAD_MULTIPLIERS = (3.0, 10.0, 30.0)
ATMO_MIXES = (0.1, 0.25, 0.75, 0.9)  # Adam's share of the mix, tried at the best LR of the 0.5 sweep
ATMO_CONFIG = Config(bases=("sgd", "adam"), features="none", scope="global")
SHIFTS = ("heldout", "rotated", "inverted", "permuted")
MIN_EVAL_POINTS = 30  # validation points per run: resolves a 1.1x speed-up
RESAMPLES = 4000  # paired-bootstrap resamples (>= 2000 keeps the 2.5% tails stable)
BOOTSTRAP_SEED = 0  # fixed: the same runs always give the same intervals


@dataclass(frozen=True)
class Method:
    """A method under evaluation: its optimizer kind and what gets tuned."""

    name: str
    kind: str  # "sgd" | "adamw" | "atmo" | "untrained" | "l3rs" (a saved optimizer at `path`)
    cosine: bool = False
    head: bool = False
    path: str | None = None

    @property
    def tuned(self) -> bool:
        return self.kind != "l3rs"

    @property
    def is_baseline(self) -> bool:
        """Classical baselines: the pool the "best tuned baseline" of a scenario is drawn from."""
        return self.kind in ("sgd", "adamw", "atmo")


def _baselines() -> dict[str, Method]:
    out = {}
    for kind in ("sgd", "adamw"):
        for cosine in (False, True):
            for head in (False, True):
                name = kind + ("-cosine" if cosine else "") + ("-head" if head else "")
                out[name] = Method(name, kind, cosine, head)
    out["atmo"] = Method("atmo", "atmo")
    out["l3rs-untrained"] = Method("l3rs-untrained", "untrained")
    return out


BASELINES = _baselines()
ABLATIONS: dict[str, Callable[[Config], Config]] = {
    "l3rs-global": lambda c: dataclasses.replace(c, scope="global"),
    "l3rs-adam-only": lambda c: dataclasses.replace(c, bases=("adam",)),
    "l3rs-no-features": lambda c: dataclasses.replace(c, features="none"),
}


# ------------------------------------------------------------------------------------------ optimizers
def atmo_meta(adam_share: float) -> dict[str, torch.Tensor]:
    """Meta-parameters of a constant mixer: λ = λ0 and μ = (1 − a, a) over (sgd, adam) for every tensor.

    The mixer's last layer has zero weights, so its output is its bias: [log step scale, mix logits].
    """
    meta = ATMO_CONFIG.init_meta(1)
    meta[f"layers.{depth(meta)}.bias"] = torch.tensor([0.0, math.log(1 - adam_share), math.log(adam_share)])
    return meta


def _cosine(total_steps: int) -> Callable[[int], float]:
    return lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total_steps) / total_steps))


def make_optimizer(method: Method, hp: dict[str, float], head: Sequence[str],
                   config: Config) -> MakeOptimizer:
    """The `finetune` factory for `method` with hyper-parameters `hp` (lr, and head multiplier or mix)."""

    def make(named: Any, total_steps: int) -> Any:
        named = [(n, p) for n, p in named if p.requires_grad]
        if method.kind == "l3rs":
            return L3RS.from_pretrained(method.path, named, total_steps=total_steps)
        if method.kind == "untrained":
            return L3RS(named, lr=hp["lr"], total_steps=total_steps, config=config)
        if method.kind == "atmo":
            return L3RS(named, lr=hp["lr"], total_steps=total_steps, config=ATMO_CONFIG,
                        meta=atmo_meta(hp["mix"]))
        mult = hp.get("head", 1.0)
        groups = [{"params": [p for n, p in named if (n in head) == is_head], "lr": hp["lr"] * m}
                  for is_head, m in ((False, 1.0), (True, mult))]
        groups = [g for g in groups if g["params"]]
        opt = (torch.optim.SGD(groups, lr=hp["lr"], momentum=0.9) if method.kind == "sgd"
               else torch.optim.AdamW(groups, lr=hp["lr"]))
        return (opt, torch.optim.lr_scheduler.LambdaLR(opt, _cosine(total_steps))) if method.cosine else opt

    return make


# -------------------------------------------------------------------------------------------- running
_POOL_TASK: tuple[Any, ...] = ()


def _pool_init(task: Any, config: Config, device: Any) -> None:
    global _POOL_TASK
    torch.set_num_threads(1)  # W single-threaded processes beat one W-threaded process on small models
    _POOL_TASK = (task, config, device)


def _pool_run(request: tuple[Method, dict[str, float], int, bool, int, int]) -> RunResult:
    method, hp, seed, curves, steps, eval_every = request
    task, config, device = _POOL_TASK
    return finetune(task, make_optimizer(method, hp, task.head, config), steps, seed, test=curves, device=device,
                    eval_every=eval_every if curves else None)


class Runner:
    """Runs one scenario's fine-tuning runs (caching identical ones) and advances a shared progress bar.

    With ``workers > 1``, `prefetch` computes independent runs (a sweep's grid, the evaluation seeds) in
    that many single-threaded processes; the sequential code then finds them in the cache.
    """

    def __init__(self, task: Any, steps: int, config: Config, bar: Any = None, device: Any = None,
                 workers: int = 1) -> None:
        self.task, self.steps, self.config, self.bar, self.device = task, steps, config, bar, device
        self.eval_every = max(1, steps // MIN_EVAL_POINTS)
        self.workers = workers
        self._cache: dict[tuple, RunResult] = {}
        self._pool: Any = None

    def _key(self, method: Method, hp: dict[str, float], seed: int, curves: bool) -> tuple:
        return (method.kind, method.cosine, method.path, hp.get("lr"), hp.get("head", 1.0), hp.get("mix"),
                seed, curves)

    def _done(self, key: tuple, method: Method, seed: int, result: RunResult) -> RunResult:
        self._cache[key] = result
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.task.name} {self.steps} steps {method.name} seed {seed}",
                                     refresh=False)
            self.bar.total = max(self.bar.total, self.bar.n + self.steps)
            self.bar.update(self.steps)
        return result

    def run(self, method: Method, hp: dict[str, float], seed: int, curves: bool = False) -> RunResult:
        key = self._key(method, hp, seed, curves)
        if key not in self._cache:
            make = make_optimizer(method, hp, self.task.head, self.config)
            self._done(key, method, seed, finetune(self.task, make, self.steps, seed, test=curves,
                                                   device=self.device,
                                                   eval_every=self.eval_every if curves else None))
        return self._cache[key]

    def prefetch(self, requests: list[tuple[Method, dict[str, float], int, bool]]) -> None:
        """Compute the uncached runs among `requests` in parallel (no-op with one worker)."""
        todo = {self._key(*r): r for r in requests if self._key(*r) not in self._cache}
        if self.workers < 2 or len(todo) < 2:
            return
        if self._pool is None:
            import multiprocessing
            import pickle
            from concurrent.futures import ProcessPoolExecutor

            try:  # worker processes need the task: a task built from closures cannot travel, run here
                pickle.dumps((self.task, self.config))
            except (pickle.PicklingError, AttributeError, TypeError):
                self.workers = 1
                return

            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_pool_init,
                                             initargs=(self.task, self.config, self.device))
        jobs = [(m, hp, seed, curves, self.steps, self.eval_every) for m, hp, seed, curves in todo.values()]
        for (key, (m, _, seed, _)), result in zip(todo.items(), self._pool.map(_pool_run, jobs), strict=True):
            self._done(key, m, seed, result)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


@dataclass
class Tuned:
    """A method's chosen hyper-parameters and every trial that chose them (mean final val loss over the
    tuning seeds, and each seed's)."""

    hp: dict[str, float]
    trials: list[dict[str, Any]]

    @property
    def steps(self) -> int:
        return sum(t["steps"] for t in self.trials)

    @property
    def seconds(self) -> float:
        return sum(t["seconds"] for t in self.trials)

    def to_dict(self) -> dict[str, Any]:
        return {"hp": self.hp, "trials": self.trials, "steps": self.steps, "seconds": self.seconds}


def score(runner: Runner, method: Method, settings: list[dict[str, float]]) -> list[dict[str, Any]]:
    """Score each hyper-parameter setting by its mean final validation loss over the tuning seeds."""
    runner.prefetch([(method, hp, seed, False) for hp in settings for seed in TUNE_SEEDS])
    out = []
    for hp in settings:
        runs = [runner.run(method, hp, seed) for seed in TUNE_SEEDS]
        losses = [r.final_val_loss for r in runs]
        out.append({"hp": hp, "val_loss": float(np.mean(losses)), "val_losses": losses,
                    "steps": sum(len(r.train_loss) for r in runs), "seconds": sum(r.seconds for r in runs)})
    return out


def _best(scored: list[dict[str, Any]]) -> dict[str, Any]:
    return min(scored, key=lambda t: t["val_loss"])  # first of ties; diverged runs (inf) lose


def sweep_lr(runner: Runner, method: Method, hp: dict[str, float],
             grid: Sequence[float]) -> list[dict[str, Any]]:
    """Score every LR of the log grid, extended past an edge while the best sits on it."""
    lrs = sorted(grid)
    scored = dict(zip(lrs, score(runner, method, [{**hp, "lr": lr} for lr in lrs]), strict=True))
    for _ in range(MAX_EXTEND):
        best = _best([scored[lr] for lr in lrs])["hp"]["lr"]
        if best not in (lrs[0], lrs[-1]) or len(lrs) < 2:
            break
        new = lrs[0] ** 2 / lrs[1] if best == lrs[0] else lrs[-1] ** 2 / lrs[-2]
        scored[new] = score(runner, method, [{**hp, "lr": new}])[0]
        lrs = sorted(scored)
    return [scored[lr] for lr in lrs]


def tune(runner: Runner, method: Method) -> Tuned:
    """Tune the LR by the grid, then (at the best LR) the head multiplier or the ATMO mix."""
    if not method.tuned:
        return Tuned({}, [])
    base = {"mix": 0.5} if method.kind == "atmo" else {"head": 1.0} if method.head else {}
    scored = sweep_lr(runner, method, base, SGD_GRID if method.kind == "sgd" else ADAM_GRID)
    best = _best(scored)["hp"]
    if method.head:  # multiplier 1 is the sweep's best run: a head LR never has to look worse than one LR
        scored += score(runner, method, [{**best, "head": m} for m in HEAD_MULTIPLIERS])
    if method.kind == "atmo":
        scored += score(runner, method, [{**best, "mix": a} for a in ATMO_MIXES])
    return Tuned(_best(scored)["hp"], scored)


# ------------------------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class Speedup:
    """How much sooner a candidate reaches the best baseline's final validation loss."""

    baseline_steps: int  # steps the baseline needs to reach its own final validation loss
    candidate_steps: int | None  # None: the candidate never reaches it within the run
    horizon: int

    @property
    def ratio(self) -> float | None:
        return None if self.candidate_steps is None else self.baseline_steps / self.candidate_steps

    @property
    def steps_text(self) -> str:
        return f">{self.horizon}" if self.candidate_steps is None else str(self.candidate_steps)

    def __str__(self) -> str:
        if self.ratio is None:  # it would need more than the horizon: the ratio is below baseline / horizon
            return f"<{self.baseline_steps / self.horizon:.2f}x"
        return f"{self.ratio:.2f}x"

    def to_dict(self) -> dict[str, Any]:
        return {"baseline_steps": self.baseline_steps, "candidate_steps": self.candidate_steps,
                "ratio": self.ratio, "text": str(self), "steps_text": self.steps_text}


def first_reach(curves: np.ndarray, targets: np.ndarray, steps: Sequence[int]) -> np.ndarray:
    """Per row of `curves` [R, G] (sampled at `steps`), the first step at or below that row's target; 0: never."""
    hit = curves <= targets[:, None]
    return np.where(hit.any(axis=1), np.asarray(steps)[hit.argmax(axis=1)], 0)


def speedup_ratios(baseline_curves: np.ndarray, candidate_curves: np.ndarray,
                   steps: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise (steps the baseline needs to reach its own final value, speed-up; 0 when never reached)."""
    targets = baseline_curves[:, -1]
    base = first_reach(baseline_curves, targets, steps)
    base = np.where(base > 0, base, steps[-1])  # a NaN final value: count the whole run
    reach = first_reach(candidate_curves, targets, steps)
    return base, np.divide(base, reach, out=np.zeros(len(reach)), where=reach > 0)


def speedup(baseline_curve: Sequence[float], candidate_curve: Sequence[float],
            steps: Sequence[int]) -> Speedup:
    """Speed-up of a candidate over a baseline; both validation-loss curves are sampled at `steps`."""
    candidate = np.asarray([candidate_curve], dtype=float)
    base, _ = speedup_ratios(np.asarray([baseline_curve], dtype=float), candidate, steps)
    reach = int(first_reach(candidate, np.asarray([baseline_curve[-1]], dtype=float), steps)[0])
    return Speedup(int(base[0]), reach or None, steps[-1])


def eval_grid(steps: int, eval_every: int) -> list[int]:
    """The steps at which a run's validation curve is sampled (as `finetune` does)."""
    return list(range(eval_every, steps, eval_every)) + [steps]


def aligned(run: dict[str, Any], key: str, grid: list[int], fill: float) -> list[float]:
    """A run's curve on the full grid; a diverged run reads `fill` from where it stopped."""
    at = dict(zip(run["eval_steps"], run[key], strict=True))
    return [at.get(s, fill) for s in grid]


def mean_curve(runs: list[dict[str, Any]], key: str, grid: list[int], fill: float) -> list[float]:
    return np.mean([aligned(r, key, grid, fill) for r in runs], axis=0).tolist()


def _stats(values: list[float | None]) -> dict[str, float | None]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite, ddof=1 if len(finite) > 1 else 0))}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of the final numbers (diverged runs are counted, not averaged); the final
    validation loss also gets the 95% bootstrap interval of its mean."""
    ok = [r for r in runs if not r["diverged"]]
    val_loss = [r["val_loss"][-1] for r in ok]
    return {"val_loss": {**_stats(val_loss), "ci95": mean_ci(val_loss)},
            "val_metric": _stats([r["val_metric"][-1] for r in ok]),
            "test_metric": _stats([r["test_metric"] for r in ok]),
            "seconds": _stats([r["seconds"] for r in runs]),
            "diverged": len(runs) - len(ok), "seeds": len(runs)}


# ---------------------------------------------------------------------------------------- statistics
def resample(num_seeds: int) -> np.ndarray:
    """[RESAMPLES, num_seeds] seed indices drawn with replacement, from a fixed seed. Every method of a
    comparison is indexed by the same draw, so the bootstrap keeps the pairing by seed."""
    return np.random.default_rng(BOOTSTRAP_SEED).integers(0, num_seeds, size=(RESAMPLES, num_seeds))


def interval(samples: np.ndarray) -> list[float]:
    """The central 95% of bootstrap samples; observed values, not interpolated ones, so inf stays inf."""
    return [float(q) for q in np.quantile(samples, [0.025, 0.975], method="inverted_cdf")]


def mean_ci(values: Sequence[float]) -> list[float] | None:
    """95% bootstrap interval of the mean of the finite `values` (None when there are none)."""
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    return interval(finite[resample(len(finite))].mean(axis=1)) if len(finite) else None


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):  # a diverged mean is inf: the ratio says so
        return np.asarray(numerator / denominator, dtype=float)


def verdict(ratio_ci95: Sequence[float]) -> str:
    """better when the whole interval of the loss ratio lies below 1, worse when above, else tie."""
    lo, hi = ratio_ci95
    return "better" if hi < 1 else "worse" if lo > 1 else "tie"


def compare(curves: np.ndarray, best_curves: np.ndarray, steps: Sequence[int]) -> dict[str, Any]:
    """A method vs the best tuned baseline, paired by evaluation seed (row i of both = seed i).

    `curves` [seeds, points]: validation-loss curves sampled at `steps` (inf from where a run diverged).
    Ratio = mean final loss / the baseline's; speed-up as `speedup` on the mean curves (0: never reaches the
    baseline's final loss). Both get a 95% paired-bootstrap interval.
    """
    final, best_final = curves[:, -1], best_curves[:, -1]
    draw = resample(len(final))
    ratio = float(_ratio(final.mean(), best_final.mean()))
    ratio_ci = interval(_ratio(final[draw].mean(axis=1), best_final[draw].mean(axis=1)))
    _, speed = speedup_ratios(best_curves.mean(axis=0, keepdims=True), curves.mean(axis=0, keepdims=True), steps)
    _, speeds = speedup_ratios(best_curves[draw].mean(axis=1), curves[draw].mean(axis=1), steps)
    return {"ratio": ratio, "ratio_ci95": ratio_ci, "speedup": float(speed[0]), "speedup_ci95": interval(speeds),
            "verdict": verdict(ratio_ci)}


# ----------------------------------------------------------------------------------------- scenarios
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
    from l3rs import tasks

    task = tasks.get(task_or_spec)
    out = [Scenario(f"{task.name} x{m:g}", task, m) for m in horizons]
    spec, known = _spec_name(task_or_spec), set(tasks.names())
    if shifts is None:
        shifts = [s for s in SHIFTS if spec is not None and f"{spec}:{s}" in known]
    for entry in shifts:
        variant = f"{spec}:{entry}" if spec is not None and f"{spec}:{entry}" in known else entry
        other = tasks.get(variant)
        out.append(Scenario(f"{other.name} x1", other, 1.0, entry))
    return out


def base_horizon(info: dict[str, Any], task: Any) -> int:
    """The meta-training horizon: the optimizer JSON's total_steps / horizon, else the task's."""
    return int(info.get("total_steps") or info.get("horizon") or task.horizon)


def _check_fits(optimizer_dir: Path, task: Any) -> None:
    """Fail before any run if the optimizer was made for another model (CheckpointError names the tensors)."""
    L3RS.from_pretrained(optimizer_dir, task.model_fn(EVAL_SEED).named_parameters())


def run_scenario(sc: Scenario, steps: int, methods: list[Method], seeds: int, config: Config, bar: Any,
                 device: Any, workers: int = 1) -> dict[str, Any]:
    """Tune every method, run it on the evaluation seeds, and compare with the best tuned baseline."""
    runner = Runner(sc.task, steps, config, bar, device, workers)
    out: dict[str, Any] = {}
    try:
        tuned = {m.name: tune(runner, m) for m in methods}
        runner.prefetch([(m, tuned[m.name].hp, s, True) for m in methods for s in range(EVAL_SEED, EVAL_SEED + seeds)])
    finally:
        runner.close()
    for m in methods:
        runs = [{"seed": s, **runner.run(m, tuned[m.name].hp, s, curves=True).to_dict()}
                for s in range(EVAL_SEED, EVAL_SEED + seeds)]
        out[m.name] = {"kind": m.kind, "hp": tuned[m.name].hp, "tuning": tuned[m.name].to_dict(), "runs": runs,
                       "summary": summarize(runs)}
    grid = eval_grid(steps, runner.eval_every)
    curves = {name: {"val_loss": mean_curve(r["runs"], "val_loss", grid, math.inf),
                     "val_metric": mean_curve(r["runs"], "val_metric", grid, 0.0)} for name, r in out.items()}
    pool = [m.name for m in methods if m.is_baseline] or [m.name for m in methods]
    best = min(pool, key=lambda n: curves[n]["val_loss"][-1])
    seed_curves = {name: np.array([aligned(run, "val_loss", grid, math.inf) for run in r["runs"]])
                   for name, r in out.items()}
    for name, r in out.items():
        r["mean_curves"] = curves[name]
        r["speedup"] = speedup(curves[best]["val_loss"], curves[name]["val_loss"], grid).to_dict()
        r["vs_best"] = compare(seed_curves[name], seed_curves[best], grid)
    return {"label": sc.label, "task": sc.task.name, "variant": sc.variant, "multiple": sc.multiple,
            "steps": steps, "eval_steps": grid, "best_baseline": best, "methods": out}


# ----------------------------------------------------------------------------------------- ablations
def meta_train_ablations(config: Config, info: dict[str, Any], task_or_spec: Any, out_dir: Path,
                         budget_minutes: float | None = None, progress: bool = True) -> dict[str, Path]:
    """Meta-train each ablation on the main optimizer's task family with its settings and time budget."""
    from l3rs import meta, tasks

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


# ---------------------------------------------------------------------------------------------- main
def planned_runs(methods: list[Method], seeds: int) -> int:
    """Runs per scenario, for the progress bar's ETA (grid extensions past an edge add a few)."""
    sweeps = {(m.kind, m.cosine) for m in methods if m.tuned}
    extra = sum(len(HEAD_MULTIPLIERS) * m.head + len(ATMO_MIXES) * (m.kind == "atmo") for m in methods)
    return (len(sweeps) * len(SGD_GRID) + extra) * len(TUNE_SEEDS) + seeds * len(methods)


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
) -> dict[str, Any]:
    """Evaluate a saved optimizer against tuned baselines; write evaluation.json, report.md and report.html.

    `horizons` are multiples of the meta-training horizon; `shifts` name unseen-data variants of the task
    (None: every variant the task layer offers; () for none); `budget_minutes` is each ablation's
    meta-training budget (default: the main optimizer's); `workers` > 1 runs independent fine-tuning runs in
    that many single-threaded processes. Returns the result dict saved as JSON.
    """
    optimizer_dir, out_dir = Path(optimizer_dir), Path(out_dir)
    if seeds < 1 or not horizons or any(m <= 0 for m in horizons):
        raise ValueError(f"need seeds >= 1 and positive horizon multiples, got {seeds=}, {horizons=}")
    names = _check_names(baselines)
    saved = load_meta(optimizer_dir)
    info, config = saved["info"], saved["config"]
    plan = scenarios(task_or_spec, horizons, shifts)
    t0 = base_horizon(info, plan[0].task)
    for sc in plan:
        _check_fits(optimizer_dir, sc.task)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = [Method("l3rs", "l3rs", path=str(optimizer_dir))]
    if ablations:
        paths = meta_train_ablations(config, info, task_or_spec, out_dir, budget_minutes, progress)
        methods += [Method(name, "l3rs", path=str(p)) for name, p in paths.items()]
    methods += [BASELINES[n] for n in names]
    meta_seconds = {m.name: float(load_meta(m.path)["info"].get("meta_train_seconds") or 0.0)
                    for m in methods if m.kind == "l3rs"}
    steps = [max(1, round(sc.multiple * t0)) for sc in plan]
    bar = tqdm(total=sum(steps) * planned_runs(methods, seeds), unit="step", desc="evaluate",
               disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    with bar:
        results = [run_scenario(sc, n, methods, seeds, config, bar, device, workers)
                   for sc, n in zip(plan, steps, strict=True)]
        bar.total = bar.n
    from l3rs import report  # here, not at the top: report imports this module's helpers

    result = {
        "format_version": FORMAT_VERSION,
        "settings": {"optimizer": str(optimizer_dir), "task": _spec_name(task_or_spec) or plan[0].task.name,
                     "horizons": list(horizons), "base_horizon": t0, "seeds": seeds,
                     "eval_seeds": list(range(EVAL_SEED, EVAL_SEED + seeds)), "tune_seeds": list(TUNE_SEEDS),
                     "baselines": names, "ablations": ablations,
                     "shifts": [sc.variant for sc in plan if sc.variant],
                     "grids": {"sgd": SGD_GRID, "adam": ADAM_GRID}, "head_multipliers": HEAD_MULTIPLIERS,
                     "atmo_mixes": ATMO_MIXES, "device": str(device or "cpu"),
                     "min_eval_points": MIN_EVAL_POINTS,
                     "bootstrap": {"resamples": RESAMPLES, "seed": BOOTSTRAP_SEED, "confidence": 0.95}},
        "machine": machine(),
        "optimizer": {"info": {k: v for k, v in info.items() if k not in ("tensor_names", "tensor_shapes")},
                      "meta_train_seconds": meta_seconds},
        "scenarios": results,
        "trace": report.trace(optimizer_dir, plan[0].task, t0, device=device),
        "seconds": time.perf_counter() - start,
    }
    save_json(result, out_dir / "evaluation.json")
    report.write(result, out_dir)
    return result


# ----------------------------------------------------------------------------------------------- CLI
def _floats(text: str, what: str) -> list[float]:
    from l3rs.cli import UsageError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{what} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise UsageError(f"--{what} must be positive numbers, got {text!r}")
    return values


def _names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    from l3rs.cli import UsageError

    names = list(allowed) if text == "all" else [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise UsageError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)} (or 'all')")
    return names


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--optimizer", required=True, help="directory of a saved L3RS optimizer")
    parser.add_argument("--task", required=True, help="task name (see `l3rs tasks`) or pkg.module:function")
    parser.add_argument("--out", required=True, help="output dir (evaluation.json, report.md/html, plots/)")
    parser.add_argument("--horizons", default="1,2,5",
                        help="multiples of the meta-training horizon (default 1,2,5)")
    parser.add_argument("--seeds", type=int, default=5,
                        help="evaluation seeds per method, shared by all methods (default 5)")
    parser.add_argument("--baselines", default="all",
                        help=f"comma-separated subset of: {', '.join(BASELINES)} (default all)")
    parser.add_argument("--ablations", action="store_true",
                        help="also meta-train + evaluate ablations (global, adam-only, no-features): costly")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="meta-training budget of each ablation (default: the main optimizer's)")
    parser.add_argument("--shifts", default="auto",
                        help="unseen-data variants evaluated at 1x: 'auto' (all the task offers), 'none', or "
                             f"comma-separated names ({', '.join(SHIFTS)}) or task specs")
    parser.add_argument("--device", default=None, help="torch device for the runs (default: cpu)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel single-threaded processes for the runs (default: up to 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from l3rs.cli import UsageError

    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    listed = [s.strip() for s in args.shifts.split(",") if s.strip()]
    shifts = {"auto": None, "none": []}.get(args.shifts, listed)
    result = evaluate(args.optimizer, args.task, args.out, horizons=_floats(args.horizons, "horizons"),
                      seeds=args.seeds, baselines=_names(args.baselines, list(BASELINES), "baseline(s)"),
                      ablations=args.ablations, shifts=shifts, progress=not args.no_progress,
                      budget_minutes=args.budget_minutes, device=args.device, workers=max(1, args.workers))
    out = Path(args.out)
    print(f"wrote {out / 'report.md'}, {out / 'report.html'} and {out / 'evaluation.json'} "
          f"({len(result['scenarios'])} scenarios, {result['seconds']:.0f} s)", file=sys.stdout)
    return 0
