"""Step overhead of L3RS vs torch.optim.AdamW(foreach=True) on CPU; prints JSON.

Measures, for a ~0.4M-parameter CNN and a ~5M-parameter MLP: the whole training step (zero_grad, forward,
backward, optimizer) and the optimizer step alone, and optimizer-state bytes per parameter.

Method: each optimizer trains its own copy of the model (same init, same batch) in a fresh worker process, so
neither inherits the other's allocator state (that alone moves AdamW's step by ~1.7x on CPU); workers for
AdamW and L3RS alternate (A B B A ...) over several rounds so that drift from other load on the machine hits
both alike. Figures are medians over all measured steps; the ratios compare those medians. One intra-op
thread by default: with two threads on a shared 2-core machine timings swing by several times.

    python benchmarks/step_overhead.py [--repeats 40] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from l3rs import L3RS


def cnn() -> torch.nn.Module:  # ~0.4M parameters, MNIST-sized
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 7 * 7, 112), torch.nn.ReLU(), torch.nn.Linear(112, 10),
    )


def mlp() -> torch.nn.Module:  # ~5M parameters
    return torch.nn.Sequential(
        torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1536), torch.nn.ReLU(),
        torch.nn.Linear(1536, 10),
    )


MODELS = {"cnn_0.4M": (cnn, (64, 1, 28, 28)), "mlp_5M": (mlp, (64, 1024))}


def make(name: str, which: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MODELS[name][0]()
    if which == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    return model, L3RS(model.named_parameters(), lr=1e-3, total_steps=1000)


def nbytes(v: object) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, dict):
        return sum(nbytes(x) for x in v.values())
    return 0


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
               ) -> tuple[float, float]:
    """(whole step, optimizer step) in seconds."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    t1 = time.perf_counter()
    if isinstance(opt, L3RS):
        opt.step(loss=loss.detach())
    else:
        opt.step()
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def worker(name: str, which: str, repeats: int, warmup: int = 5) -> dict:
    """Time `repeats` training steps of one optimizer (run in its own process by `compare`)."""
    model, opt = make(name, which)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*MODELS[name][1], generator=gen)
    y = torch.randint(0, 10, (x.shape[0],), generator=gen)
    times = [train_step(model, opt, x, y) for _ in range(warmup + repeats)][warmup:]
    n_params = sum(p.numel() for p in model.parameters())
    workspace = getattr(opt, "_workspace", None)
    return {
        "times": times,
        "state_bytes": sum(nbytes(v) for v in opt.state.values()),  # per-parameter and global state
        "meta_bytes": nbytes(getattr(opt, "meta", {})),
        "scratch_bytes": workspace.nbytes if workspace is not None else 0,
        "params": n_params,
        "tensors": len(list(model.parameters())),
    }


def run_worker(name: str, which: str, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, which, "--repeats", str(repeats), "--threads", str(threads)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def compare(name: str, repeats: int, rounds: int, threads: int) -> dict:
    runs: dict[str, list[dict]] = {"adamw": [], "l3rs": []}
    for r in range(rounds):
        for w in list(runs) if r % 2 == 0 else list(reversed(runs)):  # A B, B A, ...
            runs[w].append(run_worker(name, w, repeats, threads))
    res: dict = {}
    for w, outs in runs.items():
        whole = [t[0] for o in outs for t in o["times"]]
        opt = [t[1] for o in outs for t in o["times"]]
        last, n = outs[-1], outs[-1]["params"]
        res[w] = {
            "whole_step_ms": 1e3 * statistics.median(whole),
            "optimizer_step_ms": 1e3 * statistics.median(opt),
            "optimizer_step_ms_quartiles": [1e3 * q for q in statistics.quantiles(opt, n=4)[::2]],
            "optimizer_step_ms_per_round": [1e3 * statistics.median(t[1] for t in o["times"]) for o in outs],
            "state_bytes": last["state_bytes"],
            "state_bytes_per_param": last["state_bytes"] / n,
            "meta_bytes": last["meta_bytes"],
            "scratch_bytes_per_param": last["scratch_bytes"] / n,
            "params": n,
            "tensors": last["tensors"],
        }
    res["whole_step_ratio"] = res["l3rs"]["whole_step_ms"] / res["adamw"]["whole_step_ms"]
    res["optimizer_step_ratio"] = res["l3rs"]["optimizer_step_ms"] / res["adamw"]["optimizer_step_ms"]
    res["extra_state_bytes_per_param"] = res["l3rs"]["state_bytes_per_param"] - res["adamw"]["state_bytes_per_param"]
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40, help="measured steps per worker")
    parser.add_argument("--rounds", type=int, default=3, help="workers per optimizer and model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.repeats)))
        return
    out = {"machine": {"platform": platform.platform(), "processor": platform.machine(), "torch": torch.__version__,
                       "threads": args.threads, "repeats": args.repeats, "rounds": args.rounds},
           "results": {name: compare(name, args.repeats, args.rounds, args.threads) for name in MODELS}}
    out["targets"] = {"whole_step_ratio": 1.3, "optimizer_step_ratio": 2.0}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
