"""The torch backend's descending sort of integer keys, one row per segment, on the CPU: the
2-D comparison sort or, row by row, PyTorch's radix sort; which one where, measured on this
machine.

PyTorch sorts a 1-D integer array of at least its grain size (``RADIX_SORT_MIN_PIXELS``) in
ascending order with a parallel radix sort; a descending or a 2-D sort is a comparison sort.
Rows of a grain or more are radix-sorted one by one (1.2-12x faster alone on every machine
and thread count measured). A shorter row can be padded up to a grain and radix-sorted,
which costs about as much as sorting a full grain. That pays only

- **where the 2-D sort runs the rows one after the other**: it hands them to threads in
  tasks of one grain of values, so rows that fit in one grain run on one thread (a lone row,
  a few short ones), as do all rows with one thread. Rows it spreads over threads stay with
  it (the sort alone, time compared / time padded at 8 x 16384 pixels: 0.50-0.73 with 4-16
  threads on a 16-core Intel Xeon, 0.78-0.85 with 2; 0.96-1.15 on a 2-core AMD EPYC VM,
  where 21 x 16384 gave 1.00-1.16);
- **on machines where it was measured faster** (:func:`padded_radix_speedups`): the speedup
  differs between processors, thread counts and runs (one 12288-pixel row, the sort alone:
  1.44-1.73x on the AMD VM; 0.72-1.56x on the Intel Xeon from 1 to 16 threads, 0.75x and
  then 1.47x with 16 threads on two machines of that kind). So the extension of one row
  (what a call pays, not the sort alone) is timed both ways once per machine and thread
  count on first use (about 0.15 s) and the speedups kept in a small file
  (:mod:`lovasz_kernels._machine_choices`).

The two sorts order tied keys differently, so exactly tied errors may swap gradients (the
sums over a group of ties do not change). Under ``torch.use_deterministic_algorithms(True)``
nothing is measured and rows under a grain always get the comparison sort: the same results
on every machine and every run.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Iterator

import torch

from lovasz_kernels._machine_choices import (
    cache_path,
    kept_or_measured,
    kept_or_saved,
    processor_model,
)

#: PyTorch's grain size: from this many values a 1-D integer sort on the CPU is a radix sort
RADIX_SORT_MIN_PIXELS = 32768
#: rows shorter than this fraction of a grain are never padded: 0.25-0.67x at 4096 pixels
#: on every thread count measured
PADDED_RADIX_MIN_FRACTION = 0.25
#: where the lone-row speedup is measured, as fractions of a grain (8192, 12288, 16384 and
#: 24576 pixels); between them it is interpolated, past the last it is the last
MEASURED_FRACTIONS = (0.25, 0.375, 0.5, 0.75)
#: a row is padded only where its measured speedup is at least this (a choice that timing
#: noise could flip is not worth making)
RADIX_MARGIN = 1.1
#: rounds of the measurement: medians of this many extensions per sort and size
MEASURE_ROUNDS = 15
# bumped when the sorts or the measurement change, so that machines measure again
_MEASURE_VERSION = 1

_lock = threading.Lock()
_speedups: dict[int, tuple[float, ...]] = {}  # per thread count, this process
_forced = threading.local()  # the measurement's choice, this thread only


def radix_sorted(rows: torch.Tensor) -> bool:
    """Whether the rows of an (S, P) array of this shape, device and element size are
    radix-sorted (reads no values)."""
    if rows.device.type != "cpu":
        return False
    num_rows, num_pixels = rows.shape
    if num_pixels >= RADIX_SORT_MIN_PIXELS:
        return True
    if num_pixels < PADDED_RADIX_MIN_FRACTION * RADIX_SORT_MIN_PIXELS:
        return False
    if torch.are_deterministic_algorithms_enabled():
        return False
    one_grain = num_rows * num_pixels <= RADIX_SORT_MIN_PIXELS
    if rows.element_size() == 8:
        # int64 keys take more radix passes: padded rows pay only from half the grain, and
        # only within one grain (1.5x at 1 x 16384 on 2 threads, 1.14x on 16; 0.78-0.80x at
        # 8 and 21 x 16384, 0.72-0.88x at 9216: tests/perf/torch_sorts.py --float64); not
        # worth a measurement of its own
        return one_grain and 2 * num_pixels >= RADIX_SORT_MIN_PIXELS
    threads = torch.get_num_threads()
    if not (one_grain or threads == 1):
        return False  # the 2-D sort spreads the rows over threads
    forced = getattr(_forced, "radix", None)
    if forced is not None:
        return forced
    return padded_radix_speedup(num_pixels, threads) >= RADIX_MARGIN


@contextlib.contextmanager
def padding_forced(radix: bool) -> Iterator[None]:
    """Within the block, on this thread, rows that could be padded are (``radix``) or are
    not, whatever was measured (the measurement; tests)."""
    previous = getattr(_forced, "radix", None)
    _forced.radix = radix
    try:
        yield
    finally:
        _forced.radix = previous


def padded_radix_speedup(num_pixels: int, threads: int) -> float:
    """The measured speedup of the padded radix sort on one row of ``num_pixels`` pixels,
    interpolated linearly between :data:`MEASURED_FRACTIONS` of a grain."""
    speedups = padded_radix_speedups(threads)
    fraction = num_pixels / RADIX_SORT_MIN_PIXELS
    points = list(zip(MEASURED_FRACTIONS, speedups))
    if fraction <= points[0][0]:
        return points[0][1]
    for (low, low_speedup), (high, high_speedup) in zip(points, points[1:]):
        if fraction <= high:
            return low_speedup + (high_speedup - low_speedup) * (fraction - low) / (high - low)
    return points[-1][1]


def padded_radix_speedups(threads: int) -> tuple[float, ...]:
    """This machine's speedups at :data:`MEASURED_FRACTIONS` with ``threads`` torch threads:
    from this process, else from :func:`choice_path`, else measured (about 0.15 s)
    and saved there."""
    def measure() -> tuple[tuple[float, ...], dict]:
        speedups, times_ms = measure_padded_radix_speedups()
        return speedups, {"speedups": list(speedups), "times_ms": times_ms}

    return kept_or_measured(_speedups, threads, _lock, choice_path(), _machine_key(threads),
                            _decode_speedups, measure)


def saved_padded_radix_speedups(threads: int) -> tuple[float, ...] | None:
    """This process's speedups with ``threads`` threads, else the ones kept for this machine,
    else None (measures nothing)."""
    return kept_or_saved(_speedups, threads, choice_path(), _machine_key(threads),
                         _decode_speedups)


def measured_padded_radix_speedups() -> dict[int, tuple[float, ...]]:
    """What this process has measured or read, per thread count (measures nothing)."""
    return dict(_speedups)


def forget_padded_radix_speedups() -> None:
    """Drop this process's speedups (tests; the file is read again on next use)."""
    _speedups.clear()


def choice_path() -> str:
    """The file that keeps the speedups (:func:`~lovasz_kernels._machine_choices.cache_path`)."""
    return cache_path("torch-sort-choice.json")


def _machine_key(threads: int) -> str:
    """What the speedups depend on: the processor, torch's sorts, the thread count."""
    return (f"{processor_model()} | torch {torch.__version__} | {threads} threads | "
            f"v{_MEASURE_VERSION}")


def _decode_speedups(entry: dict | None) -> tuple[float, ...] | None:
    try:
        speedups = tuple(float(value) for value in entry["speedups"])
    except (KeyError, TypeError, ValueError):
        return None  # missing, from another machine or version: measure again
    if len(speedups) != len(MEASURED_FRACTIONS) or not all(value > 0 for value in speedups):
        return None
    return speedups


def measure_padded_radix_speedups(rounds: int = MEASURE_ROUNDS) -> tuple[tuple[float, ...],
                                                                         dict[str, float]]:
    """Time the torch backend's extension of one row at each of :data:`MEASURED_FRACTIONS` of
    a grain with the row padded and radix-sorted and with the comparison sort, interleaved,
    new random errors and labels every call (a comparison sort of keys it has just sorted
    runs 2-4x faster, which training never sees), from a generator of its own (the caller's
    random state is left alone). Returns the speedups (median time compared / median time
    padded) and the medians in ms."""
    from lovasz_kernels.backends.torch_eager import lovasz_extension

    generator = torch.Generator().manual_seed(0)
    speedups, times_ms = [], {}
    for fraction in MEASURED_FRACTIONS:
        num_pixels = int(fraction * RADIX_SORT_MIN_PIXELS)
        samples: dict[bool, list[float]] = {False: [], True: []}
        for round_index in range(-1, rounds):  # one untimed round first
            for radix in (round_index % 2 == 0, round_index % 2 != 0):
                # errors in [0, 1): between a softmax's (skewed to 0) and a hinge's
                errors = torch.rand(1, num_pixels, generator=generator)
                fg = torch.rand(1, num_pixels, generator=generator) < 0.3
                with padding_forced(radix):
                    start = time.perf_counter()
                    lovasz_extension(errors, fg)
                    elapsed = time.perf_counter() - start
                if round_index >= 0:
                    samples[radix].append(elapsed)
        compared, radixed = statistics.median(samples[False]), statistics.median(samples[True])
        speedups.append(round(compared / radixed, 3))
        times_ms[f"{num_pixels} compared"] = round(compared * 1e3, 4)
        times_ms[f"{num_pixels} padded"] = round(radixed * 1e3, 4)
    return tuple(speedups), times_ms


def sort_descending(keys: torch.Tensor, keys_sorted: torch.Tensor, order: torch.Tensor,
                    radix: bool | None = None) -> None:
    """Sort each row of the integer ``keys`` (overwritten) in descending order into
    ``keys_sorted`` and ``order`` (its indices), radix-sorted where :func:`radix_sorted`
    says (or ``radix``)."""
    if not (radix_sorted(keys) if radix is None else radix):
        torch.sort(keys, dim=1, descending=True, out=(keys_sorted, order))
        return
    # the complement (-k - 1) reverses the order of every integer, so its ascending,
    # radix-sortable order is the keys' descending one (the key of a clamped -0.0 error,
    # the most negative integer, complements to the largest: last either way)
    keys.bitwise_not_()
    num_pixels = keys.shape[1]
    if num_pixels >= RADIX_SORT_MIN_PIXELS:
        for row in range(keys.shape[0]):
            torch.sort(keys[row], stable=True, out=(keys_sorted[row], order[row]))
    else:
        # padded with the largest integer: the sort is stable, so every pixel, even one
        # whose complemented key is that integer too, comes before the padding
        padded = torch.full((RADIX_SORT_MIN_PIXELS,), torch.iinfo(keys.dtype).max,
                            dtype=keys.dtype, device=keys.device)
        padded_sorted = torch.empty_like(padded)
        padded_order = torch.empty(RADIX_SORT_MIN_PIXELS, dtype=order.dtype, device=keys.device)
        for row in range(keys.shape[0]):
            padded[:num_pixels] = keys[row]
            torch.sort(padded, stable=True, out=(padded_sorted, padded_order))
            keys_sorted[row] = padded_sorted[:num_pixels]
            order[row] = padded_order[:num_pixels]
    keys_sorted.bitwise_not_()
