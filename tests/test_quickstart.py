"""`l3rs quickstart` end to end, shrunk to seconds on a small user task."""

from __future__ import annotations

import json
from pathlib import Path

from l3rs import quickstart as qs
from l3rs.cli import main


def test_plan_gives_meta_training_what_the_evaluation_leaves():
    plan = qs.plan(horizon=60, budget_s=600, seeds=3, step_s=0.01, workers=2)
    assert 0 < plan["eval_seconds_estimate"] < 600
    assert plan["meta_seconds"] == min(600 * qs.META_SHARE, 600 - plan["eval_seconds_estimate"])
    tight = qs.plan(horizon=60, budget_s=600, seeds=3, step_s=1.0, workers=2)  # evaluation alone overruns
    assert tight["meta_seconds"] == 45.0


def test_quickstart_end_to_end_on_a_tiny_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    out = tmp_path / "qs"
    argv = ["quickstart", "--task", "examples.user_task:make_task", "--out", str(out), "--budget-minutes", "0.3",
            "--horizon", "6", "--seeds", "1", "--workers", "1", "--no-progress"]
    assert main(argv) == 0
    head = json.loads((out / "headline.json").read_text())
    assert [r["scenario"].split(" ")[-1] for r in head["rows"]] == ["x1", "x2", "x5"]
    assert head["meta_train_seconds"] > 0
    printed = capsys.readouterr().out
    assert "| scenario | best tuned baseline |" in printed and "L3RS meta-training" in printed
    report = (out / "eval" / "report.md").read_text()
    assert all(name in report for name in ("l3rs", *qs.BASELINES))
    assert (out / "meta" / "best" / "optimizer.safetensors").is_file()
