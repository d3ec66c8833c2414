"""MetaConfig: every knob of one meta-training run (saved in the checkpoint, checked on --resume)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from l3rs.functional import Config

ESTIMATORS = ("es", "pes", "bptt")
OBJECTIVES = ("val_loss", "train_loss", "val_metric")


@dataclass(frozen=True)
class MetaConfig:
    """How to meta-train. Defaults fit a few minutes on 2 CPU cores (see `l3rs meta-train --help`).

    population: antithetic pairs per iteration (es, pes); bptt runs `tasks_per_iteration` unrolls.
    truncation: unroll length per iteration for pes and bptt (their horizon is split into truncations;
        their objective averages the per-truncation objectives, i.e. the area under the curve).
    lr0: λ0 of the L3RS being trained; None sweeps the untrained optimizer first (SPEC §5).
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
    tasks_per_iteration: int = 2
    first_order: bool = True  # bptt: treat the model's gradients as constants (steadier, ~2x cheaper)
    lr0: float | None = None
    lr0_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    lr0_seeds: int = 2
    validate_every: int = 5
    validation_seeds: int = 2
    val_subset: int | None = 512  # validation objectives read this fixed subset of val (None: all)
    seed: int = 0
    workers: int = 1
    device: str | None = None  # None: wherever the task's model lives
    config: Config = field(default_factory=Config)

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "val_metric" and self.estimator == "bptt":
            raise ValueError("objective 'val_metric' is not differentiable: use estimator 'es' or 'pes'")
        for name in ("iterations", "population", "truncation", "tasks_per_iteration", "validate_every",
                     "validation_seeds", "lr0_seeds", "workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("sigma", "meta_lr", "clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.horizon is not None and self.horizon < 1:
            raise ValueError(f"horizon must be a positive int, got {self.horizon!r}")
        if self.lr0 is not None and not self.lr0 > 0:
            raise ValueError(f"lr0 must be positive, got {self.lr0!r}")
        object.__setattr__(self, "lr0_grid", tuple(float(v) for v in self.lr0_grid))
        if isinstance(self.config, dict):
            object.__setattr__(self, "config", Config.from_dict(self.config))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        d["lr0_grid"] = list(self.lr0_grid)
        return d

    def result_keys(self) -> dict[str, Any]:
        """The settings that determine the meta-parameters (resuming must keep them; workers may change)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("workers", "budget_minutes", "device",
                                                                     "iterations")}
