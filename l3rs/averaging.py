"""Averaged weights (`Config.average`): the weights a run is scored on become an EMA of its iterates over the last
fraction `average` of the run (schedule-free optimizers do likewise), settled at every step. The optimizer class keeps
the average in place, meta-training's unrolls purely; both call `average_update`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from l3rs.functional import Config, TensorList


def average_weight(config: Config, steps: int, total_steps: int | None) -> float:
    """The weight of the newest iterate after `steps` (>= 1) updates: the mean of every iterate so far until
    the EMA's window (`config.average` of a `total_steps` run) is reached, then the EMA's 1 / window; the
    plain mean of all iterates when T is unknown."""
    uniform = 1.0 / (steps + 1)  # the starting weights count as the first iterate
    return uniform if not total_steps else max(uniform, min(1.0, 1.0 / (config.average * total_steps)))


def average_update(config: Config, average: TensorList, params: TensorList, steps: int, total_steps: int | None,
                   inplace: bool = False) -> TensorList:
    """Fold the weights after `steps` updates into the average (pure, or in place into `average`)."""
    weight = average_weight(config, steps, total_steps)
    if inplace:
        torch._foreach_lerp_(average, params, weight)
        return average
    return torch._foreach_lerp(average, params, weight)
