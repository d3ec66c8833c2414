"""How an L3RS step depends on where it is in its run, the run's length and its training set's size, apart from the
learned mixer: the base schedule b(t/T), the backbone's ramp, the horizon and size exponents' h(T)·g(N), the long
runs' share of the mix prior and their fallback to the untrained optimizer. Each reads the fields it needs of an
`l3rs.functional.Config`; the functional step multiplies or adds them in."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

# A long run's mix prior (`Config.init_meta(long_lean=)`) holds in full from this multiple of the meta-training
# horizon on: the α sweep's horizon, where meta-training compares the long runs' mixes (`sweeps.long_prior_sweep`)
LONG_MULTIPLE = 4.0
# From this multiple of the meta-training horizon on, an optimizer with a `Config.fallback` is the untrained one the
# sweeps chose for long runs (its checkpoint was validated better than that one below this multiple only)
FALLBACK_MULTIPLE = 2.0
# The size sweep's training subset, as a fraction of the training set λ0 was swept on (`sweeps.size_exponent_fit`);
# smaller sets step as it does: g(N) is flat below it. The best step fell 2-19x from the whole training set to half
# of it; the steps tuned on a quarter sat 1-1.6x below the half's (four environments, docs/RESULTS.md session 43):
# the power law does not extrapolate, and a step below the half's sweep would be a guess
SMALL_SET_FRACTION = 0.5


class Config(Protocol):
    """The fields of `l3rs.functional.Config` these read (a protocol: functional imports this module)."""

    schedule: str
    warmup: float
    backbone_warmup: float
    reference_horizon: int | None
    horizon_exponent: float
    reference_train_size: int | None
    size_exponent: float
    fallback: tuple[float, ...] | None


def schedule(config: Config, step: int, total_steps: int | None) -> float:
    """The base schedule b at update `step` (0-based) of a `total_steps` run; 1 when T is unknown."""
    if config.schedule == "constant" or not total_steps:
        return 1.0
    warm = config.warmup * total_steps
    if step < warm:
        return (step + 1) / (warm + 1)
    progress = min(1.0, (step - warm) / max(total_steps - warm, 1.0))
    return 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1.0 - progress


def head_ramp(config: Config, step: int, total_steps: int | None, head: Tensor | None) -> Tensor | float:
    """Per-tensor factor of λ0 at update `step`: `head` [T] (bool) marks the new head's tensors, which step at
    once; the others (the pretrained backbone) ramp up linearly over `config.backbone_warmup` of the run. 1 when
    the ramp is off or over, no tensor is marked (`head` None) or T is unknown."""
    if head is None or not (config.backbone_warmup and total_steps):
        return 1.0
    ramp = min(1.0, (step + 1) / (config.backbone_warmup * total_steps + 1))
    return 1.0 if ramp == 1.0 else torch.where(head, 1.0, ramp)


def horizon_scale(config: Config, total_steps: int | None) -> float:
    """(T_ref / T)^α for a run of T > T_ref steps, else 1: the step of longer runs shrinks with their length."""
    reference = config.reference_horizon
    if not (config.horizon_exponent and total_steps and reference) or total_steps <= reference:
        return 1.0
    return (reference / total_steps) ** config.horizon_exponent


def size_scale(config: Config, train_size: int | None) -> float:
    """(N / N_ref)^β for a training set of N < N_ref examples, N / N_ref floored at SMALL_SET_FRACTION, else 1: the
    step of smaller sets shrinks with their size (at the step that suits the set λ0 was swept on, a smaller set is
    fitted too soon, then overfitted, or is worse throughout)."""
    reference = config.reference_train_size
    if not (config.size_exponent and train_size and reference) or train_size >= reference:
        return 1.0
    return max(train_size / reference, SMALL_SET_FRACTION) ** config.size_exponent


def run_scale(config: Config, total_steps: int | None, train_size: int | None) -> float:
    """What a run's length and training set do to λ0, the same all run long: h(T) · g(N)."""
    return horizon_scale(config, total_steps) * size_scale(config, train_size)


def long_share(config: Config, total_steps: int | None) -> float:
    """How much of the long runs' mix prior (the mixer's `long_mix` logits) a run of T steps takes: 0 up to the
    meta-training horizon T_ref, all of it from LONG_MULTIPLE x T_ref on, log-linear in T between (the two
    horizons whose sweeps chose the mixes); 0 when T or T_ref is unknown."""
    return _log_ramp(config, total_steps, LONG_MULTIPLE)


def fallback_share(config: Config, total_steps: int | None) -> float:
    """How far a run of T steps moves from the mixer's output to the untrained optimizer's (`Config.fallback`): 0 up
    to the meta-training horizon T_ref, all the way from FALLBACK_MULTIPLE x T_ref on, log-linear in T between; 0
    without a fallback or when T or T_ref is unknown."""
    return 0.0 if config.fallback is None else _log_ramp(config, total_steps, FALLBACK_MULTIPLE)


def _log_ramp(config: Config, total_steps: int | None, multiple: float) -> float:
    """0 up to T_ref, 1 from `multiple` x T_ref on, log-linear in T between; 0 when T or T_ref is unknown."""
    reference = config.reference_horizon
    if not (total_steps and reference) or total_steps <= reference:
        return 0.0
    return min(1.0, math.log(total_steps / reference) / math.log(multiple))


def fall_back(config: Config, s: Tensor, logits: Tensor, share: float,
              total_steps: int | None) -> tuple[Tensor, Tensor]:
    """The mixer's raw (s, logits) moved `fallback_share` of the way to the untrained optimizer's at this length (its
    long mix in by `share`): exactly its from FALLBACK_MULTIPLE x T_ref on (lerp returns its end at weight 1), and
    an untrained optimizer is unchanged by its own fallback. Raw, before the bound, the shared budget and the floor
    on s, so a blend keeps the schedule's RMS step (blended after them it stepped 3-5% under it at 1.2-1.75x)."""
    back = fallback_share(config, total_steps)
    if not back:
        return s, logits
    p = logits.shape[-1]
    anchor = torch.tensor(config.fallback, dtype=logits.dtype, device=logits.device)
    anchor_logits = anchor[1:1 + p] + share * anchor[1 + p:]
    return torch.lerp(s, anchor[0].expand_as(s), back), torch.lerp(logits, anchor_logits.expand_as(logits), back)
