"""The ``lovasz-kernels`` command, run in-process through ``cli.main``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from importlib import metadata

import pytest
import torch

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


def _bench(tmp_path, *args: str) -> list[str]:
    return ["bench", "--out", str(tmp_path), *args]


def test_bench_small(capsys, tmp_path):
    start = time.perf_counter()
    status = cli.main(_bench(tmp_path, "--backend", "numpy,torch", "--pixels", "24",
                             "--classes", "4", "--repeat", "1"))
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert status == 0, out
    assert "4 classes x 24x24 pixels" in out and "median of 1" in out
    header = next(line for line in out.splitlines() if line.startswith("backend"))
    assert re.split(r" {2,}", header) == [
        "backend", "median ms", "vs numpy", "vs loop", "max |Δgrad| (tie groups)"]
    assert re.search(r"^numpy\s+\d+\.\d+\s+1\.00x\s+\d+\.\d\dx\s", out, re.MULTILINE), out
    assert re.search(r"^torch\s+\d+\.\d+\s+\d+\.\d\dx\s", out, re.MULTILINE), out
    # the public per-class loop is timed next to the backends; its deviation is only reported
    assert re.search(r"^loop\s+\d+\.\d+\s+\d+\.\d\dx\s+1\.00x\s+\S+ \(not checked\)$", out,
                     re.MULTILINE), out
    assert "MISMATCH" not in out
    assert (tmp_path / cli.BENCH_JSON).is_file() and (tmp_path / cli.BENCH_PNG).is_file()
    assert elapsed < 20


def test_bench_grid_json_and_plot(capsys, tmp_path):
    status = cli.main(_bench(tmp_path, "--backend", "numpy,torch", "--pixels", "8,16",
                             "--classes", "2,3", "--repeat", "2", "--batch", "2",
                             "--per-image"))
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.count("pixels, per_image=True, cpu, median of 2 interleaved rounds") == 4
    document = json.loads((tmp_path / cli.BENCH_JSON).read_text())
    assert document["command"].startswith("lovasz-kernels bench --out ")
    assert document["machine"]["cpu_count"] >= 1
    assert document["versions"]["torch"] == metadata.version("torch")
    results = document["results"]
    assert sorted((r["side"], r["classes"]) for r in results) == [
        (8, 2), (8, 3), (16, 2), (16, 3)]
    for result in results:
        assert result["per_image"] is True and result["batch"] == 2
        assert result["segments"] == 2 * result["classes"]
        assert set(result["rows"]) == {"numpy", "torch", "loop"}
        for name, row in result["rows"].items():
            assert len(row["samples_s"]) == 2, name
            assert row["median_s"] == sorted(row["samples_s"])[0] + (
                sorted(row["samples_s"])[1] - sorted(row["samples_s"])[0]) / 2
        assert result["rows"]["torch"]["status"] == "ok"
        assert result["rows"]["torch"]["max_abs_grad_deviation"] < 1e-6
    png = (tmp_path / cli.BENCH_PNG).read_bytes()
    assert png.startswith(b"\x89PNG")


def test_bench_hinge(capsys, tmp_path):
    status = cli.main(_bench(tmp_path, "--loss", "hinge", "--backend", "numpy,torch",
                             "--pixels", "16", "--batch", "3", "--repeat", "1"))
    out = capsys.readouterr().out
    assert status == 0, out
    assert "lovasz_hinge fwd+bwd, float32, batch 3 x 16x16 pixels, per_image=True" in out
    result = json.loads((tmp_path / cli.BENCH_JSON).read_text())["results"][0]
    assert result["classes"] is None and result["segments"] == 3
    assert result["rows"]["torch"]["status"] == "ok"


def test_bench_budget_skips_and_says_so(capsys, tmp_path):
    # the first size is measured; any larger one is estimated above a zero budget
    status = cli.main(_bench(tmp_path, "--backend", "numpy,torch", "--pixels", "8,32",
                             "--classes", "2", "--repeat", "1", "--budget", "0"))
    out = capsys.readouterr().out
    assert status == 0, out
    assert re.search(r"skipping lovasz_softmax .* 32x32 pixels.*: the numpy reference is "
                     r"estimated .* s per call > --budget 0 s", out), out
    results = json.loads((tmp_path / cli.BENCH_JSON).read_text())["results"]
    assert [r["skipped"] is None for r in results] == [True, False]


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
    assert (tmp_path / cli.BENCH_JSON).is_file() and not (tmp_path / cli.BENCH_PNG).exists()


def test_bench_detects_wrong_gradient(capsys, monkeypatch, tmp_path):
    original = torch_eager.lovasz_extension

    def doubled_gradient(errors, fg):
        loss, grad = original(errors, fg)
        return loss, grad * 2

    monkeypatch.setattr(torch_eager, "lovasz_extension", doubled_gradient)
    status = cli.main(_bench(tmp_path, "--backend", "numpy,torch", "--pixels", "8",
                             "--classes", "3", "--repeat", "1"))
    out = capsys.readouterr().out
    assert status == 1
    # not timed: a wrong answer has no speed
    assert re.search(r"^torch\s+-\s+-\s+-\s+\S+ MISMATCH$", out, re.MULTILINE), out
    row = json.loads((tmp_path / cli.BENCH_JSON).read_text())["results"][0]["rows"]["torch"]
    assert row["status"].startswith("MISMATCH") and row["samples_s"] == []


def test_bench_cuda_table_has_sort_floor_and_bandwidth():
    """The GPU table (tested on a made-up result: no GPU needed)."""
    result = {"dtype": "float32", "segments": 21, "pixels_per_segment": 1 << 20, "batch": 1,
              "pixels": 1 << 20, "rows": {
                  "torch": {"status": "ok", "median_s": 4e-3, "max_abs_grad_deviation": 0.0},
                  "loop": {"status": "reported", "median_s": 8e-2,
                           "max_abs_grad_deviation": 1e-3},
                  cli.SORT_FLOOR: {"status": "not checked", "median_s": 1e-3},
              }}
    text = cli._bench_table(result, ["torch", "loop", cli.SORT_FLOOR], "heading", 3,
                            torch.device("cuda"))
    lines = text.splitlines()
    assert re.split(r" {2,}", lines[1]) == [
        "backend", "median ms", "vs sort", "GB/s", "vs loop", "max |Δgrad| (tie groups)"]
    elements = 21 << 20
    model = 40 * elements + 8 * (1 << 20)
    assert model == cli._baselines.ideal_bytes(elements, 1 << 20)
    torch_row = re.split(r" {2,}", lines[3])
    assert torch_row[:5] == ["torch", "4.000", "0.25x", f"{model / 4e-3 / 1e9:.0f}", "20.00x"]
    sort_row = re.split(r" {2,}", lines[5])
    assert sort_row[:4] == [cli.SORT_FLOOR, "1.000", "1.00x", f"{16 * elements / 1e-3 / 1e9:.0f}"]
    assert "ideal key build" in text


def test_bench_gpu_layout_on_cpu_tensors(capsys, tmp_path, monkeypatch):
    """The --device cuda code path, run on CPU tensors (no GPU needed): the reference is only
    a cross-check, the sort floor is timed, GB/s is printed."""
    monkeypatch.setattr(cli, "_gpu_mode", lambda device: True)
    status = cli.main(_bench(tmp_path, "--backend", "numpy,torch", "--pixels", "8,16",
                             "--classes", "3", "--repeat", "2"))
    out = capsys.readouterr().out
    assert status == 0, out
    assert "the numpy reference runs on CPU copies, for the cross-check only" in out
    assert re.search(r"^torch\s+\d+\.\d+\s+\d+\.\d\dx\s+\d+\s+\d+\.\d\dx\s+0\.0e\+00$", out,
                     re.MULTILINE), out
    assert re.search(r"^torch\.sort\s+\d+\.\d+\s+1\.00x\s+\d+\s", out, re.MULTILINE), out
    assert not re.search(r"^numpy\s", out, re.MULTILINE)
    document = json.loads((tmp_path / cli.BENCH_JSON).read_text())
    assert "ideal" in document["byte_model"]
    rows = document["results"][-1]["rows"]
    assert set(rows) == {"torch", "loop", cli.SORT_FLOOR}
    assert len(rows[cli.SORT_FLOOR]["samples_s"]) == 2


def test_bench_cuda_without_a_gpu(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli.main(_bench(tmp_path, "--device", "cuda", "--pixels", "8")) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_bench_bad_pixels(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(_bench(tmp_path, "--pixels", "8,x"))
    assert "comma-separated integers" in capsys.readouterr().err


def test_bench_unknown_backend(capsys, tmp_path):
    assert cli.main(_bench(tmp_path, "--backend", "numpy,nope", "--pixels", "8",
                           "--repeat", "1")) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err
