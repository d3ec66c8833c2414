"""The meta-training loop: λ0 sweep, estimator steps with Adam, held-out validation, checkpoints.

    path = train(task_or_family, "runs/digits", MetaConfig(estimator="pes"))  # -> runs/digits/best

Randomness is derived from (seed, iteration, member), so a checkpoint only holds the iteration counter,
the meta-parameters, Adam's moments, the particles of truncated unrolls and the best-so-far: resuming
after a kill gives bit-identical meta-parameters. Rank 0 of a torchrun job writes every file.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from l3rs import mixer
from l3rs.io import atomic_write
from l3rs.meta.config import MetaConfig
from l3rs.meta.distributed import Runner, broadcast
from l3rs.meta.estimators import ESTIMATORS, Context, Particles
from l3rs.meta.unroll import Job, Worker, pack, seed_of, unpack
from l3rs.optim import save_meta
from l3rs.tasks import Task, TaskFamily

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
VALIDATION_SEED = 2**61  # held-out seeds are >= this; training seeds (seed_of) are below it


def _family(task_or_family: Task | TaskFamily) -> TaskFamily:
    return task_or_family if isinstance(task_or_family, TaskFamily) else TaskFamily.of(task_or_family)


def _tensors(family: TaskFamily) -> tuple[list[str], list[tuple[int, ...]]]:
    named = [(n, tuple(p.shape)) for n, p in family.base.model_fn(0).named_parameters() if p.requires_grad]
    return [n for n, _ in named], [s for _, s in named]


def _initial_vector(cfg: MetaConfig, num_tensors: int) -> Tensor:
    return mixer.flatten(cfg.config.init_meta(num_tensors, cfg.seed))


def lr0_sweep(family: TaskFamily, cfg: MetaConfig, horizon: int, vector: Tensor, run: Any) -> dict[str, Any]:
    """Validation loss of the untrained L3RS over `cfg.lr0_grid` on `cfg.lr0_seeds` training seeds."""
    start = time.perf_counter()
    seeds = [(seed_of(cfg.seed, "sweep-task", k), seed_of(cfg.seed, "sweep-run", k))
             for k in range(cfg.lr0_seeds)]
    jobs = [Job(t, r, vector, lr, horizon, "val_loss") for lr in cfg.lr0_grid for t, r in seeds]
    results = run(jobs)
    losses = [sum(r.objective for r in results[i:i + len(seeds)]) / len(seeds)
              for i in range(0, len(results), len(seeds))]
    best = min(range(len(losses)), key=lambda i: losses[i] if math.isfinite(losses[i]) else math.inf)
    return {"grid": list(cfg.lr0_grid), "val_loss": losses, "lr0": cfg.lr0_grid[best],
            "seconds": time.perf_counter() - start, "steps": sum(r.steps for r in results)}


def tune_lr0(family: Task | TaskFamily, config: MetaConfig, horizon: int | None = None,
             workers: int | None = None) -> float:
    """The best λ0 of the untrained L3RS on a log grid (SPEC §5: the untrained optimizer is λ0-sensitive)."""
    family = _family(family)
    horizon = horizon or config.horizon or family.base.horizon
    worker = Worker(family, config.config, horizon, config.first_order, config.val_subset, config.device)
    runner = Runner(worker, workers or config.workers)
    try:
        vector = _initial_vector(config, len(_tensors(family)[0]))
        return lr0_sweep(family, config, horizon, vector, runner)["lr0"]
    finally:
        runner.close()


def validate(cfg: MetaConfig, horizon: int, vector: Tensor, lr0: float, run: Any) -> tuple[float, int]:
    """(mean objective, steps) of full unrolls on held-out seeds (val loss, or error for val_metric)."""
    objective = "val_metric" if cfg.objective == "val_metric" else "val_loss"
    jobs = [Job(VALIDATION_SEED + k, VALIDATION_SEED + k, vector, lr0, horizon, objective)
            for k in range(cfg.validation_seeds)]
    results = run(jobs)
    values = [r.objective for r in results]
    mean = sum(values) / len(values) if all(map(math.isfinite, values)) else math.inf
    return mean, sum(r.steps for r in results)


# ------------------------------------------------------------------------------------------ state
def _fresh_state(family: TaskFamily, cfg: MetaConfig, horizon: int, run: Any) -> dict[str, Any]:
    start = time.perf_counter()
    vector = _initial_vector(cfg, len(_tensors(family)[0]))
    sweep = None if cfg.lr0 is not None else lr0_sweep(family, cfg, horizon, vector, run)
    lr0 = cfg.lr0 if sweep is None else sweep["lr0"]
    val, val_steps = validate(cfg, horizon, vector, lr0, run)
    return {"iteration": 0, "untrained_validation": val, "vector": vector, "adam_m": torch.zeros_like(vector),
            "adam_v": torch.zeros_like(vector), "best_vector": vector.clone(), "best_validation": val,
            "best_iteration": 0, "lr0": lr0,
            "lr0_sweep": sweep, "seconds": time.perf_counter() - start,
            "steps": val_steps + (sweep["steps"] if sweep else 0), "particles": None}


def _save_checkpoint(out: Path, st: dict[str, Any], cfg: MetaConfig) -> None:
    """One safetensors file (tensors + JSON metadata), replaced atomically: a kill leaves old or new."""
    tensors = {k: st[k].contiguous() for k in ("vector", "adam_m", "adam_v", "best_vector")}
    particles: Particles | None = st["particles"]
    layout = None
    if particles is not None:
        for i, p in enumerate(particles.states):
            if p is not None:
                tensors |= pack(p, f"particle.{i}.")
        if particles.noise is not None:
            tensors["particle_noise"] = particles.noise.contiguous()
        layout = {"present": [p is not None for p in particles.states], "alive": particles.alive}
    doc = {k: st[k] for k in ("iteration", "untrained_validation", "best_validation", "best_iteration", "lr0",
                              "lr0_sweep", "seconds", "steps")}
    doc |= {"particles": layout, "meta_config": cfg.result_keys()}
    atomic_write(out / CHECKPOINT, lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(doc)}))


def _load_checkpoint(out: Path, cfg: MetaConfig) -> dict[str, Any] | None:
    path = out / CHECKPOINT
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        doc = json.loads(f.metadata()["state"])
    if doc["meta_config"] != cfg.result_keys():
        changed = sorted(k for k in cfg.result_keys() if doc["meta_config"].get(k) != cfg.result_keys()[k])
        raise FileExistsError(f"{path} was written with other settings ({', '.join(changed)}): resume "
                              "with the same settings or use a new --out")
    tensors = load_file(path)
    st = {k: v for k, v in doc.items() if k not in ("particles", "meta_config")}
    st |= {k: tensors[k] for k in ("vector", "adam_m", "adam_v", "best_vector")}
    layout, st["particles"] = doc["particles"], None
    if layout is not None:
        states = [unpack(tensors, f"particle.{i}.") if present else None
                  for i, present in enumerate(layout["present"])]
        st["particles"] = Particles(states, layout["alive"], tensors.get("particle_noise"))
    return st


def _open(out: Path, cfg: MetaConfig, resume: bool) -> dict[str, Any] | None:
    """The checkpoint to resume from (None: start fresh); refuses to overwrite one without `resume`."""
    if (out / CHECKPOINT).exists() and not resume:
        raise FileExistsError(f"{out} already holds a meta-training checkpoint: pass --resume (resume=True) "
                              "to continue it, or choose another output directory")
    out.mkdir(parents=True, exist_ok=True)
    st = _load_checkpoint(out, cfg) if resume else None
    metrics = out / METRICS
    kept = []
    if st is not None and metrics.exists():  # drop lines of iterations the checkpoint does not hold
        kept = [line for line in metrics.read_text().splitlines()
                if line.strip() and json.loads(line)["iteration"] <= st["iteration"]]
    metrics.write_text("".join(line + "\n" for line in kept))
    return st


# ------------------------------------------------------------------------------------------- loop
def _adam(st: dict[str, Any], grad: Tensor, cfg: MetaConfig, beta1: float = 0.9,
          beta2: float = 0.999) -> float:
    """One Adam step on the flat meta-parameters after global-norm clipping; returns the raw norm.

    A non-finite estimate becomes a zero gradient: it never enters the moments."""
    norm = float(grad.norm())
    grad = grad * min(1.0, cfg.clip / (norm + 1e-12)) if math.isfinite(norm) else torch.zeros_like(grad)
    t = st["iteration"] + 1
    st["adam_m"] = beta1 * st["adam_m"] + (1 - beta1) * grad
    st["adam_v"] = beta2 * st["adam_v"] + (1 - beta2) * grad * grad
    m_hat, v_hat = st["adam_m"] / (1 - beta1**t), st["adam_v"] / (1 - beta2**t)
    st["vector"] = st["vector"] - cfg.meta_lr * m_hat / (v_hat.sqrt() + 1e-8)
    return norm


def _export(out: Path, st: dict[str, Any], family: TaskFamily, cfg: MetaConfig, horizon: int) -> None:
    """best/ and latest/ as optimizer directories loadable by `L3RS.from_pretrained`."""
    names, shapes = _tensors(family)
    like = cfg.config.init_meta(len(names))
    info = {"meta_train_seconds": st["seconds"], "meta_train_steps": st["steps"], "task": family.name,
            "horizon": horizon, "estimator": cfg.estimator, "objective": cfg.objective,
            "lr0_sweep": st["lr0_sweep"], "iteration": st["iteration"], "seed": cfg.seed,
            "untrained_validation": st["untrained_validation"],
            "meta_config": {k: v for k, v in cfg.to_dict().items() if k != "config"}}  # to re-run ablations
    for name, key, extra in (("best", "best_vector", {"validation": st["best_validation"],
                                                      "best_iteration": st["best_iteration"]}),
                             ("latest", "vector", {})):
        save_meta(out / name, mixer.unflatten(st[key], like), cfg.config, names, shapes, st["lr0"], horizon,
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
        for key in ("objective", "validation", "best", "grad_norm"):
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
    worker = Worker(family, cfg.config, horizon, cfg.first_order, cfg.val_subset, cfg.device)
    runner = Runner(worker, cfg.workers)
    try:
        st = broadcast(lambda: _open(out, cfg, resume), runner.rank, runner.world)
        if st is None:
            if progress and runner.rank == 0 and cfg.lr0 is None:
                tqdm.write(f"meta-train: sweeping λ0 of the untrained L3RS over {list(cfg.lr0_grid)}")
            st = _fresh_state(family, cfg, horizon, runner)
            st["seconds"] = runner.agree(st["seconds"])
            if runner.rank == 0:
                _log(out, {"iteration": 0, "objective": None, "validation": st["untrained_validation"],
                           "best": st["best_validation"], "seconds": st["seconds"], "elapsed": st["seconds"],
                           "steps": st["steps"], "lr0": st["lr0"], "lr0_sweep": st["lr0_sweep"]}, None)
        _loop(st, family, cfg, horizon, out, runner, progress)
    finally:
        runner.close()
    return out / "best"


def _loop(st: dict[str, Any], family: TaskFamily, cfg: MetaConfig, horizon: int, out: Path, run: Runner,
          progress: bool) -> None:
    lead = run.rank == 0
    writer = _tensorboard(out) if lead else None
    if lead:
        _export(out, st, family, cfg, horizon)
    estimator, ctx = ESTIMATORS[cfg.estimator], Context(cfg, horizon, st["lr0"])
    budget = math.inf if cfg.budget_minutes is None else 60 * cfg.budget_minutes
    bar = tqdm(total=cfg.iterations, initial=st["iteration"], disable=not (progress and lead),
               desc="meta-train", unit="it")
    while st["iteration"] < cfg.iterations and st["seconds"] < budget:
        start = time.perf_counter()
        est = estimator(ctx, st["vector"], st["iteration"], st["particles"], run)
        norm = _adam(st, est.grad, cfg)
        st["iteration"] += 1
        st["particles"], st["steps"] = est.particles, st["steps"] + est.steps
        took = run.agree(time.perf_counter() - start)
        last = st["iteration"] == cfg.iterations or st["seconds"] + 2 * took > budget
        val = None
        if st["iteration"] % cfg.validate_every == 0 or last:
            val, val_steps = validate(cfg, horizon, st["vector"], st["lr0"], run)
            st["steps"] += val_steps
            if val < st["best_validation"]:
                st["best_vector"], st["best_validation"] = st["vector"].clone(), val
                st["best_iteration"] = st["iteration"]
        took = run.agree(time.perf_counter() - start)
        st["seconds"] += took
        record = {"iteration": st["iteration"], "objective": est.objective, "validation": val,
                  "best": st["best_validation"], "grad_norm": norm, "seconds": took, "elapsed": st["seconds"],
                  "steps": st["steps"], "lr0": st["lr0"]}
        if lead:
            _log(out, record, writer)
            _save_checkpoint(out, st, cfg)
            _export(out, st, family, cfg, horizon)
        if budget < math.inf:  # the ETA follows the budget when it binds first
            bar.total = min(cfg.iterations, st["iteration"] + max(0, int((budget - st["seconds"]) / took)))
        bar.set_postfix(objective=f"{est.objective:.4g}", best=f"{st['best_validation']:.4g}")
        bar.update(1)
    bar.close()
    if writer is not None:
        writer.close()
