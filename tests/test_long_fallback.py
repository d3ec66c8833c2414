"""The long fallback (session 38): while no meta-trained checkpoint beats the untrained optimizer at every validation
horizon, one that beats it below 2x ships with what meta-training changed fading out in runs longer than the horizon:
runs of 2x and longer are the untrained optimizer's, whose λ0, α and long runs' mix the sweeps chose for them."""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_meta import H, one_iteration_checkpoint, small, stiff_task

from l3rs import L3RS, functional, mixer
from l3rs.cli import build_parser
from l3rs.meta import MetaConfig, train
from l3rs.meta.command import meta_config
from l3rs.meta.validation import Validation
from l3rs.optim import load_meta

T_REF = 100
meta_train = importlib.import_module("l3rs.meta.train")  # the module (l3rs.meta.train is also the function)


def _coefficients(config: functional.Config, meta: mixer.Meta, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = meta["embedding"].shape[0]
    x = torch.linspace(-1, 1, rows * config.num_features).reshape(rows, config.num_features)
    return functional.coefficients(config, meta, x, 1.0, 0, steps)


def _assert_same(config: functional.Config, meta: mixer.Meta, other: functional.Config, other_meta: mixer.Meta,
                 steps: int | None) -> None:
    for got, want in zip(_coefficients(config, meta, steps), _coefficients(other, other_meta, steps), strict=True):
        assert torch.equal(got, want)


def _trained(meta: mixer.Meta) -> mixer.Meta:
    """`meta` with a last layer as meta-training leaves it: the output depends on the features."""
    last = f"layers.{mixer.depth(meta)}"
    gen = torch.Generator().manual_seed(1)
    return {**meta, f"{last}.weight": torch.randn(meta[f"{last}.weight"].shape, generator=gen),
            f"{last}.bias": meta[f"{last}.bias"] + 0.5, "long_mix": meta["long_mix"] - 0.3}


def test_long_runs_fall_back_to_the_untrained_optimizer_and_short_ones_keep_the_trained_one():
    plain = functional.Config(normalize="snr", reference_horizon=T_REF)
    untrained = plain.init_meta(3, lean="adam", long_lean="momentum")
    config = replace(plain, fallback=mixer.untrained_output(untrained))
    trained = _trained(untrained)
    for steps in (T_REF // 2, T_REF):  # up to the horizon: the trained optimizer, untouched
        _assert_same(config, trained, plain, trained, steps)
    for steps in (2 * T_REF, 10 * T_REF):  # from 2x on: exactly the untrained optimizer
        _assert_same(config, trained, plain, untrained, steps)
    between = _coefficients(config, trained, 141)[1]  # halfway (log-linear in T): between the two
    assert not torch.allclose(between, _coefficients(plain, trained, 141)[1])
    assert not torch.allclose(between, _coefficients(plain, untrained, 141)[1])


def test_a_run_between_1x_and_2x_keeps_the_schedules_rms_step():
    plain = functional.Config(normalize="snr", reference_horizon=T_REF, schedule="constant", min_log_scale=None)
    untrained = plain.init_meta(3, lean="adam")
    config = replace(plain, fallback=mixer.untrained_output(untrained))
    trained = _trained(untrained)
    sizes = torch.tensor([1000.0, 10.0, 1.0])
    x = torch.linspace(-1, 1, 3 * config.num_features).reshape(3, config.num_features)
    for steps in (T_REF, 120, 141, 175, 2 * T_REF):  # the shared budget: Σ n λ² = Σ n (λ0 = 1, constant schedule)
        lam = functional.coefficients(config, trained, x, 1.0, 0, steps, sizes)[0]
        assert float((sizes * lam**2).sum()) == pytest.approx(float(sizes.sum()), rel=1e-5)


def test_an_untrained_optimizer_is_unchanged_by_its_own_fallback():
    plain = functional.Config(normalize="snr", reference_horizon=T_REF)
    untrained = plain.init_meta(3, lean="uniform", long_lean="momentum")
    config = replace(plain, fallback=mixer.untrained_output(untrained))
    for steps in (None, T_REF, 2 * T_REF, 3 * T_REF, 4 * T_REF):
        _assert_same(config, untrained, plain, untrained, steps)


def test_the_fallback_is_validated_and_only_taken_from_an_untrained_optimizer():
    config = functional.Config(reference_horizon=T_REF)
    untrained = config.init_meta(2, lean="adam")
    output = mixer.untrained_output(untrained)
    assert len(output) == 1 + 2 * len(config.bases) and output[0] == 0.0
    with pytest.raises(ValueError, match="trained"):
        mixer.untrained_output(_trained(untrained))
    with pytest.raises(ValueError, match="1 \\+ 2 x 5 bases"):
        functional.Config(fallback=(0.0, 1.0))
    assert functional.Config.from_dict(replace(config, fallback=output).to_dict()).fallback == output


def test_the_long_fallback_is_on_by_default_and_off_with_its_flag():
    assert MetaConfig().long_fallback and "long_fallback" not in MetaConfig().result_keys()  # selection only
    args = build_parser("meta-train").parse_args(["meta-train", "--task", "t", "--out", "o", "--no-long-fallback"])
    assert not meta_config(args).long_fallback


def _scripted_validation(monkeypatch, script: list[tuple[float, ...]], calls: list | None = None) -> None:
    """Meta-training's validations read `script` in turn: one value per validation horizon, the same on both
    validation seeds; the first one is the untrained optimizer's. `calls` collects each call's horizons."""
    entries, current = iter(script), []

    def validate(*args, only=None, **kwargs):
        if calls is not None:
            calls.append(only)
        if only is None or 0 in only:  # a new checkpoint: its 1x horizon runs first (alone when staged)
            current[:] = next(entries)
        picked = range(len(current)) if only is None else only
        values = [v if i in picked else None for i, v in enumerate(current)]
        return Validation(values, [None if v is None else [v, v] for v in values], len(picked))

    monkeypatch.setattr(meta_train, "validate", validate)


def _run(tmp_path, cfg: MetaConfig) -> dict:
    best = train(stiff_task(), tmp_path, cfg, progress=False)
    return json.loads((best / "optimizer.json").read_text())


SCRIPTED = dict(iterations=4, validate_every=1, validation_seeds=2, validation_horizons=(1.0, 4.0))


def test_a_checkpoint_better_only_below_2x_ships_with_the_fallback_until_one_is_better_everywhere(
        tmp_path, monkeypatch):
    untrained = (1.0, 1.0)
    # iterations 1-2: better at 1x only (the second more so); 3: a little better everywhere; 4: far better at 1x only
    _scripted_validation(monkeypatch, [untrained, (0.8, 1.5), (0.6, 2.0), (0.95, 0.97), (0.3, 1.2)])
    info = _run(tmp_path / "on", small(**{**SCRIPTED, "iterations": 2}))
    assert (info["best_iteration"], info["falls_back"]) == (2, True)
    assert len(info["config"]["fallback"]) == 1 + 2 * len(info["config"]["bases"])
    _scripted_validation(monkeypatch, [untrained, (0.8, 1.5), (0.6, 2.0), (0.95, 0.97), (0.3, 1.2)])
    info = _run(tmp_path / "all", small(**SCRIPTED))
    assert (info["best_iteration"], info["falls_back"], info["config"]["fallback"]) == (3, False, None)
    _scripted_validation(monkeypatch, [untrained, (0.8, 1.5), (0.6, 2.0), (0.99, 2.0), (0.3, 1.2)])
    assert _run(tmp_path / "off", small(**SCRIPTED, long_fallback=False))["best_iteration"] == 0
    _scripted_validation(monkeypatch, [untrained, (0.995, 1.5), (0.999, 0.5), (1.2, 0.5), (1.0, 0.5)])
    assert _run(tmp_path / "noise", small(**SCRIPTED))["best_iteration"] == 0  # under the 1% margin at 1x


def test_the_4x_horizon_is_validated_only_for_a_checkpoint_that_could_be_kept(tmp_path, monkeypatch):
    calls = []
    _scripted_validation(monkeypatch, [(1.0, 1.0), (1.1, 0.5), (0.8, 0.9), (0.85, 0.5), (0.95, 0.1), (0.7, 0.2)],
                         calls)
    cfg = small(**{**SCRIPTED, "iterations": 5})
    info = _run(tmp_path, cfg)
    # 1: worse at 1x; 2: kept (score log 0.9); 3: at 1x log 0.85 may beat it, and does; 4: at 1x log 0.95 cannot;
    # 5: log 0.7 at both: kept. Validating every horizon of every checkpoint would keep the same ones
    assert calls == [None, [0], [0], [1], [0], [1], [0], [0], [1]]
    assert (info["best_iteration"], info["falls_back"]) == (5, False)
    assert info["validation_score"] == pytest.approx(math.log(0.7))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["validation"] for r in lines[1:]] == [[1.1, None], [0.8, 0.9], [0.85, 0.5], [0.95, None], [0.7, 0.2]]
    assert [r["validation_score"] for r in lines[1:]] == pytest.approx(
        [math.log(v) for v in (1.1, 0.9, 0.85, 0.95, 0.7)])  # a screened-out checkpoint's: the horizons that ran
    _scripted_validation(monkeypatch, [(1.0,), (1.1,), (0.8,)], calls := [])
    assert _run(tmp_path / "one", small(**{**SCRIPTED, "iterations": 2, "validation_horizons": (1.0,)}))[
        "best_iteration"] == 2 and calls == [None, None, None]  # nothing to stage with one horizon


def test_a_checkpoint_that_falls_back_is_the_trained_optimizer_at_its_horizon_and_the_untrained_one_from_2x(
        tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, [(1.0, 1.0), (0.5, 2.0)])
    cfg = small(**{**SCRIPTED, "iterations": 1})
    info = _run(tmp_path, cfg)
    best, latest = load_meta(tmp_path / "best"), load_meta(tmp_path / "latest")
    assert info["falls_back"] and info["format_version"] == 4 and latest["config"].fallback is None
    untrained = best["config"].init_meta(2, lean=info["prior"], long_lean=info["long_prior_sweep"]["long_prior"])
    assert best["config"].fallback == mixer.untrained_output(untrained)
    for steps, (config, meta) in ((H, (latest["config"], latest["meta"])), (2 * H, (latest["config"], untrained))):
        _assert_same(best["config"], best["meta"], config, meta, steps)


def _stepped(optimizer_for, steps: int = 3) -> list[torch.Tensor]:
    """The stiff task's weights after `steps` steps of `optimizer_for(model)` (the optimizer class's in-place path)."""
    task = stiff_task()
    model = task.model_fn(0)
    opt = optimizer_for(model)
    x, y = task.train
    for _ in range(steps):
        opt.zero_grad()
        loss = task.loss(model(x[:32]), y[:32])
        loss.backward()
        opt.step(loss=loss.detach())
    return [p.detach() for p in model.parameters()]


def test_the_optimizer_class_falls_back_as_the_functional_step_does(tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, [(1.0, 1.0), (0.5, 2.0)])
    info = _run(tmp_path, small(**{**SCRIPTED, "iterations": 1}))
    best = load_meta(tmp_path / "best")
    untrained = best["config"].init_meta(2, lean=info["prior"], long_lean=info["long_prior_sweep"]["long_prior"])
    plain = replace(best["config"], fallback=None)

    def stepped(path_or_meta, steps: int) -> list[torch.Tensor]:
        if isinstance(path_or_meta, dict):
            return _stepped(lambda m: L3RS(m.named_parameters(), lr=info["lr"], total_steps=steps, config=plain,
                                           meta=path_or_meta))
        return _stepped(lambda m: L3RS.from_pretrained(path_or_meta, m.named_parameters(), total_steps=steps))

    for steps, other in ((2 * H, untrained), (H, load_meta(tmp_path / "latest")["meta"])):
        for got, want in zip(stepped(tmp_path / "best", steps), stepped(other, steps), strict=True):
            assert torch.equal(got, want)


def test_a_checkpoint_from_before_the_fallback_resumes_without_it(tmp_path):
    cfg = small(iterations=2)
    path, doc = one_iteration_checkpoint(tmp_path, cfg)
    del doc["untrained_output"], doc["best_falls_back"]  # as written before session 38
    save_file(load_file(path), path, metadata={"state": json.dumps(doc)})
    best = train(stiff_task(), tmp_path, cfg, resume=True, progress=False)
    assert load_meta(best)["config"].fallback is None
    assert json.loads((best / "optimizer.json").read_text())["iteration"] == 2
