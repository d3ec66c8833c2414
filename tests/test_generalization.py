"""The mechanisms behind horizon and shift generalization: horizon-relative time, the base schedule,
sampled run lengths with their own restarts, end-weighted log objectives, multi-horizon checkpoint
selection, and perturbed meta-training data disjoint from the evaluation shifts."""

from __future__ import annotations

import itertools
import json
import math
import statistics

import pytest
import torch
from test_meta import H, small, stiff_task

from l3rs import L3RS, features, functional
from l3rs.meta import MetaConfig, train
from l3rs.meta.estimators import Context, bptt, draw_horizon, end_weight
from l3rs.meta.sweeps import PRIOR_SEEDS, prior_sweep, sweep_seeds
from l3rs.meta.unroll import Result, Worker
from l3rs.meta.validation import clears_noise, validation_due, validation_score
from l3rs.optim import CheckpointError, load_meta
from l3rs.tasks import TaskFamily, builtin, data


def test_time_features_depend_on_progress_not_on_the_step_count():
    short = features.time_features(50, 100, 100, torch.float32, "cpu")
    long = features.time_features(250, 500, 100, torch.float32, "cpu")
    assert torch.equal(short[:-1], long[:-1])  # same progress: same clock
    assert short[-1] == 0 and long[-1] == pytest.approx(math.log(5) / math.log(8))  # told T / T_ref
    huge = features.time_features(5, 10**6, 100, torch.float32, "cpu")
    assert huge[-1] == 1.5  # clipped: no input far outside what meta-training saw
    unknown = features.time_features(5, None, 100, torch.float32, "cpu")
    assert unknown.abs().sum() == 0


def test_base_schedule_is_warmup_then_decay_over_progress():
    config = functional.Config()
    values = [functional.schedule(config, t, 200) for t in range(200)]
    assert values[0] < 0.2 and max(values) == pytest.approx(1.0, abs=0.01)
    assert values[-1] < 1e-3 and values[100] == pytest.approx(0.5 + 0.5 * math.cos(math.pi * 90 / 190), abs=1e-6)
    assert functional.schedule(config, 7, None) == 1.0  # unknown horizon: constant
    assert functional.schedule(functional.Config(schedule="constant"), 150, 200) == 1.0
    assert functional.schedule(functional.Config(schedule="linear", warmup=0.0), 50, 100) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule"):
        functional.Config(schedule="step")


def test_sampled_horizons_give_every_octave_the_same_share_of_steps():
    ctx = Context(MetaConfig(horizon_range=(0.5, 8.0)), horizon=40, lr0=1e-3)  # default: equal-steps
    draws = [draw_horizon(ctx, "bptt", 0, k) for k in range(2000)]
    assert min(draws) >= 20 and max(draws) <= 320
    edges = [20, 40, 80, 160, 321]
    shares = [sum(d for d in draws if a <= d < b) / sum(draws) for a, b in itertools.pairwise(edges)]
    assert shares == pytest.approx([0.25] * 4, abs=0.05)  # log-uniform runs would give 1/15, 2/15, 4/15, 8/15
    assert draws == [draw_horizon(ctx, "bptt", 0, k) for k in range(2000)]


def test_sampled_horizons_are_log_uniform_over_the_range_and_pure():
    ctx = Context(MetaConfig(horizon_range=(0.5, 8.0), horizon_draw="log-uniform"), horizon=40, lr0=1e-3)
    draws = [draw_horizon(ctx, "bptt", 0, k) for k in range(400)]
    assert min(draws) >= 20 and max(draws) <= 320
    assert statistics.median(draws) == pytest.approx(80, rel=0.2)  # geometric mean of 20 and 320
    assert sum(d > 160 for d in draws) == pytest.approx(100, abs=35)  # the top quarter in log scale
    assert draws == [draw_horizon(ctx, "bptt", 0, k) for k in range(400)]
    fixed = Context(MetaConfig(horizon_range=(1.0, 1.0)), horizon=40, lr0=1e-3)
    assert {draw_horizon(fixed, "bptt", 0, k) for k in range(5)} == {40}


def test_end_weight_grows_with_progress():
    cfg = MetaConfig(end_weight=3.0)
    assert end_weight(cfg, 0, 100) == 1.0 and end_weight(cfg, 50, 100) == 2.0 and end_weight(cfg, 100, 100) == 3.0


def test_truncated_slots_run_their_own_horizons_and_restart_there():
    cfg = small(estimator="bptt", horizon_range=(0.5, 2.0), truncation=10, tasks_per_iteration=2)
    ctx = Context(cfg, horizon=H, lr0=0.03)
    worker = Worker(TaskFamily.of(stiff_task()), cfg.config, cfg.first_order, cfg.val_subset, None)
    seen: list = []

    def run(jobs):
        seen.append(jobs)
        return [worker(job) for job in jobs]

    vector = functional.mixer.flatten(cfg.config.init_meta(2))
    particles = None
    for iteration in range(14):
        particles = bptt(ctx, vector, iteration, particles, run).particles
    horizons = {(slot, job.horizon) for jobs in seen for slot, job in enumerate(jobs)}
    assert len({h for _, h in horizons}) >= 3  # runs of several lengths
    for slot in range(2):
        done, previous = 0, None
        for jobs in seen:
            job = jobs[slot]
            start = job.particle.state.moments.step if job.particle is not None else 0
            assert start + job.steps <= job.horizon  # never past its own T
            if start == 0 and previous is not None:  # a restart: only once the previous run reached its T
                assert done == previous.horizon
            else:
                assert start == done and (previous is None or job.horizon == previous.horizon)
            done, previous = start + job.steps, job
        assert particles.runs[slot] >= 1  # ... and every slot has restarted at least once
    weights = [job.weight for jobs in seen for job in jobs]
    assert min(weights) >= 1.0 and max(weights) == pytest.approx(cfg.end_weight)


def test_whole_run_slots_start_fresh_every_iteration_and_count_the_replay():
    cfg = small(estimator="bptt", horizon_range=(0.5, 2.0), truncation=0, tasks_per_iteration=2)
    ctx = Context(cfg, horizon=H, lr0=0.03)
    worker = Worker(TaskFamily.of(stiff_task()), cfg.config, cfg.first_order, cfg.val_subset, None)
    seen: list = []

    def run(jobs):
        seen.append(jobs)
        return [worker(job) for job in jobs]

    vector = functional.mixer.flatten(cfg.config.init_meta(2))
    particles = None
    for iteration in range(4):
        estimate = bptt(ctx, vector, iteration, particles, run)
        particles, jobs = estimate.particles, seen[-1]
        assert all(job.linearized and job.particle is None and job.steps == job.horizon for job in jobs)
        assert estimate.steps == 2 * sum(job.horizon for job in jobs)  # each run, then its replay
        assert float(estimate.grad.norm()) > 0
    assert len({job.horizon for jobs in seen for job in jobs}) >= 2


def test_validation_score_compares_every_horizon_to_the_untrained_optimizer():
    assert validation_score([0.2, 0.1], [0.2, 0.1]) == 0.0
    assert validation_score([0.1, 0.2], [0.2, 0.1]) == pytest.approx(math.log(2))  # a gain at 1x, a loss at 4x
    assert validation_score([0.1, 0.08], [0.2, 0.1]) == pytest.approx(math.log(0.8))  # the worst horizon
    assert validation_score([0.1, 0.05], [0.2, 0.1]) == pytest.approx(math.log(0.5))
    assert validation_score([0.1, math.inf], [0.2, 0.1]) == math.inf


def test_a_checkpoint_must_clear_the_untrained_optimizer_on_every_seed_and_horizon():
    untrained = [[1.0, 2.0], [0.5, 0.4]]
    assert clears_noise([[0.9, 1.9], [0.45, 0.39]], untrained, 0.01)
    assert not clears_noise([[0.5, 1.995], [0.2, 0.2]], untrained, 0.01)  # a large mean gain, one seed 0.25%
    assert clears_noise([[0.5, 1.995], [0.2, 0.2]], untrained, 0.0)  # margin 0: lower on every seed is enough
    assert not clears_noise([[0.5, 2.1], [0.2, 0.2]], untrained, 0.0)  # higher on one seed
    assert not clears_noise([[math.inf, 1.0], [0.2, 0.2]], untrained, 0.0)
    assert clears_noise([[5.0, 5.0]], None, 0.01)  # a state saved before per-seed values: the mean decides


def test_best_checkpoint_is_chosen_on_several_horizons(tmp_path):
    cfg = small(estimator="bptt", iterations=4, validate_every=2, validation_horizons=(1.0, 2.0),
                horizon_range=(0.5, 2.0), validation_seeds=2)
    best = train(stiff_task(), tmp_path, cfg, progress=False)
    info = json.loads((best / "optimizer.json").read_text())
    assert info["validation_horizons"] == [H, 2 * H]
    assert len(info["validation_by_horizon"]) == len(info["untrained_validation_by_horizon"]) == 2
    expected = validation_score(info["validation_by_horizon"], info["untrained_validation_by_horizon"])
    assert info["validation_score"] == pytest.approx(expected) and info["validation_score"] <= 0
    assert info["config"]["reference_horizon"] == H  # the optimizer knows the horizon it was trained around
    split = info["seconds_by_phase"]  # where the time went: 4 validations (untrained and 3 checks), 4 iterations
    sweeps = sum(info[k]["seconds"] for k in ("size_sweep", "horizon_sweep", "long_prior_sweep"))  # λ0 given
    assert min(split.values()) > 0 and split["sweeps"] == pytest.approx(sweeps)
    assert sum(split.values()) == pytest.approx(info["meta_train_seconds"])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["validation_score"] is not None for r in lines[1:]] == [True, True, False, True]
    assert [len(r["validation"] or []) for r in lines[1:]] == [2, 2, 0, 2]  # the loss at each horizon
    for record in [r for r in lines if r["validation"]]:  # each mean and the two seeds' values behind it
        assert [statistics.mean(row) for row in record["validation_by_seed"]] == pytest.approx(record["validation"])
        assert [len(row) for row in record["validation_by_seed"]] == [2, 2]
    assert info["untrained_validation_by_seed"] == lines[0]["validation_by_seed"]
    assert info["validation_by_seed"] == lines[info["best_iteration"]]["validation_by_seed"]
    kept, best = 0, 0.0  # the lowest score among checkpoints that clear the margin on every seed and horizon
    for record in lines[1:]:
        if record["validation"] and record["validation_score"] < best and clears_noise(
                record["validation_by_seed"], lines[0]["validation_by_seed"], cfg.selection_margin):
            kept, best = record["iteration"], record["validation_score"]
    assert info["best_iteration"] == kept


def test_no_checkpoint_is_kept_when_none_clears_the_selection_margin(tmp_path):
    cfg = small(estimator="bptt", iterations=4, validate_every=2, validation_seeds=2, selection_margin=0.9)
    best = train(stiff_task(), tmp_path, cfg, progress=False)
    info = json.loads((best / "optimizer.json").read_text())
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert min(r["validation_score"] for r in lines[1:] if r["validation"]) < 0  # a lower mean, not 90% lower
    assert info["best_iteration"] == 0 and info["validation_score"] == 0.0


def test_validation_is_due_early_then_every_n_iterations():
    assert [i for i in range(1, 61) if validation_due(i, 20)] == [5, 10, 20, 40, 60]
    assert [i for i in range(1, 5) if validation_due(i, 2)] == [1, 2, 4]


def test_an_old_format_optimizer_is_refused_with_its_version(tmp_path):
    model = torch.nn.Linear(3, 2)
    L3RS(model.named_parameters(), lr=1e-3).save_pretrained(tmp_path)
    doc = json.loads((tmp_path / "optimizer.json").read_text())
    (tmp_path / "optimizer.json").write_text(json.dumps({**doc, "format_version": 1}))
    with pytest.raises(CheckpointError, match="format version 1"):
        load_meta(tmp_path)


def test_a_version_2_optimizer_still_loads_with_its_rms_normalization(tmp_path):
    model = torch.nn.Linear(3, 2)
    L3RS(model.named_parameters(), lr=1e-3).save_pretrained(tmp_path)
    doc = json.loads((tmp_path / "optimizer.json").read_text())
    assert doc["config"]["normalize"] == "rms"
    old = {**doc, "format_version": 2, "config": {**doc["config"], "normalize": True}}
    (tmp_path / "optimizer.json").write_text(json.dumps(old))
    loaded = L3RS.from_pretrained(tmp_path, model.named_parameters())
    assert loaded.config.normalize == "rms"


# ------------------------------------------------------------------------- data for shift generalization
def test_perturbed_variants_are_mild_seeded_and_not_the_evaluation_shifts():
    x = builtin.splits("mnistcnn-digits")[1][0][:64]
    a, b = data.perturb(x, 3, 0), data.perturb(x, 3, 0)
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)

    def corr(u: torch.Tensor, v: torch.Tensor) -> float:
        u, v = u.flatten() - u.mean(), v.flatten() - v.mean()
        return float(u @ v / (u.norm() * v.norm()))

    for seed in range(8):  # closer to the original than the held-out shifts are
        variant = data.perturb(x, seed, 1)
        assert corr(variant, x) > corr(data.rotate(x), x) + 0.15
        assert corr(variant, x) > corr(data.invert(x), x) + 0.15


def test_half_of_the_sampled_tasks_see_perturbed_data_and_shifts_stay_out():
    base_val = builtin.splits("mnistcnn-digits")[1][0]
    family = builtin.make_family(builtin.RECIPES["mnistcnn-digits"])
    perturbed = [not torch.equal(family.sample(seed).val[0], base_val) for seed in range(40)]
    assert 10 <= sum(perturbed) <= 30
    for seed in range(6):  # labels never relabelled: the "permuted" shift stays held out
        assert torch.equal(family.sample(seed).val[1], builtin.splits("mnistcnn-digits")[1][1])


# --------------------------------------------------------------------- priors: where meta-training starts
@pytest.mark.parametrize("mix", ["softmax", "linear"])
def test_a_prior_leaning_on_a_base_gives_it_most_of_the_untrained_mix(mix):
    config = functional.Config(normalize="snr", mix=mix)
    x = torch.zeros(3, config.num_features)
    _, leaning = functional.coefficients(config, config.init_meta(3, lean="adam"), x, 1.0)
    _, uniform = functional.coefficients(config, config.init_meta(3), x, 1.0)
    adam, others = config.bases.index("adam"), len(config.bases) - 1
    assert leaning[:, adam] == pytest.approx(torch.full((3,), functional.LEAN_WEIGHT))
    rest = torch.cat([leaning[:, :adam], leaning[:, adam + 1:]], dim=1)
    assert rest == pytest.approx(torch.full((3, others), (1 - functional.LEAN_WEIGHT) / others))
    assert uniform == pytest.approx(torch.full_like(uniform, 1 / len(config.bases)))
    with pytest.raises(ValueError, match="not one of the bases"):
        functional.Config(bases=("sgd", "adam")).init_meta(2, lean="sign")


def test_priors_default_to_uniform_and_adam_led_by_uniform_with_the_warmup_when_there_is_one():
    warm = functional.Config(normalize="snr", backbone_warmup=0.3)
    assert MetaConfig().priors == ("uniform", "adam")
    assert MetaConfig(config=warm).priors == ("uniform+warmup", "uniform", "adam")
    only_adam = functional.Config(normalize="snr", bases=("adam",), backbone_warmup=0.3)
    assert MetaConfig(config=only_adam).priors == ("uniform+warmup", "uniform")
    assert MetaConfig(config=functional.Config(bases=("sgd", "sign"))).priors == ("uniform",)
    assert MetaConfig(priors=["adam"]).priors == ("adam",)
    assert MetaConfig(config=warm, priors=["adam+warmup"]).to_dict()["priors"] == ["adam+warmup"]
    assert MetaConfig(config=warm).warmup_of("adam+warmup") == 0.3 and MetaConfig(config=warm).warmup_of("adam") == 0
    for bad in ("bogus", "adam+bogus", "warmup"):
        with pytest.raises(ValueError, match="neither 'uniform' nor one of the bases"):
            MetaConfig(config=warm, priors=(bad,))
    with pytest.raises(ValueError, match="each once"):
        MetaConfig(priors=("adam", "adam"))
    with pytest.raises(ValueError, match="needs a backbone warm-up"):
        MetaConfig(priors=("uniform+warmup",))
    collapsed = MetaConfig(config=only_adam, priors=("uniform", "adam", "adam+warmup")).priors
    assert collapsed == ("uniform", "uniform+warmup")
    with pytest.raises(ValueError, match="neither 'uniform' nor one of the bases"):  # checked before collapsing
        MetaConfig(config=only_adam, priors=("sgd",))


def _prior_runs(seen: dict[str, list], offsets: dict[str, list[float]]):
    """A fake `run`: each prior (told apart by its vector's value) has its loss lowest at its own λ, plus an
    offset per training seed (the first PRIOR_SEEDS, in order)."""
    seeds = sweep_seeds(small(), PRIOR_SEEDS)
    best = {"uniform+warmup": 3e-3, "uniform": 3e-3, "adam": 1e-2}

    def run(jobs):
        out = []
        for job in jobs:
            name = ["uniform+warmup", "uniform", "adam"][int(job.vector[0])]
            seen[name].append((job.lr0, job.run_seed, job.backbone_warmup))
            loss = offsets[name][seeds.index(job.run_seed)] + math.log10(job.lr0 / best[name]) ** 2
            out.append(Result(loss, loss, None, None, job.steps))
        return out
    return run


def test_prior_sweep_keeps_the_first_prior_unless_another_is_lower_on_3_of_4_seeds_and_in_the_mean():
    warm = functional.Config(normalize="snr", backbone_warmup=0.3)
    cfg = small(lr0=None, lr0_grid=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2), lr0_seeds=2, config=warm)
    vectors = {name: torch.full((2,), float(i)) for i, name in enumerate(cfg.priors)}
    seen: dict[str, list] = {name: [] for name in cfg.priors}
    lower = {"uniform+warmup": [0.5, 0.5, 0.5, 0.5], "uniform": [0.6, 0.6, 0.6, 0.6], "adam": [0.4, 0.45, 0.3, 0.4]}
    sweep = prior_sweep(cfg, H, vectors, _prior_runs(seen, lower))
    assert sweep["prior"] == "adam" and sweep["grid_lr0"] == pytest.approx(1e-2)
    assert sweep["lr0"] == pytest.approx(1e-2, rel=0.02) == sweep["priors"]["adam"]["placed_lr0"]
    assert sweep["priors"]["uniform+warmup"]["lr0"] == pytest.approx(3e-3)
    assert sweep["priors"]["adam"]["by_seed"] == pytest.approx(lower["adam"])  # 2 sweep seeds, 2 more at its λ0
    assert sweep["priors"]["adam"]["mean"] == pytest.approx(0.3875)
    assert sorted({lr for lr, _, _ in seen["adam"]})[:3] == pytest.approx([1e-3, 3e-3, 1e-2])  # around the first λ0
    assert {w for _, _, w in seen["uniform+warmup"]} == {0.3} and {w for _, _, w in seen["adam"]} == {0.0}
    points = sum(len(p["grid"]) for p in sweep["priors"].values())
    assert sweep["steps"] == (points * 2 + 3 * 2) * H and sweep["grid"] == sweep["priors"]["adam"]["grid"]
    assert prior_sweep(cfg, H, vectors, _prior_runs(seen, {**lower, "adam": [0.3, 0.3, 0.3, 0.9]}))["prior"] == "adam"
    # lower on 2 seeds of 4, on 3 but not in the mean, or equal: the first prior stays
    for adam in ([0.3, 0.3, 0.55, 0.55], [0.45, 0.45, 0.45, 0.9], [0.5, 0.5, 0.5, 0.5]):
        assert prior_sweep(cfg, H, vectors, _prior_runs(seen, {**lower, "adam": adam}))["prior"] == "uniform+warmup"
    # several qualify: the lowest mean of them
    both = {**lower, "uniform": [0.2, 0.3, 0.3, 0.3]}
    assert prior_sweep(cfg, H, vectors, _prior_runs(seen, both))["prior"] == "uniform"
    one = prior_sweep(small(lr0=None, priors=("adam",)), H, {"adam": vectors["adam"]}, _prior_runs(seen, lower))
    assert one["prior"] == "adam" and len(one["priors"]["adam"]["by_seed"]) == 2  # no choice: no more seeds
