"""`l3rs quickstart` end to end, shrunk to seconds on a small user task; its budget planning and refusals."""

from __future__ import annotations

import json

import pytest

from l3rs import quickstart as qs
from l3rs.cli import main

FAST = qs.Timing(step=0.001, validation=0.002)
SLOW = qs.Timing(step=0.05, validation=0.2)


def test_a_bigger_budget_buys_a_bigger_evaluation_and_meta_training_gets_the_rest():
    small, large = (qs.plan(60, budget, None, SLOW, 2, True) for budget in (400, 6000))
    assert small is not None and large is not None
    assert len(small["horizons"]) * small["seeds"] < len(large["horizons"]) * large["seeds"]
    for stages, budget in ((small, 400), (large, 6000)):
        assert stages["eval_seconds_estimate"] + stages["meta_seconds"] == pytest.approx(budget)
        assert stages["meta_seconds"] >= qs.min_meta_seconds(60, SLOW)
    assert large["horizons"] == [1, 2, 5] and large["seeds"] == 5 and "prodigy" in large["baselines"]


def test_no_tier_fits_below_the_smallest_budget():
    smallest = qs.smallest_seconds(60, None, SLOW, 2, True)
    assert qs.plan(60, 0.99 * smallest, None, SLOW, 2, True) is None
    stages = qs.plan(60, 1.01 * smallest, None, SLOW, 2, True)
    assert stages is not None and stages["horizons"] == [1] and stages["baselines"] == ["adamw"]


def test_fixed_horizons_and_baselines_override_the_tiers_and_their_estimate():
    fixed = qs.plan(60, 6000, 5, SLOW, 2, True, baselines=("adamw", "prodigy"), horizons=(1, 2))
    assert fixed["horizons"] == [1, 2] and fixed["baselines"] == ["adamw", "prodigy"] and fixed["seeds"] == 5
    tier = qs.Tier((1, 2), 5, ("adamw", "prodigy"), True)
    assert fixed["eval_seconds_estimate"] == pytest.approx(qs.evaluation_seconds(tier, 60, 5, SLOW, 2, True))


def test_estimate_counts_tuning_seeds_validation_passes_and_workers():
    tier = qs.TIERS[0]
    one = qs.evaluation_seconds(tier, 60, 2, FAST, 1, False)
    assert qs.evaluation_seconds(tier, 60, 2, FAST, 2, False) == pytest.approx(one / qs.PARALLEL_GAIN)
    assert qs.evaluation_seconds(tier, 60, 2, qs.Timing(0.001, 0.004), 1, False) > one
    assert qs.evaluation_seconds(tier, 60, 4, FAST, 1, False) > one
    pool_and_report = qs.evaluation_seconds(tier, 60, 2, FAST._replace(startup=3.0), 2, False)
    assert pool_and_report == pytest.approx(qs.evaluation_seconds(tier, 60, 2, FAST, 2, False) + 2 * 3.0)


def test_timing_is_measured_single_threaded_like_the_worker_processes(tiny: str):
    import torch

    from l3rs import tasks

    task, seen = tasks.get(tiny), []
    model_fn = task.model_fn
    task.model_fn = lambda seed: seen.append(torch.get_num_threads()) or model_fn(seed)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        timing = qs.measure(task, steps=2)
        assert seen == [1] and torch.get_num_threads() == 2  # measured alone, then restored
    finally:
        torch.set_num_threads(before)
    assert timing.step > 0 and timing.validation > 0


@pytest.mark.parametrize("budget", ["0", "-1", "nan"])
def test_non_positive_budget_is_refused_in_one_line(budget: str, tmp_path, capsys):
    assert main(["quickstart", "--budget-minutes", budget, "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--budget-minutes" in err[0]
    assert not (tmp_path / "q").exists()


def test_budget_below_the_minimum_names_the_minimum(tiny: str, tmp_path, capsys):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("an earlier run")
    assert main(["quickstart", "--task", tiny, "--budget-minutes", "0.001", "--out", str(tmp_path / "q"),
                 "--horizon", "6", "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "below the smallest quickstart" in err[0] and err[0].endswith("minutes")
    assert (tmp_path / "q" / "keep.txt").exists()  # refused before touching the output


def test_ctrl_c_exits_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qs, "quickstart", interrupted)
    assert main(["quickstart", "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_quickstart_end_to_end_on_a_tiny_budget(tiny: str, tmp_path, monkeypatch, capsys):
    # the plan must not depend on this machine's load: timings that buy the smallest tier in 12 s
    monkeypatch.setattr(qs, "measure", lambda task: qs.Timing(step=0.02, validation=0.02))
    out = tmp_path / "qs"
    argv = ["quickstart", "--task", tiny, "--out", str(out), "--budget-minutes", "0.2", "--horizon", "6",
            "--seeds", "2", "--workers", "1", "--no-progress"]
    assert main(argv) == 0
    head = json.loads((out / "headline.json").read_text())
    stages = json.loads((out / "plan.json").read_text())
    assert stages["horizons"] == [1] and len(stages["baselines"]) < len(qs.BASELINES)
    assert [r["scenario"].split(" ")[-1] for r in head["rows"]] == [f"x{h:g}" for h in stages["horizons"]]
    assert all(r["verdict"] in ("better", "tie", "worse") for r in head["rows"])
    assert head["meta_train_seconds"] > 0 and head["budget_seconds"] == 12
    assert 0 < stages["meta_seconds"] <= 12 - stages["eval_seconds_estimate"]  # the rest, less preparing
    printed = capsys.readouterr().out
    assert "| scenario | best tuned baseline |" in printed and "L3RS meta-training" in printed
    report = (out / "eval" / "report.md").read_text()
    assert all(name in report for name in ("l3rs", *stages["baselines"]))
    assert (out / "meta" / "best" / "optimizer.safetensors").is_file()
