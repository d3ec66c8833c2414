"""`L3RS`, the drop-in torch.optim.Optimizer, and its safe on-disk format.

The math lives in `l3rs.functional`; this class only gathers tensors, calls `functional.update` under
no_grad, adds the updates in place (`torch._foreach_add_`) and keeps the returned state.

A saved optimizer is a directory: ``optimizer.safetensors`` (meta-parameters) + ``optimizer.json``
(config, base set, feature set, tensor names and shapes, format version). Loading never unpickles.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from l3rs import features, functional, mixer
from l3rs.functional import Config
from l3rs.io import atomic_write

FORMAT = "l3rs-optimizer"
FORMAT_VERSION = 2  # 2: horizon-relative time features and a base schedule (1.x dirs are refused)
WEIGHTS_FILE = "optimizer.safetensors"
CONFIG_FILE = "optimizer.json"
_GLOBAL = "l3rs"  # key of the optimizer-wide entry in self.state (step, feature EMAs, skipped steps)
_UNKNOWN_POLICIES = ("error", "mean")


class CheckpointError(ValueError):
    """A saved optimizer that cannot be used: missing, corrupt, or made for another model."""


def _named(params: Any) -> list[Any]:
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


class L3RS(torch.optim.Optimizer):
    """Learned layer-wise mix of base directions with a learned per-tensor step size (arXiv 2408.09310).

    Args:
        params: ``model.named_parameters()`` or param groups of (name, tensor) pairs. Tensors that do not
            require grad are skipped.
        lr: λ0, the base step size; an untrained L3RS steps every tensor by ``lr`` times the base schedule
            (per element, with ``normalize=True``) along the uniform mix of its base directions.
        total_steps: the run's horizon, fed to the mixer as training progress (None: unknown).
        bases, normalize, mix, schedule: see `l3rs.functional.Config`. The untrained optimizer steps by
            ``lr * b(t / total_steps)`` with b the base schedule (default: short warm-up, then cosine decay;
            ``schedule="constant"`` keeps λ = lr; without ``total_steps`` it is constant too).
        unknown: what to do with tensors a pretrained optimizer has no embedding for: "error" or
            "mean" (use the mean embedding).
        config, meta: a full `Config` and meta-parameters (what `from_pretrained` passes).
        seed: seeds the (untrained) mixer's hidden layers and embeddings.

    ``step(closure)`` or ``step(loss=loss.detach())`` feeds the loss features; without a loss they keep
    their last value. A step with a non-finite gradient changes nothing and counts in ``skipped_steps``.

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
        bases: Iterable[str] | None = None,
        normalize: bool = True,
        mix: str = "softmax",
        schedule: str = "cosine",
        unknown: str = "error",
        config: Config | None = None,
        meta: mixer.Meta | None = None,
        seed: int = 0,
        _saved: dict[str, Any] | None = None,
    ) -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps <= 0):
            raise ValueError(f"total_steps must be a positive int or None, got {total_steps!r}")
        if unknown not in _UNKNOWN_POLICIES:
            raise ValueError(f"unknown must be one of {_UNKNOWN_POLICIES}, got {unknown!r}")
        if config is None:
            config = Config(bases=tuple(bases) if bases is not None else Config.bases, normalize=normalize,
                            mix=mix, schedule=schedule)
        elif bases is not None:
            raise ValueError("pass either bases=... or config=..., not both")
        super().__init__(_named(params), {"lr": lr})
        self.config = config
        self.total_steps = total_steps
        self._params: list[Tensor] = []
        self.param_names: list[str] = []
        for group in self.param_groups:
            for name, p in zip(group["param_names"], group["params"], strict=True):
                if p.requires_grad:
                    self._params.append(p)
                    self.param_names.append(name)
        if not self._params:
            raise ValueError("L3RS got no parameter that requires grad")
        dupes = sorted({n for n in self.param_names if self.param_names.count(n) > 1})
        if dupes:
            raise ValueError(f"parameter names must be unique, repeated: {dupes}")
        device = self._params[0].device
        if meta is None:
            meta = config.init_meta(len(self._params), seed)
        elif _saved is not None:
            meta = _match_embedding(meta, _saved, self.param_names, [tuple(p.shape) for p in self._params],
                                    unknown, config.scope)
        _check_meta(meta, config, len(self._params))
        self.meta = {k: v.detach().to(device=device, dtype=torch.float32).clone() for k, v in meta.items()}
        # Scratch buffers reused across steps (not state: never saved). Only on CPU, where fresh multi-MB
        # tensors page-fault; CUDA's caching allocator makes fresh ones cheap and its fused foreach kernels
        # beat the per-tensor loops that filling existing buffers needs.
        self._workspace = functional.base_lib.Workspace() if device.type == "cpu" else None
        self._lr0_cache: tuple[Any, Tensor | None] = (None, None)
        self._init_state()

    # --------------------------------------------------------------------------------------- state
    def _init_state(self) -> None:
        st = functional.init(self.config, self._params)
        for i, p in enumerate(self._params):
            self.state[p] = {k: getattr(st.moments, k)[i] for k in ("m", "v", "s", "theta0")
                             if getattr(st.moments, k) is not None}
        self.state[_GLOBAL] = {"step": 0, "skipped_steps": 0, "features": {}}

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

    def _lr0(self) -> Tensor:
        """λ0 per tensor; rebuilt only when a group's lr changed (e.g. by a scheduler)."""
        key = tuple(g["lr"] for g in self.param_groups)
        if self._lr0_cache[0] != key:
            lrs = [g["lr"] for g in self.param_groups for p in g["params"] if p.requires_grad]
            self._lr0_cache = (key, torch.tensor(lrs, dtype=torch.float32, device=self._params[0].device))
        return self._lr0_cache[1]

    # ---------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Any = None, loss: Tensor | float | None = None) -> Any:
        """One L3RS update; returns the closure's loss (or `loss`) like torch.optim optimizers do."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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
        loss_value = loss.detach() if isinstance(loss, Tensor) else loss
        lr = self._lr0() if subset is None else self._lr0()[rows]
        updates, new, _ = functional.update_(
            self.config, meta, grads, state, params, lr=lr, loss=loss_value, total_steps=self.total_steps,
            workspace=self._workspace)
        if updates is None:  # non-finite gradient: nothing was touched
            self.state[_GLOBAL] = {**self.state[_GLOBAL], "skipped_steps": self.skipped_steps + 1}
            return loss
        torch._foreach_add_(params, updates)
        self._store_features(new.features, subset)
        self.state[_GLOBAL] = {**self.state[_GLOBAL], "step": new.moments.step}
        return loss

    # -------------------------------------------------------------------------------- introspection
    @torch.no_grad()
    def coefficients(self) -> dict[str, dict[str, Any]]:
        """Current {param_name: {"lr": λ, "mix": {base: μ}}}, from the features as they stand now."""
        x = functional.feature_matrix(self.config, self._feature_state(None), self.step_count, self.total_steps,
                                      len(self._params), self._params[0].device)
        lam, mix = functional.coefficients(self.config, self.meta, x, self._lr0(), self.step_count, self.total_steps)
        return {
            name: {"lr": float(lam[i]), "mix": {b: float(mix[i, j]) for j, b in enumerate(self.config.bases)}}
            for i, name in enumerate(self.param_names)
        }

    # ------------------------------------------------------------------------------- (de)serialization
    def state_dict(self) -> dict[str, Any]:
        """Optimizer state plus the meta-parameters and config; a snapshot (later steps don't alter it)."""
        sd = super().state_dict()
        sd["state"] = {k: _clone(v) for k, v in sd["state"].items()}
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
            _check_meta(meta, self.config, len(self._params))
            self.meta = {k: v.detach().to(self._params[0].device, torch.float32).clone() for k, v in meta.items()}
        super().load_state_dict(state_dict)

    def save_pretrained(self, path: str | os.PathLike, **info: Any) -> Path:
        """Write ``optimizer.safetensors`` + ``optimizer.json`` into directory `path` (atomically)."""
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
    ) -> L3RS:
        """Load a meta-trained optimizer for `params` (named). `lr` defaults to the λ0 it was trained with."""
        saved = load_meta(path)
        info = saved["info"]
        return cls(params, lr=lr if lr is not None else info["lr"],
                   total_steps=total_steps if total_steps is not None else info.get("total_steps"),
                   unknown=unknown, config=saved["config"], meta=saved["meta"], _saved=info)


def _clone(value: Any) -> Any:
    """Deep copy of tensors in nested dicts (moment buffers are updated in place)."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _check_meta(meta: mixer.Meta, config: Config, num_tensors: int) -> None:
    expected = config.init_meta(num_tensors)
    problems = [f"missing {k}" for k in expected if k not in meta]
    problems += [f"unexpected {k}" for k in meta if k not in expected]
    problems += [f"{k}: shape {tuple(meta[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                 if k in meta and meta[k].shape != v.shape]
    if problems:
        raise CheckpointError("meta-parameters do not match the config: " + "; ".join(problems))


def _match_embedding(meta: mixer.Meta, info: dict[str, Any], names: list[str], shapes: list[tuple[int, ...]],
                     unknown: str, scope: str) -> mixer.Meta:
    """Re-key the saved per-tensor embedding rows to this model's tensors, by name (never position)."""
    saved = {n: tuple(s) for n, s in zip(info["tensor_names"], info["tensor_shapes"], strict=True)}
    missing = [n for n in names if n not in saved]
    wrong = [f"{n} {saved[n]} vs model {s}" for n, s in zip(names, shapes, strict=True)
             if n in saved and saved[n] != s]
    if (missing or wrong) and unknown == "error":
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) unknown to the optimizer: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
        if wrong:
            parts.append(f"shape mismatch: {', '.join(wrong[:8])}" + (" ..." if len(wrong) > 8 else ""))
        raise CheckpointError("optimizer was meta-trained for another model: " + "; ".join(parts)
                              + " (pass unknown='mean' to use the mean embedding for these)")
    if scope == "global":
        return meta
    table = meta["embedding"]
    row = {n: i for i, n in enumerate(info["tensor_names"])}
    bad = set(missing) | {w.split(" ")[0] for w in wrong}
    mean = table.mean(0)
    rows = [mean if n in bad else table[row[n]] for n in names]
    return {**meta, "embedding": torch.stack(rows)}


def save_meta(path: str | os.PathLike, meta: mixer.Meta, config: Config, names: list[str],
              shapes: list[tuple[int, ...]], lr: float, total_steps: int | None, **info: Any) -> Path:
    """Save meta-parameters as an optimizer directory loadable by `L3RS.from_pretrained`."""
    from l3rs import __version__

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in meta.items()}
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "l3rs_version": __version__,
           "config": config.to_dict(), "tensor_names": list(names), "tensor_shapes": [list(s) for s in shapes],
           "lr": float(lr), "total_steps": total_steps, **info}
    atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    atomic_write(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2)))
    return path


def load_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Read an optimizer directory: {"config": Config, "meta": tensors, "info": the JSON document}."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no optimizer directory at {str(path)!r}")
    weights, doc_file = path / WEIGHTS_FILE, path / CONFIG_FILE
    if not weights.is_file() or not doc_file.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"))
        hint = f" (found {', '.join(pickles)}: l3rs never unpickles files)" if pickles else ""
        raise CheckpointError(f"{str(path)!r} is not an l3rs optimizer: need {WEIGHTS_FILE} and {CONFIG_FILE}{hint}")
    try:
        info = json.loads(doc_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{doc_file} is not valid JSON: {e}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{doc_file} is not an l3rs optimizer description (format != {FORMAT!r})")
    version = info.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{doc_file} has format version {version}; this l3rs reads "
                              f"up to {FORMAT_VERSION}: upgrade l3rs")
    if version < FORMAT_VERSION:
        raise CheckpointError(f"{doc_file} has format version {version}: its features and step-size "
                              f"parameterization changed in version {FORMAT_VERSION}; meta-train it again")
    try:
        config = Config.from_dict(info["config"])
        names, shapes = info["tensor_names"], info["tensor_shapes"]
        if len(names) != len(shapes):
            raise ValueError("tensor_names and tensor_shapes differ in length")
        float(info["lr"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{doc_file} is malformed: {e}") from None
    try:
        meta = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is corrupt: {e}") from None
    num_rows = 1 if config.scope == "global" else len(names)
    _check_meta(meta, config, num_rows)
    return {"config": config, "meta": meta, "info": info}
