"""benchmarks/gpu_check.sh, the check run on a lent GPU machine: its syntax, and its budget
logic through a dry run (no GPU: each step takes its minimum time on a simulated clock)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _dry_run(out: Path, budget: int, **env: str) -> list[str]:
    run = subprocess.run(
        ["bash", str(SCRIPT)], cwd=SCRIPT.parent.parent, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "BUDGET": str(budget), "OUT": str(out),
             "PY": sys.executable, **env},
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return (out / "summary.txt").read_text().splitlines()


@pytest.mark.parametrize(("budget", "skipped"), [(1000, 0), (200, 14), (30, 21)])
def test_dry_run_skips_what_the_budget_cannot_hold(tmp_path, budget, skipped):
    out = tmp_path / "out"
    summary = _dry_run(out, budget)
    assert sum("SKIP" in line for line in summary) == skipped, summary
    assert json.loads((out / "results.json").read_text())["summary"] == summary
    assert (out / "gpu_check.tgz").stat().st_size > 0


def test_steps_named_in_skip_do_not_run(tmp_path):
    out = tmp_path / "out"
    summary = _dry_run(out, 1000, SKIP="01_tests_triton 08_sort_strategies",
                       MEMORY_BUDGET="150")
    skipped = [line.split()[0] for line in summary if "SKIP (asked)" in line]
    assert skipped == ["01_tests_triton", "08_sort_strategies"], summary
    assert not (out / "logs" / "01_tests_triton.log").exists()
    memory_step = (out / "logs" / "04_memory.log").read_text()
    assert "timeout 200s" in memory_step and "--budget 150" in memory_step


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("SKIP", "01_tests_triton 08_sort_strategy", "unknown step: 08_sort_strategy"),
    ("MEMORY_BUDGET", "2m", "MEMORY_BUDGET must be a whole number"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, variable, value, message):
    out = tmp_path / "out"
    run = subprocess.run(
        ["bash", str(SCRIPT)], cwd=SCRIPT.parent.parent, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "OUT": str(out), "PY": sys.executable,
             variable: value},
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert f"error: {variable}" in run.stderr and message in run.stderr, run.stderr
    assert not (out / "logs").exists()
