"""MetaConfig: every knob of one meta-training run (saved in the checkpoint, checked on --resume)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from l3rs.functional import Config

ESTIMATOR_NAMES = ("es", "pes", "bptt")
OBJECTIVES = ("val_loss", "train_loss", "val_metric")
HORIZON_DRAWS = ("equal-steps", "log-uniform")
WARMUP = "+warmup"  # a prior's suffix: the backbone warm-up on
# the mixes long runs may move to by default: the priors, and the momentum-leaning mix, whose averaged direction
# suited effnet-mnist's long runs where the uniform mix's momentum-free ones did not (`docs/RESULTS.md`, session 31)
LONG_PRIORS = ("uniform", "adam", "momentum")


def prior_mix(prior: str) -> str:
    """The mix a `MetaConfig.priors` name starts from ("uniform" or the base it leans on)."""
    return prior.removesuffix(WARMUP)


@dataclass(frozen=True)
class MetaConfig:
    """How to meta-train. Defaults fit a few minutes on 2 CPU cores (see `l3rs meta-train --help`).

    population: antithetic pairs per iteration (es, pes); bptt runs `tasks_per_iteration` unrolls.
    truncation: unroll length per iteration for pes and bptt (each run is split into truncations;
        their objective averages the per-truncation objectives, i.e. the area under the curve). 0: whole
        runs, each scored by its final objective (bptt, first order: `unroll.linearized_grad`, O(1) memory).
    horizon_range: each fine-tuning run's length T is drawn over this range times the horizon, and the
        optimizer is told T ((1, 1): always the horizon).
    horizon_draw: "equal-steps" (density ∝ 1/T²: every octave of lengths gets the same share of unrolled
        steps) or "log-uniform" (runs drawn log-uniformly: long runs take most steps).
    end_weight: a truncation's objective is weighted by 1 + (end_weight - 1) * progress (pes, bptt).
    log_objective: estimators work on log(loss), so runs of any length and tasks of any scale weigh alike.
    validation_horizons: the kept checkpoint ("best") is chosen by held-out validation at these multiples of
        the horizon (the worst of log(val loss / untrained val loss) over them).
    long_fallback: when no checkpoint beats the untrained optimizer at every validation horizon, the best one that
        beats it at those below 2x ships with long runs falling back to the untrained optimizer (`Config.fallback`:
        log-linearly in T from the horizon, all of it from 2x on), whose λ0, α and long runs' mix the sweeps chose.
    selection_margin: a checkpoint replaces the untrained optimizer only if it is at least this much (relative)
        lower on every validation seed at every validation horizon (`validation.clears_noise`).
    lr0: λ0 of the L3RS being trained; None sweeps the untrained optimizer first (SPEC §5), extending the
        grid past an edge it picks.
    horizon_exponent: α of the trained optimizer (runs of T > horizon step with λ0 · (horizon / T)^α);
        None fits it from a second sweep of the untrained optimizer at 4x the horizon, past the budget if
        need be (it replaces config.horizon_exponent).
    size_exponent: β of the trained optimizer (training sets of N examples, fewer than the task's N_ref, step with
        λ0 · (N / N_ref)^β, N / N_ref floored at 1/2); None fits it from a λ sweep of the untrained optimizer on half
        the training set (`sweeps.size_exponent_fit`).
    priors: the untrained optimizers meta-training may start from, first the default: "uniform" (every base
        alike) or a base's name (a mix leaning on it, `Config.init_meta`), either with "+warmup" (the backbone
        warm-up `config.backbone_warmup` on) or without (off). The λ0 sweep runs each; a later one replaces the
        first only if it is lower on 3 of 4 training seeds and in their mean (`sweeps.prior_sweep`). None:
        uniform+warmup when `config.backbone_warmup` > 0, then uniform, and adam when adam is one of several
        bases. With a fixed `lr0` (no sweep) the first one is used.
    long_priors: the mixes long runs may move to ("uniform" or a base's name): at 4x the horizon, at the step a
        run of that length takes, each runs as the prior sweep runs its priors, and one replaces the kept prior's
        mix for long runs only if it is lower in the mean and on 3 of 4 training seeds (`sweeps.long_prior_sweep`);
        runs between 1x and 4x take it in log-linearly (`schedules.long_share`); another prior's mix also runs at
        its own step (`sweeps.long_step`: α moves if that is lower on 3 of 4 seeds and in the mean); past the budget
        if need be. None: uniform, adam and momentum, those among the bases; (): off.
    config: the trained optimizer's Config (default: `Config(normalize="snr")`; its backbone warm-up applies
        only when the kept prior is a "+warmup" one).
    objective: "val_metric" minimizes the validation error 1 − metric (gradient-free estimators only).
    """

    estimator: str = "bptt"  # most objective per CPU-minute in benchmarks/meta_efficiency.py
    objective: str = "val_loss"
    horizon: int | None = None  # None: the task's own horizon
    iterations: int = 50
    budget_minutes: float | None = None
    population: int = 8
    sigma: float = 0.05
    meta_lr: float = 0.01
    clip: float = 1.0  # global-norm clip of the meta-gradient before Adam
    truncation: int = 25
    horizon_range: tuple[float, float] = (0.5, 8.0)
    horizon_draw: str = "equal-steps"
    end_weight: float = 3.0
    log_objective: bool = True
    validation_horizons: tuple[float, ...] = (1.0, 4.0)
    tasks_per_iteration: int = 2
    first_order: bool = True  # bptt: treat the model's gradients as constants (steadier, ~2x cheaper)
    lr0: float | None = None
    lr0_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    lr0_seeds: int = 2
    horizon_exponent: float | None = None
    size_exponent: float | None = None
    priors: tuple[str, ...] | None = None
    long_priors: tuple[str, ...] | None = None
    long_fallback: bool = True
    validate_every: int = 20  # one at 1x and 4x costs ~10-20 iterations (a fifth of it when 1x screens it out)
    validation_seeds: int = 2
    selection_margin: float = 0.01
    val_subset: int | None = 512  # validation objectives read this fixed subset of val (None: all)
    seed: int = 0
    workers: int = 1
    device: str | None = None  # None: wherever the task's model lives
    # the optimizer being trained; snr normalization by default: its step keeps Adam's own shrinkage, so
    # runs longer than the horizon do not keep stepping at full size ("rms", the paper's, does)
    config: Config = field(default_factory=lambda: Config(normalize="snr"))

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATOR_NAMES:
            raise ValueError(f"estimator must be one of {ESTIMATOR_NAMES}, got {self.estimator!r}")
        if self.horizon_draw not in HORIZON_DRAWS:
            raise ValueError(f"horizon_draw must be one of {HORIZON_DRAWS}, got {self.horizon_draw!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.truncation == 0 and self.estimator == "bptt" and self.objective == "train_loss":
            raise ValueError("truncation 0 (whole runs) differentiates the run's final objective: use objective "
                             "'val_loss' with estimator 'bptt'")
        if self.truncation == 0 and self.estimator == "bptt" and self.config.average:
            raise ValueError("truncation 0 (whole runs) replays the trained weights, not averaged ones: give "
                             "--truncation > 0 or --average 0")
        if self.objective == "val_metric" and self.estimator == "bptt":
            raise ValueError("objective 'val_metric' is not differentiable: use estimator 'es' or 'pes'")
        if not isinstance(self.truncation, int) or self.truncation < 0:
            raise ValueError(f"truncation must be an int >= 0 (0: whole runs), got {self.truncation!r}")
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"iterations must be an int >= 0 (0: sweeps only), got {self.iterations!r}")
        for name in ("population", "tasks_per_iteration", "validate_every",
                     "validation_seeds", "lr0_seeds", "workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("sigma", "meta_lr", "clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.selection_margin < 1:
            raise ValueError(f"selection_margin must be in [0, 1), got {self.selection_margin!r}")
        if self.horizon is not None and self.horizon < 1:
            raise ValueError(f"horizon must be a positive int, got {self.horizon!r}")
        if self.lr0 is not None and not self.lr0 > 0:
            raise ValueError(f"lr0 must be positive, got {self.lr0!r}")
        for name in ("horizon_exponent", "size_exponent"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be finite and >= 0, got {getattr(self, name)!r}")
        object.__setattr__(self, "lr0_grid", tuple(float(v) for v in self.lr0_grid))
        object.__setattr__(self, "horizon_range", tuple(float(v) for v in self.horizon_range))
        object.__setattr__(self, "validation_horizons", tuple(float(v) for v in self.validation_horizons))
        if len(self.horizon_range) != 2 or not 0 < self.horizon_range[0] <= self.horizon_range[1]:
            raise ValueError(f"horizon_range must be (lo, hi) with 0 < lo <= hi, got {self.horizon_range!r}")
        if not self.validation_horizons or min(self.validation_horizons) <= 0:
            raise ValueError(f"validation_horizons must be positive multiples, got {self.validation_horizons!r}")
        if not self.end_weight > 0:
            raise ValueError(f"end_weight must be positive, got {self.end_weight!r}")
        if isinstance(self.config, dict):
            object.__setattr__(self, "config", Config.from_dict(self.config))
        object.__setattr__(self, "priors", self._resolve_priors())
        object.__setattr__(self, "long_priors", self._resolve_long_priors())

    def _resolve_priors(self) -> tuple[str, ...]:
        bases, warm = self.config.bases, self.config.backbone_warmup > 0
        if self.priors is None:
            mixes = ("uniform", "adam") if "adam" in bases and len(bases) > 1 else ("uniform",)
            return ("uniform" + WARMUP,) * warm + mixes
        priors = tuple(self.priors)
        if not priors or len(set(priors)) != len(priors):
            raise ValueError(f"priors must name at least one prior, each once, got {priors!r}")
        for name in priors:
            if prior_mix(name) != "uniform" and prior_mix(name) not in bases:
                raise ValueError(f"prior {name!r} is neither 'uniform' nor one of the bases {bases}, "
                                 f"optionally with {WARMUP!r}")
            if name.endswith(WARMUP) and not warm:
                raise ValueError(f"prior {name!r} needs a backbone warm-up: config.backbone_warmup is 0")
        if len(bases) == 1:  # a mix of one base: every mix is the same optimizer, the warm-up still differs
            priors = tuple(dict.fromkeys("uniform" + WARMUP * name.endswith(WARMUP) for name in priors))
        return priors

    def _resolve_long_priors(self) -> tuple[str, ...]:
        bases = self.config.bases
        if self.long_priors is None:
            return tuple(m for m in LONG_PRIORS if m == "uniform" or m in bases) if len(bases) > 1 else ()
        long_priors = tuple(self.long_priors)
        if len(set(long_priors)) != len(long_priors):
            raise ValueError(f"long_priors must name each mix once, got {long_priors!r}")
        for name in long_priors:
            if name != "uniform" and name not in bases:
                raise ValueError(f"long prior {name!r} is neither 'uniform' nor one of the bases {bases}")
        return long_priors

    def warmup_of(self, prior: str) -> float:
        """The backbone warm-up of the optimizer started from `prior` (0 unless it is a +warmup one)."""
        return self.config.backbone_warmup if prior.endswith(WARMUP) else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        d["lr0_grid"] = list(self.lr0_grid)
        d["horizon_range"] = list(self.horizon_range)
        d["validation_horizons"] = list(self.validation_horizons)
        d["priors"] = list(self.priors)
        d["long_priors"] = list(self.long_priors)
        return d

    def result_keys(self) -> dict[str, Any]:
        """The settings that determine the meta-parameters (resuming must keep them; workers, the budget and
        the selection margin may change)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("workers", "budget_minutes", "device",
                                                                     "iterations", "selection_margin",
                                                                     "long_fallback")}
