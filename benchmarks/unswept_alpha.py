"""How each task's long runs depend on the horizon exponent α (until session 32 this chose the fixed α that shipped
when the budget had no room for the α sweep; the sweep now always runs): each task's untrained optimizer (its swept
λ0 and prior: `l3rs meta-train --iterations 0`) with α fixed at each of --exponents, evaluated on held-out seeds at
2x and 5x its horizon (α changes nothing up to 1x) against the tuned baselines; print JSON.

    python benchmarks/unswept_alpha.py [--tasks mnistcnn-digits,...] [--exponents 0,0.5] [--seeds 10]
                                       [--out runs/unswept-alpha] [--baselines-from docs/generalization]

Per task, α and scenario: L3RS's final validation loss over the best tuned baseline's with its 95% interval
(as `l3rs evaluate` judges it), and the paired ratio of each α's final loss to the first α's (ratio of the mean
final losses over the same seeds, 95% paired-bootstrap interval, on how many seeds it is lower). An α whose
OUT/TASK/alpha-A/ already holds an optimizer and its evaluation on as many seeds is not run again, so more α can be
added later.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generalization import DEFAULT_BASELINES, finish, previous_evaluation, rows_of  # noqa: E402

from l3rs.evaluate import evaluate  # noqa: E402
from l3rs.evaluate.stats import interval, resample  # noqa: E402
from l3rs.io import machine, save_json  # noqa: E402

DEFAULT_TASKS = ("mnistcnn-digits", "cnn04-mnist59", "minilm-chatterbot", "mlp-mnist1d-shift")


def untrained(task: str, out: Path, flags: list[str]) -> Path:
    """`l3rs meta-train --iterations 0` (the sweeps only, the untrained optimizer ships) plus `flags`."""
    if not (out / "best" / "optimizer.json").exists():
        subprocess.run([sys.executable, "-m", "l3rs", "meta-train", "--task", task, "--out", str(out),
                        "--iterations", "0", "--no-progress", *flags], check=True, stdout=sys.stderr)
    return out / "best"


def earlier_evaluation(eval_dir: Path, seeds: int) -> dict[str, Any] | None:
    """The evaluation an earlier run (an interrupted one, or one with fewer α) left in `eval_dir`, if it ran on
    `seeds` seeds; None otherwise (it is then run again)."""
    path = eval_dir / "evaluation.json"
    if not path.exists():
        return None
    evaluation = json.loads(path.read_text())
    return evaluation if evaluation["settings"]["seeds"] == seeds else None


def finals(evaluation: dict[str, Any]) -> dict[str, np.ndarray]:
    """L3RS's final validation loss per scenario, ordered by evaluation seed."""
    return {s["label"]: np.array([r["val_loss"][-1] for r in sorted(s["methods"]["l3rs"]["runs"],
                                                                     key=lambda r: r["seed"])])
            for s in evaluation["scenarios"]}


def paired(values: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Ratio of the mean final losses over the same seeds, its 95% paired-bootstrap interval, seeds lower."""
    draw = resample(len(values))
    return {"ratio": float(values.mean() / reference.mean()),
            "ratio_ci95": interval(values[draw].mean(axis=1) / reference[draw].mean(axis=1)),
            "lower_on": int((values < reference).sum()), "seeds": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--exponents", default="0,0.5", help="α values, the first the reference of the ratios")
    parser.add_argument("--seeds", type=int, default=10, help="held-out evaluation seeds (default 10)")
    parser.add_argument("--out", default="runs/unswept-alpha")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--baselines-from", default=None, metavar="DIR",
                        help="reuse the tuned baselines of DIR/TASK/[eval/]evaluation.json where they match")
    args = parser.parse_args()
    start, out = time.perf_counter(), Path(args.out)
    exponents = [float(a) for a in args.exponents.split(",")]
    report: dict[str, Any] = {"settings": vars(args), "machine": machine(), "tasks": {}}
    for task in args.tasks.split(","):
        first = untrained(task, out / task / f"alpha-{exponents[0]:g}" / "meta",
                          ["--horizon-exponent", repr(exponents[0])])
        info = json.loads((first / "optimizer.json").read_text())
        same = ["--lr0", repr(info["lr"]), "--priors", info["prior"]]  # the first run's sweep, not run again
        rows, losses = {}, {}
        for alpha in exponents:
            tag = f"alpha-{alpha:g}"
            best = untrained(task, out / task / tag / "meta", [*same, "--horizon-exponent", repr(alpha)])
            eval_dir = out / task / tag / "eval"
            evaluation = earlier_evaluation(eval_dir, args.seeds)
            if evaluation is None:
                with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
                    evaluate(best, task, eval_dir, horizons=[2.0, 5.0], seeds=args.seeds,
                             baselines=list(DEFAULT_BASELINES), shifts=[], progress=False, workers=args.workers,
                             baselines_from=previous_evaluation(args.baselines_from, task))
                evaluation = json.loads((eval_dir / "evaluation.json").read_text())
            rows[tag], losses[alpha] = rows_of(evaluation), finals(evaluation)
        reference = losses[exponents[0]]
        report["tasks"][task] = {
            "lr0": info["lr"], "prior": info["prior"], "rows": rows,
            "vs_first": {f"alpha-{a:g}": {label: paired(v, reference[label]) for label, v in losses[a].items()}
                         for a in exponents[1:]}}
        save_json(report, out / "unswept-alpha.json")  # partial results survive a later failure
    finish(report, out / "unswept-alpha.json", start)


if __name__ == "__main__":
    main()
