"""The torch backend's descending sort of integer keys, one row per segment, on the CPU: the
2-D comparison sort, PyTorch's radix sort row by row, or numpy's sort of packed keys; which
one where, measured on this machine.

PyTorch sorts a 1-D integer array of at least its grain size (``RADIX_SORT_MIN_PIXELS``) in
ascending order with a parallel radix sort; a descending or a 2-D sort is a comparison sort.
Rows of a grain or more are radix-sorted one by one (1.2-12x faster alone on every machine
and thread count measured). Shorter rows have two other candidates:

- **padded**: the row padded up to a grain and radix-sorted, which costs about as much as
  sorting a full grain;
- **packed**: each key and its pixel's index packed into one uint64 (the key in the high
  half), the rows sorted by numpy (a SIMD quicksort on x86 with AVX2 or AVX-512 and on
  AArch64), the index and the key read back from the halves. The packed keys are unique, so
  this order is the radix sort's, ties included (by position). One 4096-pixel row, the
  sort alone, new keys every call, on a 2-core AMD EPYC VM: 67 us against 120 for the
  comparison sort. Never under a floor set (``set_chunk_floor``): the packed copy is
  numpy's, outside the budget that sizes the chunks.

The 2-D sort hands the rows to threads in tasks of one grain of values, so rows that fit in
one grain run on one thread (a lone row, a few short ones), as do all rows with one thread.
There either sort may pay; rows it spreads over threads are never padded (the padded sort
alone, time compared / time padded at 8 x 16384 pixels: 0.50-0.73 with 4-16 threads on a
16-core Intel Xeon, 0.78-0.85 with 2; 0.96-1.15 on the AMD VM, where 21 x 16384 gave
1.00-1.16), and packed only where numpy's sort on one thread was measured faster than the
2-D sort on all of them (on the 2-core AMD VM, 1.5-2.1x at 1024-24576 pixels a row; a
machine with many cores should not see that). Each pays only **on machines where it was
measured faster** (:func:`short_row_speedups`): the speedup differs between processors,
thread counts and runs (one 12288-pixel row, padded, the sort alone: 1.44-1.73x on the AMD
VM; 0.72-1.56x on the Intel Xeon from 1 to 16 threads, 0.75x and then 1.47x with 16 threads
on two machines of that kind), and numpy's sort is a SIMD sort only where numpy has one for
the processor. So the extension of one row (what a call pays, not the sort alone) is timed
each way (each sort against the comparison sort in rounds of its own), and the sorts of rows
spread over every thread, once per machine and thread count
on first use (about 0.5 s on the AMD VM), and the speedups kept in a small file
(:mod:`lovasz_kernels._machine_choices`).

The comparison sort orders tied keys differently from the other two, so exactly tied errors
may swap gradients (the sums over a group of ties do not change). Under
``torch.use_deterministic_algorithms(True)`` nothing is measured and rows under a grain always
get the comparison sort: the same results on every machine and every run.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from lovasz_kernels._machine_choices import (
    cache_path,
    kept_or_measured,
    kept_or_saved,
    processor_model,
)
from lovasz_kernels._plan import budget_is_strict

#: the sorts a row can get: the 2-D comparison sort, the radix sort row by row (shorter rows
#: padded to a grain), numpy's sort of packed keys
COMPARED, RADIX, PACKED = "compared", "radix", "packed"
#: the two that are measured against the comparison sort on one row, in the order the file
#: keeps them
MEASURED_METHODS = (RADIX, PACKED)
#: the file's entry for packed keys on rows the 2-D sort spreads over threads
SPREAD_PACKED = "packed over threads"
#: rounds of the rows-over-threads measurement (its calls are many rows each)
SPREAD_MEASURE_ROUNDS = 5
#: PyTorch's grain size: from this many values a 1-D integer sort on the CPU is a radix sort
RADIX_SORT_MIN_PIXELS = 32768
#: rows shorter than this fraction of a grain are never padded: 0.25-0.67x at 4096 pixels
#: on every thread count measured
PADDED_RADIX_MIN_FRACTION = 0.25
#: where the lone-row speedups are measured, as fractions of a grain (1024, 4096, 8192, 12288,
#: 16384 and 24576 pixels); between them they are interpolated, outside them they are the
#: nearest one's
MEASURED_FRACTIONS = (1 / 32, 1 / 8, 0.25, 0.375, 0.5, 0.75)
#: a row gets another sort than the comparison sort only where its measured speedup is at
#: least this (a choice that timing noise could flip is not worth making)
RADIX_MARGIN = 1.1
#: rounds of the measurement: medians of this many extensions per sort and size
MEASURE_ROUNDS = 15
# bumped when the sorts or the measurement change, so that machines measure again
_MEASURE_VERSION = 5

_lock = threading.Lock()
_speedups: dict[int, dict[str, tuple[float, ...]]] = {}  # per thread count, this process
_forced = threading.local()  # the measurement's choice, this thread only


def forced_method() -> str | None:
    """The method :func:`method_forced` imposes on this thread, or None."""
    return getattr(_forced, "method", None)


def sort_method(rows: torch.Tensor) -> str:
    """The sort (:data:`COMPARED`, :data:`RADIX` or :data:`PACKED`) that the rows of an
    (S, P) array of this shape, device and element size get (reads no values); never
    :data:`PACKED` under a floor set (:func:`~lovasz_kernels._plan.budget_is_strict`)."""
    if rows.device.type != "cpu":
        return COMPARED
    num_rows, num_pixels = rows.shape
    if num_pixels >= RADIX_SORT_MIN_PIXELS:
        return RADIX
    if torch.are_deterministic_algorithms_enabled():
        return COMPARED
    one_grain = num_rows * num_pixels <= RADIX_SORT_MIN_PIXELS
    if rows.element_size() == 8:
        # int64 keys take more radix passes, and leave no room to pack an index: padded rows
        # pay only from half the grain, and only within one grain (1.5x at 1 x 16384 on 2
        # threads, 1.14x on 16; 0.78-0.80x at 8 and 21 x 16384, 0.72-0.88x at 9216:
        # tests/perf/torch_sorts.py --float64); not worth a measurement of its own
        return RADIX if one_grain and 2 * num_pixels >= RADIX_SORT_MIN_PIXELS else COMPARED
    threads = torch.get_num_threads()
    spread = not (one_grain or threads == 1)  # the 2-D sort spreads the rows over threads
    forced = forced_method()
    if forced is not None:
        return COMPARED if spread and forced == RADIX else forced
    # under a floor set, only torch's own sorts: numpy's packed copy (8 bytes a key of a
    # group of rows) is outside the budget that sizes the chunks
    may_pack = not budget_is_strict(rows.device)
    if spread:
        # numpy sorts the rows on one thread against the 2-D sort's many: only where that
        # was measured faster (the sorts alone, every thread busy)
        spread_packed = sort_speedup(SPREAD_PACKED, num_pixels, threads)
        return PACKED if may_pack and spread_packed >= RADIX_MARGIN else COMPARED
    packed = sort_speedup(PACKED, num_pixels, threads) if may_pack else 0.0
    padded = (sort_speedup(RADIX, num_pixels, threads)
              if num_pixels >= PADDED_RADIX_MIN_FRACTION * RADIX_SORT_MIN_PIXELS else 0.0)
    best, speedup = (PACKED, packed) if packed >= padded else (RADIX, padded)
    return best if speedup >= RADIX_MARGIN else COMPARED


def holds_buffers(method: str) -> bool:
    """Whether a sort of this method allocates arrays of its own as large as its keys (8
    bytes per pixel: the radix sort's, the packed keys)."""
    return method != COMPARED


@contextlib.contextmanager
def method_forced(method: str) -> Iterator[None]:
    """Within the block, on this thread, rows that have a choice (float32 keys under a grain)
    get ``method``, whatever was measured and however short (rows the 2-D sort spreads over
    threads are never padded) (the measurement; tests)."""
    previous = forced_method()
    _forced.method = method
    try:
        yield
    finally:
        _forced.method = previous


def sort_speedup(name: str, num_pixels: int, threads: int) -> float:
    """The measured speedup ``name`` (one of :data:`MEASURED_METHODS` on one row, or
    :data:`SPREAD_PACKED`) over the comparison sort on rows of ``num_pixels`` pixels,
    interpolated linearly between :data:`MEASURED_FRACTIONS` of a grain (looked up on every
    call: a read of the speedups kept in this process and a little arithmetic)."""
    speedups = short_row_speedups(threads)[name]
    fraction = num_pixels / RADIX_SORT_MIN_PIXELS
    if fraction <= MEASURED_FRACTIONS[0]:
        return speedups[0]
    for index in range(1, len(MEASURED_FRACTIONS)):
        high = MEASURED_FRACTIONS[index]
        if fraction <= high:
            low = MEASURED_FRACTIONS[index - 1]
            low_speedup = speedups[index - 1]
            return low_speedup + (speedups[index] - low_speedup) * (fraction - low) / (high - low)
    return speedups[-1]


def short_row_speedups(threads: int) -> dict[str, tuple[float, ...]]:
    """This machine's speedups of each of :data:`MEASURED_METHODS` at
    :data:`MEASURED_FRACTIONS` with ``threads`` torch threads: from this process, else from
    :func:`choice_path`, else measured (about 0.5 s) and saved there."""
    kept = _speedups.get(threads)  # looked up on every short row: no file path built
    if kept is not None:
        return kept

    def measure() -> tuple[dict[str, tuple[float, ...]], dict]:
        speedups, times_ms = measure_short_row_speedups()
        return speedups, {**{name: list(values) for name, values in speedups.items()},
                          "times_ms": times_ms}

    return kept_or_measured(_speedups, threads, _lock, choice_path(), _machine_key(threads),
                            _decode_speedups, measure,
                            what=f"the torch backend's CPU sorts of short rows ({threads} threads)")


def saved_short_row_speedups(threads: int) -> dict[str, tuple[float, ...]] | None:
    """This process's speedups with ``threads`` threads, else the ones kept for this machine,
    else None (measures nothing)."""
    return kept_or_saved(_speedups, threads, choice_path(), _machine_key(threads),
                         _decode_speedups)


def measured_short_row_speedups() -> dict[int, dict[str, tuple[float, ...]]]:
    """What this process has measured or read, per thread count (measures nothing)."""
    return dict(_speedups)


def forget_short_row_speedups() -> None:
    """Drop this process's speedups (tests; the file is read again on next use)."""
    _speedups.clear()


def choice_path() -> str:
    """The file that keeps the speedups (:func:`~lovasz_kernels._machine_choices.cache_path`)."""
    return cache_path("torch-sort-choice.json")


def _machine_key(threads: int) -> str:
    """What the speedups depend on: the processor, torch's and numpy's sorts, the thread
    count."""
    return (f"{processor_model()} | torch {torch.__version__} | numpy {np.__version__} | "
            f"{threads} threads | v{_MEASURE_VERSION}")


def _decode_speedups(entry: dict | None) -> dict[str, tuple[float, ...]] | None:
    try:
        speedups = {name: tuple(float(value) for value in entry[name])
                    for name in (*MEASURED_METHODS, SPREAD_PACKED)}
    except (KeyError, TypeError, ValueError):
        return None  # missing, from another machine or version: measure again
    for values in speedups.values():
        if len(values) != len(MEASURED_FRACTIONS) or not all(value > 0 for value in values):
            return None
    return speedups


def measure_short_row_speedups(rounds: int = MEASURE_ROUNDS,
                               spread_rounds: int = SPREAD_MEASURE_ROUNDS) -> tuple[
        dict[str, tuple[float, ...]], dict[str, float]]:
    """Time the torch backend's extension of one row at each of :data:`MEASURED_FRACTIONS` of
    a grain with each of :data:`MEASURED_METHODS` (the row padded and radix-sorted, its keys
    packed) against the comparison sort, each pair interleaved in a new order every round and
    in rounds of its own, new random errors and labels every call (a comparison sort of keys
    it has just sorted runs 2-4x faster, which training never sees), from a generator of its
    own (the caller's random state is left alone). Pairs, not one rotation of the three: the
    padded radix sort leaves torch's threads spinning on the core the next call needs, and
    in one rotation the packed sort (numpy, on the calling thread) paid for that (one
    1024-pixel row on a 2-core Intel Xeon VM: 123-137 us in pairs, 166 us in the rotation,
    where the comparison sort took 163 and 177), which kept short rows off it.
    Then, with more than one thread, the packed keys' sort alone against the 2-D sort on
    rows of those lengths that the 2-D sort spreads over every thread (a grain of keys, one
    task, per thread). Returns the speedups of each of :data:`MEASURED_METHODS` and of
    :data:`SPREAD_PACKED` (median time compared / its median time; 1.0 on one thread, where
    no rows are spread) and the medians in ms."""
    from lovasz_kernels.backends.torch_eager import lovasz_extension

    generator = torch.Generator().manual_seed(0)
    speedups: dict[str, list[float]] = {name: [] for name in (*MEASURED_METHODS, SPREAD_PACKED)}
    times_ms = {}
    threads = torch.get_num_threads()
    for fraction in MEASURED_FRACTIONS:
        num_pixels = int(fraction * RADIX_SORT_MIN_PIXELS)
        time_row = functools.partial(_time_one_row, lovasz_extension, num_pixels, generator)
        for method in MEASURED_METHODS:
            medians = _interleaved_medians(time_row, (COMPARED, method), rounds)
            speedups[method].append(round(medians[COMPARED] / medians[method], 3))
            times_ms.update({f"{num_pixels} {method}": round(medians[method] * 1e3, 4),
                             f"{num_pixels} {COMPARED} beside {method}":
                                 round(medians[COMPARED] * 1e3, 4)})
        if threads == 1:
            speedups[SPREAD_PACKED].append(1.0)
            continue
        num_rows = threads * RADIX_SORT_MIN_PIXELS // num_pixels  # a task for every thread
        spread = _interleaved_medians(
            functools.partial(_time_spread_rows, num_rows, num_pixels, generator),
            (COMPARED, PACKED), spread_rounds)
        speedups[SPREAD_PACKED].append(round(spread[COMPARED] / spread[PACKED], 3))
        times_ms.update({f"{num_rows} x {num_pixels} {method}": round(spread[method] * 1e3, 4)
                         for method in (COMPARED, PACKED)})
    return {name: tuple(values) for name, values in speedups.items()}, times_ms


def _time_one_row(extension: Callable, num_pixels: int, generator: torch.Generator,
                  method: str) -> float:
    """Seconds of one extension of one new row, its short rows sorted by ``method``."""
    # errors in [0, 1): between a softmax's (skewed to 0) and a hinge's
    errors = torch.rand(1, num_pixels, generator=generator)
    fg = torch.rand(1, num_pixels, generator=generator) < 0.3
    with method_forced(method):
        start = time.perf_counter()
        extension(errors, fg)
        return time.perf_counter() - start


def _time_spread_rows(num_rows: int, num_pixels: int, generator: torch.Generator,
                      method: str) -> float:
    """Seconds of one sort of new keys (num_rows, num_pixels) by ``method``."""
    keys = torch.rand(num_rows, num_pixels, generator=generator).view(torch.int32)
    keys_sorted = torch.empty_like(keys)
    order = torch.empty(keys.shape, dtype=torch.int64)
    start = time.perf_counter()
    sort_descending(keys, keys_sorted, order, method)
    return time.perf_counter() - start


def _interleaved_medians(timed: Callable[[str], float], methods: tuple[str, ...],
                         rounds: int) -> dict[str, float]:
    """The median of ``timed(method)`` over ``rounds`` rounds for each method, the methods in
    a new order every round, after one untimed round."""
    samples: dict[str, list[float]] = {method: [] for method in methods}
    for round_index in range(-1, rounds):
        shift = round_index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            elapsed = timed(method)
            if round_index >= 0:
                samples[method].append(elapsed)
    return {method: statistics.median(times) for method, times in samples.items()}


def sort_descending(keys: torch.Tensor, keys_sorted: torch.Tensor, order: torch.Tensor,
                    method: str | None = None) -> None:
    """Sort each row of the integer ``keys`` (overwritten) in descending order into
    ``keys_sorted`` and ``order`` (its int64 indices), by ``method`` (by default
    :func:`sort_method`'s)."""
    method = sort_method(keys) if method is None else method
    if method == COMPARED:
        torch.sort(keys, dim=1, descending=True, out=(keys_sorted, order))
    elif method == PACKED:
        _packed_sort_descending(keys, keys_sorted, order)
    else:
        _radix_sort_descending(keys, keys_sorted, order)


def _radix_sort_descending(keys: torch.Tensor, keys_sorted: torch.Tensor,
                           order: torch.Tensor) -> None:
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


# x ^ 0x7FFFFFFF maps the int32 keys, read as uint32, to uint32 values in the reverse order
# (non-negative keys to [0, 2^31), negative ones above), and back
_REVERSE_INT32 = np.uint32(0x7FFFFFFF)
_LOW_HALF = np.uint64(0xFFFFFFFF)
# the packed keys' high halves, as every other uint32 of the array
_HIGH_HALF_INDEX = 1 if sys.byteorder == "little" else 0
#: rows are packed in groups of about this many keys: the packed copy (8 bytes a key) is one
#: group's, not the chunk's (with one thread every row under a grain may be packed)
PACKED_GROUP_KEYS = 1 << 16


def _packed_sort_descending(keys: torch.Tensor, keys_sorted: torch.Tensor,
                            order: torch.Tensor) -> None:
    """int32 keys sorted by numpy as uint64 values: the key, reversed (descending order
    becomes ascending), in the high half and the pixel's index in the low one, a group of
    rows at a time. Unique values, so ties come out by position, as from the stable radix
    sort."""
    packed_sort_descending_arrays(keys.numpy(), keys_sorted.numpy(), order.numpy())


def packed_sort_descending_arrays(keys: np.ndarray, keys_sorted: np.ndarray,
                                  order: np.ndarray) -> None:
    """:func:`_packed_sort_descending` on numpy arrays: int32 ``keys`` (overwritten), int32
    ``keys_sorted`` and int64 ``order``, each (S, P) and contiguous."""
    num_rows, num_pixels = keys.shape
    reversed_keys = keys.view(np.uint32)
    np.bitwise_xor(reversed_keys, _REVERSE_INT32, out=reversed_keys)
    positions = np.arange(num_pixels, dtype=np.uint64)
    order_bits = order.view(np.uint64)
    sorted_bits = keys_sorted.view(np.uint32)
    step = max(1, PACKED_GROUP_KEYS // num_pixels)
    for start in range(0, num_rows, step):
        rows = slice(start, start + step)
        packed = reversed_keys[rows].astype(np.uint64)
        packed <<= np.uint64(32)
        packed |= positions
        packed.sort(axis=1)
        np.bitwise_and(packed, _LOW_HALF, out=order_bits[rows])
        high_halves = packed.view(np.uint32)[:, _HIGH_HALF_INDEX::2]
        np.bitwise_xor(high_halves, _REVERSE_INT32, out=sorted_bits[rows])


def sort_picked_descending(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The int32 ``keys`` (1-D, CPU) at ``positions`` (int64, 1-D, contiguous, each under
    2^32), sorted in descending order, ties by position: returns those keys in that order
    and leaves ``positions`` in it, with no other array. Each position gets its key,
    reversed, in its high half (zero below 2^32), numpy sorts the packed values in place,
    and the halves are read back: the order of :func:`sort_descending`'s packed and radix
    sorts."""
    picked = torch.index_select(keys, 0, positions)
    picked_bits = picked.numpy().view(np.uint32)
    packed = positions.numpy().view(np.uint64)
    high_halves = packed.view(np.uint32)[_HIGH_HALF_INDEX::2]
    np.bitwise_xor(picked_bits, _REVERSE_INT32, out=high_halves)
    packed.sort()
    np.bitwise_xor(high_halves, _REVERSE_INT32, out=picked_bits)
    high_halves[:] = 0
    return picked
