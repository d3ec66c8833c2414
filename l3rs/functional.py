"""The L3RS step as pure functions, shared by meta-training (differentiable unrolls) and `l3rs.L3RS`.

For every tensor l (one named parameter):

    Δθ_l = −λ_l · Σ_p μ_{l,p} · d̂_{l,p} − λ0 · h(T) · g(N) · b(t/T) · wd · θ_l,
    d̂ = d / (rms(d) + 1e-12),     λ_l = λ0 · h(T) · g(N) · b(t/T) · exp(s_l)

with (s_l, μ_l) produced by the shared mixer MLP from the tensor's features and embedding (μ's logits plus, in
runs longer than T_ref, a share of the long runs' mix logits `long_mix`: `schedules.long_share`; both moved toward
the untrained optimizer's in such runs when the config has a `fallback`: `schedules.fall_back`), and b a fixed
base schedule over the run's progress t/T (warm-up, then cosine decay), h(T) = min(1, T_ref/T)^α the
step's shrinkage for runs longer than the meta-training horizon T_ref, g(N) = clamp(N/N_ref, 1/2, 1)^β its
shrinkage for training sets smaller than the one λ0 was swept on (`schedules.size_scale`): the mixer learns a
bounded deviation |s| <= max_log_scale from a schedule that is already sensible at any horizon T. With the default
step_budget="shared", s is shifted so that Σ_l numel_l · exp(2 s_l) = Σ_l numel_l: the mixer redistributes
the step over tensors and the model-wide RMS step stays λ0 · h(T) · g(N) · b(t/T); then a floor, s >= min_log_scale.
wd is AdamW's decoupled weight decay (`Config.weight_decay`, 0.01 as AdamW's default), scaled by the
scheduled step.

    state = init(config, params)
    updates, state, coeffs = update(config, meta, grads, state, params, lr=λ0, loss=..., total_steps=...,
                                    train_size=...)
    params = apply_updates(params, updates)

`update` is pure and differentiable (meta-training). `update_` runs the very same math on the optimizer's
fast path: it overwrites the moment buffers and may fill reused scratch buffers; the optimizer class adds
the returned updates in place and keeps the returned state.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from l3rs import bases as base_lib
from l3rs import features, mixer
from l3rs.schedules import fall_back, head_ramp, long_share, run_scale, schedule

TensorList = list[Tensor]
_MIXES = ("softmax", "linear")
_SCOPES = ("tensor", "global")
_FEATURES = ("all", "none")
SCHEDULES = ("cosine", "linear", "constant")
# "rms": every direction to unit RMS per tensor at every step (the paper); "snr": unit RMS times the RMS of
# the Adam direction m̂/(√v̂+ε) of the same tensor, which shrinks as noise takes over the gradient (Adam's own
# annealing, which "rms" removes: long runs then keep stepping at full size); "none": raw directions
NORMALIZATIONS = ("rms", "snr", "none")
STEP_BUDGETS = ("shared", "free")
# A prior that leans on one base gives it this share of the untrained mix: close to that base alone, yet far
# enough from a saturated softmax that meta-training can still move the mix
LEAN_WEIGHT = 0.95


@dataclass(frozen=True)
class Config:
    """Everything that defines an L3RS optimizer besides its meta-parameters (saved in optimizer.json)."""

    bases: tuple[str, ...] = base_lib.DEFAULT
    normalize: str = "rms"  # one of NORMALIZATIONS (True / False are read as "rms" / "none")
    mix: str = "softmax"  # "softmax": convex mix; "linear": signed weights starting uniform
    features: str = "all"  # "all" | "none" (ablation: a learned constant per tensor)
    scope: str = "tensor"  # "tensor" | "global" (ablation: one set of coefficients for all tensors)
    distance_feature: bool | None = None  # log ||θ−θ0||/||θ0||; None -> on iff "to_init" is a base
    hidden: int = 32
    depth: int = 2
    embed_dim: int = 8
    max_log_scale: float = 3.0  # s is soft-clipped to ±this: λ deviates from the schedule by e^±3 at most
    schedule: str = "cosine"  # base schedule b(t/T): "cosine" | "linear" decay after warm-up, or "constant"
    warmup: float = 0.05  # fraction of the run spent warming b up linearly (cosine / linear schedules)
    # > 0: the pretrained backbone's tensors also ramp their λ0 up linearly over this fraction of the run while
    # the new head's (the tensors named as head) step at once, so the head fits the features before they move
    # (`head_ramp`; 0, or no tensor named as head: every tensor alike)
    backbone_warmup: float = 0.0
    # "shared": the mixer only redistributes the step across tensors, the model-wide RMS step stays
    # λ0·b(t/T) (truncated meta-gradients otherwise shrink every λ: short-horizon bias); "free": each λ_l
    # moves on its own within e^±max_log_scale
    step_budget: str = "shared"
    # after the budget, no tensor steps below e^this of the schedule (None: no floor). Weighted by size, the
    # budget lets truncated meta-gradients park every small tensor (the new head's too) at 0.003x at no cost
    min_log_scale: float | None = -1.0
    reference_horizon: int | None = None  # meta-training horizon: feeds the log(T / T_ref) feature
    # α: runs longer than the reference horizon T_ref step with λ0 · (T_ref / T)^α (fitted by meta-training
    # from λ0 sweeps at 1x and 4x; longer fine-tuning runs overfit at the λ0 that is best for short ones)
    horizon_exponent: float = 0.0
    # the training examples λ0 was swept on, and β: smaller training sets (N < N_ref) step with λ0 · (N / N_ref)^β,
    # N / N_ref floored at 1/2 (`schedules.size_scale`; β fitted by meta-training from a λ sweep on half the
    # training set: a small set is fitted too soon at the large set's λ0)
    reference_train_size: int | None = None
    size_exponent: float = 0.0
    # > 0: the weights to evaluate are an average of the iterates, an EMA over this fraction of the run
    # (`averaging.average_update`): trained weights keep moving at full step, evaluated ones are always settled
    average: float = 0.0
    # decoupled weight decay, as AdamW's (and at its default): every step also moves each weight by
    # −λ0·h(T)·b(t/T)·weight_decay·θ, the scheduled step without the learned per-tensor factor (which can
    # differ by e^±3 across tensors and would make the decay's strength unpredictable)
    weight_decay: float = 0.01
    # the untrained optimizer's mixer output (log step scale, P mix logits, P long-run mix logits) that runs longer
    # than T_ref move to (`schedules.fall_back`), set by meta-training when its kept checkpoint beats that optimizer
    # below 2x only (`MetaConfig.long_fallback`); None: the mixer's output at every length
    fallback: tuple[float, ...] | None = None
    hyper: base_lib.Hyper = field(default_factory=base_lib.Hyper)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bases", tuple(self.bases))
        if isinstance(self.normalize, bool):
            object.__setattr__(self, "normalize", "rms" if self.normalize else "none")
        if not self.bases:
            raise ValueError("bases must name at least one base direction")
        for name in self.bases:
            base_lib.get(name)
        if len(set(self.bases)) != len(self.bases):
            raise ValueError(f"bases contains duplicates: {self.bases}")
        for key, value, allowed in (("normalize", self.normalize, NORMALIZATIONS), ("mix", self.mix, _MIXES),
                                    ("scope", self.scope, _SCOPES), ("features", self.features, _FEATURES),
                                    ("schedule", self.schedule, SCHEDULES),
                                    ("step_budget", self.step_budget, STEP_BUDGETS)):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
        if self.normalize == "snr" and "adam" not in self.bases:
            raise ValueError('normalize="snr" scales every direction by the Adam direction\'s RMS: add "adam" '
                             f'to bases {self.bases} or pick normalize="rms"')
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a fraction of the run in [0, 1), got {self.warmup!r}")
        if not 0 <= self.backbone_warmup < 1:
            raise ValueError(f"backbone_warmup must be a fraction of the run in [0, 1), got {self.backbone_warmup!r}")
        if not self.max_log_scale > 0:
            raise ValueError(f"max_log_scale must be positive, got {self.max_log_scale!r}")
        if self.min_log_scale is not None and not -math.inf < self.min_log_scale <= 0:
            raise ValueError(f"min_log_scale must be finite and <= 0 (None: no floor), got {self.min_log_scale!r}")
        if not 0 <= self.average <= 1:
            raise ValueError(f"average must be a fraction of the run in [0, 1] (0: off), got {self.average!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay!r}")
        for key in ("horizon_exponent", "size_exponent"):
            if not (getattr(self, key) >= 0 and math.isfinite(getattr(self, key))):
                raise ValueError(f"{key} must be finite and >= 0, got {getattr(self, key)!r}")
        if self.reference_train_size is not None and self.reference_train_size <= 0:
            raise ValueError(f"reference_train_size must be positive or None, got {self.reference_train_size!r}")
        if isinstance(self.hyper, dict):
            object.__setattr__(self, "hyper", base_lib.Hyper(**self.hyper))
        if self.fallback is not None:
            object.__setattr__(self, "fallback", tuple(float(v) for v in self.fallback))
            if len(self.fallback) != 1 + 2 * len(self.bases):
                raise ValueError(f"fallback holds 1 + 2 x {len(self.bases)} bases numbers (log step scale, mix "
                                 f"logits, long-run mix logits), got {len(self.fallback)}")

    @property
    def use_distance(self) -> bool:
        return "to_init" in self.bases if self.distance_feature is None else self.distance_feature

    @property
    def num_features(self) -> int:
        return features.num_features(self.use_distance)

    @property
    def needs(self) -> frozenset[str]:
        return base_lib.needs(self.bases) | ({"theta0"} if self.use_distance else frozenset())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bases"] = list(self.bases)
        if self.fallback is not None:
            d["fallback"] = list(self.fallback)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        # saved before step_budget / weight_decay / min_log_scale existed: free λ, no decay, no floor (as then)
        return cls(**{"step_budget": "free", "weight_decay": 0.0, "min_log_scale": None, **d})

    def init_meta(self, num_tensors: int, seed: int = 0, lean: str | None = None,
                  long_lean: str | None = None) -> mixer.Meta:
        """Fresh meta-parameters for `num_tensors` tensors (one embedding row when scope == "global"): a uniform
        mix, or one that gives the base named `lean` LEAN_WEIGHT of it (the others share the rest alike); with
        `long_lean` ("uniform" or a base), long runs move to that mix instead (`schedules.long_share`)."""
        rows = 1 if self.scope == "global" else num_tensors
        meta = mixer.init(rows, self.num_features, len(self.bases), self.hidden, self.depth, self.embed_dim, seed)
        meta[f"layers.{self.depth}.bias"][1:] = self._mix_bias(lean)  # after the log step scale
        if long_lean is not None:
            meta["long_mix"] = self._mix_bias(long_lean) - self._mix_bias(lean)
        return meta

    def _mix_bias(self, lean: str | None) -> Tensor:
        """The mix logits of the untrained optimizer leaning on `lean` (None or "uniform": every base alike)."""
        p = len(self.bases)
        bias = torch.zeros(p)
        if lean in (None, "uniform") or p == 1:
            return bias
        if lean not in self.bases:
            raise ValueError(f"cannot lean on {lean!r}: it is not one of the bases {self.bases}")
        rest = (1 - LEAN_WEIGHT) / (p - 1)
        if self.mix == "softmax":
            bias[self.bases.index(lean)] = math.log(LEAN_WEIGHT / rest)
        else:  # linear: weight = logit + 1/P
            bias[:] = rest - 1 / p
            bias[self.bases.index(lean)] = LEAN_WEIGHT - 1 / p
        return bias


class State(NamedTuple):
    moments: base_lib.Moments
    features: features.FeatureState


class Coefficients(NamedTuple):
    lr: Tensor  # [T] step size λ per tensor
    mix: Tensor  # [T, P] mixing weights μ per tensor
    grad_rms: Tensor  # [T] (detached) — lets callers spot non-finite gradients without another pass


def init(config: Config, params: TensorList) -> State:
    return State(base_lib.init(params, config.needs), features.init())


def _rms(xs: TensorList, sqrt_numel: Tensor) -> Tensor:
    return torch.stack(torch._foreach_norm(xs)) / sqrt_numel


def _index(config: Config, num_tensors: int, device: torch.device) -> Tensor | None:
    return torch.zeros(num_tensors, dtype=torch.long, device=device) if config.scope == "global" else None


def feature_matrix(config: Config, fs: features.FeatureState, step: int, total_steps: int | None,
                   num_tensors: int, device: torch.device) -> Tensor:
    """The mixer's input rows for the current feature state (zeros under the no-features ablation)."""
    x = features.featurize(fs, step, total_steps, num_tensors, config.use_distance, config.reference_horizon,
                           device=device)
    if config.scope == "global":  # one set of coefficients: feed the tensor-averaged features
        x = x.mean(0, keepdim=True).expand(num_tensors, -1)
    return torch.zeros_like(x) if config.features == "none" else x


def coefficients(config: Config, meta: mixer.Meta, x: Tensor, lr: Tensor | float, step: int = 0,
                 total_steps: int | None = None, sizes: Tensor | None = None,
                 train_size: int | None = None) -> tuple[Tensor, Tensor]:
    """(λ [T], μ [T, P]) from the feature rows at update `step` of a `total_steps` run on `train_size` training
    examples; `sizes` (numel per tensor) weighs the tensors when the step budget is shared."""
    s, logits = mixer.apply(meta, x, _index(config, x.shape[0], x.device))
    share = long_share(config, total_steps)
    if share:  # the long runs' prior, in by log T (runs up to the horizon skip it: nothing to add)
        logits = logits + share * meta["long_mix"]
    s, logits = fall_back(config, s, logits, share, total_steps)  # raw: the blend then meets the budget and floor
    s = config.max_log_scale * torch.tanh(s / config.max_log_scale)
    if config.step_budget == "shared":  # Σ n_l e^{2 s_l} = Σ n_l: the RMS step over all elements is λ0·b
        weights = torch.ones_like(s) if sizes is None else sizes.to(s.dtype)
        s = s - 0.5 * (torch.logsumexp(2 * s + weights.log(), 0) - weights.sum().log())
    if config.min_log_scale is not None:
        s = s.clamp_min(config.min_log_scale)
    mix = torch.softmax(logits, dim=-1) if config.mix == "softmax" else logits + 1.0 / logits.shape[-1]
    return lr * schedule(config, step, total_steps) * run_scale(config, total_steps, train_size) * torch.exp(s), mix


def _scale(config: Config, base_scale: Tensor, d: TensorList, factor: float, grads: TensorList,
           grad_rms: Tensor, sqrt_numel: Tensor, snr: Tensor | None) -> Tensor:
    """Per-tensor coefficients c [T] with this base's contribution = c_l * d_l (factor folded in)."""
    if config.normalize == "none":
        return (base_scale * factor).to(d[0].dtype)
    # rms(factor * d) = factor * rms(d): the factor cancels
    scale = base_scale / ((grad_rms if d is grads else _rms(d, sqrt_numel)) + 1e-12 / factor)
    return (scale if snr is None else scale * snr).to(d[0].dtype)


def _accumulate(updates: TensorList | None, d: TensorList, scale: Tensor, owned: bool,
                scratch: base_lib.Scratch) -> TensorList:
    """updates + d * scale. Under no_grad it reuses memory: an `owned` d (computed this step, read by
    nobody else) is scaled in place to become the sum, or handed back to the workspace once added."""
    if torch.is_grad_enabled():  # differentiable: nothing in place, 0-dim tensor coefficients
        scale = list(scale.unbind())
        return torch._foreach_mul(d, scale) if updates is None else torch._foreach_addcmul(updates, d, scale)
    workspace = scratch.workspace
    # With a workspace (CPU) the coefficients become Python floats: per-tensor add_(alpha=) is a lighter
    # pass than addcmul_ with a broadcast 0-dim tensor, and .tolist() costs no device sync there.
    scale = list(scale.unbind()) if workspace is None else scale.tolist()
    if updates is None:
        if owned:
            torch._foreach_mul_(d, scale)
            return d
        return base_lib.fresh(scratch, torch._foreach_mul, torch.mul, d, scale)
    if workspace is None:
        torch._foreach_addcmul_(updates, d, scale)
        return updates
    for u, x, c in zip(updates, d, scale, strict=True):
        u.add_(x, alpha=c)
    if owned:
        workspace.give(d)
    return updates


def update(config: Config, meta: mixer.Meta, grads: TensorList, state: State, params: TensorList, *,
           lr: Tensor | float, loss: Tensor | float | None = None, total_steps: int | None = None,
           weight_decay: Tensor | float | None = None, head: Tensor | None = None,
           train_size: int | None = None) -> tuple[TensorList, State, Coefficients]:
    """One L3RS step, pure: returns (updates to add to params, new state, coefficients used).

    `weight_decay` (a float or one per tensor; None: `config.weight_decay`) decays each weight by its
    scheduled step; `head` (bool per tensor, or None) marks the new head's tensors (`head_ramp`); `train_size`
    (the run's training examples, None: unknown) scales λ0 by `schedules.size_scale`. Nothing is
    mutated; differentiable w.r.t. `meta` (and `grads` when they carry a graph). This is what meta-training
    unrolls."""
    return _step(config, meta, grads, state, params, lr, loss, (total_steps, train_size), weight_decay, head,
                 inplace=False, workspace=None)


def update_(config: Config, meta: mixer.Meta, grads: TensorList, state: State, params: TensorList, *,
            lr: Tensor | float, loss: Tensor | float | None = None, total_steps: int | None = None,
            weight_decay: Tensor | float | None = None, head: Tensor | None = None,
            workspace: base_lib.Workspace | None = None,
            train_size: int | None = None) -> tuple[TensorList | None, State, Coefficients | None]:
    """The same step on the optimizer's fast path (call it under no_grad): the moment buffers in `state` are
    OVERWRITTEN and returned in the new state; a non-finite gradient returns (None, state, None) before
    touching anything. With a `workspace`, intermediates and the returned updates live in its reused buffers
    (valid until its next step) instead of fresh tensors."""
    return _step(config, meta, grads, state, params, lr, loss, (total_steps, train_size), weight_decay, head,
                 inplace=True, workspace=None if torch.is_grad_enabled() else workspace)


def _decay_scale(config: Config, lr: Tensor | float, weight_decay: Tensor | float | None, step: int,
                 run: tuple[int | None, int | None], like: Tensor) -> Tensor | None:
    """Per-tensor coefficient c [T] of the decoupled decay term c·θ (None: no decay)."""
    decay = config.weight_decay if weight_decay is None else weight_decay
    if not isinstance(decay, Tensor) and not decay:
        return None
    scheduled = schedule(config, step, run[0]) * run_scale(config, *run)
    return -torch.as_tensor(lr, dtype=like.dtype, device=like.device) * scheduled * decay * torch.ones_like(like)


def _step(config: Config, meta: mixer.Meta, grads: TensorList, state: State, params: TensorList,
          lr: Tensor | float, loss: Tensor | float | None, run: tuple[int | None, int | None],
          weight_decay: Tensor | float | None, head: Tensor | None, inplace: bool,
          workspace: base_lib.Workspace | None) -> tuple[TensorList | None, State, Coefficients | None]:
    """The one implementation of the math behind `update` (pure) and `update_` (in place); `run` is the run's
    (total_steps, train_size)."""
    total_steps, train_size = run
    device = params[0].device
    ramp = head_ramp(config, state.moments.step, total_steps, head)
    if isinstance(ramp, Tensor):  # the decay ramps alike
        lr = lr * ramp
    sqrt_numel = torch.tensor([math.sqrt(p.numel()) for p in params], dtype=grads[0].dtype, device=device)
    grad_rms_raw = _rms(grads, sqrt_numel)
    grad_rms = grad_rms_raw.detach()
    if inplace and not bool(torch.isfinite(grad_rms).all()):
        return None, state, None
    moments = base_lib.update(grads, state.moments, config.hyper, inplace=inplace)
    distance = None
    if config.use_distance:
        moved = torch.stack(torch._foreach_norm(torch._foreach_sub(params, moments.theta0)))
        distance = moved / torch.stack(torch._foreach_norm(moments.theta0)).clamp_min(1e-12)
    fs = features.observe(state.features, loss, grad_rms, _rms(params, sqrt_numel), distance)
    x = feature_matrix(config, fs, state.moments.step, total_steps, len(params), device)
    lam, mix = coefficients(config, meta, x, lr, state.moments.step, total_steps, sqrt_numel.square(), train_size)
    base_scale = -lam.unsqueeze(-1) * mix  # [T, P]

    # Directions computed this step are summed first (the first one becomes the sum, each later one frees
    # its buffer), the caller's own tensors (g, m, ...) last: with a workspace the default bases need two
    # scratch buffers. Every path sums in this order, so meta-training and the optimizer round alike.
    if workspace is not None:
        workspace.reset()
    scratch = base_lib.Scratch(workspace)
    borrowed = {id(t) for ts in (grads, params, *moments[1:]) if ts is not None for t in ts}
    updates: TensorList | None = None
    snr: Tensor | None = None  # normalize="snr": the Adam direction's RMS per tensor (Adam goes first)
    order = sorted(range(len(config.bases)), key=lambda p: config.normalize == "snr" and config.bases[p] != "adam")
    names = tuple(config.bases[p] for p in order)
    deferred = []
    for k, (p, name) in enumerate(zip(order, names, strict=True)):
        scratch.later = names[k + 1 :]
        d, factor = base_lib.scaled_direction(name, grads, moments, params, config.hyper, scratch)
        if any(id(t) in borrowed for t in d):
            deferred.append((p, d, factor))
            continue
        if config.normalize == "snr" and name == "adam":  # unit RMS times its own RMS: Adam as it is
            snr = factor * _rms(d, sqrt_numel)
            scale = (base_scale[:, p] * factor).to(d[0].dtype)
        else:
            scale = _scale(config, base_scale[:, p], d, factor, grads, grad_rms_raw, sqrt_numel, snr)
        updates = _accumulate(updates, d, scale, True, scratch)
    for p, d, factor in deferred:
        scale = _scale(config, base_scale[:, p], d, factor, grads, grad_rms_raw, sqrt_numel, snr)
        updates = _accumulate(updates, d, scale, False, scratch)
    decay = _decay_scale(config, lr, weight_decay, state.moments.step, run, lam.detach())
    if decay is not None:  # last, after every direction: both paths sum in the same order
        updates = _accumulate(updates, params, decay.to(params[0].dtype), False, scratch)
    return updates, State(moments, fs), Coefficients(lam, mix, grad_rms)


def apply_updates(params: TensorList, updates: TensorList) -> TensorList:
    """params + updates (pure; use torch._foreach_add_ for in place)."""
    return torch._foreach_add(params, updates)
