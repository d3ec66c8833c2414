"""The tiny MLP shared by all tensors: (features, per-tensor embedding) -> (log step-size scale, mix logits).

Meta-parameters are a flat ``dict[str, Tensor]`` so that evolution strategies can perturb a single vector
(`flatten` / `unflatten`) and truncated backprop can differentiate through `apply`.
The last layer starts at zero: an untrained L3RS uses a uniform mix and step size exactly lr. `long_mix` holds
the mix logits long runs add (zero: the same mix at every length), a meta-parameter like the others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Meta = dict[str, Tensor]


def init(
    num_tensors: int,
    num_features: int,
    num_bases: int,
    hidden: int = 32,
    depth: int = 2,
    embed_dim: int = 8,
    seed: int = 0,
) -> Meta:
    """Fresh meta-parameters (deterministic given `seed`)."""
    gen = torch.Generator().manual_seed(seed)
    meta: Meta = {"embedding": 0.5 * torch.randn(num_tensors, embed_dim, generator=gen)}
    width = num_features + embed_dim
    for i in range(depth):
        bound = 1 / width**0.5
        meta[f"layers.{i}.weight"] = (torch.rand(hidden, width, generator=gen) * 2 - 1) * bound
        meta[f"layers.{i}.bias"] = (torch.rand(hidden, generator=gen) * 2 - 1) * bound
        width = hidden
    meta[f"layers.{depth}.weight"] = torch.zeros(1 + num_bases, width)
    meta[f"layers.{depth}.bias"] = torch.zeros(1 + num_bases)
    meta["long_mix"] = torch.zeros(num_bases)  # mix logits that long runs add (`schedules.long_share`)
    return meta


def depth(meta: Meta) -> int:
    return sum(1 for k in meta if k.endswith(".weight")) - 1


def apply(meta: Meta, features: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Return (s [T], mix logits [T, P]) for the feature rows; `index` picks each row's embedding."""
    emb = meta["embedding"] if index is None else meta["embedding"][index]
    emb = emb.expand(features.shape[0], -1)  # a single (global) embedding serves every tensor
    h = torch.cat([features.to(emb.dtype), emb], dim=-1)
    n = depth(meta)
    for i in range(n):
        h = torch.tanh(F.linear(h, meta[f"layers.{i}.weight"], meta[f"layers.{i}.bias"]))
    out = F.linear(h, meta[f"layers.{n}.weight"], meta[f"layers.{n}.bias"])
    return out[:, 0], out[:, 1:]


def untrained_output(meta: Meta) -> tuple[float, ...]:
    """The output of meta-parameters whose last layer has no weights yet (an untrained optimizer's: the same for
    every tensor and feature): log step scale, mix logits, long runs' mix logits (`Config.fallback`)."""
    n = depth(meta)
    if meta[f"layers.{n}.weight"].any():
        raise ValueError("these meta-parameters are trained: their output depends on the features")
    return tuple(torch.cat([meta[f"layers.{n}.bias"], meta["long_mix"]]).tolist())


def num_params(meta: Meta) -> int:
    return sum(v.numel() for v in meta.values())


def flatten(meta: Meta) -> Tensor:
    """All meta-parameters as one vector (sorted by key, so the layout is stable)."""
    return torch.cat([meta[k].reshape(-1) for k in sorted(meta)])


def unflatten(vector: Tensor, like: Meta) -> Meta:
    """Inverse of `flatten` with the shapes of `like`."""
    total = sum(v.numel() for v in like.values())
    if vector.numel() != total:
        raise ValueError(f"vector has {vector.numel()} entries, meta-parameters need {total}")
    out, offset = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = vector[offset : offset + n].view_as(like[k])
        offset += n
    return out
