"""Peak memory and time of the triton backend's memory-bounded chunks on one CUDA GPU.

For every workload of the bench grid (the GPU goals' sizes first), in one process: the extra
peak of the CUDA caching allocator in one forward + backward (over the memory in use before
it, as a multiple of the input's size) and the median time (CUDA events, interleaved rounds)
of the triton backend as it runs by default (segments in chunks whose temporaries fit in the
gradient's size), of the same backend in one chunk, and of the torch backend. Then what
``torch.sort`` holds per key besides its keys and outputs (the scratch the chunk sizes
assume). Value checks off: they synchronise. Run by benchmarks/gpu_check.sh; by hand:

    python tests/perf/gpu_memory.py [--rounds 10] [--budget 120] [--json FILE]

``--device cpu --only NAME`` runs one workload on CPU tensors (with ``TRITON_INTERPRET=1``,
torch's CPU allocations as the meter): a smoke test of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lovasz_kernels import set_validate_values
from lovasz_kernels.backends import triton_gpu
from lovasz_kernels.bench.measure import (
    CudaPeakMeter,
    TorchAllocationPeakMeter,
    clock_for,
    interleaved_times,
)
from lovasz_kernels.bench.workloads import CUDA_SUITE, FULL_SUITE_EXTRA, SUITE, Prepared

ONE_CHUNK = 1 << 62  # a chunk budget no call reaches


def _one_chunk(prepared: Prepared):
    with triton_gpu._override(chunk_bytes=ONE_CHUNK):
        return prepared.fwd_bwd("triton")


def _sort_scratch(meter, device: str, size: int) -> dict[str, float]:
    """Bytes per key torch.sort holds besides the keys and its two outputs (sorted keys, int64
    indices), for (3, size) int32 rows and 2·size flat int64 keys."""
    rows = torch.randint(0, 1 << 30, (3, size), dtype=torch.int32, device=device)
    flat = torch.randint(0, 1 << 62, (2 * size,), dtype=torch.int64, device=device)
    result = {}
    for name, keys, call in (
            ("rows int32", rows, lambda: torch.sort(rows, dim=1, descending=True)),
            ("flat int64", flat, lambda: torch.sort(flat, descending=True))):
        call()
        peak = meter.extra_peak_bytes(call)
        outputs = keys.numel() * (keys.element_size() + 8)
        result[name] = (peak - outputs) / keys.numel()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--budget", type=float, default=120.0,
                        help="seconds; workloads not started by then are skipped")
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", default=None, help="run only the workload of this name")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    set_validate_values(False)
    meter = CudaPeakMeter() if cuda else TorchAllocationPeakMeter()
    clock = clock_for(args.device)
    start = time.perf_counter()
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu",
               "torch": torch.__version__,
               "sort_scratch_bytes_per_key": _sort_scratch(meter, args.device,
                                                           1 << 21 if cuda else 1 << 12),
               "workloads": {}}
    print("torch.sort scratch per key:", results["sort_scratch_bytes_per_key"])
    seen = []
    for workload in CUDA_SUITE + SUITE + FULL_SUITE_EXTRA:
        if workload in seen or args.only not in (None, workload.name):
            continue
        seen.append(workload)
        if time.perf_counter() - start > args.budget:
            print(f"{workload.name:42s} skipped (budget)")
            continue
        prepared = Prepared(workload, args.device)
        calls = {"triton": lambda p=prepared: p.fwd_bwd("triton"),
                 "triton one chunk": lambda p=prepared: _one_chunk(p),
                 "torch": lambda p=prepared: p.fwd_bwd("torch")}
        row = {"input_MB": prepared.input_bytes / 1e6}
        for name, call in calls.items():
            call()  # compile, autotune, warm the caching allocator
            row[f"{name} peak_x"] = meter.extra_peak_bytes(call) / prepared.input_bytes
        whole, chunked = _one_chunk(prepared), prepared.fwd_bwd("triton")
        row["same bits"] = bool(torch.equal(whole[0], chunked[0])
                                and torch.equal(whole[1], chunked[1]))
        times = interleaved_times(calls, args.rounds, clock)
        for name, values in times.items():
            row[f"{name} ms"] = statistics.median(values) * 1e3
        results["workloads"][workload.name] = row
        print(f"{workload.name:42s} " + " ".join(
            f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in row.items()), flush=True)
        del prepared, calls
        if cuda:
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
