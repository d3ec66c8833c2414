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
from l3rs.meta.unroll import Job, Particle, Result, seed_of

Run = Callable[[list[Job]], list[Result]]


@dataclass(frozen=True)
class Context:
    cfg: MetaConfig
    horizon: int
    lr0: float


class Particles(NamedTuple):
    """Truncated unrolls in flight (pes: 2 per pair, bptt: 1 per task); None entries start fresh."""

    states: list[Particle | None]
    alive: list[bool]  # False once a member diverged: it sits out until the horizon restarts
    noise: Tensor | None  # pes: accumulated perturbation per pair [pairs, n]


class Estimate(NamedTuple):
    grad: Tensor  # descent direction on the objective (already averaged over tasks)
    objective: float  # mean objective of the members (finite ones)
    steps: int  # fine-tuning steps spent
    particles: Particles | None


def noise(cfg: MetaConfig, iteration: int, member: int, n: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed_of(cfg.seed, "noise", iteration, member))
    return torch.randn(n, generator=gen)


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


def es(ctx: Context, vector: Tensor, iteration: int, particles: Particles | None, run: Run) -> Estimate:
    """Antithetic NES over full unrolls with common random numbers and per-task centered ranks."""
    cfg, pairs = ctx.cfg, ctx.cfg.population
    eps = [noise(cfg, iteration, i, vector.numel()) for i in range(pairs)]
    jobs = []
    for i in range(pairs):
        task_seed = seed_of(cfg.seed, "task", iteration, i % cfg.tasks_per_iteration)
        run_seed = seed_of(cfg.seed, "run", iteration, i)
        jobs += [Job(task_seed, run_seed, vector + sign * cfg.sigma * eps[i], ctx.lr0, ctx.horizon,
                     cfg.objective) for sign in (1.0, -1.0)]
    results = run(jobs)
    values = torch.tensor([r.objective for r in results], dtype=torch.float64).view(pairs, 2)
    shaped, tasks = torch.empty(pairs, 2), cfg.tasks_per_iteration
    for t in range(tasks):  # rank within a task: tasks differ in scale
        shaped[t::tasks] = centered_ranks(values[t::tasks].flatten()).view(-1, 2)
    weights = (shaped[:, 0] - shaped[:, 1]) / (2 * pairs * cfg.sigma)
    grad = (weights.unsqueeze(1) * torch.stack(eps)).sum(0)
    return Estimate(grad, _mean_finite(values.flatten().tolist()), sum(r.steps for r in results), None)


def _segment(ctx: Context, iteration: int) -> tuple[int, int, int]:
    """(epoch, segment, steps) of a truncated unroll: epochs restart the horizon with fresh tasks."""
    per_epoch = math.ceil(ctx.horizon / ctx.cfg.truncation)
    epoch, segment = divmod(iteration, per_epoch)
    return epoch, segment, min(ctx.cfg.truncation, ctx.horizon - segment * ctx.cfg.truncation)


def _fresh(count: int, noise: Tensor | None = None) -> Particles:
    return Particles([None] * count, [True] * count, noise)


def pes(ctx: Context, vector: Tensor, iteration: int, particles: Particles | None, run: Run) -> Estimate:
    """Persistent ES: antithetic pairs carry their perturbation sum over the horizon's truncations.

    g = Σ_i ξ_i (L_i⁺ − L_i⁻) / (2 P σ), ξ_i = Σ of pair i's noise since its horizon started (unbiased for
    the sum of truncation objectives). A diverged member counts as the worst finite objective this
    iteration and its pair sits out until the horizon restarts.
    """
    cfg, pairs, n = ctx.cfg, ctx.cfg.population, vector.numel()
    epoch, segment, steps = _segment(ctx, iteration)
    if segment == 0 or particles is None:
        particles = _fresh(2 * pairs, torch.zeros(pairs, n))
    eps = torch.stack([noise(cfg, iteration, i, n) for i in range(pairs)])
    acc = particles.noise + eps
    jobs, owners = [], []
    for i in range(pairs):
        if not (particles.alive[2 * i] and particles.alive[2 * i + 1]):
            continue
        task_seed = seed_of(cfg.seed, "pes-task", epoch, i % cfg.tasks_per_iteration)
        run_seed = seed_of(cfg.seed, "pes-run", epoch, i)
        for k, sign in ((2 * i, 1.0), (2 * i + 1, -1.0)):
            jobs.append(Job(task_seed, run_seed, vector + sign * cfg.sigma * eps[i], ctx.lr0, steps,
                            cfg.objective, particles.states[k], keep=True))
            owners.append(k)
    results = run(jobs)
    states, alive = list(particles.states), list(particles.alive)
    values = torch.full((2 * pairs,), math.nan, dtype=torch.float64)
    for k, r in zip(owners, results, strict=True):
        values[k], states[k], alive[k] = r.objective, r.particle, math.isfinite(r.objective)
    finite = values[torch.isfinite(values)]
    worst = finite.max() if len(finite) else torch.tensor(0.0, dtype=torch.float64)
    ran = ~torch.isnan(values)
    values = torch.where(ran & ~torch.isfinite(values), worst, values)
    diff = torch.where(ran, values, 0.0).view(pairs, 2)
    weights = (diff[:, 0] - diff[:, 1]).float() / (2 * pairs * cfg.sigma)
    grad = (weights.unsqueeze(1) * acc).sum(0)
    return Estimate(grad, _mean_finite([r.objective for r in results]), sum(r.steps for r in results),
                    Particles(states, alive, acc))


def bptt(ctx: Context, vector: Tensor, iteration: int, particles: Particles | None, run: Run) -> Estimate:
    """Truncated backprop: the exact gradient of each truncation's objective, averaged over tasks.

    Particles are detached between truncations (bounded memory); a task whose objective or gradient is
    non-finite is left out of the average and sits out until the horizon restarts.
    """
    cfg, count = ctx.cfg, ctx.cfg.tasks_per_iteration
    epoch, segment, steps = _segment(ctx, iteration)
    if segment == 0 or particles is None:
        particles = _fresh(count)
    jobs, owners = [], []
    for i in range(count):
        if particles.alive[i]:
            jobs.append(Job(seed_of(cfg.seed, "bptt-task", epoch, i), seed_of(cfg.seed, "bptt-run", epoch, i),
                            vector, ctx.lr0, steps, cfg.objective, particles.states[i], grad=True, keep=True))
            owners.append(i)
    results = run(jobs)
    states, alive = list(particles.states), list(particles.alive)
    grads = []
    for i, r in zip(owners, results, strict=True):
        ok = math.isfinite(r.objective) and r.grad is not None and bool(torch.isfinite(r.grad).all())
        states[i], alive[i] = r.particle, ok
        if ok:
            grads.append(r.grad)
    grad = torch.stack(grads).mean(0) if grads else torch.zeros_like(vector)
    return Estimate(grad, _mean_finite([r.objective for r in results]), sum(r.steps for r in results),
                    Particles(states, alive, None))


ESTIMATORS = {"es": es, "pes": pes, "bptt": bptt}
