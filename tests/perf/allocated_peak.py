"""Peak memory in one forward + backward, for the workloads of the standard grid.

    python tests/perf/allocated_peak.py [--backend torch] [--rss | --numpy] [--chunk-floor MB]

By default ``TorchAllocationPeakMeter``: the running sum of torch's CPU allocations and frees
over one call (after a warm-up call), its maximum over the input's size: what the code needs,
without the heap fragmentation that a peak RSS adds. Deterministic, and what
``torch.cuda.max_memory_allocated`` reports for the same code on a GPU. Only torch tensors
count (not numpy arrays: the numpy backend, numba's scratch), so this is for the torch
backend. ``--rss``: the peak RSS over the RSS before the call instead (``RssPeakMeter``, as
``lovasz-kernels bench`` measures it), which every backend's memory shows in, numba's too.
``--numpy``: the peak of numpy's allocations instead (``tracemalloc``, every thread's):
the numba backend's own arrays (its gradient, keys and buffers, narrowed labels), without the
heap's history that a peak RSS adds; the loss layer's torch temporaries, freed before the
kernels run, are not in it. Every meter first releases the arrays that calls keep between
them, so the peak counts them as the call's. ``--chunk-floor``: the CPU floor set as a user sets it
(``set_chunk_floor``, kept strictly).
"""

from __future__ import annotations

import argparse

from lovasz_kernels import set_chunk_floor
from lovasz_kernels.bench.measure import (
    NumpyAllocationPeakMeter,
    RssPeakMeter,
    TorchAllocationPeakMeter,
)
from lovasz_kernels.bench.rules import backend_flag_problem
from lovasz_kernels.bench.workloads import SUITE, Prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--rss", action="store_true",
                      help="peak RSS (every backend) instead of torch's allocations")
    kind.add_argument("--numpy", action="store_true",
                      help="numpy's allocations (tracemalloc) instead of torch's")
    parser.add_argument("--chunk-floor", type=float, default=None, metavar="MB",
                        help="set the CPU floor (set_chunk_floor), in MB")
    args = parser.parse_args()
    # a wrong flag: a message and exit 2, before any work
    if problem := backend_flag_problem(args.backend, "cpu"):
        parser.error(f"--backend: {problem}")
    if args.chunk_floor is not None and args.chunk_floor < 0:
        parser.error(f"--chunk-floor must be >= 0 (MB); got {args.chunk_floor:g}")
    if args.chunk_floor is not None:
        set_chunk_floor("cpu", int(args.chunk_floor * (1 << 20)))
    meter = (RssPeakMeter() if args.rss else NumpyAllocationPeakMeter() if args.numpy
             else TorchAllocationPeakMeter())
    if args.rss and (reason := meter.unavailable_reason()):
        parser.error(reason)
    for workload in SUITE:
        prepared = Prepared(workload)
        prepared.fwd_bwd(args.backend)  # warm-up
        peak = meter.extra_peak_bytes(lambda prepared=prepared: prepared.fwd_bwd(args.backend))
        print(f"{workload.name:40s} {peak / 1e6:9.1f} MB {peak / prepared.input_bytes:6.2f}x")


if __name__ == "__main__":
    main()
