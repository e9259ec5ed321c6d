"""The chunk floor: speed and memory with smaller chunks than the default.

    python tests/perf/chunk_floor.py [--floors-mb 32 8 4] [--rounds 15] [--strict] [--suite]
        [--loop] [--backend torch] [--rss]

Small inputs run the generic path and the torch backend's extension in one chunk (below
``CPU_CHUNK_FLOOR_BYTES`` of gradient). For each workload and each floor this prints the median
forward + backward time of interleaved rounds in one process and the allocated peak over the
input (``TorchAllocationPeakMeter``): what smaller chunks would save in memory, and cost.

``--strict`` sets each floor as a user does (``set_chunk_floor``), which keeps the budget
strictly, beside the default floor as it is; ``--suite`` times the standard workloads
(``SUITE``) instead of the small inputs; ``--loop`` times the authors' per-class loop in the
same rounds (loss workloads), and each floor's speed-up over it. ``--backend numba --rss``:
the numba backend, which keeps a floor set strictly too, its peak as peak RSS
(``RssPeakMeter``: torch's allocations do not show numpy's).
"""

from __future__ import annotations

import argparse
import statistics
import time

import lovasz_kernels._plan as plan_module
from lovasz_kernels.bench.measure import RssPeakMeter, TorchAllocationPeakMeter
from lovasz_kernels.bench.rules import backend_flag_problem
from lovasz_kernels.bench.workloads import LOOP, SUITE, Prepared, Workload

WORKLOADS = (
    Workload("softmax", 1, 128, 21),
    Workload("softmax", 1, 256, 21),
    Workload("softmax", 1, 512, 21),
    Workload("softmax", 4, 256, 21, per_image=True),
    Workload("softmax", 8, 64, 5, per_image=True),
    Workload("softmax", 16, 32, 21, per_image=True),
    Workload("hinge", 8, 256, per_image=True),
)


# the default floor, left as it is, beside floors set strictly (--strict)
DEFAULT = -1


def _set_floor(floor_bytes: int, strict: bool) -> None:
    if strict:
        plan_module.set_chunk_floor("cpu", None if floor_bytes == DEFAULT else floor_bytes)
    else:
        # read by both the loss's generic path and the backend's own chunks of rows
        plan_module.CPU_CHUNK_FLOOR_BYTES = floor_bytes


def _label(floor: int) -> str:
    return "default" if floor == DEFAULT else f"{floor >> 20} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floors-mb", type=int, nargs="+", default=[32, 8, 4])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--strict", action="store_true",
                        help="set the floors through set_chunk_floor, beside the default")
    parser.add_argument("--suite", action="store_true", help="the standard workloads")
    parser.add_argument("--loop", action="store_true", help="time the per-class loop too")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--rss", action="store_true",
                        help="peak RSS (every backend) instead of torch's allocations")
    args = parser.parse_args()
    # a wrong flag: a message and exit 2, before any work
    if problem := backend_flag_problem(args.backend, "cpu"):
        parser.error(f"--backend: {problem}")
    meter = RssPeakMeter() if args.rss else TorchAllocationPeakMeter()
    if args.rss and (reason := meter.unavailable_reason()):
        parser.error(reason)
    floors = [mb << 20 for mb in args.floors_mb]
    if args.strict:
        floors.insert(0, DEFAULT)
    default = plan_module.CPU_CHUNK_FLOOR_BYTES
    try:
        for workload in SUITE if args.suite else WORKLOADS:
            prepared = Prepared(workload)
            call = lambda prepared=prepared: prepared.fwd_bwd(args.backend)  # noqa: E731
            peaks = {}
            for floor in floors:
                _set_floor(floor, args.strict)
                call()  # warm-up
                peaks[floor] = meter.extra_peak_bytes(call)
            loop = args.loop and workload.loss != "extension"
            samples: dict[int, list[float]] = {floor: [] for floor in floors}
            loop_samples = []
            for _ in range(args.rounds):
                for floor in floors:
                    _set_floor(floor, args.strict)
                    start = time.perf_counter()
                    call()
                    samples[floor].append((time.perf_counter() - start) * 1e3)
                if loop:
                    start = time.perf_counter()
                    prepared.fwd_bwd(LOOP)
                    loop_samples.append((time.perf_counter() - start) * 1e3)
            medians = {floor: statistics.median(samples[floor]) for floor in floors}
            loop_median = statistics.median(loop_samples) if loop else None
            cells = [f"{_label(floor)}: {medians[floor]:7.2f} ms "
                     f"{peaks[floor] / prepared.input_bytes:5.2f}x"
                     + (f" {loop_median / medians[floor]:5.2f}x loop" if loop else "")
                     for floor in floors]
            if loop:
                cells.append(f"loop: {loop_median:7.2f} ms")
            print(f"{workload.name:42s} " + "  ".join(cells), flush=True)
    finally:
        _set_floor(default, strict=False)
        plan_module.set_chunk_floor("cpu", None)


if __name__ == "__main__":
    main()
