"""The on-disk format of a meta-trained optimizer, and matching its tensors to a model by name.

A saved optimizer is a directory: ``optimizer.safetensors`` (meta-parameters) + ``optimizer.json``
(config, base set, feature set, tensor names and shapes, format version). Loading never unpickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from l3rs import mixer
from l3rs.functional import Config
from l3rs.io import atomic_write
from l3rs.version import __version__

FORMAT = "l3rs-optimizer"
# 2: horizon-relative time features and a base schedule (1.x dirs are refused); 3: `normalize` may be "snr",
# which version-2 readers would take for True; 4: `config.fallback` (long runs fall back to the untrained
# optimizer), unknown to version-3 readers (older dirs still load: their meaning is unchanged)
FORMAT_VERSION = 4
OLDEST_READABLE = 2
WEIGHTS_FILE = "optimizer.safetensors"
CONFIG_FILE = "optimizer.json"
# Path components that wrappers insert into parameter names: DDP, torch.compile, FSDP (1).
WRAPPER_PARTS = ("module", "_orig_mod", "_fsdp_wrapped_module")


class CheckpointError(ValueError):
    """A saved optimizer that cannot be used: missing, corrupt, or made for another model."""


def canonical_name(name: str) -> str:
    """`name` without wrapper components: "module._orig_mod.fc.weight" -> "fc.weight"."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PARTS)


def with_long_mix(meta: mixer.Meta, config: Config) -> mixer.Meta:
    """`meta` with a zero `long_mix` when it was saved before long runs had a mix prior: the same mix at every
    length, which is what it was meta-trained with."""
    return meta if "long_mix" in meta else {**meta, "long_mix": torch.zeros(len(config.bases))}


def check_meta(meta: mixer.Meta, config: Config, num_tensors: int) -> None:
    expected = config.init_meta(num_tensors)
    problems = [f"missing {k}" for k in expected if k not in meta]
    problems += [f"unexpected {k}" for k in meta if k not in expected]
    problems += [f"{k}: shape {tuple(meta[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                 if k in meta and meta[k].shape != v.shape]
    if problems:
        raise CheckpointError("meta-parameters do not match the config: " + "; ".join(problems))


def _listed(items: list[str]) -> str:
    return ", ".join(items[:8]) + (" ..." if len(items) > 8 else "")


def match_embedding(meta: mixer.Meta, info: dict[str, Any], names: list[str], shapes: list[tuple[int, ...]],
                    unknown: str, scope: str) -> mixer.Meta:
    """Re-key the saved per-tensor embedding rows to this model's tensors, by name (never position).

    Names are compared without wrapper components (`WRAPPER_PARTS`), so an optimizer meta-trained on a bare
    model serves the same model under DDP, torch.compile or FSDP, and the other way round."""
    saved_names = [canonical_name(n) for n in info["tensor_names"]]
    saved = {n: tuple(s) for n, s in zip(saved_names, info["tensor_shapes"], strict=True)}
    keys = [canonical_name(n) for n in names]
    missing = [n for n, k in zip(names, keys, strict=True) if k not in saved]
    wrong = [f"{n} {saved[k]} vs model {s}" for n, k, s in zip(names, keys, shapes, strict=True)
             if k in saved and saved[k] != s]
    if (missing or wrong) and unknown == "error":
        parts = [f"{len(missing)} tensor(s) unknown to the optimizer: {_listed(missing)}"] if missing else []
        parts += [f"shape mismatch: {_listed(wrong)}"] if wrong else []
        raise CheckpointError("optimizer was meta-trained for another model: " + "; ".join(parts)
                              + " (pass unknown='mean' to use the mean embedding for these)")
    if scope == "global":
        return meta
    table = meta["embedding"]
    row = {n: i for i, n in enumerate(saved_names)}
    mean = table.mean(0)
    rows = [table[row[k]] if k in saved and saved[k] == s else mean for k, s in zip(keys, shapes, strict=True)]
    return {**meta, "embedding": torch.stack(rows)}


def save_meta(path: str | os.PathLike, meta: mixer.Meta, config: Config, names: list[str],
              shapes: list[tuple[int, ...]], lr: float, total_steps: int | None, **info: Any) -> Path:
    """Save meta-parameters as an optimizer directory loadable by `L3RS.from_pretrained`."""
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
    if version < OLDEST_READABLE:
        raise CheckpointError(f"{doc_file} has format version {version}: its features and step-size "
                              f"parameterization changed in version {OLDEST_READABLE}; meta-train it again")
    try:
        config = Config.from_dict(info["config"])
        names, shapes = info["tensor_names"], info["tensor_shapes"]
        if len(names) != len(shapes):
            raise ValueError("tensor_names and tensor_shapes differ in length")
        float(info["lr"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{doc_file} is malformed: {e}") from None
    try:
        meta = with_long_mix(load_file(weights), config)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is corrupt: {e}") from None
    num_rows = 1 if config.scope == "global" else len(names)
    check_meta(meta, config, num_rows)
    return {"config": config, "meta": meta, "info": info}
