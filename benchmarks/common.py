"""The asv suite's grid, from :mod:`lovasz_kernels.bench`.

The workloads, inputs, contenders, floors and skip rule are the ones ``lovasz-kernels bench``
and ``tests/perf`` use (each benchmark's ``setup`` gets its call from
``bench.warmed_call``); this file only picks the grid. Only combinations that run here are
enumerated: contenders are the backends available natively on the device (plus the per-class
loop), so nothing is listed only to be skipped. The default grid is the standard workloads
(``bench.SUITE``), every one within the skip budget for every contender; the full grid adds
larger inputs, float16 and the numpy reference:

    LOVASZ_BENCH_GRID=full asv run --python=same --set-commit-hash $(git rev-parse HEAD)

In the full grid a call the cost model puts above the budget raises ``NotImplementedError``
(asv prints ``n/a``); the model is deterministic, so the same few are skipped everywhere.

The suite needs ``lovasz_kernels.bench`` in the commit under test: history starts with it.
"""

from __future__ import annotations

import os

import torch

from lovasz_kernels import bench

FULL = os.environ.get("LOVASZ_BENCH_GRID", "").lower() == "full"
CUDA_AVAILABLE = torch.cuda.is_available()


def workloads(loss: str, suite=None) -> list[str]:
    """Names of the grid's workloads of ``loss`` (asv parameters are strings)."""
    if suite is None:
        suite = bench.SUITE + (bench.FULL_SUITE_EXTRA if FULL else ())
    return [w.name for w in suite if w.loss == loss]


def contenders(loss: str, device: str = "cpu") -> list[str]:
    """The standard contenders (``bench.standard_contenders``); the full grid adds the numpy
    reference."""
    return bench.standard_contenders(loss, device, reference=FULL)


#: the CPU backends that keep a floor set with ``set_chunk_floor`` (memory before speed)
FLOOR_KEEPING_BACKENDS = ("numba", "torch")


def floor_keeping_backends(device: str = "cpu") -> list[str]:
    """:data:`FLOOR_KEEPING_BACKENDS` that run natively here."""
    runnable = bench.standard_contenders("softmax", device)
    return [name for name in FLOOR_KEEPING_BACKENDS if name in runnable]
