"""The meta-training loop: λ0, β and α sweeps (`sweeps`), estimator steps with Adam, held-out validation (`validation`),
checkpoints (`state`).

    path = train(task_or_family, "runs/digits", MetaConfig(estimator="pes"))  # -> runs/digits/best

Randomness is derived from (seed, iteration, member), so a checkpoint only holds the iteration counter,
the meta-parameters, Adam's moments, the particles of truncated unrolls and the best-so-far: resuming
after a kill gives bit-identical meta-parameters. Rank 0 of a torchrun job writes every file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from l3rs import mixer
from l3rs.functional import Config
from l3rs.meta import sweeps
from l3rs.meta.config import MetaConfig, prior_mix
from l3rs.meta.distributed import Runner, broadcast
from l3rs.meta.estimators import ESTIMATORS, Context
from l3rs.meta.state import METRICS, TrainState, open_run, save_checkpoint
from l3rs.meta.unroll import Worker
from l3rs.meta.validation import Validation, clears_noise, validate, validation_due, validation_score, validation_steps
from l3rs.optim import save_meta
from l3rs.schedules import FALLBACK_MULTIPLE, LONG_MULTIPLE
from l3rs.tasks import Task, TaskFamily


def _family(task_or_family: Task | TaskFamily) -> TaskFamily:
    return task_or_family if isinstance(task_or_family, TaskFamily) else TaskFamily.of(task_or_family)


def _tensors(family: TaskFamily) -> tuple[list[str], list[tuple[int, ...]]]:
    named = [(n, tuple(p.shape)) for n, p in family.base.model_fn(0).named_parameters() if p.requires_grad]
    return [n for n, _ in named], [s for _, s in named]


def optimizer_config(cfg: MetaConfig, horizon: int, train_size: int | None = None) -> Config:
    """The user's Config, told the horizon and training set size it is meta-trained around (α and β are set after
    the sweeps: jobs carry them)."""
    return dataclasses.replace(cfg.config, reference_horizon=horizon, horizon_exponent=0.0,
                               reference_train_size=train_size, size_exponent=0.0)


def initial_vector(config: Config, seed: int, num_tensors: int, prior: str = "uniform",
                   long_prior: str | None = None) -> Tensor:
    """The flat meta-parameters of the untrained optimizer meta-training starts from (a `MetaConfig.priors` name),
    moving to the mix `long_prior` in long runs (None: the prior's mix at every length)."""
    return mixer.flatten(config.init_meta(num_tensors, seed, prior_mix(prior), long_prior))


def tune_lr0(family: Task | TaskFamily, config: MetaConfig, horizon: int | None = None,
             workers: int | None = None) -> float:
    """The best λ0 of the untrained L3RS (the first of `config.priors`) on a log grid, placed between its points
    where the sweep's seeds agree (`sweeps.placed_lr0`; SPEC §5: the untrained optimizer is λ0-sensitive)."""
    family = _family(family)
    horizon = horizon or config.horizon or family.base.horizon
    opt_config = optimizer_config(config, horizon, family.base.train_size)
    runner = Runner(Worker(family, opt_config, config.first_order, config.val_subset, config.device),
                    workers or config.workers)
    try:
        vector = initial_vector(opt_config, config.seed, len(_tensors(family)[0]), config.priors[0])
        return sweeps.lr0_sweep(config, horizon, vector, runner, warmup=config.warmup_of(config.priors[0]))["lr0"]
    finally:
        runner.close()


# ------------------------------------------------------------------------------------------ state
def _fits(cfg: MetaConfig, sweep: dict[str, Any] | None, steps: float, spent: float, run: Any,
          share: float = 1.0) -> bool:
    """Whether `steps` more fine-tuning steps at the λ0 sweep's pace, after `spent` seconds, fit `share` of the
    budget (always without a budget or a λ0 sweep). Every rank decides alike."""
    if cfg.budget_minutes is None or sweep is None:
        return True
    pace = run.agree(sweep["seconds"]) / max(sweep["steps"], 1)
    return run.agree(spent) + pace * steps <= share * 60 * cfg.budget_minutes


def _alpha_room(cfg: MetaConfig, sweep: dict[str, Any] | None, run: Any, start: float,
                horizon: int) -> Callable[[int], bool]:
    """Whether so many more α-sweep steps (its steps down and half steps) fit 80% of the budget; they run
    whatever they take when meta-training cannot run anyway (`--iterations 0`, or no room for its first and final
    validation): α then decides what ships, and without its half steps the heavy minilm-top3-chatterbot's 2x sweep
    placed α at 0.81 where they placed it at 0.94 (`docs/RESULTS.md`, session 33). It goes before meta-training: at
    5x α moved the text task's loss by 30%, meta-training its validation by 1% (sessions 27-29)."""
    def room(steps: int) -> bool:
        spent, validations = time.perf_counter() - start, 2 * validation_steps(cfg, horizon)
        idle = cfg.iterations == 0 or not _fits(cfg, sweep, validations, spent, run)
        return idle or _fits(cfg, sweep, steps, spent, run, 0.8)
    return room


def _fresh_state(family: TaskFamily, cfg: MetaConfig, opt_config: Config, horizon: int, run: Any,
                 phase: Callable[[str], None]) -> TrainState:
    start = time.perf_counter()
    count = len(_tensors(family)[0])
    vectors = {prior: initial_vector(opt_config, cfg.seed, count, prior) for prior in cfg.priors}
    phase("λ0 and prior" if cfg.lr0 is None else "sweeps")
    sweep = None if cfg.lr0 is not None else sweeps.prior_sweep(cfg, horizon, vectors, run)
    lr0, prior = (cfg.lr0, cfg.priors[0]) if sweep is None else (sweep["lr0"], sweep["prior"])
    vector, warmup = vectors[prior], cfg.warmup_of(prior)
    size = None
    if cfg.size_exponent is None:  # λ0's sweep again on half the training set
        phase("λ on half the data")
        size = sweeps.size_exponent_fit(cfg, horizon, vector, lr0, run, warmup)
    size_exponent = size["size_exponent"] if size else cfg.size_exponent
    fit = None
    if cfg.horizon_exponent is None:  # at 4x the horizon, its first points past the budget if need be
        phase(f"α at {sweeps.LONG_SWEEP:g}x")
        fit = sweeps.horizon_exponent_fit(cfg, horizon, vector, lr0, run, warmup,
                                          _alpha_room(cfg, sweep, run, start, horizon))
    exponent = fit["horizon_exponent"] if fit else cfg.horizon_exponent
    long, mix = None, prior_mix(prior)
    if any(name != mix for name in cfg.long_priors):
        # the long runs' mix at 4x, at the step λ0 takes there, past the budget if need be as the α sweep's first
        # points: where it was left out for meta-iterations (minilm-chatterbot12), long runs kept a mix 2-3% worse
        # at 2x and 5x than the Adam-leaning one, and the iterations kept nothing (`docs/RESULTS.md`, session 41)
        lr = lr0 * LONG_MULTIPLE ** -exponent
        phase(f"long runs' mix at {LONG_MULTIPLE:g}x")
        reused = fit is not None and exponent == 0 and fit["multiple"] == LONG_MULTIPLE  # its λ0 runs: the mix's
        candidates = {name: initial_vector(opt_config, cfg.seed, count, prior, name)
                      for name in dict.fromkeys((mix, *cfg.long_priors))}
        long = sweeps.long_prior_sweep(cfg, horizon, candidates, mix, lr, run, warmup,
                                       fit["lr0_by_seed"] if reused else None)
        vector = candidates[long["long_prior"]]
        own = sweeps.own_lr0(sweep, long["long_prior"]) if long["long_prior"] != mix and fit else None
        # its own step at 4x: the kept prior's step there times its own λ0 over the kept one's (a fitted α, >= 0)
        ratio = own / lr0 if own else 1.0  # 1: nothing to compare
        moved = exponent - math.log(ratio) / math.log(LONG_MULTIPLE)
        if ratio != 1.0 and moved >= 0:
            step = sweeps.long_step(cfg, horizon, vector, lr, ratio, long["by_seed"][long["long_prior"]], run, warmup)
            long |= {"own_step": step, "seconds": long["seconds"] + step["seconds"],
                     "steps": long["steps"] + step["steps"]}
            exponent = moved if step["kept"] else exponent
    untrained_output = list(mixer.untrained_output(mixer.unflatten(vector, opt_config.init_meta(count))))
    validation_start, val, validation_seconds = time.perf_counter(), None, 0.0
    # the first validation and a final one (of whatever meta-training then does) must fit the budget
    if cfg.iterations > 0 and _fits(cfg, sweep, 2 * validation_steps(cfg, horizon), validation_start - start, run):
        phase("untrained validation")
        val = validate(cfg, horizon, vector, lr0, run, exponent, warmup)
        validation_seconds = time.perf_counter() - validation_start
    values, by_seed = (val.values, val.by_seed) if val else (None, None)
    return TrainState(iteration=0, vector=vector, adam_m=torch.zeros_like(vector), adam_v=torch.zeros_like(vector),
                      best_vector=vector.clone(), lr0=lr0, lr0_sweep=sweep, untrained_validation=values,
                      best_validation=values, best_score=0.0, best_iteration=0, seconds=time.perf_counter() - start,
                      steps=(val.steps if val else 0) + sum(s["steps"] for s in (sweep, size, fit, long) if s),
                      validation_seconds=validation_seconds, validation_total=validation_seconds,
                      horizon_exponent=exponent, horizon_sweep=fit, long_prior_sweep=long,
                      size_exponent=size_exponent, size_sweep=size,
                      untrained_validation_by_seed=by_seed,
                      best_validation_by_seed=by_seed, prior=prior, backbone_warmup=warmup,
                      untrained_output=untrained_output)


# ------------------------------------------------------------------------------------------- loop
def meta_adam_step(state: TrainState, grad: Tensor, cfg: MetaConfig, beta1: float = 0.9,
                   beta2: float = 0.999) -> float:
    """One Adam step on the flat meta-parameters after global-norm clipping; returns the raw norm.

    A non-finite estimate becomes a zero gradient: it never enters the moments."""
    norm = float(grad.norm())
    grad = grad * min(1.0, cfg.clip / (norm + 1e-12)) if math.isfinite(norm) else torch.zeros_like(grad)
    t = state.iteration + 1
    state.adam_m = beta1 * state.adam_m + (1 - beta1) * grad
    state.adam_v = beta2 * state.adam_v + (1 - beta2) * grad * grad
    m_hat, v_hat = state.adam_m / (1 - beta1**t), state.adam_v / (1 - beta2**t)
    state.vector = state.vector - cfg.meta_lr * m_hat / (v_hat.sqrt() + 1e-8)
    return norm


def _export(out: Path, state: TrainState, family: TaskFamily, cfg: MetaConfig, opt_config: Config,
            horizon: int) -> None:
    """best/ and latest/ as optimizer directories loadable by `L3RS.from_pretrained`."""
    names, shapes = _tensors(family)
    like = opt_config.init_meta(len(names))
    opt_config = dataclasses.replace(opt_config, horizon_exponent=state.horizon_exponent,
                                     backbone_warmup=state.backbone_warmup, size_exponent=state.size_exponent)
    info = {"meta_train_seconds": state.seconds, "meta_train_steps": state.steps, "task": family.name,
            "horizon": horizon, "estimator": cfg.estimator, "objective": cfg.objective,
            "lr0_sweep": state.lr0_sweep, "horizon_sweep": state.horizon_sweep, "iteration": state.iteration,
            "size_sweep": state.size_sweep,
            "long_prior_sweep": state.long_prior_sweep,
            "seed": cfg.seed, "prior": state.prior, "head_tensors": list(family.base.head),
            "validation_horizons": [round(m * horizon) for m in cfg.validation_horizons],
            "untrained_validation": state.untrained_validation and state.untrained_validation[0],
            "untrained_validation_by_horizon": state.untrained_validation,
            "untrained_validation_by_seed": state.untrained_validation_by_seed,
            "seconds_by_phase": state.seconds_by_phase(),
            "meta_config": {k: v for k, v in cfg.to_dict().items() if k != "config"}}  # to re-run ablations
    best = {"validation": state.best_validation and state.best_validation[0],
            "validation_by_horizon": state.best_validation, "validation_by_seed": state.best_validation_by_seed,
            "validation_score": state.best_score, "best_iteration": state.best_iteration,
            "falls_back": state.best_falls_back}
    # a best that beats the untrained optimizer only below 2x leaves the longer runs to it
    fallback = tuple(state.untrained_output) if state.best_falls_back else None
    kept = dataclasses.replace(opt_config, fallback=fallback)
    for name, vector, config, extra in (("best", state.best_vector, kept, best),
                                        ("latest", state.vector, opt_config, {})):
        save_meta(out / name, mixer.unflatten(vector, like), config, names, shapes, state.lr0, horizon,
                  **info, **extra)


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: not a requirement
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _log(out: Path, record: dict[str, Any], writer: Any) -> None:
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for key in ("objective", "validation_score", "best_score", "grad_norm"):
            if record.get(key) is not None and math.isfinite(record[key]):
                writer.add_scalar(f"meta/{key}", record[key], record["iteration"])
        writer.flush()


def train(task_or_family: Task | TaskFamily, out_dir: str | os.PathLike,
          meta_config: MetaConfig | None = None, resume: bool = False, progress: bool = True) -> Path:
    """Meta-train an L3RS optimizer for a task family; returns `out_dir/best` (also writes latest/, metrics).

    Stops after `iterations` or `budget_minutes` (sweep included), whichever comes first; `resume=True`
    continues a checkpoint in `out_dir` exactly (a missing one starts fresh).
    """
    cfg = meta_config or MetaConfig()
    family, out = _family(task_or_family), Path(out_dir)
    horizon = cfg.horizon or family.base.horizon
    opt_config = optimizer_config(cfg, horizon, family.base.train_size)
    runner = Runner(Worker(family, opt_config, cfg.first_order, cfg.val_subset, cfg.device), cfg.workers)
    try:
        state = broadcast(lambda: open_run(out, cfg, resume), runner.rank, runner.world)
        if state is None:
            if progress and runner.rank == 0 and cfg.lr0 is None:
                priors = f" for each prior ({', '.join(cfg.priors)})" if len(cfg.priors) > 1 else ""
                tqdm.write(f"meta-train: sweeping λ0 of the untrained L3RS on {list(cfg.lr0_grid)} (from its middle)"
                           + priors + (", then on half the training set to fit β" if cfg.size_exponent is None else "")
                           + (f", then at {sweeps.LONG_SWEEP:g}x the horizon to fit α"
                              if cfg.horizon_exponent is None else ""))
            # the sweeps run many whole fine-tuning runs (minutes on heavy tasks): count their steps as they end
            with tqdm(desc="meta-train", unit="step", disable=not (progress and runner.rank == 0)) as bar:
                runner.progress = bar.update
                state = _fresh_state(family, cfg, opt_config, horizon, runner,
                                     lambda name: bar.set_description_str(f"meta-train: {name}"))
                runner.progress = None
            state.seconds = runner.agree(state.seconds)
            if progress and runner.rank == 0 and cfg.budget_minutes and state.seconds > 60 * cfg.budget_minutes:
                tqdm.write(f"meta-train: the λ0, β and α sweeps took {state.seconds:.0f} s, past the budget of "
                           f"{cfg.budget_minutes:g} minutes: they choose the untrained optimizer and always run "
                           "(--lr0, --size-exponent and --horizon-exponent skip them)")
            if progress and runner.rank == 0 and state.untrained_validation is None and cfg.iterations > 0:
                tqdm.write("meta-train: the budget leaves no room to validate meta-training: the untrained optimizer "
                           "ships with the swept λ0; give a larger --budget-minutes to meta-train")
            if runner.rank == 0:
                _log(out, {"iteration": 0, "objective": None, "validation": state.untrained_validation,
                           "validation_by_seed": state.untrained_validation_by_seed, "validation_score": 0.0,
                           "best_score": 0.0, "seconds": state.seconds, "elapsed": state.seconds, "steps": state.steps,
                           "lr0": state.lr0, "lr0_sweep": state.lr0_sweep, "prior": state.prior,
                           "horizon_exponent": state.horizon_exponent, "horizon_sweep": state.horizon_sweep}, None)
        _loop(state, family, cfg, opt_config, horizon, out, runner, progress)
    finally:
        runner.close()
    return out / "best"


def _validate_into(state: TrainState, cfg: MetaConfig, horizon: int, run: Runner) -> tuple[float, Validation]:
    """Validate the current meta-parameters; keep them as best if they score better and clear the margin.

    The horizons below FALLBACK_MULTIPLE x run first and the longer ones only when the checkpoint could then be kept
    (`_may_keep`): selection is the same as validating all, at a fifth of the cost for a checkpoint screened out at
    1x (its 4x runs cost four times its 1x ones; on digits, validations took 125 s of a 5-minute budget, the
    meta-iterations 22 s). A screened-out checkpoint's score covers the horizons that ran."""
    start = time.perf_counter()
    args = (cfg, horizon, state.vector, state.lr0, run, state.horizon_exponent, state.backbone_warmup)
    short, count = _short(cfg), len(cfg.validation_horizons)
    staged = 0 < len(short) < count
    val = validate(*args, only=short if staged else None)
    if staged and _may_keep(state, cfg, val, short):
        val = val.merge(validate(*args, only=[i for i in range(count) if i not in short]))
    state.steps += val.steps
    seconds = run.agree(time.perf_counter() - start)
    state.validation_total += seconds
    state.validation_seconds = seconds * validation_steps(cfg, horizon) / max(val.steps, 1)  # a whole one's
    ran = [i for i, v in enumerate(val.values) if v is not None]
    score = _score(state, cfg, val, ran)
    if len(ran) == count and score is not None and score < _bar(state):
        _keep(state, val, score, falls_back=False)
    elif cfg.long_fallback and (state.best_falls_back or not state.best_iteration):  # none beats it everywhere yet
        short_score = _score(state, cfg, val, short) if short and state.untrained_output is not None else None
        if short_score is not None and short_score < state.best_score:
            _keep(state, val, short_score, falls_back=True)
    if score is None:
        score = validation_score([val.values[i] for i in ran], [state.untrained_validation[i] for i in ran])
    return score, val


def _short(cfg: MetaConfig) -> list[int]:
    """The validation horizons below FALLBACK_MULTIPLE x: those a checkpoint that may fall back is chosen by."""
    return [i for i, m in enumerate(cfg.validation_horizons) if m < FALLBACK_MULTIPLE]


def _score(state: TrainState, cfg: MetaConfig, val: Validation, which: list[int]) -> float | None:
    """The validation score over the horizons `which` if the values clear the margin there, None otherwise."""
    untrained = state.untrained_validation_by_seed
    if untrained is not None and not clears_noise([val.by_seed[i] for i in which], [untrained[i] for i in which],
                                                  cfg.selection_margin):
        return None
    return validation_score([val.values[i] for i in which], [state.untrained_validation[i] for i in which])


def _bar(state: TrainState) -> float:
    """The score a checkpoint validated at every horizon must beat to be kept: the best's (0 while the best falls
    back: it must then beat the untrained optimizer everywhere)."""
    return 0.0 if state.best_falls_back else state.best_score


def _may_keep(state: TrainState, cfg: MetaConfig, val: Validation, short: list[int]) -> bool:
    """Whether a checkpoint validated at the `short` horizons could still be kept: it clears the margin there and
    scores below the bar (`_bar`), since a score is the worst horizon's and the fallback tier reads the short
    horizons alone."""
    score = _score(state, cfg, val, short)
    return score is not None and score < _bar(state)


def _keep(state: TrainState, val: Validation, score: float, falls_back: bool) -> None:
    state.best_vector, state.best_validation = state.vector.clone(), val.values
    state.best_validation_by_seed = val.by_seed
    state.best_score, state.best_iteration, state.best_falls_back = score, state.iteration, falls_back


def _loop(state: TrainState, family: TaskFamily, cfg: MetaConfig, opt_config: Config, horizon: int, out: Path,
          run: Runner, progress: bool) -> None:
    lead = run.rank == 0
    writer = _tensorboard(out) if lead else None
    if lead:
        _export(out, state, family, cfg, opt_config, horizon)
    if state.untrained_validation is None:  # nothing could be validated: ship the untrained optimizer
        return
    estimator = ESTIMATORS[cfg.estimator]
    ctx = Context(cfg, horizon, state.lr0, state.horizon_exponent, state.backbone_warmup, state.size_exponent)
    budget = math.inf if cfg.budget_minutes is None else 60 * cfg.budget_minutes
    bar = tqdm(total=cfg.iterations, initial=state.iteration, disable=not (progress and lead),
               desc="meta-train", unit="it")
    writing = 0.0  # the last iteration's logging and checkpoint writing: on a fast task it is most of the time
    while state.iteration < cfg.iterations and state.seconds < budget:
        start = time.perf_counter()
        est = estimator(ctx, state.vector, state.iteration, state.particles, run)
        norm = meta_adam_step(state, est.grad, cfg)
        state.iteration += 1
        state.particles, state.steps = est.particles, state.steps + est.steps
        step = run.agree(time.perf_counter() - start) + writing  # a meta-iteration and its writing
        # the last iteration that fits the budget together with its final validation (and with this one's,
        # when one is due now: another iteration would then need a second)
        due = validation_due(state.iteration, cfg.validate_every)
        last = (state.iteration == cfg.iterations
                or state.seconds + 2 * step + (1 + due) * state.validation_seconds > budget)
        score, val = None, None
        if due or last:
            score, val = _validate_into(state, cfg, horizon, run)
        took = run.agree(time.perf_counter() - start)
        state.seconds += took
        record = {"iteration": state.iteration, "objective": est.objective, "validation": val.values if val else None,
                  "validation_by_seed": val.by_seed if val else None, "validation_score": score,
                  "best_score": state.best_score, "best_falls_back": state.best_falls_back, "grad_norm": norm,
                  "seconds": took, "elapsed": state.seconds, "steps": state.steps, "lr0": state.lr0}
        if lead:
            _log(out, record, writer)
            save_checkpoint(out, state, cfg)
            _export(out, state, family, cfg, opt_config, horizon)
        writing = run.agree(time.perf_counter() - start) - took
        state.seconds += writing  # the budget is wall-clock: writing counts (from the next record's elapsed on)
        if budget < math.inf:  # the ETA follows the budget when it binds first (validations spread over iterations)
            per_iteration = step + state.validation_seconds / cfg.validate_every
            bar.total = min(cfg.iterations, state.iteration + max(0, int((budget - state.seconds) / per_iteration)))
        bar.set_postfix(objective=f"{est.objective:.4g}", best=f"{state.best_score:+.3f}")
        bar.update(1)
        if last:  # its final validation is done: another iteration would need another one past the budget
            break
    bar.close()
    if writer is not None:
        writer.close()
