"""The asv suite (benchmarks/): its grid holds only what runs here, and every body runs."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

import benchmarks
from benchmarks import bench_cuda, common
from lovasz_kernels import bench
from lovasz_kernels.bench import rules


def _benchmark_classes(include_private: bool = False):
    for info in pkgutil.iter_modules(benchmarks.__path__):
        module = importlib.import_module(f"benchmarks.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if (cls.__module__ == module.__name__ and hasattr(cls, "param_names")
                    and (include_private or not name.startswith("_"))):
                yield cls


CLASSES = [cls for cls in _benchmark_classes() if hasattr(cls, "params")]
# the GPU classes are defined only with CUDA; their bodies also run on CPU tensors (below)
CUDA_BODIES = [bench_cuda._CudaFwdBwd, bench_cuda._CudaSortFloor]


def _methods(obj) -> list[str]:
    return [m for m in dir(obj) if m.startswith(("time_", "peakmem_", "track_"))]


def test_suite_has_every_operation_family():
    names = {cls.__name__ for cls in CLASSES}
    assert {"LovaszSoftmax", "LovaszHinge", "LovaszExtension", "MemoryFirst", "SortFloor",
            "ProxLovaszHinge"} <= names
    assert ("CudaLovaszLoss" in names) == common.CUDA_AVAILABLE


def test_grid_holds_only_what_runs_here():
    """No combination is enumerated only to be skipped (asv would print n/a)."""
    for cls in CLASSES:
        if "contender" not in cls.param_names:
            continue
        device = bench_cuda.DEVICE if cls.__module__ == bench_cuda.__name__ else "cpu"
        contenders = cls.params[cls.param_names.index("contender")]
        for name in contenders:
            if name != bench.LOOP:
                assert rules.backend_problem(name, device) is None, (cls.__name__, name)
        assert set(rules.runnable_backends(device)) - {rules.REFERENCE} <= set(contenders)
        assert (bench.LOOP in contenders) == (cls.__name__ != "LovaszExtension")
        budget = rules.Budget(device_type=device)
        for workload in cls.params[0]:
            for contender in contenders:
                assert budget.skip_reason(contender, bench.Workload.parse(workload)) is None


def test_default_grid_is_the_standard_suite():
    by_name = {cls.__name__: cls.params[0] for cls in CLASSES}
    timed = by_name["LovaszSoftmax"] + by_name["LovaszHinge"] + by_name["LovaszExtension"]
    assert timed == [w.name for loss in ("softmax", "hinge", "extension")
                     for w in bench.SUITE if w.loss == loss]
    assert by_name["SortFloor"] == by_name["LovaszSoftmax"] + by_name["LovaszHinge"]
    assert by_name["MemoryFirst"] == by_name["SortFloor"]
    assert rules.REFERENCE not in common.contenders("softmax")  # the oracle: full grid only


def test_full_grid(monkeypatch):
    monkeypatch.setattr(common, "FULL", True)
    names = common.workloads("softmax")
    assert names[:len(common.workloads("softmax", bench.SUITE))] == \
        common.workloads("softmax", bench.SUITE)  # appended, never changed
    assert "softmax 8x512x512x21 batch float32" in names
    assert rules.REFERENCE in common.contenders("softmax")


def test_standard_suite_is_append_only():
    """Existing workloads never change (results stay comparable); new ones go at the end."""
    assert [w.name for w in bench.SUITE[:10]] == [
        "softmax 1x512x512x21 batch float32", "softmax 1x256x256x150 batch float32",
        "softmax 8x64x64x5 per-image float32", "softmax 4x256x256x21 per-image float32",
        "softmax 1x1024x1024x2 batch float32", "softmax 16x32x32x21 per-image float32",
        "hinge 1x1024x1024 per-image float32", "hinge 8x256x256 per-image float32",
        "extension 1x512x512x21 batch float32", "extension 1x1024x1024x2 batch float32"]


def _smallest(workloads: list[str]) -> str:
    return min(workloads, key=lambda name: bench.Workload.parse(name).elements)


@pytest.mark.parametrize("cls", CLASSES + CUDA_BODIES, ids=lambda c: c.__name__)
def test_each_benchmark_runs_on_the_smallest_input(cls, monkeypatch):
    """setup + every time_/peakmem_/track_ body once, on the smallest workload, with torch
    (the GPU bodies on CPU tensors)."""
    monkeypatch.setattr(bench_cuda, "DEVICE", "cpu")
    monkeypatch.setattr(bench_cuda, "ROUNDS", 2)
    values = {"contender": "torch", "backend": "torch", "side": 256, "method": "exact"}
    if "workload" in cls.param_names:
        values["workload"] = _smallest(bench_cuda.WORKLOADS if cls in CUDA_BODIES
                                       else cls.params[0])
    params = [values[name] for name in cls.param_names]
    instance = cls()
    instance.setup(*params)
    assert _methods(instance)
    for name in _methods(instance):
        result = getattr(instance, name)(*params)
        if name.startswith("track_"):
            assert result >= 0
    if hasattr(instance, "teardown"):
        instance.teardown(*params)


def test_memory_first_sets_the_floor_for_its_benchmarks_only():
    """``MemoryFirst`` runs its bodies under a CPU floor of 0, kept strictly, and gives the
    default back in teardown."""
    from benchmarks.bench_losses import MemoryFirst
    from lovasz_kernels import _plan

    workload = _smallest(MemoryFirst.params[0])
    assert "torch" in MemoryFirst.params[1]
    for backend in MemoryFirst.params[1]:
        instance = MemoryFirst()
        instance.setup(workload, backend)
        try:
            assert _plan.budget_is_strict(torch.device("cpu"))
            assert _plan.chunk_floor_bytes(torch.device("cpu")) == 0
            instance.time_fwd_bwd(workload, backend)
        finally:
            instance.teardown(workload, backend)
        assert not _plan.budget_is_strict(torch.device("cpu"))


def test_over_budget_is_not_implemented():
    """What asv reports as n/a in the full grid: the cost model's verdict."""
    with pytest.raises(NotImplementedError, match="estimated"):
        bench.warmed_call("softmax 1x1024x1024x150 batch float32", "numpy")


def test_perf_folder_collects_without_running_anything():
    """`pytest --doctest-modules` imports every script under tests/perf: none may run or exit
    at import (the GPU timing script once raised SystemExit without CUDA, an internal error)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/perf", "--collect-only", "-q",
         "-p", "no:cacheprovider"], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "tests collected" in done.stdout


@pytest.mark.parametrize(("argv", "work"), [
    (["allocated_peak.py", "--chunk-floor", "-1"], "Prepared"),
    (["allocated_peak.py", "--backend", "nope"], "Prepared"),
    (["chunk_floor.py", "--backend", "nope"], "Prepared"),
    (["numpy_finish.py", "--shapes", "4x"], "_medians"),
    (["numpy_finish.py", "--shapes", "0x4096"], "_medians"),
    (["numpy_finish.py", "--rounds", "0"], "_medians"),
    (["old_against_new.py", "--rounds", "0", "."], "import_old"),
    (["old_against_new.py", "--pixels", "-4", "."], "import_old"),
    (["old_against_new.py", "--chunk-floor", "0", "--segments", "."], "import_old"),
    (["old_against_new.py", "--backend", "triton", "--segments", "."], "import_old"),
    (["omp_spin.py", "--rounds", "0"], "_run_policy"),
    (["cold_start.py", "--runs", "0"], "_runs"),
    (["cold_start.py", "--classes", "1"], "_runs"),
    (["settled_tail.py", "--rounds", "0"], "_measure"),
    (["settled_tail.py", "--cases", "512x22"], "_measure"),
    (["settled_tail.py", "--scores", "learned"], "_measure"),
    (["settled_tail.py", "--backend", "triton"], "_measure"),
    (["small_call_numpy.py", "--rounds", "0"], "_medians"),
    (["small_call_numpy.py", "--cases", "hinge-7"], "_medians"),
    (["omp_spin.py", "--window-ms", "-1"], "_run_policy"),
    (["training_step.py", "--steps", "0"], "_train"),
    (["training_step.py", "--cases", "4x512"], "_train"),
    (["training_step.py", "--cases", "1x256x1"], "_train"),
])
def test_perf_scripts_refuse_bad_flags_before_any_work(argv, work, monkeypatch, capsys):
    """A wrong flag gets argparse's message, naming it, and exit status 2, with nothing
    measured."""
    import importlib

    script = importlib.import_module(f"tests.perf.{argv[0][:-3]}")
    monkeypatch.setattr("sys.argv", argv)
    monkeypatch.setattr(script, work, None)  # any work would fail differently
    with pytest.raises(SystemExit) as exit_info:
        script.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and argv[1] in err


def test_training_step_reuses_the_kept_gradient_in_its_default_steps(monkeypatch):
    """The script's new-memory steps must leave the kept gradient alone: every default step
    after the first takes the previous one's memory (a new-memory step that dropped it once
    made both ways new memory, and the script compared nothing)."""
    from lovasz_kernels import _scratch
    from lovasz_kernels.backends import numba_cpu
    from tests.perf import training_step

    if not numba_cpu.availability()[0]:
        pytest.skip("numba is not installed")
    original = _scratch.output
    found_kept: list[bool] = []  # per call through the kept path: memory kept and free?

    def spy(name, shape, dtype, zeroed=False, keep=True):
        kept = _scratch._thread_arrays().get(("output", name))
        found_kept.append(kept is not None and kept[1]() is None)
        return original(name, shape, dtype, zeroed, keep)

    monkeypatch.setattr(_scratch, "output", spy)
    monkeypatch.setattr(numba_cpu, "output", numba_cpu.output)  # restored after the script
    training_step._train((1, 8, 3), steps=2)
    default_steps = training_step.WARM_UP_STEPS + 2
    assert len(found_kept) == default_steps  # one loss call per default step, none other
    assert all(found_kept[1:]), found_kept  # the first may find another test's memory
