"""`l3rs inspect`: plot what a saved optimizer learned (λ and μ per tensor over one run)."""

from __future__ import annotations

import argparse
from pathlib import Path

from l3rs import tasks
from l3rs.errors import UsageError
from l3rs.optim import load_meta
from l3rs.report.plots import plot_trace
from l3rs.report.trace import trace
from l3rs.results import base_horizon, save


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("optimizer", help="directory of a saved L3RS optimizer")
    parser.add_argument("--task", default=None, help="task to run it on (default: its meta-training task)")
    parser.add_argument("--out", default=None, help="where to write the plots (default: OPTIMIZER/inspect)")
    parser.add_argument("--steps", type=int, default=None, help="run length (default: meta-training horizon)")
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")


def run(args: argparse.Namespace) -> int:
    info = load_meta(args.optimizer)["info"]
    spec = args.task or info.get("task")
    if not spec:
        raise UsageError(f"{args.optimizer} does not say which task it was meta-trained on: pass --task")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    task = tasks.get(spec)
    recorded = trace(args.optimizer, task, args.steps or base_horizon(info, task), device=args.device)
    out = Path(args.out) if args.out else Path(args.optimizer) / "inspect"
    out.mkdir(parents=True, exist_ok=True)
    paths = [*plot_trace(recorded, out).values(), save(recorded, out / "trace.json")]
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
