"""The `l3rs` entry point: wiring, one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from l3rs.cli import COMMANDS, main


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "0.1.0"
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize("argv", [["bogus"], ["--bogus-flag"], ["meta-train", "--no-such-flag"]])
def test_misuse_is_one_line_and_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("l3rs: error:")


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "l3rs", "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "0.1.0"


def test_readme_user_task_example_meta_trains_through_the_cli(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    import l3rs

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    out = tmp_path / "mine"
    argv = ["meta-train", "--task", "examples.user_task:make_task", "--out", str(out), "--iterations", "3",
            "--horizon", "12", "--lr0", "1e-3", "--workers", "1", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "validation seed by seed at 12, 48 steps: kept " in printed and "; untrained " in printed
    task = l3rs.tasks.get("examples.user_task:make_task")
    opt = l3rs.L3RS.from_pretrained(out / "best", task.model_fn(1).named_parameters())
    assert set(opt.coefficients()) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}


def test_readme_python_example_runs():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["opt"].step_count == 200 and namespace["loss"].item() < 1.0
