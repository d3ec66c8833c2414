"""Tests of the task layer (l3rs.tasks): built-in tasks, seeding, lookup, errors, functional unrolls."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import l3rs.tasks as T
from l3rs.tasks import backbones, data, pretraining
from l3rs.tasks.core import TaskError, UnknownTaskError

BASE_TASKS = ["mnistcnn-digits", "cnn04-mnist59", "cnn04-digits", "mlp-mnist1d-shift", "mlp-mnist1d-warp",
              "effnet-mnist"]


@pytest.fixture(autouse=True)
def _offline_tiny_cache(tmp_path, monkeypatch):
    """Offline hub, a private cache per test and tiny pretraining, so tests never depend on each other."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("L3RS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("L3RS_PRETRAIN_STEPS", "5")


def _finetune(model: nn.Module, task: T.Task, steps: int, lr: float = 1e-3, seed: int = 0) -> dict:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for x, y in task.batches(seed, steps):
        loss = task.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return task.evaluate(model)


# --- built-in tasks -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BASE_TASKS)
def test_builtin_task_loads_and_runs_forward(name):
    task = T.get(name)
    assert name in T.names()
    model = task.model_fn(0)
    task.check_head(model)
    model.eval()
    with torch.no_grad():
        out = model(task.val[0][:4])
    assert out.shape == (4, task.meta["num_classes"])
    assert torch.isfinite(out).all()
    assert task.test is not None and len(task.train[0]) > task.batch_size
    assert int(task.train[1].max()) < task.meta["num_classes"]


def test_cnn04_digits_reuses_the_cnn04_backbone_with_a_ten_way_head():
    digits, mnist59 = T.get("cnn04-digits").model_fn(0), T.get("cnn04-mnist59").model_fn(0)
    same = {k: v for k, v in mnist59.state_dict().items() if k.startswith("features.")}
    assert same and all(torch.equal(v, digits.state_dict()[k]) for k, v in same.items())  # pretraining seed 0
    assert digits.fc.weight.shape == (10, mnist59.fc.weight.shape[1]) and mnist59.fc.weight.shape[0] == 5
    assert T.get("cnn04-digits:heldout").meta["pretrain_seed"] == 3


def test_mlp_mnist1d_warp_is_a_fine_tuning_gap_for_the_mlp1d_backbone(monkeypatch):
    monkeypatch.delenv("L3RS_PRETRAIN_STEPS")  # the shipped backbone, not the fixture's tiny pretraining
    model = pretraining.pretrained_model("mlp1d", 0).eval()  # its own pretraining head: zero-shot
    warp, shift = T.get("mlp-mnist1d-warp"), T.get("mlp-mnist1d-shift")
    held_out = pretraining.pretrain_data("mnist1d-base")[1]
    with torch.no_grad():
        acc = {k: (model(x).argmax(1) == y).float().mean().item() for k, (x, y) in
               {"warp": warp.val, "base": held_out}.items()}
    assert 0.2 < acc["warp"] < acc["base"] - 0.1  # above chance (0.1), below the data it was pretrained on (~0.70)
    assert warp.train[0].shape[1] == shift.train[0].shape[1] and not torch.equal(warp.val[0][:5], shift.val[0][:5])


def test_variants_are_listed_and_shift_the_data():
    base = T.get("mnistcnn-digits")
    rotated, inverted, permuted = (T.get(f"mnistcnn-digits:{s}") for s in ("rotated", "inverted", "permuted"))
    assert {"mnistcnn-digits:rotated", "cnn04-mnist59:heldout", "mlp-mnist1d-shift:permuted"} <= set(
        T.names()
    )
    assert rotated.train[0].shape == base.train[0].shape
    assert torch.equal(rotated.train[1], base.train[1])
    assert not torch.allclose(rotated.train[0], base.train[0])
    assert not torch.allclose(inverted.train[0], base.train[0])
    assert torch.equal(permuted.train[0], base.train[0])
    assert (permuted.train[1] != base.train[1]).all()  # a permutation without fixed points
    fewer = T.get("mnistcnn-digits:fewer")  # a fixed quarter of the training examples, the same val and test sets
    rows = {r.numpy().tobytes() for r in base.train[0]}
    assert len(fewer.train[0]) == round(0.25 * len(base.train[0])) and fewer.meta["shift"] == "fewer"
    assert all(r.numpy().tobytes() in rows for r in fewer.train[0])
    assert torch.equal(fewer.val[0], base.val[0]) and torch.equal(fewer.test[0], base.test[0])
    assert torch.equal(T.get("mnistcnn-digits:fewer").train[0], fewer.train[0])  # the same quarter every time
    sample = T.family("mnistcnn-digits:fewer").sample(3)  # its family subsets the quarter, as every family does
    assert {r.numpy().tobytes() for r in sample.train[0]} <= {r.numpy().tobytes() for r in fewer.train[0]}


def test_mnist_cnn_scores_95_on_mnist5k_and_has_a_gap_on_digits():
    model = backbones.mnist_cnn().eval()
    x, y = data.mnist5k()
    with torch.no_grad():
        mnist_acc = (model(data.normalize_mnist(x)).argmax(1) == y).float().mean().item()
        dx, dy = data.digits28()
        digits_acc = (model(data.normalize_mnist(dx)).argmax(1) == dy).float().mean().item()
    assert len(y) == 5000
    assert mnist_acc >= 0.95
    assert 0.7 < digits_acc < 0.9  # the documented ~82% zero-shot: a real fine-tuning gap


def test_pretrained_backbone_beats_random_init_after_50_steps():
    task = T.get("mnistcnn-digits")
    pretrained = _finetune(task.model_fn(0), task, steps=50)
    torch.manual_seed(0)
    scratch = _finetune(backbones.MnistCNN(), task, steps=50)
    assert pretrained["metric"] > scratch["metric"] + 0.05  # measured: 0.98 vs 0.87
    assert pretrained["loss"] < 0.5 * scratch["loss"]  # measured: 0.06 vs 0.38


# --- seeding --------------------------------------------------------------------------------------
def test_same_seed_same_head_and_batches_different_seed_different():
    task = T.get("mnistcnn-digits")
    a, b, c = task.model_fn(1), task.model_fn(1), task.model_fn(2)
    for name in task.head:
        pa, pb, pc = (dict(m.named_parameters())[name] for m in (a, b, c))
        assert torch.equal(pa, pb)
        assert not torch.equal(pa, pc)
    body = "conv_layers.0.weight"
    assert torch.equal(dict(a.named_parameters())[body], dict(c.named_parameters())[body])

    i1, i2, i3 = task.batch_indices(5, 40), task.batch_indices(5, 40), task.batch_indices(6, 40)
    assert i1.shape == (40, task.batch_size) and i1.dtype == torch.long
    assert torch.equal(i1, i2) and not torch.equal(i1, i3)
    n = len(task.train[0])
    epoch = i1.flatten()[:n]  # the first epoch is a permutation of the training set
    assert torch.equal(epoch.sort().values, torch.arange(n))
    x, y = next(task.batches(5, 1))
    assert torch.equal(x, task.train[0][i1[0]]) and torch.equal(y, task.train[1][i1[0]])


def test_family_samples_are_seeded_and_hold_out_pretraining_seeds():
    fam = T.family("cnn04-mnist59")
    assert fam.held_out_seeds == (3,)
    s1, s2, s3 = fam.sample(4), fam.sample(4), fam.sample(5)
    assert torch.equal(s1.train[0], s2.train[0]) and not torch.equal(s1.train[0], s3.train[0])
    assert len(s1.train[0]) < len(fam.base.train[0])
    seeds = {fam.sample(s).meta["pretrain_seed"] for s in range(9)}
    assert seeds == {0, 1, 2}
    held = T.family("cnn04-mnist59:heldout")
    assert {held.sample(s).meta["pretrain_seed"] for s in range(4)} == {3}
    assert held.base.meta["pretrain_seed"] == 3
    w = [dict(t.model_fn(0).named_parameters())["fc.weight"] for t in (s1, s2, s3)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])
    copy = pickle.loads(pickle.dumps(fam)).sample(4)  # families and tasks travel to worker processes
    assert torch.equal(dict(copy.model_fn(0).named_parameters())["fc.weight"], w[0])


def test_pretrain_is_reproducible_cached_and_atomic(tmp_path):
    p1 = T.pretrain("cnn04", seed=1, steps=5, progress=False)
    first = load_file(str(p1))
    mtime = p1.stat().st_mtime_ns
    assert T.pretrain("cnn04", seed=1, steps=5, progress=False).stat().st_mtime_ns == mtime  # cached
    p2 = T.pretrain("cnn04", seed=1, steps=5, progress=False, force=True)
    again = load_file(str(p2))
    other = load_file(str(T.pretrain("cnn04", seed=2, steps=5, progress=False)))
    assert p1 == p2 and p1.is_relative_to(T.cache_dir()) and T.cache_dir() == tmp_path / "cache"
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["fc.weight"], other["fc.weight"])
    record = json.loads(p1.with_suffix(".json").read_text())
    assert record["seed"] == 1 and record["spec"]["steps"] == 5 and 0.0 <= record["val_accuracy"] <= 1.0
    assert not [p for p in p1.parent.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(TaskError, match="unknown pretrained backbone 'nope'"):
        T.pretrain("nope")


@pytest.mark.parametrize("name", sorted(pretraining.SPECS))
def test_default_backbones_ship_and_load_without_pretraining(name, monkeypatch):
    """Pretraining depends on the thread count: the default settings' weights ship, so every machine gets them."""
    monkeypatch.delenv("L3RS_PRETRAIN_STEPS")
    spec = pretraining.resolve_spec(name)
    for seed in (0, 1, 2, 3):  # the families' pretraining seeds and the held-out one
        path = T.pretrain(name, seed, progress=False)
        assert path.parent == pretraining.SHIPPED
        record = json.loads(path.with_suffix(".json").read_text())
        assert record["seed"] == seed and record["spec"] == json.loads(json.dumps(dataclasses.asdict(spec)))
        assert record["val_accuracy"] > 0.5  # chance: 0.2 (cnn04), 0.1 (mlp1d; 0.69 is its level)
        model = T.pretrained_model(name, seed, progress=False)
        saved = load_file(str(path))
        assert saved.keys() == model.state_dict().keys()
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert not (T.cache_dir() / "pretrained").exists()  # nothing was pretrained
    with pytest.raises(TaskError, match="ships with l3rs"):
        T.pretrain(name, 0, force=True, progress=False)


def test_mnist1d_generation_leaves_global_rng_alone():
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    x, y = data.mnist1d(num_samples=100, seed=5)
    assert np.random.rand() == expected
    assert x.shape == (100, 40) and y.dtype == torch.long


# --- user tasks and errors ------------------------------------------------------------------------
def test_user_task_given_as_module_function(tiny_tasks):
    task = T.get(f"{tiny_tasks}:make_task")
    assert isinstance(task, T.Task) and task.name == "tiny"
    model = task.model_fn(0)
    task.check_head(model)
    result = task.evaluate(model)
    assert set(result) == {"loss", "metric"} and 0.0 <= result["metric"] <= 1.0
    assert T.get(f"{tiny_tasks}:make_family").name == "tiny"
    fam = T.family(f"{tiny_tasks}:make_task")
    w0, w1 = (dict(fam.sample(s).model_fn(0).named_parameters())["2.weight"] for s in (0, 1))
    assert torch.equal(fam.sample(0).train[0], task.train[0]) and not torch.equal(w0, w1)


def test_unknown_and_malformed_specs_give_clear_errors(tiny_tasks):
    with pytest.raises(UnknownTaskError) as info:
        T.get("no-such-task")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert "'no-such-task'" in str(info.value) and "mnistcnn-digits" in str(info.value)
    with pytest.raises(UnknownTaskError, match="mnistcnn-digits:sideways"):
        T.get("mnistcnn-digits:sideways")
    with pytest.raises(TaskError, match="malformed task spec 'a:b:c'.*cnn04-mnist59"):
        T.get("a:b:c")
    with pytest.raises(TaskError, match="cannot import module 'l3rs_no_such_module_xyz'.*effnet-mnist"):
        T.get("l3rs_no_such_module_xyz:make")
    with pytest.raises(TaskError, match="has no callable 'missing'"):
        T.get(f"{tiny_tasks}:missing")
    with pytest.raises(TaskError, match="returned int, expected"):
        T.get(f"{tiny_tasks}:not_a_task")


def test_bad_task_inputs_give_clear_errors():
    fn = lambda seed: nn.Linear(3, 2)  # noqa: E731
    good = (torch.zeros(10, 3), torch.zeros(10, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"train inputs and targets have different lengths.*\(10, 3\).*\(9,\)"
    ):
        T.Task("bad", fn, (torch.zeros(10, 3), torch.zeros(9)), good)
    with pytest.raises(ValueError, match="val must be an \\(inputs, targets\\) pair"):
        T.Task("bad", fn, good, torch.zeros(10))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        T.Task("bad", fn, good, good, batch_size=0)
    task = T.Task("ok", fn, good, good)
    with pytest.raises(ValueError, match=r"head parameter\(s\) \['fc.weight', 'fc.bias'\] not found"):
        task.check_head(fn(0))
    with pytest.raises(ValueError, match="has no 'test' split"):
        task.evaluate(fn(0), split="test")


# --- evaluation and functional unrolls ------------------------------------------------------------
def test_evaluate_restores_mode_and_weights_batches():
    task = T.get("mnistcnn-digits")
    model = task.model_fn(0).train()
    full = task.evaluate(model)
    small = task.evaluate(model, batch_size=64)
    assert model.training
    assert full["metric"] == pytest.approx(small["metric"]) and full["loss"] == pytest.approx(
        small["loss"], 1e-5
    )
    with torch.no_grad():
        logits = model.eval()(task.val[0])
    assert full["loss"] == pytest.approx(F.cross_entropy(logits, task.val[1]).item(), rel=1e-5)


def test_functional_model_batchnorm_three_unrolled_steps_have_finite_meta_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    model[0].bias.requires_grad_(False)  # a frozen parameter travels with the buffers
    params, buffers, call = T.functional_model(model)
    assert "0.bias" in buffers and "0.bias" not in params and "1.running_mean" in buffers
    assert all(p.requires_grad and p.is_leaf for p in params.values())
    log_lr = torch.tensor(-2.0, requires_grad=True)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    current = dict(params)
    for _ in range(3):
        loss = F.cross_entropy(call(current, buffers, x), y)
        grads = torch.autograd.grad(loss, list(current.values()), create_graph=True)
        current = {n: p - log_lr.exp() * g for (n, p), g in zip(current.items(), grads, strict=True)}
    final = F.cross_entropy(call(current, buffers, x), y)
    meta = torch.autograd.grad(final, [log_lr, *params.values()])
    assert all(torch.isfinite(g).all() for g in meta) and meta[0].abs() > 0
    assert torch.equal(model[1].running_mean, torch.zeros(4))  # the module's own buffers are untouched
    assert not torch.equal(buffers["1.running_mean"], torch.zeros(4))  # the explicit ones were updated


# --- command line ---------------------------------------------------------------------------------
def test_cli_lists_tasks_and_pretrains(capsys):
    from l3rs.cli import main

    assert main(["tasks"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in BASE_TASKS) and "mnistcnn-digits:rotated" in listed
    assert main(["pretrain", "mlp1d", "--seeds", "2", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "mlp1d seed 2:" in out and "held-out accuracy" in out
    assert T.pretrain("mlp1d", 2, steps=3, progress=False).is_file()
    assert main(["pretrain", "nope"]) == 2
    assert "unknown pretrained backbone 'nope'" in capsys.readouterr().err
