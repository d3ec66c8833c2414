"""GPU readiness of L3RS: CPU/CUDA parity, state transfer between devices, bf16, step overhead vs AdamW and
differentiable meta-unrolls; prints ONE JSON document (and writes --out), exits 1 if a check failed. Without
CUDA every check compares CPU with CPU (a quick self-test). Usage, from the repository root:
    PYTHONPATH=. python3 benchmarks/cuda_check.py --out cuda_check.json [--only parity,meta_unroll]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import l3rs
from l3rs import L3RS, mixer
from l3rs.bases import Workspace
from l3rs.functional import Config

CPU = torch.device("cpu")
CUDA = torch.cuda.is_available()
DEV = torch.device("cuda") if CUDA else CPU
TOL = 1e-4  # relative, float32 (meta-gradients: 1e-3)
STEPS = 20
Result = dict[str, Any]
sync: Callable[[], None] = torch.cuda.synchronize if CUDA else lambda: None

def attempt(fn: Callable[[], Result]) -> Result:
    """Run one (sub-)check: an exception becomes a failed result with its text, and the others go on."""
    start = time.perf_counter()
    try:
        out = fn()
    except Exception as e:
        out = {"passed": False, "error": f"{type(e).__name__}: {e}", "where": traceback.format_exc(limit=-3)}
    return {**out, "seconds": round(time.perf_counter() - start, 3)}

def all_passed(results: Result) -> bool:
    return all(r["passed"] for r in results.values() if isinstance(r, dict))

# ------------------------------------------------------------------------------------- optimizer steps
def parity_model() -> nn.Module:
    """Many tensor shapes: linear, 4-D conv, norm vectors, attention projections, a 0-dim scalar."""
    torch.manual_seed(0)
    return nn.ModuleDict({"mlp": nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)),
                          "conv": nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)),
                          "block": nn.TransformerEncoderLayer(32, 4, 64, batch_first=True),
                          "scalars": nn.ParameterDict({"temperature": nn.Parameter(torch.ones(()))})})

def feed(opt: L3RS, model: nn.Module, steps: range) -> list[Tensor]:
    """Step on fixed gradients (drawn on CPU from the step's index) and a falling loss; returns the params."""
    for i in steps:
        gen = torch.Generator().manual_seed(i)
        for p in model.parameters():
            p.grad = (0.1 * torch.randn(p.shape, generator=gen)).to(p.device)
        opt.step(loss=torch.tensor(2.0 / (1 + 0.1 * i), device=next(model.parameters()).device))
    return [p.detach().double().cpu() for p in model.parameters()]

def rel_diff(a: list[Tensor], b: list[Tensor], ref: list[Tensor] | None = None) -> float:
    """max over tensors of max|a-b| / max|a| (or / max|a-ref|: relative to what the steps changed)."""
    scale = a if ref is None else [x - r for x, r in zip(a, ref, strict=True)]
    return max(float((x - y).abs().max() / s.abs().max().clamp_min(1e-30)) for x, y, s in zip(a, b, scale, strict=True))

def make(model: nn.Module, path: str | None = None, **kwargs: Any) -> L3RS:
    # L3RS has no foreach flag: on CPU it steps with a reused Workspace (per-tensor loops, Python-float
    # coefficients), on CUDA with foreach kernels. Setting the private attribute runs either path anywhere.
    opt = L3RS(model.named_parameters(), lr=1e-2, total_steps=STEPS, **kwargs)
    if path is not None:
        opt._workspace = Workspace() if path == "workspace" else None
    return opt

def check_parity() -> Result:
    base = parity_model()
    start = [p.detach().double() for p in base.parameters()]

    def pair(cpu_path: str, dev_path: str) -> Result:
        a = feed(make(cpu := copy.deepcopy(base), cpu_path), cpu, range(STEPS))
        b = feed(make(dev := copy.deepcopy(base).to(DEV), dev_path), dev, range(STEPS))
        diff = rel_diff(a, b)
        return {"max_rel_diff": diff, "max_rel_diff_of_update": rel_diff(a, b, start),
                "passed": diff < TOL and all(bool(torch.isfinite(t).all()) for t in b)}

    # each device's own path first (on CUDA: CPU workspace vs CUDA foreach), then the same path on both
    out = {name: attempt(lambda paths=paths: pair(*paths)) for name, paths in
           (("workspace_vs_foreach", ("workspace", "foreach")), ("foreach", ("foreach", "foreach")),
            ("workspace", ("workspace", "workspace")))}
    return {"compared": f"cpu vs {DEV.type}", "tolerance": TOL, "steps": STEPS, **out, "passed": all_passed(out)}

def transfer(src: torch.device, dst: torch.device) -> Result:
    """state_dict after 5 steps on `src` into a fresh optimizer (other mixer seed) on `dst`, then one step."""
    opt_s = make(model_s := parity_model().to(src))
    before = feed(opt_s, model_s, range(5))
    opt_d = make(model_d := copy.deepcopy(model_s).to(dst), seed=1)
    opt_d.load_state_dict(opt_s.state_dict())
    a, b = feed(opt_s, model_s, range(5, 6)), feed(opt_d, model_d, range(5, 6))
    tensors = [v for s in opt_d.state.values() for v in s.values() if isinstance(v, Tensor)]
    tensors += [*opt_d.state["l3rs"]["features"].values(), *opt_d.meta.values()]
    on_device = all(t.device.type == dst.type for t in tensors)
    diff = rel_diff(a, b)
    return {"max_rel_diff": diff, "max_rel_diff_of_update": rel_diff(a, b, before), "state_on_target": on_device,
            "passed": diff < TOL and on_device and opt_d.step_count == opt_s.step_count == 6}

def pretrained() -> Result:
    """save_pretrained of an untrained optimizer on CPU, from_pretrained for the same model on the device."""
    opt_c = make(model_c := parity_model(), seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        opt_c.save_pretrained(tmp)
        opt_d = L3RS.from_pretrained(tmp, (model_d := parity_model().to(DEV)).named_parameters(), total_steps=STEPS)
    same = all(torch.equal(opt_c.meta[k], v.cpu()) and v.device.type == DEV.type for k, v in opt_d.meta.items())
    diff = rel_diff(feed(opt_c, model_c, range(3)), feed(opt_d, model_d, range(3)))
    return {"meta_equal_and_on_device": same, "max_rel_diff": diff, "passed": same and diff < TOL}

def check_state_dict() -> Result:
    out = {"dev_to_cpu": attempt(lambda: transfer(DEV, CPU)), "cpu_to_dev": attempt(lambda: transfer(CPU, DEV)),
           "save_cpu_load_dev": attempt(pretrained)}
    return {"device": DEV.type, "tolerance": TOL, **out, "passed": all_passed(out)}

# --------------------------------------------------------------------------------------- bf16 training
def train_mlp(dtype: torch.dtype, autocast: bool, state_dtype: torch.dtype | None, steps: int = 50) -> Result:
    x = torch.randn(4096, 64, generator=torch.manual_seed(0))  # seeds the model's init below too
    x, y = x.to(DEV, dtype), (x @ torch.randn(64, 10)).argmax(1).to(DEV)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))
    model = model.to(DEV, dtype)
    opt = L3RS(model.named_parameters(), lr=3e-3, total_steps=steps, state_dtype=state_dtype)
    losses = []
    for i in range(steps):
        rows = slice(i * 256 % 4096, i * 256 % 4096 + 256)  # minibatches of 256
        with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x[rows]), y[rows]).float()
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
        losses.append(loss.detach())
    curve = torch.stack(losses).cpu()  # one host sync, after the loop
    ok = bool(torch.isfinite(curve).all()) and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    first, last = float(curve[:5].mean()), float(curve[-5:].mean())
    return {"first_loss": first, "last_loss": last, "finite": ok, "skipped_steps": opt.skipped_steps,
            "moment_dtype": str(opt.state[next(model.parameters())]["m"].dtype), "passed": ok and last < 0.9 * first}

def bf16_params(state_dtype: torch.dtype | None) -> Result:
    """bf16 weights: a clear error counts as 'unsupported' (passed); a silent NaN fails."""
    try:
        return {"supported": True, **train_mlp(torch.bfloat16, False, state_dtype)}
    except Exception as e:
        return {"supported": False, "error": f"{type(e).__name__}: {e}", "passed": True}

def check_mixed_precision() -> Result:
    out = {"autocast_bf16_fp32_master": attempt(lambda: train_mlp(torch.float32, True, None)),
           "bf16_params": attempt(lambda: bf16_params(None)),
           "bf16_params_fp32_state": attempt(lambda: bf16_params(torch.float32))}
    return {"device": DEV.type, **out, "passed": all_passed(out)}

# --------------------------------------------------------------------------------------- step overhead
def time_optimizer(make_opt: Callable[[], torch.optim.Optimizer], numel: int, steps: int, warmup: int) -> Result:
    if CUDA:  # the previous optimizer is gone (refcounting): measure from a clean allocator
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if CUDA else 0
    opt, loss = make_opt(), torch.tensor(1.0, device=DEV)
    step = (lambda: opt.step(loss=loss)) if isinstance(opt, L3RS) else opt.step
    step()  # AdamW creates its state lazily
    sync()
    state = sum(v.nbytes for s in opt.state.values() for v in s.values() if isinstance(v, Tensor))
    out: Result = {"state_bytes_per_param": state / numel}  # per-parameter buffers (not L3RS's per-tensor ones)
    if CUDA:
        out["allocated_extra_bytes_per_param"] = (torch.cuda.memory_allocated() - base) / numel
        out["peak_extra_bytes_per_param"] = (torch.cuda.max_memory_allocated() - base) / numel
        torch.cuda.set_sync_debug_mode("warn")  # warns at each op of one step that waits for the GPU
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
        torch.cuda.set_sync_debug_mode(0)
        out["host_syncs_in_one_step"] = [f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught
                                         if "synchroniz" in str(w.message)]
    times = []
    for _ in range(warmup + steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    ms = 1e3 * sorted(times[warmup:])[steps // 2]  # median
    return {**out, "ms_per_step": ms, "passed": ms > 0}

def check_step_overhead() -> Result:
    # ~100M parameters on CUDA (6 x 4096^2 plus 38 small tensors), ~1M on CPU so the self-test stays quick
    width, layers, steps, warmup = (4096, 6, 30, 5) if CUDA else (512, 4, 10, 2)
    with torch.device(DEV):
        model = nn.ModuleList([nn.Linear(width, width) for _ in range(layers)])
        model.extend(nn.LayerNorm(width) for _ in range(16))
    numel = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.grad = 1e-3 * torch.randn_like(p)
    makers = {"adamw_foreach": lambda: torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True),
              "adamw_fused": lambda: torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True),
              "l3rs": lambda: L3RS(model.named_parameters(), lr=1e-4, total_steps=1000)}
    out = {name: attempt(lambda m=m: time_optimizer(m, numel, steps, warmup)) for name, m in makers.items()}
    l3, ms = out["l3rs"], {k: r.get("ms_per_step", float("nan")) for k, r in out.items()}
    ratios = {f"ratio_l3rs_vs_{k}": ms["l3rs"] / ms[k] for k in ("adamw_foreach", "adamw_fused")}
    # README: L3RS keeps AdamW's two buffers per parameter (plus a few numbers per tensor)
    same_state = l3.get("state_bytes_per_param", 1e9) <= out["adamw_foreach"].get("state_bytes_per_param", 0) + 0.5
    ok = l3["passed"] and out["adamw_foreach"]["passed"] and same_state
    return {"device": DEV.type, "params": numel, "tensors": len(list(model.parameters())), "steps": steps, **out,
            **ratios, "l3rs_state_as_small_as_adamw": same_state, "passed": ok}

# ----------------------------------------------------------------------------------------- meta-training
def synthetic_model(seed: int) -> nn.Module:
    """A fixed 'pretrained' MLP with a head drawn from `seed` (own generators: device-independent)."""
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    return l3rs.tasks.init_head(l3rs.tasks.init_head(model, ("0.weight", "0.bias"), 1000), ("2.weight", "2.bias"), seed)

def synthetic_task() -> Any:
    """A user-built Task (no dataset packages): 4-class classification of Gaussian inputs."""
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    y = x[:, :4].argmax(1)
    return l3rs.Task("synthetic", model_fn=synthetic_model, train=(x[:384], y[:384]), val=(x[384:], y[384:]),
                     batch_size=32, horizon=6, head=("2.weight", "2.bias"))

def meta_start() -> mixer.Meta:
    meta = Config().init_meta(4, seed=0)  # a random last layer (untrained: zero) gives every entry a gradient
    meta["layers.2.weight"] = 0.1 * torch.randn(meta["layers.2.weight"].shape, generator=torch.manual_seed(2))
    return meta

def unroll_grad(device: torch.device) -> tuple[float, Tensor]:
    """d val_loss / d meta through 6 exact (second-order) steps, meta-parameters on `device`."""
    from l3rs.meta import unroll

    meta = {k: v.to(device).requires_grad_(True) for k, v in meta_start().items()}
    value, _ = unroll(synthetic_task(), meta, 1e-2, 6, 0, config=Config(), graph="second", val_subset=None,
                      device=device)
    grads = torch.autograd.grad(value, list(meta.values()), allow_unused=True)
    flat = [(torch.zeros_like(m) if g is None else g).reshape(-1) for m, g in zip(meta.values(), grads, strict=True)]
    return float(value.detach()), torch.cat(flat).double().cpu()

def worker_grad(device: torch.device, linearized: bool) -> tuple[float, Tensor]:
    """What `l3rs meta-train --device` runs: a Worker gets a flat CPU meta vector and the device for the model."""
    from l3rs.meta.unroll import Job, Worker

    worker = Worker(l3rs.TaskFamily.of(synthetic_task()), Config(), False, None, str(device))
    result = worker(Job(None, 0, mixer.flatten(meta_start()), 1e-2, 6, 6, "val_loss", grad=not linearized,
                        linearized=linearized))
    return result.objective, result.grad.double().cpu()

def compare(grad: Callable[[torch.device], tuple[float, Tensor]]) -> Result:
    """Meta-gradient on the device vs on CPU: finite, nonzero, within 1e-3 relative (norm)."""
    (value_c, g_c), (value_d, g_d) = grad(CPU), grad(DEV)
    rel = float((g_d - g_c).norm() / g_c.norm().clamp_min(1e-30))
    ok = bool(torch.isfinite(g_d).all()) and float(g_d.norm()) > 0
    return {"objective_cpu": value_c, "objective_dev": value_d, "grad_norm": float(g_d.norm()),
            "rel_diff_vs_cpu": rel, "finite_nonzero": ok, "passed": ok and rel < 1e-3}

def check_meta_unroll() -> Result:
    """`l3rs.meta.unroll` with meta-parameters on the device, then the Worker path meta-training runs."""
    out = {"unroll": attempt(lambda: compare(unroll_grad)),
           "worker_bptt": attempt(lambda: compare(lambda d: worker_grad(d, False))),
           "worker_linearized": attempt(lambda: compare(lambda d: worker_grad(d, True)))}
    return {"device": DEV.type, **out, "passed": all_passed(out)}

CHECKS = {"parity": check_parity, "state_dict_roundtrip": check_state_dict, "mixed_precision": check_mixed_precision,
          "step_overhead": check_step_overhead, "meta_unroll": check_meta_unroll}

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the JSON document here")
    parser.add_argument("--only", help="comma-separated subset of " + ",".join(CHECKS))
    args = parser.parse_args()
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # nothing downloads (l3rs imports HF lazily)
        os.environ.setdefault(flag, "1")
    # fp32 parity means fp32: cuDNN would run convolutions in TF32 by default (matmuls already are fp32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if not CUDA:  # the self-test's tensors are small: one thread avoids oversubscribing a shared machine
        torch.set_num_threads(1)
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "l3rs": l3rs.__version__, "cuda_available": CUDA, "cpu_threads": torch.get_num_threads(),
           "device_name": torch.cuda.get_device_name(0) if CUDA else None}
    start, report = time.perf_counter(), {"environment": env, "checks": {}}
    for name in args.only.split(",") if args.only else CHECKS:
        report["checks"][name] = result = attempt(CHECKS[name])
        print(f"{name}: {'ok' if result['passed'] else 'FAILED'} ({result['seconds']} s)", file=sys.stderr, flush=True)
    report |= {"passed": all_passed(report["checks"]), "seconds": round(time.perf_counter() - start, 2)}
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if report["passed"] else 1

if __name__ == "__main__":
    sys.exit(main())
