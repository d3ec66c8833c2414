"""Fine-tuning runs of one scenario: cached (a run is never repeated) and optionally spread over processes."""

from __future__ import annotations

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor
from typing import Any, NamedTuple

import torch

from l3rs.evaluate.methods import Method, make_optimizer
from l3rs.finetune import RunResult, finetune
from l3rs.functional import Config
from l3rs.io import exit_with_parent, single_thread

MIN_EVAL_POINTS = 30  # validation points per curve run: enough to resolve a 1.1x speed-up


def validation_interval(steps: int) -> int:
    """Steps between validations of an evaluation run (at least MIN_EVAL_POINTS points per curve)."""
    return max(1, steps // MIN_EVAL_POINTS)


class RunRequest(NamedTuple):
    method: Method
    hp: dict[str, float]
    seed: int
    curves: bool  # record validation curves and the test metric (evaluation runs), or only the final loss

    def key(self) -> tuple:
        method, hp = self.method, self.hp
        return (method.kind, method.cosine, method.path, hp.get("lr"), hp.get("head", 1.0), hp.get("mix"),
                self.seed, self.curves)


class WorkerSetup(NamedTuple):
    task: Any
    config: Config
    device: Any
    steps: int
    eval_every: int


def _run(setup: WorkerSetup, request: RunRequest) -> RunResult:
    make = make_optimizer(request.method, request.hp, setup.task.head, setup.config, setup.task.train_size)
    return finetune(setup.task, make, setup.steps, request.seed, test=request.curves, device=setup.device,
                    eval_every=setup.eval_every if request.curves else None)


_WORKER_SETUP: list[WorkerSetup] = []  # what each pool process runs with, set once by its initializer


def _worker_init(setup: WorkerSetup) -> None:
    torch.set_num_threads(1)  # W single-threaded processes beat one W-threaded process on small models
    exit_with_parent()
    _WORKER_SETUP.append(setup)


def _worker_run(request: RunRequest) -> RunResult:
    return _run(_WORKER_SETUP[0], request)


class ScenarioRunner:
    """Runs one scenario's fine-tuning runs (caching identical ones) and advances a shared progress bar.

    With ``workers > 1``, `prefetch` computes independent runs (a sweep's grid, the evaluation seeds) in
    that many single-threaded processes; the sequential code then finds them in the cache.
    """

    def __init__(self, task: Any, steps: int, config: Config, bar: Any = None, device: Any = None,
                 workers: int = 1) -> None:
        self.setup = WorkerSetup(task, config, device, steps, validation_interval(steps))
        self.bar, self.workers = bar, workers
        self.cache: dict[tuple, RunResult] = {}
        self._pool: ProcessPoolExecutor | None = None

    @property
    def eval_every(self) -> int:
        return self.setup.eval_every

    def _done(self, request: RunRequest, result: RunResult) -> RunResult:
        self.cache[request.key()] = result
        if self.bar is not None:
            steps = self.setup.steps
            self.bar.set_postfix_str(f"{self.setup.task.name} {steps} steps {request.method.name} seed "
                                     f"{request.seed}", refresh=False)
            self.bar.total = max(self.bar.total, self.bar.n + steps)
            self.bar.update(steps)
        return result

    def run(self, method: Method, hp: dict[str, float], seed: int, curves: bool = False) -> RunResult:
        request = RunRequest(method, hp, seed, curves)
        cached = self.cache.get(request.key())
        if cached is not None:
            return cached
        with single_thread():  # like the pool's workers: figures do not depend on --workers
            return self._done(request, _run(self.setup, request))

    def prefetch(self, requests: list[RunRequest]) -> None:
        """Compute the uncached runs among `requests` in parallel (no-op with one worker)."""
        todo = list({r.key(): r for r in requests if r.key() not in self.cache}.values())
        if self.workers < 2 or len(todo) < 2 or not self._start_pool():
            return
        for request, result in zip(todo, self._pool.map(_worker_run, todo), strict=True):
            self._done(request, result)

    def _start_pool(self) -> bool:
        if self._pool is None:
            try:  # worker processes need the task: a task built from closures cannot travel, run here
                pickle.dumps(self.setup)
            except (pickle.PicklingError, AttributeError, TypeError):
                self.workers = 1
                return False
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init, initargs=(self.setup,))
        return True

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
