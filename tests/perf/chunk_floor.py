"""The torch backend's chunk floor: speed and memory with smaller chunks than the default.

    python tests/perf/chunk_floor.py [--floors-mb 32 8 4] [--rounds 15]

Small inputs run the generic path and the torch backend's extension in one chunk (below
``CPU_CHUNK_FLOOR_BYTES`` of gradient). For each workload and each floor this prints the median
forward + backward time of interleaved rounds in one process and the allocated peak over the
input (``TorchAllocationPeakMeter``): what smaller chunks would save in memory, and cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lovasz_kernels._plan as plan_module
from lovasz_kernels.bench.measure import TorchAllocationPeakMeter
from lovasz_kernels.bench.workloads import Prepared, Workload

WORKLOADS = (
    Workload("softmax", 1, 128, 21),
    Workload("softmax", 1, 256, 21),
    Workload("softmax", 1, 512, 21),
    Workload("softmax", 4, 256, 21, per_image=True),
    Workload("softmax", 8, 64, 5, per_image=True),
    Workload("softmax", 16, 32, 21, per_image=True),
    Workload("hinge", 8, 256, per_image=True),
)


def _set_floor(floor_bytes: int) -> None:
    # read by both the loss's generic path and the backend's own chunks of rows
    plan_module.CPU_CHUNK_FLOOR_BYTES = floor_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floors-mb", type=int, nargs="+", default=[32, 8, 4])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    floors = [mb << 20 for mb in args.floors_mb]
    default = plan_module.CPU_CHUNK_FLOOR_BYTES
    try:
        for workload in WORKLOADS:
            prepared = Prepared(workload)
            call = lambda prepared=prepared: prepared.fwd_bwd("torch")  # noqa: E731
            peaks = {}
            for floor in floors:
                _set_floor(floor)
                call()  # warm-up
                peaks[floor] = TorchAllocationPeakMeter().extra_peak_bytes(call)
            samples: dict[int, list[float]] = {floor: [] for floor in floors}
            for _ in range(args.rounds):
                for floor in floors:
                    _set_floor(floor)
                    start = time.perf_counter()
                    call()
                    samples[floor].append((time.perf_counter() - start) * 1e3)
            cells = [f"{floor >> 20} MB: {statistics.median(samples[floor]):7.2f} ms "
                     f"{peaks[floor] / prepared.input_bytes:5.2f}x" for floor in floors]
            print(f"{workload.name:42s} " + "  ".join(cells), flush=True)
    finally:
        _set_floor(default)


if __name__ == "__main__":
    main()
