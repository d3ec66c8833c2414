"""Core: base directions, the functional L3RS step and the L3RS optimizer class."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import l3rs
from l3rs import bases, functional, mixer
from l3rs.optim import L3RS, CheckpointError


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, pass_loss: bool = True) -> list[float]:
    x, y = data()
    losses = []
    for i in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[i % 4 * 8 : i % 4 * 8 + 8]), y[i % 4 * 8 : i % 4 * 8 + 8])
        loss.backward()
        if isinstance(opt, L3RS) and pass_loss:
            opt.step(loss=loss.detach())
        else:
            opt.step()
        losses.append(loss.item())
    return losses


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


# ------------------------------------------------------------------ equivalence with torch.optim
@pytest.mark.parametrize(
    ("base", "reference"),
    [
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.05)),
        ("adam", lambda p: torch.optim.Adam(p, lr=0.01)),
    ],
)
def test_single_base_unnormalized_reproduces_torch(base, reference):
    ours, theirs = small_model(), small_model()
    lr = reference(theirs.parameters()).defaults["lr"]
    opt = L3RS(ours.named_parameters(), lr=lr, bases=(base,), normalize=False, weight_decay=0.0)
    train(ours, opt, 50)
    train(theirs, reference(theirs.parameters()), 50)
    assert max_diff(ours, theirs) < 1e-6
    assert max_diff(ours, small_model()) > 1e-3  # it actually moved


def test_snr_normalized_adam_alone_is_adam():
    ours, theirs = small_model(), small_model()
    opt = L3RS(ours.named_parameters(), lr=0.01, bases=("adam",), normalize="snr", schedule="constant",
               weight_decay=0.0)
    train(ours, opt, 50)
    train(theirs, torch.optim.Adam(theirs.parameters(), lr=0.01), 50)
    assert max_diff(ours, theirs) < 1e-6  # unit RMS times the Adam direction's RMS: Adam itself
    with pytest.raises(ValueError, match="add \"adam\""):
        L3RS(small_model().named_parameters(), bases=("sgd", "sign"), normalize="snr")


def test_momentum_base_is_ema_momentum_sgd():
    ours, theirs = small_model(), small_model()
    opt = L3RS(ours.named_parameters(), lr=0.1, bases=("momentum",), normalize=False, weight_decay=0.0)
    train(ours, opt, 50)
    x, y = data()
    bufs = [torch.zeros_like(p) for p in theirs.parameters()]
    for i in range(50):
        theirs.zero_grad()
        F.cross_entropy(theirs(x[i % 4 * 8 : i % 4 * 8 + 8]), y[i % 4 * 8 : i % 4 * 8 + 8]).backward()
        with torch.no_grad():
            for p, b in zip(theirs.parameters(), bufs, strict=True):
                b.mul_(0.9).add_(p.grad, alpha=0.1)
                p.sub_(0.1 * b)
    assert max_diff(ours, theirs) < 1e-6


def test_normalized_single_base_steps_by_exactly_lr_per_element():
    model = small_model()
    before = copy.deepcopy(model)
    opt = L3RS(model.named_parameters(), lr=1e-3, bases=("rmsprop",), weight_decay=0.0)
    train(model, opt, 1)
    for p, q in zip(model.parameters(), before.parameters(), strict=True):
        rms = (p - q).pow(2).mean().sqrt().item()
        assert rms == pytest.approx(1e-3, rel=1e-4)


def test_untrained_is_uniform_mix_with_step_size_lr():
    model = small_model()
    opt = L3RS(model.named_parameters(), lr=3e-3, total_steps=10, schedule="constant")
    train(model, opt, 3)
    coeffs = opt.coefficients()
    assert set(coeffs) == {n for n, _ in model.named_parameters()}
    for c in coeffs.values():
        assert c["lr"] == pytest.approx(3e-3)
        assert set(c["mix"]) == set(bases.DEFAULT)
        assert all(w == pytest.approx(0.2) for w in c["mix"].values())


def test_untrained_step_size_follows_the_base_schedule_at_any_horizon():
    """λ = lr · b(t/T): warm-up, then cosine decay to 0 at the end of the run, whatever T is."""
    for total in (20, 100):
        model = small_model()
        opt = L3RS(model.named_parameters(), lr=1e-2, total_steps=total)
        lrs = []
        for _ in range(total):
            train(model, opt, 1)
            lrs.append(next(iter(opt.coefficients().values()))["lr"])
        peak = max(range(total), key=lrs.__getitem__)
        assert lrs[peak] == pytest.approx(1e-2, rel=0.02)
        assert peak <= 0.1 * total  # warm-up is short
        assert total < 50 or lrs[0] < 0.5 * lrs[peak]  # (20 steps: warm-up is over after one)
        assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:], strict=False))  # then decays
        assert lrs[-1] < 1e-4  # to (almost) zero at T
        mid = lrs[total // 2 - 1]
        assert mid == pytest.approx(5e-3, rel=0.1)


@pytest.mark.parametrize("train_size, scale", [(None, 1.0), (400, 1.0), (800, 1.0), (300, 0.75**1.5),
                                               (100, 0.5**1.5)])  # a quarter steps as half does (the floor)
def test_a_smaller_training_set_steps_by_the_size_exponent(train_size, scale):
    """λ0 · (N / N_ref)^β below the reference size, N / N_ref floored at 1/2: the whole update (every direction
    and the weight decay) scales by it, the moments and features do not change."""
    config = functional.Config(reference_train_size=400, size_exponent=1.5)
    updates = []
    for size in (None, train_size):
        model = small_model()
        opt = L3RS(model.named_parameters(), lr=1e-2, total_steps=10, config=config, train_size=size)
        before = [p.detach().clone() for p in model.parameters()]
        train(model, opt, 1)
        updates.append([p.detach() - b for p, b in zip(model.parameters(), before, strict=True)])
    for full, small in zip(*updates, strict=True):
        torch.testing.assert_close(small, scale * full, rtol=1e-5, atol=1e-9)
    untrained = functional.Config()  # no reference size: the size changes nothing
    lams = [functional.coefficients(untrained, untrained.init_meta(1), torch.zeros(1, untrained.num_features), 1.0,
                                    total_steps=10, train_size=size)[0] for size in (None, 5)]
    assert torch.equal(*lams)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_train_size_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="train_size must be a positive int or None"):
        L3RS(small_model().named_parameters(), train_size=bad)
    with pytest.raises(ValueError, match="reference_train_size must be positive"):
        functional.Config(reference_train_size=0)
    with pytest.raises(ValueError, match="size_exponent must be finite and >= 0"):
        functional.Config(size_exponent=-1.0)


# ------------------------------------------------------------------------------ bases
def test_registry_has_required_bases():
    for name in ("sgd", "momentum", "adam", "rmsprop", "sign", "nesterov", "adabelief", "to_init", "ortho"):
        assert name in bases.available()
    assert bases.needs(bases.DEFAULT) == {"m", "v"}
    with pytest.raises(ValueError, match="unknown base direction 'adamw'"):
        bases.get("adamw")


@pytest.mark.parametrize("name", bases.available())
def test_every_base_gives_finite_directions(name):
    model = small_model()
    opt = L3RS(model.named_parameters(), lr=1e-2, bases=(name,))
    before = copy.deepcopy(model)
    train(model, opt, 3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if name != "to_init":  # to_init stays put from the pretrained weights, by design
        assert max_diff(model, before) > 0


def test_to_init_pulls_back_toward_pretrained_weights():
    model = small_model()
    theta0 = [p.detach().clone() for p in model.parameters()]
    opt = L3RS(model.named_parameters(), lr=1e-2, bases=("to_init",), normalize=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # moved away after the optimizer recorded theta0
    dist = sum((p - q).norm() for p, q in zip(model.parameters(), theta0, strict=True))
    train(model, opt, 5)
    after = sum((p - q).norm() for p, q in zip(model.parameters(), theta0, strict=True))
    assert after < dist


def test_default_base_set_keeps_exactly_two_buffers_per_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(100, 200), torch.nn.Linear(200, 50))
    opt = L3RS(model.named_parameters(), lr=1e-3)
    train_model = model
    x = torch.randn(4, 100)
    for _ in range(3):
        opt.zero_grad()
        loss = train_model(x).pow(2).mean()
        loss.backward()
        opt.step(loss=loss.detach())
    n_params = sum(p.numel() for p in model.parameters())
    per_param = sum(v.numel() for p in opt._params for v in opt.state[p].values())
    assert per_param == 2 * n_params
    global_bytes = sum(v.numel() for v in opt.state["l3rs"]["features"].values())
    assert global_bytes <= 16 * len(opt._params) + 8  # O(number of tensors), not O(parameters)
    opt_to_init = L3RS(model.named_parameters(), lr=1e-3, bases=(*bases.DEFAULT, "to_init"))
    assert sum(v.numel() for p in opt_to_init._params for v in opt_to_init.state[p].values()) == 3 * n_params


# ------------------------------------------------------------------ state and reliability
def test_state_dict_round_trip_gives_bit_identical_continuation():
    model = small_model()
    opt = L3RS(model.named_parameters(), lr=1e-2, total_steps=40)
    train(model, opt, 20)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = opt.state_dict()
    train(model, opt, 20)

    resumed = small_model(seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = L3RS(resumed.named_parameters(), lr=1e-2, total_steps=40, seed=7)  # different fresh meta
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, 20)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters(), strict=True))
    assert opt2.step_count == opt.step_count == 40


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_the_step(bad):
    model = small_model()
    opt = L3RS(model.named_parameters(), lr=1e-2)
    train(model, opt, 2)
    before = copy.deepcopy(model)
    state_before = {k: v.clone() for k, v in opt.state[opt._params[0]].items()}
    opt.zero_grad()
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = bad
    opt.step()
    assert max_diff(model, before) == 0
    assert opt.skipped_steps == 1 and opt.step_count == 2
    assert all(torch.equal(v, state_before[k]) for k, v in opt.state[opt._params[0]].items())
    train(model, opt, 1)
    assert opt.step_count == 3


def test_frozen_tensors_are_skipped_and_unnamed_params_rejected():
    model = small_model()
    model[0].weight.requires_grad_(False)
    opt = L3RS(model.named_parameters(), lr=1e-2)
    assert "0.weight" not in opt.param_names
    frozen = model[0].weight.clone()
    train(model, opt, 2)
    assert torch.equal(model[0].weight, frozen)
    with pytest.raises(TypeError, match="named_parameters"):
        L3RS(model.parameters(), lr=1e-2)


def test_param_groups_scale_step_size():
    model = small_model()
    groups = [{"params": list(model[0].named_parameters(prefix="0")), "lr": 1e-2},
              {"params": list(model[2].named_parameters(prefix="2")), "lr": 1e-3}]
    opt = L3RS(groups, lr=5e-3)
    train(model, opt, 1)
    coeffs = opt.coefficients()
    assert coeffs["0.weight"]["lr"] == pytest.approx(1e-2)
    assert coeffs["2.weight"]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "lr must be a positive"),
        ({"lr": 1e-3, "total_steps": 0}, "total_steps"),
        ({"lr": 1e-3, "mix": "max"}, "mix must be one of"),
        ({"lr": 1e-3, "bases": ("sgd", "lion")}, "unknown base direction 'lion'"),
        ({"lr": 1e-3, "unknown": "zero"}, "unknown must be one of"),
        ({"lr": 1e-3, "average": 1.5}, "average must be a fraction"),
    ],
)
def test_argument_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        L3RS(small_model().named_parameters(), **kwargs)


@pytest.mark.parametrize(
    ("group", "message"),
    [
        ({"lr": 0.0}, "lr of param group 1 must be a positive"),
        ({"weight_decay": -0.1}, "weight_decay of param group 1 must be a finite number >= 0"),
        ({"weight_decay": float("nan")}, "weight_decay of param group 1"),
    ],
)
def test_param_group_options_are_validated(group, message):
    model = small_model()
    groups = [{"params": list(model[0].named_parameters(prefix="0"))},
              {"params": list(model[2].named_parameters(prefix="2")), **group}]
    with pytest.raises(ValueError, match=message):
        L3RS(groups, lr=1e-3)


# --------------------------------------------------------------------------- averaged weights
def plainly_trained(steps: int) -> tuple[torch.nn.Module, L3RS]:
    model = small_model()
    opt = L3RS(model.named_parameters(), lr=1e-2, total_steps=40)
    train(model, opt, steps)
    return model, opt


def test_averaged_weights_are_swapped_in_by_eval_and_out_by_train():
    model = small_model()
    opt = L3RS(model.named_parameters(), lr=1e-2, total_steps=40, average=0.25)
    expected = [p.detach().clone() for p in model.parameters()]  # the mean of the iterates, then an EMA
    for k in range(1, 21):
        for e, q in zip(expected, plainly_trained(k)[0].parameters(), strict=True):
            e.lerp_(q.detach(), max(1 / (k + 1), 1 / 10))  # window 0.25 * 40 = 10 steps
    train(model, opt, 20)
    reference, plain = plainly_trained(20)
    assert max_diff(model, reference) == 0  # averaging never changes the trained weights
    opt.eval()
    opt.eval()  # twice changes nothing
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="call train"):
        train(model, opt, 1)
    opt.train()
    assert max_diff(model, reference) == 0
    plain.eval()  # without averaging there is nothing to swap
    assert max_diff(model, reference) == 0


def test_averaged_weights_survive_a_state_dict_round_trip():
    model = small_model()
    opt = L3RS(model.named_parameters(), lr=1e-2, total_steps=40, average=0.25)
    train(model, opt, 10)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), opt.state_dict()
    train(model, opt, 10)
    opt.eval()
    resumed = small_model(seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = L3RS(resumed.named_parameters(), lr=1e-2, total_steps=40, average=0.25)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, 10)
    opt2.eval()
    assert max_diff(model, resumed) == 0


# ------------------------------------------------------------------------- checkpoints
def trained_like_optimizer(model: torch.nn.Module, **kwargs) -> L3RS:
    opt = L3RS(model.named_parameters(), lr=2e-3, total_steps=30, **kwargs)
    g = torch.Generator().manual_seed(3)
    for v in opt.meta.values():  # make the mixer non-trivial, as after meta-training
        v.add_(0.3 * torch.randn(v.shape, generator=g))
    return opt


def test_save_and_load_round_trip(tmp_path):
    model = small_model()
    opt = trained_like_optimizer(model)
    opt.save_pretrained(tmp_path / "opt", task="unit-test")
    doc = json.loads((tmp_path / "opt" / "optimizer.json").read_text())
    assert doc["tensor_names"] == [n for n, _ in model.named_parameters()]
    assert doc["config"]["bases"] == list(bases.DEFAULT) and doc["task"] == "unit-test"

    a, b = small_model(), small_model()
    opt_a = L3RS(a.named_parameters(), lr=2e-3, total_steps=30, meta=opt.meta)
    opt_b = L3RS.from_pretrained(tmp_path / "opt", b.named_parameters())
    assert opt_b.total_steps == 30 and opt_b.defaults["lr"] == pytest.approx(2e-3)
    assert opt_a.coefficients() == opt_b.coefficients()
    train(a, opt_a, 10)
    train(b, opt_b, 10)
    assert max_diff(a, b) == 0


def test_head_tensors_step_at_once_and_travel_with_the_optimizer(tmp_path):
    """With backbone_warmup, the tensors named as head keep their λ while the others start at 1/(w·T+1) of it;
    the names are saved with the optimizer and come back with it (an optimizer saved without them: none)."""
    config = functional.Config(backbone_warmup=0.5)
    model = small_model()
    names = [n for n, _ in model.named_parameters()]
    head = names[-2:]
    opt = L3RS(model.named_parameters(), lr=1e-2, total_steps=20, config=config, head=head)
    plain = L3RS(small_model().named_parameters(), lr=1e-2, total_steps=20, config=config)
    for name in names:
        expected = plain.coefficients()[name]["lr"] * (1.0 if name in head else 1 / 11)
        assert opt.coefficients()[name]["lr"] == pytest.approx(expected, rel=1e-6)
    opt.save_pretrained(tmp_path / "opt")
    assert json.loads((tmp_path / "opt" / "optimizer.json").read_text())["head_tensors"] == head
    loaded = L3RS.from_pretrained(tmp_path / "opt", small_model().named_parameters())
    assert loaded.coefficients() == opt.coefficients()
    a, b = small_model(), small_model()
    train(a, L3RS(a.named_parameters(), lr=1e-2, total_steps=20, config=config, head=head), 5)
    train(b, L3RS.from_pretrained(tmp_path / "opt", b.named_parameters()), 5)
    assert max_diff(a, b) == 0
    doc = json.loads((tmp_path / "opt" / "optimizer.json").read_text())
    del doc["head_tensors"]
    (tmp_path / "opt" / "optimizer.json").write_text(json.dumps(doc))
    older = L3RS.from_pretrained(tmp_path / "opt", small_model().named_parameters())
    assert older.coefficients() == plain.coefficients()


def test_mismatched_model_is_a_clear_error_unless_policy_given(tmp_path):
    trained_like_optimizer(small_model()).save_pretrained(tmp_path / "opt")
    other = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5),
                                torch.nn.Linear(5, 2))
    with pytest.raises(CheckpointError) as err:
        L3RS.from_pretrained(tmp_path / "opt", other.named_parameters())
    msg = str(err.value)
    assert "3.weight" in msg and "3.bias" in msg and "2.weight (3, 16) vs model (5, 16)" in msg
    opt = L3RS.from_pretrained(tmp_path / "opt", other.named_parameters(), unknown="mean")
    emb = opt.meta["embedding"]
    assert torch.allclose(emb[opt.param_names.index("3.bias")], emb[opt.param_names.index("2.weight")])
    train_other = opt.coefficients()
    assert set(train_other) == {n for n, _ in other.named_parameters()}


def test_corrupt_and_pickled_checkpoints_are_refused(tmp_path):
    model = small_model()
    good = tmp_path / "good"
    trained_like_optimizer(model).save_pretrained(good)

    bad_weights = tmp_path / "bad_weights"
    bad_weights.mkdir()
    (bad_weights / "optimizer.json").write_text((good / "optimizer.json").read_text())
    (bad_weights / "optimizer.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        L3RS.from_pretrained(bad_weights, model.named_parameters())

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "optimizer.json").write_text((good / "optimizer.json").read_text())
    torch.save({"embedding": torch.zeros(3)}, pickled / "optimizer.safetensors")  # a pickle in disguise
    with pytest.raises(CheckpointError, match="corrupt"):
        L3RS.from_pretrained(pickled, model.named_parameters())

    only_pickle = tmp_path / "only_pickle"
    only_pickle.mkdir()
    torch.save(model.state_dict(), only_pickle / "optimizer.pt")
    with pytest.raises(CheckpointError, match="never unpickles"):
        L3RS.from_pretrained(only_pickle, model.named_parameters())

    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "optimizer.safetensors").write_bytes((good / "optimizer.safetensors").read_bytes())
    (bad_json / "optimizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        L3RS.from_pretrained(bad_json, model.named_parameters())

    with pytest.raises(CheckpointError, match="no optimizer directory"):
        L3RS.from_pretrained(tmp_path / "missing", model.named_parameters())


# ------------------------------------------------------------- differentiable functional step
def unrolled_loss(meta: dict, config: functional.Config, steps: int = 4) -> torch.Tensor:
    model = small_model()
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    x, y = data()
    state = functional.init(config, params)
    for i in range(steps):
        out = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (x[i * 8 : i * 8 + 8],))
        loss = F.cross_entropy(out, y[i * 8 : i * 8 + 8])
        grads = list(torch.autograd.grad(loss, params, create_graph=True))
        grads[-1] = grads[-1] * 0  # a zero gradient: sqrt(v) at v == 0 must not give NaN second-order terms
        updates, state, _ = functional.update(config, meta, grads, state, params, lr=1e-2, loss=loss,
                                              total_steps=steps)
        params = functional.apply_updates(params, updates)
    out = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (x,))
    return F.cross_entropy(out, y)


@pytest.mark.parametrize("mix", ["softmax", "linear"])
def test_meta_gradients_flow_through_unrolled_steps(mix):
    config = functional.Config(mix=mix, reference_horizon=2)  # a run of 2x its horizon: long_mix takes part
    meta = config.init_meta(4, seed=0)
    g = torch.Generator().manual_seed(0)
    meta = {k: (v + 0.1 * torch.randn(v.shape, generator=g)).requires_grad_(True) for k, v in meta.items()}
    loss = unrolled_loss(meta, config)
    grads = torch.autograd.grad(loss, list(meta.values()))
    for name, grad in zip(meta, grads, strict=True):
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


def test_flatten_unflatten_round_trip():
    meta = functional.Config().init_meta(5)
    vec = mixer.flatten(meta)
    assert vec.numel() == mixer.num_params(meta)
    back = mixer.unflatten(vec, meta)
    assert all(torch.equal(back[k], meta[k]) for k in meta)
    with pytest.raises(ValueError, match="entries"):
        mixer.unflatten(vec[:-1], meta)


def test_public_api_names():
    assert l3rs.L3RS is L3RS
    assert callable(l3rs.bases.available)


def test_atomic_writes_leave_files_readable_by_others(tmp_path):
    from l3rs.io import save_json

    path = save_json({"a": 1}, tmp_path / "x.json")
    assert path.stat().st_mode & 0o777 == 0o644
