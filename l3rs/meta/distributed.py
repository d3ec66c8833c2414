"""Spreading meta-training unrolls over local processes and over machines.

One machine: ``l3rs meta-train ... --workers W`` runs the population's unrolls in W single-threaded
processes (W = number of physical cores is a good choice).

Several machines (or several processes per machine) with ``torchrun``; every process runs the same
command, rank 0 writes the output directory, and the result equals a single-process run of the same seed::

    # on each of N machines (node_rank 0..N-1), with MASTER the address of machine 0:
    torchrun --nnodes N --node-rank $NODE_RANK --nproc-per-node 1 \\
             --master-addr $MASTER --master-port 29500 \\
             -m l3rs meta-train --task mnistcnn-digits --out runs/digits --workers 4

    # one machine, 2 processes (a quick check):
    torchrun --standalone --nproc-per-node 2 -m l3rs meta-train --task mnistcnn-digits --out runs/digits

The jobs of each iteration are dealt round-robin to the ranks (and, inside a rank, to its ``--workers``
processes); results are gathered in job order and every rank applies the same update, so the
meta-parameters stay identical everywhere. The backend is gloo on CPU and NCCL when CUDA is available
(each rank then uses GPU ``LOCAL_RANK``). ``--out`` only needs to exist on the machine of rank 0;
``--resume`` reads the checkpoint there and broadcasts it. Each machine needs l3rs and the task's data.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
import torch.distributed as dist

from l3rs.io import exit_with_parent
from l3rs.meta.unroll import Job, Result, Worker

_WORKER: Worker | None = None


def _init_worker(worker: Worker) -> None:
    global _WORKER
    torch.set_num_threads(1)
    exit_with_parent()
    _WORKER = worker


def _run_job(job: Job) -> Result:
    assert _WORKER is not None
    return _WORKER(job)


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def init_from_env() -> tuple[int, int]:
    """(rank, world size); joins the torchrun process group when WORLD_SIZE > 1.

    A group joined here is destroyed at exit, while the interpreter is still whole: left to interpreter
    finalization, gloo's worker threads free tensors that hold Python references after the GIL is gone, and
    the process aborts ("terminate called without an active exception", exit -6) after its work is done.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(_destroy_group)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def broadcast(fn: Callable[[], Any], rank: int, world: int) -> Any:
    """fn() evaluated on rank 0 and shared with every rank (an exception there is raised everywhere)."""
    if world == 1:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = (True, fn())
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


class Runner:
    """Runs a list of jobs and returns their results in job order, whatever the layout."""

    def __init__(self, worker: Worker, workers: int = 1) -> None:
        self.worker = worker
        self.rank, self.world = init_from_env()
        self.pool = None
        self.progress: Callable[[int], None] | None = None  # told each finished job's fine-tuning steps
        if workers > 1:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self.pool = ProcessPoolExecutor(workers, multiprocessing.get_context(method),
                                            initializer=_init_worker, initargs=(worker,))

    def __call__(self, jobs: list[Job]) -> list[Result]:
        mine = jobs[self.rank::self.world]
        results = []
        for result in self.pool.map(_run_job, mine) if self.pool else map(self.worker, mine):
            results.append(result)
            if self.progress:
                self.progress(result.steps)
        if self.world == 1:
            return results
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, results)
        if self.progress:  # the other ranks' steps, once they are in
            self.progress(sum(r.steps for rank, part in enumerate(gathered) if rank != self.rank for r in part))
        out: list[Any] = [None] * len(jobs)
        for rank, part in enumerate(gathered):
            out[rank::self.world] = part
        return out

    def agree(self, value: Any) -> Any:
        """Rank 0's value on every rank (wall-clock decisions such as the budget must not diverge)."""
        return broadcast(lambda: value, self.rank, self.world)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
