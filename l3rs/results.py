"""What an evaluation produces: typed records, and their JSON form (the only place JSON is read or written).

    evaluate (runs, statistics) ──► EvaluationResult ──► report (tables, plots, prose)
                                        │ save / load
                                        ▼
                                  evaluation.json  (format_version)

The records are plain data: the evaluation computes every figure, the report only reads them. A JSON file
holds exactly the records' fields (non-finite numbers become null, and come back as None).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from l3rs.finetune import RunResult
from l3rs.io import save_json

FORMAT_VERSION = 2  # of evaluation.json (2: tuning on several seeds, intervals and verdicts)
EVAL_SEED = 1000  # evaluation seeds are EVAL_SEED, EVAL_SEED + 1, ... (disjoint from meta-training seeds)


@dataclass
class Stat:
    """Mean and std over seeds (None when no seed finished); `ci95`: 95% interval of the mean, if computed."""

    mean: float | None
    std: float | None
    ci95: list[float] | None = None


@dataclass
class Summary:
    """A method's final numbers over the evaluation seeds; diverged seeds are counted, not averaged."""

    val_loss: Stat
    val_metric: Stat
    test_metric: Stat
    seconds: Stat
    diverged: int
    seeds: int


@dataclass
class Trial:
    """One tried hyper-parameter setting: mean final validation loss over the tuning seeds, and each seed's."""

    hp: dict[str, float]
    val_loss: float
    val_losses: list[float]
    steps: int
    seconds: float


@dataclass
class Tuning:
    """A method's chosen hyper-parameters and every trial that chose them (`steps`, `seconds`: their sums)."""

    hp: dict[str, float]
    trials: list[Trial]
    steps: int
    seconds: float


@dataclass
class Speedup:
    """How much sooner a method reaches the best baseline's final validation loss (mean curves over seeds)."""

    baseline_steps: int  # steps the baseline needs to reach its own final validation loss
    candidate_steps: int | None  # None: the method never reaches it within the run
    ratio: float | None
    text: str  # "1.50x", or "<0.75x" when never reached (the ratio is below baseline steps / horizon)
    steps_text: str  # candidate steps, or ">horizon"


@dataclass
class VsBest:
    """A method against the best tuned baseline of its scenario, with 95% paired-bootstrap intervals."""

    ratio: float  # mean final validation loss / the baseline's
    ratio_ci95: list[float]
    speedup: float  # 0: never reaches the baseline's final validation loss
    speedup_ci95: list[float]
    verdict: str  # "better" (ratio interval below 1) | "worse" (above 1) | "tie"


@dataclass
class Curves:
    """Mean validation curves over seeds, sampled at the scenario's `eval_steps`."""

    val_loss: list[float]
    val_metric: list[float]


@dataclass
class MethodResult:
    kind: str
    hp: dict[str, float]
    tuning: Tuning
    runs: list[RunResult]  # one per evaluation seed, in seed order
    summary: Summary
    mean_curves: Curves
    speedup: Speedup
    vs_best: VsBest


@dataclass
class ScenarioResult:
    label: str
    task: str
    variant: str | None
    multiple: float
    steps: int
    eval_steps: list[int]
    best_baseline: str
    methods: dict[str, MethodResult]
    fingerprint: str | None = None  # of the task's data and model (`evaluate.reuse.task_fingerprint`; older: none)
    # the baseline of lowest mean final val loss when it is outside the tuned pool (an LR-free one at its
    # defaults, or l3rs-untrained), and L3RS against it; None when it is the best tuned baseline
    lowest_baseline: str | None = None
    vs_lowest: VsBest | None = None
    # the training examples the scenario fine-tunes on, which a meta-trained L3RS is told (older files: none)
    train_size: int | None = None


@dataclass
class Settings:
    optimizer: str
    task: str
    horizons: list[float]
    base_horizon: int
    seeds: int
    eval_seeds: list[int]
    tune_seeds: list[int]
    baselines: list[str]
    ablations: bool
    shifts: list[str]
    grids: dict[str, list[float]]
    head_multipliers: list[float]
    atmo_mixes: list[float]
    device: str
    min_eval_points: int
    bootstrap: dict[str, float]
    baselines_from: str | None = None  # a previous evaluation.json whose baselines were reused (older files: none)
    reused: list[str] = field(default_factory=list)  # "scenario label/method" taken verbatim from baselines_from


@dataclass
class OptimizerSummary:
    info: dict[str, Any]  # the optimizer JSON, less tensor names and shapes
    meta_train_seconds: dict[str, float]  # per meta-trained method (l3rs and its ablations)


@dataclass
class Trace:
    """What a saved optimizer did over one run: λ [steps][tensors] and μ [steps][tensors][bases]."""

    task: str
    horizon: int
    seed: int
    names: list[str]
    bases: list[str]
    steps: list[int]
    lr: list[list[float]]
    mix: list[list[list[float]]]
    diverged: bool
    final_val_loss: float | None


@dataclass
class EvaluationResult:
    settings: Settings
    machine: dict[str, Any]
    optimizer: OptimizerSummary
    scenarios: list[ScenarioResult]
    trace: Trace
    seconds: float
    format_version: int = FORMAT_VERSION


# ------------------------------------------------------------------------------------------- helpers
def aligned(run: RunResult, key: str, grid: Sequence[int], fill: float) -> list[float]:
    """A run's `key` curve ("val_loss" | "val_metric") on the full grid; a diverged run reads `fill` from
    where it stopped."""
    at = dict(zip(run.eval_steps, getattr(run, key), strict=True))
    return [at.get(s, fill) for s in grid]


def base_horizon(info: dict[str, Any], task: Any) -> int:
    """The meta-training horizon of a saved optimizer: its JSON's total_steps / horizon, else the task's."""
    return int(info.get("total_steps") or info.get("horizon") or task.horizon)


# ------------------------------------------------------------------------------------ the JSON boundary
def save(record: Any, path: str | os.PathLike) -> Path:
    """Write a record (EvaluationResult, Trace, ...) as strict JSON, atomically."""
    return save_json(dataclasses.asdict(record), Path(path))


def load(path: str | os.PathLike) -> EvaluationResult:
    """Read an evaluation.json back into records (non-finite numbers come back as None)."""
    data = json.loads(Path(path).read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: evaluation format_version {data.get('format_version')}, this l3rs reads "
                         f"{FORMAT_VERSION}: rerun `l3rs evaluate`")
    return from_json(EvaluationResult, data)


def from_json(kind: Any, data: Any) -> Any:
    """Build `kind` (a record class or a typed container of them) from parsed JSON, by its type hints."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{f.name: from_json(hints[f.name], data[f.name])
                       for f in dataclasses.fields(kind) if f.name in data})
    if data is None:
        return None
    if origin in (typing.Union, types.UnionType):
        return from_json(next(a for a in args if a is not type(None)), data)
    if origin is list:
        return [from_json(args[0], v) for v in data]
    if origin is dict:
        return {k: from_json(args[1], v) for k, v in data.items()}
    return data
