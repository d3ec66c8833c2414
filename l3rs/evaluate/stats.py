"""Statistics of an evaluation: summaries over seeds, speed-ups, and paired-bootstrap comparisons.

Every interval is a 95% percentile bootstrap over the evaluation seeds, drawn with numpy from a fixed seed,
so the same runs always give the same intervals. A comparison indexes the method and the best baseline with
the same draw of seeds: it keeps the pairing (same head initialization, same batch order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from l3rs.finetune import RunResult
from l3rs.results import Speedup, Stat, Summary, VsBest

RESAMPLES = 4000  # paired-bootstrap resamples (>= 2000 keeps the 2.5% tails stable)
BOOTSTRAP_SEED = 0


# ------------------------------------------------------------------------------------------ summaries
def _stat(values: list[float | None]) -> Stat:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return Stat(None, None)
    return Stat(float(np.mean(finite)), float(np.std(finite, ddof=1 if len(finite) > 1 else 0)))


def summarize(runs: list[RunResult]) -> Summary:
    """Mean and std over seeds of the final numbers (diverged runs are counted, not averaged); the final
    validation loss also gets the 95% bootstrap interval of its mean."""
    ok = [r for r in runs if not r.diverged]
    val_loss = [r.val_loss[-1] for r in ok]
    return Summary(val_loss=Stat(**{**vars(_stat(val_loss)), "ci95": mean_ci(val_loss)}),
                   val_metric=_stat([r.val_metric[-1] for r in ok]),
                   test_metric=_stat([r.test_metric for r in ok]),
                   seconds=_stat([r.seconds for r in runs]),
                   diverged=len(runs) - len(ok), seeds=len(runs))


def eval_grid(steps: int, eval_every: int) -> list[int]:
    """The steps at which a run's validation curve is sampled (as `finetune` does)."""
    return list(range(eval_every, steps, eval_every)) + [steps]


# ------------------------------------------------------------------------------------------- speed-up
def first_reach(curves: np.ndarray, targets: np.ndarray, steps: Sequence[int]) -> np.ndarray:
    """Per row of `curves` [R, G] (sampled at `steps`), the first step at or below that row's target; 0: never."""
    hit = curves <= targets[:, None]
    return np.where(hit.any(axis=1), np.asarray(steps)[hit.argmax(axis=1)], 0)


def speedup_ratios(baseline_curves: np.ndarray, candidate_curves: np.ndarray,
                   steps: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise (steps the baseline needs to reach its own final value, speed-up; 0 when never reached)."""
    targets = baseline_curves[:, -1]
    base = first_reach(baseline_curves, targets, steps)
    base = np.where(base > 0, base, steps[-1])  # a NaN final value: count the whole run
    reach = first_reach(candidate_curves, targets, steps)
    return base, np.divide(base, reach, out=np.zeros(len(reach)), where=reach > 0)


def speedup(baseline_curve: Sequence[float], candidate_curve: Sequence[float],
            steps: Sequence[int]) -> Speedup:
    """Speed-up of a candidate over a baseline; both validation-loss curves are sampled at `steps`."""
    candidate = np.asarray([candidate_curve], dtype=float)
    base_steps, _ = speedup_ratios(np.asarray([baseline_curve], dtype=float), candidate, steps)
    base = int(base_steps[0])
    reach = int(first_reach(candidate, np.asarray([baseline_curve[-1]], dtype=float), steps)[0])
    horizon = steps[-1]
    if not reach:  # it would need more than the horizon: the ratio is below baseline / horizon
        return Speedup(base, None, None, f"<{base / horizon:.2f}x", f">{horizon}")
    return Speedup(base, reach, base / reach, f"{base / reach:.2f}x", str(reach))


# ----------------------------------------------------------------------------------------- bootstrap
def resample(num_seeds: int) -> np.ndarray:
    """[RESAMPLES, num_seeds] seed indices drawn with replacement, from the fixed seed."""
    return np.random.default_rng(BOOTSTRAP_SEED).integers(0, num_seeds, size=(RESAMPLES, num_seeds))


def interval(samples: np.ndarray) -> list[float]:
    """The central 95% of bootstrap samples; observed values, not interpolated ones, so inf stays inf."""
    return [float(q) for q in np.quantile(samples, [0.025, 0.975], method="inverted_cdf")]


def mean_ci(values: Sequence[float]) -> list[float] | None:
    """95% bootstrap interval of the mean of the finite `values` (None when there are none)."""
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    return interval(finite[resample(len(finite))].mean(axis=1)) if len(finite) else None


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):  # a diverged mean is inf: the ratio says so
        return np.asarray(numerator / denominator, dtype=float)


def verdict(ratio_ci95: Sequence[float]) -> str:
    """better when the whole interval of the loss ratio lies below 1, worse when above, else tie."""
    lo, hi = ratio_ci95
    return "better" if hi < 1 else "worse" if lo > 1 else "tie"


def compare(curves: np.ndarray, best_curves: np.ndarray, steps: Sequence[int]) -> VsBest:
    """A method vs the best tuned baseline, paired by evaluation seed (row i of both = seed i).

    `curves` [seeds, points]: validation-loss curves sampled at `steps` (inf from where a run diverged).
    Ratio = mean final loss / the baseline's; speed-up as `speedup` on the mean curves (0: never reaches the
    baseline's final loss). Both get a 95% paired-bootstrap interval.
    """
    final, best_final = curves[:, -1], best_curves[:, -1]
    draw = resample(len(final))
    ratio_ci = interval(_ratio(final[draw].mean(axis=1), best_final[draw].mean(axis=1)))
    _, speed = speedup_ratios(best_curves.mean(axis=0, keepdims=True), curves.mean(axis=0, keepdims=True), steps)
    _, speeds = speedup_ratios(best_curves[draw].mean(axis=1), curves[draw].mean(axis=1), steps)
    return VsBest(float(_ratio(final.mean(), best_final.mean())), ratio_ci, float(speed[0]), interval(speeds),
                  verdict(ratio_ci))
