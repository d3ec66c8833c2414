"""What each generalization mechanism buys: meta-train one optimizer per variant (the CLI defaults with one
mechanism turned off, `docs/generalization.md`), evaluate each on held-out seeds at 1x and 5x its horizon and
on an unseen shift, against the same tuned baselines; print JSON.

    python benchmarks/ablations.py [--task cnn04-mnist59] [--iterations 20] [--out runs/ablations]
                                   [--baselines-from docs/generalization] [--variants default,rms,...]

Every variant gets the same meta-training work (`--iterations`, with the default validation checks) rather
than the same wall-clock budget, so the table does not depend on what else the machine was doing. The
"untrained" row is the default run's optimizer before meta-training (its swept λ0 and α, the initial mixer):
what meta-training itself bought. A variant whose optimizer is the same as an evaluated one's (the "untrained"
row whenever the default run shipped its untrained optimizer) reuses that evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generalization import finish, previous_evaluation, rows_of  # noqa: E402

from l3rs.evaluate import evaluate  # noqa: E402
from l3rs.evaluate.command import parse_shifts  # noqa: E402
from l3rs.io import machine, save_json  # noqa: E402

# variant -> (flags added to `l3rs meta-train`, the mechanism it turns off)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "default": ([], "nothing: the CLI defaults"),
    "untrained": ([], "meta-training (the default run's optimizer at iteration 0)"),
    "rms": (["--normalize", "rms"], "snr normalization (per-step RMS, the paper's)"),
    "constant-schedule": (["--schedule", "constant", "--max-log-scale", "8"],
                          "the base schedule and the bounded deviation"),
    "no-alpha": (["--horizon-exponent", "0"], "the horizon exponent α (λ0 at any length)"),
    "free-step": (["--step-budget", "free"], "the shared step budget"),
    "no-floor": (["--min-log-scale", "none"], "the floor under each tensor's step (none)"),
    "fixed-length": (["--horizon-range", "1,1"], "sampled run lengths (every run at the horizon)"),
    "plain-objective": (["--no-log-objective", "--end-weight", "1"], "the end-weighted log objective"),
    "select-1x": (["--validation-horizons", "1"], "checkpoint selection at 1x and 4x (1x only)"),
    "adam-only": (["--bases", "adam"], "the blend of base directions (Adam's alone)"),
    "uniform-prior": (["--priors", "uniform"], "the prior chosen by the λ0 sweep (the uniform mix only)"),
    "no-long-mix": (["--long-priors", "none"], "the long runs' mix chosen at 4x (the prior's mix at every length)"),
    "no-long-fallback": (["--no-long-fallback"], "the long fallback (a checkpoint better below 2x only ships with long "
                         "runs falling back to the untrained optimizer)"),
    "no-decay": (["--weight-decay", "0"], "the decoupled weight decay (none)"),
}


def meta_train(task: str, out: Path, iterations: int, flags: list[str]) -> Path:
    """`l3rs meta-train` with the defaults plus `flags`, for a fixed number of iterations (resumable)."""
    if not (out / "best" / "optimizer.json").exists():
        subprocess.run([sys.executable, "-m", "l3rs", "meta-train", "--task", task, "--out", str(out),
                        "--iterations", str(iterations), "--no-progress", *flags], check=True, stdout=sys.stderr)
    return out / "best"


def untrained(task: str, best: Path, out: Path) -> Path:
    """The optimizer of `best`'s run before meta-training: `l3rs meta-train --iterations 0` with that run's
    swept λ0, α and prior given (so neither sweep runs again) exports the initial mixer with them; the long runs'
    mix it chose is offered alone, so its comparison runs again on the same seeds and keeps it again."""
    info = json.loads((best / "optimizer.json").read_text())
    mixes = info.get("long_prior_sweep")
    long = mixes["long_prior"] if mixes and mixes["long_prior"] != mixes["kept"] else "none"
    return meta_train(task, out, 0, ["--lr0", repr(info["lr"]), "--priors", info.get("prior", "uniform"),
                                     "--long-priors", long,
                                     "--horizon-exponent", repr(info["config"]["horizon_exponent"]),
                                     "--backbone-warmup", repr(info["config"].get("backbone_warmup", 0.0))])


def optimizer_key(best: Path) -> str:
    """What `l3rs evaluate` sees of an optimizer directory: its meta-parameters, λ0, Config and tensors."""
    info = json.loads((best / "optimizer.json").read_text())
    seen = {k: info[k] for k in ("config", "lr", "total_steps", "tensor_names", "tensor_shapes")}
    return hashlib.sha256((best / "optimizer.safetensors").read_bytes() + json.dumps(seen).encode()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="cnn04-mnist59")
    parser.add_argument("--out", default="runs/ablations")
    parser.add_argument("--iterations", type=int, default=20, help="meta-iterations of every variant")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--horizons", default="1,5")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--baselines", default="adamw,adamw-cosine,schedulefree-adamw,prodigy")
    parser.add_argument("--shifts", default="rotated", help="as `l3rs evaluate --shifts` (auto, none or names)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--baselines-from", default="docs/generalization", metavar="DIR",
                        help="reuse the tuned baselines of DIR/TASK/[eval/]evaluation.json where they match")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    start, out = time.perf_counter(), Path(args.out) / args.task
    report: dict[str, Any] = {"settings": vars(args), "machine": machine(), "variants": {}}
    evaluated: dict[str, Path] = {}  # optimizer_key -> its evaluation.json
    for name in names:
        flags, what = VARIANTS[name]
        if name == "untrained":
            default = meta_train(args.task, out / "default" / "meta", args.iterations, [])
            best = untrained(args.task, default, out / name / "meta")
        else:
            best = meta_train(args.task, out / name / "meta", args.iterations, flags)
        key = optimizer_key(best)
        done, same = out / name / "eval" / "evaluation.json", evaluated.get(key)
        if not done.exists() and same is not None:  # e.g. "untrained" when the default shipped untrained
            done.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(same, done)
        if not done.exists():  # a rerun after a kill reuses the variants already evaluated
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
                evaluate(best, args.task, out / name / "eval",
                         horizons=[float(h) for h in args.horizons.split(",")], seeds=args.seeds,
                         baselines=args.baselines.split(","), shifts=parse_shifts(args.shifts), progress=False,
                         workers=args.workers, baselines_from=previous_evaluation(args.baselines_from, args.task))
        evaluated.setdefault(key, done)
        info = json.loads((best / "optimizer.json").read_text())
        evaluation = json.loads(done.read_text())
        report["variants"][name] = {
            "turns_off": what, "flags": flags, "lr0": info["lr"],
            "horizon_exponent": info["config"]["horizon_exponent"], "best_iteration": info["best_iteration"],
            "falls_back": info.get("falls_back", False), "validation_score": info["validation_score"],
            "meta_train_seconds": info["meta_train_seconds"],
            "rows": rows_of(evaluation)}
        save_json(report, Path(args.out) / f"ablations-{args.task}.json")  # partial results survive a failure
    finish(report, Path(args.out) / f"ablations-{args.task}.json", start)


if __name__ == "__main__":
    main()
