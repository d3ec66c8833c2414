"""`l3rs evaluate`: the command line of `l3rs.evaluate.evaluate`."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from l3rs.errors import UsageError
from l3rs.evaluate.methods import BASELINES
from l3rs.evaluate.protocol import SHIFT_SCENARIOS, evaluate
from l3rs.evaluate.reuse import PreviousEvaluationError


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{what} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise UsageError(f"--{what} must be positive numbers, got {text!r}")
    return values


def _names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    names = list(allowed) if text == "all" else [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise UsageError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)} (or 'all')")
    return names


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--optimizer", required=True, help="directory of a saved L3RS optimizer")
    parser.add_argument("--task", required=True, help="task name (see `l3rs tasks`) or pkg.module:function")
    parser.add_argument("--out", required=True, help="output dir (evaluation.json, report.md/html, plots/)")
    parser.add_argument("--horizons", default="1,2,5",
                        help="multiples of the meta-training horizon (default 1,2,5)")
    parser.add_argument("--seeds", type=int, default=5,
                        help="evaluation seeds per method, shared by all methods (default 5)")
    parser.add_argument("--baselines", default="all",
                        help=f"comma-separated subset of: {', '.join(BASELINES)} (default all)")
    parser.add_argument("--ablations", action="store_true",
                        help="also meta-train + evaluate ablations (global, adam-only, no-features): costly")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="meta-training budget of each ablation, > 0 (default: the main optimizer's); "
                             "the evaluation itself is sized by --horizons, --seeds and --baselines")
    parser.add_argument("--shifts", default="auto",
                        help="unseen-data variants evaluated at 1x: 'auto' (all the task offers), 'none', or "
                             f"comma-separated names ({', '.join(SHIFT_SCENARIOS)}) or task specs")
    parser.add_argument("--baselines-from", default=None, metavar="PATH",
                        help="a previous evaluation.json of the same task: reuse its tuned baselines where the "
                             "scenario (label, steps), tuning seeds, grids and device match (the others are run; "
                             "evaluation seeds it lacks run at the reused setting); valid only if the baseline "
                             "code and the task data did not change since")
    parser.add_argument("--device", default=None, help="torch device for the runs (default: cpu)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel single-threaded processes for the runs (default: up to 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_shifts(text: str) -> list[str] | None:
    """--shifts: 'auto' (None: every variant the task offers), 'none' ([]) or comma-separated names."""
    return {"auto": None, "none": []}.get(text.strip(), [s.strip() for s in text.split(",") if s.strip()])


def run(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    if args.budget_minutes is not None and not args.budget_minutes > 0:
        raise UsageError(f"--budget-minutes must be > 0, got {args.budget_minutes:g}")
    shifts = parse_shifts(args.shifts)
    try:
        result = evaluate(args.optimizer, args.task, args.out, horizons=_floats(args.horizons, "horizons"),
                          seeds=args.seeds, baselines=_names(args.baselines, list(BASELINES), "baseline(s)"),
                          ablations=args.ablations, shifts=shifts, progress=not args.no_progress,
                          budget_minutes=args.budget_minutes, device=args.device, workers=max(1, args.workers),
                          baselines_from=args.baselines_from)
    except PreviousEvaluationError as e:  # read before any run: a one-line error, nothing written
        raise UsageError(f"--baselines-from {e}") from None
    out = Path(args.out)
    reused = f", {len(result.settings.reused)} scenario baselines reused" if args.baselines_from else ""
    print(f"wrote {out / 'report.md'}, {out / 'report.html'} and {out / 'evaluation.json'} "
          f"({len(result.scenarios)} scenarios, {result.seconds:.0f} s{reused})", file=sys.stdout)
    return 0
