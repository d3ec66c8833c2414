"""Meta-gradient estimators behind one interface: es (antithetic NES), pes (persistent ES), bptt.

    estimate = ESTIMATORS[name](ctx, vector, iteration, particles, run)

Each builds a list of `Job`s (unrolls), hands it to `run` (which spreads it over processes and machines
and returns results in job order), and reduces the results in a fixed order. Every random choice (noise,
task sample, head seed, batches) is a pure function of (seed, iteration, member), so the estimate does
not depend on the number of workers, and `particles` (the state of truncated unrolls in flight) is the
only thing carried between iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from l3rs.meta.config import MetaConfig
from l3rs.meta.unroll import Job, Particle, Result
from l3rs.seeds import seed_of

Run = Callable[[list[Job]], list[Result]]


@dataclass(frozen=True)
class Context:
    cfg: MetaConfig
    horizon: int  # the task's horizon: sampled run lengths are multiples of it
    lr0: float
    horizon_exponent: float = 0.0
    backbone_warmup: float = 0.0
    size_exponent: float = 0.0

    @property
    def settings(self) -> dict[str, float]:
        """What every job tells the optimizer besides its meta-parameters and λ0 (chosen by the sweeps)."""
        return {"horizon_exponent": self.horizon_exponent, "backbone_warmup": self.backbone_warmup,
                "size_exponent": self.size_exponent}


class Particles(NamedTuple):
    """Truncated unrolls in flight (pes: 2 per pair, bptt: 1 per task); None entries start fresh."""

    states: list[Particle | None]
    alive: list[bool]  # False once a member diverged: its run restarts next iteration
    noise: Tensor | None  # pes: accumulated perturbation per pair [pairs, n]
    runs: list[int]  # per slot (pes pair, bptt task): index of its current run (seeds and horizon follow)


class Estimate(NamedTuple):
    grad: Tensor  # descent direction on the objective (already averaged over tasks)
    objective: float  # mean objective of the members (finite ones)
    steps: int  # fine-tuning steps spent
    particles: Particles | None


def noise(cfg: MetaConfig, iteration: int, member: int, n: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed_of(cfg.seed, "noise", iteration, member))
    return torch.randn(n, generator=gen)


def draw_horizon(ctx: Context, *key: object) -> int:
    """A run length T over `cfg.horizon_range` times the task's horizon (a pure function of key).

    Runs of many lengths, each told its own T, teach the optimizer a schedule over progress t/T rather than
    over steps: the learned behaviour then carries to runs longer (or shorter) than the task's horizon.
    "equal-steps" draws T with density ∝ 1/T²: a run costs T steps, so every octave of lengths gets the same
    share of the unrolled steps (log-uniform draws over 0.5x-8x spent 93% of them on runs longer than 1x).
    "log-uniform" draws the runs themselves log-uniformly."""
    lo, hi = ctx.cfg.horizon_range
    if lo == hi:
        return max(1, round(lo * ctx.horizon))
    u = torch.rand(1, generator=torch.Generator().manual_seed(seed_of(ctx.cfg.seed, "horizon", *key))).item()
    if ctx.cfg.horizon_draw == "equal-steps":
        multiple = 1.0 / (1.0 / hi + u * (1.0 / lo - 1.0 / hi))
    else:
        multiple = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    return max(1, round(ctx.horizon * multiple))


def end_weight(cfg: MetaConfig, done: int, horizon: int) -> float:
    """Weight of a truncation's objective by the progress it reaches: 1 at the start, cfg.end_weight at T.

    Truncated objectives reward greed (the val loss right after each truncation); weighting the end of the
    run more counters that with no extra unrolling."""
    return 1.0 + (cfg.end_weight - 1.0) * min(1.0, done / horizon)


def centered_ranks(values: Tensor) -> Tensor:
    """Ranks scaled to [-0.5, 0.5] (lowest objective first); NaN/inf members tie for the worst rank."""
    finite = torch.isfinite(values)
    ranks = torch.empty(len(values))
    order = torch.argsort(torch.where(finite, values, math.inf), stable=True)
    ranks[order] = torch.arange(len(values), dtype=torch.float32)
    if not finite.all():  # tied, so a pair that diverged on both sides contributes nothing
        ranks[~finite] = ranks[~finite].mean()
    return ranks / max(len(values) - 1, 1) - 0.5


def _mean_finite(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.inf


def _log_objective(cfg: MetaConfig) -> bool:
    return cfg.log_objective and cfg.objective != "val_metric"


def es(ctx: Context, vector: Tensor, iteration: int, particles: Particles | None, run: Run) -> Estimate:
    """Antithetic NES over full unrolls with common random numbers and per-task centered ranks.

    Every member of an iteration runs the same horizon T (drawn per iteration), so ranks compare like
    with like."""
    cfg, pairs = ctx.cfg, ctx.cfg.population
    horizon = draw_horizon(ctx, "es", iteration)
    eps = [noise(cfg, iteration, i, vector.numel()) for i in range(pairs)]
    jobs = []
    for i in range(pairs):
        task_seed = seed_of(cfg.seed, "task", iteration, i % cfg.tasks_per_iteration)
        run_seed = seed_of(cfg.seed, "run", iteration, i)
        jobs += [Job(task_seed, run_seed, vector + sign * cfg.sigma * eps[i], ctx.lr0, horizon, horizon,
                     cfg.objective, **ctx.settings) for sign in (1.0, -1.0)]
    results = run(jobs)
    values = torch.tensor([r.objective for r in results], dtype=torch.float64).view(pairs, 2)
    shaped, tasks = torch.empty(pairs, 2), cfg.tasks_per_iteration
    for t in range(tasks):  # rank within a task: tasks differ in scale
        shaped[t::tasks] = centered_ranks(values[t::tasks].flatten()).view(-1, 2)
    weights = (shaped[:, 0] - shaped[:, 1]) / (2 * pairs * cfg.sigma)
    grad = (weights.unsqueeze(1) * torch.stack(eps)).sum(0)
    return Estimate(grad, _mean_finite(values.flatten().tolist()), sum(r.steps for r in results), None)


class Slot(NamedTuple):
    """Where a truncated unroll stands: its fine-tuning run (seeds and horizon derive from the run index)."""

    task_seed: int
    run_seed: int
    horizon: int
    done: int  # steps already taken in this run
    steps: int  # steps of this truncation


def _advance(ctx: Context, name: str, particles: Particles, slot: int, members: tuple[int, ...]) -> Slot:
    """The next truncation of slot `slot`; a run that diverged or reached its T restarts as a fresh run
    (its members' particles cleared) with new seeds and a new horizon. Mutates `particles` lists."""
    run_index = particles.runs[slot]
    horizon = draw_horizon(ctx, name, slot, run_index)
    first = particles.states[members[0]]
    done = first.state.moments.step if first is not None else 0
    if done >= horizon or not all(particles.alive[k] for k in members):
        run_index, done = run_index + 1, 0
        particles.runs[slot] = run_index
        horizon = draw_horizon(ctx, name, slot, run_index)
        for k in members:
            particles.states[k], particles.alive[k] = None, True
        if particles.noise is not None:
            particles.noise[slot] = 0.0
    cfg = ctx.cfg
    return Slot(seed_of(cfg.seed, f"{name}-task", slot, run_index), seed_of(cfg.seed, f"{name}-run", slot, run_index),
                horizon, done,
                horizon - done if cfg.truncation == 0 else min(cfg.truncation, horizon - done))


def _fresh(members: int, slots: int, noise: Tensor | None = None) -> Particles:
    return Particles([None] * members, [True] * members, noise, [0] * slots)


def _copy(particles: Particles) -> Particles:
    noise = None if particles.noise is None else particles.noise.clone()
    return Particles(list(particles.states), list(particles.alive), noise, list(particles.runs))


def pes(ctx: Context, vector: Tensor, iteration: int, particles: Particles | None, run: Run) -> Estimate:
    """Persistent ES: antithetic pairs carry their perturbation sum over their run's truncations.

    g = Σ_i ξ_i (L_i⁺ − L_i⁻) / (2 P σ), ξ_i = Σ of pair i's noise since its run started (unbiased for
    the sum of truncation objectives). Each pair runs its own horizon and restarts on its own, so pairs
    sit at different points of their runs. A diverged member counts as the worst finite objective this
    iteration and its pair restarts next iteration.
    """
    cfg, pairs, n = ctx.cfg, ctx.cfg.population, vector.numel()
    particles = _copy(particles) if particles is not None else _fresh(2 * pairs, pairs, torch.zeros(pairs, n))
    eps = torch.stack([noise(cfg, iteration, i, n) for i in range(pairs)])
    slots = [_advance(ctx, "pes", particles, i, (2 * i, 2 * i + 1)) for i in range(pairs)]
    particles.noise.add_(eps)
    jobs, owners = [], []
    for i, slot in enumerate(slots):
        weight = end_weight(cfg, slot.done + slot.steps, slot.horizon)
        for k, sign in ((2 * i, 1.0), (2 * i + 1, -1.0)):
            jobs.append(Job(slot.task_seed, slot.run_seed, vector + sign * cfg.sigma * eps[i], ctx.lr0, slot.steps,
                            slot.horizon, cfg.objective, particles.states[k], keep=True, weight=weight,
                            log=_log_objective(cfg), **ctx.settings))
            owners.append(k)
    results = run(jobs)
    values = torch.full((2 * pairs,), math.nan, dtype=torch.float64)
    for k, r in zip(owners, results, strict=True):
        values[k], particles.states[k] = r.meta_objective, r.particle
        particles.alive[k] = math.isfinite(r.objective)
    finite = values[torch.isfinite(values)]
    worst = finite.max() if len(finite) else torch.tensor(0.0, dtype=torch.float64)
    values = torch.where(torch.isfinite(values), values, worst).view(pairs, 2)
    weights = (values[:, 0] - values[:, 1]).float() / (2 * pairs * cfg.sigma)
    grad = (weights.unsqueeze(1) * particles.noise).sum(0)
    return Estimate(grad, _mean_finite([r.objective for r in results]), sum(r.steps for r in results), particles)


def bptt(ctx: Context, vector: Tensor, iteration: int, particles: Particles | None, run: Run) -> Estimate:
    """Truncated backprop: the exact gradient of each truncation's (weighted, log) objective, averaged over
    tasks. Each task slot runs its own horizon and restarts on its own.

    Particles are detached between truncations (bounded memory); a task whose objective or gradient is
    non-finite is left out of the average and restarts next iteration.
    """
    cfg, count = ctx.cfg, ctx.cfg.tasks_per_iteration
    particles = _copy(particles) if particles is not None else _fresh(count, count)
    slots = [_advance(ctx, "bptt", particles, i, (i,)) for i in range(count)]
    jobs = [Job(slot.task_seed, slot.run_seed, vector, ctx.lr0, slot.steps, slot.horizon, cfg.objective,
                particles.states[i], grad=True, keep=True, weight=end_weight(cfg, slot.done + slot.steps, slot.horizon),
                log=_log_objective(cfg), **ctx.settings,
                linearized=cfg.truncation == 0 and cfg.first_order) for i, slot in enumerate(slots)]
    results = run(jobs)
    grads = []
    for i, r in enumerate(results):
        ok = math.isfinite(r.objective) and r.grad is not None and bool(torch.isfinite(r.grad).all())
        particles.states[i], particles.alive[i] = r.particle, ok
        if ok:
            grads.append(r.grad)
    grad = torch.stack(grads).mean(0) if grads else torch.zeros_like(vector)
    return Estimate(grad, _mean_finite([r.objective for r in results]), sum(r.steps for r in results), particles)


ESTIMATORS = {"es": es, "pes": pes, "bptt": bptt}
