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
