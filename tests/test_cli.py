"""The ``lovasz-kernels`` command, run in-process through ``cli.main``."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from importlib import metadata

import pytest

import lovasz_kernels.backends.torch_eager as torch_eager
from lovasz_kernels import cli, registered_backends

SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$", re.MULTILINE)

def _table_rows(out: str) -> list[list[str]]:
    """Rows of the ``check`` table, split on runs of 2+ spaces (cells contain single ones)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("case "))
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(re.split(r" {2,}", line.strip()))
    return rows


def _summary(out: str) -> tuple[int, int]:
    match = SUMMARY.search(out)
    assert match, out
    return int(match.group(1)), int(match.group(2))


# --------------------------------------------------------------------------------------------
# info


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lovasz-kernels ")
    assert re.search(rf"^torch\s+{re.escape(metadata.version('torch'))}$", out, re.MULTILINE)
    header = next(line for line in out.splitlines() if line.startswith("backend"))
    assert header.split() == ["backend", "available", "devices", "notes"]
    for name in registered_backends():
        assert re.search(rf"^{re.escape(name)}\s+(yes|no)\s", out, re.MULTILINE), name
    assert re.search(r"^numpy\s+yes\s+cpu\s", out, re.MULTILINE)


def test_console_script_module_runs():
    result = subprocess.run(
        [sys.executable, "-m", "lovasz_kernels.cli", "info"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "numpy" in result.stdout and "torch" in result.stdout


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "usage: lovasz-kernels" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# check


def test_check_prints_table_and_summary(capsys):
    status = cli.main(["check"])
    out = capsys.readouterr().out
    assert "max |Δgrad|" in out and "max |Δloss|" in out
    rows = _table_rows(out)
    passed, failed = _summary(out)
    assert passed + failed == len(rows) > 0
    assert failed == sum("MISMATCH" in row[-1] for row in rows)
    assert status == (1 if failed else 0)
    checked = {row[1] for row in rows}
    assert "numpy" not in checked  # the reference is not checked against itself
    assert "torch" in checked


@pytest.mark.parametrize("args", [[], ["--backend", "torch"]], ids=["all", "torch"])
def test_check_passes(capsys, args):
    status = cli.main(["check", *args])
    out = capsys.readouterr().out
    assert re.search(r"\d+ passed, 0 failed", out), out
    assert status == 0


def test_check_single_backend(capsys):
    status = cli.main(["check", "--backend", "torch"])
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert {row[1] for row in rows} == {"torch"}
    case_names = [row[0] for row in rows]
    assert "random 8x300 fp64" in case_names and "hinge batch" in case_names
    _, failed = _summary(out)
    assert status == (1 if failed else 0)


def test_check_unknown_backend(capsys):
    assert cli.main(["check", "--backend", "nope"]) == 2
    captured = capsys.readouterr()
    assert "unknown backend 'nope'" in captured.err
    assert "'numpy'" in captured.err and "'torch'" in captured.err
    assert "passed" not in captured.out


def test_check_detects_wrong_backend(capsys, monkeypatch):
    """A torch backend whose losses are 1% off must be caught on every case with a loss."""
    original = torch_eager.lovasz_extension

    def off_by_one_percent(errors, fg):
        loss, grad = original(errors, fg)
        return loss * 1.01, grad

    monkeypatch.setattr(torch_eager, "lovasz_extension", off_by_one_percent)
    assert cli.main(["check", "--backend", "torch"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out
    rows = {row[0]: row[-1] for row in _table_rows(out)}
    # tie-free fp64 cases: every segment's loss is off, the gradient is untouched
    assert rows["random 8x300 fp64"] == "MISMATCH (8 loss, 0 grad entries)"
    assert rows["hinge batch"] == "MISMATCH (1 loss, 0 grad entries)"
    assert rows["softmax batch, ignore"] == "MISMATCH (1 loss, 0 grad entries)"
    # a zero loss stays zero: not a mismatch
    assert rows["all errors <= 0"] == "ok"


# --------------------------------------------------------------------------------------------
# bench


def test_bench_small(capsys):
    start = time.perf_counter()
    status = cli.main(["bench", "--backend", "numpy,torch", "--pixels", "24", "--classes", "4",
                       "--repeat", "1"])
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert status == 0, out
    assert "4 classes x 24x24 pixels" in out and "median of 1" in out
    assert "median ms" in out
    assert re.search(r"^numpy\s+\d+\.\d\s+1\.00x\s", out, re.MULTILINE), out
    assert re.search(r"^torch\s+\d+\.\d\s+\d+\.\d\dx\s", out, re.MULTILINE), out
    assert "MISMATCH" not in out
    assert elapsed < 10


def test_bench_detects_wrong_gradient(capsys, monkeypatch):
    original = torch_eager.lovasz_extension

    def doubled_gradient(errors, fg):
        loss, grad = original(errors, fg)
        return loss, grad * 2

    monkeypatch.setattr(torch_eager, "lovasz_extension", doubled_gradient)
    status = cli.main(["bench", "--backend", "numpy,torch", "--pixels", "8", "--classes", "3",
                       "--repeat", "1"])
    out = capsys.readouterr().out
    assert status == 1
    assert re.search(r"^torch\s.*MISMATCH$", out, re.MULTILINE), out


def test_bench_unknown_backend(capsys):
    assert cli.main(["bench", "--backend", "numpy,nope", "--pixels", "8", "--repeat", "1"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err
