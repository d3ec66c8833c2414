"""The long runs' mix (session 37): a mix chosen at 4x the horizon, which runs longer than the horizon move to."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_meta import H, one_iteration_checkpoint, small, stiff_task
from torch import nn

from l3rs import L3RS, functional, schedules
from l3rs.meta import MetaConfig, sweeps, train
from l3rs.meta.sweeps import LONG_SWEEP_SEEDS, PRIOR_SEEDS, long_prior_sweep, long_step, sweep_seeds
from l3rs.meta.unroll import Result


def test_long_runs_take_the_long_mix_in_log_linearly_from_the_horizon_to_4x():
    config = functional.Config(reference_horizon=100)
    shares = [schedules.long_share(config, t) for t in (50, 100, 200, 400, 800)]
    assert shares == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    assert schedules.long_share(config, None) == 0.0 and schedules.long_share(functional.Config(), 400) == 0.0


@pytest.mark.parametrize("mix", ["softmax", "linear"])
def test_an_untrained_optimizer_moves_from_its_prior_to_the_long_prior_with_the_run_length(mix):
    config = functional.Config(normalize="snr", mix=mix, reference_horizon=100)
    x = torch.zeros(3, config.num_features)

    def mix_at(meta, steps):
        return functional.coefficients(config, meta, x, 1.0, 0, steps)[1]

    meta = config.init_meta(3, lean="adam", long_lean="momentum")
    short, long = mix_at(config.init_meta(3, lean="adam"), 100), mix_at(config.init_meta(3, lean="momentum"), 100)
    for steps in (None, 50, 100):  # up to the horizon (or T unknown): the prior chosen at 1x
        assert mix_at(meta, steps) == pytest.approx(short)
    for steps in (400, 1000):  # from 4x on: the long runs' mix
        assert mix_at(meta, steps) == pytest.approx(long)
    momentum = config.bases.index("momentum")
    assert (short[:, momentum] < mix_at(meta, 200)[:, momentum]).all()
    assert (mix_at(meta, 200)[:, momentum] < long[:, momentum]).all()
    assert not config.init_meta(3, lean="adam", long_lean="adam")["long_mix"].any()  # the same mix: no change
    assert not config.init_meta(3, lean="uniform", long_lean="uniform")["long_mix"].any()
    with pytest.raises(ValueError, match="not one of the bases"):
        functional.Config(bases=("sgd", "adam")).init_meta(2, long_lean="momentum")


def _long_runs(losses: dict[str, list[float]], seen: list):
    """A fake `run`: each mix (told apart by its vector's value, in `losses` order) reads its loss per seed."""
    seeds, names = sweep_seeds(small(), PRIOR_SEEDS), list(losses)

    def run(jobs):
        out = []
        for job in jobs:
            name = names[int(job.vector[0])]
            seen.append((name, job.run_seed, job.lr0, job.steps, job.horizon, job.backbone_warmup))
            loss = losses[name][seeds.index(job.run_seed)]
            out.append(Result(loss, loss, None, None, job.steps))
        return out
    return run


def test_a_long_mix_replaces_the_kept_one_only_if_lower_in_the_mean_and_on_3_of_4_seeds():
    vectors = {name: torch.full((2,), float(i)) for i, name in enumerate(("uniform", "adam", "momentum"))}
    seeds = sweep_seeds(small(), PRIOR_SEEDS)

    def pick(adam, momentum, kept_by_seed=None):
        seen: list = []
        losses = {"uniform": [1.0, 1.0, 1.0, 1.0], "adam": adam, "momentum": momentum}
        return long_prior_sweep(small(), H, vectors, "uniform", 0.01, _long_runs(losses, seen), 0.3,
                                kept_by_seed), seen

    # adam: lower on the first 2 seeds, not on the next 2; momentum: lower on 3 of 4 and in the mean
    result, seen = pick([0.97, 0.97, 1.1, 1.1], [0.9, 0.9, 0.95, 1.05])
    assert result["long_prior"] == "momentum" and result["mean"]["momentum"] == pytest.approx(0.95)
    assert {run[2:] for run in seen} == {(0.01, 4 * H, 4 * H, 0.3)} and result["steps"] == len(seen) * 4 * H
    assert len(seen) == 3 * 4 and all(len(v) == 4 for v in result["by_seed"].values())
    # a mix whose first 2 seeds' mean is not lower runs no more seeds (nor does the kept one, if none is lower)
    result, seen = pick([1.1, 0.9, 0.5, 0.5], [1.2, 1.2, 0.5, 0.5])
    assert result["long_prior"] == "uniform" and len(seen) == 3 * LONG_SWEEP_SEEDS
    assert result["by_seed"]["adam"] == [1.1, 0.9]
    assert pick([0.9, 0.9, 1.1, 0.99], [1.2, 1.2, 0.5, 0.5])[0]["long_prior"] == "adam"  # 3 of 4, mean 0.9725
    assert pick([0.8, 0.8, 0.8, 1.5], [0.9, 0.9, 0.95, 1.05])[0]["long_prior"] == "momentum"  # adam: mean 0.975 > 0.95
    assert pick([0.8, 0.8, 0.8, 1.0], [0.9, 0.9, 0.95, 1.05])[0]["long_prior"] == "adam"  # the lowest mean of two
    reused, seen = pick([0.97, 0.97, 1.1, 1.1], [0.9, 0.9, 0.95, 1.05], kept_by_seed=[1.0, 1.0])
    assert reused["long_prior"] == "momentum" and reused["by_seed"]["uniform"] == [1.0, 1.0, 1.0, 1.0]
    kept_runs = {seed for name, seed, *_ in seen if name == "uniform"}
    assert kept_runs == set(seeds[LONG_SWEEP_SEEDS:])  # the α sweep's λ0 runs are not run again


def test_the_long_mix_takes_its_own_step_only_if_lower_in_the_mean_and_on_3_of_4_seeds():
    vector, seen = torch.full((2,), 1.0), []
    chosen = [0.9, 0.9, 0.9, 0.9]

    def check(own):
        return long_step(small(), H, vector, 0.01, 0.5, chosen, _long_runs({"uniform": [], "adam": own}, seen), 0.3)

    result = check([0.8, 0.8, 0.8, 1.0])  # lower on 3 of 4, mean 0.85
    assert result["kept"] and result["lr"] == pytest.approx(0.005) and result["by_seed"] == [0.8, 0.8, 0.8, 1.0]
    assert {run[2:] for run in seen} == {(0.005, 4 * H, 4 * H, 0.3)} and len(seen) == 4
    assert not check([0.8, 0.8, 1.0, 1.0])["kept"]  # lower on 2 of 4
    assert not check([0.5, 1.0, 1.0, 1.0])["kept"]  # lower on 1, though lower in the mean
    assert sweeps.own_lr0({"priors": {"uniform": {"placed_lr0": 0.3}, "adam+warmup": {"placed_lr0": 0.1}}},
                          "adam") == 0.1
    assert sweeps.own_lr0(None, "adam") is None and sweeps.own_lr0({"priors": {}}, "momentum") is None


def test_long_priors_default_to_uniform_adam_and_momentum_among_the_bases():
    assert MetaConfig().long_priors == ("uniform", "adam", "momentum")
    assert MetaConfig(config=functional.Config(bases=("sgd", "adam"))).long_priors == ("uniform", "adam")
    assert MetaConfig(config=functional.Config(normalize="snr", bases=("adam",))).long_priors == ()
    assert MetaConfig(long_priors=()).long_priors == () and MetaConfig(long_priors=["sign"]).long_priors == ("sign",)
    with pytest.raises(ValueError, match="neither 'uniform' nor one of the bases"):
        MetaConfig(long_priors=("adam+warmup",))
    with pytest.raises(ValueError, match="each mix once"):
        MetaConfig(long_priors=("adam", "adam"))


def test_meta_training_ships_the_long_mix_it_chose(tmp_path):
    best = train(stiff_task(), tmp_path, small(iterations=0), progress=False)
    info = json.loads((best / "optimizer.json").read_text())
    long = info["long_prior_sweep"]
    assert long["kept"] == "uniform" and set(long["by_seed"]) == {"uniform", "adam", "momentum"}
    assert long["lr"] == pytest.approx(0.03 * 4 ** -info["config"]["horizon_exponent"])
    config = functional.Config.from_dict(info["config"])
    expected = config.init_meta(2, long_lean=long["long_prior"])["long_mix"]
    assert torch.equal(load_file(best / "optimizer.safetensors")["long_mix"], expected)
    off = json.loads((train(stiff_task(), tmp_path / "off", small(iterations=0, long_priors=()),
                            progress=False) / "optimizer.json").read_text())
    assert off["long_prior_sweep"] is None


def test_a_long_mix_kept_at_its_own_step_moves_alpha_by_its_log_ratio_over_log_4(tmp_path, monkeypatch):
    real_sweep, real_step = sweeps.long_prior_sweep, sweeps.long_step
    monkeypatch.setattr(sweeps, "long_prior_sweep", lambda *a, **k: {**real_sweep(*a, **k), "long_prior": "adam"})
    monkeypatch.setattr(sweeps, "own_lr0", lambda sweep, mix: 0.03 / 4)  # a quarter of λ0 (small(): 0.03)
    monkeypatch.setattr(sweeps, "long_step", lambda *a, **k: {**real_step(*a, **k), "kept": True})
    info = json.loads((train(stiff_task(), tmp_path, small(iterations=0), progress=False)
                       / "optimizer.json").read_text())
    long = info["long_prior_sweep"]
    assert long["kept"] == "uniform" and long["own_step"]["ratio"] == pytest.approx(0.25)
    assert long["own_step"]["lr"] == pytest.approx(long["lr"] / 4) and len(long["own_step"]["by_seed"]) >= 2
    fitted = info["horizon_sweep"]["horizon_exponent"]
    assert info["config"]["horizon_exponent"] == pytest.approx(fitted + 1.0)  # −log(1/4) / log 4


def test_an_optimizer_saved_before_long_mixes_loads_with_the_same_mix_at_every_length(tmp_path):
    model = nn.Linear(3, 2)
    opt = L3RS(model.named_parameters(), lr=0.01, total_steps=40, config=functional.Config(reference_horizon=10))
    path = opt.save_pretrained(tmp_path / "opt")
    tensors = load_file(path / "optimizer.safetensors")
    del tensors["long_mix"]  # as written before session 37
    save_file(tensors, path / "optimizer.safetensors")
    loaded = L3RS.from_pretrained(path, model.named_parameters(), total_steps=40)
    assert not loaded.meta["long_mix"].any()
    state = opt.state_dict()
    del state["l3rs_meta"]["long_mix"]
    loaded.load_state_dict(state)
    assert not loaded.meta["long_mix"].any()


def test_a_checkpoint_from_before_long_mixes_resumes_with_long_priors_off(tmp_path):
    cfg = small(iterations=2)
    path, doc = one_iteration_checkpoint(tmp_path, cfg)
    del doc["meta_config"]["long_priors"], doc["long_prior_sweep"]  # as written before session 37
    tensors = load_file(path)
    bases = len(cfg.config.bases)
    tensors |= {k: tensors[k][:-bases] for k in ("vector", "adam_m", "adam_v", "best_vector")}
    save_file(tensors, path, metadata={"state": json.dumps(doc)})
    with pytest.raises(FileExistsError, match=r"other settings \(long_priors\)"):
        train(stiff_task(), tmp_path, cfg, resume=True, progress=False)
    best = train(stiff_task(), tmp_path, replace(cfg, long_priors=()), resume=True, progress=False)
    assert json.loads((best / "optimizer.json").read_text())["iteration"] == 2
    assert not load_file(best / "optimizer.safetensors")["long_mix"].any()
