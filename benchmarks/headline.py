"""The headline result: meta-train L3RS on the default task, evaluate it against LR-tuned baselines on
held-out seeds, 1x/2x/5x horizons and an unseen shift; print JSON (the figures in README.md come from here).

    python benchmarks/headline.py [--budget-minutes 12] [--task mnistcnn-digits] [--out runs/headline]

It is `l3rs quickstart` plus machine information, so anyone can rerun it and compare. It also measures the
budget promise: `budget_error` = wall time / budget − 1 (the quickstart promises |error| <= 0.2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from l3rs.cli import UsageError
from l3rs.io import machine
from l3rs.quickstart import DEFAULT_BUDGET_MINUTES, DEFAULT_TASK, QUICK_HORIZON, quickstart


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=DEFAULT_TASK)
    parser.add_argument("--out", default="runs/headline")
    parser.add_argument("--budget-minutes", type=float, default=DEFAULT_BUDGET_MINUTES)
    parser.add_argument("--horizon", type=int, default=QUICK_HORIZON)
    parser.add_argument("--estimator", default=None)
    parser.add_argument("--seeds", type=int, default=None, help="default: as many as the budget affords")
    args = parser.parse_args()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
            head = quickstart(args.task, args.out, args.budget_minutes, args.estimator, args.seeds,
                              progress=False, horizon=args.horizon)
    except UsageError as e:  # e.g. a budget below the smallest quickstart: one line, exit 2
        sys.exit(f"headline: {e}")
    head["budget_error"] = head["wall_seconds"] / head["budget_seconds"] - 1
    head["within_20_percent"] = abs(head["budget_error"]) <= 0.2
    head["machine"] = machine()
    head["settings"] = vars(args)
    print(json.dumps(head, indent=1))


if __name__ == "__main__":
    main()
