"""The ``numba`` backend: radix sort of packed keys and one fused pass, on CPU threads.

Each segment is handled in three steps (DESIGN.md §1 and §5):

1. **Pack** every pixel with a positive error into one uint64 key
   ``prefix << 32 | index << 1 | fg`` where ``prefix`` is the top 32 bits of
   ``INF_BITS - bits(error)``: for positive floats the bit pattern is monotone, so ascending
   keys are descending errors, and equal errors keep index order (a stable sort). The index
   sits above the label so that a comparison sort of whole keys gives that same order. Pixels
   with ``error <= 0`` (including ``-inf`` padding) are not packed at all: they sort after
   every positive error and get gradient 0, which is written right away; ``n_fg`` still
   counts them.
2. **Sort the values** (not indices): an LSD radix sort of the prefix in 3 digits of 11 bits,
   whose histograms are counted while packing (no extra read); a digit that is the same for
   every key is skipped (float16 inputs widened to float32 take 2 passes). Small segments use
   a comparison sort instead (keys are unique, so any sort is stable). For float64 the 32-bit
   prefix is not the whole error: runs of equal prefixes are re-sorted on the low 32 bits,
   which makes the order exact.
3. **One fused pass** over the sorted keys: exact integer prefix counts, the closed-form
   Jaccard increments (no cancellation), the loss accumulated in float64 and the gradient
   scattered straight to each pixel's original position (the index in the key).

Parallelism: over segments (each worker owns one row of scratch buffers and visits segments
``w, w + W, ...``), or, when there are fewer segments than threads, *within* a segment:
blocked packing with a prefix over block counts, radix passes with per-block histograms, and a
two-pass blocked scan (fg counts per block, then the fused pass from each block's offset).

This module imports without numba (:func:`availability` then explains how to install it).
"""

from __future__ import annotations

import numpy as np
import torch

from lovasz_kernels.backends._host import errors_to_numpy, fg_to_numpy, results_to_torch

try:
    import numba
    from llvmlite import ir as _llvm_ir
    from numba import njit, prange
    from numba.core import types as _nb_types
    from numba.extending import intrinsic
except ImportError:  # the backend reports itself unavailable; kernels stay plain Python
    numba = None
    prange = range

    def njit(*args, **kwargs):
        if args and callable(args[0]):
            return args[0]
        return lambda function: function

    def intrinsic(function):
        return function


_INSTALL_HINT = "numba is not installed: pip install 'lovasz-kernels[numba]'"

# Segments with at least this many pixels are split across threads when there are fewer
# segments than threads (below it, thread start-up costs more than it saves). Tests lower it.
PARALLEL_MIN_PIXELS = 1 << 16
# Below this many positive errors a comparison sort beats radix passes (2048-bin histograms).
RADIX_MIN_KEYS = 1024
# Up to this many keys, insertion sort.
_INSERTION_MAX = 24
# The index field of a key has 31 bits.
MAX_PIXELS = 1 << 31

# Prefixes of positive floats are < 2^31: three digits of 11 bits (2048 bins, a 16 KiB
# histogram) cover them. A digit that is the same for every key is skipped, so float16 inputs
# (widened: the low 13 bits are 0) take 2 passes and a segment of equal errors takes none.
_NUM_DIGITS = 3
_DIGIT_BITS = 11
_NUM_BINS = 1 << _DIGIT_BITS

# uint64 constants: mixing uint64 with int64 in numba promotes to float64, so every operand
# of key arithmetic is an explicit uint64
_SHIFT_PREFIX = np.uint64(32)
_ONE = np.uint64(1)
_LOW32 = np.uint64(0xFFFFFFFF)
_DIGIT_MASK = np.uint64(_NUM_BINS - 1)
_INF32_BITS = np.uint64(0x7F800000)
_INF64_BITS = np.uint64(0x7FF0000000000000)

# cache=True on every kernel, the prange ones included (numba caches parfor functions): a
# second process loads them in about 2 s instead of compiling for about 30 s.
# fastmath stays off everywhere: the kernels rely on IEEE division and comparisons (-0.0 is not
# positive, -inf padding), and the float64 loss sum is not worth reassociating.


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret a uint32 as the float32 with that bit pattern (a no-op on the CPU)."""
    signature = _nb_types.float32(_nb_types.uint32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _llvm_ir.FloatType())

    return signature, codegen


@njit(inline="always")
def _descending_key(bits_row, i):
    """Key of a positive float: ascending keys are descending errors (float32: < 2^31)."""
    if bits_row.itemsize == 4:
        return _INF32_BITS - np.uint64(bits_row[i])
    return _INF64_BITS - np.uint64(bits_row[i])


@njit(inline="always")
def _packed_key(bits_row, fg_row, i):
    """``prefix << 32 | i << 1 | fg`` for pixel i (its error must be positive)."""
    full_key = _descending_key(bits_row, i)
    prefix = full_key if bits_row.itemsize == 4 else full_key >> _SHIFT_PREFIX
    return (prefix << _SHIFT_PREFIX) | (np.uint64(i) << _ONE) | np.uint64(fg_row[i])


@njit(inline="always")
def _digit(key, digit):
    """Radix digit ``digit`` (0 = least significant) of a key's 32-bit prefix."""
    return (key >> np.uint64(32 + _DIGIT_BITS * digit)) & _DIGIT_MASK


@njit(cache=True)
def _pack_counting(errors_row, bits_row, fg_row, grad_row, keys, histograms):
    """Pack every positive error of a row into keys (index order), count the digits of every
    radix pass into histograms (3, 2048), and give every other pixel its gradient, 0.

    Returns (n_positive, n_fg); n_fg counts all fg pixels, whatever their error.
    """
    n_positive = 0
    n_fg = 0
    for i in range(errors_row.shape[0]):
        if fg_row[i]:
            n_fg += 1
        if errors_row[i] > 0:
            key = _packed_key(bits_row, fg_row, i)
            keys[n_positive] = key
            n_positive += 1
            for digit in range(_NUM_DIGITS):
                histograms[digit, _digit(key, digit)] += 1
        else:
            grad_row[i] = 0
    return n_positive, n_fg


@njit(cache=True)
def _count_block(errors_row, fg_row, start, stop):
    """(pixels with a positive error, fg pixels) in [start, stop)."""
    n_positive = 0
    n_fg = 0
    for i in range(start, stop):
        if fg_row[i]:
            n_fg += 1
        if errors_row[i] > 0:
            n_positive += 1
    return n_positive, n_fg


@njit(cache=True)
def _pack_block(errors_row, bits_row, fg_row, grad_row, keys, start, stop, out):
    """Pack the positive errors of [start, stop) into keys[out:], in index order; every
    other pixel (error <= 0 or -inf padding) gets its gradient, 0, here."""
    for i in range(start, stop):
        if errors_row[i] > 0:
            keys[out] = _packed_key(bits_row, fg_row, i)
            out += 1
        else:
            grad_row[i] = 0
    return out


@njit(cache=True)
def _insertion_sort(keys, start, stop):
    """Sort keys[start:stop] in place (for a handful of keys)."""
    for i in range(start + 1, stop):
        key = keys[i]
        j = i - 1
        while j >= start and keys[j] > key:
            keys[j + 1] = keys[j]
            j -= 1
        keys[j + 1] = key


@njit(cache=True)
def _radix_passes(keys, buffer, n, histograms):
    """Stable LSD radix sort of keys[:n] by their 32-bit prefix, given the digit histograms
    (3, 2048) of keys[:n]; returns the array (keys or buffer) holding the result.

    A pass whose digit is the same for every key is skipped. Keys with equal prefixes keep
    their current (index) order.
    """
    source, target = keys, buffer
    offsets = np.empty(_NUM_BINS, dtype=np.int64)
    for digit in range(_NUM_DIGITS):
        if histograms[digit, _digit(source[0], digit)] == n:
            continue
        running = 0
        for d in range(_NUM_BINS):
            offsets[d] = running
            running += histograms[digit, d]
        for i in range(n):
            key = source[i]
            d = _digit(key, digit)
            target[offsets[d]] = key
            offsets[d] += 1
        source, target = target, source
    return source


@njit(cache=True)
def _radix_sort(keys, buffer, n):
    """Stable LSD radix sort of keys[:n] by prefix (histograms counted in one read)."""
    histograms = np.zeros((_NUM_DIGITS, _NUM_BINS), dtype=np.int64)
    for i in range(n):
        for digit in range(_NUM_DIGITS):
            histograms[digit, _digit(keys[i], digit)] += 1
    return _radix_passes(keys, buffer, n, histograms)


@njit(cache=True)
def _sort_keys(keys, buffer, n, histograms, radix_min):
    """Sort keys[:n] ascending; returns the array (keys or buffer) holding the result."""
    if n <= _INSERTION_MAX:
        _insertion_sort(keys, 0, n)
        return keys
    if n < radix_min:
        keys[:n].sort()  # keys are unique (they hold the index): an unstable sort is stable
        return keys
    return _radix_passes(keys, buffer, n, histograms)


@njit(cache=True)
def _refine_float64_ties(sorted_keys, n, bits_row):
    """Exact order for float64: re-sort each run of equal 32-bit prefixes on the low 32 bits.

    Inside a run, keys become ``low32(descending key) << 32 | index << 1 | fg`` for the sort,
    then get their prefix back, so ties on the whole value still keep index order.
    """
    start = 0
    while start < n:
        prefix = sorted_keys[start] >> _SHIFT_PREFIX
        stop = start + 1
        while stop < n and (sorted_keys[stop] >> _SHIFT_PREFIX) == prefix:
            stop += 1
        if stop - start > 1:
            for k in range(start, stop):
                payload = sorted_keys[k] & _LOW32
                index = np.int64(payload >> _ONE)
                low = _descending_key(bits_row, index) & _LOW32
                sorted_keys[k] = (low << _SHIFT_PREFIX) | payload
            if stop - start <= _INSERTION_MAX:
                _insertion_sort(sorted_keys, start, stop)
            else:
                sorted_keys[start:stop].sort()
            for k in range(start, stop):
                sorted_keys[k] = (prefix << _SHIFT_PREFIX) | (sorted_keys[k] & _LOW32)
        start = stop


@njit(cache=True)
def _fused_pass(sorted_keys, start, stop, n_fg, fg_before, errors_row, grad_row):
    """Jaccard increments of sorted_keys[start:stop], scattered to grad_row; returns the
    float64 loss of that block.

    ``fg_before`` is the number of fg pixels in sorted_keys[:start]. With k the 0-based
    position, c_k the fg pixels among the first k+1 and U_k = n_fg + (k + 1) - c_k, the
    increment is 1/U_k on fg and (n_fg - c_k) / (U_k (U_k - 1)) on background (1 if U_k = 1),
    each from exact integer counts (DESIGN.md §1).
    """
    fg_seen = fg_before
    loss = 0.0
    for k in range(start, stop):
        key = sorted_keys[k]
        index = np.int64((key & _LOW32) >> _ONE)
        is_fg = (key & _ONE) != 0
        if is_fg:
            fg_seen += 1
        union = n_fg + k + 1 - fg_seen
        if is_fg:
            increment = 1.0 / union
        elif union == 1:  # the first pixel, no fg at all: it alone costs the whole loss
            increment = 1.0
        else:
            increment = (n_fg - fg_seen) / (np.float64(union) * (union - 1))
        if errors_row.itemsize == 4:  # float32: the error is in the key, no gather
            error_bits = np.uint32(_INF32_BITS - (key >> _SHIFT_PREFIX))
            error = np.float64(_float32_from_bits(error_bits))
        else:
            error = np.float64(errors_row[index])
        grad_row[index] = increment
        loss += error * increment
    return loss


@njit(cache=True)
def _segment_serial(errors_row, bits_row, fg_row, grad_row, keys, buffer, radix_min):
    """Loss of one segment, its gradient written to grad_row (one thread)."""
    histograms = np.zeros((_NUM_DIGITS, _NUM_BINS), dtype=np.int64)
    n_positive, n_fg = _pack_counting(errors_row, bits_row, fg_row, grad_row, keys, histograms)
    if n_positive == 0:
        return 0.0
    sorted_keys = _sort_keys(keys, buffer, n_positive, histograms, radix_min)
    if bits_row.itemsize == 8:
        _refine_float64_ties(sorted_keys, n_positive, bits_row)
    return _fused_pass(sorted_keys, 0, n_positive, n_fg, 0, errors_row, grad_row)


@njit(parallel=True, cache=True)
def _segments_over_workers(errors, bits, fg, grad, loss, keys, buffers, radix_min):
    """Every segment of (S, P) inputs; worker w (one row of keys/buffers) takes segments
    w, w + W, ... and writes only their rows of grad and entries of loss."""
    num_segments = errors.shape[0]
    num_workers = keys.shape[0]
    for worker in prange(num_workers):
        for s in range(worker, num_segments, num_workers):
            loss[s] = _segment_serial(
                errors[s], bits[s], fg[s], grad[s], keys[worker], buffers[worker], radix_min
            )


@njit(cache=True)
def _block_bounds(length, num_blocks, block):
    """[start, stop) of block ``block`` when ``length`` items are split evenly."""
    size = (length + num_blocks - 1) // num_blocks
    start = min(block * size, length)
    return start, min(start + size, length)


@njit(parallel=True, cache=True)
def _radix_sort_blocked(keys, buffer, n, num_blocks):
    """Parallel stable LSD radix sort of keys[:n] by prefix: per pass, each block counts its
    digits (its own histogram row), a serial scan over (digit, block) gives every block its
    output offsets, and each block scatters its keys. Returns the array holding the result."""
    histograms = np.zeros((num_blocks, _NUM_BINS), dtype=np.int64)
    source, target = keys, buffer
    for digit in range(_NUM_DIGITS):
        for block in prange(num_blocks):
            start, stop = _block_bounds(n, num_blocks, block)
            row = histograms[block]
            row[:] = 0
            for i in range(start, stop):
                row[_digit(source[i], digit)] += 1
        running = 0
        skip = False
        for d in range(_NUM_BINS):
            total = 0
            for block in range(num_blocks):
                count = histograms[block, d]
                histograms[block, d] = running + total
                total += count
            if total == n:  # one digit value for every key: nothing to reorder
                skip = True
                break
            running += total
        if skip:
            continue
        for block in prange(num_blocks):
            start, stop = _block_bounds(n, num_blocks, block)
            offsets = histograms[block]
            for i in range(start, stop):
                key = source[i]
                d = _digit(key, digit)
                target[offsets[d]] = key
                offsets[d] += 1
        source, target = target, source
    return source


@njit(parallel=True, cache=True)
def _segment_blocked(
    errors_row, bits_row, fg_row, grad_row, keys, buffer, num_blocks, radix_min
):
    """Loss of one segment with every step split into ``num_blocks`` parallel blocks."""
    num_pixels = errors_row.shape[0]
    counts = np.zeros((num_blocks, 2), dtype=np.int64)
    for block in prange(num_blocks):
        start, stop = _block_bounds(num_pixels, num_blocks, block)
        block_positive, block_fg = _count_block(errors_row, fg_row, start, stop)
        counts[block, 0] = block_positive
        counts[block, 1] = block_fg
    out_start = np.zeros(num_blocks, dtype=np.int64)
    n_positive = 0
    n_fg = 0
    for block in range(num_blocks):
        out_start[block] = n_positive
        n_positive += counts[block, 0]
        n_fg += counts[block, 1]
    for block in prange(num_blocks):
        start, stop = _block_bounds(num_pixels, num_blocks, block)
        _pack_block(errors_row, bits_row, fg_row, grad_row, keys, start, stop, out_start[block])
    if n_positive == 0:
        return 0.0
    sorted_keys = keys
    if n_positive <= _INSERTION_MAX:
        _insertion_sort(keys, 0, n_positive)
    elif n_positive < radix_min:
        keys[:n_positive].sort()
    else:
        sorted_keys = _radix_sort_blocked(keys, buffer, n_positive, num_blocks)
    if bits_row.itemsize == 8:
        _refine_float64_ties(sorted_keys, n_positive, bits_row)
    # two-pass blocked scan: fg counts per block of the sorted keys, then the fused pass
    fg_per_block = np.zeros(num_blocks, dtype=np.int64)
    for block in prange(num_blocks):
        start, stop = _block_bounds(n_positive, num_blocks, block)
        count = 0
        for k in range(start, stop):
            count += np.int64(sorted_keys[k] & _ONE)
        fg_per_block[block] = count
    fg_before = np.zeros(num_blocks, dtype=np.int64)
    for block in range(1, num_blocks):
        fg_before[block] = fg_before[block - 1] + fg_per_block[block - 1]
    block_loss = np.zeros(num_blocks, dtype=np.float64)
    for block in prange(num_blocks):
        start, stop = _block_bounds(n_positive, num_blocks, block)
        block_loss[block] = _fused_pass(
            sorted_keys, start, stop, n_fg, fg_before[block], errors_row, grad_row
        )
    return block_loss.sum()


def lovasz_extension(errors: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (S,) and gradient (S, P) of the Lovász extension on CPU tensors.

    float16/bfloat16 are widened to float32 (exactly) and float64 stays float64, so the
    kernels compile for two dtypes only. Segments run in parallel; with fewer segments than
    threads and at least ``PARALLEL_MIN_PIXELS`` pixels, each segment is split across threads.
    """
    num_segments, num_pixels = errors.shape
    if num_pixels > MAX_PIXELS:
        raise ValueError(
            f"the numba backend packs pixel indices in 31 bits: segments of at most 2^31 "
            f"pixels; got {num_pixels}. Use backend='torch' for larger segments"
        )
    # bfloat16 is widened in errors_to_numpy; float16 here, by torch (faster than numpy)
    widened = errors.to(torch.float32) if errors.dtype == torch.float16 else errors
    errors_np = np.ascontiguousarray(errors_to_numpy(widened))
    fg_np = np.ascontiguousarray(fg_to_numpy(fg))
    bits = errors_np.view(np.uint32 if errors_np.dtype == np.float32 else np.uint64)
    grad = np.empty(errors_np.shape, dtype=errors_np.dtype)
    loss = np.empty(num_segments, dtype=np.float64)
    threads = numba.get_num_threads()
    if threads > 1 and num_segments < threads and num_pixels >= PARALLEL_MIN_PIXELS:
        keys = np.empty(num_pixels, dtype=np.uint64)
        buffer = np.empty(num_pixels, dtype=np.uint64)
        for s in range(num_segments):
            loss[s] = _segment_blocked(
                errors_np[s], bits[s], fg_np[s], grad[s], keys, buffer, threads, RADIX_MIN_KEYS
            )
    else:
        workers = min(threads, num_segments)
        keys = np.empty((workers, num_pixels), dtype=np.uint64)
        buffers = np.empty((workers, num_pixels), dtype=np.uint64)
        if num_segments == 1:  # no parallel region: no threads to wake for one segment
            loss[0] = _segment_serial(
                errors_np[0], bits[0], fg_np[0], grad[0], keys[0], buffers[0], RADIX_MIN_KEYS
            )
        else:
            _segments_over_workers(
                errors_np, bits, fg_np, grad, loss, keys, buffers, RADIX_MIN_KEYS
            )
    return results_to_torch(loss, grad, errors)


def availability() -> tuple[bool, str]:
    """``(True, "")`` when numba is importable, else ``(False, install hint)``."""
    return (True, "") if numba is not None else (False, _INSTALL_HINT)


def details() -> str:
    """numba version, thread count and threading layer, for ``lovasz-kernels info``."""
    if numba is None:
        return _INSTALL_HINT
    try:
        layer = numba.threading_layer()
    except ValueError:  # chosen on the first parallel launch
        layer = f"{numba.config.THREADING_LAYER} (chosen at first launch)"
    return f"numba {numba.__version__}, {numba.get_num_threads()} threads, threading layer {layer}"


__all__ = ["availability", "details", "lovasz_extension"]
