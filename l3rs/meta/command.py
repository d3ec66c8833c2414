"""`l3rs meta-train`: meta-train an L3RS optimizer on a task and write it to --out."""

from __future__ import annotations

import argparse
import json
import os
import sys

from l3rs.errors import UsageError
from l3rs.functional import NORMALIZATIONS, SCHEDULES, STEP_BUDGETS, Config
from l3rs.meta.config import ESTIMATOR_NAMES, HORIZON_DRAWS, OBJECTIVES, WARMUP, MetaConfig
from l3rs.schedules import FALLBACK_MULTIPLE

DEFAULT_BUDGET_MINUTES = 5.0
MIN_BUDGET_MINUTES = 1.0  # below this the λ0 sweep and the first validation would not fit


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    d = MetaConfig()
    parser.add_argument("--task", required=True,
                        help="built-in task name (see `l3rs tasks`) or package.module:function")
    parser.add_argument("--out", required=True,
                        help="output directory (best/, latest/, metrics.jsonl, checkpoint)")
    parser.add_argument("--estimator", choices=ESTIMATOR_NAMES, default=d.estimator,
                        help="bptt: truncated backprop (default; most progress per CPU-minute), "
                             "es: antithetic NES over full unrolls (the paper's), pes: persistent ES")
    parser.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                        help="meta-objective (val_metric: ES/PES only)")
    parser.add_argument("--horizon", type=int, default=None,
                        help="fine-tuning steps per run (default: the task's)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help=f"wall-clock budget, λ0 and α sweeps included (default {DEFAULT_BUDGET_MINUTES:g} "
                             "unless --iterations is given); the λ0 sweep, the α sweep's first points at 4x the "
                             "horizon and the long runs' mix sweep run even past it, and the rest of the α sweep "
                             "too when nothing is left to meta-train")
    parser.add_argument("--iterations", type=int, default=None,
                        help="meta-iterations (default: until the budget); 0: only the λ0 and α sweeps, "
                             "shipping the untrained optimizer")
    parser.add_argument("--population", type=int, default=d.population, help="antithetic pairs per iteration")
    parser.add_argument("--sigma", type=float, default=d.sigma, help="ES perturbation scale")
    parser.add_argument("--meta-lr", type=float, default=d.meta_lr,
                        help="Adam step size on the meta-parameters")
    parser.add_argument("--truncation", type=int, default=d.truncation,
                        help="unroll length per iteration (pes, bptt); 0: whole runs (bptt: the first-order "
                             "gradient of each run's final objective, replayed in O(1) memory)")
    parser.add_argument("--horizon-range", default=",".join(f"{v:g}" for v in d.horizon_range),
                        help="each run's length is drawn over LO,HI times the horizon (see --horizon-draw) and told "
                             "to the optimizer (1,1: always the horizon)")
    parser.add_argument("--horizon-draw", choices=HORIZON_DRAWS, default=d.horizon_draw,
                        help="equal-steps: every octave of run lengths gets the same share of unrolled steps "
                             "(density ∝ 1/T²); log-uniform: runs drawn log-uniformly (long runs take most)")
    parser.add_argument("--end-weight", type=float, default=d.end_weight,
                        help="weight of a truncation's objective at the end of its run (1 at the start; pes, bptt)")
    parser.add_argument("--no-log-objective", action="store_true",
                        help="estimate on the loss itself, not its log")
    parser.add_argument("--validation-horizons", default=",".join(f"{v:g}" for v in d.validation_horizons),
                        help="multiples of the horizon at which held-out validation picks the kept checkpoint")
    parser.add_argument("--no-long-fallback", action="store_true",
                        help="ship a meta-trained checkpoint only if it beats the untrained optimizer at every "
                             "validation horizon; by default, when none does, the best one that beats it below 2x "
                             "ships with runs of 2x and longer falling back to the untrained optimizer")
    parser.add_argument("--validate-every", type=int, default=d.validate_every,
                        help="iterations between held-out validations (they pick the kept checkpoint)")
    parser.add_argument("--validation-seeds", type=int, default=d.validation_seeds,
                        help="held-out fine-tuning seeds per validation horizon (more: a surer pick, dearer checks)")
    parser.add_argument("--selection-margin", type=float, default=d.selection_margin,
                        help="a meta-trained checkpoint replaces the untrained optimizer only if it is at least "
                             "this much (relative) lower on every validation seed at every validation horizon")
    parser.add_argument("--normalize", choices=NORMALIZATIONS, default=d.config.normalize,
                        help="snr: each direction at unit RMS times the RMS of Adam's direction (shrinks as "
                             "noise takes over); rms: unit RMS at every step (the paper); none: raw")
    parser.add_argument("--schedule", choices=SCHEDULES, default=Config.schedule,
                        help="base schedule the learned step size deviates from")
    parser.add_argument("--backbone-warmup", type=float, default=d.config.backbone_warmup, metavar="FRACTION",
                        help="the backbone warm-up of the +warmup priors: the pretrained backbone's step ramps up "
                             "over this fraction of each run while the new head's (the task's head tensors) steps at "
                             "once (default 0: none; 0.3 makes uniform+warmup the first prior, docs/RESULTS.md "
                             "sessions 24-25)")
    parser.add_argument("--step-budget", choices=STEP_BUDGETS, default=Config.step_budget,
                        help="shared: the learned λ only redistributes λ0·b(t) over tensors (the model-wide "
                             "RMS step stays the schedule's); free: each tensor's λ moves on its own")
    parser.add_argument("--average", type=float, default=Config.average, metavar="FRACTION",
                        help="evaluate an EMA of the weights over this fraction of the run (0: off; e.g. 0.125 "
                             "with --schedule constant); the optimizer then needs eval() / train() like "
                             "schedule-free ones")
    parser.add_argument("--weight-decay", type=float, default=Config.weight_decay,
                        help="decoupled weight decay of the optimizer being trained (AdamW's default; scaled "
                             "by the scheduled step λ0·b(t); 0: none)")
    parser.add_argument("--max-log-scale", type=float, default=Config.max_log_scale,
                        help="bound on the learned deviation: λ within λ0·b(t)·e^±this")
    parser.add_argument("--min-log-scale", type=_floor, default=Config.min_log_scale, metavar="FLOOR",
                        help="no tensor's λ below λ0·b(t)·e^this after the step budget (none: no floor)")
    parser.add_argument("--tasks-per-iteration", type=int, default=d.tasks_per_iteration,
                        help="tasks sampled from the family per iteration (their estimates are averaged)")
    parser.add_argument("--second-order", action="store_true",
                        help="bptt: differentiate through the model's gradients too (exact, ~2x slower)")
    parser.add_argument("--lr0", type=float, default=None,
                        help="λ0 (default: a sweep of the untrained optimizer)")
    parser.add_argument("--horizon-exponent", type=float, default=None,
                        help="α: runs of T steps longer than the horizon step with λ0·(horizon/T)^α (default: "
                             "fitted by a sweep of the untrained optimizer at 4x the horizon, past the budget if need "
                             "be; 0: λ0 at any length)")
    parser.add_argument("--size-exponent", type=float, default=None,
                        help="β: training sets of N examples, fewer than the task's N_ref, step with λ0·(N/N_ref)^β, "
                             "N/N_ref floored at 1/2 (default: fitted by a λ sweep of the untrained optimizer on half "
                             "the training set; 0: λ0 at any size)")
    parser.add_argument("--bases", default=None,
                        help="comma-separated base directions (see l3rs.bases.available())")
    parser.add_argument("--priors", default=None,
                        help="comma-separated untrained optimizers to start from, the first the default: uniform "
                             "(every base alike) or a base's name (a mix leaning on it), +warmup for the backbone "
                             "warm-up; the λ0 sweep runs each, a later one replaces the first only if lower on 3 of "
                             "4 training seeds and in their mean (default: uniform,adam, led by uniform+warmup when "
                             "--backbone-warmup > 0; with --lr0, the first)")
    parser.add_argument("--long-priors", default=None,
                        help="comma-separated mixes long runs may move to: uniform or a base's name, each run at "
                             "4x the horizon on 2 training seeds (4 when lower in the mean); one replaces the kept "
                             "prior's mix for runs of 4x and longer (log-linearly from 1x) only if lower in the mean "
                             "and on 3 of 4 seeds (default: uniform,adam,momentum, those among the bases; none: off)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="local worker processes (results do not depend on it)")
    parser.add_argument("--device", default=None, help="e.g. cuda (default: where the task's model lives)")
    parser.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _floor(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a number <= 0 or none, got {text!r}") from None


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def meta_config(args: argparse.Namespace) -> MetaConfig:
    """MetaConfig from parsed arguments (bad values become one-line usage errors)."""
    budget = args.budget_minutes
    if budget is not None and not budget >= MIN_BUDGET_MINUTES:
        raise UsageError(f"meta-train: --budget-minutes must be at least {MIN_BUDGET_MINUTES:g} (got {budget:g})")
    if budget is None and args.iterations is None:
        budget = DEFAULT_BUDGET_MINUTES
    try:
        bases = tuple(b.strip() for b in args.bases.split(",") if b.strip()) if args.bases else None
        config = Config(bases=bases or Config.bases, normalize=args.normalize, schedule=args.schedule,
                        max_log_scale=args.max_log_scale, min_log_scale=args.min_log_scale,
                        step_budget=args.step_budget, average=args.average, weight_decay=args.weight_decay,
                        backbone_warmup=args.backbone_warmup)
        priors = tuple(p.strip() for p in args.priors.split(",") if p.strip()) if args.priors is not None else None
        long_priors = (None if args.long_priors is None else () if args.long_priors.strip() == "none" else
                       tuple(p.strip() for p in args.long_priors.split(",") if p.strip()))
        return MetaConfig(estimator=args.estimator, objective=args.objective, horizon=args.horizon,
                          iterations=1_000_000 if args.iterations is None else args.iterations,
                          budget_minutes=budget,
                          population=args.population, sigma=args.sigma, meta_lr=args.meta_lr,
                          truncation=args.truncation, first_order=not args.second_order,
                          tasks_per_iteration=args.tasks_per_iteration, lr0=args.lr0, seed=args.seed,
                          horizon_exponent=args.horizon_exponent, size_exponent=args.size_exponent, priors=priors,
                          long_priors=long_priors, long_fallback=not args.no_long_fallback,
                          horizon_range=_floats(args.horizon_range, "--horizon-range"),
                          horizon_draw=args.horizon_draw,
                          validation_horizons=_floats(args.validation_horizons, "--validation-horizons"),
                          end_weight=args.end_weight, log_objective=not args.no_log_objective,
                          validate_every=args.validate_every, validation_seeds=args.validation_seeds,
                          selection_margin=args.selection_margin, workers=args.workers, device=args.device,
                          config=config)
    except ValueError as e:
        raise UsageError(f"meta-train: {e}") from None


def _by_seed(values: list[list[float]]) -> str:
    """Per-seed validation values, horizons separated by |."""
    return " | ".join(" ".join(f"{v:.4g}" for v in row) for row in values)


def run(args: argparse.Namespace) -> int:
    from l3rs.meta.sweeps import LONG_SWEEP_SEEDS, PLACE_CLIFF, prior_wins_needed
    from l3rs.meta.train import train
    from l3rs.tasks import resolve

    cfg = meta_config(args)
    if cfg.config.backbone_warmup and not any(p.endswith(WARMUP) for p in cfg.priors):
        print(f"meta-train: --backbone-warmup applies to the {WARMUP} priors and --priors names none: no run "
              "warms up its backbone", file=sys.stderr)
    task = resolve(args.task)
    try:
        best = train(task, args.out, cfg, resume=args.resume, progress=not args.no_progress)
    except FileExistsError as e:
        raise UsageError(f"meta-train: {e}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        info = json.loads((best / "optimizer.json").read_text())
        found = ("untrained: --iterations 0" if cfg.iterations == 0 else
                 "untrained: no room to meta-train" if info["validation"] is None else
                 f"validation {info['validation']:.4g} at iteration {info['best_iteration']}; "
                 f"untrained {info['untrained_validation']:.4g}")
        print(f"best optimizer: {best} ({found}; prior {info['prior']}, λ0 {info['lr']:.3g}, "
              f"β {info['config']['size_exponent']:.2f}, α {info['config']['horizon_exponent']:.2f}; "
              f"{info['meta_train_seconds']:.0f} s, {info['meta_train_steps']} fine-tuning steps)")
        priors = (info["lr0_sweep"] or {}).get("priors", {})
        if len(priors) > 1:  # which untrained optimizer meta-training started from, and by how much
            first, seeds = next(iter(priors)), len(next(iter(priors.values()))["by_seed"])
            rule = f"lower on {prior_wins_needed(seeds)} of {seeds} seeds and in the mean"
            why = f"the first: no other is {rule}" if info["prior"] == first else rule
            print(f"priors (mean of {seeds} training seeds at each one's λ0): " + ", ".join(
                f"{name} {s['mean']:.4g} at λ0 {s['lr0']:.3g}" for name, s in priors.items())
                  + f"; kept {info['prior']} ({why})")
        sweep = info["lr0_sweep"]
        if sweep:  # where λ0 came from: the grid's best, or between its points where every seed agrees on the side
            grid_lr0 = sweep.get("grid_lr0", sweep["lr0"])  # a run resumed from before session 36 has no placement
            where = (f"between the grid's points: every seed's vertex is on that side of {grid_lr0:.3g}"
                     if sweep["lr0"] != grid_lr0 else
                     f"the grid's best: no side every seed agrees on, or a neighbour {PLACE_CLIFF:g}x its loss")
            print(f"λ0 sweep of {info['prior']} (mean of {cfg.lr0_seeds} training seeds): "
                  + ", ".join(f"λ {lr:.3g} {v:.4g}" for lr, v in zip(sweep["grid"], sweep["val_loss"], strict=True))
                  + f"; λ0 {sweep['lr0']:.3g} ({where})")
        size = info.get("size_sweep")
        if size:  # why β is what it is: the best λ on half the training set
            print(f"β sweep on {size['fraction']:g} of the {info['config']['reference_train_size']} training examples "
                  f"(mean of {cfg.lr0_seeds} training seeds): "
                  + ", ".join(f"λ {lr:.3g} {v:.4g}" for lr, v in zip(size["grid"], size["val_loss"], strict=True))
                  + f"; λ {size['lr0']:.3g}, β {size['size_exponent']:.2f} (smaller sets step with λ0·(N/N_ref)^β, "
                  f"N/N_ref floored at {size['fraction']:g})")
        long = info["horizon_sweep"]
        if long:  # why α is what it is: the untrained optimizer's long-run losses over λ
            print(f"α sweep at {long['multiple']:g}x the horizon (mean of {LONG_SWEEP_SEEDS} training seeds): "
                  + ", ".join(f"λ {lr:.3g} {v:.4g}" for lr, v in zip(long["grid"], long["val_loss"], strict=True))
                  + f"; α {long['horizon_exponent']:.2f}"
                  + (" (the budget left no room for more points)" if long.get("cut") else ""))
        mixes = info.get("long_prior_sweep")
        if mixes:  # which mix runs of 4x and longer move to, and on what evidence
            kept, chosen, seeds = mixes["kept"], mixes["long_prior"], len(mixes["by_seed"][mixes["kept"]])
            rule = (f"lower in the mean and on {prior_wins_needed(seeds)} of {seeds} seeds" if seeds > LONG_SWEEP_SEEDS
                    else f"lower in the mean of {seeds} seeds")
            why = (f"{chosen} from {mixes['multiple']:g}x on, log-linearly from 1x: {rule}" if chosen != kept else
                   f"{kept} at every length: no other is {rule}")
            print(f"long runs' mix at {mixes['multiple']:g}x the horizon, λ {mixes['lr']:.3g} (mean over training "
                  "seeds): " + ", ".join(f"{name} {mixes['mean'][name]:.4g} ({len(values)} seeds)"
                                         for name, values in mixes["by_seed"].items()) + f"; {why}")
            own = mixes.get("own_step")
            if own:  # the chosen mix at its own step (its λ0 at 1x over the kept prior's)
                print(f"long runs' step: {chosen} at its own λ {own['lr']:.3g} ({own['ratio']:.2f}x, its λ0 at 1x "
                      f"over {kept}'s) {own['mean']:.4g} against {mixes['mean'][chosen]:.4g} ({seeds} seeds): "
                      + (f"kept, α {info['config']['horizon_exponent']:.2f}" if own["kept"] else
                         f"not lower in the mean and on {prior_wins_needed(seeds)} of {seeds} seeds"))
        if info["untrained_validation_by_seed"]:  # one run's final loss is noisy: show the seeds behind the means
            kept = (_by_seed(info["validation_by_seed"]) if info["best_iteration"] else
                    f"the untrained optimizer (no checkpoint was {100 * cfg.selection_margin:g}% lower on every "
                    "seed at every horizon)")
            print(f"validation seed by seed at {', '.join(map(str, info['validation_horizons']))} steps: "
                  f"kept {kept}; untrained {_by_seed(info['untrained_validation_by_seed'])}")
        if info.get("falls_back"):  # kept for short runs only: say where it acts
            steps = round(FALLBACK_MULTIPLE * info["horizon"])
            print(f"long fallback: iteration {info['best_iteration']} beats the untrained optimizer below {steps} "
                  f"steps only: runs longer than {info['horizon']} steps move to the untrained optimizer, all the way "
                  f"from {steps} on (--no-long-fallback: ship a checkpoint only if it beats it at every horizon)")
        split = info["seconds_by_phase"]  # validation and sweeps can leave the meta-gradient little of the budget
        print("time: " + ", ".join(f"{name.replace('_', '-')} {sec:.0f} s" for name, sec in split.items()))
    return 0
