"""Fwd+bwd timings per contender, grouped per workload so ``--benchmark-compare`` lines up.

    pytest tests/perf --benchmark-only                        # run, one table per group
    pytest tests/perf --benchmark-only --benchmark-autosave   # save under .benchmarks/
    pytest tests/perf --benchmark-only --benchmark-compare    # against the last saved run
    pytest-benchmark compare --group-by=group --sort=mean     # saved runs side by side

Each test is one (workload, contender) pair of ``lovasz_kernels.bench.SUITE`` (the asv suite's
default grid, same inputs); ``benchmark.group`` names the workload, so every table shows the
backends, the per-class loop and the sort floor of one workload side by side. Only contenders
that run natively here are collected (``bench.standard_contenders``: the asv suite's).
"""

from __future__ import annotations

import pytest

from lovasz_kernels import bench

CASES = [
    (workload, contender)
    for workload in bench.SUITE
    for contender in [*bench.standard_contenders(workload.loss, "cpu"), bench.FLOOR]
    if not (workload.loss == "extension" and contender == bench.FLOOR)  # the softmax's floor
]


@pytest.mark.parametrize("workload,contender", CASES,
                         ids=[f"{w.name}-{c}".replace(" ", "-") for w, c in CASES])
def test_fwd_bwd(benchmark, workload, contender):
    try:
        call = bench.warmed_call(workload, contender)  # JIT compilation is not timed
    except bench.OverBudget as exc:
        pytest.skip(str(exc))
    benchmark.group = workload.name
    benchmark.extra_info.update(workload.key())
    try:
        benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=0)
    finally:
        getattr(call, "close", lambda: None)()
