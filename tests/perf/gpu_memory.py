"""Peak memory and time of the GPU backends' memory-bounded chunks on one CUDA GPU.

For every workload of the bench grid (the GPU goals' sizes first), in one process: the extra
peak of the CUDA caching allocator in one forward + backward (over the memory in use before
it, as a multiple of the input's size) and the median time (CUDA events, interleaved rounds)
of the triton backend as it runs by default (segments in chunks whose temporaries fit in the
gradient's size or the GPU chunk floor, whichever is larger), in one chunk, with its value
checks on and with a floor of 0 set as a user sets it (``set_chunk_floor``: kept strictly),
of the torch backend by default, with the CPU's smaller floor and with a floor of 0 set,
and of the per-class loop.
``--triton-floors`` adds the triton backend under smaller floors, ``--profile`` a kernel
profile of two workloads. Then what ``torch.sort`` holds per key besides its keys and outputs
(the scratch the chunk sizes assume). Value checks off unless named: they synchronise. Run
by benchmarks/gpu_check.sh; by hand:

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

import lovasz_kernels._plan as plan_module
from lovasz_kernels import set_validate_values
from lovasz_kernels.backends import triton_gpu
from lovasz_kernels.bench.measure import (
    CudaPeakMeter,
    TorchAllocationPeakMeter,
    clock_for,
    interleaved_times,
)
from lovasz_kernels.bench.workloads import (
    CUDA_SUITE,
    FULL_SUITE_EXTRA,
    LOOP,
    SUITE,
    Prepared,
)

ONE_CHUNK = 1 << 62  # a chunk budget no call reaches
# triton chunk budgets besides the default (the gradient's size, the GPU floor at least):
# the gradient's size with smaller floors (with --triton-floors)
TRITON_FLOORS = {"floor 32MB": 32 << 20, "floor 128MB": 128 << 20}
PROFILED = ("softmax 1x1024x1024x21 batch float32", "softmax 1x512x512x21 batch float32")


def _triton_with_floor(prepared: Prepared, floor: int):
    gradient = prepared.scores.numel() * max(prepared.scores.element_size(), 4)
    with triton_gpu._override(chunk_bytes=max(gradient, floor)):
        return prepared.fwd_bwd("triton")


def _torch_with_cpu_floor(prepared: Prepared):
    """The torch backend with the CPU's chunk floor (the GPU's before it had its own)."""
    saved = plan_module.GPU_CHUNK_FLOOR_BYTES
    plan_module.GPU_CHUNK_FLOOR_BYTES = plan_module.CPU_CHUNK_FLOOR_BYTES
    try:
        return prepared.fwd_bwd("torch")
    finally:
        plan_module.GPU_CHUNK_FLOOR_BYTES = saved


def _with_floor_set(prepared: Prepared, backend: str):
    """A backend under a floor of 0 set for the device. The torch backend: every row over
    the budget sorted by ranges (each reads the device), errors in blocks, no chunk wider
    than fits. The triton backend: chunks within the gradient's size, and a call where one
    segment's sort would not fit handed to the torch backend's ranges. The GPU floor too
    (the triton backend's, even on CPU tensors, as in a smoke test)."""
    with (plan_module.chunk_floor_set("cuda", 0),
          plan_module.chunk_floor_set(prepared.scores.device.type, 0)):
        return prepared.fwd_bwd(backend)


def _with_value_checks(prepared: Prepared, contender: str):
    set_validate_values(True)
    try:
        return prepared.fwd_bwd(contender)
    finally:
        set_validate_values(False)


def _count_chunks(prepared: Prepared) -> int:
    """Chunks one default triton call runs (its sorted, histogram or in-register runs)."""
    count = 0
    saved = {}
    for name in ("_run_sorted", "_run_histogram", "_run_in_registers"):
        real = saved[name] = getattr(triton_gpu, name)

        def counting(*args, real=real, **kwargs):
            nonlocal count
            count += 1
            return real(*args, **kwargs)

        setattr(triton_gpu, name, counting)
    try:
        prepared.fwd_bwd("triton")
    finally:
        for name, real in saved.items():
            setattr(triton_gpu, name, real)
    return count


def _profile(prepared: Prepared, floor: int | None, label: str) -> None:
    """Device time per kernel over 5 calls (torch.profiler), against their wall time."""
    from torch.profiler import ProfilerActivity, profile

    def call():
        if floor is None:
            prepared.fwd_bwd("triton")
        else:
            _triton_with_floor(prepared, floor)

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 5
    print(f"--- profile {prepared.workload.name}, {label}: wall {wall * 1e3:.3f} ms per call")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14,
                                    max_name_column_width=48))


def _sort_scratch(meter, device: str, scale: int) -> dict[str, dict[str, float]]:
    """Bytes per key torch.sort holds besides the keys and its two outputs (sorted keys, int64
    indices) on each of its paths, and the whole peak against ``triton_gpu._sort_bytes``."""
    result = {}
    for name, shape, dtype in (
            ("rows of 2^21 (one after the other)", (3, 2 << scale), torch.int32),
            ("21 rows of 2^18 (pairs)", (21, 1 << (scale - 2)), torch.int32),
            ("200 rows of 2^16 (segmented)", (200, 1 << (scale - 4)), torch.int32),
            ("flat int64", (1, 4 << scale), torch.int64)):
        keys = torch.randint(0, 1 << 30, shape, dtype=dtype, device=device)

        def call(keys=keys):
            torch.sort(keys, dim=1, descending=True)

        call()
        peak = meter.extra_peak_bytes(call)
        outputs = keys.numel() * (keys.element_size() + 8)
        model = triton_gpu._sort_bytes(shape[0], shape[1], keys.element_size())
        result[name] = {"scratch_per_key": (peak - outputs) / keys.numel(),
                        "peak_over_model": (peak + keys.numel() * keys.element_size()) / model}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--budget", type=float, default=120.0,
                        help="seconds; workloads not started by then are skipped")
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", default=None, help="run only the workload of this name")
    parser.add_argument("--triton-floors", action="store_true",
                        help="also the triton backend under chunk floors of 32 and 128 MB")
    parser.add_argument("--profile", action="store_true",
                        help="a kernel profile of two workloads, floor 32 MB and one chunk")
    args = parser.parse_args()
    known = {workload.name for workload in CUDA_SUITE + SUITE + FULL_SUITE_EXTRA}
    if args.only is not None and args.only not in known:
        parser.error(f"--only: unknown workload name {args.only!r}; known: {sorted(known)}")
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
                                                           20 if cuda else 10),
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
                 "triton one chunk": lambda p=prepared: _triton_with_floor(p, ONE_CHUNK)}
        if args.triton_floors:
            for label, floor in TRITON_FLOORS.items():
                calls[f"triton {label}"] = (
                    lambda p=prepared, floor=floor: _triton_with_floor(p, floor))
        calls["triton checks on"] = lambda p=prepared: _with_value_checks(p, "triton")
        calls["triton floor 0 set"] = lambda p=prepared: _with_floor_set(p, "triton")
        calls["torch"] = lambda p=prepared: p.fwd_bwd("torch")
        calls["torch floor 32MB"] = lambda p=prepared: _torch_with_cpu_floor(p)
        calls["torch floor 0 set"] = lambda p=prepared: _with_floor_set(p, "torch")
        if workload.loss != "extension":
            calls["loop"] = lambda p=prepared: p.fwd_bwd(LOOP)
        row = {"input_MB": prepared.input_bytes / 1e6, "chunks": _count_chunks(prepared)}
        for name, call in calls.items():
            call()  # compile, autotune, warm the caching allocator
            row[f"{name} peak_x"] = meter.extra_peak_bytes(call) / prepared.input_bytes
        whole = _triton_with_floor(prepared, ONE_CHUNK)
        chunked = prepared.fwd_bwd("triton")
        row["same bits"] = bool(torch.equal(whole[0], chunked[0])
                                and torch.equal(whole[1], chunked[1]))
        times = interleaved_times(calls, args.rounds, clock)
        for name, values in times.items():
            row[f"{name} ms"] = statistics.median(values) * 1e3
        results["workloads"][workload.name] = row
        print(f"{workload.name:42s} " + " ".join(
            f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in row.items()), flush=True)
        if cuda and args.profile and workload.name in PROFILED:
            _profile(prepared, TRITON_FLOORS["floor 32MB"], "floor 32MB")
            _profile(prepared, ONE_CHUNK, "one chunk")
        del prepared, calls
        if cuda:
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
