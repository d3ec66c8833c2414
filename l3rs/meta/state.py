"""TrainState: what a meta-training run carries from iteration to iteration, and its checkpoint (one safetensors
file: tensors, plus the rest as JSON metadata; never pickled)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from l3rs.io import atomic_write
from l3rs.meta.config import MetaConfig
from l3rs.meta.estimators import Particles
from l3rs.meta.unroll import pack, unpack

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"  # one JSON line per meta-iteration
_TENSORS = ("vector", "adam_m", "adam_v", "best_vector")


@dataclass
class TrainState:
    """Everything a meta-training run carries from iteration to iteration (saved in the checkpoint)."""

    iteration: int
    vector: Tensor  # flat meta-parameters
    adam_m: Tensor
    adam_v: Tensor
    best_vector: Tensor
    lr0: float
    lr0_sweep: dict[str, Any] | None
    # val loss of the untrained optimizer, per validation horizon (None: the budget had no room to validate,
    # so nothing is meta-trained and the untrained optimizer ships)
    untrained_validation: list[float] | None
    best_validation: list[float] | None  # the same for the best checkpoint so far
    best_score: float  # worst log(best / untrained) over validation horizons (0: the untrained optimizer)
    best_iteration: int
    seconds: float
    steps: int  # fine-tuning steps spent
    validation_seconds: float = 0.0  # what the last validation took (budgets plan for the next one)
    validation_total: float = 0.0  # what every validation so far took (reported: where the budget went)
    horizon_exponent: float = 0.0  # α of the trained optimizer (fitted or given)
    horizon_sweep: dict[str, Any] | None = None  # the long sweep that fitted α
    size_exponent: float = 0.0  # β of the trained optimizer (fitted or given)
    size_sweep: dict[str, Any] | None = None  # the λ sweep on half the training set that fitted β
    long_prior_sweep: dict[str, Any] | None = None  # the comparison that chose the long runs' mix
    # each validation seed's value per horizon, untrained and best (how far the mean is from noise)
    untrained_validation_by_seed: list[list[float]] | None = None
    best_validation_by_seed: list[list[float]] | None = None
    prior: str = "uniform"  # the untrained optimizer it started from (`MetaConfig.priors`)
    backbone_warmup: float = 0.0  # of the trained optimizer (its prior's: `MetaConfig.warmup_of`)
    # the untrained optimizer's mixer output (`mixer.untrained_output`): what long runs of a best that falls back take
    untrained_output: list[float] | None = None
    # whether the best checkpoint beats the untrained optimizer only below 2x (`MetaConfig.long_fallback`): it
    # ships with `Config.fallback`, and one that beats it at every validation horizon replaces it whatever its score
    best_falls_back: bool = False
    particles: Particles | None = None

    def seconds_by_phase(self) -> dict[str, float]:
        """Where the meta-training time went: the sweeps, validations, and the meta-iterations (the rest)."""
        sweeps = sum(s["seconds"] for s in (self.lr0_sweep, self.size_sweep, self.horizon_sweep,
                                            self.long_prior_sweep) if s)
        return {"sweeps": sweeps, "validation": self.validation_total,
                "meta_iterations": max(0.0, self.seconds - sweeps - self.validation_total)}

    def to_doc(self) -> dict[str, Any]:
        """The JSON part of the checkpoint (tensors and particles go to safetensors)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in (*_TENSORS, "particles")}


def save_checkpoint(out: Path, state: TrainState, cfg: MetaConfig) -> None:
    """One safetensors file (tensors + JSON metadata), replaced atomically: a kill leaves old or new."""
    tensors = {k: getattr(state, k).contiguous() for k in _TENSORS}
    particles, layout = state.particles, None
    if particles is not None:
        for i, p in enumerate(particles.states):
            if p is not None:
                tensors |= pack(p, f"particle.{i}.")
        if particles.noise is not None:
            tensors["particle_noise"] = particles.noise.contiguous()
        layout = {"present": [p is not None for p in particles.states], "alive": particles.alive,
                  "runs": particles.runs}
    doc = {**state.to_doc(), "particles": layout, "meta_config": cfg.result_keys()}
    atomic_write(out / CHECKPOINT, lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(doc)}))


def load_checkpoint(out: Path, cfg: MetaConfig) -> TrainState | None:
    """The checkpoint in `out` (None: there is none); refuses one written with other result-determining settings."""
    path = out / CHECKPOINT
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        doc = json.loads(f.metadata()["state"])
    # checkpoints from before priors: the uniform mix; from before long priors: the same mix at every length
    saved = {"priors": ["uniform"], "long_priors": [], "size_exponent": None, **doc["meta_config"]}
    # from before the size exponent: no size sweep ran (the optimizer ships with β = 0)
    saved["config"] = {"reference_train_size": None, "size_exponent": 0.0, **saved["config"]}
    if saved != cfg.result_keys():
        changed = sorted(k for k in cfg.result_keys() if saved.get(k) != cfg.result_keys()[k])
        raise FileExistsError(f"{path} was written with other settings ({', '.join(changed)}): resume "
                              "with the same settings or use a new --out")
    tensors = load_file(path)
    layout = doc.pop("particles")
    doc.pop("meta_config")
    doc.setdefault("backbone_warmup", cfg.config.backbone_warmup)  # before priors chose it: every run had it
    if "long_prior_sweep" not in doc:  # its vectors end before the (last-sorted) long_mix: a zero one
        tensors |= {k: torch.cat([tensors[k], tensors[k].new_zeros(len(cfg.config.bases))]) for k in _TENSORS}
    particles = None
    if layout is not None:
        states = [unpack(tensors, f"particle.{i}.") if present else None
                  for i, present in enumerate(layout["present"])]
        particles = Particles(states, layout["alive"], tensors.get("particle_noise"), layout["runs"])
    return TrainState(**doc, **{k: tensors[k] for k in _TENSORS}, particles=particles)


def open_run(out: Path, cfg: MetaConfig, resume: bool) -> TrainState | None:
    """Prepare the run directory `out`: the checkpoint to resume from (None: start fresh), its metrics trimmed to
    it; refuses to overwrite a checkpoint without `resume`."""
    if (out / CHECKPOINT).exists() and not resume:
        raise FileExistsError(f"{out} already holds a meta-training checkpoint: pass --resume (resume=True) "
                              "to continue it, or choose another output directory")
    out.mkdir(parents=True, exist_ok=True)
    state = load_checkpoint(out, cfg) if resume else None
    metrics = out / METRICS
    kept = []
    if state is not None and metrics.exists():  # drop lines of iterations the checkpoint does not hold
        kept = [line for line in metrics.read_text().splitlines()
                if line.strip() and json.loads(line)["iteration"] <= state.iteration]
    metrics.write_text("".join(line + "\n" for line in kept))
    return state
