"""The benchmark engine behind ``lovasz-kernels bench``, the asv suite and ``tests/perf``.

One place for what the three harnesses share, so they time the same thing:

- :mod:`~lovasz_kernels.bench.workloads`: workloads (loss, shape, mode, dtype), the seeded
  input builders, a fwd+bwd call per contender, tie-group sums for cross-checks, the grids;
- :mod:`~lovasz_kernels.bench.baselines`: the per-class loop of the common public
  implementation, the yardstick;
- :mod:`~lovasz_kernels.bench.floors`: the sort floors (CPU and CUDA), the byte model behind
  GB/s, the cards' peak bandwidths;
- :mod:`~lovasz_kernels.bench.rules`: which contenders run here, the skip budget;
- :mod:`~lovasz_kernels.bench.measure`: interleaved timing (wall clock or CUDA events) and
  peak memory;
- :mod:`~lovasz_kernels.bench.engine`: the driver: cross-check, time, measure, one record per
  workload;
- :mod:`~lovasz_kernels.bench.report`: tables, JSON, plot, progress bar.

Example
-------
>>> from lovasz_kernels import bench
>>> settings = bench.Settings([bench.Workload("softmax", 1, 16, 3)], ["torch"], repeat=1,
...                           measure_memory=False)
>>> [record] = bench.run(settings)
>>> sorted(record["contenders"]), record["contenders"]["torch"]["status"]
(['floor', 'loop', 'torch'], 'ok')
"""

from lovasz_kernels.bench.engine import OverBudget, Settings, failures, run, warmed_call
from lovasz_kernels.bench.rules import (
    DEFAULT_BUDGET_S,
    REFERENCE,
    Budget,
    backend_problem,
    runnable_backends,
    standard_contenders,
)
from lovasz_kernels.bench.workloads import (
    CUDA_SUITE,
    DEFAULT_SIDES,
    FLOOR,
    FULL_SUITE_EXTRA,
    LOOP,
    QUICK_SIDES,
    SUITE,
    Prepared,
    Workload,
    hinge_inputs,
    softmax_inputs,
)

__all__ = [
    "CUDA_SUITE", "DEFAULT_BUDGET_S", "DEFAULT_SIDES", "FLOOR", "FULL_SUITE_EXTRA", "LOOP",
    "QUICK_SIDES", "REFERENCE", "SUITE", "Budget", "OverBudget", "Prepared", "Settings",
    "Workload", "backend_problem", "failures", "hinge_inputs", "run", "runnable_backends",
    "softmax_inputs", "standard_contenders", "warmed_call",
]
