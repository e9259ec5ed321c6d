"""Where a contender's time goes on one CUDA GPU: a kernel profile of forward + backward.

    python tests/perf/gpu_profile.py [--contenders torch,loop] [--only NAME ...] [--rows 12]

For each workload of the GPU goals' sizes and the bench grid (or the ``--only`` ones), and each
contender (a backend's name or ``loop``, the per-class loop): the wall time of one call
(5 calls after a warm-up, synchronised), the device time its kernels add up to, and the
kernels and host-side ops that take the most of each. Value checks off (they synchronise).
A call whose wall time is far above its device time is bound by launches on the host;
``--host`` then shows where the host's time goes instead (cProfile of 20 calls, by own time).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.autograd import DeviceType

from lovasz_kernels import set_validate_values
from lovasz_kernels.bench.workloads import CUDA_SUITE, FULL_SUITE_EXTRA, SUITE, Prepared


def _profile(prepared: Prepared, contender: str, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    prepared.fwd_bwd(contender)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(5):
            prepared.fwd_bwd(contender)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 5
    events = prof.key_averages()
    # the kernels' own events: an op's event repeats its kernels' device time
    device_us = sum(event.self_device_time_total for event in events
                    if event.device_type == DeviceType.CUDA) / 5
    print(f"=== {prepared.workload.name}, {contender}: wall {wall * 1e3:.3f} ms per call, "
          f"kernels {device_us / 1e3:.3f} ms per call")
    print(events.table(sort_by="self_device_time_total", row_limit=rows,
                       max_name_column_width=56))
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows // 2,
                       max_name_column_width=56))


def _profile_host(prepared: Prepared, contender: str, rows: int) -> None:
    import cProfile
    import pstats

    for _ in range(3):
        prepared.fwd_bwd(contender)
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(20):
        prepared.fwd_bwd(contender)
    torch.cuda.synchronize()
    profiler.disable()
    wall = (time.perf_counter() - start) / 20
    print(f"=== {prepared.workload.name}, {contender}: wall {wall * 1e3:.3f} ms per call "
          "under cProfile, 20 calls")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contenders", default="torch,loop")
    parser.add_argument("--only", nargs="*", default=None, help="workload names")
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--host", action="store_true", help="cProfile the host's Python")
    args = parser.parse_args()
    known = {workload.name for workload in CUDA_SUITE + SUITE + FULL_SUITE_EXTRA}
    unknown = sorted(set(args.only or ()) - known)
    if unknown:
        parser.error(f"--only: unknown workload names {unknown}; known: {sorted(known)}")
    contenders = args.contenders.split(",")
    if "" in contenders:
        parser.error(f"--contenders: comma-separated backend names or loop; got "
                     f"{args.contenders!r}")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    set_validate_values(False)
    seen = []
    for workload in CUDA_SUITE + SUITE + FULL_SUITE_EXTRA:
        if workload in seen or (args.only is not None and workload.name not in args.only):
            continue
        seen.append(workload)
        prepared = Prepared(workload, "cuda")
        for contender in contenders:
            if contender == "loop" and workload.loss == "extension":
                continue
            (_profile_host if args.host else _profile)(prepared, contender, args.rows)
        del prepared
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
