"""The standard optimizer contract: weight decay, add_param_group, distributed checkpoints, low-precision
weights, observe_loss, wrapper name prefixes, one device, learned λ for loggers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from l3rs import functional
from l3rs.functional import Config
from l3rs.optim import L3RS, CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def loss_of(model: torch.nn.Module, i: int) -> torch.Tensor:
    x, y = batch(i)
    return F.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y)


def feature_sensitive(model: torch.nn.Module, **kwargs) -> L3RS:
    """An L3RS whose mixer reacts to its features, as after meta-training (the last layer is not zero)."""
    opt = L3RS(model.named_parameters(), lr=1e-2, total_steps=40, **kwargs)
    g = torch.Generator().manual_seed(3)
    for v in opt.meta.values():
        v.add_(0.5 * torch.randn(v.shape, generator=g))
    return opt


def run(model: torch.nn.Module, opt: L3RS, steps: int, start: int = 0, observe: bool = False) -> None:
    for i in range(start, start + steps):
        opt.zero_grad()
        loss = loss_of(model, i)
        loss.backward()
        if observe:
            opt.observe_loss(loss)
            opt.step()
        else:
            opt.step(loss=loss.detach())


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# --------------------------------------------------------------------------------------- weight decay
def test_weight_decay_is_decoupled_per_group_and_scales_with_lr0():
    decayed, plain, default = small_model(), small_model(), small_model()
    lr, wd = 1e-2, 0.5
    groups = [{"params": list(decayed[0].named_parameters(prefix="0")), "weight_decay": wd},
              {"params": list(decayed[2].named_parameters(prefix="2")), "weight_decay": 0.0}]
    opt_d = L3RS(groups, lr=lr)
    opt_p = L3RS(plain.named_parameters(), lr=lr, weight_decay=0.0)
    opt_default = L3RS(default.named_parameters(), lr=lr)  # None: the config's own decay, on every tensor
    before = copy.deepcopy(decayed)
    for model, opt in ((decayed, opt_d), (plain, opt_p), (default, opt_default)):
        run(model, opt, 1)
    # the first step's update does not depend on the decay, so the difference is the decay alone
    # (no total_steps: the base schedule is 1)
    own = opt_default.config.weight_decay
    assert own == Config().weight_decay > 0
    for name, p in decayed.named_parameters():
        q, p0 = dict(plain.named_parameters())[name], dict(before.named_parameters())[name]
        expected = -lr * wd * p0 if name.startswith("0.") else torch.zeros_like(p0)
        torch.testing.assert_close(p - q, expected, atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(dict(default.named_parameters())[name] - q, -lr * own * p0, atol=1e-7, rtol=1e-4)
    assert opt_default.param_groups[0]["weight_decay"] is None
    with pytest.raises(ValueError, match="weight_decay"):
        L3RS(small_model().named_parameters(), weight_decay=-1.0)


def test_weight_decay_leaves_tensors_without_a_gradient_alone():
    model = small_model()
    opt = L3RS(model.named_parameters(), lr=1e-2, weight_decay=0.5)
    loss_of(model, 0).backward()
    model[0].weight.grad = None  # frozen for this step (e.g. a branch the batch did not reach)
    frozen, moving = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    opt.step()
    assert torch.equal(model[0].weight, frozen) and not torch.equal(model[2].weight, moving)


def test_weight_decay_follows_the_base_schedule():
    config, lr, total = Config(), 1e-2, 10
    params = [p.detach() for p in small_model().parameters()]
    meta = config.init_meta(len(params))
    state = functional.init(config, params)
    for _ in range(3):  # a few steps in: past the warm-up, the schedule is below 1
        grads = [torch.randn_like(p) for p in params]
        updates, state, _ = functional.update(config, meta, grads, state, params, lr=lr, total_steps=total)
        params = functional.apply_updates(params, updates)
    grads = [torch.randn_like(p) for p in params]
    plain, _, _ = functional.update(config, meta, grads, state, params, lr=lr, total_steps=total, weight_decay=0.0)
    decayed, _, _ = functional.update(config, meta, grads, state, params, lr=lr, total_steps=total, weight_decay=0.3)
    b = functional.schedule(config, 3, total)
    assert 0 < b < 1
    for d, u, p in zip(decayed, plain, params, strict=True):
        torch.testing.assert_close(d - u, -lr * b * 0.3 * p, atol=1e-8, rtol=1e-4)


def test_optimizers_saved_before_weight_decay_load_without_it():
    saved = Config().to_dict()
    del saved["weight_decay"]
    assert Config.from_dict(saved).weight_decay == 0.0
    with pytest.raises(ValueError, match="weight_decay"):
        Config(weight_decay=-0.1)


# ------------------------------------------------------------------------------------- add_param_group
def test_add_param_group_after_construction_is_refused_clearly():
    model = small_model()
    opt = L3RS(model[0].named_parameters(prefix="0"), lr=1e-2)
    with pytest.raises(NotImplementedError, match="add_param_group"):
        opt.add_param_group({"params": list(model[2].named_parameters(prefix="2"))})
    assert len(opt.param_groups) == 1
    run(model, opt, 1)  # still usable


# ---------------------------------------------------------------------------- distributed checkpoints
def test_distributed_checkpoint_round_trip_resumes_bit_identically():
    model = small_model()
    opt = feature_sensitive(model)
    run(model, opt, 10)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert "0.weight" in saved_opt["state"]  # keyed by parameter name, no stray optimizer-wide key
    run(model, opt, 10, start=10)

    resumed = small_model(seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = feature_sensitive(resumed)
    set_optimizer_state_dict(resumed, opt2, saved_opt)
    assert opt2.step_count == 10
    run(resumed, opt2, 10, start=10)
    assert same(model, resumed)


def test_state_dict_in_the_previous_layout_still_loads():
    model = small_model()
    opt = feature_sensitive(model)
    run(model, opt, 5)
    sd = opt.state_dict()
    legacy = {**sd, "state": {**sd["state"], "l3rs": sd["param_groups"][0]["l3rs_state"]},
              "param_groups": [{k: v for k, v in g.items() if k != "l3rs_state"} for g in sd["param_groups"]]}
    copy_model = copy.deepcopy(model)
    opt2 = feature_sensitive(copy_model)
    opt2.load_state_dict(legacy)
    run(model, opt, 5, start=5)
    run(copy_model, opt2, 5, start=5)
    assert same(model, copy_model)


# ------------------------------------------------------------------------------------- low precision
def test_fp32_state_for_bf16_weights():
    model = small_model(dtype=torch.bfloat16)
    reference = small_model(dtype=torch.bfloat16).float()  # the same weights, in fp32
    opt = L3RS(model.named_parameters(), lr=1e-2, state_dtype=torch.float32)
    ref_opt = L3RS(reference.named_parameters(), lr=1e-2)
    assert all(v.dtype == torch.float32 for p in opt._params for v in opt.state[p].values())
    before = [p.detach().clone() for p in model.parameters()]
    grads = [torch.randn(p.shape) for p in model.parameters()]
    for p, q, g in zip(model.parameters(), reference.parameters(), grads, strict=True):
        p.grad, q.grad = g.bfloat16(), g.bfloat16().float()
    opt.step(loss=1.0)
    ref_opt.step(loss=1.0)
    for p, p0, q in zip(model.parameters(), before, reference.parameters(), strict=True):
        assert p.dtype == torch.bfloat16
        # the step is computed in fp32 (as for the fp32 reference) and rounded once into the bf16 weight
        assert torch.equal(p, q.detach().bfloat16())
        assert not torch.equal(p, p0)
    assert all(torch.equal(opt.state[p]["m"], ref_opt.state[q]["m"])
               for p, q in zip(opt._params, ref_opt._params, strict=True))


# ------------------------------------------------------------------------------------- observe_loss
def test_observe_loss_then_bare_step_equals_step_with_loss():
    a, b = small_model(), small_model()
    opt_a, opt_b = feature_sensitive(a), feature_sensitive(b)
    run(a, opt_a, 12)
    run(b, opt_b, 12, observe=True)
    assert same(a, b)


def test_observed_losses_are_averaged_until_the_next_step():
    a, b = small_model(), small_model()
    opt_a, opt_b = feature_sensitive(a), feature_sensitive(b)
    for opt, model in ((opt_a, a), (opt_b, b)):
        opt.zero_grad()
        loss_of(model, 0).backward()
    opt_a.step(loss=torch.tensor(3.0))
    opt_b.observe_loss(torch.tensor(2.0))
    opt_b.observe_loss(4.0)
    opt_b.step()
    assert same(a, b)
    assert torch.equal(opt_a.state["l3rs"]["features"]["loss_ema"], opt_b.state["l3rs"]["features"]["loss_ema"])
    assert opt_b._observed == []  # consumed by the step


def test_without_any_loss_the_features_differ():
    a, b = small_model(), small_model()
    opt_a, opt_b = feature_sensitive(a), feature_sensitive(b)
    run(a, opt_a, 12)
    for i in range(12):
        opt_b.zero_grad()
        loss_of(b, i).backward()
        opt_b.step()  # the observe_loss test above would pass trivially if the loss did not matter
    assert not same(a, b)


# ------------------------------------------------------------------------------------ wrapper names
@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapped_model_names_match_a_meta_trained_optimizer(tmp_path, prefix):
    model = small_model()
    feature_sensitive(model).save_pretrained(tmp_path / "opt")
    wrapped = [(prefix + n, p) for n, p in small_model().named_parameters()]
    opt = L3RS.from_pretrained(tmp_path / "opt", wrapped)
    assert torch.equal(opt.meta["embedding"], feature_sensitive(small_model()).meta["embedding"])


def test_fsdp_inner_wrapper_names_match_and_real_mismatches_are_listed(tmp_path):
    model = small_model()
    feature_sensitive(model).save_pretrained(tmp_path / "opt")
    fsdp_style = [(f"_fsdp_wrapped_module.{n[0]}._fsdp_wrapped_module.{n[2:]}", p)
                  for n, p in small_model().named_parameters()]
    L3RS.from_pretrained(tmp_path / "opt", fsdp_style)
    other = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3),
                                torch.nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match=r"module\.3\.weight"):
        L3RS.from_pretrained(tmp_path / "opt", [("module." + n, p) for n, p in other.named_parameters()])


# ---------------------------------------------------------------------------------------- devices
def test_parameters_on_several_devices_are_refused():
    on_cpu = torch.nn.Parameter(torch.zeros(3))
    on_meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        L3RS([("a", on_cpu), ("b", on_meta)], lr=1e-2)


# ---------------------------------------------------------------------------------------- learned λ
def test_learned_lr_is_the_mean_lambda_per_group():
    model = small_model()
    groups = [{"params": list(model[0].named_parameters(prefix="0")), "lr": 1e-2},
              {"params": list(model[2].named_parameters(prefix="2")), "lr": 1e-3}]
    untrained = L3RS(groups, lr=5e-3)
    assert untrained.learned_lr() == pytest.approx([1e-2, 1e-3])
    opt = feature_sensitive(model)
    run(model, opt, 5)
    coeffs = opt.coefficients()
    assert opt.learned_lr() == pytest.approx([sum(c["lr"] for c in coeffs.values()) / len(coeffs)])
    assert opt.learned_lr()[0] != pytest.approx(opt.param_groups[0]["lr"])
