"""The numba pieces that the numba backend and the prox kernels share.

- **The import shim.** This module imports without numba: :data:`NUMBA_AVAILABLE` says
  whether the kernels exist, and :func:`njit` / :func:`intrinsic` are then stand-ins that leave
  the functions plain Python (so the modules that use them import and explain what to install).
- **The sort of packed uint64 keys** (unique by construction: each holds its pixel's index,
  and packed in index order).
  Three exact methods that give the same order: an LSD radix sort whose digits cover only the
  bits that vary (:func:`radix_sort_lsd`), an MSD first pass into buckets of cache size then a
  local LSD sort of each bucket (:func:`radix_sort_msd`), and numpy's sort of the keys (SIMD
  where numpy has it; called from the host, it releases the GIL). Which is fastest depends on
  the machine (one 262k-key segment on one thread: numpy's sort 11.7 ms against 1.5 ms for
  the LSD sort on a 2-core AMD EPYC VM, 2.85 ms against 6.0 ms on a 2-core Intel Xeon VM with
  AVX-512), so :func:`sort_choice` measures them once per machine on first use and keeps the
  choice in a small file.
- **The closed-form Jaccard increment** (:func:`jaccard_increment`).
- **The worker threads** (:func:`run_tasks`): kernels are compiled ``nogil`` and run on a small
  pool of Python threads that block, never spin, between calls; the caller takes tasks too,
  and over those of a pool thread that has not started yet. numba's own threading layers
  are not used: the OpenMP one keeps its idle threads spinning for milliseconds after every
  parallel region, which slows whatever torch runs next (and torch's pool does the same to
  it), and the workqueue one aborts when two Python threads launch kernels at once.
- **A notice on stderr** when a kernel compiles (first use on a machine; later processes load
  the compiled kernels from numba's cache).

fastmath stays off everywhere: the kernels rely on IEEE comparisons and divisions.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from lovasz_kernels._machine_choices import (
    cache_path,
    kept_or_measured,
    kept_or_saved,
    processor_model,
)

try:
    import numba
    from llvmlite import ir as _llvm_ir
    from numba.core import cgutils as _cgutils
    from numba.core import event as _numba_event
    from numba.core import types as _nb_types
    from numba.extending import intrinsic

    NUMBA_AVAILABLE = True
    NUMBA_IMPORT_ERROR = ""

    def njit(*args, **options):
        """``numba.njit`` with ``nogil=True``: every kernel may run on the worker threads."""
        options.setdefault("nogil", True)
        return numba.njit(*args, **options)

except ImportError as error:  # kernels stay plain Python; users are told what to install
    numba = None
    NUMBA_AVAILABLE = False
    NUMBA_IMPORT_ERROR = str(error)

    def njit(*args, **options):
        if args and callable(args[0]):
            return args[0]
        return lambda function: function

    def intrinsic(function):
        return function


# --------------------------------------------------------------------------------------------
# bit casts


@intrinsic
def float32_from_bits(typingctx, bits):
    """Reinterpret a uint32 as the float32 with that bit pattern (a no-op on the CPU)."""
    signature = _nb_types.float32(_nb_types.uint32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _llvm_ir.FloatType())

    return signature, codegen


@intrinsic
def bits_of(typingctx, value):
    """Reinterpret a float32 (float64) as the uint32 (uint64) with the same bit pattern."""
    width = value.bitwidth
    signature = (_nb_types.uint32 if width == 32 else _nb_types.uint64)(value)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _llvm_ir.IntType(width))

    return signature, codegen


@intrinsic
def fetch_add(typingctx, counters, index, amount):
    """``counters[index] += amount`` as one atomic operation; returns the value before (int64
    counters). Threads take work from a shared counter this way without the GIL."""
    signature = _nb_types.int64(counters, _nb_types.intp, _nb_types.int64)

    def codegen(context, builder, sig, args):
        array_type = sig.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        pointer = _cgutils.get_item_pointer(context, builder, array_type, array, [args[1]])
        # monotonic: the counter hands out work; what the work writes is published when the
        # threads join
        return builder.atomic_rmw("add", pointer, args[2], "monotonic")

    return signature, codegen


@njit(cache=True)
def take_next(counter, amount):
    """``fetch_add(counter, 0, amount)`` callable from Python: threads that share work between
    kernels take it from the same counter as the kernels do."""
    return fetch_add(counter, 0, amount)


# --------------------------------------------------------------------------------------------
# the closed-form Jaccard increment


@njit(inline="always")
def jaccard_increment(n_fg, fg_seen, bg_seen, is_fg, branch_free=False):
    """Δ_J(first k+1 pixels) − Δ_J(first k) for the pixel at sorted position k.

    ``fg_seen`` and ``bg_seen`` count the foreground and background pixels among the first
    k+1 (this one included), ``n_fg`` every foreground pixel of the segment. With the union
    U = n_fg + bg_seen, the increment is 1/U on foreground and (n_fg − fg_seen)/(U (U − 1)) on
    background (1 when U = 1: the first mistake with no foreground costs the whole loss). Exact
    integer counts, one division: no cancellation of two close Jaccard values.

    ``branch_free`` (the same bits; :func:`labels_unpredictable` says when): no branch on the
    label. Where the labels of the sorted pixels are mixed, a branch on them mispredicts so
    often that it costs more than the rest of a pass over them: the numerator and the second
    factor of the denominator are then picked by integer arithmetic (1 and 1 on foreground,
    n_fg − fg_seen and U − 1 on background), the same operands the branches divide. Where one
    label is rare the branch is taken the same way almost every time and the arithmetic is
    the dearer of the two.
    """
    union = n_fg + bg_seen
    if branch_free:
        fg = np.int64(is_fg)
        second = (union - 1) - fg * (union - 2)
        if second == 0:  # background with U = 1 (only ever the first pixel: predicted)
            return 1.0
        background_numerator = n_fg - fg_seen
        numerator = background_numerator + fg * (1 - background_numerator)
        return np.float64(numerator) / (np.float64(union) * np.float64(second))
    if is_fg:
        return 1.0 / union
    if union == 1:
        return 1.0
    return (n_fg - fg_seen) / (np.float64(union) * (union - 1))


# A pass takes the branch-free increments when the rarer label is at least this fraction of
# its pixels: about where the two cost the same. 2^18 sorted keys, branches against none,
# medians of 41 interleaved rounds on a 2-core Intel Xeon VM (AVX-512), two runs, by the
# fraction of foreground: 1/32 0.76 against 0.86 ms, 1/16 0.81-0.82 against 0.86, 1/12 0.85
# against 0.86, 1/8 0.93 against 0.86, 1/2 1.62-1.65 against 0.86
# (python tests/perf/fused_pass_branches.py)
BRANCH_FREE_MIN_FRACTION = 1 / 12


@njit(inline="always")
def labels_unpredictable(n_fg, n):
    """Whether a pass over ``n`` sorted pixels, ``n_fg`` of them foreground, takes the
    branch-free increments (:data:`BRANCH_FREE_MIN_FRACTION`)."""
    return min(n_fg, n - n_fg) >= BRANCH_FREE_MIN_FRACTION * n


# --------------------------------------------------------------------------------------------
# the sort of packed keys: key = prefix << 32 | payload, sorted by the whole key

SORT_LSD, SORT_MSD, SORT_NUMPY = 0, 1, 2
SORT_NAMES = ("lsd", "msd", "numpy")

# Up to this many keys, insertion sort.
INSERTION_MAX = 24
# From this many keys the radix sort (its digits sized to the keys: see digit_bits_for) beats
# a comparison sort. With new keys every call, as a loss sees them, on the development VM
# (``python tests/perf/few_keys.py``): 32 keys 1.35-1.5 against 1.35-1.4 us, 64 keys
# 1.5-1.7 against 2.4, 128 keys 1.8-2.3 against 4.1, 1023 keys 5.4-7.4 against 36. Keys
# sorted over and over, as first measured, make the comparison sort look 2-4x faster than
# that: the branch predictor learns them.
RADIX_MIN_KEYS = 64
# The widest radix digit: 2048 counters of int64 (16 KB, in L1).
MAX_DIGIT_BITS = 11
# The MSD pass scatters into at most 2^MSD_BITS buckets: 256 write streams keep their cache
# lines in L1 (2048 do not), and buckets of a 2^18-key segment hold ~1k keys (in L2).
MSD_BITS = 8
# Below this many keys the whole LSD sort works in L2: no MSD pass.
MSD_MIN_KEYS = 1 << 14
# Histogram rows for the local sorts: up to 31 varying prefix bits in digits of >= 4 bits.
_MAX_DIGITS = 8

_SHIFT_PREFIX = np.uint64(32)
_ONE = np.uint64(1)


@njit(cache=True)
def insertion_sort(keys, start, stop):
    """Sort keys[start:stop] in place (for a handful of keys)."""
    for i in range(start + 1, stop):
        key = keys[i]
        j = i - 1
        while j >= start and keys[j] > key:
            keys[j + 1] = keys[j]
            j -= 1
        keys[j + 1] = key


@njit(cache=True)
def key_bits(keys, start, stop):
    """Bitwise OR and AND of keys[start:stop] (a loop the compiler vectorizes)."""
    key_or, key_and = np.uint64(0), ~np.uint64(0)
    for key in keys[start:stop]:  # a view: no negative-index handling, so it vectorizes
        key_or |= key
        key_and &= key
    return key_or, key_and


@njit(cache=True)
def varying_prefix_bits(key_or, key_and):
    """[low, high): the key bits of the prefix (bits 32-63) that differ between keys whose
    bitwise OR and AND are given; low == high when none does."""
    varying = (key_or ^ key_and) >> _SHIFT_PREFIX
    if varying == 0:
        return 32, 32
    low = 0
    while (varying >> np.uint64(low)) & _ONE == 0:
        low += 1
    high = low
    while (varying >> np.uint64(high)) != 0:
        high += 1
    return 32 + low, 32 + high


@njit(cache=True)
def digit_bits_for(count):
    """The widest digit worth a pass over ``count`` keys: a 2^b-counter histogram costs about
    2^b steps per pass, so about as many counters as keys (4 to ``MAX_DIGIT_BITS`` bits)."""
    bits = 4
    while bits < MAX_DIGIT_BITS and (2 << bits) <= count:
        bits += 1
    return bits


@njit(cache=True)
def digit_layout(low, high, max_bits):
    """(bits per digit, number of digits): as few digits of at most ``max_bits`` as cover
    key bits [low, high), all of one width (27 bits: three of 9, not 11 + 11 + 5)."""
    width = high - low
    if width <= 0:
        return 1, 0
    num_digits = (width + max_bits - 1) // max_bits
    return (width + num_digits - 1) // num_digits, num_digits


@njit(inline="always")
def digit_of(key, shift, mask):
    """The radix digit of a key at bit ``shift``."""
    return (key >> shift) & mask


@njit(cache=True)
def count_digit(keys, histogram, shift, mask):
    """Add the digit at ``shift`` of every key to ``histogram``."""
    for key in keys:
        histogram[digit_of(key, shift, mask)] += 1


@njit(cache=True)
def scatter_by_digit(source, target, offsets, shift, mask):
    """One stable pass over all of ``source``: each key goes to target[offsets[digit]], and
    that offset advances (``offsets`` is updated in place)."""
    for key in source:
        d = digit_of(key, shift, mask)
        slot = offsets[d]
        target[np.uint64(slot)] = key  # unsigned: no negative-index handling
        offsets[d] = slot + 1


@njit(cache=True)
def _scatter_counting_next(source, target, offsets, shift, mask, next_histogram, next_shift):
    """:func:`scatter_by_digit`, counting the digit at ``next_shift`` of every key into
    ``next_histogram`` on the way (the increments hide behind the scatter's stores)."""
    for key in source:
        d = digit_of(key, shift, mask)
        slot = offsets[d]
        target[np.uint64(slot)] = key
        offsets[d] = slot + 1
        next_histogram[digit_of(key, next_shift, mask)] += 1


@njit(cache=True)
def lsd_passes(source, target, low, bits, num_digits, histograms, offsets):
    """Stable LSD radix passes over all of ``source`` on the digits of ``bits`` bits from key
    bit ``low``; returns the number of passes that moved the keys (odd: the result is in
    ``target``, even: in ``source``).

    ``histograms`` has at least ``num_digits`` rows of ``2^bits`` counters and ``offsets``
    ``2^bits``. Only the first digit's histogram takes a read of its own: each pass counts the
    next one while it moves the keys. A digit that is the same for every key is skipped.
    """
    count = source.shape[0]
    if num_digits == 0 or count < 2:
        return 0
    size = 1 << bits
    mask = np.uint64(size - 1)
    histograms[:num_digits, :size] = 0
    count_digit(source, histograms[0], np.uint64(low), mask)
    moves = 0
    for digit in range(num_digits):
        shift = np.uint64(low + bits * digit)
        next_shift = np.uint64(low + bits * (digit + 1))
        counts_next = digit + 1 < num_digits
        if histograms[digit, digit_of(source[0], shift, mask)] == count:
            if counts_next:
                count_digit(source, histograms[digit + 1], next_shift, mask)
            continue
        running = 0
        for d in range(size):
            offsets[d] = running
            running += histograms[digit, d]
        if counts_next:
            _scatter_counting_next(
                source, target, offsets, shift, mask, histograms[digit + 1], next_shift
            )
        else:
            scatter_by_digit(source, target, offsets, shift, mask)
        source, target = target, source
        moves += 1
    return moves


@njit(cache=True)
def radix_sort_lsd(keys, buffer, n, key_or, key_and):
    """Stable LSD radix sort of keys[:n] by their 32-bit prefix, whose bitwise OR and AND are
    ``key_or``, ``key_and``, with ``buffer`` (as long) as scratch; returns the array (keys or
    buffer) holding the result. Digits of at most :func:`digit_bits_for` ``n`` bits (11 from
    2048 keys on) cover the varying bits; keys with equal prefixes keep their order (the
    payload's)."""
    low, high = varying_prefix_bits(key_or, key_and)
    bits, num_digits = digit_layout(low, high, digit_bits_for(n))
    histograms = np.empty((max(num_digits, 1), 1 << bits), dtype=np.int64)
    offsets = np.empty(1 << bits, dtype=np.int64)
    moves = lsd_passes(keys[:n], buffer[:n], low, bits, num_digits, histograms, offsets)
    return buffer if moves % 2 else keys


@njit(cache=True)
def msd_digit(low, high, n):
    """(shift, bits) of the MSD digit of ``n`` keys whose prefix varies in key bits
    [low, high): the top ``MSD_BITS`` of them (fewer when fewer vary)."""
    bits = min(high - low, MSD_BITS)
    return high - bits, bits


@njit(cache=True)
def sort_buckets(keys, scratch, bucket_start, first, stop, histograms, offsets):
    """Sort in place each bucket keys[bucket_start[d]:bucket_start[d + 1]], d in [first, stop),
    whose keys share every bit above the bits that vary within it (they came from one MSD
    digit): insertion sort for a handful of keys, else LSD passes on the bucket's own varying
    bits with digits sized to the bucket (``scratch``, as long as keys, is the buffer)."""
    for d in range(first, stop):
        start, end = bucket_start[d], bucket_start[d + 1]
        count = end - start
        if count <= 1:
            continue
        if count <= INSERTION_MAX:
            insertion_sort(keys, start, end)
            continue
        bucket_or, bucket_and = key_bits(keys, start, end)
        low, high = varying_prefix_bits(bucket_or, bucket_and)
        bits, num_digits = digit_layout(low, high, digit_bits_for(count))
        moves = lsd_passes(keys[start:end], scratch[start:end], low, bits, num_digits,
                           histograms, offsets)
        if moves % 2:
            keys[start:end] = scratch[start:end]


@njit(cache=True)
def local_sort_scratch():
    """(histograms, offsets) for :func:`sort_buckets`."""
    return (np.empty((_MAX_DIGITS, 1 << MAX_DIGIT_BITS), dtype=np.int64),
            np.empty(1 << MAX_DIGIT_BITS, dtype=np.int64))


@njit(cache=True)
def bucket_starts(histogram, bucket_start):
    """bucket_start[d] = keys in buckets below d, for d in [0, len(histogram)]."""
    running = 0
    for d in range(histogram.shape[0]):
        bucket_start[d] = running
        running += histogram[d]
    bucket_start[histogram.shape[0]] = running


@njit(cache=True)
def radix_sort_msd(keys, buffer, n, key_or, key_and):
    """Sort keys[:n] like :func:`radix_sort_lsd` (same order, same arguments), by one MSD pass
    on the top varying bits into ``buffer`` followed by a local LSD sort of each bucket, which
    fits in cache; returns the array holding the result. When one digit covers the varying
    bits, that is the LSD sort's one pass."""
    low, high = varying_prefix_bits(key_or, key_and)
    if high - low <= MAX_DIGIT_BITS:
        return radix_sort_lsd(keys, buffer, n, key_or, key_and)
    shift, bits = msd_digit(low, high, n)
    mask = np.uint64((1 << bits) - 1)
    histogram = np.zeros(1 << bits, dtype=np.int64)
    count_digit(keys[:n], histogram, np.uint64(shift), mask)
    starts = np.empty((1 << bits) + 1, dtype=np.int64)
    bucket_starts(histogram, starts)
    offsets = starts[:-1].copy()
    scatter_by_digit(keys[:n], buffer, offsets, np.uint64(shift), mask)
    histograms, local_offsets = local_sort_scratch()
    sort_buckets(buffer, keys, starts, 0, 1 << bits, histograms, local_offsets)
    return buffer


@njit(cache=True)
def sort_keys(keys, buffer, n, radix_min, method):
    """Sort keys[:n] ascending; returns the array (keys or buffer) holding the result.

    Keys come as packed, in ascending order of their low 32 bits (the pixel's index): the
    radix sorts order the prefix stably, which then sorts whole keys, as a comparison sort
    does, so every method gives the one order. ``method``: SORT_LSD or SORT_MSD (from
    ``MSD_MIN_KEYS`` keys on: fewer fit in L2 as they are) for ``radix_min`` keys or more;
    fewer take a comparison sort (insertion sort for a handful)."""
    if n <= INSERTION_MAX:
        insertion_sort(keys, 0, n)
        return keys
    if n < radix_min:
        keys[:n].sort()
        return keys
    key_or, key_and = key_bits(keys, 0, n)
    if method == SORT_MSD and n >= MSD_MIN_KEYS:
        return radix_sort_msd(keys, buffer, n, key_or, key_and)
    return radix_sort_lsd(keys, buffer, n, key_or, key_and)


# --------------------------------------------------------------------------------------------
# which sort: measured once per machine


class SortChoice(NamedTuple):
    """The fastest sort here: ``host`` for a caller that can call numpy's sort (one of
    SORT_LSD, SORT_MSD, SORT_NUMPY), ``kernel`` inside a kernel (SORT_LSD or SORT_MSD)."""

    host: int
    kernel: int
    times_ms: dict[str, float]


# keys per measurement: one 512² segment (2 MB of keys, past L2 as the real ones are)
CALIBRATION_KEYS = 1 << 18
# another sort replaces the LSD sort when it takes at most 1 / CHALLENGER_MARGIN of its time
CHALLENGER_MARGIN = 1.1
# bumped when a sort or the measurement changes, so that machines measure again
_CALIBRATION_VERSION = 2
_choice_lock = threading.Lock()
_choice: dict[str, SortChoice] = {}


def calibration_keys(count: int, seed: int = 0) -> np.ndarray:
    """Packed keys of ``count`` softmax-like errors, as the backend packs them: the float32
    error prefix (27 varying bits, skewed exponents), then the pixel index and the label, in
    pixel order."""
    rng = np.random.default_rng(seed)
    # lognormal around 0.05, like a background probability among 21 classes
    errors = np.exp(rng.standard_normal(count, dtype=np.float32) - np.float32(3.0))
    errors = np.minimum(errors, np.float32(1.0))
    prefix = np.uint64(0x7F800000) - errors.view(np.uint32).astype(np.uint64)
    payload = (np.arange(count, dtype=np.uint64) << _ONE) | rng.integers(
        0, 2, count, dtype=np.uint64)
    return (prefix << _SHIFT_PREFIX) | payload


def _sort_copy(method: int, keys: np.ndarray, work: np.ndarray, buffer: np.ndarray) -> None:
    work[:] = keys
    if method == SORT_NUMPY:
        work.sort()  # releases the GIL
    else:
        sort_keys(work, buffer, keys.size, 0, method)


def _time_sorts(keys: np.ndarray, rounds: int, threads: int) -> dict[str, float]:
    """Best time in ms of each method sorting ``threads`` copies of ``keys`` at once (as the
    loss sorts its segments, one per thread: memory bandwidth and the shared cache are part
    of the measure), methods interleaved round by round."""
    copies = [(np.empty_like(keys), np.empty_like(keys)) for _ in range(threads)]
    best = {name: float("inf") for name in SORT_NAMES}
    for _ in range(rounds):
        for method, name in enumerate(SORT_NAMES):
            start = time.perf_counter()
            run_tasks(_sort_copy, [(method, keys, work, buffer) for work, buffer in copies])
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


def _machine_key() -> str:
    """What the choice depends on: the processor, numpy's sort and the kernels."""
    numba_version = numba.__version__ if numba is not None else "none"
    return (f"{processor_model()} | numpy {np.__version__} | numba {numba_version} | "
            f"sorts v{_CALIBRATION_VERSION}")


def choice_path() -> str:
    """The file that keeps the measured choice (:func:`~lovasz_kernels._machine_choices.
    cache_path`)."""
    return cache_path("sort-choice.json")


def _decode_choice(entry: dict | None) -> SortChoice | None:
    try:
        host, kernel = SORT_NAMES.index(entry["host"]), SORT_NAMES.index(entry["kernel"])
        times_ms = dict(entry.get("times_ms", {}))
    except (ValueError, KeyError, TypeError):
        return None  # missing, from another machine or version: measure again
    if kernel == SORT_NUMPY:
        return None
    return SortChoice(host, kernel, times_ms)


def _encode_choice(choice: SortChoice) -> dict:
    return {"host": SORT_NAMES[choice.host], "kernel": SORT_NAMES[choice.kernel],
            "times_ms": choice.times_ms}


def choose_sorts(times_ms: dict[str, float]) -> tuple[int, int]:
    """(host, kernel) methods from measured times: the LSD sort, the one measured on the most
    machines, unless the MSD sort takes at most 1 / ``CHALLENGER_MARGIN`` of its time; numpy's
    sort for the host when it beats that choice by the same margin (a choice that timing
    noise could flip is not worth making)."""
    kernel = SORT_LSD
    if times_ms["msd"] * CHALLENGER_MARGIN < times_ms["lsd"]:
        kernel = SORT_MSD
    host = kernel
    if times_ms["numpy"] * CHALLENGER_MARGIN < times_ms[SORT_NAMES[kernel]]:
        host = SORT_NUMPY
    return host, kernel


def measure_sorts(rounds: int = 5) -> SortChoice:
    """Time the three sorts on :func:`calibration_keys` (best of ``rounds`` interleaved, on
    every thread at once) and choose (:func:`choose_sorts`)."""
    keys = calibration_keys(CALIBRATION_KEYS)
    threads = thread_count()
    _time_sorts(keys[:4096], 1, threads)  # compile or load every variant before timing
    times = _time_sorts(keys, rounds, threads)
    host, kernel = choose_sorts(times)
    return SortChoice(host, kernel, {name: round(ms, 3) for name, ms in times.items()})


def sort_choice() -> SortChoice:
    """The sort this machine runs fastest: read from :func:`choice_path`, or measured (about
    0.1 s) on first use and saved there. Results never depend on it: every method gives the
    one order of the unique keys."""
    def measure() -> tuple[SortChoice, dict]:
        choice = measure_sorts()
        return choice, _encode_choice(choice)

    return kept_or_measured(_choice, "choice", _choice_lock, choice_path(), _machine_key(),
                            _decode_choice, measure, what="numba's sorts of packed keys")


def measured_sort_choice() -> SortChoice | None:
    """This process's choice, else the one kept for this machine, else None (measures
    nothing)."""
    return kept_or_saved(_choice, "choice", choice_path(), _machine_key(), _decode_choice)


def forget_sort_choice() -> None:
    """Drop this process's choice (tests; the file is read again on next use)."""
    _choice.clear()


# --------------------------------------------------------------------------------------------
# worker threads

_pool_lock = threading.Lock()
_pool: dict[str, object] = {"executor": None, "size": 0}


def thread_count() -> int:
    """Threads the kernels use: ``NUMBA_NUM_THREADS`` (default: the CPUs this process may
    run on)."""
    if numba is None:
        return 1
    return max(1, int(numba.config.NUMBA_NUM_THREADS))


def _executor(size: int) -> ThreadPoolExecutor:
    """A pool of at least ``size`` idle threads (blocked on a queue while idle)."""
    with _pool_lock:
        if _pool["executor"] is None or _pool["size"] < size:
            # a smaller pool is dropped, not shut down: a caller may still be submitting to
            # it; its threads end once nothing refers to it
            _pool["executor"] = ThreadPoolExecutor(size, thread_name_prefix="lovasz_kernels")
            _pool["size"] = size
        return _pool["executor"]


def _forget_pool_in_child() -> None:
    # a forked child has the pool object but none of its threads (and a lock may have been
    # held by one): start afresh on demand
    global _pool_lock, _choice_lock
    _pool["executor"] = None
    _pool["size"] = 0
    _pool_lock = threading.Lock()
    _choice_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


class _TaskList:
    """One :func:`run_tasks` call's tasks, each taken by whichever thread asks first.

    The caller takes tasks too, so a pool thread that the OS has not scheduled yet (its core
    busy with another process, or with torch's OpenMP threads, which spin for milliseconds
    after every parallel torch op) delays nothing: the caller runs its task as well, and the
    late thread, once it runs, finds nothing left and returns without touching the arrays.
    """

    def __init__(self, function: Callable[..., object], tasks: Sequence[tuple]):
        self.function = function
        self.tasks = tasks
        self.results: list = [None] * len(tasks)
        self.errors: list[BaseException | None] = [None] * len(tasks)
        self._lock = threading.Lock()
        self._taken = 0
        self._ended = 0
        self._all_ended = threading.Event()

    def _take(self) -> int | None:
        with self._lock:
            if self._taken == len(self.tasks):
                return None
            self._taken += 1
            return self._taken - 1

    def run_untaken(self) -> None:
        """Run tasks not yet taken by another thread until none is left."""
        while (index := self._take()) is not None:
            try:
                self.results[index] = self.function(*self.tasks[index])
            except BaseException as error:  # re-raised by the caller, once every task ended
                self.errors[index] = error
            with self._lock:
                self._ended += 1
                if self._ended == len(self.tasks):
                    self._all_ended.set()

    def wait(self) -> None:
        """Until every task has ended (tasks taken by other threads may still be running)."""
        self._all_ended.wait()


def run_tasks(function: Callable[..., object], tasks: Sequence[tuple]) -> list:
    """``[function(*args) for args in tasks]``, the tasks run at once on up to
    :func:`thread_count` threads: the calling thread and pool threads each take the next task
    not yet taken until none is left. Returns the results in order; once every task has
    ended, re-raises the exception of the first task (in order) that raised.

    Any thread may run any task, and one thread may run several one after another, so tasks
    must not wait for each other. ``function`` must not call :func:`run_tasks` itself (pool
    threads never wait on the pool). Any Python thread may call this, several at once: their
    tasks share the pool's threads (and a caller whose helpers are busy runs its tasks itself).
    """
    if len(tasks) == 1:
        return [function(*tasks[0])]
    work = _TaskList(function, tasks)
    helpers = min(len(tasks), thread_count()) - 1
    if helpers:
        executor = _executor(helpers)
        for _ in range(helpers):
            executor.submit(work.run_untaken)
    work.run_untaken()
    work.wait()
    for error in work.errors:
        if error is not None:
            raise error
    return work.results


# --------------------------------------------------------------------------------------------
# compile notice

COMPILE_NOTICE = ("lovasz_kernels: compiling the numba kernels (first use on this machine, "
                  "about {seconds} s; cached for later runs)")
#: the cold start measured on the 2-core development VM with a fresh NUMBA_CACHE_DIR: 16 s for
#: the first float32 loss call (sort measurement included), 8 s more for float64, 10 s for the
#: prox; a later process loads them in about 2 s
COLD_START_SECONDS = 20
_notice = {"shown": False}


if NUMBA_AVAILABLE:

    class _CompileNotice(_numba_event.Listener):
        """Says once per process, on stderr, that this package's kernels are compiling: numba
        signals a compilation only when its cache has no copy for this machine."""

        def on_start(self, event):
            dispatcher = event.data.get("dispatcher") if event.data else None
            module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
            if module.startswith("lovasz_kernels.") and not _notice["shown"]:
                _notice["shown"] = True
                print(COMPILE_NOTICE.format(seconds=COLD_START_SECONDS), file=sys.stderr,
                      flush=True)

        def on_end(self, event):
            pass

    _numba_event.register("numba:compile", _CompileNotice())


__all__ = [
    "NUMBA_AVAILABLE",
    "NUMBA_IMPORT_ERROR",
    "SORT_LSD",
    "SORT_MSD",
    "SORT_NUMPY",
    "SortChoice",
    "bits_of",
    "fetch_add",
    "float32_from_bits",
    "intrinsic",
    "jaccard_increment",
    "labels_unpredictable",
    "njit",
    "run_tasks",
    "sort_choice",
    "sort_keys",
    "take_next",
    "thread_count",
]
