"""The torch backend on long segments (batch IoU over large images, one or two classes): time and
memory of forward + backward.

    python tests/perf/long_rows.py [--rounds 9] [--cases hinge:4:1024 softmax:2:1024:2]
    python tests/perf/long_rows.py --toggle [--rounds 15]
    python tests/perf/long_rows.py --device cuda --toggle --cases hinge:8:2048

A case is ``loss:batch:side[:classes]``, batch IoU (one segment per class over the whole
batch). For each case this prints the input's size, the allocated peak over it (after a
warm-up call: ``TorchAllocationPeakMeter`` on the CPU, ``torch.cuda.max_memory_allocated``
on a GPU) and the median time of ``--rounds`` calls on three inputs in turn (on a GPU, from
a synchronisation to the next). On a GPU, rows reach the ranges only past the 512 MB budget:
about 30M pixels. To compare two versions of the code, run it from each
checkout in alternating processes (``PYTHONPATH=<checkout>``).

``--toggle`` compares, in one process and call by call, this code against the same code with
every row sorted whole (no row sorted a range of values at a time): this VM switches between
two speeds within seconds, which alternating processes cannot average out.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lovasz_kernels.backends import torch_eager
from lovasz_kernels.bench.measure import CudaPeakMeter, TorchAllocationPeakMeter
from lovasz_kernels.bench.workloads import Prepared, Workload

DEFAULT_CASES = ("hinge:1:1024", "hinge:2:1024", "hinge:4:1024", "hinge:8:1024",
                 "softmax:1:1024:2", "softmax:2:1024:2", "softmax:4:1024:2")


def _workload(case: str) -> Workload:
    loss, batch, side, *classes = case.split(":")
    return Workload(loss, int(batch), int(side), int(classes[0]) if classes else 1)


def _measure(inputs: list[Prepared], rounds: int, modes: dict[str, object]) -> None:
    """Peak and median time per mode (a ``_ranges_pay`` to use), toggled call by call."""
    device = inputs[0].device
    meter = CudaPeakMeter(device) if device.type == "cuda" else TorchAllocationPeakMeter()

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    real = torch_eager._ranges_pay
    peaks, times = {}, {name: [] for name in modes}
    try:
        for name, ranges_pay in modes.items():
            torch_eager._ranges_pay = ranges_pay
            inputs[0].fwd_bwd("torch")  # warm-up
            peaks[name] = meter.extra_peak_bytes(lambda: inputs[0].fwd_bwd("torch"))
        for round_index in range(rounds):
            order = list(modes.items())
            for name, ranges_pay in (order if round_index % 2 else order[::-1]):
                torch_eager._ranges_pay = ranges_pay
                synchronize()
                start = time.perf_counter()
                inputs[round_index % 3].fwd_bwd("torch")
                synchronize()
                times[name].append((time.perf_counter() - start) * 1e3)
    finally:
        torch_eager._ranges_pay = real
    input_bytes = inputs[0].input_bytes
    cells = [f"{name} {statistics.median(times[name]):8.1f} ms {peaks[name] / 1e6:7.1f} MB "
             f"{peaks[name] / input_bytes:5.2f}x" for name in modes]
    print(f"{inputs[0].workload.loss}:{inputs[0].workload.batch}:{inputs[0].workload.side}"
          f":{inputs[0].workload.classes:<3d} input {input_bytes / 1e6:6.1f} MB  "
          + "  ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES))
    parser.add_argument("--toggle", action="store_true",
                        help="also time every row sorted whole, call by call")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    modes = {"now": torch_eager._ranges_pay}
    if args.toggle:
        modes["whole rows"] = lambda errors, over_budget: False
    for case in args.cases:
        workload = _workload(case)
        _measure([Prepared(workload, device=args.device, seed=seed) for seed in range(3)],
                 args.rounds, modes)


if __name__ == "__main__":
    main()
