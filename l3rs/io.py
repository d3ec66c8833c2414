"""Helpers shared by every layer: files (optimizer dirs, pretraining cache, meta checkpoints, results) and
processes (`exit_with_parent`, `single_thread`).

Kept dependency-free within l3rs so that tasks, optimizer, meta-training and evaluation can all use it
without importing each other.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from l3rs.version import __version__


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` into a temporary file beside `path`, then rename it over `path`: a reader (or a kill)
    sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; results and optimizers are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def finite(x: Any) -> Any:
    """JSON has no inf/nan: non-finite floats become null (a diverged run also says diverged=true)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def save_json(obj: Any, path: Path) -> Path:
    """Write `obj` as strict JSON (non-finite floats as null), atomically."""
    text = json.dumps(finite(obj), indent=1, allow_nan=False)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))
    return Path(path)


def exit_with_parent(every: float = 1.0) -> None:
    """In a worker process: exit as soon as the process that started it is gone.

    A pool's workers block on a queue whose write end they also hold, so a parent killed by a signal (no
    shutdown) would leave them alive forever; a daemon thread watches the parent id instead."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="l3rs-exit-with-parent", daemon=True).start()


def _cpu_flags() -> str | None:
    """A short hash of the CPU's feature flags (Linux; None elsewhere): which kernels torch and oneDNN pick,
    hence how a run rounds, depends on them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1] for line in lines if line.startswith("flags")), None)
    return None if flags is None else hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12]


def machine() -> dict[str, Any]:
    """What a measurement ran on (saved beside every result). `cpu_capability` and `cpu_flags` tell whether two
    CPU results can agree seed for seed: the same run on CPUs with other features rounds differently, and some
    tasks amplify that (docs/evaluation.md)."""
    return {"platform": platform.platform(), "processor": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_flags": _cpu_flags(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "l3rs": __version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


@contextmanager
def single_thread() -> Iterator[None]:
    """Run on one intra-op thread: CPU results then do not depend on the thread count or the worker layout
    (measured: 100 AdamW steps on cnn04-mnist59 end at 0.4214 on one thread, 0.4246 on two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
