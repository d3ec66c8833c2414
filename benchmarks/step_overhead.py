"""Step overhead of L3RS vs torch.optim.AdamW(foreach=True) on CPU; prints JSON.

Measures, for a ~0.4M-parameter CNN and a ~5M-parameter MLP: the whole training step (forward, backward,
optimizer) and the optimizer step alone (medians of repeated runs), and optimizer-state bytes per parameter.

    python benchmarks/step_overhead.py [--repeats 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
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


def state_bytes(opt: torch.optim.Optimizer) -> int:
    def size(v: object) -> int:
        if isinstance(v, torch.Tensor):
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(size(x) for x in v.values())
        return 0

    total = sum(size(v) for v in opt.state.values())
    meta = getattr(opt, "meta", {})
    return total + sum(size(v) for v in meta.values())


def time_steps(name: str, which: str, repeats: int) -> dict[str, float]:
    model, opt = make(name, which)
    x = torch.randn(*MODELS[name][1])
    y = torch.randint(0, 10, (x.shape[0],))
    whole, opt_only = [], []
    for i in range(repeats + 5):
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
        if i >= 5:  # warm-up
            whole.append(t2 - t0)
            opt_only.append(t2 - t1)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "whole_step_ms": 1e3 * statistics.median(whole),
        "optimizer_step_ms": 1e3 * statistics.median(opt_only),
        "state_bytes_per_param": state_bytes(opt) / n_params,
        "state_bytes": state_bytes(opt),
        "params": n_params,
        "tensors": len(list(model.parameters())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = {"machine": {"platform": platform.platform(), "processor": platform.machine(),
                       "torch": torch.__version__, "threads": args.threads}, "results": {}}
    for name in MODELS:
        # interleave and repeat to dampen drift from other load on the machine
        runs = {w: [time_steps(name, w, args.repeats) for _ in range(3)] for w in ("adamw", "l3rs")}
        res = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for w, rs in runs.items()}
        res["whole_step_ratio"] = res["l3rs"]["whole_step_ms"] / res["adamw"]["whole_step_ms"]
        res["optimizer_step_ratio"] = res["l3rs"]["optimizer_step_ms"] / res["adamw"]["optimizer_step_ms"]
        res["extra_state_bytes"] = res["l3rs"]["state_bytes"] - res["adamw"]["state_bytes"]
        out["results"][name] = res
    out["targets"] = {"whole_step_ratio": 1.3, "optimizer_step_ratio": 2.0}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
