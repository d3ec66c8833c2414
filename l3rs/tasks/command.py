"""`l3rs tasks` (list the built-in tasks) and `l3rs pretrain` (show the shipped backbones, or build cached
ones with other settings ahead of time).

The default settings' backbones ship with l3rs. Pretraining other settings (`--steps`) ahead of time matters
before starting parallel workers: otherwise each worker would pretrain the same backbone on first use (safe,
the writes are atomic, but wasted work).
"""

from __future__ import annotations

import argparse

from .core import TaskError
from .pretraining import SPECS, pretrain, pretrain_info
from .registry import describe, names


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of `l3rs tasks` / `l3rs pretrain`."""
    if command == "pretrain":
        parser.add_argument(
            "name", nargs="?", default=None, help=f"backbone ({', '.join(sorted(SPECS))}); default: all"
        )
        parser.add_argument(
            "--seeds", default="0,1,2,3", help="comma-separated pretraining seeds (default 0,1,2,3)"
        )
        parser.add_argument(
            "--force", action="store_true", help="pretrain again even if cached (shipped backbones are never replaced)"
        )
        parser.add_argument(
            "--steps", type=int, default=None, help="override the number of pretraining steps"
        )


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise TaskError(f"--seeds must be comma-separated integers, got {text!r}") from err


def run(args: argparse.Namespace) -> int:
    """List tasks (one per line: name, description) or pretrain backbones (one line per checkpoint)."""
    if args.command == "tasks":
        width = max(len(n) for n in names())
        for name in names():
            print(f"{name:<{width}}  {describe(name)}")
        return 0
    backbones = [args.name] if args.name else sorted(SPECS)
    for name in backbones:
        for seed in _seeds(args.seeds):
            path = pretrain(name, seed, force=args.force, steps=args.steps)
            info = pretrain_info(name, seed, steps=args.steps)
            acc = f"held-out accuracy {info['val_accuracy']:.3f}" if info else ""
            print(f"{name} seed {seed}: {path} {acc}".rstrip())
    return 0
