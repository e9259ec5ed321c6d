"""Peak memory held by torch's allocations in one forward + backward, for the workloads of the
standard grid: what the code needs, without the heap fragmentation that a peak RSS adds.

    python tests/perf/allocated_peak.py [--backend torch]

``TorchAllocationPeakMeter``: the running sum of torch's CPU allocations and frees over one
call (after a warm-up call), its maximum over the input's size. Deterministic, and what
``torch.cuda.max_memory_allocated`` reports for the same code on a GPU. Only torch tensors
count (not numpy arrays: the numpy backend, numba's scratch), so this is for the torch
backend; ``lovasz-kernels bench`` gives every backend's peak RSS.
"""

from __future__ import annotations

import argparse

from lovasz_kernels.bench.measure import TorchAllocationPeakMeter
from lovasz_kernels.bench.workloads import SUITE, Prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch")
    args = parser.parse_args()
    for workload in SUITE:
        prepared = Prepared(workload)
        prepared.fwd_bwd(args.backend)  # warm-up
        peak = TorchAllocationPeakMeter().extra_peak_bytes(
            lambda prepared=prepared: prepared.fwd_bwd(args.backend))
        print(f"{workload.name:40s} {peak / 1e6:9.1f} MB {peak / prepared.input_bytes:6.2f}x")


if __name__ == "__main__":
    main()
