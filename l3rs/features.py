"""Per-tensor input features of the mixer (SPEC §2).

Two pure steps, so the optimizer can also *look* at its features without advancing them:

    fstate = observe(fstate, loss, grad_rms, weight_rms, distance)   # update the EMAs
    x      = featurize(fstate, step, total_steps, ...)                # [T, F] matrix, O(1) scaled

Loss, gradient-norm and weight-norm EMAs are taken of logs and expressed *relative to their first value*
(so the same optimizer transfers across tasks whose absolute scales differ); the per-tensor embedding
carries the tensor's identity. Features are detached: the meta-gradient flows through the update math,
not through the statistics that steer it (cheaper and far less noisy).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

DECAYS: tuple[float, ...] = (0.9, 0.99, 0.999)
_BUMP_CENTERS = (0.25, 0.5, 0.75)
NUM_TIME = 3 + len(_BUMP_CENTERS)
NUM_STATS = 3 * len(DECAYS)
_HORIZON_OCTAVES = math.log(8.0)  # log(T / T_ref) is read in units of "8x the reference horizon"
_TINY = 1e-12


class FeatureState(NamedTuple):
    """EMAs of log statistics; `*_ref` is the first value seen (None until then)."""

    loss_ema: Tensor | None  # [D]
    loss_ref: Tensor | None  # []
    grad_ema: Tensor | None  # [T, D]
    grad_ref: Tensor | None  # [T]
    weight_ema: Tensor | None  # [T, D]
    weight_ref: Tensor | None  # [T]
    distance: Tensor | None  # [T]  log10 of ||theta - theta0|| / ||theta0||


def num_features(distance: bool) -> int:
    return NUM_TIME + NUM_STATS + int(distance)


def init() -> FeatureState:
    return FeatureState(None, None, None, None, None, None, None)


@functools.cache
def _decays(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """(DECAYS, 1 - DECAYS) as tensors, built once per dtype/device (a step is many tiny ops)."""
    decays = torch.tensor(DECAYS, dtype=dtype, device=device)
    return decays, 1 - decays


def _ema(ema: Tensor | None, x: Tensor) -> Tensor:
    """EMAs at every decay in DECAYS; the first observation initializes them (no zero bias)."""
    x = x.unsqueeze(-1).expand(*x.shape, len(DECAYS))
    if ema is None:
        return x.clone()
    decays, rest = _decays(x.dtype, x.device)
    return decays * ema + rest * x


def observe(
    fs: FeatureState,
    loss: Tensor | float | None,
    grad_rms: Tensor,
    weight_rms: Tensor,
    distance: Tensor | None = None,
) -> FeatureState:
    """Fold one step's statistics into the EMAs. Without a loss, the loss EMAs keep their last value."""
    log_g = grad_rms.detach().clamp_min(_TINY).log()
    log_w = weight_rms.detach().clamp_min(_TINY).log()
    loss_ema, loss_ref = fs.loss_ema, fs.loss_ref
    if loss is not None:
        log_l = torch.as_tensor(loss, dtype=log_g.dtype, device=log_g.device).detach().clamp_min(_TINY).log()
        if torch.isfinite(log_l):
            loss_ema = _ema(loss_ema, log_l)
            loss_ref = log_l if loss_ref is None else loss_ref
    if distance is not None:
        distance = distance.detach().clamp_min(1e-8).log10()
    return FeatureState(
        loss_ema,
        loss_ref,
        _ema(fs.grad_ema, log_g),
        log_g if fs.grad_ref is None else fs.grad_ref,
        _ema(fs.weight_ema, log_w),
        log_w if fs.weight_ref is None else fs.weight_ref,
        distance,
    )


def time_features(step: int, total_steps: int | None, reference_horizon: int | None, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """Horizon-relative time: whether the horizon is known, progress t/T, tanh bumps of progress, and the
    run length relative to the meta-training horizon, log(T / T_ref).

    No absolute step clock: a run 5x longer than any seen in meta-training must not feed the mixer inputs
    it never saw (progress stays in [0, 1] whatever T is, and log(T / T_ref) is clipped).
    """
    known = total_steps is not None and total_steps > 0
    progress = min(step / total_steps, 1.5) if known else 0.0
    values = [float(known), progress]
    values += [math.tanh((progress - c) / 0.15) if known else 0.0 for c in _BUMP_CENTERS]
    length = 0.0
    if known and reference_horizon:
        length = max(-1.5, min(1.5, math.log(total_steps / reference_horizon) / _HORIZON_OCTAVES))
    values.append(length)
    return torch.tensor(values, dtype=dtype, device=device)


def featurize(
    fs: FeatureState,
    step: int,
    total_steps: int | None,
    num_tensors: int,
    distance: bool,
    reference_horizon: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The [num_tensors, F] feature matrix; statistics not yet observed read as zero."""
    t = time_features(step, total_steps, reference_horizon, dtype, device).expand(num_tensors, NUM_TIME)
    zeros = torch.zeros(num_tensors, len(DECAYS), dtype=dtype, device=device)
    loss = zeros if fs.loss_ema is None else (fs.loss_ema - fs.loss_ref).expand(num_tensors, -1)
    grad = zeros if fs.grad_ema is None else fs.grad_ema - fs.grad_ref.unsqueeze(-1)
    # weights move little while fine-tuning: scale up their relative change.
    weight = zeros if fs.weight_ema is None else 10 * (fs.weight_ema - fs.weight_ref.unsqueeze(-1))
    cols = [t, (loss / 3).clamp(-2, 2), (grad / 3).clamp(-2, 2), weight.clamp(-2, 2)]
    if distance:
        d = fs.distance if fs.distance is not None else torch.full((num_tensors,), -8.0, dtype=dtype, device=device)
        cols.append(((d + 3) / 3).clamp(-2, 1).unsqueeze(-1))
    return torch.cat(cols, dim=-1).to(dtype)
