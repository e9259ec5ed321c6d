"""Peak memory in one forward + backward, for the workloads of the standard grid.

    python tests/perf/allocated_peak.py [--backend torch] [--rss]

By default ``TorchAllocationPeakMeter``: the running sum of torch's CPU allocations and frees
over one call (after a warm-up call), its maximum over the input's size: what the code needs,
without the heap fragmentation that a peak RSS adds. Deterministic, and what
``torch.cuda.max_memory_allocated`` reports for the same code on a GPU. Only torch tensors
count (not numpy arrays: the numpy backend, numba's scratch), so this is for the torch
backend. ``--rss``: the peak RSS over the RSS before the call instead (``RssPeakMeter``, as
``lovasz-kernels bench`` measures it), which every backend's memory shows in, numba's too.
Either meter first releases the arrays that calls keep between them, so the peak counts
them as the call's.
"""

from __future__ import annotations

import argparse

from lovasz_kernels.bench.measure import RssPeakMeter, TorchAllocationPeakMeter
from lovasz_kernels.bench.workloads import SUITE, Prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--rss", action="store_true",
                        help="peak RSS (every backend) instead of torch's allocations")
    args = parser.parse_args()
    meter = RssPeakMeter() if args.rss else TorchAllocationPeakMeter()
    if args.rss and (reason := meter.unavailable_reason()):
        parser.error(reason)
    for workload in SUITE:
        prepared = Prepared(workload)
        prepared.fwd_bwd(args.backend)  # warm-up
        peak = meter.extra_peak_bytes(lambda prepared=prepared: prepared.fwd_bwd(args.backend))
        print(f"{workload.name:40s} {peak / 1e6:9.1f} MB {peak / prepared.input_bytes:6.2f}x")


if __name__ == "__main__":
    main()
