"""Task and TaskFamily: what meta-training and evaluation fine-tune on.

A Task bundles a pretrained model factory with in-memory data splits, so a fine-tuning run is just
`model = task.model_fn(seed)` plus `task.batches(seed, steps)`: no DataLoader, no worker processes, and
the same seeds always give the same head initialization and the same batch sequence.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l3rs.seeds import seed_of

Pair = tuple[Tensor, Tensor]
SPLITS = ("train", "val", "test")


class TaskError(ValueError):
    """A task could not be built or found; the message says what was asked for and what exists."""


class UnknownTaskError(TaskError, KeyError):
    """An unknown task name: both a KeyError (lookup failed) and a TaskError (bad user input)."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0]) if self.args else ""


def accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Fraction of argmax predictions equal to the targets (a 0-d float tensor in [0, 1])."""
    return (outputs.argmax(dim=-1) == targets).float().mean()


def _check_pair(name: str, split: str, pair: object) -> Pair:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise TaskError(
            f"task {name!r}: {split} must be an (inputs, targets) pair, got {type(pair).__name__}"
        )
    x, y = pair
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
        raise TaskError(
            f"task {name!r}: {split} inputs and targets must be torch.Tensors, "
            f"got {type(x).__name__} and {type(y).__name__}"
        )
    if x.dim() == 0 or y.dim() == 0 or len(x) != len(y):
        raise TaskError(
            f"task {name!r}: {split} inputs and targets have different lengths: "
            f"inputs {tuple(x.shape)} vs targets {tuple(y.shape)}"
        )
    if len(x) == 0:
        raise TaskError(f"task {name!r}: {split} split is empty")
    return x, y


@dataclass(eq=False)  # tensors inside: compare tasks by identity, not element-wise
class Task:
    """One fine-tuning problem: a pretrained model factory and in-memory train/val/test splits.

    `model_fn(seed)` must return the pretrained model with its head (the tensors named in `head`)
    freshly initialized from `seed`. `loss_fn`/`metric_fn` default to mean cross-entropy and accuracy.
    `meta` holds free-form facts (e.g. which pretraining seed the backbone came from).
    """

    name: str
    model_fn: Callable[[int], nn.Module]
    train: Pair
    val: Pair
    test: Pair | None = None
    loss_fn: Callable | None = None
    metric_fn: Callable | None = None
    batch_size: int = 64
    horizon: int = 200
    head: tuple[str, ...] = ("fc.weight", "fc.bias")
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not callable(self.model_fn):
            raise TaskError(
                f"task {self.name!r}: model_fn must be callable, got {type(self.model_fn).__name__}"
            )
        self.train = _check_pair(self.name, "train", self.train)
        self.val = _check_pair(self.name, "val", self.val)
        if self.test is not None:
            self.test = _check_pair(self.name, "test", self.test)
        for attr in ("batch_size", "horizon"):
            value = getattr(self, attr)
            if not isinstance(value, int) or value <= 0:
                raise TaskError(f"task {self.name!r}: {attr} must be a positive int, got {value!r}")
        self.head = (self.head,) if isinstance(self.head, str) else tuple(self.head)
        if not self.head or not all(isinstance(h, str) for h in self.head):
            raise TaskError(f"task {self.name!r}: head must be a non-empty tuple of parameter names")

    @property
    def train_size(self) -> int:
        """The number of training examples (what a meta-trained L3RS is told as `train_size`)."""
        return len(self.train[1])

    # -- objective ---------------------------------------------------------------------------------
    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Training/validation loss (a mean over the batch); cross-entropy unless loss_fn is set."""
        return (self.loss_fn or F.cross_entropy)(outputs, targets)

    def metric(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Quality metric (higher is better); accuracy unless metric_fn is set."""
        return (self.metric_fn or accuracy)(outputs, targets)

    def split(self, split: str) -> Pair:
        """The (inputs, targets) pair of a split by name, with a clear error for a missing one."""
        if split not in SPLITS:
            raise TaskError(f"task {self.name!r}: unknown split {split!r}; choose one of {SPLITS}")
        pair = getattr(self, split)
        if pair is None:
            raise TaskError(f"task {self.name!r} has no {split!r} split")
        return pair

    def check_head(self, model: nn.Module) -> None:
        """Raise if a head name is not a parameter of `model` (checked lazily: models are costly)."""
        names = dict(model.named_parameters())
        missing = [h for h in self.head if h not in names]
        if missing:
            known = ", ".join(list(names)[-6:])
            raise TaskError(
                f"task {self.name!r}: head parameter(s) {missing} not found in "
                f"{type(model).__name__}; its last parameters are: {known}"
            )

    # -- batching ----------------------------------------------------------------------------------
    def batch_indices(self, seed: int, steps: int) -> Tensor:
        """[steps, batch_size] indices into train: epoch-wise shuffles from a seeded generator.

        Index tensors instead of a DataLoader keep a step's data cost to one gather, and make the batch
        sequence a pure function of (seed, steps): the same seed replays the same run.
        """
        if steps < 0:
            raise TaskError(f"task {self.name!r}: steps must be >= 0, got {steps}")
        n, total = len(self.train[0]), steps * self.batch_size
        gen = torch.Generator().manual_seed(int(seed))
        perms = [torch.randperm(n, generator=gen) for _ in range(math.ceil(total / n))]
        flat = torch.cat(perms) if perms else torch.empty(0, dtype=torch.long)
        return flat[:total].view(steps, self.batch_size)

    def batches(self, seed: int, steps: int, device: torch.device | str | None = None) -> Iterator[Pair]:
        """Yield `steps` training batches (inputs, targets), moved to `device` when given."""
        x, y = self.train
        for idx in self.batch_indices(seed, steps):
            xb, yb = x[idx], y[idx]
            yield (xb.to(device), yb.to(device)) if device is not None else (xb, yb)

    # -- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "val", batch_size: int = 1024) -> dict:
        """Mean loss and metric of `model` on a split, in eval mode; the model's mode is restored."""
        x, y = self.split(split)
        device = model_device(model)
        was_training = model.training
        model.eval()
        try:
            loss_sum = metric_sum = 0.0
            for i in range(0, len(x), batch_size):
                xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
                out = model(xb)
                loss_sum += float(self.loss(out, yb)) * len(yb)
                metric_sum += float(self.metric(out, yb)) * len(yb)
        finally:
            model.train(was_training)
        return {"loss": loss_sum / len(x), "metric": metric_sum / len(x)}

    def with_train(self, train: Pair, name: str | None = None) -> Task:
        """A copy of this task with another training set (e.g. a random subset)."""
        return replace(self, name=name or self.name, train=train, meta=dict(self.meta))


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a stateless model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def init_head(model: nn.Module, head: tuple[str, ...], seed: int) -> nn.Module:
    """Re-initialize the head tensors in place from `seed` (PyTorch's default Linear/Conv init).

    Uses its own CPU generator, so the global RNG is untouched and the init is device-independent:
    weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases the same with the sibling weight's fan_in.
    """
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(int(seed))
    for name in head:
        if name not in params:
            raise TaskError(f"head parameter {name!r} not found in {type(model).__name__}")
        p = params[name]
        sibling = params.get(name.rsplit(".", 1)[0] + ".weight") if "." in name else None
        ref = p if p.dim() >= 2 else sibling
        fan_in = ref[0].numel() if ref is not None and ref.dim() >= 2 else p.numel()
        bound = 1.0 / math.sqrt(max(fan_in, 1))
        values = torch.rand(p.shape, generator=gen, dtype=torch.float64) * (2 * bound) - bound
        with torch.no_grad():
            p.copy_(values.to(dtype=p.dtype, device=p.device))
    return model


class TaskFamily:
    """A distribution over related tasks: `sample(seed)` varies head seeds, data subsets, checkpoints.

    Meta-training samples a fresh task per iteration so the learned optimizer does not overfit one run.
    `held_out_seeds` names pretraining seeds that `sample` never draws (kept for generalization tests).
    """

    def __init__(
        self,
        name: str,
        base: Task,
        sampler: Callable[[int], Task] | None = None,
        held_out_seeds: tuple[int, ...] = (),
        description: str = "",
    ) -> None:
        self.name = name
        self.base = base
        self._sampler = sampler
        self.held_out_seeds = tuple(held_out_seeds)
        self.description = description

    @classmethod
    def of(cls, task: Task) -> TaskFamily:
        """Wrap a bare Task: the family of its head seeds (same data, head init offset by the seed)."""
        return cls(task.name, task, sampler=functools.partial(offset_heads, task))

    def sample(self, seed: int) -> Task:
        """A task drawn deterministically from `seed`."""
        if self._sampler is None:
            return offset_heads(self.base, int(seed))
        return self._sampler(int(seed))

    def __repr__(self) -> str:
        return f"TaskFamily({self.name!r}, held_out_seeds={self.held_out_seeds})"


class _OffsetHeads:
    """model_fn wrapper: head seed mixed with a family seed (a class, not a closure, so it pickles)."""

    def __init__(self, model_fn: Callable[[int], nn.Module], offset: int) -> None:
        self.model_fn, self.offset = model_fn, offset

    def __call__(self, head_seed: int) -> nn.Module:
        return self.model_fn(seed_of(self.offset, head_seed))


def offset_heads(task: Task, seed: int) -> Task:
    """Same data, but model_fn(s) initializes the head from a seed mixed with `seed`."""
    return replace(
        task,
        name=f"{task.name}#{seed}",
        model_fn=_OffsetHeads(task.model_fn, seed),
        meta={**task.meta, "family_seed": seed},
    )


# The ":fewer" shift: a fixed quarter of the training examples (the same validation and test sets). The family's
# meta-training tasks train on random 75% subsets; this size stays out of meta-training. Seed 4242: session 42's
# probe drew the same subsets, so its figures reproduce.
FEWER_FRACTION, FEWER_SEED = 0.25, 4242


# The size sweep's fixed half of the base task's training set (`l3rs.meta.sweeps.size_exponent_fit`): a seed of its
# own and a size unlike ":fewer"'s, which stays out of meta-training
SIZE_SWEEP_SEED = 4343


def fewer(train: Pair) -> Pair:
    """The ":fewer" shift's training set: a fixed quarter of `train`."""
    return random_subset(train, FEWER_SEED, FEWER_FRACTION)


def random_subset(pair: Pair, seed: int, fraction: float) -> Pair:
    """A seeded random subset of an (inputs, targets) pair, `fraction` of its length (at least 1)."""
    n = len(pair[0])
    k = max(1, min(n, round(n * fraction)))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:k]
    return pair[0][idx], pair[1][idx]


def functional_model(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor], Callable]:
    """Split a module into explicit (params, buffers) and a pure `call(params, buffers, x)`.

    Buffers (BatchNorm running stats) are explicit inputs too: functional_call then never reads or
    writes the module's own state, so unrolled updates can be differentiated (create_graph=True).
    `params` holds fresh leaf copies of the trainable parameters (requires_grad=True); frozen parameters
    travel with the buffers. The module itself is left untouched.
    """
    params, buffers = {}, {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            params[name] = p.detach().clone().requires_grad_(True)
        else:
            buffers[name] = p.detach().clone()
    for name, b in model.named_buffers():
        buffers[name] = b.detach().clone()

    def call(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.func.functional_call(model, (params, buffers), (x,))

    return params, buffers, call
