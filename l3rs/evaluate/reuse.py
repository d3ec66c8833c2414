"""Reusing a previous evaluation's baselines (`evaluate(..., baselines_from=...)`).

A baseline's tuning and runs depend only on the task, the scenario's steps and validation grid, the seeds,
the LR grids and the device, never on the optimizer under evaluation: re-evaluating another optimizer on the
same task can take them verbatim from the previous evaluation.json instead of repeating the sweeps (most of
an evaluation's cost). "The same task" is checked by a fingerprint of its data and of the model at the first
evaluation seed: before its weights shipped, the cnn04 backbone depended on how many threads pretrained it
(the same AdamW-cosine run on cnn04-mnist59 ended at 0.101 from one and 0.123 from the other), and user tasks
may change their data or model between runs.
Nothing here can tell whether the baseline code changed since. Nor does reuse need the same machine, but it
is only seed-for-seed the same there: on another CPU the same run rounds differently, and cnn04-mnist59's
fine-tuning amplifies that (AdamW-cosine, seed 1000: 0.101 on one machine, 0.111 on another), so the paired
comparison loses its pairing and its intervals widen; `evaluate` says so (`same_machine`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from l3rs.evaluate.methods import Method
from l3rs.evaluate.runs import validation_interval
from l3rs.evaluate.stats import eval_grid
from l3rs.finetune import RunResult
from l3rs.results import EvaluationResult, MethodResult, ScenarioResult, Settings, Trial, load


class PreviousEvaluationError(ValueError):
    """`baselines_from` names no file, or one that is not an evaluation.json this version reads."""


def read_previous(path: str | os.PathLike) -> EvaluationResult:
    """The previous evaluation whose baselines may be reused, or a PreviousEvaluationError saying why not."""
    if not Path(path).is_file():
        raise PreviousEvaluationError(f"{path}: no such file (a previous evaluation.json)")
    try:
        return load(path)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise PreviousEvaluationError(f"{path}: not a readable evaluation.json ({e})") from None


def task_fingerprint(task: Any, seed: int) -> str:
    """A hash of the task's splits and of `task.model_fn(seed)`'s weights and buffers (pretrained backbone
    and head): two evaluations with equal fingerprints fine-tune the same model on the same data.

    A task whose inputs are features computed on the machine (the text tasks' frozen encoder outputs, which
    round differently on another CPU) names what they are computed from in `task.meta["inputs_from"]`: that
    is hashed instead of the inputs' values (their shapes and the targets still are)."""
    digest = hashlib.sha256()
    source = (getattr(task, "meta", None) or {}).get("inputs_from")
    if source is not None:
        digest.update(json.dumps(source, sort_keys=True).encode())
    tensors = [("model." + k, v) for k, v in task.model_fn(seed).state_dict().items()]
    for split in ("train", "val", "test"):
        for i, t in enumerate(getattr(task, split) or ()):
            tensors.append((f"{split}.{i}", torch.tensor(t.shape) if i == 0 and source is not None else t))
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", copy=True).reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def same_protocol(old: Settings, new: Settings, method: Method) -> bool:
    """Would `method` be tuned on the same seeds and grids and run on the same device under both settings, and
    do they share an evaluation seed (runs on the seeds only one of them has are left out or run)?"""
    names = ["tune_seeds", "grids", "device"]
    names += ["head_multipliers"] * method.head + ["atmo_mixes"] * (method.kind == "atmo")
    return bool(set(old.eval_seeds) & set(new.eval_seeds)) and all(getattr(old, n) == getattr(new, n) for n in names)


def same_machine(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether two evaluations' machines round alike (same CPU features, GPU and torch), so that a seed gives
    the same run on both; False when the old one did not record its CPU's features."""
    keys = ("cpu_capability", "cpu_flags", "cuda", "torch")
    return old.get("cpu_capability") is not None and all(old.get(k) == new.get(k) for k in keys)


def missing_seeds(result: MethodResult, eval_seeds: Any) -> list[int]:
    """The evaluation seeds a reused baseline has no run for (a previous evaluation with fewer seeds)."""
    done = {run.seed for run in result.runs}
    return [seed for seed in eval_seeds if seed not in done]


def _nulls(values: list[float | None], fill: float) -> list[float]:
    return [fill if v is None else v for v in values]


def _restore_run(run: RunResult) -> RunResult:
    """JSON wrote non-finite numbers as null; `finetune` records a non-finite validation loss as inf."""
    return dataclasses.replace(run, train_loss=_nulls(run.train_loss, math.nan),
                               val_loss=_nulls(run.val_loss, math.inf), val_metric=_nulls(run.val_metric, math.nan))


def _restore_trial(trial: Trial) -> Trial:
    return dataclasses.replace(trial, val_loss=math.inf if trial.val_loss is None else trial.val_loss,
                               val_losses=_nulls(trial.val_losses, math.inf))


def _restore(result: MethodResult, eval_seeds: list[int]) -> MethodResult:
    """The previous result as it was written, keeping only the runs on `eval_seeds`."""
    tuning = dataclasses.replace(result.tuning, trials=[_restore_trial(t) for t in result.tuning.trials])
    return dataclasses.replace(result, tuning=tuning,
                               runs=[_restore_run(r) for r in result.runs if r.seed in eval_seeds])


def _same_scenario(previous: EvaluationResult, label: str, steps: int) -> ScenarioResult | None:
    key = (label, steps, eval_grid(steps, validation_interval(steps)))
    return next((s for s in previous.scenarios if (s.label, s.steps, s.eval_steps) == key), None)


def reusable(previous: EvaluationResult | None, settings: Settings, label: str, steps: int,
             methods: list[Method], fingerprint: str) -> dict[str, MethodResult] | None:
    """Those of `methods` whose results in `previous` a new `steps`-step run of scenario `label` would
    reproduce (only their `tuning` and `runs` count: everything else is recomputed from the merged runs):
    same scenario, protocol and task fingerprint. Only the runs on this evaluation's seeds are kept; seeds
    `previous` did not run are left to the caller (`missing_seeds`). None: `previous` ran this scenario on
    other data or another model (or did not record which)."""
    old = None if previous is None else _same_scenario(previous, label, steps)
    if old is None:
        return {}
    if old.fingerprint != fingerprint:
        return None
    return {m.name: _restore(old.methods[m.name], settings.eval_seeds) for m in methods
            if m.reusable and m.name in old.methods and old.methods[m.name].kind == m.kind
            and same_protocol(previous.settings, settings, m)}
