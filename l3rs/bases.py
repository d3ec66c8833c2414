"""Base update directions, in the optax shape.

Every base direction reads a small set of *shared* statistics, so bases that need the same first or second
moment read ONE buffer (the default set keeps exactly AdamW's two buffers per parameter):

    stats = init(params, needs)                      # Moments
    stats = update(grads, stats, params, hyper)      # pure: returns new tensors, never mutates
    d     = direction(name, grads, stats, params, hyper)   # or scaled_direction(...) -> (tensors, scalar)

All functions are pure and differentiable (second order included: square roots are clamped away from zero),
so meta-training unrolls them with autograd and the optimizer class runs the very same code under no_grad
(there, with a `Workspace`, results land in reused buffers instead of fresh memory).
Directions point *uphill* like a gradient: the L3RS step subtracts them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

TensorList = list[Tensor]

# Clamp before sqrt so d/dv sqrt(v) stays finite at v == 0 (second-order meta-gradients would be NaN).
_SQRT_FLOOR = 1e-30


@dataclass(frozen=True)
class Hyper:
    """Hyper-parameters of the shared statistics (AdamW's defaults)."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


class Moments(NamedTuple):
    """Shared per-parameter statistics; a field is None when no chosen base needs it."""

    step: int  # number of updates applied so far (bias corrections use step after the update)
    m: TensorList | None  # EMA of g            (beta1)
    v: TensorList | None  # EMA of g^2          (beta2)
    s: TensorList | None  # EMA of (g - m)^2    (beta2, AdaBelief)
    theta0: TensorList | None  # pretrained weights


@dataclass(frozen=True)
class Base:
    """A named base direction and the statistics it reads."""

    name: str
    needs: frozenset[str]
    fn: Callable[[TensorList, Moments, TensorList, Hyper, Scratch], tuple[TensorList, float]]
    doc: str


# Each base returns (tensors, scalar): its direction is tensors * scalar. Keeping the scalar apart lets the
# L3RS step fold it into the per-tensor coefficient instead of spending a pass over every element.
# The tensors are either the caller's own (grads, moments, params: read only) or new ones that nobody else
# reads (the step may overwrite those in place on its no-grad path).
Direction = tuple[TensorList, float]


class Workspace:
    """Parameter-sized scratch buffers that the optimizer reuses from step to step (CPU, no-grad path only).

    A fresh multi-MB tensor costs page faults on its first touch on CPU, several times an in-place pass over
    the same memory, so the optimizer keeps the few buffers one step needs alive. Not optimizer state: never
    saved, rebuilt on demand. The default base set borrows two buffers per step (see `functional.update`).
    """

    def __init__(self) -> None:
        self._buffers: list[TensorList] = []  # everything allocated (and kept) so far
        self._free: list[TensorList] = []  # not borrowed in the current step

    def reset(self) -> None:
        """Start a step: every buffer is free again (the previous step's results are dead)."""
        self._free = list(self._buffers)

    def take(self, like: TensorList) -> TensorList:
        """A free buffer shaped like `like`; allocated (once) when none fits."""
        for i, buf in enumerate(self._free):
            if _same_layout(buf, like):
                return self._free.pop(i)
        for stale in self._free:  # a different tensor subset than before: don't hoard its buffers
            self._buffers = [b for b in self._buffers if b is not stale]
        self._free = []
        buf = [torch.empty_like(t, memory_format=torch.preserve_format) for t in like]
        self._buffers.append(buf)
        return buf

    def give(self, tensors: TensorList) -> None:
        """Hand a borrowed buffer back early so the same step can reuse it (ignores anything else)."""
        if any(tensors is b for b in self._buffers) and not any(tensors is b for b in self._free):
            self._free.append(tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for buf in self._buffers for t in buf)


@dataclass
class Scratch:
    """What the bases of ONE step share (never kept across steps).

    workspace: fill reused buffers instead of fresh tensors (the optimizer's no-grad path on CPU).
    later: the bases still to come this step (None: unknown); the last reader of a shared intermediate may
        then overwrite it in place.
    roots: Adam-style denominators sqrt(stat) + eps, computed once per statistic ("v", "s") and shared.
    """

    workspace: Workspace | None = None
    later: tuple[str, ...] | None = None
    roots: dict[str, tuple[TensorList, float]] = field(default_factory=dict)


def _same_layout(a: TensorList, b: TensorList) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(a, b, strict=True))


def fresh(scratch: Scratch, foreach_op: Callable, op: Callable, *lists: TensorList, **kwargs) -> TensorList:
    """foreach_op(*lists, **kwargs) as new tensors the step owns. With a workspace in `scratch`, the same math
    runs per tensor (`op(..., out=)`) into a reused buffer: no fresh memory (torch has no foreach out=)."""
    workspace = scratch.workspace
    if workspace is None:
        return foreach_op(*lists, **kwargs)
    out = workspace.take(lists[0])
    for o, *xs in zip(out, *lists, strict=True):
        op(*xs, **kwargs, out=o)
    return out


def _may_overwrite(scratch: Scratch, stat: str) -> bool:
    """True when no base after the current one reads `stat`, so intermediates derived from it (kept in
    `scratch`) may be overwritten in place. Never under grad mode: autograd needs them."""
    later = scratch.later
    return later is not None and not torch.is_grad_enabled() and not any(stat in get(n).needs for n in later)


def _root(second: TensorList, step: int, hyper: Hyper, scratch: Scratch, key: str) -> tuple[TensorList, float]:
    """Adam's sqrt(second / bc2) + eps as (sqrt(second) + eps * sqrt(bc2), 1 / sqrt(bc2)).

    Computed once per step (adam and rmsprop share it through `scratch`), with the scalar kept apart so it
    costs no pass over the tensors."""
    if key not in scratch.roots:
        bc2_sqrt = math.sqrt(1 - hyper.beta2**step)
        if torch.is_grad_enabled():  # differentiable: clamp so d sqrt(v)/dv stays finite at v == 0
            root = torch._foreach_sqrt(torch._foreach_clamp_min(second, _SQRT_FLOOR))
            denom = torch._foreach_add(root, hyper.eps * bc2_sqrt)
        else:  # the optimizer's path: the same arithmetic in one buffer
            denom = fresh(scratch, torch._foreach_sqrt, torch.sqrt, second)
            torch._foreach_add_(denom, hyper.eps * bc2_sqrt)
        scratch.roots[key] = (denom, bc2_sqrt)
    return scratch.roots[key]


def _over_root(x: TensorList, stat: str, st: Moments, h: Hyper, scratch: Scratch) -> Direction:
    """x / (sqrt(stat_hat) + eps) as (tensors, bias-correction scalar). With a workspace, the last reader
    of the shared denominator divides into the denominator's own buffer instead of filling another one
    (an in-place pass costs about half a pass into separate memory)."""
    denom, bc2_sqrt = _root(getattr(st, stat), st.step, h, scratch, stat)
    if scratch.workspace is not None and _may_overwrite(scratch, stat):
        del scratch.roots[stat]
        for xi, di in zip(x, denom, strict=True):
            torch.div(xi, di, out=di)
        return denom, bc2_sqrt
    return fresh(scratch, torch._foreach_div, torch.div, x, denom), bc2_sqrt


def _sgd(g: TensorList, st: Moments, p: TensorList, h: Hyper, scratch: Scratch) -> Direction:
    return g, 1.0


def _momentum(g: TensorList, st: Moments, p: TensorList, h: Hyper, scratch: Scratch) -> Direction:
    return st.m, 1.0


def _nesterov(g: TensorList, st: Moments, p: TensorList, h: Hyper, scratch: Scratch) -> Direction:
    return fresh(scratch, torch._foreach_lerp, torch.lerp, g, st.m, weight=h.beta1), 1.0


def _adam(g: TensorList, st: Moments, p: TensorList, h: Hyper, scratch: Scratch) -> Direction:
    d, bc2_sqrt = _over_root(st.m, "v", st, h, scratch)
    return d, bc2_sqrt / (1 - h.beta1**st.step)


def _rmsprop(g: TensorList, st: Moments, p: TensorList, h: Hyper, scratch: Scratch) -> Direction:
    return _over_root(g, "v", st, h, scratch)


def _sign(g: TensorList, st: Moments, p: TensorList, h: Hyper, scratch: Scratch) -> Direction:
    return fresh(scratch, torch._foreach_sign, torch.sign, st.m), 1.0


def _adabelief(g: TensorList, st: Moments, p: TensorList, h: Hyper, scratch: Scratch) -> Direction:
    d, bc2_sqrt = _over_root(st.m, "s", st, h, scratch)
    return d, bc2_sqrt / (1 - h.beta1**st.step)


def _to_init(g: TensorList, st: Moments, p: TensorList, h: Hyper, scratch: Scratch) -> Direction:
    # theta - theta0: subtracting it pulls the weights back toward the pretrained ones.
    return fresh(scratch, torch._foreach_sub, torch.sub, p, st.theta0), 1.0


def newton_schulz(x: Tensor, iters: int = 5) -> Tensor:
    """Approximately orthogonalize a matrix (Muon's quintic iteration); differentiable."""
    a, b, c = 3.4445, -4.7750, 2.0315
    y = x / (x.norm() + 1e-7)
    transposed = y.shape[0] > y.shape[1]
    if transposed:
        y = y.T
    for _ in range(iters):
        gram = y @ y.T
        y = a * y + (b * gram + c * gram @ gram) @ y
    return y.T if transposed else y


def _ortho(g: TensorList, st: Moments, p: TensorList, h: Hyper, scratch: Scratch) -> Direction:
    # Matrices (conv kernels flattened to 2-D) get orthogonalized momentum; vectors fall back to momentum.
    return [newton_schulz(m.reshape(m.shape[0], -1)).reshape(m.shape) if m.dim() >= 2 else m for m in st.m], 1.0


_REGISTRY: dict[str, Base] = {}


def register(name: str, needs: Iterable[str], fn: Callable, doc: str) -> None:
    """Add a base direction (needs: subset of {"m", "v", "s", "theta0"})."""
    unknown = set(needs) - {"m", "v", "s", "theta0"}
    if unknown:
        raise ValueError(f"base {name!r} needs unknown statistics {sorted(unknown)}")
    _REGISTRY[name] = Base(name, frozenset(needs), fn, doc)


register("sgd", (), _sgd, "the gradient g")
register("momentum", ("m",), _momentum, "heavy-ball EMA of g (beta1)")
register("nesterov", ("m",), _nesterov, "Nesterov look-ahead beta1*m + (1-beta1)*g")
register("adam", ("m", "v"), _adam, "bias-corrected m_hat / (sqrt(v_hat) + eps)")
register("rmsprop", ("v",), _rmsprop, "g / (sqrt(v_hat) + eps)")
register("sign", ("m",), _sign, "sign of the momentum buffer (Lion-like)")
register("adabelief", ("m", "s"), _adabelief, "m_hat / (sqrt(s_hat) + eps), s = EMA of (g - m)^2")
register("to_init", ("theta0",), _to_init, "theta - theta0: a pull toward the pretrained weights")
register("ortho", ("m",), _ortho, "Newton-Schulz orthogonalized momentum for matrices (momentum otherwise)")

DEFAULT: tuple[str, ...] = ("sgd", "momentum", "adam", "rmsprop", "sign")


def available() -> list[str]:
    """Names of the registered base directions."""
    return list(_REGISTRY)


def get(name: str) -> Base:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown base direction {name!r}; available: {', '.join(available())}") from None


def needs(names: Iterable[str]) -> frozenset[str]:
    """Union of the statistics read by the given bases."""
    return frozenset().union(*(get(n).needs for n in names))


def init(params: TensorList, required: frozenset[str]) -> Moments:
    """Zero moments (and a copy of the pretrained weights) for the statistics in `required`."""

    def zeros() -> TensorList:
        return [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]

    return Moments(
        step=0,
        m=zeros() if "m" in required else None,
        v=zeros() if "v" in required else None,
        s=zeros() if "s" in required else None,
        theta0=[p.detach().clone() for p in params] if "theta0" in required else None,
    )


def update(grads: TensorList, stats: Moments, hyper: Hyper, inplace: bool = False) -> Moments:
    """Advance the shared moments by one gradient: pure, or overwriting `stats`' buffers if `inplace`."""
    m = v = s = None
    if stats.m is not None:
        if inplace:
            torch._foreach_lerp_(stats.m, grads, 1 - hyper.beta1)
            m = stats.m
        else:
            m = torch._foreach_lerp(stats.m, grads, 1 - hyper.beta1)
    if stats.v is not None:
        # mul + addcmul (not lerp) so the rounding matches torch.optim.Adam exactly.
        if inplace:
            torch._foreach_mul_(stats.v, hyper.beta2)
            torch._foreach_addcmul_(stats.v, grads, grads, value=1 - hyper.beta2)
            v = stats.v
        else:
            v = torch._foreach_addcmul(torch._foreach_mul(stats.v, hyper.beta2), grads, grads, value=1 - hyper.beta2)
    if stats.s is not None:
        diff = torch._foreach_sub(grads, m)
        s = torch._foreach_add(torch._foreach_lerp(stats.s, torch._foreach_mul(diff, diff), 1 - hyper.beta2),
                               hyper.eps)
        if inplace:
            torch._foreach_copy_(stats.s, s)
            s = stats.s
    return Moments(stats.step + 1, m, v, s, stats.theta0)


def scaled_direction(name: str, grads: TensorList, stats: Moments, params: TensorList, hyper: Hyper,
                     scratch: Scratch) -> Direction:
    """(tensors, scalar) with direction = tensors * scalar; one `Scratch` per step lets bases share
    intermediate results (e.g. Adam's denominator) and, on the optimizer's path, reuse buffers."""
    return get(name).fn(grads, stats, params, hyper, scratch)


def direction(name: str, grads: TensorList, stats: Moments, params: TensorList, hyper: Hyper) -> TensorList:
    """Base `name`'s direction from the already-updated moments."""
    tensors, scale = scaled_direction(name, grads, stats, params, hyper, Scratch())
    return tensors if scale == 1.0 else torch._foreach_mul(tensors, scale)
