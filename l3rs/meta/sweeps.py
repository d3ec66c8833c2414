"""The untrained optimizer's sweeps that set λ0, the size exponent β and the horizon exponent α before meta-training
(SPEC §5).

They run the untrained L3RS on the environment itself (the family's base task, training head seeds; β's on a fixed
half of its training set), not on perturbed samples: λ0, β and α must suit the runs the optimizer is for. Every λ
sees the same seeds (paired).
`run` maps a list of `Job`s to their `Result`s (a `Runner`, or any callable in tests).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from torch import Tensor

from l3rs.meta.config import MetaConfig, prior_mix
from l3rs.meta.unroll import Job, grouped_objectives, mean_objectives
from l3rs.schedules import LONG_MULTIPLE, SMALL_SET_FRACTION
from l3rs.seeds import seed_of

# Grid steps added past an edge the λ0 sweep picks (the grid is a prior, not a bound). 4 let cnn04's uniform mix
# walk from 0.27 to 0.81 (13% lower 1x loss on training seeds), which then tied at 1x, won at 2x/5x and lost the
# rotated shift (1.17 worse) on held-out seeds: `docs/RESULTS.md` session 25.
GRID_EXTENSIONS = 2
# The λ0 sweep starts at the grid's middle points (the upper middle for an even grid) and walks one point at a
# time toward the better edge until the best is bracketed: the full grid's choice whenever the loss is unimodal
# in λ (every sweep stored so far), without the runs far from the best (on digits 3 points of 6)
LR0_START_POINTS = 3
# The second sweep, which fits α, runs at LONG_SWEEP x the horizon (the longest validation horizon), its first points
# even past the budget: no fixed α suits every model (α = 1 left effnet-mnist 6.1x worse at 5x, α = 0 the MLP 1.77x;
# `docs/RESULTS.md` session 32). Sessions 29-33 ran it at 2x (half the cost) where the budget had no room for 4x; the
# 2x fit erred either way at 5x (text α 0.92 vs 1.01 at 4x, MLP 1.44 vs 1.26, minilm-top3-chatterbot 0.94 vs 1.06;
# cnn04's 2x optimum, λ0/3 on 5 of 6 seeds, does not hold at 4x): `docs/RESULTS.md` session 34.
LONG_SWEEP = 4.0
# The long sweep runs λ0 and the grid steps below it on LONG_SWEEP_SEEDS seeds: LONG_SWEEP_START points, then one
# more step down while the lowest is best, up to LONG_SWEEP_POINTS (~λ0/100: on cnn04 the best step at 5x was
# ~75x below the best at 1x).
LONG_SWEEP_START = 3
LONG_SWEEP_POINTS = 5
# The α sweep runs on LONG_SWEEP_SEEDS training seeds, and α > 0 only when its best point (lowest mean) is SWEEP_MARGIN
# below λ0 on each of them or SWEEP_MEAN_MARGIN below it in their mean: a real gain shows on every seed or is large,
# noise sits on one seed. On cnn04 and digits one seed's 4x loss differs by up to 30% from the next, and one seed alone
# fitted α up to 1.55 where the 6-seed mean is flat or best at λ0 (session 18, when the mean margin alone was the rule).
# minilm-top3-chatterbot gains 15-25% per seed at 4x, 15-18% in a pair's mean at the grid points: the mean margin alone
# fitted α = 0 on all 10 pairs of 5 training seeds, and α = 0 left it 1.26x worse than the best tuned baseline at 5x;
# the quickstart's digits (horizon 60) gain 64% in the mean where one seed reads 6% higher than λ0 (its α 1.13).
# Replayed on every pair of 4-6 training seeds (`benchmarks/alpha_sweep.py --stored`, `docs/RESULTS.md` session 34) the
# rule fits α = 0 on every cnn04 and digits pair at 4x and α > 0 on every text (23-29% per seed), MLP (~55%) and top3
# pair; at 2x (sessions 29-33) cnn04's λ0/3, lower on 5 of 6 seeds there but not at 4x, fits 9 pairs of 15.
LONG_SWEEP_SEEDS = 2
SWEEP_MARGIN = 0.05
SWEEP_MEAN_MARGIN = 0.2
# The prior choice compares each prior's best λ0 on PRIOR_SEEDS training seeds (the sweep's and more): a later
# prior replaces the first only if its mean is lower and it is lower on at least PRIOR_WIN_SHARE of the seeds.
# Untrained mixes' 1x losses spread by 15-40% of the mean from seed to seed on digits: there the lowest 2-seed
# mean (the rule before) picked a mix 20% worse on 8 seeds in 11 of 28 seed pairs. Replayed on 8 training seeds
# of each task (λ0 from 2 of them, `docs/RESULTS.md` session 25), 3 of 4 seeds cost 1% on digits and 2% on cnn04
# (where Adam-leaning is 7% better on 8 seeds, 12% seed noise) against the 8-seed choice; 4 of 4: 0% and 5.5%;
# the 2-seed mean: 8% and 1.5%. Every rule kept the text task's and the MLP's choice.
PRIOR_SEEDS = 4
PRIOR_WIN_SHARE = 0.75
# λ0 is placed between the grid's points (`placed_lr0`) only when both neighbours of the best read under PLACE_CLIFF x
# its loss: a parabola does not describe a cliff. effnet-mnist's 1e-2 reads 15x its best (28 vs 1.86 at 3e-3), and the
# vertex it set, 1.88e-3, read 2.5x 3e-3's loss at 4x on the same seeds (0.66 vs 0.26, `docs/RESULTS.md` session 36);
# the neighbours that placed it elsewhere read 1.05-1.5x the best.
PLACE_CLIFF = 2.0


def prior_wins_needed(seeds: int) -> int:
    """On how many of `seeds` seeds a later prior must be lower than the first to replace it."""
    return math.ceil(PRIOR_WIN_SHARE * seeds)


def sweep_seeds(cfg: MetaConfig, count: int) -> list[int]:
    """The head seeds of the sweeps' first `count` runs per λ (training seeds, never validation's)."""
    return [seed_of(cfg.seed, "sweep-run", k) for k in range(count)]


def grid_ratio(grid: tuple[float, ...]) -> float:
    """The mean step of a λ grid (√10 for a single point): the long sweep's steps down from λ0."""
    return (grid[-1] / grid[0]) ** (1 / (len(grid) - 1)) if len(grid) > 1 else math.sqrt(10.0)


def _jobs(vector: Tensor, lrs: list[float], seeds: list[int], steps: int, warmup: float,
          fraction: float = 1.0) -> list[Job]:
    return [Job(None, r, vector, lr, steps, steps, "val_loss", backbone_warmup=warmup, train_fraction=fraction)
            for lr in lrs for r in seeds]


def _sweep_losses(cfg: MetaConfig, steps: int, vector: Tensor, lrs: list[float], run: Any,
                  seeds: int | None = None, warmup: float = 0.0,
                  fraction: float = 1.0) -> tuple[list[float], list[list[float]], int]:
    """(mean validation loss per λ0, the same per seed, steps spent) of the untrained L3RS over `steps`-step
    runs on `seeds` (default cfg.lr0_seeds) training seeds, on `fraction` of the training set."""
    count = seeds or cfg.lr0_seeds
    results = run(_jobs(vector, lrs, sweep_seeds(cfg, count), steps, warmup, fraction))
    return mean_objectives(results, count), grouped_objectives(results, count), sum(r.steps for r in results)


def sweep_step(ratio: float, multiple: float) -> float:
    """The α sweep's step between points at `multiple` x the horizon: the grid's `ratio` at LONG_SWEEP, so that
    the k-th point down stands for α = k · log(ratio) / log(LONG_SWEEP) at every multiple (√ratio at 2x)."""
    return ratio ** (math.log(multiple) / math.log(LONG_SWEEP))


def _argmin(values: list[float]) -> int:
    return min(range(len(values)), key=lambda i: values[i])


def _candidates(grid: tuple[float, ...]) -> tuple[list[float], int]:
    """(the sorted grid with GRID_EXTENSIONS steps of its edge ratio past each end, index of its first point)."""
    points = sorted(grid)
    if len(points) < 2:
        return points, 0
    low, high = points[:2], points[-2:]
    for _ in range(GRID_EXTENSIONS):
        low = [low[0] ** 2 / low[1], *low]
        high = [*high, high[-1] ** 2 / high[-2]]
    return low[:GRID_EXTENSIONS] + points + high[2:], GRID_EXTENSIONS


def lr0_sweep(cfg: MetaConfig, horizon: int, vector: Tensor, run: Any, center: float | None = None,
              warmup: float = 0.0, fraction: float = 1.0) -> dict[str, Any]:
    """Validation loss of the untrained L3RS (backbone warm-up `warmup`, on `fraction` of the training set) on
    `cfg.lr0_seeds` training seeds over
    `cfg.lr0_grid`, from LR0_START_POINTS points (the grid's middle ones, or those around `center`) toward the
    better edge until the best is bracketed; past an edge of the grid by up to GRID_EXTENSIONS steps of its
    ratio. A sweep whose every run diverged walks down. "lr0" is placed between the grid's points (`placed_lr0`),
    "grid_lr0" is the grid's best."""
    start = time.perf_counter()
    candidates, offset = _candidates(cfg.lr0_grid)
    if center is None:  # within the grid itself
        low = offset + max(0, (len(cfg.lr0_grid) - LR0_START_POINTS + 1) // 2)
        high = min(offset + len(cfg.lr0_grid), low + LR0_START_POINTS)
    else:
        nearest = min(range(len(candidates)), key=lambda i: abs(math.log(candidates[i] / center)))
        low = min(max(0, nearest - LR0_START_POINTS // 2), max(0, len(candidates) - LR0_START_POINTS))
        high = min(len(candidates), low + LR0_START_POINTS)
    losses, by_seed, steps = _sweep_losses(cfg, horizon, vector, candidates[low:high], run, warmup=warmup,
                                           fraction=fraction)
    while len(candidates) > 1:
        best = _argmin(losses)
        down = best == 0 or not math.isfinite(losses[best])
        if not (down or best == len(losses) - 1):
            break  # bracketed
        if down and low > 0:
            low, index = low - 1, low - 1
        elif not down and high < len(candidates):
            high, index = high + 1, high
        else:
            break
        (loss,), (seeds,), more = _sweep_losses(cfg, horizon, vector, [candidates[index]], run, warmup=warmup,
                                                fraction=fraction)
        losses, by_seed = ([loss, *losses], [seeds, *by_seed]) if down else ([*losses, loss], [*by_seed, seeds])
        steps += more
    grid = candidates[low:high]
    return {"grid": grid, "val_loss": losses, "val_loss_by_seed": by_seed, "lr0": placed_lr0(grid, losses, by_seed),
            "grid_lr0": grid[_argmin(losses)], "seconds": time.perf_counter() - start, "steps": steps}


def placed_lr0(grid: list[float], losses: list[float], by_seed: list[list[float]]) -> float:
    """λ0 between the grid's points: the vertex (`_vertex`) over log(λ) of the mean `losses` at their lowest point
    and its neighbours, when both neighbours read under PLACE_CLIFF x the lowest and every seed's own vertex
    (`by_seed`: per point, the losses per seed) lies on the same side of that point; otherwise the lowest point."""
    # at the default budget most tasks ship the untrained optimizer, so the grid's half-decade resolution is its
    # λ0's: minilm-chatterbot's sweep (0.97 / 0.67 / 0.75 at 1e-4 / 3e-4 / 1e-3) left it 0.7% worse than the tuned
    # AdamW-cosine at 1x, where 4.1e-4 is 0.8% better. Half steps run on two seeds moved digits' λ0 by noise and cost
    # its 2x win (`docs/RESULTS.md` session 35); a side every seed agrees on costs no runs and no seed overrules.
    best = _argmin(losses)
    if not 0 < best < len(grid) - 1 or max(losses[best - 1], losses[best + 1]) >= PLACE_CLIFF * losses[best]:
        return grid[best]
    logs = [math.log(lr) for lr in grid]
    vertex = _vertex(logs, losses)
    side = vertex - logs[best]
    seeds = [list(seed) for seed in zip(*by_seed, strict=True)]
    agree = side != 0 and all((_vertex(logs, seed) - logs[best]) * side > 0 for seed in seeds)
    return math.exp(vertex) if agree else grid[best]


def size_exponent_fit(cfg: MetaConfig, horizon: int, vector: Tensor, lr0: float, run: Any,
                      warmup: float = 0.0) -> dict[str, Any]:
    """β from the untrained L3RS's λ sweep on SMALL_SET_FRACTION of the training set (a fixed subset): λ0's sweep
    (`lr0_sweep`, from the grid's middle, placed by the same rule) on that subset finds λ_small = λ0 ·
    SMALL_SET_FRACTION^β; β = 0 when λ_small is not below λ0 (a smaller set never steps larger). Training sets
    between the two sizes interpolate log-linearly, smaller ones step as the half does (`schedules.size_scale`)."""
    # from the grid's middle, as λ0's: walked down from around λ0 instead, cnn04-mnist59's sweep stopped at a bump of
    # its flat loss (0.1743 / 0.1741 / 0.1939 at 0.03 / 0.09 / 0.27) where 0.01 reads 0.1673 on the same seeds
    sweep = lr0_sweep(cfg, horizon, vector, run, warmup=warmup, fraction=SMALL_SET_FRACTION)
    exponent = max(0.0, math.log(sweep["lr0"] / lr0) / math.log(SMALL_SET_FRACTION))
    return {**sweep, "fraction": SMALL_SET_FRACTION, "size_exponent": exponent}


def _mean(losses: list[float]) -> float:
    return sum(losses) / len(losses)  # inf where a run diverged


def replacement(by_seed: dict[str, list[float]], first: str, others: list[str]) -> str:
    """Which of `others` replaces `first` (each one's losses on the same seeds as `first`'s): of those lower in the
    mean and on PRIOR_WIN_SHARE of the seeds, the lowest mean; `first` when none is."""
    def wins(name: str) -> int:
        return sum(b < a for a, b in zip(by_seed[first], by_seed[name], strict=True))

    needed = prior_wins_needed(len(by_seed[first]))
    lower = [name for name in others if _mean(by_seed[name]) < _mean(by_seed[first]) and wins(name) >= needed]
    return min(lower, key=lambda name: _mean(by_seed[name])) if lower else first


def prior_sweep(cfg: MetaConfig, horizon: int, vectors: dict[str, Tensor], run: Any) -> dict[str, Any]:
    """The λ0 sweep of each prior's untrained optimizer (`vectors`, in `cfg.priors` order; the later ones
    start around the first one's grid λ0) on the same seeds, then each one's grid λ0 on more training seeds (up to
    PRIOR_SEEDS). A later prior replaces the first only if its mean is lower and it is lower on
    PRIOR_WIN_SHARE of the seeds (the lowest mean of those that are). Returns the kept sweep (its "lr0" placed)
    with "prior", every prior's sweep under "priors" (with its per-seed losses at its grid λ0), and the seconds and
    steps."""
    start = time.perf_counter()
    first, *others = vectors
    sweeps = {first: lr0_sweep(cfg, horizon, vectors[first], run, warmup=cfg.warmup_of(first))}
    for name in others:
        sweeps[name] = lr0_sweep(cfg, horizon, vectors[name], run, center=sweeps[first]["grid_lr0"],
                                 warmup=cfg.warmup_of(name))
    by_seed = {name: list(s["val_loss_by_seed"][_argmin(s["val_loss"])]) for name, s in sweeps.items()}
    steps = sum(s["steps"] for s in sweeps.values())
    extra = sweep_seeds(cfg, PRIOR_SEEDS)[cfg.lr0_seeds:] if others else []
    if extra:
        results = run([job for name, s in sweeps.items()
                       for job in _jobs(vectors[name], [s["grid_lr0"]], extra, horizon, cfg.warmup_of(name))])
        for name, losses in zip(sweeps, grouped_objectives(results, len(extra)), strict=True):
            by_seed[name] += losses
        steps += sum(r.steps for r in results)

    kept = replacement(by_seed, first, others)
    return {**sweeps[kept], "prior": kept,
            "priors": {name: {"grid": s["grid"], "val_loss": s["val_loss"], "lr0": s["grid_lr0"],
                              "placed_lr0": s["lr0"], "by_seed": by_seed[name], "mean": _mean(by_seed[name])}
                       for name, s in sweeps.items()},
            "seconds": time.perf_counter() - start, "steps": steps}


def _vertex(xs: list[float], losses: list[float]) -> float:
    """x of the lowest loss, moved to the vertex of the parabola through log(loss) there and at its two neighbours
    (xs ascending) when those three are finite: the vertex then lies between the neighbours."""
    best = _argmin(losses)
    if not 0 < best < len(xs) - 1 or not all(map(math.isfinite, losses[best - 1:best + 2])):
        return xs[best]
    (x0, x1, x2), (y0, y1, y2) = xs[best - 1:best + 2], [math.log(max(v, 1e-12)) for v in losses[best - 1:best + 2]]
    denominator = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)  # < 0: x1 is the first lowest, so y0 > y1 <= y2
    if denominator >= 0:  # only losses under the 1e-12 clamp can tie there
        return x1
    return x1 - 0.5 * ((x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)) / denominator


def horizon_exponent_fit(cfg: MetaConfig, horizon: int, vector: Tensor, lr0: float, run: Any,
                         warmup: float = 0.0, room: Callable[[int], bool] | None = None,
                         multiple: float = LONG_SWEEP, margin: float = SWEEP_MARGIN,
                         mean_margin: float = SWEEP_MEAN_MARGIN) -> dict[str, Any]:
    """α from the untrained L3RS's best λ at `multiple` x the horizon, λ* = λ0 · multiple^−α.

    λ0 and the steps below it (`sweep_step`: the grid's ratio at LONG_SWEEP) run at that horizon on LONG_SWEEP_SEEDS
    seeds, LONG_SWEEP_START of them and one more while the lowest is best (up to LONG_SWEEP_POINTS). α = 0 unless
    the best (lowest mean) beats λ0 by `margin` on every seed or by `mean_margin` in their mean. Otherwise, when the
    best is inside the swept range, the half steps either side of it run too, and λ* is the vertex of the parabola
    through log(mean loss) over log(λ) at the lowest of all points and its two neighbours (the edge when the best is
    the last step down): α is continuous in [0, (points − 1) · log(ratio) / log(LONG_SWEEP)], ratio the grid's mean
    step. `room(steps)` says whether that many more fine-tuning steps fit the budget: a step down or the half steps
    run only if they do ("cut" in the result says one was left out)."""
    start = time.perf_counter()
    factor = sweep_step(grid_ratio(cfg.lr0_grid), multiple)  # between points
    lrs = [lr0 / factor**k for k in range(LONG_SWEEP_START)]
    steps = max(1, round(multiple * horizon))
    cut = False

    def fits(points: int) -> bool:
        nonlocal cut
        cut = cut or not (room is None or room(points * LONG_SWEEP_SEEDS * steps))
        return not cut

    losses, by_seed, spent = _sweep_losses(cfg, steps, vector, lrs, run, LONG_SWEEP_SEEDS, warmup)
    while len(lrs) < LONG_SWEEP_POINTS and _argmin(losses) == len(lrs) - 1 and fits(1):
        (loss,), (seeds,), more = _sweep_losses(cfg, steps, vector, [lrs[-1] / factor], run, LONG_SWEEP_SEEDS, warmup)
        lrs, losses, by_seed, spent = [*lrs, lrs[-1] / factor], [*losses, loss], [*by_seed, seeds], spent + more
    best = _argmin(losses)
    clear_gain = math.isfinite(losses[best]) and (losses[best] * (1 + mean_margin) < losses[0] or all(
        low * (1 + margin) < high for high, low in zip(by_seed[0], by_seed[best], strict=True)))
    if clear_gain and best < len(lrs) - 1 and fits(2):
        # a grid step apart, three points misplace a minimum whose sides differ: the text task's 4x loss rises
        # slowly toward λ0 and steeply below its minimum, and they put the vertex at λ0 / 3.1 where a finer scan
        # found λ0 / 4.2 (5% lower loss at 5x on training seeds); the half steps either side place it closer
        halves = [lrs[best] * factor**0.5, lrs[best] / factor**0.5]
        more_losses, _, more = _sweep_losses(cfg, steps, vector, halves, run, LONG_SWEEP_SEEDS, warmup)
        pairs = sorted(zip([*lrs, *halves], [*losses, *more_losses], strict=True), reverse=True)
        lrs, losses, spent = [lr for lr, _ in pairs], [v for _, v in pairs], spent + more
    below = _vertex([math.log(lr0 / lr) / math.log(factor) for lr in lrs], losses) if clear_gain else 0.0
    exponent = below * math.log(factor) / math.log(multiple)
    return {"multiple": multiple, "grid": lrs, "val_loss": losses, "horizon_exponent": exponent, "cut": cut,
            "lr0_by_seed": by_seed[0], "seconds": time.perf_counter() - start, "steps": spent}


def long_prior_sweep(cfg: MetaConfig, horizon: int, vectors: dict[str, Tensor], kept: str, lr: float, run: Any,
                     warmup: float = 0.0, kept_by_seed: list[float] | None = None) -> dict[str, Any]:
    """The long runs' mix, chosen as the prior is but at LONG_MULTIPLE x the horizon, at the step `lr` a run of
    that length takes: each untrained optimizer in `vectors` (by the mix it moves to in long runs; `kept` names
    the one whose mix is the same at every length, `kept_by_seed` its losses there if they already ran) on
    LONG_SWEEP_SEEDS training seeds, then the kept one and each one whose mean is lower on more, up to
    PRIOR_SEEDS. Another mix replaces the kept one for long runs only if its mean is lower and it is lower on
    PRIOR_WIN_SHARE of the seeds (the lowest mean of those that are). Why (docs/RESULTS.md, session 37): the mix
    chosen at 1x need not suit long runs (effnet-mnist: the uniform mix wins 1x, the momentum-leaning one 5x,
    where one seed's 4x loss can be twice the next one's)."""
    start = time.perf_counter()
    steps, seeds = max(1, round(LONG_MULTIPLE * horizon)), sweep_seeds(cfg, PRIOR_SEEDS)

    def losses(names: list[str], on: list[int]) -> list[list[float]]:
        if not names:
            return []
        results = run([job for name in names for job in _jobs(vectors[name], [lr], on, steps, warmup)])
        spent.append(sum(r.steps for r in results))
        return grouped_objectives(results, len(on))

    spent: list[int] = []
    first = [name for name in vectors if name != kept or kept_by_seed is None]
    ran = dict(zip(first, losses(first, seeds[:LONG_SWEEP_SEEDS]), strict=True))
    by_seed = {name: ran.get(name, kept_by_seed) for name in vectors}
    lower = [name for name in vectors if name != kept and _mean(by_seed[name]) < _mean(by_seed[kept])]
    if lower and seeds[LONG_SWEEP_SEEDS:]:
        more = losses([kept, *lower], seeds[LONG_SWEEP_SEEDS:])
        by_seed |= {name: by_seed[name] + extra for name, extra in zip([kept, *lower], more, strict=True)}
    return {"multiple": LONG_MULTIPLE, "lr": lr, "kept": kept, "by_seed": by_seed,
            "mean": {name: _mean(by_seed[name]) for name in vectors},
            "long_prior": replacement(by_seed, kept, lower),  # only those lower on the first seeds ran on all
            "seconds": time.perf_counter() - start, "steps": sum(spent)}


def own_lr0(sweep: dict[str, Any] | None, mix: str) -> float | None:
    """The λ0 the prior sweep placed for the prior whose mix is `mix` (None: not one of its priors, or no sweep)."""
    for name, result in (sweep or {}).get("priors", {}).items():
        if prior_mix(name) == mix:
            return result["placed_lr0"]
    return None


def long_step(cfg: MetaConfig, horizon: int, vector: Tensor, lr: float, ratio: float, by_seed: list[float],
              run: Any, warmup: float = 0.0) -> dict[str, Any]:
    """The long runs' mix at its own step: the mix `long_prior_sweep` chose (`vector`), run at `ratio` x the step
    `lr` it was chosen at, on the seeds of its losses there (`by_seed`); "kept" when that is lower in the mean and on
    PRIOR_WIN_SHARE of the seeds (the prior sweep's rule). `ratio` is that mix's own λ0 at 1x over the kept prior's
    (the prior sweep ran both): mixes differ in how far a step of λ moves the weights (the Adam-leaning mix's
    directions add up where the uniform mix's partly cancel), and the α sweep fitted the kept prior's. Why
    (docs/RESULTS.md, session 41): minilm-chatterbot12's Adam-leaning long mix at the uniform mix's step read 1.7-2%
    worse than the tuned AdamW-cosine at 2x and 5x, at its own (λ0 ratio 0.74) 0.3-0.8%."""
    start = time.perf_counter()
    steps, seeds = max(1, round(LONG_MULTIPLE * horizon)), sweep_seeds(cfg, PRIOR_SEEDS)[:len(by_seed)]
    results = run(_jobs(vector, [lr * ratio], seeds, steps, warmup))
    (losses,) = grouped_objectives(results, len(seeds))
    kept = replacement({"chosen": by_seed, "own": losses}, "chosen", ["own"]) == "own"
    return {"lr": lr * ratio, "ratio": ratio, "by_seed": losses, "mean": _mean(losses), "kept": kept,
            "seconds": time.perf_counter() - start, "steps": sum(r.steps for r in results)}
