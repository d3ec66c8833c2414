"""The MiniLM text task (l3rs.tasks.text): offline build, the cached frozen blocks, fine-tuning, unrolls, shift.

A small recipe (a dozen utterances per topic) keeps the one expensive step, the frozen encoder pass, to a
second; it runs once per module into a private cache dir.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import l3rs.tasks as T
from l3rs import mixer
from l3rs.evaluate import SHIFT_SCENARIOS
from l3rs.functional import Config
from l3rs.meta.unroll import unroll
from l3rs.tasks import text

SMALL = replace(text.RECIPE, per_class=(6, 3, 3), heldout_per_class=(4, 2, 2), batch_size=4, horizon=8)


def _clear_caches() -> None:
    for fn in (text.splits, text.encoded, text.top_blocks_state):
        fn.cache_clear()


@pytest.fixture(scope="module", autouse=True)
def _offline_private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("L3RS_CACHE", str(tmp_path_factory.mktemp("cache")))
        _clear_caches()
        yield
    _clear_caches()


@pytest.fixture(scope="module")
def family() -> T.TaskFamily:
    return text.make_family(SMALL)


@pytest.fixture(scope="module")
def heldout() -> T.TaskFamily:
    return text.make_family(SMALL, heldout=True)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


def test_task_builds_offline_with_cached_inputs_names_and_head(family, one_thread):
    task = family.base
    n_topics = len(SMALL.topics)
    assert task.train[0].shape == (6 * n_topics, SMALL.max_tokens, 385)
    assert len(task.val[0]) == len(task.test[0]) == 3 * n_topics
    assert torch.equal(task.train[1].bincount(), torch.full((n_topics,), 6))
    mask = task.train[0][..., -1]
    assert set(mask.unique().tolist()) == {0.0, 1.0} and bool((mask[:, 0] == 1).all())  # [CLS] is always real
    assert list((T.cache_dir() / "text").glob("hidden-*.safetensors"))
    a, b = task.model_fn(0), task.model_fn(1)
    task.check_head(a)
    assert task.head == ("fc.weight", "fc.bias") and "blocks.0.query.weight" in dict(a.named_parameters())
    assert all(p.requires_grad for p in a.parameters())
    assert torch.equal(a.blocks[0].ffn_in.weight, b.blocks[0].ffn_in.weight)  # pretrained, seed-independent
    assert not torch.equal(a.fc.weight, b.fc.weight)  # fresh head per seed
    assert torch.equal(task.model_fn(0).fc.weight, a.fc.weight)
    out = a.eval()(task.val[0])
    assert out.shape == (len(task.val[0]), n_topics) and torch.isfinite(out).all()
    assert torch.equal(a.train()(task.val[0]), out)  # no dropout: train and eval mode agree


def test_block_matches_hugging_face_and_padding_is_free(family, one_thread):
    model_hf, tokenizer = text._encoder()
    batch = tokenizer(["What is AI?", "Do you like to play football with your friends on sundays"],
                      padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model_hf(**batch, output_hidden_states=True).hidden_states
        ours = family.base.model_fn(0)
        mask = batch["attention_mask"].float()
        got = ours.blocks[0](hidden[text.LAYERS - 1], mask)
        real = mask.bool()
        torch.testing.assert_close(got[real], hidden[text.LAYERS][real], rtol=1e-4, atol=1e-4)
        x = torch.cat([hidden[text.LAYERS - 1], mask[..., None]], dim=-1)
        torch.testing.assert_close(ours(x[:1]), ours(x)[:1], rtol=1e-5, atol=1e-5)  # short row alone: cut


def test_cache_reloads_from_disk_without_transformers(family, monkeypatch):
    before = family.base

    def no_encoder():
        raise AssertionError("the encoder must not run when the cache is on disk")

    monkeypatch.setattr(text, "_encoder", no_encoder)
    _clear_caches()
    again = text.make_family(SMALL).base
    assert torch.equal(again.train[0], before.train[0]) and torch.equal(again.test[1], before.test[1])
    assert torch.equal(again.model_fn(3).blocks[0].query.weight, before.model_fn(3).blocks[0].query.weight)


def test_a_few_adamw_steps_lower_the_loss(family, one_thread):
    task = family.base
    model = task.model_fn(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    x, y = task.train[0][:12], task.train[1][:12]
    first = task.loss(model(x), y).item()
    for _ in range(5):
        loss = task.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert task.loss(model(x), y).item() < 0.8 * first


def test_l3rs_unroll_gives_finite_first_order_meta_gradients(family, one_thread):
    task, config = family.sample(0), Config()
    meta = config.init_meta(sum(p.requires_grad for p in task.model_fn(0).parameters()), seed=0)
    vector = mixer.flatten(meta).requires_grad_(True)
    value, particle = unroll(task, mixer.unflatten(vector, meta), 1e-4, 3, seed=1, config=config,
                             horizon=SMALL.horizon, graph="first")
    grad = torch.autograd.grad(value, vector)[0]
    assert torch.isfinite(value) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    moved = particle.params["blocks.0.ffn_out.weight"] - task.model_fn(1).blocks[0].ffn_out.weight
    assert moved.abs().max() > 0  # the pretrained block is fine-tuned too, not only the head


def test_family_samples_subsets_of_the_main_training_split(family, heldout):
    base_rows, held_rows = _rows(family.base.train[0]), set()
    for pair in (heldout.base.train, heldout.base.val, heldout.base.test):
        held_rows |= _rows(pair[0])
    for seed in range(4):
        task = family.sample(seed)
        rows = _rows(task.train[0])
        assert rows <= base_rows and not rows & held_rows
        assert len(task.train[0]) == round(SMALL.subset * len(family.base.train[0]))
        assert torch.equal(task.val[0], family.base.val[0])
    assert not torch.equal(family.sample(0).train[0], family.sample(1).train[0])
    assert not torch.equal(family.sample(0).model_fn(0).fc.weight, family.sample(1).model_fn(0).fc.weight)
    assert heldout.base.meta["topics"] == list(SMALL.heldout_topics)
    shapes = {n: p.shape for n, p in family.base.model_fn(0).named_parameters()}
    assert shapes == {n: p.shape for n, p in heldout.base.model_fn(0).named_parameters()}  # one optimizer fits both


def test_the_fewer_shift_trains_on_a_fixed_quarter_of_the_main_training_texts(family):
    fewer = text.make_family(SMALL, shift="fewer")
    assert fewer.name == f"{SMALL.name}:fewer" and fewer.base.meta["shift"] == "fewer"
    assert len(fewer.base.train[0]) == round(0.25 * len(family.base.train[0]))
    assert _rows(fewer.base.train[0]) <= _rows(family.base.train[0])
    assert torch.equal(fewer.base.val[0], family.base.val[0]) and torch.equal(fewer.base.test[0], family.base.test[0])
    assert _rows(fewer.sample(0).train[0]) <= _rows(fewer.base.train[0])
    assert "inputs_from" not in fewer.base.meta  # a subset: the fingerprint hashes its values
    assert f"{text.RECIPE.name}:fewer" in T.names() and "fewer" in SHIFT_SCENARIOS


def test_the_fingerprint_hashes_what_the_inputs_are_encoded_from_not_their_machine_rounded_values(family, heldout):
    from l3rs.evaluate.reuse import task_fingerprint

    base = family.base
    assert base.meta["inputs_from"] == text.inputs_from(SMALL, False) != heldout.base.meta["inputs_from"]
    assert "inputs_from" not in family.sample(0).meta  # a training subset: hashed by value
    print_ = task_fingerprint(base, 0)
    x, y = base.val
    rounded = replace(base, val=(x * (1 + 1e-6), y))  # the same texts encoded on another CPU
    assert task_fingerprint(rounded, 0) == print_
    assert task_fingerprint(replace(base, val=(x, y.roll(1))), 0) != print_  # the targets still count
    assert task_fingerprint(replace(base, meta={**base.meta, "inputs_from": "other"}), 0) != print_
    unnamed = replace(base, meta={k: v for k, v in base.meta.items() if k != "inputs_from"})
    assert task_fingerprint(replace(unnamed, val=(x * (1 + 1e-6), y)), 0) != task_fingerprint(unnamed, 0)


def test_heldout_topics_and_texts_are_disjoint_from_the_main_task():
    recipe = text.RECIPE
    assert not set(recipe.topics) & set(recipe.heldout_topics)
    main = text.select(recipe.topics, recipe.per_class, recipe.split_seed)
    held = text.select(recipe.heldout_topics, recipe.heldout_per_class, recipe.split_seed)
    main_texts = [t for texts, _ in main for t in texts]
    held_texts = [t for texts, _ in held for t in texts]
    assert len(set(main_texts)) == len(main_texts) and len(set(held_texts)) == len(held_texts)
    assert not set(main_texts) & set(held_texts)
    for (texts, labels), size in zip(main, recipe.per_class, strict=True):
        assert len(texts) == size * len(recipe.topics) and torch.tensor(labels).bincount().eq(size).all()
    assert text.select(recipe.topics, recipe.per_class, recipe.split_seed) == main  # fixed splits


def test_tasks_pickle_for_worker_processes(family):
    task = family.sample(2)
    clone = pickle.loads(pickle.dumps(task))
    assert torch.equal(clone.model_fn(5).fc.weight, task.model_fn(5).fc.weight)


def test_registered_listed_and_its_shift_picked_by_evaluate():
    assert {"minilm-chatterbot", "minilm-chatterbot:heldout"} <= set(T.names())
    offered = [s for s in SHIFT_SCENARIOS if f"minilm-chatterbot:{s}" in T.names()]  # --shifts auto
    assert offered == ["heldout", "fewer"]
    proc = subprocess.run([sys.executable, "-m", "l3rs", "tasks"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert "MiniLM" in lines["minilm-chatterbot"] and "held-out topics" in lines["minilm-chatterbot:heldout"]
    assert "a quarter of the training texts" in lines["minilm-chatterbot:fewer"]


def test_fewer_held_out_topics_than_main_ones_keep_the_main_head(one_thread):
    fewer = replace(SMALL, heldout_topics=SMALL.heldout_topics[:3])
    task = text.make_family(fewer, heldout=True).base
    assert int(task.train[1].max()) == 2 and task.meta["num_classes"] == 3
    assert task.model_fn(0).fc.weight.shape == (len(SMALL.topics), 384)  # one optimizer fits both
    with pytest.raises(ValueError, match="at most 6"):
        replace(SMALL, heldout_topics=SMALL.topics + ("humor",))


def test_twelve_topics_variant_holds_out_other_topics_and_fits_the_corpus():
    recipe = text.TOPICS12_RECIPE
    assert {"minilm-chatterbot12", "minilm-chatterbot12:heldout"} <= set(T.names())
    assert len(recipe.topics) == 12 and not set(recipe.topics) & set(recipe.heldout_topics)
    for topics, per_class in ((recipe.topics, recipe.per_class), (recipe.heldout_topics, recipe.heldout_per_class)):
        splits = text.select(topics, per_class, recipe.split_seed)
        assert [len(texts) for texts, _ in splits] == [n * len(topics) for n in per_class]
        assert not set(splits[0][0]) & (set(splits[1][0]) | set(splits[2][0]))  # no text in two splits


@pytest.mark.slow
def test_the_full_registered_task_builds():
    task = T.get("minilm-chatterbot")
    heldout = T.get("minilm-chatterbot:heldout")
    assert [len(p[0]) for p in (task.train, task.val, task.test)] == [300, 180, 180]
    assert [len(p[0]) for p in (heldout.train, heldout.val, heldout.test)] == [150, 60, 60]
    assert not _rows(task.train[0]) & _rows(heldout.test[0])


def test_top3_variant_fine_tunes_three_blocks_on_the_same_data(family, one_thread):
    assert {"minilm-top3-chatterbot", "minilm-top3-chatterbot:heldout"} <= set(T.names())
    top3 = replace(text.TOP3_RECIPE, **{k: getattr(SMALL, k) for k in ("per_class", "heldout_per_class",
                                                                        "batch_size", "horizon")})
    assert replace(top3, name=SMALL.name, trainable_blocks=1) == SMALL  # only the name and the blocks differ
    task, one = text.make_family(top3).base, family.base
    assert torch.equal(task.train[1], one.train[1]) and task.train[0].shape == one.train[0].shape
    assert not torch.allclose(task.train[0], one.train[0])  # the output of 3 frozen blocks, not of 5
    model, small = task.model_fn(0), one.model_fn(0)
    assert len(model.blocks) == 3 and sum(p.numel() for p in model.parameters()) > 2.9 * sum(
        p.numel() for p in small.parameters())
    assert torch.equal(model.blocks[2].ffn_in.weight, small.blocks[0].ffn_in.weight)  # MiniLM's top block on top
    assert not torch.equal(model.blocks[0].ffn_in.weight, small.blocks[0].ffn_in.weight)
    assert torch.isfinite(model(task.val[0])).all()
