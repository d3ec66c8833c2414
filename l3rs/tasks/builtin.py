"""The built-in fine-tuning tasks, all offline (data and weights ship in packages or in l3rs).

Task families (`l3rs.tasks.family(name)`); `get(name)` is the family's base task:

- ``mnistcnn-digits``: the digit-recognizer MNIST CNN (99.7% on MNIST) fine-tuned on sklearn's 8x8 digits
  drawn MNIST-style at 28x28 (~82% zero-shot with the original head); the 10-way head
  (``fc_layers.2``) is re-initialized. Train 997 / val 400 / test 400.
- ``cnn04-mnist59``: a small BatchNorm CNN that l3rs pretrained on MNIST-5k digits 0-4 (seeds 0-3,
  weights shipped in ``l3rs/tasks/weights``), fine-tuned with a new 5-way head on digits 5-9. The family
  draws pretraining seeds 0, 1, 2; seed 3 is held out (``family.held_out_seeds``) and is the backbone of
  ``cnn04-mnist59:heldout``. Train 1000 / val 500 / test 1000.
- ``mlp-mnist1d-shift``: an MLP pretrained by l3rs on MNIST-1D (default generator args; weights shipped),
  fine-tuned on a shifted MNIST-1D (another generator seed, 2.5x the i.i.d. noise, larger translations);
  head re-initialized. Pretraining seeds 0, 1, 2 in the family, 3 held out (``mlp-mnist1d-shift:heldout``).
  Train 1000 / val 1000 / test 2000.
- ``cnn04-digits``: the ``cnn04`` backbone (pretrained on MNIST digits 0-4) with a new 10-way head, fine-tuned on
  sklearn's digits at 28x28 (all ten classes: five it never saw, and another style of drawing). Added in session 40
  as an environment never used to develop the recipe; its loss keeps falling well past its horizon (a one-off
  AdamW-cosine probe: ~0.07 at 150 steps, ~0.01 at 600), the regime where long runs decide. Train 997 / val 400 /
  test 400.
- ``mlp-mnist1d-warp``: the ``mlp1d`` backbone fine-tuned on another shift of MNIST-1D (another generator seed,
  larger correlated noise, scale and shear); head re-initialized. Added in session 40 as an environment never used
  to develop the recipe: long runs overfit unless the step falls. Train 2000 / val 1000 / test 2000.
- ``effnet-mnist``: EfficientNet-Lite0 (ImageNet) fine-tuned on MNIST-5k at 32x32 RGB in [-1, 1], new
  10-way head ``_fc``. Slow (~0.15 s/step at batch 32): small default batch and horizon. Train 3000 /
  val 500 / test 1000.

Meta-training sees, besides head seeds, training subsets and pretraining seeds, mildly perturbed variants of
the data for half of the sampled tasks (`data.perturb`: a random affine map within ±20°, ±10% scale, ±2 px,
or a ±4 circular shift of 1-D signals, plus noise); the shifts below are held out of meta-training.

Dataset shifts, usable as "unseen datasets" (same backbone, same splits, transformed data), for every
family above: ``<name>:rotated`` (images rotated 90 degrees; 1-D signals time-reversed),
``<name>:inverted`` (images 1 - x before normalization; 1-D signals negated), ``<name>:permuted``
(labels relabelled by a fixed permutation without fixed points) and ``<name>:fewer`` (a fixed quarter of the
training examples; meta-training's tasks train on random 75% subsets).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import Tensor, nn

from ..seeds import seed_of
from . import data
from .backbones import EFFNET_HEAD, MNIST_CNN_HEAD, efficientnet_lite0, mnist_cnn
from .core import Pair, Task, TaskFamily, fewer, init_head, random_subset
from .pretraining import pretrained_model
from .text import TOP3_RECIPE, TOPICS12_RECIPE
from .text import factories as text_factories

Splits = tuple[Pair, Pair, Pair]
SHIFTS = ("rotated", "inverted", "permuted", "fewer")
SHIFT_TEXT = {
    "rotated": "inputs rotated 90 degrees (1-D signals: time-reversed)",
    "inverted": "inputs inverted (1-D signals: negated)",
    "permuted": "labels permuted",
    "fewer": "a quarter of the training examples (the same validation and test sets)",
}


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a built-in family; `raw` returns unnormalized (inputs, targets)."""

    name: str
    raw: Callable[[], Pair]
    sizes: tuple[int, int, int]
    split_seed: int
    prepare: Callable[[Tensor], Tensor]  # raw inputs -> model inputs
    invert: Callable[[Tensor], Tensor]  # the "inverted" shift, applied to raw inputs
    backbone: Callable[[int], nn.Module]  # pretraining seed -> pretrained model (its head resized by `build_model`)
    head: tuple[str, ...]
    num_classes: int
    batch_size: int
    horizon: int
    pretrain_seeds: tuple[int, ...] = (0,)
    held_out_seeds: tuple[int, ...] = ()
    subset: float = 0.75
    perturbed: float = 0.5  # share of sampled meta-training tasks whose data is a `data.perturb` variant
    description: str = ""


def _digits() -> Pair:
    return data.digits28()


def _mnist59() -> Pair:
    return data.select_classes(data.mnist5k(), (5, 6, 7, 8, 9))


def _mnist1d_shift() -> Pair:
    return data.mnist1d(**data.MNIST1D_SHIFT)


def _mnist1d_warp() -> Pair:
    return data.mnist1d(**data.MNIST1D_WARP)


def _effnet_prepare(x: Tensor) -> Tensor:
    return data.to_rgb32(x)


RECIPES = {
    r.name: r
    for r in [
        Recipe(
            name="mnistcnn-digits",
            raw=_digits,
            sizes=(997, 400, 400),
            split_seed=0,
            prepare=data.normalize_mnist,
            invert=data.invert,
            backbone=lambda s: mnist_cnn(),
            head=MNIST_CNN_HEAD,
            num_classes=10,
            batch_size=32,
            horizon=150,
            description="digit-recognizer MNIST CNN -> sklearn digits at 28x28, 10-way head re-initialized",
        ),
        Recipe(
            name="cnn04-mnist59",
            raw=_mnist59,
            sizes=(1000, 500, 1000),
            split_seed=1,
            prepare=data.normalize_mnist,
            invert=data.invert,
            backbone=lambda s: pretrained_model("cnn04", s),
            head=("fc.weight", "fc.bias"),
            num_classes=5,
            batch_size=64,
            horizon=200,
            pretrain_seeds=(0, 1, 2),
            held_out_seeds=(3,),
            description="BN CNN pretrained on MNIST digits 0-4 (seeds 0-2; 3 held out) -> digits 5-9",
        ),
        Recipe(
            name="mlp-mnist1d-shift",
            raw=_mnist1d_shift,
            sizes=(1000, 1000, 2000),
            split_seed=2,
            prepare=lambda x: x,
            invert=lambda x: data.invert(x, -1.0, 1.0),
            backbone=lambda s: pretrained_model("mlp1d", s),
            head=("fc.weight", "fc.bias"),
            num_classes=10,
            batch_size=64,
            horizon=200,
            pretrain_seeds=(0, 1, 2),
            held_out_seeds=(3,),
            description="MLP pretrained on MNIST-1D (seeds 0-2; 3 held out) -> shifted MNIST-1D",
        ),
        Recipe(
            name="effnet-mnist",
            raw=data.mnist5k,
            sizes=(3000, 500, 1000),
            split_seed=3,
            prepare=_effnet_prepare,
            invert=data.invert,
            backbone=lambda s: efficientnet_lite0(),
            head=EFFNET_HEAD,
            num_classes=10,
            batch_size=32,
            horizon=50,
            description="EfficientNet-Lite0 (ImageNet) -> MNIST-5k at 32x32 RGB, new head (slow)",
        ),
    ]
}

# Session 40: two environments never used to develop the recipe, each another dataset for a backbone above
RECIPES |= {
    "cnn04-digits": replace(
        RECIPES["cnn04-mnist59"],
        name="cnn04-digits",
        raw=_digits,
        sizes=(997, 400, 400),
        split_seed=4,
        num_classes=10,
        batch_size=32,
        horizon=150,
        description="BN CNN pretrained on MNIST digits 0-4 (seeds 0-2; 3 held out) -> sklearn digits, 10-way head",
    ),
    "mlp-mnist1d-warp": replace(
        RECIPES["mlp-mnist1d-shift"],
        name="mlp-mnist1d-warp",
        raw=_mnist1d_warp,
        sizes=(2000, 1000, 2000),
        split_seed=5,
        description="MLP pretrained on MNIST-1D (seeds 0-2; 3 held out) -> MNIST-1D with more noise, scale, shear",
    ),
}


@functools.cache
def splits(name: str, shift: str | None = None) -> Splits:
    """Fixed (train, val, test) splits of a recipe's data under an optional shift (cached per process)."""
    recipe = RECIPES[name]
    x, y = recipe.raw()
    if shift == "inverted":
        x = recipe.invert(x)
    x = recipe.prepare(x)
    if shift == "rotated":
        x = data.rotate(x).contiguous()
    if shift == "permuted":
        y = data.permute_labels(y, recipe.num_classes, seed=0)
    train, val, test = data.split((x, y), recipe.sizes, seed=recipe.split_seed)
    return (fewer(train) if shift == "fewer" else train), val, test


def build_model(name: str, pretrain_seed: int, offset: int | None, seed: int) -> nn.Module:
    """A recipe's pretrained backbone with its head initialized from `seed` (mixed with `offset`).

    Module-level and used through functools.partial, so built-in tasks pickle (worker processes).
    """
    recipe = RECIPES[name]
    head_seed = seed if offset is None else seed_of(offset, seed)
    model = _head_of_width(recipe.backbone(pretrain_seed), recipe.head, recipe.num_classes)
    return init_head(model, recipe.head, head_seed)


def _head_of_width(model: nn.Module, head: tuple[str, ...], num_classes: int) -> nn.Module:
    """`model` with a `num_classes`-way head: a new Linear where the pretrained one's width differs (cnn04's 5
    classes on the 10 digits); `init_head` sets its values either way."""
    path = head[0].rsplit(".", 1)[0]
    layer = model.get_submodule(path)
    if layer.out_features != num_classes:
        model.set_submodule(path, nn.Linear(layer.in_features, num_classes))
    return model


def _task(
    recipe: Recipe,
    name: str,
    shift: str | None,
    pretrain_seed: int,
    train: Pair | None = None,
    offset: int | None = None,
    val: Pair | None = None,
    test: Pair | None = None,
) -> Task:
    tr, val_split, test_split = splits(recipe.name, shift)
    meta = {
        "pretrain_seed": pretrain_seed,
        "shift": shift,
        "family": recipe.name,
        "num_classes": recipe.num_classes,
        "description": recipe.description,
    }
    if offset is not None:
        meta["family_seed"] = offset
    return Task(
        name,
        functools.partial(build_model, recipe.name, pretrain_seed, offset),
        train if train is not None else tr,
        val if val is not None else val_split,
        test if test is not None else test_split,
        batch_size=recipe.batch_size,
        horizon=recipe.horizon,
        head=recipe.head,
        meta=meta,
    )


def family_name(recipe: Recipe, shift: str | None, held_out: bool) -> str:
    """Registered name of a recipe's family under a shift / held-out selection."""
    return recipe.name + (f":{shift}" if shift else "") + (":heldout" if held_out else "")


def _perturbed(recipe: Recipe, pairs: Splits, seed: int) -> Splits:
    """A share `recipe.perturbed` of sampled tasks see a mild random variant of their data (train, val and
    test alike): meta-training diversity, disjoint from the evaluation shifts."""
    if (seed_of(seed, 13) % 1000) / 1000 >= recipe.perturbed:
        return pairs
    variant = seed_of(seed, 17)
    return tuple((data.perturb(x, variant, seed_of(variant, i)), y)  # type: ignore[return-value]
                 for i, (x, y) in enumerate(pairs))


def sample_task(name: str, shift: str | None, held_out: bool, seed: int) -> Task:
    """Task `seed` of a built-in family: a pretraining seed, a train subset, head seeds and (for a share of
    seeds) a perturbed variant of the data, all seeded."""
    recipe = RECIPES[name]
    pool = recipe.held_out_seeds if held_out else recipe.pretrain_seeds
    pretrain_seed = pool[seed_of(seed, 7) % len(pool)]
    train, val, test = _perturbed(recipe, splits(name, shift), seed)
    train = random_subset(train, seed_of(seed, 11), recipe.subset)
    fname = family_name(recipe, shift, held_out)
    return _task(recipe, f"{fname}#{seed}", shift, pretrain_seed, train=train, offset=seed, val=val, test=test)


def make_family(recipe: Recipe, shift: str | None = None, held_out: bool = False) -> TaskFamily:
    """The family of a recipe: head seeds x random train subsets x pretraining seeds.

    `held_out=True` gives the family over the held-out pretraining seeds only (generalization tests).
    """
    pool = recipe.held_out_seeds if held_out else recipe.pretrain_seeds
    name = family_name(recipe, shift, held_out)
    return TaskFamily(
        name,
        _task(recipe, name, shift, pool[0]),
        functools.partial(sample_task, recipe.name, shift, held_out),
        held_out_seeds=() if held_out else recipe.held_out_seeds,
        description=recipe.description,
    )


def builtin_factories() -> dict[str, tuple[Callable[[], TaskFamily], str]]:
    """name -> (family factory, one-line description) for every built-in family and variant."""
    out: dict[str, tuple[Callable[[], TaskFamily], str]] = {}
    for recipe in RECIPES.values():
        out[recipe.name] = (functools.partial(make_family, recipe), recipe.description)
        if recipe.held_out_seeds:
            out[f"{recipe.name}:heldout"] = (
                functools.partial(make_family, recipe, held_out=True),
                f"{recipe.description}; held-out pretraining seeds only",
            )
        for shift in SHIFTS:
            out[f"{recipe.name}:{shift}"] = (
                functools.partial(make_family, recipe, shift),
                f"{recipe.description}; shift: {SHIFT_TEXT[shift]}",
            )
    return out | text_factories() | text_factories(TOP3_RECIPE) | text_factories(TOPICS12_RECIPE)
