"""The ``numba`` backend: radix sort of packed keys and one fused pass, on CPU threads.

Two entry points share every kernel: :func:`lovasz_extension` on (S, P) errors and fg, and
the fused loss path :func:`lovasz_loss`, which reads the losses' scores (B, C, P) and
labels (B, P) directly, so no (S, P) errors/fg tensors exist and the weighted, signed
gradient is scattered once into (B, C, P). Both describe their input as a
:class:`SegmentBatch` (where each segment's pixels are, how labels make fg and errors); the
first is the case "error = score, fg flag = label". Each segment is handled in three steps
(DESIGN.md §1 and §5):

1. **Pack** every pixel with a positive error into one uint64 key
   ``prefix << 32 | offset << 1 | fg`` where ``prefix`` is the top 32 bits of
   ``INF_BITS - bits(error)``: for positive floats the bit pattern is monotone, so ascending
   keys are descending errors, and equal errors keep pixel order (a stable sort). The offset
   (the pixel's position relative to the segment's first score) sits above the label so that a
   comparison sort of whole keys gives that same order. Pixels with ``error <= 0`` (including
   ``-inf`` padding and ignored pixels) are not packed at all: they sort after every positive
   error and get gradient 0, which is written right away; ``n_fg`` still counts them.
2. **Sort the values** (not indices): an LSD radix sort of the prefix whose digits cover only
   the bits that vary between the segment's keys (softmax errors: 27 bits, three digits of 9
   bits; float16 inputs: 18 bits, two); all histograms are counted in one read. Small
   segments use a comparison sort instead (keys are unique, so any sort is stable). For
   float64 the 32-bit prefix is not the whole error: runs of equal prefixes are re-sorted on
   the low 32 bits, which makes the order exact.
3. **One fused pass** over the sorted keys: exact integer prefix counts, the closed-form
   Jaccard increments (no cancellation), the loss accumulated in float64 and the gradient
   (times the segment's weight and d error / d score) scattered straight to each pixel's
   original position (the offset in the key).

Parallelism: over segments (each worker owns one row of scratch buffers and visits segments
``w, w + W, ...``), or, when there are fewer segments than threads, *within* a segment:
blocked packing with a prefix over block counts, radix passes with per-block histograms, and a
two-pass blocked scan (fg counts per block, then the fused pass from each block's offset).
The last ``S mod W`` segments, which would leave threads idle, also run within-segment when
they are large (21 classes on 2 threads: 10 each, then one split; 3-5% faster than 11 and 10).

This module imports without numba (:func:`availability` then explains how to install it).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from lovasz_kernels._plan import SegmentPlan, generic_lovasz_loss
from lovasz_kernels._scratch import scratch
from lovasz_kernels._validate import compute_dtype as _compute_dtype
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
# Below this many positive errors a comparison sort beats radix passes.
RADIX_MIN_KEYS = 1024
# Up to this many keys, insertion sort.
_INSERTION_MAX = 24
# Pixels per chunk of the packing loop (see _pack_range).
_PACK_CHUNK = 2048
# The index field of a key has 31 bits.
MAX_PIXELS = 1 << 31

# Radix digits cover only the prefix bits that differ between a segment's keys (from the
# OR and AND of the keys, one vectorized read), cut into as few digits of at most 11 bits as
# cover them: softmax errors in (0, 1] vary in about 27 of the 31 bits (3 digits of 9 bits),
# float16 inputs (widened: the low 13 bits are 0) in at most 18 (2 of 9), equal errors in
# none. Measured on the 2-core VM (262k keys of 27 bits, 21 segments on 2 threads): 3 x 9
# bits 2% faster than 2 x 14 (16384-bin histograms; faster on one thread) and 20% faster
# than the fixed 3 x 11 bits over all 31 bits.
_MAX_DIGIT_BITS = 11

# uint64 constants: mixing uint64 with int64 in numba promotes to float64, so every operand
# of key arithmetic is an explicit uint64
_SHIFT_PREFIX = np.uint64(32)
_ONE = np.uint64(1)
_LOW32 = np.uint64(0xFFFFFFFF)
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


@intrinsic
def _bits_of(typingctx, value):
    """Reinterpret a float32 (float64) as the uint32 (uint64) with the same bit pattern."""
    width = value.bitwidth
    signature = (_nb_types.uint32 if width == 32 else _nb_types.uint64)(value)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _llvm_ir.IntType(width))

    return signature, codegen


@njit(inline="always")
def _descending_key(values, error):
    """Key of a positive float: ascending keys are descending errors (float32: < 2^31).

    ``values`` (the segment's input array) only tells the width at compile time.
    """
    if values.itemsize == 4:
        return _INF32_BITS - np.uint64(_bits_of(error))
    return _INF64_BITS - np.uint64(_bits_of(error))


@njit(inline="always")
def _packed_key(values, error, offset, is_fg):
    """``prefix << 32 | offset << 1 | fg`` for a pixel with a positive error."""
    full_key = _descending_key(values, error)
    prefix = full_key if values.itemsize == 4 else full_key >> _SHIFT_PREFIX
    return (prefix << _SHIFT_PREFIX) | (np.uint64(offset) << _ONE) | np.uint64(is_fg)


@njit(inline="always")
def _digit(key, shift, mask):
    """The radix digit of a key at bit ``shift`` (see :func:`_radix_layout`)."""
    return (key >> shift) & mask


@njit(cache=True)
def _radix_layout(key_or, key_and):
    """(lowest bit, bits per digit, number of digits) of the LSD digits of keys whose
    bitwise OR and AND are given: the digits cover exactly the prefix bits that vary."""
    varying = (key_or ^ key_and) >> _SHIFT_PREFIX
    if varying == 0:
        return 32, 1, 0
    low = 0
    while (varying >> np.uint64(low)) & _ONE == 0:
        low += 1
    high = low
    while (varying >> np.uint64(high)) != 0:
        high += 1
    width = high - low
    num_digits = (width + _MAX_DIGIT_BITS - 1) // _MAX_DIGIT_BITS
    return 32 + low, (width + num_digits - 1) // num_digits, num_digits


@njit(inline="always")
def _affine(batch):
    """(slope, intercept) on background and on foreground, as scalars of the scores' dtype.

    Read once per segment into locals: the compiler cannot keep fields behind the gradient
    array in registers across its stores (they might alias).
    """
    affine = batch.affine
    return affine[0, 0], affine[0, 1], affine[1, 0], affine[1, 1]


@njit(inline="always")
def _error_of(score, is_fg, slope_bg, intercept_bg, slope_fg, intercept_fg):
    """``slope * score + intercept`` of the pixel's class. With (1, 0) (:func:`lovasz_extension`)
    it is the score itself; the losses' ``1 - p`` is computed as ``-1 * p + 1``, which IEEE
    rounds exactly like ``1 - p`` (no fused multiply-add: fastmath is off)."""
    if is_fg:
        return slope_fg * score + intercept_fg
    return slope_bg * score + intercept_bg


@njit(inline="always")
def _error_at(batch, s, offset, is_fg):
    """The error of the pixel at ``offset`` (a key's field) of segment s."""
    slope_bg, intercept_bg, slope_fg, intercept_fg = _affine(batch)
    score = batch.values[batch.value_base[s] + offset]
    return _error_of(score, is_fg, slope_bg, intercept_bg, slope_fg, intercept_fg)


@njit(cache=True)
def _key_bits(keys, start, stop):
    """Bitwise OR and AND of keys[start:stop] (a loop the compiler vectorizes)."""
    key_or, key_and = np.uint64(0), ~np.uint64(0)
    for key in keys[start:stop]:  # a view: no negative-index handling, so it vectorizes
        key_or |= key
        key_and &= key
    return key_or, key_and


@njit(inline="always")
def _classify(label, score, rule):
    """(fg, error, sorted) of one pixel under the segment's ``rule`` = (fg label, ignore
    label, has ignore, slope and intercept on background, on fg): it is sorted when valid
    (not ignored) with a positive error."""
    fg_label, ignore_label, has_ignore, slope_bg, intercept_bg, slope_fg, intercept_fg = rule
    valid = not (has_ignore and label == ignore_label)
    is_fg = valid and label == fg_label
    error = _error_of(score, is_fg, slope_bg, intercept_bg, slope_fg, intercept_fg)
    return is_fg, error, valid and error > 0


@njit(inline="always")
def _pack_dense(chunk_labels, chunk_values, chunk_offset, packed, values, rule):
    """Keys of every pixel of a chunk written to packed[0:len], sorted or not: a loop without
    branches that the compiler vectorizes. Returns (pixels sorted, fg pixels); when that is
    not every pixel, the keys written are not usable."""
    kept = 0
    n_fg = 0
    for j in range(chunk_labels.shape[0]):
        is_fg, error, is_sorted = _classify(chunk_labels[j], chunk_values[j], rule)
        n_fg += np.int64(is_fg)
        kept += np.int64(is_sorted)
        packed[j] = _packed_key(values, error, chunk_offset + j, is_fg)
    return kept, n_fg


@njit(inline="always")
def _pack_compact(chunk_labels, chunk_values, chunk_grad, chunk_offset, packed, values, rule,
                  pack):
    """Keys of the sorted pixels of a chunk, packed from packed[0], the others' gradient set
    to 0 (both only with ``pack``). Returns (pixels sorted, fg pixels)."""
    kept = 0
    n_fg = 0
    # the same classification as _classify, written out: through the helper's returned flags
    # this branchy loop ran 1.6x slower (measured on the hinge)
    fg_label, ignore_label, has_ignore, slope_bg, intercept_bg, slope_fg, intercept_fg = rule
    for j in range(chunk_labels.shape[0]):
        label = chunk_labels[j]
        valid = not (has_ignore and label == ignore_label)
        is_fg = valid and label == fg_label
        if is_fg:
            n_fg += 1
        error = _error_of(chunk_values[j], is_fg, slope_bg, intercept_bg, slope_fg, intercept_fg)
        if valid and error > 0:
            if pack:
                packed[kept] = _packed_key(values, error, chunk_offset + j, is_fg)
            kept += 1
        elif pack:
            chunk_grad[j] = 0
    return kept, n_fg


@njit(cache=True)
def _pack_range(batch, s, start, stop, keys, out, pack, try_dense):
    """Walk pixels [start, stop) of segment s (pixel q is row q // num_cols, column
    q % num_cols) and count its fg pixels, whatever their error. A pixel is sorted when it is
    valid (its label is not the ignore label) and its error is positive.

    With ``pack``, every sorted pixel becomes a key in keys[out:] (in pixel order) and every
    other pixel gets its gradient, 0, here. Without ``pack`` nothing is written: the blocked
    path counts first to place each block's keys.

    Packing goes by chunks of ``_PACK_CHUNK`` pixels: with ``try_dense``, a chunk where every
    pixel is sorted (all of a softmax segment, as a rule) is packed by the vectorized
    :func:`_pack_dense` (4x faster); one that is not is packed again by :func:`_pack_compact`,
    and so is the next chunk, directly (the hinge's errors are ≤ 0 in random places: no chunk
    would pass). A failed dense chunk writes up to a chunk of keys past ``out``: only try it
    where that is free space (the serial path; a block known to keep every pixel).

    Returns (out + pixels sorted, fg pixels).
    """
    values, labels, grad = batch.values, batch.labels, batch.grad
    value_base, label_base = batch.value_base[s], batch.label_base[s]
    rule = (batch.fg_label[s], batch.ignore_label, batch.has_ignore) + _affine(batch)
    num_cols = batch.num_cols
    n_fg = 0
    dense = pack and try_dense
    row = start // num_cols
    col_start = start - row * num_cols
    q = start
    while q < stop:  # row by row: no division per pixel
        col_stop = min(num_cols, col_start + (stop - q))
        # views of the row, indexed from 0: the compiler then knows no index is negative
        length = col_stop - col_start
        first_offset = row * batch.value_row_stride + col_start
        first_label = label_base + row * batch.label_row_stride + col_start
        first_value = value_base + first_offset
        row_labels = labels[first_label:first_label + length]
        row_values = values[first_value:first_value + length]
        row_grad = grad[first_value:first_value + length]
        for j0 in range(0, length, _PACK_CHUNK):
            j1 = min(j0 + _PACK_CHUNK, length)
            # chunk views, indexed from 0: no negative-index handling (it stops vectorization)
            chunk_labels = row_labels[j0:j1]
            chunk_values = row_values[j0:j1]
            packed = keys[out:]
            if dense:
                kept, chunk_fg = _pack_dense(
                    chunk_labels, chunk_values, first_offset + j0, packed, values, rule
                )
                if kept == j1 - j0:
                    out += kept
                    n_fg += chunk_fg
                    continue
            kept, chunk_fg = _pack_compact(
                chunk_labels, chunk_values, row_grad[j0:j1], first_offset + j0, packed, values,
                rule, pack,
            )
            out += kept
            n_fg += chunk_fg
            dense = pack and try_dense and kept == j1 - j0
        q += col_stop - col_start
        row += 1
        col_start = 0
    return out, n_fg


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


@njit(cache=True, inline="always")
def _scatter_by_digit(source, target, offsets, start, stop, shift, mask):
    """One stable LSD pass over source[start:stop]; ``offsets`` (per digit) advances in place."""
    for key in source[start:stop]:
        d = _digit(key, shift, mask)
        slot = offsets[d]
        target[np.uint64(slot)] = key  # unsigned: no negative-index handling
        offsets[d] = slot + 1


@njit(cache=True)
def _count_digit(keys, histogram, shift, mask):
    """Add the digit at ``shift`` of every key to ``histogram``."""
    for key in keys:
        histogram[_digit(key, shift, mask)] += 1


@njit(cache=True)
def _scatter_counting_next(source, target, offsets, shift, mask, next_histogram, next_shift):
    """:func:`_scatter_by_digit` over all of ``source``, counting the digit at ``next_shift``
    of every key into ``next_histogram`` on the way."""
    for key in source:
        d = _digit(key, shift, mask)
        slot = offsets[d]
        target[np.uint64(slot)] = key
        offsets[d] = slot + 1
        next_histogram[_digit(key, next_shift, mask)] += 1


@njit(cache=True)
def _radix_sort(keys, buffer, n, key_or, key_and):
    """Stable LSD radix sort of keys[:n] by their 32-bit prefix, whose bitwise OR and AND are
    ``key_or``, ``key_and``; returns the array (keys or buffer) holding the result.

    Each pass counts the next digit's histogram while it moves the keys (the increments
    hide behind the scatter's stores); only the first digit needs a read of its own. A pass
    whose digit is the same for every key is skipped (the next histogram is then counted by
    itself). Keys with equal prefixes keep their current (index) order.
    """
    low, bits, num_digits = _radix_layout(key_or, key_and)
    source, target = keys, buffer
    if num_digits == 0:
        return source
    mask = np.uint64((1 << bits) - 1)
    histograms = np.zeros((num_digits, 1 << bits), dtype=np.int64)
    _count_digit(source[:n], histograms[0], np.uint64(low), mask)
    offsets = np.empty(1 << bits, dtype=np.int64)
    for digit in range(num_digits):
        shift = np.uint64(low + bits * digit)
        next_shift = np.uint64(low + bits * (digit + 1))
        counts_next = digit + 1 < num_digits
        if histograms[digit, _digit(source[0], shift, mask)] == n:
            if counts_next:
                _count_digit(source[:n], histograms[digit + 1], next_shift, mask)
            continue
        running = 0
        for d in range(1 << bits):
            offsets[d] = running
            running += histograms[digit, d]
        if counts_next:
            _scatter_counting_next(
                source[:n], target, offsets, shift, mask, histograms[digit + 1], next_shift
            )
        else:
            _scatter_by_digit(source, target, offsets, 0, n, shift, mask)
        source, target = target, source
    return source


@njit(cache=True)
def _sort_keys(keys, buffer, n, radix_min):
    """Sort keys[:n] ascending; returns the array (keys or buffer) holding the result."""
    if n <= _INSERTION_MAX:
        _insertion_sort(keys, 0, n)
        return keys
    if n < radix_min:
        keys[:n].sort()  # keys are unique (they hold the index): an unstable sort is stable
        return keys
    key_or, key_and = _key_bits(keys, 0, n)
    return _radix_sort(keys, buffer, n, key_or, key_and)


@njit(cache=True)
def _refine_float64_ties(sorted_keys, n, batch, s):
    """Exact order for float64: re-sort each run of equal 32-bit prefixes on the low 32 bits.

    Inside a run, keys become ``low32(descending key) << 32 | offset << 1 | fg`` for the sort,
    then get their prefix back, so ties on the whole value still keep pixel order.
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
                error = _error_at(batch, s, np.int64(payload >> _ONE), (payload & _ONE) != 0)
                low = _descending_key(batch.values, error) & _LOW32
                sorted_keys[k] = (low << _SHIFT_PREFIX) | payload
            if stop - start <= _INSERTION_MAX:
                _insertion_sort(sorted_keys, start, stop)
            else:
                sorted_keys[start:stop].sort()
            for k in range(start, stop):
                sorted_keys[k] = (prefix << _SHIFT_PREFIX) | (sorted_keys[k] & _LOW32)
        start = stop


@njit(cache=True)
def _fused_pass(sorted_keys, start, stop, n_fg, fg_before, batch, s):
    """Jaccard increments of sorted_keys[start:stop], scattered to segment s's gradient;
    returns the float64 loss of that block.

    ``fg_before`` is the number of fg pixels in sorted_keys[:start]. With k the 0-based
    position, c_k the fg pixels among the first k+1 and U_k = n_fg + (k + 1) - c_k, the
    increment is 1/U_k on fg and (n_fg - c_k) / (U_k (U_k - 1)) on background (1 if U_k = 1),
    each from exact integer counts (DESIGN.md §1). The gradient written is
    ``grad_scale[s] * slope * increment`` (d error / d score = slope): the segment's weight
    and sign are folded into the one scatter.
    """
    values, grad, grad_base = batch.values, batch.grad, batch.value_base[s]
    slope_bg, intercept_bg, slope_fg, intercept_fg = _affine(batch)
    scale_fg = batch.grad_scale[s] * slope_fg
    scale_bg = batch.grad_scale[s] * slope_bg
    fg_seen = fg_before
    loss = 0.0
    for k in range(start, stop):
        key = sorted_keys[k]
        offset = np.int64((key & _LOW32) >> _ONE)
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
        if values.itemsize == 4:  # float32: the error is in the key, no gather
            error_bits = np.uint32(_INF32_BITS - (key >> _SHIFT_PREFIX))
            error = np.float64(_float32_from_bits(error_bits))
        else:
            error = np.float64(_error_of(
                values[grad_base + offset], is_fg, slope_bg, intercept_bg, slope_fg,
                intercept_fg,
            ))
        grad[grad_base + offset] = increment * (scale_fg if is_fg else scale_bg)
        loss += error * increment
    return loss


@njit(cache=True)
def _segment_serial(batch, s, keys, buffer, radix_min):
    """Loss of segment s, its gradient written to batch.grad (one thread)."""
    num_pixels = batch.rows * batch.num_cols
    n_positive, n_fg = _pack_range(batch, s, 0, num_pixels, keys, 0, True, True)
    if n_positive == 0:
        return 0.0
    sorted_keys = _sort_keys(keys, buffer, n_positive, radix_min)
    if batch.values.itemsize == 8:
        _refine_float64_ties(sorted_keys, n_positive, batch, s)
    return _fused_pass(sorted_keys, 0, n_positive, n_fg, 0, batch, s)


@njit(parallel=True, cache=True)
def _segments_over_workers(batch, num_segments, loss, keys, buffers, radix_min):
    """Segments [0, num_segments); worker w (one row of keys/buffers) takes segments
    w, w + W, ... and writes only their pixels of grad (segments never share a pixel of the
    gradient) and their entries of loss."""
    num_workers = keys.shape[0]
    for worker in prange(num_workers):
        for s in range(worker, num_segments, num_workers):
            loss[s] = _segment_serial(batch, s, keys[worker], buffers[worker], radix_min)


@njit(cache=True)
def _block_bounds(length, num_blocks, block):
    """[start, stop) of block ``block`` when ``length`` items are split evenly."""
    size = (length + num_blocks - 1) // num_blocks
    start = min(block * size, length)
    return start, min(start + size, length)


@njit(parallel=True, cache=True)
def _radix_sort_blocked(keys, buffer, n, key_or, key_and, num_blocks):
    """Parallel stable LSD radix sort of keys[:n] by prefix: per pass, each block counts its
    digits (its own histogram row), a serial scan over (digit, block) gives every block its
    output offsets, and each block scatters its keys. Returns the array holding the result."""
    low, bits, num_digits = _radix_layout(key_or, key_and)
    mask = np.uint64((1 << bits) - 1)
    histograms = np.zeros((num_blocks, 1 << bits), dtype=np.int64)
    source, target = keys, buffer
    for digit in range(num_digits):
        shift = np.uint64(low + bits * digit)
        for block in prange(num_blocks):
            start, stop = _block_bounds(n, num_blocks, block)
            row = histograms[block]
            row[:] = 0
            for i in range(start, stop):
                row[_digit(source[i], shift, mask)] += 1
        running = 0
        skip = False
        for d in range(1 << bits):
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
            _scatter_by_digit(source, target, histograms[block], start, stop, shift, mask)
        source, target = target, source
    return source


@njit(parallel=True, cache=True)
def _segment_blocked(batch, s, keys, buffer, num_blocks, radix_min):
    """Loss of segment s with every step split into ``num_blocks`` parallel blocks."""
    num_pixels = batch.rows * batch.num_cols
    counts = np.zeros((num_blocks, 2), dtype=np.int64)
    for block in prange(num_blocks):
        start, stop = _block_bounds(num_pixels, num_blocks, block)
        block_positive, block_fg = _pack_range(batch, s, start, stop, keys, 0, False, False)
        counts[block, 0] = block_positive
        counts[block, 1] = block_fg
    out_start = np.zeros(num_blocks, dtype=np.int64)
    n_positive = 0
    n_fg = 0
    for block in range(num_blocks):
        out_start[block] = n_positive
        n_positive += counts[block, 0]
        n_fg += counts[block, 1]
    key_bits = np.empty((num_blocks, 2), dtype=np.uint64)  # OR and AND of each block's keys
    for block in prange(num_blocks):
        start, stop = _block_bounds(num_pixels, num_blocks, block)
        # dense chunks only where the block keeps every pixel: it may not write past its keys
        every_pixel = counts[block, 0] == stop - start
        out_stop, _ = _pack_range(
            batch, s, start, stop, keys, out_start[block], True, every_pixel
        )
        key_bits[block, 0], key_bits[block, 1] = _key_bits(keys, out_start[block], out_stop)
    if n_positive == 0:
        return 0.0
    sorted_keys = keys
    if n_positive <= _INSERTION_MAX:
        _insertion_sort(keys, 0, n_positive)
    elif n_positive < radix_min:
        keys[:n_positive].sort()
    else:
        key_or, key_and = np.uint64(0), ~np.uint64(0)
        for block in range(num_blocks):
            key_or |= key_bits[block, 0]
            key_and &= key_bits[block, 1]
        sorted_keys = _radix_sort_blocked(keys, buffer, n_positive, key_or, key_and, num_blocks)
    if batch.values.itemsize == 8:
        _refine_float64_ties(sorted_keys, n_positive, batch, s)
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
            sorted_keys, start, stop, n_fg, fg_before[block], batch, s
        )
    return block_loss.sum()


# --------------------------------------------------------------------------------------------
# host functions


class SegmentBatch(NamedTuple):
    """Segments as the kernels see them: both entry points describe their input this way.

    Pixel (row, col) of segment s, row < ``rows`` and col < ``num_cols``, has its score at
    ``values[value_base[s] + row * value_row_stride + col]`` and its label at
    ``labels[label_base[s] + row * label_row_stride + col]``. It is ignored when
    ``has_ignore`` and its label is ``ignore_label``, foreground when its label is
    ``fg_label[s]``. Its error is ``slope * score + intercept`` with (slope, intercept) =
    ``affine[is_fg]`` and its gradient ``grad_scale[s] * slope * increment`` goes to ``grad``
    at the score's position. Keys store the offset ``row * value_row_stride + col`` (31 bits).
    """

    values: np.ndarray  # flat float32/float64 scores (or errors)
    labels: np.ndarray  # flat labels (int64) or fg flags (uint8)
    grad: np.ndarray  # flat, the layout of values
    affine: np.ndarray  # (2, 2), dtype of values: [background, fg] x (slope, intercept)
    rows: int
    num_cols: int
    value_row_stride: int
    label_row_stride: int
    ignore_label: int
    has_ignore: bool
    value_base: np.ndarray  # (S,) int64
    label_base: np.ndarray  # (S,) int64
    fg_label: np.ndarray  # (S,) int64
    grad_scale: np.ndarray  # (S,) float64


def _extension_batch(errors: np.ndarray, fg: np.ndarray, grad: np.ndarray) -> SegmentBatch:
    """The (S, P) errors/fg of :func:`lovasz_extension` as a batch: error = score, fg label 1,
    -inf padding (never positive) instead of an ignore label, unit gradient scale."""
    num_segments, num_pixels = errors.shape
    row_starts = np.arange(num_segments, dtype=np.int64) * num_pixels
    return SegmentBatch(
        values=errors.reshape(-1), labels=fg.reshape(-1).view(np.uint8), grad=grad.reshape(-1),
        affine=np.array([[1, 0], [1, 0]], dtype=errors.dtype), rows=1, num_cols=num_pixels,
        value_row_stride=num_pixels, label_row_stride=num_pixels, ignore_label=0,
        has_ignore=False, value_base=row_starts, label_base=row_starts,
        fg_label=np.ones(num_segments, dtype=np.int64),
        grad_scale=np.ones(num_segments, dtype=np.float64),
    )


def _key_scratch(rows: int, num_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys and radix buffers, (rows, num_pixels) uint64 each, reused between calls."""
    both = scratch("numba keys", 2 * rows * num_pixels, np.uint64)
    half = rows * num_pixels
    return both[:half].reshape(rows, num_pixels), both[half:].reshape(rows, num_pixels)


def _run_batch(batch: SegmentBatch, num_segments: int) -> np.ndarray:
    """Per-segment float64 losses (S,); gradients written into ``batch.grad``.

    Segments run in parallel; with fewer segments than threads and at least
    ``PARALLEL_MIN_PIXELS`` pixels, each segment is split across threads.
    """
    num_pixels = batch.rows * batch.num_cols
    loss = np.zeros(num_segments, dtype=np.float64)
    threads = numba.get_num_threads()
    if threads > 1 and num_segments < threads and num_pixels >= PARALLEL_MIN_PIXELS:
        keys, buffers = _key_scratch(1, num_pixels)
        for s in range(num_segments):
            loss[s] = _segment_blocked(batch, s, keys[0], buffers[0], threads, RADIX_MIN_KEYS)
        return loss
    workers = min(threads, num_segments)
    keys, buffers = _key_scratch(workers, num_pixels)
    if num_segments == 1:  # no parallel region: no threads to wake for one segment
        loss[0] = _segment_serial(batch, 0, keys[0], buffers[0], RADIX_MIN_KEYS)
        return loss
    # the last num_segments % workers segments would leave threads idle at the end (21
    # classes on 2 threads: 11 against 10): large ones are split across the threads instead
    leftover = num_segments % workers if num_pixels >= PARALLEL_MIN_PIXELS else 0
    _segments_over_workers(batch, num_segments - leftover, loss, keys, buffers, RADIX_MIN_KEYS)
    for s in range(num_segments - leftover, num_segments):
        loss[s] = _segment_blocked(batch, s, keys[0], buffers[0], threads, RADIX_MIN_KEYS)
    return loss


def _host_floats(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous float32/float64 numpy array (float16/bfloat16 widened exactly)."""
    # bfloat16 is widened in errors_to_numpy; float16 here, by torch (faster than numpy)
    widened = tensor.to(torch.float32) if tensor.dtype == torch.float16 else tensor
    return np.ascontiguousarray(errors_to_numpy(widened))


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
    errors_np = _host_floats(errors)
    fg_np = np.ascontiguousarray(fg_to_numpy(fg))
    grad = np.empty(errors_np.shape, dtype=errors_np.dtype)
    loss = _run_batch(_extension_batch(errors_np, fg_np, grad), num_segments)
    return results_to_torch(loss, grad, errors)


def _narrow_labels(
    labels: torch.Tensor, ignore_index: int | None, num_channels: int
) -> tuple[np.ndarray, int]:
    """Flat labels for the kernels and the ignore label they use.

    Every segment re-reads the labels: with fewer than 255 classes they go as uint8 (8x less
    to read per segment), the ignore label becoming 255. Labels are validated already
    (in [0, max(C, 2)) or the ignore label), so no valid label changes.
    """
    if max(num_channels, 2) < 255:
        if ignore_index is not None:
            labels = labels.masked_fill(labels == ignore_index, 255)
        return np.ascontiguousarray(labels.to(torch.uint8).numpy()).reshape(-1), 255
    ignore_label = 0 if ignore_index is None else ignore_index
    return np.ascontiguousarray(labels.numpy()).reshape(-1), ignore_label


def lovasz_loss(
    scores: torch.Tensor, labels: torch.Tensor, plan: SegmentPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused loss path (see :mod:`lovasz_kernels._plan`): total weighted loss and its
    gradient w.r.t. ``scores`` (B, C, P), keys packed straight from scores and labels.

    A batch segment whose pixel offsets in the (B, C, P) layout do not fit the keys' 31-bit
    field takes the generic path instead.
    """
    batch_size, num_channels, num_pixels = scores.shape
    image_stride = num_channels * num_pixels
    if plan.image is None:  # a segment is one channel of every image
        rows, widest_offset = batch_size, (batch_size - 1) * image_stride + num_pixels
    else:
        rows, widest_offset = 1, num_pixels
    if widest_offset > MAX_PIXELS:
        return generic_lovasz_loss(lovasz_extension, scores, labels, plan)
    values = _host_floats(scores.detach())
    weight = plan.weight.numpy()
    counted = np.flatnonzero(weight > 0)  # a dense plan lists segments that do not count
    if counted.size and num_pixels and batch_size:
        channel = plan.channel.numpy()[counted].astype(np.int64) * num_pixels
        if plan.image is None:
            value_base, label_base = channel, np.zeros(counted.size, dtype=np.int64)
            all_segments = num_channels
        else:
            image = plan.image.numpy()[counted].astype(np.int64)
            value_base, label_base = image * image_stride + channel, image * num_pixels
            all_segments = batch_size * num_channels
        # the kernels write every pixel of every segment (0 where unsorted): when the segments
        # cover every (image, channel), no pixel needs zeroing first
        if np.unique(value_base).size == all_segments:
            grad = np.empty(values.shape, dtype=values.dtype)
        else:
            grad = np.zeros(values.shape, dtype=values.dtype)  # pixels of no segment keep 0
        narrow_labels, ignore_label = _narrow_labels(labels, plan.ignore_index, num_channels)
        batch = SegmentBatch(
            values=values.reshape(-1),
            labels=narrow_labels,
            grad=grad.reshape(-1),
            # errors 1 - s on fg, bg_offset + s on background
            affine=np.array([[1, plan.bg_offset], [-1, 1]], dtype=values.dtype),
            rows=rows, num_cols=num_pixels, value_row_stride=image_stride,
            label_row_stride=num_pixels,
            ignore_label=ignore_label,
            has_ignore=plan.ignore_index is not None,
            value_base=value_base, label_base=label_base,
            fg_label=plan.fg_label.numpy()[counted].astype(np.int64),
            grad_scale=weight[counted].astype(np.float64),
        )
        segment_loss = _run_batch(batch, counted.size)
        total = float(np.dot(segment_loss, batch.grad_scale))
    else:
        grad = np.zeros(values.shape, dtype=values.dtype)
        total = 0.0
    return (
        torch.tensor(total, dtype=torch.float64),
        torch.from_numpy(grad).to(_compute_dtype(scores.dtype)),
    )


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


__all__ = ["availability", "details", "lovasz_extension", "lovasz_loss"]
