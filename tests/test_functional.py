"""The two entry points of the L3RS step: `update` (pure, differentiable) and `update_` (in place, the
optimizer's fast path) are one implementation and must agree step by step."""

from __future__ import annotations

import math

import pytest
import torch

from l3rs import bases, functional


def _problem(seed: int = 0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (16,), (4, 16), (4,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) * (1 + k % 3) for s in shapes] for k in range(8)]
    return params, grads


@pytest.mark.parametrize("base_set", [bases.DEFAULT, ("nesterov", "adabelief", "to_init", "ortho", "adam")])
@pytest.mark.parametrize("with_workspace", [False, True])
@pytest.mark.parametrize("normalize", ["rms", "snr"])
def test_pure_and_in_place_steps_agree_step_by_step(base_set, with_workspace, normalize):
    config = functional.Config(bases=base_set, normalize=normalize)
    gen = torch.Generator().manual_seed(1)
    meta = {k: v + 0.2 * torch.randn(v.shape, generator=gen) for k, v in config.init_meta(4).items()}
    params, grads = _problem()
    pure_params, pure_state = [p.clone() for p in params], functional.init(config, params)
    fast_params, fast_state = [p.clone() for p in params], functional.init(config, params)
    workspace = bases.Workspace() if with_workspace else None
    for k, g in enumerate(grads):
        loss = 1.0 / (k + 1)
        before = [t.clone() for t in pure_state.moments.m or []]
        updates, pure_state, _ = functional.update(config, meta, g, pure_state, pure_params, lr=1e-2, loss=loss,
                                                  total_steps=len(grads))
        pure_params = functional.apply_updates(pure_params, updates)
        with torch.no_grad():
            fast_updates, fast_state, _ = functional.update_(config, meta, g, fast_state, fast_params, lr=1e-2,
                                                             loss=loss, total_steps=len(grads), workspace=workspace)
            torch._foreach_add_(fast_params, fast_updates)
        for a, b in zip(pure_params, fast_params, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        if k > 0 and before:  # the pure step returned new moments and left the old ones alone
            assert not any(torch.equal(x, y) for x, y in zip(before, pure_state.moments.m, strict=True))


def test_snr_scales_every_tensors_unit_rms_step_by_its_adam_direction_rms():
    rms_config = functional.Config(bases=bases.DEFAULT, weight_decay=0.0)
    snr_config = functional.Config(bases=bases.DEFAULT, normalize="snr", weight_decay=0.0)
    meta = rms_config.init_meta(4)
    params, grads = _problem()
    state = functional.init(rms_config, params)
    for g in grads[:3]:  # a few steps in, so Adam's direction is no longer sign(g)
        _, state, _ = functional.update(rms_config, meta, g, state, params, lr=1e-2)
    g = grads[3]
    unit, _, _ = functional.update(rms_config, meta, g, state, params, lr=1e-2)
    scaled, _, _ = functional.update(snr_config, meta, g, state, params, lr=1e-2)
    moments = bases.update(g, state.moments, rms_config.hyper)
    adam = bases.direction("adam", g, moments, params, rms_config.hyper)
    for u, s, a in zip(unit, scaled, adam, strict=True):
        ratio = a.pow(2).mean().sqrt()
        assert 0.05 < ratio < 0.99  # the factor is real: Adam's direction has shrunk below unit RMS
        torch.testing.assert_close(s, u * ratio, rtol=1e-5, atol=1e-8)


def test_normalize_accepts_the_old_booleans_and_names_its_choices():
    assert functional.Config(normalize=True).normalize == "rms"
    assert functional.Config(normalize=False).normalize == "none"
    with pytest.raises(ValueError, match="normalize must be one of"):
        functional.Config(normalize="l2")
    with pytest.raises(ValueError, match='add "adam"'):
        functional.Config(bases=("sgd", "sign"), normalize="snr")


def test_in_place_step_overwrites_the_moments_and_skips_non_finite_gradients():
    config = functional.Config()
    params, grads = _problem()
    state = functional.init(config, params)
    m_buffers = state.moments.m
    with torch.no_grad():
        _, new, _ = functional.update_(config, config.init_meta(4), grads[0], state, params, lr=1e-2)
        assert all(a is b for a, b in zip(new.moments.m, m_buffers, strict=True))  # same buffers, new values
        assert any(t.abs().sum() > 0 for t in m_buffers)
        snapshot = [t.clone() for t in m_buffers]
        bad = [g.clone() for g in grads[1]]
        bad[2][0, 0] = float("nan")
        updates, same, coeffs = functional.update_(config, config.init_meta(4), bad, new, params, lr=1e-2)
    assert updates is None and coeffs is None and same is new
    assert all(torch.equal(a, b) for a, b in zip(snapshot, m_buffers, strict=True))


def test_shared_step_budget_keeps_the_model_wide_rms_step():
    """With step_budget="shared" the mixer redistributes λ over tensors: Σ n_l λ_l² = Σ n_l (λ0·b)² (exactly
    without the floor, which may lift a tensor above it)."""
    config = functional.Config(min_log_scale=None)
    meta = config.init_meta(3, seed=1)
    meta["layers.2.weight"] = torch.randn_like(meta["layers.2.weight"])  # a mixer that moves s
    x = torch.randn(3, config.num_features)
    sizes = torch.tensor([10.0, 1000.0, 5.0])
    lam, _ = functional.coefficients(config, meta, x, 0.1, step=50, total_steps=100, sizes=sizes)
    base = 0.1 * functional.schedule(config, 50, 100)
    assert not torch.allclose(lam, torch.full_like(lam, base))  # the tensors differ ...
    assert torch.allclose((sizes * lam**2).sum(), sizes.sum() * base**2)  # ... within one budget
    free = functional.Config(step_budget="free", min_log_scale=None)
    lam_free, _ = functional.coefficients(free, meta, x, 0.1, step=50, total_steps=100, sizes=sizes)
    assert not torch.allclose((sizes * lam_free**2).sum(), sizes.sum() * base**2)


def test_no_tensor_steps_below_the_floor_after_the_budget():
    """min_log_scale: after the shared budget, λ_l >= λ0·b·e^floor; tensors above it are untouched, and the
    untrained optimizer (s = 0 everywhere) does not meet it."""
    meta = functional.Config().init_meta(3, seed=1)
    rng = torch.Generator().manual_seed(0)
    out = meta["layers.2.weight"]
    meta["layers.2.weight"] = torch.randn(out.shape, generator=rng) * 100  # s saturates at ±3, tensor by tensor
    x = torch.randn(3, functional.Config().num_features, generator=rng)
    sizes = torch.tensor([10.0, 1000.0, 5.0])
    base = 0.1 * functional.schedule(functional.Config(), 50, 100)
    lam = {}
    for floor in (None, -1.0):
        config = functional.Config(min_log_scale=floor)
        lam[floor], _ = functional.coefficients(config, meta, x, 0.1, step=50, total_steps=100, sizes=sizes)
    assert (lam[None] < base * math.exp(-1.0)).any()  # without the floor some tensor is parked below it
    assert torch.allclose(lam[-1.0], lam[None].clamp_min(base * math.exp(-1.0)))
    untrained = functional.Config().init_meta(3)
    flat, _ = functional.coefficients(functional.Config(), untrained, x, 0.1, step=50, total_steps=100, sizes=sizes)
    assert torch.allclose(flat, torch.full_like(flat, base))
    with pytest.raises(ValueError, match="min_log_scale"):
        functional.Config(min_log_scale=0.5)


def test_configs_saved_before_the_step_budget_keep_their_free_step_sizes():
    saved = functional.Config(step_budget="free").to_dict()
    del saved["step_budget"], saved["min_log_scale"]
    old = functional.Config.from_dict(saved)
    assert old.step_budget == "free" and old.min_log_scale is None  # nor the floor that came later
    with pytest.raises(ValueError, match="step_budget"):
        functional.Config(step_budget="global")


def test_the_backbone_ramps_up_while_the_head_steps_at_once():
    """`backbone_warmup`: λ0 of the tensors not marked as head is scaled by (t+1)/(w·T+1) until it reaches 1; the
    head's is not. The whole step (directions and decay) is linear in λ0, so a backbone tensor's update is the
    unmarked one's times the ramp."""
    config = functional.Config(backbone_warmup=0.3, weight_decay=0.1)
    params, grads = _problem()
    head = torch.tensor([False, False, True, True])
    meta = config.init_meta(4, seed=2)
    plain, marked = functional.init(config, params), functional.init(config, params)
    for k, g in enumerate(grads):
        ramp = min(1.0, (k + 1) / (0.3 * 20 + 1))
        factor = torch.as_tensor(functional.head_ramp(config, k, 20, head)).expand(4)
        torch.testing.assert_close(factor, torch.tensor([ramp, ramp, 1.0, 1.0]))
        a, plain, _ = functional.update(config, meta, g, plain, params, lr=1e-2, total_steps=20)
        b, marked, _ = functional.update(config, meta, g, marked, params, lr=1e-2, total_steps=20, head=head)
        for i in range(4):
            torch.testing.assert_close(b[i], a[i] * (1.0 if head[i] else ramp), rtol=1e-5, atol=1e-8)
    assert functional.head_ramp(config, 6, 20, head) == 1.0  # (6 + 1) / 7: the ramp is over
    assert functional.head_ramp(config, 0, 20, None) == 1.0  # nothing marked: every tensor alike
    assert functional.head_ramp(functional.Config(), 0, 20, head) == 1.0  # off by default (old optimizers)
    assert functional.head_ramp(config, 0, None, head) == 1.0  # T unknown
    with pytest.raises(ValueError, match="backbone_warmup"):
        functional.Config(backbone_warmup=1.0)
