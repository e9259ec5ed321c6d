"""Where a numba loss call spends its time, thread by thread: for telling apart, on a machine
with many cores, the torch ops around the kernel, threads that start late, segments slowed by
running beside each other (memory traffic), and segments split across threads.

    python tests/perf/numba_trace.py [--rounds 9] [--cases 512x21 1024x2 ...]

Each round runs a torch op (as a training step's last op), then the whole loss (forward +
backward) with the backend's pieces wrapped to record when each started and ended: the shared
pass over segments (one task per thread: its start after the pass began, how long it was busy,
and every thread's busy time per segment of the pass), segments split across threads,
and the rest of the call. Before
that, one segment of the case's size runs alone on one thread (its time beside nobody). Prints
medians over the rounds, ms:

- ``call``: the loss, forward + backward;
- ``outside``: the call less the kernels (value checks, class counts, label narrowing, the
  backward's product: torch ops and host work);
- ``shared``: the shared pass, first start to last end; ``late``: the latest thread's start;
  ``busy``: the longest thread's busy time; ``per seg``: all threads' busy time over the
  pass's segments (a segment's time beside the others), against ``alone``;
- ``split``: the segments split across threads, in all (``k x``: how many).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

CASES = {  # name: (batch, classes, side, per_image)
    "512x21": (1, 21, 512, False),
    "256x150": (1, 150, 256, False),
    "1024x2": (1, 2, 1024, False),
    "4x256x21-per-image": (4, 21, 256, True),
    "8x64x5-per-image": (8, 5, 64, True),
    "8x256x2-per-image": (8, 2, 256, True),
    "4x512x2": (4, 2, 512, False),
    "2x1024x2": (2, 2, 1024, False),
    "512x8": (1, 8, 512, False),
    "512x16": (1, 16, 512, False),
}


def _trace_case(name: str, rounds: int) -> dict[str, float]:
    import torch

    from lovasz_kernels import _numba_core as core
    from lovasz_kernels import lovasz_softmax
    from lovasz_kernels.backends import numba_cpu

    batch, classes, side, per_image = CASES[name]
    gen = torch.Generator().manual_seed(0)
    probas = torch.randn(batch, classes, side, side, generator=gen).softmax(dim=1)
    labels = torch.randint(0, classes, (batch, side, side), generator=gen)
    other = torch.randn(batch, classes, side, side, generator=gen)
    segment_pixels = side * side * (1 if per_image else batch)

    events: list[tuple[str, int, float, float, int]] = []  # kind, thread, start, end, segments
    shared_task, blocked = numba_cpu._segments_task, numba_cpu._segment_blocked
    kernel = numba_cpu._run_batch

    def traced_task(batch_arg, num_segments, *args):
        start = time.perf_counter()
        shared_task(batch_arg, num_segments, *args)
        events.append(("shared", threading.get_ident(), start, time.perf_counter(),
                       num_segments))

    def traced_blocked(*args):
        start = time.perf_counter()
        loss = blocked(*args)
        events.append(("split", threading.get_ident(), start, time.perf_counter(), 1))
        return loss

    def traced_kernel(*args):
        start = time.perf_counter()
        result = kernel(*args)
        events.append(("kernel", threading.get_ident(), start, time.perf_counter(), 0))
        return result

    def call() -> float:
        scores = probas.clone().requires_grad_()
        start = time.perf_counter()
        lovasz_softmax(scores, labels, per_image=per_image, backend="numba").backward()
        return time.perf_counter() - start

    # one segment alone, on this thread: the extension of errors as the loss builds them
    errors = (probas[:, 0].reshape(1, -1) if not per_image else probas[0, 0].reshape(1, -1))
    fg = (labels.reshape(1, -1) == 0) if not per_image else (labels[0].reshape(1, -1) == 0)
    errors = torch.where(fg, 1 - errors, errors).contiguous()
    alone = []
    with_threads = core.thread_count
    core.thread_count = lambda: 1
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            numba_cpu.lovasz_extension(errors, fg)
            alone.append(time.perf_counter() - start)
    finally:
        core.thread_count = with_threads

    call()  # warm-up (and any measurement on first use)
    rows: dict[str, list[float]] = {key: [] for key in (
        "call", "outside", "shared", "late", "busy", "per seg", "split", "splits")}
    numba_cpu._segments_task, numba_cpu._segment_blocked = traced_task, traced_blocked
    numba_cpu._run_batch = traced_kernel
    try:
        for _ in range(rounds):
            torch.softmax(other, dim=1)
            events.clear()
            rows["call"].append(call())
            kernels = [event for event in events if event[0] == "kernel"]
            shared = [event for event in events if event[0] == "shared"]
            split = [event for event in events if event[0] == "split"]
            in_kernels = sum(end - start for _, _, start, end, _ in kernels)
            rows["outside"].append(rows["call"][-1] - in_kernels)
            if shared:
                first = min(start for _, _, start, _, _ in shared)
                rows["shared"].append(max(end for _, _, _, end, _ in shared) - first)
                rows["late"].append(max(start for _, _, start, _, _ in shared) - first)
                rows["busy"].append(max(end - start for _, _, start, end, _ in shared))
                # every thread's busy time over the segments of the pass (each task is told
                # the pass's segment count): a segment's time beside the others
                busy_in_all = sum(end - start for _, _, start, end, _ in shared)
                rows["per seg"].append(busy_in_all / shared[0][4])
            rows["split"].append(sum(end - start for _, _, start, end, _ in split))
            rows["splits"].append(len(split) / 1e3)  # printed in units, not ms
    finally:
        numba_cpu._segments_task, numba_cpu._segment_blocked = shared_task, blocked
        numba_cpu._run_batch = kernel
    medians = {key: statistics.median(values) * 1e3 if values else float("nan")
               for key, values in rows.items()}
    medians["alone"] = statistics.median(alone) * 1e3
    medians["segment pixels"] = segment_pixels
    medians["threads"] = core.thread_count()
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    from lovasz_kernels import _numba_core as core

    print(f"{core.thread_count()} numba threads; medians of {args.rounds} rounds, ms")
    columns = ("call", "outside", "shared", "late", "busy", "per seg", "alone", "split")
    print(f"{'case':20s} " + " ".join(f"{column:>8s}" for column in columns) + f" {'k x':>4s}")
    for name in args.cases:
        row = _trace_case(name, args.rounds)
        print(f"{name:20s} " + " ".join(f"{row[column]:8.2f}" for column in columns)
              + f" {row['splits']:4.0f}", flush=True)


if __name__ == "__main__":
    main()
