"""`L3RS`, the drop-in torch.optim.Optimizer.

The math lives in `l3rs.functional`; this class only gathers tensors, calls `functional.update_` under
no_grad, adds the updates in place (`torch._foreach_add_`) and keeps the returned state. The on-disk format
of a meta-trained optimizer lives in `l3rs.checkpoint`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from l3rs import averaging, features, functional, mixer
from l3rs import params as params_lib
from l3rs.checkpoint import CheckpointError, check_meta, load_meta, match_embedding, save_meta, with_long_mix
from l3rs.functional import Config

__all__ = ["L3RS", "CheckpointError", "load_meta", "save_meta"]

_GLOBAL = "l3rs"  # key of the optimizer-wide entry in self.state (step, feature EMAs, skipped steps)
_SAVED_GLOBAL = "l3rs_state"  # where state_dict() keeps that entry: in param_groups[0], as Prodigy or
# schedule-free keep their optimizer-wide values, so tools that map state keys to parameters accept it


def _clone(value: Any, device: torch.device | None = None) -> Any:
    """Deep copy of tensors in nested dicts (moment buffers are updated in place), optionally onto `device`."""
    if isinstance(value, Tensor):
        return value.clone() if device is None else value.to(device, copy=True)
    if isinstance(value, dict):
        return {k: _clone(v, device) for k, v in value.items()}
    return value


class L3RS(torch.optim.Optimizer):
    """Learned layer-wise mix of base directions with a learned per-tensor step size (arXiv 2408.09310).

    Args:
        params: ``model.named_parameters()`` or param groups of (name, tensor) pairs. Tensors that do not
            require grad are skipped. All tensors must live on one device.
        lr: λ0, the base step size; an untrained L3RS steps every tensor by ``lr`` times the base schedule
            (per element, with ``normalize=True``) along the uniform mix of its base directions.
        total_steps: the run's horizon, fed to the mixer as training progress (None: unknown).
        train_size: how many training examples the run fine-tunes on (None: unknown). A meta-trained optimizer
            steps with λ0 · (train_size / N_ref)^β on a training set smaller than the N_ref examples its λ0 was
            swept on (β fitted by meta-training, `Config.size_exponent`); untrained, it changes nothing.
        weight_decay: decoupled (AdamW-style) decay, per group; None (default): the optimizer's own,
            ``config.weight_decay`` (0.01 as AdamW's, what meta-training trained with; 0 for optimizers saved
            before it existed). Each step moves the weights by ``-lr * b(t / total_steps) * weight_decay * θ``:
            the group's λ0 on the base schedule, not the learned per-tensor λ (which can differ by e^±3 across
            tensors and would make the decay's strength unpredictable). It does not feed the features.
        bases, normalize, mix, schedule: see `l3rs.functional.Config`. The untrained optimizer steps by
            ``lr * b(t / total_steps)`` with b the base schedule (default: short warm-up, then cosine decay;
            ``schedule="constant"`` keeps λ = lr; without ``total_steps`` it is constant too).
        average: > 0 keeps an average of the weights (an EMA over that fraction of the run, `Config.average`)
            that ``eval()`` puts into the parameters and ``train()`` takes out again, as schedule-free
            optimizers do: call ``eval()`` before evaluating or saving the model, ``train()`` before stepping.
        unknown: what to do with tensors a pretrained optimizer has no embedding for: "error" or
            "mean" (use the mean embedding).
        average_loss: under an initialized process group with several ranks, average the loss that feeds
            the features over the ranks (one scalar all-reduce per step) so that DDP replicas take identical
            steps. Every rank must then give a loss (or none) at every step. False: each rank uses its own.
        state_dtype: dtype of the moment buffers and of the step's arithmetic, e.g. ``torch.float32`` for
            bf16/fp16 weights (None: the parameters' dtype). Costs one cast of weights and gradients per step.
        config, meta: a full `Config` and meta-parameters (what `from_pretrained` passes).
        head: names of the tensors that are new (a freshly initialized head) rather than pretrained. With
            ``config.backbone_warmup`` > 0 (``l3rs meta-train --backbone-warmup F``), these step at once while
            the others ramp up over that fraction of the run; `from_pretrained` takes the names the optimizer
            was meta-trained with. None: every tensor alike.
        seed: seeds the (untrained) mixer's hidden layers and embeddings.

    ``step(closure)`` or ``step(loss=loss.detach())`` feeds the loss features; trainers that call a bare
    ``step()`` feed it with `observe_loss` instead. Without any loss they keep their last value. A step with
    a non-finite gradient changes nothing and counts in ``skipped_steps``. ``add_param_group`` after
    construction is refused (build the optimizer over every tensor you will train).

    Memory: the optimizer state is AdamW's two buffers per parameter (the default bases) plus O(number of
    tensors). On CPU a step also reuses a scratch workspace (not state, never saved) so it does not
    page-fault fresh memory every step: two parameter-sized buffers with the default bases (one more per
    extra shared denominator, e.g. adabelief). On CUDA there is none: the caching allocator serves fresh
    buffers cheaply.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        total_steps: int | None = None,
        *,
        train_size: int | None = None,
        weight_decay: float | None = None,
        bases: Iterable[str] | None = None,
        normalize: bool = True,
        mix: str = "softmax",
        schedule: str = "cosine",
        average: float = 0.0,
        unknown: str = "error",
        average_loss: bool = True,
        state_dtype: torch.dtype | None = None,
        config: Config | None = None,
        meta: mixer.Meta | None = None,
        head: Iterable[str] | None = None,
        seed: int = 0,
        _saved: dict[str, Any] | None = None,
    ) -> None:
        params_lib.check_arguments(lr, total_steps, unknown, weight_decay, train_size)
        config = params_lib.build_config(config, bases, normalize, mix, schedule, average)
        self._built = False
        super().__init__(params_lib.named(params), {"lr": lr, "weight_decay": weight_decay})
        self.config = config
        self.total_steps, self.average_loss, self.state_dtype = total_steps, average_loss, state_dtype
        self.train_size = train_size
        self._params, self.param_names = params_lib.trainable(self.param_groups)
        device = params_lib.one_device(self._params, self.param_names)
        self.meta = self._resolve_meta(meta, _saved, unknown, seed, device)
        self._head = params_lib.head_mask(self.param_names, head, device)
        # Scratch buffers reused across steps (not state: never saved). Only on CPU, where fresh multi-MB
        # tensors page-fault; CUDA's caching allocator makes fresh ones cheap and its fused foreach kernels
        # beat the per-tensor loops that filling existing buffers needs.
        self._workspace = functional.base_lib.Workspace() if device.type == "cpu" else None
        self._per_tensor_cache: tuple[Any, tuple[Tensor, Tensor | float] | None] = (None, None)
        self._observed: list[Tensor] = []
        self._init_state()
        self._built = True

    def _resolve_meta(self, meta: mixer.Meta | None, saved: dict[str, Any] | None, unknown: str, seed: int,
                      device: torch.device) -> mixer.Meta:
        if meta is None:
            meta = self.config.init_meta(len(self._params), seed)
        elif saved is not None:
            meta = match_embedding(meta, saved, self.param_names, [tuple(p.shape) for p in self._params],
                                   unknown, self.config.scope)
        meta = with_long_mix(meta, self.config)
        check_meta(meta, self.config, len(self._params))
        return {k: v.detach().to(device=device, dtype=torch.float32).clone() for k, v in meta.items()}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._built:  # the mixer's embedding table and feature state are sized at construction
            raise NotImplementedError(
                "L3RS does not support add_param_group after construction: create the L3RS over every tensor "
                "you will train (e.g. set requires_grad before building it, or build a new L3RS)")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        params_lib.check_group_options(group["lr"], group["weight_decay"],
                                       f" of param group {len(self.param_groups) - 1}")

    # --------------------------------------------------------------------------------------- state
    def _init_state(self) -> None:
        st = functional.init(self.config, self._compute_dtype(self._params))
        for i, p in enumerate(self._params):
            self.state[p] = {k: getattr(st.moments, k)[i] for k in ("m", "v", "s", "theta0")
                             if getattr(st.moments, k) is not None}
            if self.config.average:
                self.state[p]["average"] = p.detach().clone()
        self.state[_GLOBAL] = {"step": 0, "skipped_steps": 0, "features": {}, "evaluating": False}

    def _compute_dtype(self, tensors: list[Tensor]) -> list[Tensor]:
        """`tensors` in `state_dtype` (the same objects when they already are)."""
        dtype = self.state_dtype
        return tensors if dtype is None or all(t.dtype == dtype for t in tensors) else [t.to(dtype) for t in tensors]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was NaN or infinite."""
        return self.state[_GLOBAL]["skipped_steps"]

    @property
    def step_count(self) -> int:
        return self.state[_GLOBAL]["step"]

    def _feature_state(self, rows: list[int] | None) -> features.FeatureState:
        saved = self.state[_GLOBAL]["features"]
        out = []
        for key in features.FeatureState._fields:
            value = saved.get(key)
            per_tensor = value is not None and key not in ("loss_ema", "loss_ref")
            out.append(value[rows] if per_tensor and rows is not None else value)
        return features.FeatureState(*out)

    def _store_features(self, fs: features.FeatureState, rows: list[int] | None) -> None:
        old = self.state[_GLOBAL]["features"]
        new = {}
        for key, value in fs._asdict().items():
            if value is None:
                continue
            if rows is not None and key not in ("loss_ema", "loss_ref"):
                base = old.get(key)
                if base is None:  # first sighting of some tensors: unseen rows start from these values
                    base = value.new_zeros((len(self._params), *value.shape[1:]))
                value = base.index_copy(0, torch.tensor(rows, device=value.device), value)
            new[key] = value
        self.state[_GLOBAL] = {**self.state[_GLOBAL], "features": new}

    def _moments(self, params: list[Tensor]) -> functional.base_lib.Moments:
        def field(key: str) -> list[Tensor] | None:
            return [self.state[p][key] for p in params] if key in self.state[params[0]] else None

        return functional.base_lib.Moments(self.step_count, field("m"), field("v"), field("s"), field("theta0"))

    def _per_tensor(self) -> tuple[Tensor, Tensor | float]:
        """(λ0, weight decay) per tensor (decay 0.0 when no tensor decays: the step skips the term); rebuilt
        only when a group's lr or decay changed (e.g. by a scheduler)."""
        key = tuple((g["lr"], g["weight_decay"]) for g in self.param_groups)
        if self._per_tensor_cache[0] != key:
            rows = [(g["lr"], self.config.weight_decay if g["weight_decay"] is None else g["weight_decay"])
                    for g in self.param_groups for p in g["params"] if p.requires_grad]
            values = torch.tensor(rows, dtype=torch.float32, device=self._params[0].device)
            decay = values[:, 1] if any(wd for _, wd in rows) else 0.0
            self._per_tensor_cache = (key, (values[:, 0], decay))
        return self._per_tensor_cache[1]

    # ---------------------------------------------------------------------------------------- loss
    def observe_loss(self, loss: Tensor | float) -> None:
        """Feed the loss features for the next `step()` that gets no loss itself (trainers that call a bare
        ``step()``). Several calls before one step (gradient accumulation) are averaged. The features are
        relative to the first loss seen, so a constant factor (e.g. a loss divided by the accumulation
        count) does not matter, as long as it stays the same."""
        value = loss.detach() if isinstance(loss, Tensor) else torch.tensor(float(loss))
        self._observed.append(value.float().reshape(()))

    def _step_loss(self, loss: Tensor | float | None) -> Tensor | float | None:
        """The loss that feeds this step's features: given, else observed, averaged over ranks."""
        observed, self._observed = self._observed, []
        if loss is None and observed:
            loss = torch.stack([x.to(observed[0].device) for x in observed]).mean()
        loss = loss.detach() if isinstance(loss, Tensor) else loss
        if loss is None or not self.average_loss or not dist.is_initialized() or dist.get_world_size() == 1:
            return loss
        total = torch.as_tensor(loss, dtype=torch.float32, device=self._params[0].device).clone().reshape(())
        dist.all_reduce(total)  # SUM: every backend has it (gloo has no AVG)
        return total / dist.get_world_size()

    # ---------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Any = None, loss: Tensor | float | None = None) -> Any:
        """One L3RS update; returns the closure's loss (or `loss`) like torch.optim optimizers do."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.state[_GLOBAL].get("evaluating"):
            raise RuntimeError("L3RS.step() while the parameters hold the averaged weights: call train() first")
        feature_loss = self._step_loss(loss)
        rows = [i for i, p in enumerate(self._params) if p.grad is not None]
        if not rows:
            return loss
        params = [self._params[i] for i in rows]
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("L3RS does not support sparse gradients")
        subset = None if len(rows) == len(self._params) else rows
        meta = self.meta if subset is None or self.config.scope == "global" else {
            **self.meta, "embedding": self.meta["embedding"][subset]}
        state = functional.State(self._moments(params), self._feature_state(subset))
        lr, decay = self._per_tensor()
        head = self._head
        if subset is not None:
            lr, decay = lr[rows], decay[rows] if isinstance(decay, Tensor) else decay
            head = None if head is None else head[rows]
        updates, new, _ = functional.update_(
            self.config, meta, self._compute_dtype(grads), state, self._compute_dtype(params), lr=lr,
            loss=feature_loss, total_steps=self.total_steps, weight_decay=decay, head=head, workspace=self._workspace,
            train_size=self.train_size)
        if updates is None:  # non-finite gradient: nothing was touched
            self.state[_GLOBAL] = {**self.state[_GLOBAL], "skipped_steps": self.skipped_steps + 1}
            return loss
        torch._foreach_add_(params, updates)
        if self.config.average:
            averaging.average_update(self.config, [self.state[p]["average"] for p in params], params,
                                     new.moments.step, self.total_steps, inplace=True)
        self._store_features(new.features, subset)
        self.state[_GLOBAL] = {**self.state[_GLOBAL], "step": new.moments.step}
        return loss

    @torch.no_grad()
    def eval(self) -> None:
        """Put the averaged weights into the parameters (with `average`; otherwise nothing to do)."""
        self._swap(evaluating=True)

    @torch.no_grad()
    def train(self) -> None:
        """Put the trained weights back into the parameters after `eval()`."""
        self._swap(evaluating=False)

    def _swap(self, evaluating: bool) -> None:
        if not self.config.average or bool(self.state[_GLOBAL].get("evaluating")) == evaluating:
            return
        for p in self._params:
            average = self.state[p]["average"]
            held = p.detach().clone()
            p.copy_(average)
            average.copy_(held)
        self.state[_GLOBAL] = {**self.state[_GLOBAL], "evaluating": evaluating}

    # -------------------------------------------------------------------------------- introspection
    @torch.no_grad()
    def coefficients(self) -> dict[str, dict[str, Any]]:
        """Current {param_name: {"lr": λ, "mix": {base: μ}}}, from the features as they stand now."""
        lam, mix = self._coefficients()
        return {
            name: {"lr": float(lam[i]), "mix": {b: float(mix[i, j]) for j, b in enumerate(self.config.bases)}}
            for i, name in enumerate(self.param_names)
        }

    @torch.no_grad()
    def learned_lr(self) -> list[float]:
        """Mean learned λ per param group (nan for a group with nothing to train), from the features as
        they stand now. Group "lr" stays λ0, the scale the learned schedule multiplies; log this instead
        to see the step size actually taken."""
        lam, _ = self._coefficients()
        out, start = [], 0
        for group in self.param_groups:
            count = sum(p.requires_grad for p in group["params"])
            out.append(float(lam[start:start + count].mean()) if count else math.nan)
            start += count
        return out

    def _coefficients(self) -> tuple[Tensor, Tensor]:
        x = functional.feature_matrix(self.config, self._feature_state(None), self.step_count, self.total_steps,
                                      len(self._params), self._params[0].device)
        sizes = torch.tensor([float(p.numel()) for p in self._params], device=x.device)
        lr = self._per_tensor()[0] * functional.head_ramp(self.config, self.step_count, self.total_steps, self._head)
        return functional.coefficients(self.config, self.meta, x, lr, self.step_count, self.total_steps, sizes,
                                       self.train_size)

    # ------------------------------------------------------------------------------- (de)serialization
    def state_dict(self) -> dict[str, Any]:
        """Optimizer state plus the meta-parameters and config; a snapshot (later steps don't alter it).

        Per-tensor state is keyed by parameter index as in torch.optim; the optimizer-wide state (step,
        feature EMAs) rides in ``param_groups[0]["l3rs_state"]``, so torch.distributed.checkpoint's
        get/set_optimizer_state_dict work (they drop the top-level ``l3rs_meta``/``l3rs_config``: the
        optimizer you load into keeps its own meta-parameters)."""
        sd = super().state_dict()
        state = {k: _clone(v) for k, v in sd["state"].items()}
        sd["param_groups"][0][_SAVED_GLOBAL] = state.pop(_GLOBAL)
        sd["state"] = state
        sd["l3rs_meta"] = {k: v.clone() for k, v in self.meta.items()}
        sd["l3rs_config"] = self.config.to_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        meta = state_dict.pop("l3rs_meta", None)
        config = state_dict.pop("l3rs_config", None)
        if config is not None and Config.from_dict(config) != self.config:
            raise ValueError("state_dict was saved by an L3RS with a different config")
        if meta is not None:
            meta = with_long_mix(meta, self.config)
            check_meta(meta, self.config, len(self._params))
            self.meta = {k: v.detach().to(self._params[0].device, torch.float32).clone() for k, v in meta.items()}
        groups = [dict(g) for g in state_dict["param_groups"]]
        overall = groups[0].pop(_SAVED_GLOBAL, None)  # None: an older state_dict, kept under state["l3rs"]
        super().load_state_dict({**state_dict, "param_groups": groups})
        if overall is not None:
            self.state[_GLOBAL] = _clone(overall, self._params[0].device)
        self._per_tensor_cache = (None, None)

    def save_pretrained(self, path: str | os.PathLike, **info: Any) -> Path:
        """Write ``optimizer.safetensors`` + ``optimizer.json`` into directory `path` (atomically)."""
        if self._head is not None:
            marked = zip(self.param_names, self._head.tolist(), strict=True)
            info.setdefault("head_tensors", [name for name, is_head in marked if is_head])
        return save_meta(path, self.meta, self.config, self.param_names, [tuple(p.shape) for p in self._params],
                         lr=self.defaults["lr"], total_steps=self.total_steps, **info)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        params: Iterable[Any],
        total_steps: int | None = None,
        *,
        lr: float | None = None,
        unknown: str = "error",
        **kwargs: Any,
    ) -> L3RS:
        """Load a meta-trained optimizer for `params` (named). `lr` defaults to the λ0 it was trained with, `head`
        to the head tensors it was meta-trained with; `kwargs` (train_size, weight_decay, average_loss, state_dtype,
        head) go to `L3RS`. Names match without wrapper prefixes (DDP ``module.``, torch.compile ``_orig_mod.``, FSDP
        ``_fsdp_wrapped_module.``)."""
        saved = load_meta(path)
        info = saved["info"]
        kwargs.setdefault("head", info.get("head_tensors"))
        return cls(params, lr=lr if lr is not None else info["lr"],
                   total_steps=total_steps if total_steps is not None else info.get("total_steps"),
                   unknown=unknown, config=saved["config"], meta=saved["meta"], _saved=info, **kwargs)
