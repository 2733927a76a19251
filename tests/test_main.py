"""``python -m matrixopt``: ``--help`` prints usage and runs nothing; bad options fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import matrixopt
from matrixopt.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "matrixopt", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_help_prints_usage_and_does_not_run_the_self_check():
    res = _run("--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python -m matrixopt")
    assert "self-check" in res.stdout          # the description says what a plain run does
    # ... but did not do it: no backend table, no check lines
    assert "Triton importable" not in res.stdout and "self-check:" not in res.stdout
    assert "  OK  " not in res.stdout


def test_help_in_process_exits_before_any_check(capsys):
    ran = []
    with pytest.raises(SystemExit) as exc:
        main(["-h"], checks=[("spy", lambda: ran.append(1) or "ran")])
    assert exc.value.code == 0 and ran == []
    assert "usage:" in capsys.readouterr().out


def test_unknown_option_is_an_error_naming_it(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--bogus"], checks=[])
    assert exc.value.code == 2
    assert "--bogus" in capsys.readouterr().err


def test_version_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"], checks=[])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"matrixopt {matrixopt.__version__}"


def test_no_arguments_still_runs_the_checks(capsys):
    ran = []
    assert main([], checks=[("spy", lambda: ran.append(1) or "ran")]) == 0
    assert ran == [1] and "self-check: OK" in capsys.readouterr().out
