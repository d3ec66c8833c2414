"""Backbones that l3rs pretrains itself, deterministically, as safetensors + JSON.

Several pretraining seeds of the same backbone give the "other model initialization" axis of the
generalization study. Conv and matmul results depend on the number of intra-op threads, so pretraining runs
on one thread; before it did, whichever process pretrained first (a two-thread main process or a one-thread
worker) decided the weights, and one cnn04 fine-tuning run ended at 0.101 from one and 0.123 from the other.
The default settings' weights for seeds 0-3 ship inside the package (`weights/`, made on one thread): every
machine fine-tunes the same backbones. Other settings are pretrained on first use (seconds on 2 CPU cores)
into the cache.

Cache: `$L3RS_CACHE` (default `~/.cache/l3rs`)/pretrained/<name>-s<seed>-<settings hash>.{safetensors,json}.
`L3RS_PRETRAIN_STEPS=<n>` overrides the number of pretraining steps (tests use tiny values); the steps
are part of the settings hash, so tiny and full checkpoints never mix.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from l3rs.io import atomic_write, single_thread

from . import data
from .backbones import MLP, SmallCNN
from .core import Pair, TaskError, accuracy

VERSION = 1
SHIPPED = Path(__file__).parent / "weights"  # the default settings' checkpoints, same file names as the cache


def cache_dir() -> Path:
    """Root of l3rs' on-disk cache: $L3RS_CACHE, else ~/.cache/l3rs (not created here)."""
    return Path(os.environ.get("L3RS_CACHE") or Path.home() / ".cache" / "l3rs").expanduser()


@dataclass(frozen=True)
class PretrainSpec:
    """How to pretrain one backbone; every field is hashed into the checkpoint's file name."""

    arch: str
    arch_kwargs: tuple[tuple[str, object], ...]
    dataset: str
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0


SPECS = {
    "cnn04": PretrainSpec(
        "SmallCNN",
        (("num_classes", 5), ("width", 16)),
        "mnist5k-digits0-4",
        steps=600,
        batch_size=64,
        lr=3e-3,
        weight_decay=1e-4,
    ),
    "mlp1d": PretrainSpec(
        "MLP",
        (("in_features", 40), ("hidden", 256), ("depth", 3), ("num_classes", 10)),
        "mnist1d-base",
        steps=3000,
        batch_size=128,
        lr=2e-3,
        weight_decay=0.05,
    ),
}
ARCHS: dict[str, Callable[..., nn.Module]] = {"SmallCNN": SmallCNN, "MLP": MLP}


def pretrain_data(dataset: str) -> tuple[Pair, Pair]:
    """(train, held-out) pairs a backbone is pretrained and checked on."""
    if dataset == "mnist5k-digits0-4":
        x, y = data.select_classes(data.mnist5k(), (0, 1, 2, 3, 4))
        train, val = data.split((data.normalize_mnist(x), y), (2000, 500), seed=0)
        return train, val
    if dataset == "mnist1d-base":
        x, y = data.mnist1d(**data.MNIST1D_BASE)
        return (x[:4000], y[:4000]), (x[4000:], y[4000:])  # make_dataset's own 80/20 split
    raise TaskError(f"unknown pretraining dataset {dataset!r}")


def build(spec: PretrainSpec) -> nn.Module:
    """An untrained model of the spec's architecture (parameters from the global RNG)."""
    return ARCHS[spec.arch](**dict(spec.arch_kwargs))


def resolve_spec(name: str, steps: int | None = None) -> PretrainSpec:
    """The spec of a backbone, with steps from the argument, else $L3RS_PRETRAIN_STEPS, else default."""
    if name not in SPECS:
        raise TaskError(f"unknown pretrained backbone {name!r}; known: {', '.join(sorted(SPECS))}")
    spec = SPECS[name]
    env = os.environ.get("L3RS_PRETRAIN_STEPS")
    steps = steps if steps is not None else (int(env) if env else None)
    if steps is not None:
        if steps <= 0:
            raise TaskError(f"pretraining steps must be positive, got {steps}")
        spec = replace(spec, steps=steps)
    return spec


def _file_name(name: str, seed: int, spec: PretrainSpec) -> str:
    """<name>-s<seed>-<hash>.safetensors; the hash covers the spec and format version."""
    blob = json.dumps({"name": name, "spec": asdict(spec), "version": VERSION}, sort_keys=True, default=str)
    return f"{name}-s{seed}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}.safetensors"


def shipped_path(name: str, seed: int, spec: PretrainSpec) -> Path | None:
    """The checkpoint for (name, seed, spec) that ships with l3rs, if there is one."""
    path = SHIPPED / _file_name(name, seed, spec)
    return path if path.is_file() else None


def checkpoint_path(name: str, seed: int, spec: PretrainSpec) -> Path:
    """Where the checkpoint for (name, seed, spec) lives: the shipped one, else the cache's."""
    return shipped_path(name, seed, spec) or cache_dir() / "pretrained" / _file_name(name, seed, spec)


def _train(spec: PretrainSpec, seed: int, progress: bool, desc: str) -> tuple[nn.Module, dict]:
    train, val = pretrain_data(spec.dataset)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = build(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    n = len(train[0])
    model.train()
    bar = tqdm(range(spec.steps), desc=desc, disable=not progress, leave=False)
    with single_thread():  # the shipped weights were made on one thread (two threads give other weights)
        for step in bar:
            idx = torch.randint(n, (spec.batch_size,), generator=gen)
            loss = F.cross_entropy(model(train[0][idx]), train[1][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    with torch.no_grad():
        val_acc = float(accuracy(model(val[0]), val[1]))
    return model, {"val_accuracy": val_acc}


def pretrain(
    name: str, seed: int = 0, force: bool = False, progress: bool = True, steps: int | None = None
) -> Path:
    """Pretrain backbone `name` from `seed` unless shipped or cached; returns the .safetensors path.

    Deterministic on one machine (seeded init and batches, CPU), written atomically (tmp file + os.replace)
    so parallel workers racing on first use never read a half-written file. A JSON file beside it records
    the settings and the held-out accuracy reached. `force` re-pretrains a cached checkpoint; shipped ones
    are never replaced (every machine must fine-tune the same backbone).
    """
    spec = resolve_spec(name, steps)
    path = checkpoint_path(name, seed, spec)
    if path.parent == SHIPPED:  # checkpoint_path names a shipped file only when it exists
        if force:
            raise TaskError(f"{name} seed {seed} ships with l3rs ({path}) and is not re-pretrained: --force "
                            "applies to cached backbones (other --steps)")
        return path
    if path.is_file() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, info = _train(spec, seed, progress, desc=f"pretrain {name} seed {seed}")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    record = {
        "name": name,
        "seed": seed,
        "spec": asdict(spec),
        "version": VERSION,
        "seconds": round(time.perf_counter() - start, 2),
        "torch": torch.__version__,
        **info,
    }
    atomic_write(
        path.with_suffix(".json"), lambda p: Path(p).write_text(json.dumps(record, indent=2, default=str))
    )
    atomic_write(path, lambda p: save_file(state, p, metadata={"name": name, "seed": str(seed)}))
    return path


@functools.lru_cache(maxsize=32)
def _load_state(path: str, mtime_ns: int) -> dict[str, Tensor]:
    return load_file(path)


def pretrained_model(name: str, seed: int = 0, progress: bool = True) -> nn.Module:
    """The pretrained backbone `name` (pretraining it first if it is not cached yet)."""
    spec = resolve_spec(name)
    path = pretrain(name, seed, progress=progress)
    model = build(spec)
    model.load_state_dict(_load_state(str(path), path.stat().st_mtime_ns))
    return model


def pretrain_info(name: str, seed: int = 0, steps: int | None = None) -> dict | None:
    """The JSON record of a cached checkpoint, or None when it has not been pretrained yet."""
    path = checkpoint_path(name, seed, resolve_spec(name, steps)).with_suffix(".json")
    return json.loads(path.read_text()) if path.is_file() else None
