"""The arguments `L3RS` takes, checked: named tensors in param groups on one device, step size and policies."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from l3rs.checkpoint import canonical_name
from l3rs.functional import Config

UNKNOWN_POLICIES = ("error", "mean")


def named(params: Any) -> list[Any]:
    """Materialize the params argument and insist on names (coefficients are keyed by name)."""
    params = list(params)
    if not params:
        raise ValueError("L3RS got an empty parameter list")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    for group in groups:
        items = list(group["params"])
        group["params"] = items
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(
                    "L3RS identifies tensors by name: pass model.named_parameters() (or param groups whose "
                    "'params' are (name, tensor) pairs), not model.parameters()"
                )
    return groups


def check_arguments(lr: Any, total_steps: Any, unknown: str, weight_decay: Any, train_size: Any = None) -> None:
    check_group_options(lr, weight_decay)
    for key, value in (("total_steps", total_steps), ("train_size", train_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{key} must be a positive int or None, got {value!r}")
    if unknown not in UNKNOWN_POLICIES:
        raise ValueError(f"unknown must be one of {UNKNOWN_POLICIES}, got {unknown!r}")


def check_group_options(lr: Any, weight_decay: Any, where: str = "") -> None:
    """The per-group options, for the constructor's defaults and for every param group (`where` names it)."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr{where} must be a positive finite number, got {lr!r}")
    if weight_decay is not None and not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay)
                                         and weight_decay >= 0):
        raise ValueError(f"weight_decay{where} must be a finite number >= 0 or None (the optimizer's own), "
                         f"got {weight_decay!r}")


def build_config(config: Config | None, bases: Iterable[str] | None, normalize: bool, mix: str,
                  schedule: str, average: float) -> Config:
    if config is None:
        return Config(bases=tuple(bases) if bases is not None else Config.bases, normalize=normalize, mix=mix,
                      schedule=schedule, average=average)
    if bases is not None:
        raise ValueError("pass either bases=... or config=..., not both")
    return config


def trainable(groups: list[dict[str, Any]]) -> tuple[list[Tensor], list[str]]:
    """The tensors that require grad (in group order) and their names, which must be unique."""
    pairs = [(name, p) for g in groups for name, p in zip(g["param_names"], g["params"], strict=True)
             if p.requires_grad]
    if not pairs:
        raise ValueError("L3RS got no parameter that requires grad")
    names = [n for n, _ in pairs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"parameter names must be unique, repeated: {dupes}")
    return [p for _, p in pairs], names


def head_mask(names: list[str], head: Iterable[str] | None, device: torch.device) -> Tensor | None:
    """[T] bool: which trainable tensors are the new head (`Config.backbone_warmup`), matched by name without
    wrapper prefixes; None when `head` names none of them (every tensor is then stepped alike)."""
    wanted = {canonical_name(n) for n in ((head,) if isinstance(head, str) else head or ())}
    mask = [canonical_name(n) in wanted for n in names]
    return torch.tensor(mask, device=device) if any(mask) else None


def one_device(params: list[Tensor], names: list[str]) -> torch.device:
    """The single device of all tensors (the foreach kernels and the mixer work on one device)."""
    devices = {p.device for p in params}
    if len(devices) > 1:
        where = {str(d): next(n for n, p in zip(names, params, strict=True) if p.device == d) for d in devices}
        raise ValueError(f"L3RS needs all parameters on one device, got {sorted(where)} (e.g. {where}); "
                         "use one L3RS per device")
    return params[0].device
