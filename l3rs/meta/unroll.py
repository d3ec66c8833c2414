"""One fine-tuning unroll with the L3RS step, and the jobs that estimators send to workers.

Every estimator runs the same `unroll`: the pretrained model (head from `seed`) is split into explicit
params and buffers (`l3rs.tasks.functional_model`) and stepped K times by `l3rs.functional.update` on the
batches `task.batch_indices(seed, horizon)`. ES and PES run it without a graph (autograd only for the
model's gradient); truncated BPTT runs it with one, cut at the truncation boundaries by passing the
returned `Particle` (detached) into the next unroll.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from l3rs import averaging, features, functional, mixer
from l3rs.bases import Moments
from l3rs.functional import Config
from l3rs.io import single_thread
from l3rs.params import head_mask
from l3rs.seeds import seed_of
from l3rs.tasks import Task, TaskFamily, functional_model
from l3rs.tasks.core import SIZE_SWEEP_SEED, random_subset


class Particle(NamedTuple):
    """A fine-tuning run in flight: everything a truncated unroll needs to continue it."""

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    state: functional.State
    average: list[Tensor] | None = None  # the averaged weights (Config.average), in params' order


def _map(fn: Callable[[Tensor], Tensor], particle: Particle) -> Particle:
    """Apply `fn` to every tensor of a particle (parameters, buffers, moments, feature statistics)."""
    moments, fs = particle.state.moments, particle.state.features

    def each(tensors: list[Tensor] | None) -> list[Tensor] | None:
        return None if tensors is None else [fn(t) for t in tensors]

    moments = moments._replace(m=each(moments.m), v=each(moments.v), s=each(moments.s),
                               theta0=each(moments.theta0))
    fs = features.FeatureState(*(None if t is None else fn(t) for t in fs))
    params = {k: fn(v) for k, v in particle.params.items()}
    return Particle(params, {k: fn(v) for k, v in particle.buffers.items()}, functional.State(moments, fs),
                    each(particle.average))


def _val_split(task: Task, val_subset: int | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """A fixed (seed 0) subset of the validation split: same examples for every member and iteration."""
    x, y = task.val
    if val_subset is not None and val_subset < len(x):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:val_subset]
        x, y = x[idx], y[idx]
    return x.to(device), y.to(device)


@torch.enable_grad()  # the model's gradient needs autograd even when the caller runs under no_grad
def unroll(
    task: Task,
    meta: mixer.Meta,
    lr0: float,
    steps: int,
    seed: int,
    *,
    config: Config | None = None,
    horizon: int | None = None,
    objective: str = "val_loss",
    particle: Particle | None = None,
    graph: str | None = None,
    cotangent: list[Tensor] | None = None,
    val_subset: int | None = 512,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Particle]:
    """Run `steps` L3RS steps of `task` from the pretrained weights (or from `particle`).

    Returns (meta-objective, particle at the end). The objective is the mean training loss of these
    steps, the validation loss at the end, or the validation error 1 − metric ("val_metric"); it is
    +inf once the training loss is non-finite (the unroll stops there). `graph` is None (no meta-graph),
    "first" (model gradients treated as constants), "second" (exact) or "step" (each step differentiable
    on its own, cut between steps: O(1) memory); with "first"/"second" the objective is differentiable
    w.r.t. `meta`. With "step" the returned particle's params are the leaves the objective depends on, and a
    `cotangent` (one tensor per parameter) is backpropagated through every step's update into `meta`'s
    .grad: Σ_t <cotangent, ∂u_t/∂meta> (`linearized_grad`). Batches are
    `task.batch_indices(seed, horizon)[start:start + steps]` where start is the particle's step, so
    truncated unrolls replay exactly the full unroll's data.
    """
    config = config or Config()
    if graph == "step" and config.average:
        raise ValueError("averaged weights (Config.average) are not the leaves a whole-run gradient replays: "
                         "use truncated unrolls")
    model = task.model_fn(seed)
    if device is not None:
        model = model.to(device)
    params, buffers, call = functional_model(model)
    if particle is not None:
        particle = _map(lambda t: t.to(next(iter(params.values())).device), particle)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in particle.params.items()}
        buffers = {k: v.clone() for k, v in particle.buffers.items()}
    names, plist = list(params), list(params.values())
    dev = plist[0].device
    if particle is None:
        state = functional.init(config, plist)
        average = [p.detach().clone() for p in plist] if config.average else None  # the starting weights
    else:
        state, average = particle.state, particle.average
    start = state.moments.step
    horizon = horizon or start + steps
    x_train, y_train = task.train[0].to(dev), task.train[1].to(dev)
    head = head_mask(names, task.head, dev)
    torch.manual_seed(seed_of(seed, start))  # dropout and other in-model randomness replay too
    retain = graph == "second" or (graph in ("first", "second") and objective == "train_loss")
    losses = []
    model.train()
    for idx in task.batch_indices(seed, horizon)[start:start + steps].to(dev):
        current = dict(zip(names, plist, strict=True))
        loss = task.loss(call(current, buffers, x_train[idx]), y_train[idx])
        if not math.isfinite(float(loss.detach())):
            return torch.tensor(math.inf), _map(Tensor.detach, Particle(current, buffers, state, average))
        grads = list(torch.autograd.grad(loss, plist, create_graph=graph == "second", retain_graph=retain))
        with torch.set_grad_enabled(graph is not None):
            updates, state, _ = functional.update(config, meta, grads, state, plist, lr=lr0,
                                                  loss=loss.detach(), total_steps=horizon, head=head,
                                                  train_size=task.train_size)
            if cotangent is not None:
                torch.autograd.backward(updates, cotangent)
            plist = functional.apply_updates(plist, updates)
            if average is not None:
                average = averaging.average_update(config, average, plist, state.moments.step, horizon)
        if graph is None:
            plist = [p.requires_grad_(True) for p in plist]
        elif graph == "step":
            plist = [p.detach().requires_grad_(True) for p in plist]
        losses.append(loss.detach() if graph == "step" else loss)
    current = dict(zip(names, plist, strict=True))
    evaluated = current if average is None else dict(zip(names, average, strict=True))
    value = _objective(task, call, evaluated, buffers, model, objective, losses, val_subset, graph)
    if graph == "step":  # the caller differentiates the objective w.r.t. these very leaves (state has no graph)
        return value, Particle(current, buffers, state)
    return value, _map(Tensor.detach, Particle(current, buffers, state, average))


def linearized_grad(task: Task, meta: mixer.Meta, lr0: float, seed: int, horizon: int, *, config: Config,
                    objective: str, transform: Callable[[Tensor], Tensor], val_subset: int | None,
                    device: torch.device | str | None) -> tuple[Tensor, Tensor, Particle, mixer.Meta | None]:
    """A whole run's first-order meta-gradient in O(1) memory: (objective, transformed objective, particle
    at the end, d transformed / d meta or None when the run diverged).

    With the model's gradients held constant (first order), θ_T = θ_0 + Σ_t u_t(meta) and
    d L(θ_T)/d meta = Σ_t <∇L(θ_T), ∂u_t/∂meta>: one run to reach θ_T and its validation gradient, then a
    replay of the same run (same seeds, same arithmetic) backpropagating that gradient through each step's
    update. The objective is the final one, not a truncation's: nothing rewards being greedy mid-run. The
    weight decay's dependence on θ (a factor 1 − λ0·b·wd per step, ≈ 1) is held constant like the gradients."""
    value, end = unroll(task, meta, lr0, horizon, seed, config=config, horizon=horizon, objective=objective,
                        graph="step", val_subset=val_subset, device=device)
    transformed = transform(value)
    leaves = list(end.params.values())
    if not (torch.isfinite(transformed) and transformed.requires_grad):
        return value.detach(), transformed.detach(), _map(Tensor.detach, end), None
    cotangent = [g.detach() for g in torch.autograd.grad(transformed, leaves)]
    live = {k: v.detach().requires_grad_(True) for k, v in meta.items()}
    unroll(task, live, lr0, horizon, seed, config=config, horizon=horizon, objective=objective, graph="step",
           cotangent=cotangent, val_subset=val_subset, device=device)
    grads = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in live.items()}
    return value.detach(), transformed.detach(), _map(Tensor.detach, end), grads


def _objective(task: Task, call: Any, params: dict[str, Tensor], buffers: dict[str, Tensor],
               model: torch.nn.Module, objective: str, losses: list[Tensor], val_subset: int | None,
               graph: str | None) -> Tensor:
    if objective == "train_loss":
        return torch.stack(losses).mean() if losses else torch.tensor(math.nan)
    x, y = _val_split(task, val_subset, next(iter(params.values())).device)
    model.eval()  # BatchNorm reads its running statistics, dropout is off
    with torch.set_grad_enabled(graph is not None):
        out = call(params, buffers, x)
    model.train()
    value = task.loss(out, y) if objective == "val_loss" else 1.0 - task.metric(out.detach(), y)
    return value if torch.isfinite(value) else torch.tensor(math.inf)


# ------------------------------------------------------------------------------------ jobs & workers
class Job(NamedTuple):
    """One unroll to run somewhere: a pure function of its fields (so any worker gives the same result)."""

    task_seed: int | None  # family.sample(task_seed); None: the family's base task (the environment itself)
    run_seed: int  # head init, batches and in-model randomness
    vector: Tensor  # flat meta-parameters (already perturbed)
    lr0: float
    steps: int  # steps to run now (a truncation, or the whole run)
    horizon: int  # length T of the fine-tuning run these steps belong to (the optimizer is told T)
    objective: str
    particle: Particle | None = None  # continue this truncated unroll (None: start from pretrained)
    grad: bool = False  # also return d meta_objective / d vector (truncated BPTT)
    keep: bool = False  # return the particle at the end
    weight: float = 1.0  # meta_objective = weight * transform(objective)
    log: bool = False  # transform = log (losses of runs of any length and task weigh alike)
    horizon_exponent: float = 0.0  # the optimizer's α (fitted by meta-training after the workers started)
    backbone_warmup: float = 0.0  # the optimizer's backbone warm-up (its prior, chosen after they started)
    size_exponent: float = 0.0  # the optimizer's β (fitted by meta-training after the workers started)
    # the base task's training set cut to this fraction (a fixed subset, `SIZE_SWEEP_SEED`; the size sweep's)
    train_fraction: float = 1.0
    linearized: bool = False  # grad of a whole run in O(1) memory (`linearized_grad`; first order)


def _meta_objective(job: Job, value: Tensor) -> Tensor:
    """What the estimators difference or differentiate: weight * (log) objective."""
    return job.weight * (value.clamp_min(1e-12).log() if job.log else value)


class Result(NamedTuple):
    objective: float  # as measured (inf once the run diverged)
    meta_objective: float  # weight * transform(objective): what the estimators difference or differentiate
    grad: Tensor | None
    particle: Particle | None
    steps: int  # fine-tuning steps spent (a whole-run gradient's replay included)


def grouped_objectives(results: list[Result], group: int) -> list[list[float]]:
    """The objectives of each consecutive `group` of results (the seeds of one setting)."""
    return [[r.objective for r in results[i:i + group]] for i in range(0, len(results), group)]


def mean_objectives(results: list[Result], group: int) -> list[float]:
    """Mean objective of each consecutive `group` of results; inf for a group holding a diverged run."""
    return [sum(c) / len(c) if all(map(math.isfinite, c)) else math.inf for c in grouped_objectives(results, group)]


class Worker:
    """Runs jobs for one meta-training run; caches sampled tasks (sampling may subset data)."""

    def __init__(self, family: TaskFamily, config: Config, first_order: bool, val_subset: int | None,
                 device: str | None) -> None:
        self.family, self.config = family, config
        self.first_order, self.val_subset, self.device = first_order, val_subset, device
        self._tasks: dict[tuple[int | None, float], Task] = {}
        self._like: mixer.Meta | None = None

    def task(self, seed: int | None, fraction: float = 1.0) -> Task:
        if seed is None and fraction == 1.0:
            return self.family.base
        key = (seed, fraction)
        if key not in self._tasks:
            if len(self._tasks) >= 32:
                self._tasks.clear()
            if seed is None:
                base = self.family.base
                self._tasks[key] = base.with_train(random_subset(base.train, SIZE_SWEEP_SEED, fraction))
            else:
                self._tasks[key] = self.family.sample(seed)
        return self._tasks[key]

    def like(self, task: Task) -> mixer.Meta:
        """Meta-parameter shapes for the family's model (same tensors for every member of a family)."""
        if self._like is None:
            count = sum(p.requires_grad for p in task.model_fn(0).parameters())
            self._like = self.config.init_meta(count)
        return self._like

    def __call__(self, job: Job) -> Result:
        task = self.task(job.task_seed, job.train_fraction)
        config = self.config
        fitted = {"horizon_exponent": job.horizon_exponent, "backbone_warmup": job.backbone_warmup,
                  "size_exponent": job.size_exponent}
        if any(getattr(config, key) != value for key, value in fitted.items()):
            config = dataclasses.replace(config, **fitted)
        if job.linearized:
            return self._linearized(job, task, config)
        # the meta-parameters go where the model runs (`device`); estimators get their gradient back on the CPU
        vector = job.vector.detach().to(self.device or job.vector.device, copy=True).requires_grad_(job.grad)
        meta = mixer.unflatten(vector, self.like(task))
        graph = ("first" if self.first_order else "second") if job.grad else None
        with single_thread():
            value, particle = unroll(task, meta, job.lr0, job.steps, job.run_seed, config=config,
                                     horizon=job.horizon, objective=job.objective, particle=job.particle,
                                     graph=graph, val_subset=self.val_subset, device=self.device)
            meta_value = _meta_objective(job, value)
            grad = None
            if job.grad and meta_value.requires_grad and torch.isfinite(meta_value):
                grad = torch.autograd.grad(meta_value, vector)[0].detach().to(job.vector.device)
        steps = (particle.state.moments.step - (job.particle.state.moments.step if job.particle else 0))
        return Result(float(value.detach()), float(meta_value.detach()), grad, particle if job.keep else None,
                      steps)

    def _linearized(self, job: Job, task: Task, config: Config) -> Result:
        """A whole run from the pretrained weights (bptt with truncation 0 never carries a particle)."""
        meta = mixer.unflatten(job.vector.detach().to(self.device or job.vector.device), self.like(task))
        with single_thread():
            value, meta_value, particle, grads = linearized_grad(
                task, meta, job.lr0, job.run_seed, job.horizon, config=config, objective=job.objective,
                transform=lambda v: _meta_objective(job, v), val_subset=self.val_subset, device=self.device)
        grad = None if grads is None else mixer.flatten(grads).to(job.vector.device)
        run = particle.state.moments.step
        return Result(float(value), float(meta_value), grad, particle if job.keep else None,
                      run if grads is None else 2 * run)  # the replay's steps are spent too


# ------------------------------------------------------------------------------- particle <-> tensors
def pack(particle: Particle, prefix: str) -> dict[str, Tensor]:
    """Flat {name: tensor} of a particle, for safetensors checkpoints (order kept in the keys)."""
    out = {f"{prefix}param.{i}.{k}": v for i, (k, v) in enumerate(particle.params.items())}
    out |= {f"{prefix}buffer.{i}.{k}": v for i, (k, v) in enumerate(particle.buffers.items())}
    moments = particle.state.moments
    out[f"{prefix}step"] = torch.tensor(moments.step)
    for key in ("m", "v", "s", "theta0"):
        out |= {f"{prefix}{key}.{i}.": v for i, v in enumerate(getattr(moments, key) or [])}
    out |= {f"{prefix}average.{i}.": v for i, v in enumerate(particle.average or [])}
    feats = particle.state.features._asdict().items()
    out |= {f"{prefix}feature.0.{k}": v for k, v in feats if v is not None}
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def unpack(tensors: dict[str, Tensor], prefix: str) -> Particle:
    """Inverse of `pack`."""
    groups: dict[str, list[tuple[int, str, Tensor]]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix) and key != f"{prefix}step":
            kind, index, name = key[len(prefix):].split(".", 2)
            groups.setdefault(kind, []).append((int(index), name, value))

    def ordered(kind: str) -> list[tuple[str, Tensor]]:
        return [(name, v) for _, name, v in sorted(groups.get(kind, []), key=lambda e: e[0])]

    def tensors_of(kind: str) -> list[Tensor] | None:
        return [v for _, v in ordered(kind)] if kind in groups else None

    moments = Moments(int(tensors[f"{prefix}step"]), tensors_of("m"), tensors_of("v"), tensors_of("s"),
                      tensors_of("theta0"))
    feats = dict(ordered("feature"))
    fs = features.FeatureState(*(feats.get(k) for k in features.FeatureState._fields))
    return Particle(dict(ordered("param")), dict(ordered("buffer")), functional.State(moments, fs),
                    tensors_of("average"))
