"""The ``lovasz-kernels`` command, run in-process through ``cli.main``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata

import pytest
import torch

from lovasz_kernels import __version__, cli, registered_backends
from lovasz_kernels.bench import engine, report
from tests.helpers import registered_fake_backend

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


def test_python_dash_m_package_is_the_command():
    """``python -m lovasz_kernels``: the command where its script is not on PATH, with its
    exit statuses (0, and 2 on a bad flag)."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "lovasz_kernels", *args],
                              capture_output=True, text=True, timeout=120, check=False)

    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"lovasz-kernels {__version__}"
    bad = run("bench", "--repeat", "0")
    assert bad.returncode == 2
    assert "lovasz-kernels bench: error: --repeat must be a positive integer" in bad.stderr


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "usage: lovasz-kernels" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lovasz-kernels {__version__}"


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


def test_check_detects_wrong_backend(capsys):
    """A backend whose losses are 1% off must be caught on every case with a loss."""
    with registered_fake_backend("off", scale_loss=1.01):
        assert cli.main(["check", "--backend", "off"]) == 1
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


def _bench(tmp_path, *args: str) -> list[str]:
    return ["bench", "--out", str(tmp_path), *args]


def test_bench_small(capsys, tmp_path):
    status = cli.main(_bench(tmp_path, "--backend", "numpy,torch,numpy", "--pixels", "24",
                             "--classes", "4", "--repeat", "1"))
    out = capsys.readouterr().out
    assert status == 0, out
    assert "4 classes x 24x24 pixels" in out and "median of 1" in out
    assert "(numpy, torch, loop, floor)" in out  # a backend named twice is timed once
    header = next(line for line in out.splitlines() if line.startswith("backend"))
    assert re.split(r" {2,}", header) == [
        "backend", "median ms", "vs numpy", "vs loop", "/ floor", "peak MB", "x input",
        "max |Δgrad| (tie groups)"]
    assert re.search(r"^numpy\s+\d+\.\d+\s+1\.00x\s+\d+\.\d\dx\s", out, re.MULTILINE), out
    assert re.search(r"^torch\s+\d+\.\d+\s+\d+\.\d\dx\s", out, re.MULTILINE), out
    # the public per-class loop is timed next to the backends; its deviation is only reported
    assert re.search(r"^loop\s+\d+\.\d+\s+\d+\.\d\dx\s+1\.00x\s.*\S+ \(not checked\)$", out,
                     re.MULTILINE), out
    assert re.search(r"^floor\s+\d+\.\d+\s", out, re.MULTILINE), out
    assert "MISMATCH" not in out
    assert (tmp_path / report.BENCH_JSON).is_file() and (tmp_path / report.BENCH_PNG).is_file()


def test_bench_grid_json_and_plot(capsys, tmp_path):
    status = cli.main(_bench(tmp_path, "--backend", "numpy,torch", "--pixels", "8,16",
                             "--classes", "2,3", "--repeat", "2", "--batch", "2",
                             "--per-image"))
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.count("pixels, per_image=True, cpu, median of 2 interleaved rounds") == 4
    document = json.loads((tmp_path / report.BENCH_JSON).read_text())
    assert document["command"].startswith("lovasz-kernels bench --out ")
    assert document["machine"]["cpu_count"] >= 1
    assert document["versions"]["torch"] == metadata.version("torch")
    assert document["settings"]["contenders"] == ["numpy", "torch", "loop", "floor"]
    results = document["results"]
    assert sorted((r["side"], r["classes"]) for r in results) == [
        (8, 2), (8, 3), (16, 2), (16, 3)]
    for result in results:
        assert result["per_image"] is True and result["batch"] == 2
        assert result["segments"] == 2 * result["classes"]
        assert set(result["contenders"]) == {"numpy", "torch", "loop", "floor"}
        for name, entry in result["contenders"].items():
            assert len(entry["samples_s"]) == 2, name
        assert result["contenders"]["torch"]["status"] == "ok"
        assert result["contenders"]["torch"]["max_abs_grad_deviation"] < 1e-6
    png = (tmp_path / report.BENCH_PNG).read_bytes()
    assert png.startswith(b"\x89PNG")


def test_bench_trained_scores(capsys, tmp_path):
    status = cli.main(_bench(tmp_path, "--backend", "numpy,torch", "--pixels", "16",
                             "--classes", "5", "--repeat", "1", "--scores", "trained"))
    out = capsys.readouterr().out
    assert status == 0, out
    assert "5 classes x 16x16 pixels, per_image=False, trained-like scores" in out
    assert "MISMATCH" not in out
    (result,) = json.loads((tmp_path / report.BENCH_JSON).read_text())["results"]
    assert result["scores"] == "trained" and result["workload"].endswith(" trained")


@pytest.mark.parametrize("loss,heading", [
    ("hinge", "lovasz_hinge fwd+bwd, float32, batch 3 x 16x16 pixels, per_image=True"),
    ("extension", "lovasz_extension, float32, 21 segments x 768 pixels"),
])
def test_bench_other_losses(capsys, tmp_path, loss, heading):
    status = cli.main(_bench(tmp_path, "--loss", loss, "--backend", "numpy,torch",
                             "--pixels", "16", "--batch", "3", "--repeat", "1"))
    out = capsys.readouterr().out
    assert status == 0, out
    assert heading in out
    result = json.loads((tmp_path / report.BENCH_JSON).read_text())["results"][0]
    assert result["contenders"]["torch"]["status"] == "ok"


def test_bench_chunk_floor_is_set_for_the_run_only(capsys, tmp_path, monkeypatch):
    """--chunk-floor sets the device's floor (kept strictly) while the bench runs, says so,
    records it in the JSON, and leaves the floor as it was."""
    from lovasz_kernels import _plan

    monkeypatch.setattr(_plan, "_FLOORS_SET", {"cuda": 1 << 20})
    strict_during_run = []
    real_run = engine.run

    def run(*args, **kwargs):
        strict_during_run.append((_plan.budget_is_strict(torch.device("cpu")),
                                  _plan.chunk_floor_bytes(torch.device("cpu"))))
        return real_run(*args, **kwargs)

    monkeypatch.setattr(engine, "run", run)
    status = cli.main(_bench(tmp_path, "--backend", "torch", "--pixels", "24", "--classes", "3",
                             "--repeat", "1", "--chunk-floor", "0.5"))
    out = capsys.readouterr().out
    assert status == 0, out
    assert "chunk floor on cpu: 0.5 MB, kept strictly" in out
    assert strict_during_run == [(True, 1 << 19)]
    assert _plan._FLOORS_SET == {"cuda": 1 << 20}
    doc = json.loads((tmp_path / report.BENCH_JSON).read_text())
    assert doc["settings"]["chunk_floor_bytes"] == 1 << 19


def test_bench_budget_skips_and_says_so(capsys, tmp_path):
    # the first size is measured; any larger one is estimated above a zero budget
    status = cli.main(_bench(tmp_path, "--backend", "numpy,torch", "--pixels", "8,32",
                             "--classes", "2", "--repeat", "1", "--budget", "0"))
    out = capsys.readouterr().out
    assert status == 0, out
    assert re.search(r"skipping numpy at softmax 1x32x32x2 batch float32: estimated .* s per "
                     r"call > budget 0 s", out), out
    results = json.loads((tmp_path / report.BENCH_JSON).read_text())["results"]
    assert results[1]["contenders"]["numpy"]["status"].startswith("skipped")


def test_bench_without_tqdm_and_matplotlib(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    status = cli.main(_bench(tmp_path, "--backend", "numpy", "--pixels", "8", "--classes", "2",
                             "--repeat", "1"))
    captured = capsys.readouterr()
    assert status == 0, captured.out
    assert "tqdm is not installed: no progress bar" in captured.err
    assert "matplotlib is not installed: no plot" in captured.out
    assert (tmp_path / report.BENCH_JSON).is_file() and not (tmp_path / report.BENCH_PNG).exists()


def test_bench_detects_wrong_gradient(capsys, tmp_path):
    with registered_fake_backend("doubled", scale_grad=2.0):
        status = cli.main(_bench(tmp_path, "--backend", "numpy,doubled", "--pixels", "8",
                                 "--classes", "3", "--repeat", "1"))
    out = capsys.readouterr().out
    assert status == 1
    # not timed: a wrong answer has no speed
    assert re.search(r"^doubled\s+-\s+-\s+-\s+-\s+-\s+-\s+\S+ MISMATCH$", out, re.MULTILINE), out
    entry = json.loads((tmp_path / report.BENCH_JSON).read_text())["results"][0]["contenders"]
    assert entry["doubled"]["status"].startswith("MISMATCH") and entry["doubled"]["samples_s"] == []


def test_bench_unknown_backend(capsys, tmp_path):
    assert cli.main(_bench(tmp_path, "--backend", "numpy,nope", "--pixels", "8",
                           "--repeat", "1")) == 2
    assert "error: --backend unknown backend 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--pixels", "8,x", "expected comma-separated integers; got '8,x'"),
    ("--pixels", "8,0", "expected positive integers; got '8,0'"),
    ("--classes", "-2", "expected positive integers; got '-2'"),
    ("--scores", "learned", "invalid choice: 'learned' (choose from 'random', 'trained')"),
])
def test_bench_bad_sizes(capsys, tmp_path, no_work, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(_bench(tmp_path, flag, value))
    assert exit_info.value.code == 2
    assert f"error: argument {flag}: {message}" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# bad flags: a clear error and exit status 2 before any work


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command starts working."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started despite a bad flag")

    monkeypatch.setattr(engine, "run", refuse)
    monkeypatch.setattr(cli._cases, "extension_cases", refuse)


def _assert_usage_error(capsys, argv, flag, message):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert f"error: {flag} " in captured.err and message in captured.err, captured.err
    assert "workload(s)" not in captured.out and "passed" not in captured.out


@pytest.mark.parametrize("args,flag,message", [
    (["--batch", "0"], "--batch", "must be a positive integer; got 0"),
    (["--batch", "-1"], "--batch", "must be a positive integer; got -1"),
    (["--repeat", "0"], "--repeat", "must be a positive integer; got 0"),
    (["--budget", "nan"], "--budget", "got nan"),
    (["--budget", "-1"], "--budget", "got -1.0"),
    (["--chunk-floor", "-1"], "--chunk-floor", "must be a number of MB >= 0; got -1.0"),
    (["--chunk-floor", "nan"], "--chunk-floor", "got nan"),
    (["--out", "/dev/null"], "--out", "must be a folder; /dev/null is a file"),
    (["--device", "meta"], "--device", "must be cpu or cuda (or cuda:N); got 'meta'"),
    (["--device", "nope"], "--device", "must be cpu or cuda (or cuda:N); got 'nope'"),
    (["--loss", "hinge", "--classes", "5,7"], "--classes",
     "does not apply to --loss hinge (one binary problem: no classes to count); got 5,7"),
])
def test_bench_bad_flags(capsys, tmp_path, no_work, args, flag, message):
    argv = ["bench", *args] if args[0] == "--out" else _bench(tmp_path, *args)
    _assert_usage_error(capsys, argv, flag, message)


def test_bench_bad_flag_leaves_no_out_folder(capsys, tmp_path, no_work):
    """--out is created only once every other flag has passed."""
    out = tmp_path / "results"
    _assert_usage_error(capsys, ["bench", "--out", str(out), "--backend", "nope"], "--backend",
                        "unknown backend 'nope'")
    _assert_usage_error(capsys, ["bench", "--out", str(out), "--pixels", "8", "--repeat", "0"],
                        "--repeat", "must be a positive integer")
    assert not out.exists()


@pytest.mark.parametrize("args", [["--pixels", "100000"],
                                  ["--pixels", "8,4096", "--batch", "64", "--classes", "150"]],
                         ids=["side", "batch and classes"])
def test_bench_inputs_larger_than_memory(capsys, tmp_path, no_work, args):
    """Sizes whose inputs alone exceed the machine's memory: a usage error naming the size
    and what the inputs take, not an allocation's traceback once the work has started."""
    if cli._memory_bytes(torch.device("cpu")) is None:
        pytest.skip("the OS does not say how much memory there is")
    _assert_usage_error(capsys, _bench(tmp_path, *args), "--pixels", "the inputs alone take")
    assert not any(tmp_path.iterdir())


def test_bench_unwritable_out(capsys, tmp_path, no_work):
    (tmp_path / "a-file").write_text("")
    _assert_usage_error(capsys, ["bench", "--out", str(tmp_path / "a-file" / "results")],
                        "--out", "cannot write into")


@pytest.mark.parametrize("command", ["bench", "check"])
def test_cuda_without_a_gpu(capsys, tmp_path, no_work, command):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    argv = _bench(tmp_path, "--device", "cuda") if command == "bench" else [
        "check", "--device", "cuda"]
    _assert_usage_error(capsys, argv, "--device", "cuda: torch sees no CUDA device here")


@pytest.mark.parametrize("command", ["bench", "check"])
def test_nothing_runnable(capsys, tmp_path, no_work, command):
    argv = _bench(tmp_path) if command == "bench" else ["check"]
    with registered_fake_backend("absent", unavailable="no such device here"):
        _assert_usage_error(capsys, [*argv, "--backend", "absent"], "--backend",
                            "nothing can run here (absent: no such device here)")


def test_check_of_the_reference_alone_checks_nothing(capsys, no_work):
    _assert_usage_error(capsys, ["check", "--backend", "numpy"], "--backend", "nothing to check")
