"""Evaluation: baseline tuning, speed-up, the ATMO mix, and `l3rs evaluate` end to end on a tiny task."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import l3rs
from l3rs import results, tasks
from l3rs.cli import main
from l3rs.evaluate import BASELINES, evaluate, methods, protocol, reuse, runs, stats, tuning
from l3rs.evaluate.runs import RunRequest, ScenarioRunner
from l3rs.finetune import RunResult, finetune
from l3rs.functional import Config
from l3rs.io import machine, save_json
from l3rs.report import tables as report_tables
from l3rs.results import EVAL_SEED
from l3rs.tasks import Task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def opt_dir(tiny: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    task = l3rs.tasks.get(tiny)
    path = tmp_path_factory.mktemp("opt") / "opt"
    opt = l3rs.L3RS(task.model_fn(0).named_parameters(), lr=3e-3, total_steps=task.horizon)
    opt.save_pretrained(path, task=tiny, meta_train_seconds=12.5)
    return str(path)


# ------------------------------------------------------------------------------ tuning on a quadratic
class Point(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))
        self.head = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(len(x), -1) + 0 * self.head


def quadratic(curvature: float) -> Task:
    """f(w) = ½·h·‖w − 1‖² from w = 0: one SGD(-momentum) step of size lr lands on the optimum iff lr = 1/h
    (torch's momentum buffer starts at the first gradient, so step one is plain SGD)."""

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * curvature * ((out - y) ** 2).sum(-1).mean()

    data = (torch.zeros(2, 1), torch.ones(2, 4))
    return Task("quadratic", lambda seed: Point(), data, data, loss_fn=loss,
                metric_fn=lambda o, y: -loss(o, y), batch_size=2, horizon=1, head=("head",))


def test_sgd_tuning_picks_the_analytic_best_lr() -> None:
    runner = ScenarioRunner(quadratic(10.0), steps=1, config=l3rs.Config())
    tuned = tuning.tune(runner, BASELINES["sgd"])
    assert tuned.hp["lr"] == pytest.approx(0.1)  # 1/h, an interior point of the grid
    assert len(tuned.trials) == len(tuning.SGD_GRID) >= 7
    assert min(t.val_loss for t in tuned.trials) == pytest.approx(0.0, abs=1e-10)
    assert len(tuning.TUNE_SEEDS) >= 2 and tuned.seconds > 0
    assert tuned.steps == len(tuning.SGD_GRID) * len(tuning.TUNE_SEEDS)
    for t in tuned.trials:  # scored by the mean over the tuning seeds
        assert len(t.val_losses) == len(tuning.TUNE_SEEDS)
        assert t.val_loss == pytest.approx(sum(t.val_losses) / len(tuning.TUNE_SEEDS))


def test_tuning_extends_the_grid_past_an_edge() -> None:
    runner = ScenarioRunner(quadratic(0.1), steps=1, config=l3rs.Config())  # best lr = 10, above the grid
    tuned = tuning.tune(runner, BASELINES["sgd-cosine"])
    assert tuned.hp["lr"] == pytest.approx(10.0)
    assert len(tuned.trials) == len(tuning.SGD_GRID) + 2


def test_head_variant_tunes_the_multiplier_at_the_best_lr() -> None:
    runner = ScenarioRunner(quadratic(10.0), steps=1, config=l3rs.Config())
    tuned = tuning.tune(runner, BASELINES["sgd-head"])
    heads = [t.hp["head"] for t in tuned.trials[len(tuning.SGD_GRID):]]
    assert heads == list(tuning.HEAD_MULTIPLIERS)
    assert all(t.hp["lr"] == pytest.approx(0.1) for t in tuned.trials[len(tuning.SGD_GRID):])


# ----------------------------------------------------------------------------------------- optimizers
def test_head_lr_groups_and_cosine_schedule() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    make = methods.make_optimizer(BASELINES["adamw-cosine-head"], {"lr": 0.01, "head": 10.0},
                             ("1.weight", "1.bias"), l3rs.Config())
    opt, sched = make(model.named_parameters(), 10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.1])
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)  # half-way down the cosine


def test_atmo_is_a_constant_mix_of_sgd_and_adam() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = methods.make_optimizer(BASELINES["atmo"], {"lr": 0.02, "mix": 0.75}, (), l3rs.Config())(
        model.named_parameters(), 10)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step(loss=torch.tensor(1.0))
    for c in opt.coefficients().values():
        assert c["lr"] == pytest.approx(0.02)
        assert c["mix"] == pytest.approx({"sgd": 0.25, "adam": 0.75})


LR_FREE = {"schedulefree-adamw": {}, "schedulefree-adamw-tuned": {"lr": 1e-2}, "prodigy": {}, "dog": {},
           "ldog": {}}


@pytest.mark.parametrize("name", LR_FREE)
def test_lr_free_baselines_lower_the_loss(tiny: str, name: str) -> None:
    task = l3rs.tasks.get(tiny)
    before = task.evaluate(task.model_fn(1000))["loss"]
    make = methods.make_optimizer(BASELINES[name], LR_FREE[name], task.head, l3rs.Config())
    run = finetune(task, make, steps=30, seed=1000, eval_every=10)
    assert not run.diverged and run.final_val_loss < before
    assert BASELINES[name].tuned == name.endswith("-tuned")


def test_a_meta_trained_optimizer_is_told_the_scenarios_training_set_size(tiny: str, tmp_path, monkeypatch) -> None:
    """As it is told the run's length: a shift with fewer training examples (`:fewer`) steps by its size exponent."""
    task = l3rs.tasks.get(tiny)
    config = Config(reference_train_size=len(task.train[1]), size_exponent=1.0)
    l3rs.L3RS(task.model_fn(0).named_parameters(), lr=3e-3, config=config).save_pretrained(tmp_path / "sized")
    made = []
    monkeypatch.setattr(methods.L3RS, "step", lambda self, *a, **k: made.append(self))
    method = methods.Method("l3rs", "l3rs", path=str(tmp_path / "sized"), tuned=False)
    smaller = task.with_train((task.train[0][:10], task.train[1][:10]))
    runs._run(runs.WorkerSetup(smaller, Config(), None, 1, 1), RunRequest(method, {}, 0, False))
    assert made[0].train_size == 10 and made[0].total_steps == 1


def test_untuned_baselines_cost_no_sweep() -> None:
    runner = ScenarioRunner(quadratic(10.0), steps=1, config=l3rs.Config())
    for name in ("schedulefree-adamw", "prodigy", "dog", "ldog"):
        assert tuning.tune(runner, BASELINES[name]) == tuning.tuning({}, [])
    assert not runner.cache
    lr_free = [BASELINES[n] for n in ("schedulefree-adamw", "prodigy", "dog", "ldog")]
    assert tuning.planned_runs(lr_free, seeds=5) == 5 * len(lr_free)


def test_iterate_average_evaluates_the_average_and_trains_the_iterates() -> None:
    w = torch.nn.Parameter(torch.zeros(3))
    opt = methods.IterateAverage(torch.optim.SGD([w], lr=1.0), gamma=0.0)  # γ = 0: the plain running mean
    for _ in range(4):
        opt.zero_grad()
        (-w.sum()).backward()  # every step adds 1
        opt.step()
    opt.eval()
    assert torch.allclose(w, torch.full((3,), 2.5))  # mean of the iterates 1, 2, 3, 4
    opt.train()
    assert torch.allclose(w, torch.full((3,), 4.0))


def test_schedule_free_is_evaluated_at_its_averaged_weights(tiny: str) -> None:
    task = l3rs.tasks.get(tiny)
    make = methods.make_optimizer(BASELINES["schedulefree-adamw"], {}, task.head, l3rs.Config())
    modes: list[bool] = []
    model = task.model_fn(1000)
    run = finetune(task, make, steps=6, seed=1000, eval_every=2, model=model,
                   on_step=lambda step, opt: modes.append(opt.param_groups[0]["train_mode"]))
    assert modes == [True] * 6  # back in train mode after each evaluation
    assert run.final_val_loss == pytest.approx(task.evaluate(model)["loss"])  # the run ends at the eval weights


# ------------------------------------------------------------------------------------------- speed-up
STEPS = [10, 20, 30, 40]


def test_speedup_when_the_candidate_is_faster() -> None:
    sp = stats.speedup([1.0, 0.6, 0.5, 0.5], [0.8, 0.5, 0.4, 0.3], STEPS)  # baseline reaches 0.5 at 30
    assert (sp.baseline_steps, sp.candidate_steps) == (30, 20)
    assert sp.ratio == pytest.approx(1.5) and sp.text == "1.50x" and sp.steps_text == "20"


def test_speedup_counts_first_arrivals() -> None:
    sp = stats.speedup([0.9, 0.7, 0.6, 0.4], [1.0, 0.9, 0.8, 0.4], STEPS)
    assert sp.ratio == pytest.approx(1.0)
    sp = stats.speedup([0.5, 0.45, 0.42, 0.4], [1.0, 0.9, 0.5, 0.39], STEPS)
    assert sp.ratio == pytest.approx(1.0)
    sp = stats.speedup([0.4, 0.45, 0.42, 0.4], [1.0, 0.9, 0.4, 0.39], STEPS)  # baseline first got there at 10
    assert sp.ratio == pytest.approx(10 / 30)


def test_speedup_never_reached() -> None:
    for candidate in ([0.9, 0.8, 0.7, 0.6], [float("inf")] * 4, [float("nan")] * 4):
        sp = stats.speedup([1.0, 0.6, 0.5, 0.5], candidate, STEPS)
        assert sp.candidate_steps is None and sp.ratio is None
        assert sp.steps_text == ">40" and sp.text == "<0.75x"


def test_a_diverged_run_reads_infinite_after_it_stopped() -> None:
    bad = RunResult(eval_steps=[2, 3], val_loss=[0.8, math.inf], diverged=True)
    assert results.aligned(bad, "val_loss", [2, 4, 6], math.inf) == [0.8, math.inf, math.inf]


# ----------------------------------------------------------------------------------------- statistics
def seed_curves(finals: list[float], points: int = 10, compress: float = 1.0) -> np.ndarray:
    """Per seed, a linear decline from 1 to `final` over `points` steps, done `compress` times as fast."""
    t = np.minimum(1.0, compress * np.arange(1, points + 1) / points)
    return np.array([1 - (1 - f) * t for f in finals])


GRID = list(range(10, 101, 10))
BEST = [0.30, 0.42, 0.25, 0.36, 0.50]  # the best baseline's final val loss on five evaluation seeds


def test_clearly_lower_loss_is_better_with_a_tight_interval() -> None:
    ours = [0.5 * v + 0.01 * (-1) ** i for i, v in enumerate(BEST)]
    vs = stats.compare(seed_curves(ours), seed_curves(BEST), GRID)
    assert vs.ratio == pytest.approx(sum(ours) / sum(BEST))
    lo, hi = vs.ratio_ci95
    assert 0.45 < lo <= vs.ratio <= hi < 0.56 and vs.verdict == "better"


def test_clearly_higher_loss_is_worse() -> None:
    vs = stats.compare(seed_curves([2 * v for v in BEST]), seed_curves(BEST), GRID)
    assert vs.ratio_ci95 == pytest.approx([2.0, 2.0]) and vs.verdict == "worse"


def test_noise_either_way_is_a_tie_although_the_means_differ() -> None:
    ours = [v + d for v, d in zip(BEST, [-0.1, 0.08, -0.09, 0.07, -0.02], strict=True)]  # mean 0.988x
    vs = stats.compare(seed_curves(ours), seed_curves(BEST), GRID)
    lo, hi = vs.ratio_ci95
    assert vs.ratio < 1 and lo < 1 < hi and vs.verdict == "tie"


def test_verdict_reads_only_the_interval() -> None:
    assert [stats.verdict(ci) for ci in ([0.5, 0.99], [1.01, 3.0], [0.9, 1.1], [0.5, 1.0])] == \
        ["better", "worse", "tie", "tie"]


def test_twice_as_fast_on_every_seed_is_a_speedup_of_two() -> None:
    vs = stats.compare(seed_curves(BEST, compress=2.0), seed_curves(BEST), GRID)
    assert vs.speedup == pytest.approx(2.0) and vs.speedup_ci95 == pytest.approx([2.0, 2.0])
    assert vs.ratio == pytest.approx(1.0) and vs.verdict == "tie"


def test_a_diverged_seed_makes_the_method_worse_and_never_reach() -> None:
    curves = seed_curves(BEST)
    curves[2, 4:] = np.inf  # seed 2 diverged at step 50
    vs = stats.compare(curves, seed_curves(BEST), GRID)
    assert vs.ratio == np.inf and vs.speedup == 0.0
    assert vs.ratio_ci95[1] == np.inf and vs.speedup_ci95[0] == 0.0


def test_bootstrap_is_deterministic_and_matches_the_normal_interval() -> None:
    values = np.random.default_rng(7).normal(3.0, 1.0, size=400).tolist()
    lo, hi = stats.mean_ci(values)
    half = 1.96 * np.std(values, ddof=1) / np.sqrt(len(values))
    assert lo == pytest.approx(np.mean(values) - half, abs=0.2 * half)
    assert hi == pytest.approx(np.mean(values) + half, abs=0.2 * half)
    assert stats.mean_ci(values) == [lo, hi] and stats.RESAMPLES >= 2000
    assert stats.mean_ci([0.2, 0.2, 0.2]) == pytest.approx([0.2, 0.2])
    assert stats.mean_ci([float("inf")]) is None


def test_ablations_are_meta_trained_with_their_configs(tiny: str, opt_dir: str, tmp_path) -> None:
    info = {**l3rs.optim.load_meta(opt_dir)["info"], "meta_config": {
        "iterations": 1, "population": 1, "lr0": 1e-2, "validate_every": 1, "validation_seeds": 1}}
    paths = protocol.meta_train_ablations(l3rs.Config(), info, tiny, tmp_path, budget_minutes=None, progress=False)
    configs = {name: l3rs.optim.load_meta(p)["config"] for name, p in paths.items()}
    assert configs["l3rs-global"].scope == "global" and configs["l3rs-global"].bases == l3rs.Config().bases
    assert configs["l3rs-adam-only"].bases == ("adam",) and configs["l3rs-adam-only"].scope == "tensor"
    assert configs["l3rs-no-features"].features == "none"
    for p in paths.values():
        assert l3rs.optim.load_meta(p)["info"]["meta_train_seconds"] > 0


# ----------------------------------------------------------------------------------------- end to end
def test_results_come_back_from_json_as_the_same_records(tiny: str, opt_dir: str, tmp_path) -> None:
    result = evaluate(opt_dir, tiny, tmp_path, horizons=(1,), seeds=2, baselines=["adamw"], shifts=(),
                      progress=False)
    assert results.load(tmp_path / "evaluation.json") == result
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    with pytest.raises(ValueError, match="format_version"):
        results.load(save_json({**saved, "format_version": 1}, tmp_path / "old.json"))


def test_cli_evaluate_end_to_end(tiny: str, opt_dir: str, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    rc = main(["evaluate", "--optimizer", opt_dir, "--task", tiny, "--out", str(out), "--horizons", "1,2",
               "--seeds", "2", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "evaluation.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    names = ["l3rs", *BASELINES]
    assert {"platform", "cpu_count", "torch"} <= set(result["machine"])
    assert [sc["steps"] for sc in result["scenarios"]] == [6, 12]
    examples = len(tasks.get(tiny).train[1])  # what the meta-trained optimizer was told, said in the report
    assert [sc["train_size"] for sc in result["scenarios"]] == [examples, examples]
    assert f"x1 (6 steps, {examples} training examples)" in (out / "report.md").read_text()
    for sc in result["scenarios"]:
        assert list(sc["methods"]) == names
        for m in sc["methods"].values():
            assert [r["seed"] for r in m["runs"]] == [1000, 1001]
            assert all(len(r["train_loss"]) == sc["steps"] and r["val_loss"] and r["test_metric"] is not None
                       for r in m["runs"])
        assert sc["methods"]["adamw"]["tuning"]["steps"] >= 7 * len(tuning.TUNE_SEEDS) * sc["steps"]
        assert sc["methods"]["l3rs"]["tuning"]["steps"] == 0
        assert sc["eval_steps"] == list(range(1, sc["steps"] + 1))  # short runs: validated after every step
        for m in sc["methods"].values():
            lo, hi = m["summary"]["val_loss"]["ci95"]
            assert lo <= m["summary"]["val_loss"]["mean"] <= hi
            assert m["vs_best"]["verdict"] in ("better", "tie", "worse")
            assert len(m["vs_best"]["ratio_ci95"]) == len(m["vs_best"]["speedup_ci95"]) == 2
        assert sc["methods"][sc["best_baseline"]]["vs_best"]["ratio"] == 1.0
    assert result["format_version"] == results.FORMAT_VERSION
    assert result["optimizer"]["meta_train_seconds"]["l3rs"] == 12.5
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for name in names:
        assert f"| {name} |" in md or f"**{name}**" in md
        assert f"<td>{name}</td>" in page or f"<b>{name}</b>" in page
    pngs = sorted((out / "plots").glob("*.png"))
    assert {p.name for p in pngs} >= {"curves_0.png", "curves_1.png", "lambda_heatmap.png", "mix_heatmap.png"}
    for p in pngs:
        assert p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 5000
        assert f"plots/{p.name}" in md and f'src="plots/{p.name}"' in page


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    rc = main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


def test_missing_optimizer_dir_is_a_one_line_error(tiny: str, tmp_path, capsys) -> None:
    rc, err = run_cli(["evaluate", "--optimizer", str(tmp_path / "nope"), "--task", tiny, "--out",
                       str(tmp_path / "o"), "--no-progress"], capsys)
    assert rc == 2 and len(err) == 1 and "nope" in err[0]


def test_optimizer_for_another_model_is_a_one_line_error(tiny: str, tmp_path, capsys) -> None:
    other = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 2))
    l3rs.L3RS(other.named_parameters(), lr=1e-3).save_pretrained(tmp_path / "other")
    rc, err = run_cli(["evaluate", "--optimizer", str(tmp_path / "other"), "--task", tiny, "--out",
                       str(tmp_path / "o"), "--no-progress"], capsys)
    assert rc == 2 and len(err) == 1 and "another model" in err[0]
    assert not (tmp_path / "o").exists()  # failed before any run


@pytest.mark.parametrize("flags", [["--baselines", "adamw,lion"], ["--horizons", "1,x"], ["--horizons", "0"],
                                   ["--seeds", "0"], ["--shifts", "no-such-task"], ["--budget-minutes", "0"],
                                   ["--budget-minutes", "-1"]])
def test_bad_flags_are_one_line_errors(tiny: str, opt_dir: str, tmp_path, capsys, flags: list[str]) -> None:
    rc, err = run_cli(["evaluate", "--optimizer", opt_dir, "--task", tiny, "--out", str(tmp_path / "o"),
                       "--no-progress", *flags], capsys)
    assert rc == 2 and len(err) == 1, err


# ------------------------------------------------------------------------------------- reused baselines
REUSED = ["adamw", "adamw-head", "prodigy"]  # a tuned baseline, one sharing its sweep, an untuned one


@pytest.fixture(scope="module")
def first_evaluation(one_thread: None, tiny: str, opt_dir: str,
                     tmp_path_factory: pytest.TempPathFactory) -> tuple[results.EvaluationResult, Path]:
    out = tmp_path_factory.mktemp("first")
    result = evaluate(opt_dir, tiny, out, horizons=(1,), seeds=2, baselines=[*REUSED, "l3rs-untrained"],
                      shifts=(), progress=False)
    return result, out / "evaluation.json"


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(method, steps) of every fine-tuning run from here on (workers=1: all run in this process)."""
    calls: list[tuple[str, int]] = []
    real = runs._run

    def counted(setup: runs.WorkerSetup, request: RunRequest) -> RunResult:
        calls.append((request.method.name, setup.steps))
        return real(setup, request)

    monkeypatch.setattr(runs, "_run", counted)
    return calls


def test_reused_baselines_give_the_full_evaluations_numbers(tiny: str, opt_dir: str, first_evaluation, ran,
                                                            tmp_path) -> None:
    first, path = first_evaluation
    second = evaluate(opt_dir, tiny, tmp_path, horizons=(1,), seeds=2, baselines=[*REUSED, "l3rs-untrained"],
                      shifts=(), progress=False, baselines_from=path)
    assert {name for name, _ in ran} == {"l3rs", "l3rs-untrained"}  # built from the optimizer's Config: rerun
    (a,), (b,) = first.scenarios, second.scenarios
    assert b.best_baseline == a.best_baseline and list(b.methods) == list(a.methods)
    for name in REUSED:  # the very runs of the first evaluation (their seconds included)
        assert b.methods[name].tuning == a.methods[name].tuning
        assert b.methods[name].summary == a.methods[name].summary
    for name in ("l3rs", "l3rs-untrained"):
        assert b.methods[name].vs_best == a.methods[name].vs_best
    assert second.settings.baselines_from == str(path)
    assert second.settings.reused == [f"{a.label}/{name}" for name in REUSED]
    assert f"Baselines reused from `{path}`" in (tmp_path / "report.md").read_text()


def test_baselines_run_where_the_previous_evaluation_differs(tiny: str, opt_dir: str, first_evaluation, ran,
                                                             tmp_path) -> None:
    _, path = first_evaluation
    result = evaluate(opt_dir, tiny, tmp_path, horizons=(1, 2), seeds=2, baselines=["adamw", "sgd"],
                      shifts=(), progress=False, baselines_from=path)
    # sgd was never run; x2 is a new scenario
    assert set(ran) == {("l3rs", 6), ("sgd", 6), ("l3rs", 12), ("adamw", 12), ("sgd", 12)}
    assert result.settings.reused == [f"{result.scenarios[0].label}/adamw"]


@pytest.mark.parametrize("seeds", [3, 1])
def test_reused_baselines_keep_their_tuning_and_run_only_the_seeds_they_lack(tiny: str, opt_dir: str,
                                                                             first_evaluation, ran, tmp_path,
                                                                             seeds: int) -> None:
    first, path = first_evaluation
    result = evaluate(opt_dir, tiny, tmp_path, horizons=(1,), seeds=seeds, baselines=["adamw"], shifts=(),
                      progress=False, baselines_from=path)
    old, new = first.scenarios[0].methods["adamw"], result.scenarios[0].methods["adamw"]
    assert ran.count(("adamw", 6)) == max(0, seeds - 2)  # the seeds it lacks; no tuning run
    assert new.tuning == old.tuning and new.hp == old.hp
    assert [r.seed for r in new.runs] == list(range(EVAL_SEED, EVAL_SEED + seeds))
    assert [r.final_val_loss for r in new.runs[:2]] == [r.final_val_loss for r in old.runs[:seeds]]
    assert new.summary.seeds == seeds and len(result.scenarios[0].methods["l3rs"].runs) == seeds


@pytest.mark.parametrize("fingerprint", ["0123456789abcdef", None])  # another machine's backbone; an older file
def test_baselines_of_another_task_or_model_are_not_reused(tiny: str, opt_dir: str, first_evaluation, ran, tmp_path,
                                                           capsys, fingerprint) -> None:
    saved = json.loads(first_evaluation[1].read_text())
    assert saved["scenarios"][0]["fingerprint"] == reuse.task_fingerprint(l3rs.tasks.get(tiny), EVAL_SEED)
    saved["scenarios"][0]["fingerprint"] = fingerprint
    path = save_json(saved, tmp_path / "other.json")
    result = evaluate(opt_dir, tiny, tmp_path / "o", horizons=(1,), seeds=2, baselines=["adamw"], shifts=(),
                      progress=False, baselines_from=path)
    assert result.settings.reused == [] and {name for name, _ in ran} == {"l3rs", "adamw"}
    assert "not reused" in capsys.readouterr().err


@pytest.mark.parametrize("cpu", ["same", "other", "unrecorded"])
def test_reuse_from_another_machine_is_said(tiny: str, opt_dir: str, first_evaluation, tmp_path, capsys,
                                            cpu: str) -> None:
    saved = json.loads(first_evaluation[1].read_text())
    if cpu == "other":
        saved["machine"]["cpu_flags"] = "0123456789ab"
    elif cpu == "unrecorded":  # written before the CPU's features were recorded
        del saved["machine"]["cpu_capability"], saved["machine"]["cpu_flags"]
    path = save_json(saved, tmp_path / "previous.json")
    result = evaluate(opt_dir, tiny, tmp_path / "o", horizons=(1,), seeds=2, baselines=["adamw"], shifts=(),
                      progress=False, baselines_from=path)
    assert result.settings.reused  # reused either way: the statistics stay valid
    assert ("ran on another machine" in capsys.readouterr().err) == (cpu != "same")


def test_same_machine_compares_what_decides_rounding() -> None:
    here = machine()
    assert here["cpu_capability"] and reuse.same_machine(here, dict(here, platform="another kernel build"))
    for key, value in (("cpu_capability", "DEFAULT"), ("cpu_flags", "x"), ("cuda", "some GPU"), ("torch", "2.0")):
        assert not reuse.same_machine(dict(here, **{key: value}), here)
    assert not reuse.same_machine({k: v for k, v in here.items() if k != "cpu_capability"}, here)


def test_the_fingerprint_sees_a_changed_model_or_data(tiny: str) -> None:
    task = l3rs.tasks.get(tiny)
    base = reuse.task_fingerprint(task, EVAL_SEED)
    assert reuse.task_fingerprint(task, EVAL_SEED) == base
    assert reuse.task_fingerprint(task, EVAL_SEED + 1) != base  # another head init
    x, y = task.val
    assert reuse.task_fingerprint(dataclasses.replace(task, val=(x + 1e-6, y)), EVAL_SEED) != base


def test_evaluation_json_without_reuse_fields_still_loads(first_evaluation, tmp_path) -> None:
    saved = json.loads(first_evaluation[1].read_text())
    for key in ("baselines_from", "reused"):
        del saved["settings"][key]
    settings = results.load(save_json(saved, tmp_path / "older.json")).settings
    assert settings.baselines_from is None and settings.reused == []


def test_missing_baselines_from_file_is_a_one_line_error(tiny: str, opt_dir: str, tmp_path, capsys) -> None:
    rc, err = run_cli(["evaluate", "--optimizer", opt_dir, "--task", tiny, "--out", str(tmp_path / "o"),
                       "--no-progress", "--baselines-from", str(tmp_path / "nope.json")], capsys)
    assert rc == 2 and len(err) == 1 and "--baselines-from" in err[0] and "nope.json" in err[0]
    assert not (tmp_path / "o").exists()
    for name, text in (("old.json", '{"format_version": 0}'), ("broken.json", "{not json")):
        (tmp_path / name).write_text(text)
        rc, err = run_cli(["evaluate", "--optimizer", opt_dir, "--task", tiny, "--out", str(tmp_path / "o"),
                           "--no-progress", "--baselines-from", str(tmp_path / name)], capsys)
        assert rc == 2 and len(err) == 1 and "not a readable evaluation.json" in err[0]


def test_the_lowest_baseline_outside_the_tuned_pool_is_named_and_compared(first_evaluation) -> None:
    pool = [BASELINES["adamw"], BASELINES["prodigy"], methods.meta_trained("l3rs", "unused")]
    assert protocol.lowest_baseline(pool, {"adamw": 0.2, "prodigy": 0.1, "l3rs": 0.05}, "adamw") == "prodigy"
    assert protocol.lowest_baseline(pool, {"adamw": 0.2, "prodigy": 0.3, "l3rs": 0.05}, "adamw") is None
    scenario = first_evaluation[0].scenarios[0]
    assert (scenario.lowest_baseline is None) == (scenario.vs_lowest is None)
    other = next(n for n in scenario.methods if n not in ("l3rs", scenario.best_baseline))
    named = dataclasses.replace(scenario, lowest_baseline=other, vs_lowest=scenario.methods["l3rs"].vs_best)
    assert f"The lowest loss of any baseline is {other}'s" in report_tables.verdict(named)
    assert "lowest loss of any" not in report_tables.verdict(dataclasses.replace(scenario, lowest_baseline=None,
                                                                                  vs_lowest=None))


def test_parallel_runner_matches_sequential(tiny: str) -> None:
    task = l3rs.tasks.get(tiny)
    method = BASELINES["adamw"]
    requests = [RunRequest(method, {"lr": lr}, tuning.TUNE_SEEDS[0], False) for lr in (1e-3, 1e-2)]
    parallel = ScenarioRunner(task, steps=5, config=l3rs.Config(), workers=2)
    try:
        parallel.prefetch(requests)
    finally:
        parallel.close()
    assert len(parallel.cache) == 2  # computed by the worker processes
    sequential = ScenarioRunner(task, steps=5, config=l3rs.Config())
    for m, hp, seed, curves in requests:
        a, b = parallel.run(m, hp, seed, curves), sequential.run(m, hp, seed, curves)
        assert a.final_val_loss == b.final_val_loss  # bit-identical: both single-threaded


def test_runs_in_this_process_are_single_threaded_like_the_workers(tiny: str, monkeypatch) -> None:
    """Conv results depend on the thread count (cnn04: 0.4214 on one thread, 0.4246 on two after 100 AdamW
    steps), so `--workers 1` must run like the pool's single-threaded workers."""
    seen = []
    real = runs.finetune
    monkeypatch.setattr(runs, "finetune", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ScenarioRunner(l3rs.tasks.get(tiny), steps=3, config=l3rs.Config()).run(BASELINES["adamw"], {"lr": 1e-3}, 0)
        assert seen == [1] and torch.get_num_threads() == 2  # one thread inside, the caller's count restored
    finally:
        torch.set_num_threads(before)


# -------------------------------------------------------------------------------------- benchmarks/suite
@pytest.fixture
def suite(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    return importlib.import_module("benchmarks.suite")


def test_break_even_counts_jobs_until_meta_training_pays_off(suite) -> None:
    assert suite.break_even(100.0, sweep_s=9.0, baseline_run_s=1.0, l3rs_run_s=1.0) == 12  # 112 < 120
    assert suite.break_even(90.0, sweep_s=9.0, baseline_run_s=1.0, l3rs_run_s=1.0) == 11  # 10 jobs only tie
    assert suite.break_even(5.0, sweep_s=0.0, baseline_run_s=1.0, l3rs_run_s=2.0) is None


def test_generalization_reuses_a_previous_runs_evaluation_if_there(monkeypatch, tmp_path) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    previous = importlib.import_module("benchmarks.generalization").previous_evaluation
    path = tmp_path / "tiny" / "eval" / "evaluation.json"
    assert previous(None, "tiny") is None and previous(str(tmp_path), "tiny") is None
    path.parent.mkdir(parents=True)
    path.write_text("{}")
    assert previous(str(tmp_path), "tiny") == path
    copy = tmp_path / "docs" / "tiny" / "evaluation.json"  # a copy without the eval/ level
    copy.parent.mkdir(parents=True)
    copy.write_text("{}")
    assert previous(str(tmp_path / "docs"), "tiny") == copy


def test_unswept_alpha_pairs_each_alphas_final_losses_by_seed(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    module = importlib.import_module("benchmarks.unswept_alpha")
    runs = [{"seed": 1001, "val_loss": [9.0, 3.0]}, {"seed": 1000, "val_loss": [9.0, 1.0]}]
    finals = module.finals({"scenarios": [{"label": "t x2", "methods": {"l3rs": {"runs": runs}}}]})
    assert finals["t x2"].tolist() == [1.0, 3.0]  # the last point, in seed order
    paired = module.paired(finals["t x2"], np.array([2.0, 2.0]))
    assert paired["ratio"] == 1.0 and paired["lower_on"] == 1 and paired["seeds"] == 2
    assert paired["ratio_ci95"][0] == 0.5 and paired["ratio_ci95"][1] == 1.5  # both seeds drawn twice, each way


def test_unswept_alpha_reuses_an_earlier_evaluation_only_on_as_many_seeds(monkeypatch, tmp_path) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    module = importlib.import_module("benchmarks.unswept_alpha")
    assert module.earlier_evaluation(tmp_path, 10) is None  # nothing there yet
    (tmp_path / "evaluation.json").write_text(json.dumps({"settings": {"seeds": 5}, "scenarios": []}))
    assert module.earlier_evaluation(tmp_path, 5) == {"settings": {"seeds": 5}, "scenarios": []}
    assert module.earlier_evaluation(tmp_path, 10) is None  # run again on the seeds asked for


@pytest.mark.parametrize("multiple", [2.0, 4.0])
def test_alpha_sweep_replays_the_librarys_fit_on_stored_losses(monkeypatch, multiple) -> None:
    """Per-seed losses over λ0 / step^(k/2) whose minimum sits at λ0 · multiple^−0.9, 4-15% below λ0's (under the
    mean margin): every seed pair fits α ≈ 0.9 (within the vertex's reach), and a margin above the gain fits 0."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    module = importlib.import_module("benchmarks.alpha_sweep")
    step = module.sweep_step(10**0.5, multiple)
    lrs = module.half_steps(1.0, step)
    best = multiple**-0.9
    losses = [[(1 + 0.05 * seed) * math.exp(0.1 * math.log(lr / best) ** 2) for lr in lrs] for seed in range(3)]
    gain = 1 - losses[0][min(range(len(lrs)), key=lambda k: losses[0][k])] / losses[0][0]
    assert gain < module.SWEEP_MEAN_MARGIN / (1 + module.SWEEP_MEAN_MARGIN)
    assert module.replay(losses, (0, 2), 1.0, step, multiple, 0.0) == pytest.approx(0.9, abs=0.1)
    assert module.replay(losses, (1, 2), 1.0, step, multiple, 1.1 * gain / (1 - gain)) == 0.0
    by_margin = module.fits_by_margin(losses, 1.0, step, multiple, [0.0, 1.1 * gain / (1 - gain)])
    assert [v["alpha_nonzero"] for v in by_margin.values()] == [3, 0]  # every pair of 3 seeds, then none


def test_generalization_rows_list_every_methods_speedup(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    rows_of = importlib.import_module("benchmarks.generalization").rows_of

    def method(loss: float, speedup: float | None) -> dict:
        return {"summary": {"val_loss": {"mean": loss}}, "speedup": {"ratio": speedup},
                "vs_best": {"ratio": 0.9, "speedup": speedup}}

    scenario = {"label": "tiny x1", "multiple": 1.0, "variant": None, "best_baseline": "adamw",
                "methods": {"l3rs": method(0.9, 1.2), "adamw": method(1.0, 1.0), "prodigy": method(1.3, None)}}
    (row,) = rows_of({"scenarios": [scenario]})
    assert row["speedups"] == {"l3rs": 1.2, "adamw": 1.0, "prodigy": None}
    assert row["ratio"] == 0.9 and row["baseline_val_loss"] == 1.0


def test_ablations_evaluate_an_optimizer_once_however_many_variants_ship_it(monkeypatch, tmp_path) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    key = importlib.import_module("benchmarks.ablations").optimizer_key
    model = torch.nn.Linear(3, 2)
    for name, lr, seconds in (("a", 1e-3, 10.0), ("b", 1e-3, 99.0), ("c", 2e-3, 10.0)):
        l3rs.L3RS(model.named_parameters(), lr=lr).save_pretrained(tmp_path / name, meta_train_seconds=seconds)
    assert key(tmp_path / "a") == key(tmp_path / "b")  # only the record of how it was made differs
    assert key(tmp_path / "a") != key(tmp_path / "c")


def test_suite_gives_a_slow_task_its_smallest_run_and_splits_the_rest_evenly(suite) -> None:
    smallest = {"fast": 100.0, "slow": 1700.0, "mid": 300.0, "huge": 5000.0}
    kept = suite.affordable(smallest, 3600.0)  # huge does not fit beside the others; order is kept
    assert kept == ["fast", "slow", "mid"]
    left, shares = 3600.0, []
    for i, name in enumerate(kept):  # each task takes exactly its share
        shares.append(suite.share_of(name, left, kept[i:], smallest))
        left -= shares[-1]
    assert shares == pytest.approx([100 + 500, 1700 + 500, 300 + 500]) and left == pytest.approx(0)
    assert suite.share_of("mid", 100.0, ["mid"], smallest) == 300.0  # overrun before: still its smallest run


@pytest.mark.slow
def test_suite_takes_the_first_shift_a_task_has_or_the_ones_listed(suite) -> None:
    known = {"a", "a:rotated", "a:heldout", "b", "b:heldout", "c"}
    assert [suite.task_shifts(t, "rotated|heldout", known) for t in "abc"] == [["rotated"], ["heldout"], []]
    assert suite.task_shifts("a", "heldout,rotated", known) == ["heldout", "rotated"]
    assert suite.task_shifts("a", "auto", known) == ["heldout", "rotated"]
    assert suite.task_shifts("a", "none", known) == []


def test_suite_smoke_run_on_a_tiny_task(suite, tiny: str, tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, suite.__file__, "--tasks", tiny, "--budget-minutes", "1.2",
                           "--seeds", "2", "--horizons", "1", "--baselines", "adamw,prodigy", "--shifts", "none",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, check=True)
    report = json.loads(proc.stdout)
    assert [r["task"] for r in report["rows"]] == [tiny] and report["rows"][0]["verdict"] in ("better", "tie", "worse")
    assert report["break_even"][0]["meta_train_cpu_seconds"] > 0
    stage = report["stages"][0]  # what it planned fits the budget (its wall time is a benchmark's business)
    assert stage["plan"]["horizons"] == [1.0] and stage["budget_seconds"] <= 72
    assert stage["plan"]["meta_seconds"] + stage["plan"]["eval_seconds_estimate"] <= stage["budget_seconds"]
    assert "| task | scenario |" in (tmp_path / "suite.md").read_text()
    assert (tmp_path / "suite.png").read_bytes()[:4] == b"\x89PNG"


def test_bn_staleness_recomputes_batchnorm_statistics_on_a_copy(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    module = importlib.import_module("benchmarks.bn_staleness")
    task = tasks.get("cnn04-mnist59")
    model = task.model_fn(0)
    finetune(task, methods.make_optimizer(BASELINES["adamw"], {"lr": 1e-3}, task.head, Config()), 40, 0,
             model=model)  # a head that reads the features
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:  # statistics far from the activations': what a run leaves when its weights moved fast
        m.running_var.mul_(25.0)
    stale = task.evaluate(model, split="val")["loss"]
    fresh = module.recomputed_statistics_loss(task, model)["loss"]
    assert fresh < 0.5 * stale
    assert all(m.momentum == 0.1 for m in norms)  # the model itself untouched: a copy was recomputed
    assert task.evaluate(model, split="val")["loss"] == pytest.approx(stale)
    name, method, hp = module.parse_method("adamw-cosine:lr=0.003")
    assert (name, method.kind, method.cosine, hp) == ("adamw-cosine:lr=0.003", "adamw", True, {"lr": 0.003})
    name, method, _ = module.parse_method("mine=runs/x/best")
    assert (name, method.kind, method.path) == ("mine", "l3rs", "runs/x/best")
    with pytest.raises(SystemExit, match="neither"):
        module.parse_method("adamw")


# ---------------------------------------------------------------------------------- benchmarks/cuda_check
def test_the_device_check_runs_its_meta_gradient_and_state_transfer_checks(monkeypatch) -> None:
    """On a machine without CUDA the device is the CPU: the checks must still run and pass (the script is what
    `docs/RESULTS.md` ran on a GPU; a check that breaks here would break there)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    check = importlib.import_module("benchmarks.cuda_check")
    meta, transfer = check.check_meta_unroll(), check.check_state_dict()
    assert meta["passed"] and transfer["passed"], (meta, transfer)
    assert meta["worker_bptt"]["grad_norm"] > 0 and transfer["cpu_to_dev"]["state_on_target"]
