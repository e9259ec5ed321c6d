"""The ``numba`` backend: radix sort of packed keys and one fused pass, on CPU threads.

Two entry points share every kernel: :func:`lovasz_extension` on (S, P) errors and fg, and
the fused loss path :func:`lovasz_loss`, which reads the losses' scores (B, C, P) and
labels (B, P) directly, so no (S, P) errors/fg tensors exist and the weighted, signed
gradient is scattered once into (B, C, P). Both describe their input as a
:class:`SegmentBatch` (where each segment's pixels are, how labels make fg and errors); the
first is the case "error = score, fg flag = label". Each segment is handled in three steps
(docs/design.md §1 and the performance model):

1. **Pack** every pixel with a positive error into one uint64 key
   ``prefix << 32 | offset << 1 | fg`` where ``prefix`` is the top 32 bits of
   ``INF_BITS - bits(error)``: for positive floats the bit pattern is monotone, so ascending
   keys are descending errors, and equal errors keep pixel order (a stable sort). The offset
   (the pixel's position relative to the segment's first score) sits above the label so that a
   comparison sort of whole keys gives that same order. Pixels with ``error <= 0`` (including
   ``-inf`` padding and ignored pixels) are not packed at all: they sort after every positive
   error and get gradient 0, which is written right away; ``n_fg`` still counts them.
   Where every fg pixel has a key, the background pixels that sort after the last of them
   need no order either (every increment there is 0): a segment sorted whole on one thread
   leaves them out of its sort where they are enough to pay (:func:`_drop_settled_tail`).
2. **Sort the values** (not indices) with the sort this machine runs fastest
   (:func:`lovasz_kernels._numba_core.sort_choice`, measured once): an LSD radix sort whose
   digits cover only the prefix bits that vary (softmax errors: 27 bits, three digits of 9
   bits), an MSD pass into cache-sized buckets then a local radix sort of each, or numpy's
   sort. Keys are unique, so every method gives the same order. Segments of fewer than
   ``RADIX_MIN_KEYS`` (64) positive errors use a comparison sort, and a radix sort of fewer
   than 2048 keys uses narrower digits (``_numba_core.digit_bits_for``). For float64 the
   32-bit prefix is not the whole error: runs of equal prefixes are re-sorted on the low 32
   bits, which makes the order exact.
3. **One fused pass** over the sorted keys: exact integer prefix counts, the closed-form
   Jaccard increments (no cancellation), the loss accumulated in float64 and the gradient
   (times the segment's weight and d error / d score) scattered straight to each pixel's
   original position (the offset in the key).

Parallelism: the kernels release the GIL and run on the worker threads of
:func:`lovasz_kernels._numba_core.run_tasks` (threads that block when idle: no spinning
against torch's thread pool; the calling thread works too, and takes over the tasks of a
worker that starts late). Over segments, each thread takes the next chunk of segments
until none is left (a thread slowed by other work on the machine takes fewer), with its own
scratch. Segments that would leave threads idle (fewer segments than threads, or the last
``S mod W``) can run *within* a segment instead, one after another, in ``BLOCKS_PER_THREAD``
blocks per thread: each block of pixels is packed, an MSD pass scatters every block's keys by
their top digit, and each range of whole buckets is sorted and gets the fused pass from its
range's fg offset. That is four pool rounds per segment, each a wait for the slowest thread,
and one more pass over the keys: it pays for large segments on machines whose threads scale,
so it is taken only where the times measured on this machine, with this many threads, say it
pays (:func:`_split_pays`; on the 2-core development VM a lone hinge image of 256² took 1.5x
as long split, one of 1024² 0.7x).

This module imports without numba (:func:`availability` then explains how to install it).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import NamedTuple

import numpy as np
import torch

from lovasz_kernels import _numba_core as core
from lovasz_kernels import _validate
from lovasz_kernels._machine_choices import (
    cache_path,
    kept_or_measured,
    kept_or_saved,
    processor_model,
)
from lovasz_kernels._numba_core import (
    INSERTION_MAX,
    RADIX_MIN_KEYS,
    SORT_LSD,
    SORT_NUMPY,
    bits_of,
    fetch_add,
    float32_from_bits,
    insertion_sort,
    jaccard_increment,
    key_bits,
    labels_unpredictable,
    njit,
    sort_keys,
)
from lovasz_kernels._plan import (
    LabelCensus,
    SegmentPlan,
    budget_is_strict,
    call_budget_bytes,
    chunk_allowance_bytes,
    chunk_floor_bytes,
    generic_lovasz_loss,
)
from lovasz_kernels._scratch import output, scratch
from lovasz_kernels._validate import compute_dtype as _compute_dtype
from lovasz_kernels.backends._host import errors_to_numpy, fg_to_numpy, results_to_torch

_INSTALL_HINT = ("numba is not installed: pip install numba "
                 "(from a clone: pip install -e '.[numba]')")

# Calls with fewer pixels in all run on the calling thread alone (below it, waking threads
# costs more than it saves). Tests lower it.
PARALLEL_MIN_PIXELS = 1 << 16
# Segments under this many pixels are never split across threads (splitting costs four pool
# rounds, each a wait for the slowest thread: 1.5-2.3x the serial time at 64k pixels on 2
# threads of the development VM); larger ones where that was measured to pay (_split_pays).
SPLIT_MIN_PIXELS = 1 << 17
# Segments of at least this many pixels use the sort measured fastest on this machine (which
# may be numpy's, called from the host); smaller ones the LSD radix sort in the kernel.
SORT_CHOICE_MIN_PIXELS = 1 << 16
# Over segments, a thread takes chunks of segments of about this many pixels in all (fewer
# when that would leave fewer than four chunks per thread).
CHUNK_PIXELS = 1 << 17
# A segment split across threads is cut into this many blocks per thread, taken by whichever
# thread is free: a thread that starts late (its core busy) leaves less work undone.
BLOCKS_PER_THREAD = 2
# Labels narrowed to uint8 and counted by several threads from this many on.
NARROW_SPLIT_LABELS = 1 << 20
# The count of labels (see _count_narrowed): a pass per class up to this many classes, else
# this many counters per label
_CENSUS_PASS_MAX_BINS = 3
_CENSUS_TALLIES = 4
# The scores' value checks (check_scores): tasks of about this many values (1 MB of float32),
# taken by whichever thread is free (a thread whose core torch's spinning thread holds takes
# fewer), and the simplex's sums taken over blocks of this many pixels (float64 sums of 4096
# pixels, 32 KB, stay in L1 while every channel of the block adds to them)
_CHECK_TASK_VALUES = 1 << 18
_CHECK_BLOCK_PIXELS = 4096
# Calls of more values are left to the shared checks (see check_scores).
_CHECK_MOST_VALUES = 1 << 22
# A segment's settled tail (_drop_settled_tail) is left out of its sort from this fraction of
# its keys.
SETTLED_TAIL_MIN_FRACTION = 1 / 8
# Pixels per chunk of the packing loop (see _pack_range).
_PACK_CHUNK = 2048
# The index field of a key has 31 bits.
MAX_PIXELS = 1 << 31

# uint64 constants: mixing uint64 with int64 in numba promotes to float64, so every operand
# of key arithmetic is an explicit uint64
_SHIFT_PREFIX = np.uint64(32)
_ONE = np.uint64(1)
_LOW32 = np.uint64(0xFFFFFFFF)
_INF32_BITS = np.uint64(0x7F800000)
_INF64_BITS = np.uint64(0x7FF0000000000000)

# cache=True on every kernel: a second process loads them instead of compiling. fastmath stays
# off everywhere: the kernels rely on IEEE division and comparisons (-0.0 is not positive, -inf
# padding), and the float64 loss sum is not worth reassociating.


@njit(inline="always")
def _descending_key(values, error):
    """Key of a positive float: ascending keys are descending errors (float32: < 2^31).

    ``values`` (the segment's input array) only tells the width at compile time.
    """
    if values.itemsize == 4:
        return _INF32_BITS - np.uint64(bits_of(error))
    return _INF64_BITS - np.uint64(bits_of(error))


@njit(inline="always")
def _packed_key(values, error, offset, is_fg):
    """``prefix << 32 | offset << 1 | fg`` for a pixel with a positive error (any other
    error gives a meaningless key, which packing overwrites)."""
    full_key = _descending_key(values, error)
    prefix = full_key if values.itemsize == 4 else full_key >> _SHIFT_PREFIX
    return (prefix << _SHIFT_PREFIX) | (np.uint64(offset) << _ONE) | np.uint64(is_fg)


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
def _pack_compact(chunk_labels, chunk_values, chunk_grad, chunk_offset, packed, values, rule):
    """Keys of the sorted pixels of a chunk, packed from packed[0], and the chunk's gradient
    zeroed (the fused pass then writes the sorted pixels'). Returns (pixels sorted, fg
    pixels).

    Without branches on the pixel: every pixel's key is written at packed[kept] and ``kept``
    advances only past a sorted one (the next key overwrites the others). Which pixels are
    sorted is random for the hinge (half its errors are <= 0), and a branch there mispredicted
    half the time (4x slower on a 512² hinge image's pixels).
    """
    kept = 0
    n_fg = 0
    for j in range(chunk_labels.shape[0]):
        is_fg, error, is_sorted = _classify(chunk_labels[j], chunk_values[j], rule)
        n_fg += np.int64(is_fg)
        packed[kept] = _packed_key(values, error, chunk_offset + j, is_fg)
        kept += np.int64(is_sorted)
    chunk_grad[:] = 0
    return kept, n_fg


@njit(cache=True)
def _pack_range(batch, s, start, stop, keys, out):
    """Walk pixels [start, stop) of segment s (pixel q is row q // num_cols, column
    q % num_cols) and count its fg pixels, whatever their error: every sorted pixel becomes a
    key in keys[out:] (in pixel order) and every other pixel gets its gradient, 0, here. A
    pixel is sorted when it is valid (its label is not the ignore label) and its error is
    positive.

    Packing goes by chunks of ``_PACK_CHUNK`` pixels: a chunk where every pixel is sorted (all
    of a softmax segment, as a rule) is packed by the vectorized :func:`_pack_dense` (4x
    faster); one that is not is packed again by :func:`_pack_compact`, and so is the next
    chunk, directly (the hinge's errors are <= 0 in random places: no chunk would pass). Both
    write pixel q's key at most at keys[out + (q - start)], so blocks that pack from their
    first pixel's slot do not overlap.

    Returns (out + pixels sorted, fg pixels).
    """
    values, labels, grad = batch.values, batch.labels, batch.grad
    value_base, label_base = batch.value_base[s], batch.label_base[s]
    rule = (batch.fg_label[s], batch.ignore_label, batch.has_ignore) + _affine(batch)
    num_cols = batch.num_cols
    n_fg = 0
    dense = True
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
                rule,
            )
            out += kept
            n_fg += chunk_fg
            dense = kept == j1 - j0
        q += col_stop - col_start
        row += 1
        col_start = 0
    return out, n_fg




@njit(cache=True)
def _refine_float64_ties(sorted_keys, first, n, batch, s):
    """Exact order for float64: re-sort each run of equal 32-bit prefixes of
    sorted_keys[first:n] on the low 32 bits (a run never crosses ``first``: callers start at a
    bucket's edge).

    Inside a run, keys become ``low32(descending key) << 32 | offset << 1 | fg`` for the sort,
    then get their prefix back, so ties on the whole value still keep pixel order.
    """
    start = first
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
            if stop - start <= INSERTION_MAX:
                insertion_sort(sorted_keys, start, stop)
            else:
                sorted_keys[start:stop].sort()
            for k in range(start, stop):
                sorted_keys[k] = (prefix << _SHIFT_PREFIX) | (sorted_keys[k] & _LOW32)
        start = stop




@njit(cache=True)
def _fused_pass(sorted_keys, start, stop, n_fg, fg_before, batch, s, keys_before=0,
                loss_before=0.0):
    """Jaccard increments of sorted_keys[start:stop], scattered to segment s's gradient;
    returns the float64 loss of that block, added to ``loss_before``.

    ``fg_before`` is the number of fg pixels in sorted_keys[:start], and in the
    ``keys_before`` keys of the segment sorted before sorted_keys[0] (a range of keys sorted
    on its own, :func:`_segment_by_ranges`, whose running loss, ``loss_before``, goes on
    adding up in the order of the whole segment); each increment comes from exact integer counts
    (:func:`lovasz_kernels._numba_core.jaccard_increment`, docs/design.md §1).
    The gradient written is ``grad_scale[s] * slope * increment`` (d error / d score = slope):
    the segment's weight and sign are folded into the one scatter.
    """
    # the segment's scores and gradient from its first pixel, indexed by the keys' unsigned
    # offsets, and the keys from ``start``: numba wraps a signed index that could be
    # negative, a compare and a select per access (2^20 keys: 4.9 ms signed, 3.9 unsigned)
    grad_base = batch.value_base[s]
    values, grad = batch.values[grad_base:], batch.grad[grad_base:]
    slope_bg, intercept_bg, slope_fg, intercept_fg = _affine(batch)
    # d loss / d score by label (background, fg), picked by the key's label bit: a load, where
    # a select on the label compiled to a branch that mixed labels mispredict
    scales = np.empty(2, dtype=np.float64)
    scales[0] = batch.grad_scale[s] * slope_bg
    scales[1] = batch.grad_scale[s] * slope_fg
    fg_seen = fg_before
    loss = loss_before
    # the segment's balance of labels says which increments are faster (the same bits)
    branch_free = labels_unpredictable(n_fg, batch.rows * batch.num_cols)
    keys = sorted_keys[start:stop]
    seen_before = keys_before + start + 1  # pixels up to keys[k]: seen_before + k
    for k in range(keys.size):
        key = keys[k]
        offset = (key & _LOW32) >> _ONE
        is_fg = (key & _ONE) != 0
        fg_seen += np.int64(key & _ONE)
        increment = jaccard_increment(n_fg, fg_seen, seen_before + k - fg_seen, is_fg,
                                      branch_free)
        if values.itemsize == 4:  # float32: the error is in the key, no gather
            error_bits = np.uint32(_INF32_BITS - (key >> _SHIFT_PREFIX))
            error = np.float64(float32_from_bits(error_bits))
        else:
            error = np.float64(_error_of(
                values[offset], is_fg, slope_bg, intercept_bg, slope_fg, intercept_fg,
            ))
        grad[offset] = increment * scales[key & _ONE]
        loss += error * increment
    return loss


@njit(cache=True)
def _finish_segment(batch, s, sorted_keys, n_positive, n_fg, fg_before=0, keys_before=0,
                    loss_before=0.0):
    """Loss of segment s from its sorted keys (exact float64 order first); gradient written.
    ``fg_before``, ``keys_before``, ``loss_before``: the fg pixels, keys and loss of the
    segment sorted before these (a range of keys sorted on its own)."""
    if batch.values.itemsize == 8:
        _refine_float64_ties(sorted_keys, 0, n_positive, batch, s)
    return _fused_pass(sorted_keys, 0, n_positive, n_fg, fg_before, batch, s, keys_before,
                       loss_before)


@njit(cache=True)
def _settled_tail_bound(keys, n, n_fg):
    """The largest prefix a key of keys[:n] (segment keys, any order) needs to be sorted, or
    -1 when every key does.

    In sorted order, past the last fg pixel the intersection is empty and every increment is
    0 ((n_fg − fg_seen) / (U (U − 1)) with fg_seen = n_fg; with no fg at all, past the first
    pixel): those background pixels need no order. That holds only when every fg pixel has a
    key (an unsorted one, error <= 0, still counts in n_fg and would come after them all).
    The bound is the last fg key's prefix, or the first key's with no fg: keys with a
    larger prefix sort after it whatever their low bits (float64 keys hold only the top 32
    bits of the error, whose ties the exact order breaks later, so a whole run of equal
    prefixes stays).
    """
    fg_keys = 0
    last_fg = np.uint64(0)
    first = ~np.uint64(0)
    for k in range(n):  # no branches: the compiler vectorizes it
        key = keys[k]
        prefix = key >> _SHIFT_PREFIX
        fg = key & _ONE
        fg_keys += np.int64(fg)
        last_fg = max(last_fg, prefix * fg)
        first = min(first, prefix)
    if fg_keys != n_fg:
        return np.int64(-1)
    return np.int64(last_fg if n_fg > 0 else first)


@njit(cache=True)
def _drop_settled_tail(batch, s, keys, n, n_fg):
    """Keys of segment s (keys[:n], in packing order) moved to keys[:m], those that need
    sorting; returns m.

    The others (:func:`_settled_tail_bound`) get here the gradient the fused pass would give
    them, 0 times the background's scale, and add nothing to the loss, so loss and gradient
    keep their bits. Dropping them costs two passes over the keys, and it is done only where
    they are at least ``SETTLED_TAIL_MIN_FRACTION`` of the keys. With random labels (the
    benchmarks' inputs) every fg error of a softmax over many classes, 1 − p, exceeds every
    background one, p, and the tail is all background; in training it is the background
    pixels the network is surer of than of any fg pixel.
    """
    bound = _settled_tail_bound(keys, n, n_fg)
    if bound < 0:
        return n
    limit = np.uint64(bound)
    needed = 0
    for k in range(n):
        needed += np.int64((keys[k] >> _SHIFT_PREFIX) <= limit)
    if n - needed < SETTLED_TAIL_MIN_FRACTION * n:
        return n
    slope_bg = _affine(batch)[0]
    settled = 0.0 * (batch.grad_scale[s] * slope_bg)  # the fused pass's bits for increment 0
    grad = batch.grad[batch.value_base[s]:]
    kept = 0
    for k in range(n):  # every key's gradient written, the kept ones' later again by the pass
        key = keys[k]
        grad[(key & _LOW32) >> _ONE] = settled
        keys[kept] = key
        kept += np.int64((key >> _SHIFT_PREFIX) <= limit)
    return kept


@njit(cache=True)
def _pack_segment(batch, s, keys):
    """(keys to sort, packed in keys[:n], fg pixels) of segment s; pixels that are not
    sorted get their gradient (0, or that of a settled tail: :func:`_drop_settled_tail`)."""
    n, n_fg = _pack_range(batch, s, 0, batch.rows * batch.num_cols, keys, 0)
    return _drop_settled_tail(batch, s, keys, n, n_fg), n_fg


@njit(cache=True)
def _segment_serial(batch, s, keys, buffer, radix_min, method):
    """Loss of segment s, its gradient written to batch.grad (one thread, sort ``method``)."""
    n_positive, n_fg = _pack_segment(batch, s, keys)
    if n_positive == 0:
        return 0.0
    sorted_keys = sort_keys(keys, buffer, n_positive, radix_min, method)
    return _finish_segment(batch, s, sorted_keys, n_positive, n_fg)


@njit(cache=True)
def _segments_shared(batch, num_segments, next_segment, chunk, loss, keys, buffer, radix_min,
                     method):
    """One thread's share of segments [0, num_segments): it takes the next ``chunk`` segments
    from the shared counter next_segment[0] until none is left (a thread slowed by other work
    on the machine takes fewer), with its own keys and buffer. Each segment writes only its
    pixels of grad and its entry of loss."""
    while True:
        first = fetch_add(next_segment, 0, chunk)
        if first >= num_segments:
            return
        for s in range(first, min(first + chunk, num_segments)):
            loss[s] = _segment_serial(batch, s, keys, buffer, radix_min, method)


# --------------------------------------------------------------------------------------------
# kernels of the within-segment path (each call is one thread's block)


@njit(cache=True)
def _block_bounds(length, num_blocks, block):
    """[start, stop) of block ``block`` when ``length`` items are split evenly."""
    size = (length + num_blocks - 1) // num_blocks
    start = min(block * size, length)
    return start, min(start + size, length)


@njit(cache=True)
def _pack_block(batch, s, block, num_blocks, packed, counts, bits):
    """Keys of the block's pixels [start, stop) of segment s, packed from packed[start] (a block
    never keeps more keys than pixels, so blocks do not overlap); counts[block] = (keys, fg
    pixels), bits[block] = (OR, AND) of its keys."""
    start, stop = _block_bounds(batch.rows * batch.num_cols, num_blocks, block)
    out, n_fg = _pack_range(batch, s, start, stop, packed, start)
    counts[block, 0] = out - start
    counts[block, 1] = n_fg
    bits[block, 0], bits[block, 1] = key_bits(packed, start, out)


@njit(cache=True)
def _count_block_digit(packed, start, stop, histogram, fg_histogram, shift, mask):
    """Histograms of the MSD digit of packed[start:stop] (one block's keys): all keys, and
    the fg keys."""
    histogram[:] = 0
    fg_histogram[:] = 0
    for key in packed[start:stop]:
        d = core.digit_of(key, shift, mask)
        histogram[d] += 1
        fg_histogram[d] += np.int64(key & _ONE)


@njit(cache=True)
def _scatter_block(packed, start, stop, keys, offsets, shift, mask):
    """The block's keys packed[start:stop] to their buckets in ``keys`` (stable)."""
    core.scatter_by_digit(packed[start:stop], keys, offsets, shift, mask)


@njit(cache=True)
def _sort_and_fuse_range(batch, s, keys, buffer, starts, first_bucket, stop_bucket, sort,
                         n_fg, fg_before):
    """Buckets [first_bucket, stop_bucket) of ``keys``: sorted in place (with ``sort``;
    without it they are sorted already), float64 ties made exact, then the fused pass from
    ``fg_before`` fg keys before the range; returns the range's loss."""
    if sort:
        histograms, offsets = core.local_sort_scratch()
        core.sort_buckets(keys, buffer, starts, first_bucket, stop_bucket, histograms, offsets)
    start, stop = starts[first_bucket], starts[stop_bucket]
    if batch.values.itemsize == 8:
        _refine_float64_ties(keys, start, stop, batch, s)
    return _fused_pass(keys, start, stop, n_fg, fg_before, batch, s)


@njit(cache=True)
def _gather_blocks(packed, counts, num_pixels, keys):
    """Every block's keys packed[start_b : start_b + counts[b, 0]] to keys[0:n], in order."""
    num_blocks = counts.shape[0]
    out = 0
    for block in range(num_blocks):
        start, _ = _block_bounds(num_pixels, num_blocks, block)
        keys[out:out + counts[block, 0]] = packed[start:start + counts[block, 0]]
        out += counts[block, 0]
    return out


@njit(cache=True)
def _census_range(labels, num_pixels, bins, ignore_index, has_ignore, narrow, counts, start,
                  stop):
    """Labels [start, stop) of the flat (B, P) ``labels``: ``narrow[i]`` the label as uint8,
    ``bins`` where it is outside [0, bins) and ``bins + 1`` where it is the ignore label (with
    ``has_ignore``); ``counts[b, c]`` += the pixels of image b = i // num_pixels narrowed to
    c, counts (B, bins + 2).

    The narrowing is integer arithmetic on 0/1 flags (it vectorizes; a select on whether a
    label is in range or ignored compiled to branches, which labels of two classes
    mispredict half the time: 1024² labels 3.5 ms against 0.9), then each image's narrowed
    bytes are counted."""
    # loops over slices from 0: numba's indexing by a signed index that could be negative
    # keeps them from vectorizing (a count of 2^20 bytes: 1.06 ms against 0.18)
    values, narrowed = labels[start:stop], narrow[start:stop]
    if has_ignore:
        for i in range(values.size):
            label = values[i]
            valid = np.int64(np.uint64(label) < np.uint64(bins))  # a negative label is huge
            kept = label * valid + bins * (1 - valid)
            narrowed[i] = np.uint8(kept + (bins + 1 - kept) * np.int64(label == ignore_index))
    else:
        for i in range(values.size):
            label = values[i]
            valid = np.int64(np.uint64(label) < np.uint64(bins))
            narrowed[i] = np.uint8(label * valid + bins * (1 - valid))
    first = start
    while first < stop:
        image = first // num_pixels
        end = min(stop, (image + 1) * num_pixels)
        _count_narrowed(narrow, first, end, bins, has_ignore, counts[image])
        first = end


@njit(cache=True)
def _count_narrowed(narrow, start, stop, bins, has_ignore, counts):
    """counts[c] += the bytes narrow[start:stop] equal to c, c in [0, bins + 2).

    Up to ``_CENSUS_PASS_MAX_BINS`` classes, a vectorized pass per class (out of range: what
    no pass counted); beyond, one pass in four tallies taken in turn (consecutive pixels of
    one label would otherwise each wait for the previous increment of its counter).
    2^20 labels on a 2-core Intel Xeon VM: 2 classes 0.19 ms by passes, 4 classes 0.39, and
    5 classes 0.36 by tallies."""
    part = narrow[start:stop]  # from 0, as in _census_range
    if bins <= _CENSUS_PASS_MAX_BINS:
        counted = 0
        for column in range(bins + 2 if has_ignore else bins):
            if column == bins:  # counted below
                continue
            total = 0
            for i in range(part.size):
                total += np.int64(part[i] == column)
            counts[column] += total
            counted += total
        counts[bins] += part.size - counted
        return
    tallies = np.zeros((_CENSUS_TALLIES, bins + 2), dtype=np.int64)
    i = 0
    while i + _CENSUS_TALLIES <= part.size:
        for tally in range(_CENSUS_TALLIES):
            tallies[tally, part[i + tally]] += 1
        i += _CENSUS_TALLIES
    for rest in range(i, part.size):
        tallies[0, part[rest]] += 1
    for tally in range(_CENSUS_TALLIES):
        for column in range(bins + 2):
            counts[column] += tallies[tally, column]


@njit(cache=True)
def _count_outside(values, bits, start, stop, finite_only, bits_of_one):
    """The values [start, stop) outside the check: not finite (``finite_only``), else with
    bits (the same memory read as unsigned integers of their width) above ``bits_of_one``:
    outside [+0.0, 1.0] (every negative value, -0.0 and NaN included, is above it)."""
    bad = 0
    if finite_only:
        part = values[start:stop]  # views from 0: the loops vectorize
        for i in range(part.size):
            value = part[i]
            bad += np.int64((value - value) != 0.0)  # NaN for NaN and +-inf
    else:
        part_bits = bits[start:stop]
        for i in range(part_bits.size):
            bad += np.int64(part_bits[i] > bits_of_one)
    return bad


@njit(cache=True)
def _count_off_simplex(values, bits, num_channels, num_pixels, start, stop, bits_of_one,
                       sum_slack):
    """Over pixels [start, stop) of the flat (B, P) pixels of scores (B, C, P) (flat
    ``values`` and their ``bits``, as in :func:`_count_outside`): the values outside
    [+0.0, 1.0] plus the pixels whose float64 sum over the channels is not within
    ``sum_slack`` of 1."""
    bad = 0
    sums = np.empty(_CHECK_BLOCK_PIXELS, dtype=np.float64)
    first = start
    while first < stop:
        image = first // num_pixels
        pixel, end = first - image * num_pixels, min(stop, (image + 1) * num_pixels)
        image_base = image * num_channels * num_pixels
        for block_start in range(pixel, pixel + (end - first), _CHECK_BLOCK_PIXELS):
            length = min(_CHECK_BLOCK_PIXELS, pixel + (end - first) - block_start)
            block_sums = sums[:length]
            block_sums[:] = 0.0
            for channel in range(num_channels):
                at = image_base + channel * num_pixels + block_start
                row, row_bits = values[at:at + length], bits[at:at + length]
                for j in range(length):
                    bad += np.int64(row_bits[j] > bits_of_one)
                    block_sums[j] += np.float64(row[j])
            for j in range(length):
                bad += np.int64(not abs(block_sums[j] - 1.0) <= sum_slack)
        first = end
    return bad


# --------------------------------------------------------------------------------------------
# kernels of the memory-bounded path (a range of keys at a time: _segment_by_ranges)

#: keys are below 2^63 (a 31-bit prefix above 32 bits of offset and label)
_KEYS_END = np.uint64(1 << 63)
#: the digit of the key ranges' histograms: 4096 counters
_RANGE_DIGIT_BITS = 12


#: the key of a pixel that is not sorted, in a chunk's keys: above every range
_NOT_SORTED = np.uint64(0xFFFFFFFFFFFFFFFF)


@njit(cache=True)
def _walk_keys(batch, s, start, stop, lo, hi, keys, histogram, shift, mask, zero_grad):
    """One pass over pixels [start, stop) of segment s (pixel q is row q // num_cols, column
    q % num_cols): each sorted pixel (valid, with a positive error) whose key is in [lo, hi)
    is packed into ``keys`` in pixel order (when it has room for any: its last slot takes the
    keys that do not belong, so it must hold one more than the range) or counted in
    ``histogram`` by its digit at ``shift`` (when it has counters); with ``zero_grad`` every
    pixel's gradient becomes 0. Returns (keys in [lo, hi), fg pixels).

    By chunks of ``_PACK_CHUNK`` pixels: every pixel's key first (:data:`_NOT_SORTED` for the
    unsorted: a loop without branches that the compiler vectorizes), then the chunk's keys
    picked or counted (3x faster than one loop doing both)."""
    values, labels, grad = batch.values, batch.labels, batch.grad
    value_base, label_base = batch.value_base[s], batch.label_base[s]
    rule = (batch.fg_label[s], batch.ignore_label, batch.has_ignore) + _affine(batch)
    last = keys.shape[0] - 1
    counting = histogram.shape[0] > 0
    chunk_keys = np.empty(_PACK_CHUNK, dtype=np.uint64)
    num_cols = batch.num_cols
    n = 0
    n_fg = 0
    row = start // num_cols
    col_start = start - row * num_cols
    q = start
    while q < stop:  # row by row: no division per pixel
        col_stop = min(num_cols, col_start + (stop - q))
        first_offset = row * batch.value_row_stride
        first_label = label_base + row * batch.label_row_stride
        first_value = value_base + first_offset
        for j0 in range(col_start, col_stop, _PACK_CHUNK):
            j1 = min(j0 + _PACK_CHUNK, col_stop)
            # chunk views, indexed from 0: no negative-index handling (it stops vectorization)
            chunk_labels = labels[first_label + j0:first_label + j1]
            chunk_values = values[first_value + j0:first_value + j1]
            chunk = chunk_keys[:j1 - j0]
            for j in range(chunk.shape[0]):
                is_fg, error, is_sorted = _classify(chunk_labels[j], chunk_values[j], rule)
                n_fg += np.int64(is_fg)
                key = _packed_key(values, error, first_offset + j0 + j, is_fg)
                chunk[j] = key if is_sorted else _NOT_SORTED
            if last >= 0:
                for key in chunk:  # no branch: the next key overwrites one that does not belong
                    keys[min(n, last)] = key
                    n += np.int64((key >= lo) & (key < hi))
            else:
                for key in chunk:
                    inside = np.int64((key >= lo) & (key < hi))
                    n += inside
                    if counting:
                        histogram[core.digit_of(key, shift, mask)] += inside
            if zero_grad:
                grad[first_value + j0:first_value + j1] = 0
        q += col_stop - col_start
        row += 1
        col_start = 0
    return n, n_fg


@njit(cache=True)
def _fg_keys(sorted_keys, n):
    """The fg pixels among the keys sorted_keys[:n]."""
    count = 0
    for key in sorted_keys[:n]:
        count += np.int64(key & _ONE)
    return count


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


def _key_scratch(num_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys and radix buffer, (num_pixels,) uint64 each, reused between calls by the calling
    thread (each worker thread has its own)."""
    both = scratch("numba keys", 2 * num_pixels, np.uint64)
    return both[:num_pixels], both[num_pixels:]


class _SortMethods(NamedTuple):
    host: int  # SORT_LSD, SORT_MSD or SORT_NUMPY (numpy's sort, called between kernels)
    kernel: int  # SORT_LSD or SORT_MSD


def _sort_methods(num_pixels: int) -> _SortMethods:
    """The sorts for segments of ``num_pixels``: the machine's fastest for large ones (measured
    on first use), the LSD radix sort otherwise."""
    if num_pixels < SORT_CHOICE_MIN_PIXELS:
        return _SortMethods(SORT_LSD, SORT_LSD)
    choice = core.sort_choice()
    return _SortMethods(choice.host, choice.kernel)


def _segment_host_sorted(batch: SegmentBatch, s: int, keys: np.ndarray, buffer: np.ndarray,
                         radix_min: int) -> float:
    """Segment s with numpy's sort of its keys between the packing and the fused kernels."""
    n_positive, n_fg = _pack_segment(batch, s, keys)
    if n_positive == 0:
        return 0.0
    if n_positive < radix_min:
        sorted_keys = sort_keys(keys, buffer, n_positive, radix_min, SORT_LSD)
    else:
        keys[:n_positive].sort()  # releases the GIL
        sorted_keys = keys
    return _finish_segment(batch, s, sorted_keys, n_positive, n_fg)


def _segments_task(batch: SegmentBatch, num_segments: int, next_segment: np.ndarray,
                   chunk: int, loss: np.ndarray, radix_min: int, methods: _SortMethods) -> None:
    """One thread's share of segments [0, num_segments) (see :func:`_segments_shared`), with
    this thread's scratch."""
    keys, buffer = _key_scratch(batch.rows * batch.num_cols)
    if methods.host != SORT_NUMPY:
        _segments_shared(batch, num_segments, next_segment, chunk, loss, keys, buffer,
                         radix_min, methods.kernel)
        return
    while True:  # numpy's sort runs between two kernels, so the loop is here
        first = int(core.take_next(next_segment, chunk))
        if first >= num_segments:
            return
        for s in range(first, min(first + chunk, num_segments)):
            loss[s] = _segment_host_sorted(batch, s, keys, buffer, radix_min)


def _bucket_ranges(starts: np.ndarray, num_ranges: int) -> np.ndarray:
    """Bucket indices cutting the buckets (key offsets ``starts``) into ``num_ranges``
    contiguous ranges of about equal keys: range r is buckets [cuts[r], cuts[r + 1])."""
    total = int(starts[-1])
    targets = (np.arange(1, num_ranges, dtype=np.int64) * total) // num_ranges
    inner = np.searchsorted(starts, targets, side="left")
    cuts = np.concatenate([[0], inner, [starts.size - 1]])
    return np.maximum.accumulate(np.minimum(cuts, starts.size - 1))


def _segment_blocked(batch: SegmentBatch, s: int, keys: np.ndarray, buffer: np.ndarray,
                     num_blocks: int, radix_min: int, methods: _SortMethods | None = None,
                     ) -> float:
    """Loss of segment s with every step split into ``num_blocks`` tasks (each taken by
    whichever worker thread is free, see :func:`lovasz_kernels._numba_core.run_tasks`).

    1. each block packs its pixels' keys into ``buffer`` (from its first pixel's slot);
    2. each block counts its keys' MSD digit (the top varying bits of the whole segment), all
       keys and fg keys;
    3. each block scatters its keys into their buckets in ``keys`` (stable: the offsets of
       block b within a bucket follow those of blocks < b);
    4. each task sorts a range of whole buckets (about n / num_blocks keys) in place, with
       the machine's sort, and runs the fused pass over it from the fg keys of the buckets
       before (known from step 2).
    Four pool round trips in all. Fewer than ``radix_min`` keys are gathered and sorted on
    this thread.
    """
    methods = methods or _SortMethods(SORT_LSD, SORT_LSD)
    num_pixels = batch.rows * batch.num_cols
    counts = np.empty((num_blocks, 2), dtype=np.int64)
    bits = np.empty((num_blocks, 2), dtype=np.uint64)
    core.run_tasks(_pack_block, [(batch, s, block, num_blocks, buffer, counts, bits)
                                 for block in range(num_blocks)])
    n_positive, n_fg = (int(total) for total in counts.sum(axis=0))
    if n_positive == 0:
        return 0.0
    if n_positive < max(radix_min, 2):
        _gather_blocks(buffer, counts, num_pixels, keys)
        sorted_keys = sort_keys(keys, buffer, n_positive, radix_min, methods.kernel)
        return _finish_segment(batch, s, sorted_keys, n_positive, n_fg)
    low, high = core.varying_prefix_bits(np.bitwise_or.reduce(bits[:, 0]),
                                         np.bitwise_and.reduce(bits[:, 1]))
    shift, digit_bits = core.msd_digit(low, high, n_positive)
    shift, mask = np.uint64(shift), np.uint64((1 << digit_bits) - 1)
    block_start = [_block_bounds(num_pixels, num_blocks, block)[0] for block in range(num_blocks)]
    histograms = np.empty((num_blocks, 1 << digit_bits), dtype=np.int64)
    fg_histograms = np.empty_like(histograms)
    core.run_tasks(_count_block_digit, [
        (buffer, block_start[block], block_start[block] + counts[block, 0], histograms[block],
         fg_histograms[block], shift, mask) for block in range(num_blocks)])
    # block b's first slot in bucket d: keys of buckets < d, then of blocks < b in bucket d
    by_bucket = histograms.T.reshape(-1)
    offsets = (np.cumsum(by_bucket) - by_bucket).reshape(-1, num_blocks).T.copy()
    starts = np.append(offsets[0], n_positive).astype(np.int64)
    core.run_tasks(_scatter_block, [
        (buffer, block_start[block], block_start[block] + counts[block, 0], keys,
         offsets[block], shift, mask) for block in range(num_blocks)])
    cuts = _bucket_ranges(starts, num_blocks)
    fg_below = np.concatenate([[0], np.cumsum(fg_histograms.sum(axis=0))])  # per bucket
    ranges = [(int(cuts[r]), int(cuts[r + 1]), int(fg_below[cuts[r]]))
              for r in range(num_blocks)]
    if methods.host == SORT_NUMPY:
        def sort_and_fuse(first_bucket, stop_bucket, fg_before):
            keys[starts[first_bucket]:starts[stop_bucket]].sort()  # releases the GIL
            return _sort_and_fuse_range(batch, s, keys, buffer, starts, first_bucket,
                                        stop_bucket, False, n_fg, fg_before)
        range_loss = core.run_tasks(sort_and_fuse, ranges)
    else:
        range_loss = core.run_tasks(_sort_and_fuse_range, [
            (batch, s, keys, buffer, starts, first, stop, True, n_fg, fg_before)
            for first, stop, fg_before in ranges])
    return float(sum(range_loss))


#: however small the budget, a segment sorted a range of keys at a time takes at most this
#: many ranges (each is a pass over the segment)
RANGES_MOST = 64
_NO_KEYS = np.empty(0, dtype=np.uint64)
_NO_COUNTS = np.empty(0, dtype=np.int64)


def _walk_blocks(batch: SegmentBatch, s: int, lo: int, hi: int, keys: list[np.ndarray],
                 histograms: np.ndarray, shift: int, mask: int,
                 zero_grad: bool) -> list[tuple[int, int]]:
    """:func:`_walk_keys` over segment s in ``len(keys)`` blocks of pixels, block b packing
    into ``keys[b]`` or counting into ``histograms[b]``: on the worker threads when there
    are several (the caller must not be a pool task itself)."""
    num_blocks = len(keys)
    num_pixels = batch.rows * batch.num_cols
    tasks = [(batch, s, *_block_bounds(num_pixels, num_blocks, block), np.uint64(lo),
              np.uint64(hi), keys[block], histograms[block], np.uint64(shift),
              np.uint64(mask), zero_grad) for block in range(num_blocks)]
    return core.run_tasks(_walk_keys, tasks)


def _key_ranges(batch: SegmentBatch, s: int, capacity: int, histograms: np.ndarray,
                ) -> tuple[list[tuple[int, int, np.ndarray]], int]:
    """Segment s's keys cut into intervals [lo, hi) of at most ``capacity`` keys, ascending
    (the largest errors first), as (lo, hi, keys of each block of pixels); and the
    segment's fg pixels. ``histograms`` has a row of counters per block (one block: the
    calling thread alone; more: as many tasks, see :func:`_walk_blocks`).

    One pass counts the keys by their top digit (and writes 0 to every pixel's gradient: the
    ranges then write only their keys'); consecutive digits are merged into ranges while
    they fit, and a digit with more keys than fit is counted again by the next digit (one
    more pass over the segment, counting that digit's keys only). Keys are unique, so this
    ends. In float64 a range never cuts a run of keys with one 32-bit prefix (their exact
    order is set within a range, :func:`_refine_float64_ties`): such a run of more than
    ``capacity`` keys (errors tied in their top 32 bits) is one range."""
    num_blocks = histograms.shape[0]
    no_keys = [_NO_KEYS] * num_blocks
    lowest_shift = 32 if batch.values.itemsize == 8 else 0
    shift = 63 - _RANGE_DIGIT_BITS
    histograms[:] = 0
    walked = _walk_blocks(batch, s, 0, 1 << 63, no_keys, histograms, shift,
                          (1 << _RANGE_DIGIT_BITS) - 1, True)
    n_fg = sum(block_fg for _, block_fg in walked)
    ranges: list[tuple[int, int, np.ndarray]] = []

    def cut(base: int, shift: int, counts: np.ndarray) -> None:
        """Ranges from ``counts`` (blocks, digits) of the digits at ``shift`` from ``base``."""
        totals = counts.sum(axis=0)
        current: list | None = None  # lo, hi, keys of each block
        for digit in np.flatnonzero(totals):
            count = int(totals[digit])
            lo = base + (int(digit) << shift)
            hi = lo + (1 << shift)
            if (count <= capacity and current is not None
                    and int(current[2].sum()) + count <= capacity):
                current[1] = hi
                current[2] = current[2] + counts[:, digit]
                continue
            if current is not None:
                ranges.append((current[0], current[1], current[2]))
                current = None
            if count <= capacity or shift <= lowest_shift:
                current = [lo, hi, counts[:, digit].copy()]
                continue
            next_shift = max(shift - _RANGE_DIGIT_BITS, lowest_shift)
            size = 1 << (shift - next_shift)
            histograms[:, :size] = 0
            _walk_blocks(batch, s, lo, hi, no_keys, histograms[:, :size], next_shift,
                         size - 1, False)
            cut(lo, next_shift, histograms[:, :size].copy())
        if current is not None:
            ranges.append((current[0], current[1], current[2]))

    cut(0, shift, histograms.copy())
    return ranges, n_fg


def _segment_by_ranges(batch: SegmentBatch, s: int, keys: np.ndarray, buffer: np.ndarray,
                       histograms: np.ndarray, radix_min: int, methods: _SortMethods) -> float:
    """Loss of segment s with its keys sorted a range at a time (:func:`_key_ranges`, ranges
    of at most ``keys.size - B`` keys for B blocks, the rows of ``histograms``): each range's
    keys packed by a pass over the segment (block b's from its first slot, the blocks'
    then gathered in order into ``buffer``), sorted, and given the increments of their places
    in the whole segment's order (the fg pixels, keys and running loss of the ranges before
    carried over): the same loss and gradient, bit for bit, as the segment sorted whole,
    holding ``keys`` and ``buffer`` instead of 16 bytes per pixel of the segment."""
    num_blocks = histograms.shape[0]
    ranges, n_fg = _key_ranges(batch, s, keys.size - num_blocks, histograms)
    loss = 0.0
    fg_before = keys_before = 0
    for lo, hi, block_counts in ranges:
        count = int(block_counts.sum())
        if count + num_blocks > keys.size:  # float64 errors tied in their top 32 bits
            keys = np.empty(count + num_blocks, dtype=np.uint64)
            buffer = np.empty(count + num_blocks, dtype=np.uint64)
        # block b packs into its own slots (its keys and one slot for the keys that do not
        # belong); one block packs straight where the sort reads
        starts = np.concatenate([[0], np.cumsum(block_counts + 1)])
        block_keys = [keys[starts[b]:starts[b + 1]] for b in range(num_blocks)]
        _walk_blocks(batch, s, lo, hi, block_keys, [_NO_COUNTS] * num_blocks, 0, 0, False)
        if num_blocks > 1:
            gathered = np.concatenate([[0], np.cumsum(block_counts)])
            for b in range(num_blocks):
                buffer[gathered[b]:gathered[b + 1]] = keys[starts[b]:starts[b] + block_counts[b]]
            keys, buffer = buffer, keys
        if methods.host == SORT_NUMPY and count >= radix_min:
            keys[:count].sort()  # releases the GIL
            sorted_keys = keys
        else:
            sorted_keys = sort_keys(keys, buffer, count, radix_min, methods.kernel)
        loss = _finish_segment(batch, s, sorted_keys, count, n_fg, fg_before, keys_before,
                               loss)
        fg_before += _fg_keys(sorted_keys, count)
        keys_before += count
    return loss


def _ranges_task(batch: SegmentBatch, num_segments: int, next_segment: np.ndarray,
                 capacity: int, loss: np.ndarray, radix_min: int,
                 methods: _SortMethods) -> None:
    """One thread's share of segments [0, num_segments), each sorted a range of at most
    ``capacity`` keys at a time, with this thread's scratch."""
    keys, buffer, histograms = _range_scratch(capacity, 1)
    while True:
        s = int(core.take_next(next_segment, 1))
        if s >= num_segments:
            return
        loss[s] = _segment_by_ranges(batch, s, keys, buffer, histograms, radix_min, methods)


def _range_scratch(capacity: int, num_blocks: int) -> tuple[np.ndarray, np.ndarray,
                                                             np.ndarray]:
    """This thread's keys and buffer for ranges of ``capacity`` keys packed in
    ``num_blocks`` blocks, and the blocks' digit counters."""
    size = capacity + num_blocks
    both = scratch("numba range keys", 2 * size, np.uint64)
    counts = scratch("numba range counts", num_blocks << _RANGE_DIGIT_BITS, np.int64)
    return both[:size], both[size:], counts.reshape(num_blocks, -1)


#: what sorting by ranges holds besides its keys, per block of pixels: the digit counts (and
#: a copy of them per level of refinement, of which there are rarely more than two)
_RANGE_COUNTS_BYTES = 3 * (8 << _RANGE_DIGIT_BITS)


def _run_within(batch: SegmentBatch, num_segments: int, budget_bytes: int) -> np.ndarray:
    """:func:`_run_batch` holding at most ``budget_bytes`` of keys, buffers and counts at
    once: segments whose keys and buffer (16 bytes a pixel) fit are sorted whole, on as many
    threads as fit (one at least); longer ones a range of keys at a time, one per thread,
    each thread's ranges sized to its share of the budget (never more than
    :data:`RANGES_MOST` ranges)."""
    num_pixels = batch.rows * batch.num_cols
    loss = np.zeros(num_segments, dtype=np.float64)
    threads = core.thread_count()
    methods = _sort_methods(num_pixels)
    radix_min = RADIX_MIN_KEYS
    next_segment = np.zeros(1, dtype=np.int64)
    whole_bytes = 2 * 8 * num_pixels
    if num_segments * num_pixels < PARALLEL_MIN_PIXELS:
        threads = 1
    workers = min(threads, max(num_segments, 1), budget_bytes // max(whole_bytes, 1))
    if workers >= 1:
        chunk = max(1, min(CHUNK_PIXELS // max(num_pixels, 1), num_segments // (4 * workers)))
        core.run_tasks(_segments_task, [(batch, num_segments, next_segment, chunk, loss,
                                         radix_min, methods) for _ in range(workers)])
        return loss
    least = -(-num_pixels // RANGES_MOST)
    if num_segments < threads:
        # fewer segments than threads: one after another, each pass over a segment split
        # across every thread, each range the whole budget's
        blocks = threads
        capacity = max((budget_bytes - blocks * _RANGE_COUNTS_BYTES) // 16 - blocks, least, 1)
        keys, buffer, histograms = _range_scratch(capacity, blocks)
        for s in range(num_segments):
            loss[s] = _segment_by_ranges(batch, s, keys, buffer, histograms, radix_min,
                                         methods)
        return loss
    share = budget_bytes // threads - _RANGE_COUNTS_BYTES
    capacity = max(share // 16 - 1, least, 1)
    core.run_tasks(_ranges_task, [(batch, num_segments, next_segment, capacity, loss,
                                   radix_min, methods) for _ in range(threads)])
    return loss


def _split_pays(count: int, num_pixels: int, threads: int) -> bool:
    """Whether ``count`` segments of ``num_pixels`` each, split across ``threads`` threads
    one after another (:func:`_segment_blocked`), end sooner than the same segments run
    whole at once, one per thread (about one segment's time on one thread): by the times
    measured on this machine with this many threads (:func:`split_costs`), interpolated in
    the pixels, and by ``SPLIT_MARGIN``."""
    if num_pixels < SPLIT_MIN_PIXELS or count < 1:
        return False
    costs = split_costs(threads)
    (small, large), whole, split = SPLIT_MEASURED_PIXELS, costs.whole_ms, costs.split_ms
    fraction = (num_pixels - small) / (large - small)
    whole_ms = whole[0] + (whole[1] - whole[0]) * fraction
    split_ms = split[0] + (split[1] - split[0]) * fraction
    return count * split_ms * SPLIT_MARGIN < whole_ms


def _run_batch(batch: SegmentBatch, num_segments: int,
               budget_bytes: int | None = None) -> np.ndarray:
    """Per-segment float64 losses (S,); gradients written into ``batch.grad``.

    Segments run on the worker threads, each on one thread; those that would leave threads
    idle (fewer segments than threads, or the last ``S mod threads``) are split across
    threads instead where that pays (:func:`_split_pays`). With ``budget_bytes`` (a strict
    budget, see ``lovasz_kernels.set_chunk_floor``) the scratch stays within it instead
    (:func:`_run_within`).
    """
    if budget_bytes is not None:
        return _run_within(batch, num_segments, budget_bytes)
    num_pixels = batch.rows * batch.num_cols
    loss = np.zeros(num_segments, dtype=np.float64)
    threads = core.thread_count()
    methods = _sort_methods(num_pixels)
    radix_min = RADIX_MIN_KEYS
    blocks = threads * BLOCKS_PER_THREAD
    if threads == 1 or num_segments * num_pixels < PARALLEL_MIN_PIXELS:
        _segments_task(batch, num_segments, np.zeros(1, dtype=np.int64), max(num_segments, 1),
                       loss, radix_min, methods)
        return loss
    if num_segments < threads and _split_pays(num_segments, num_pixels, threads):
        keys, buffer = _key_scratch(num_pixels)
        for s in range(num_segments):
            loss[s] = _segment_blocked(batch, s, keys, buffer, blocks, radix_min, methods)
        return loss
    workers = min(threads, num_segments)
    # the last num_segments % workers segments would leave threads idle at the end (21
    # classes on 2 threads: 11 against 10): split across the threads instead where that pays
    leftover = num_segments % workers
    if leftover and not _split_pays(leftover, num_pixels, threads):
        leftover = 0
    shared = num_segments - leftover
    chunk = max(1, min(CHUNK_PIXELS // max(num_pixels, 1), shared // (4 * workers)))
    next_segment = np.zeros(1, dtype=np.int64)
    core.run_tasks(_segments_task, [(batch, shared, next_segment, chunk, loss, radix_min,
                                     methods) for _ in range(workers)])
    if leftover:
        keys, buffer = _key_scratch(num_pixels)
        for s in range(shared, num_segments):
            loss[s] = _segment_blocked(batch, s, keys, buffer, blocks, radix_min, methods)
    return loss


# --------------------------------------------------------------------------------------------
# when a segment is split across threads: measured once per machine and thread count

#: the measurement's segment sizes; costs between (and past) them are interpolated linearly
SPLIT_MEASURED_PIXELS = (1 << 18, 1 << 20)
#: splitting must be measured faster by this factor. The measurement runs on idle threads;
#: in a call, torch's OpenMP threads still spin for milliseconds after the call's own torch
#: ops, and every pool round waits for a thread that shares a core with one: on the 2-core
#: development VM 262k-pixel segments were 1.16-1.19x faster split in the measurement, but
#: whole losses with them split took 1.03-1.25x the time of those with them whole
#: (tests/perf/split_segments.py)
SPLIT_MARGIN = 1.25
#: medians of this many rounds, the two ways interleaved (about 0.2 s in all on that VM)
SPLIT_MEASURE_ROUNDS = 7
# bumped when the kernels or the measurement change, so that machines measure again
_SPLIT_MEASURE_VERSION = 1
_split_lock = threading.Lock()
_split_costs: dict[int, SplitCosts] = {}  # per thread count, this process


def _new_split_lock_in_child() -> None:
    # a forked child may get the lock held by a thread that it does not have
    global _split_lock
    _split_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_split_lock_in_child)


class SplitCosts(NamedTuple):
    """One segment of each ``SPLIT_MEASURED_PIXELS`` size on one thread (``whole_ms``) and
    split across the threads (``split_ms``), medians in ms."""

    whole_ms: tuple[float, float]
    split_ms: tuple[float, float]


def split_choice_path() -> str:
    """The file that keeps the measured costs (:func:`~lovasz_kernels._machine_choices.
    cache_path`)."""
    return cache_path("numba-split-choice.json")


def _split_key(threads: int) -> str:
    return (f"{processor_model()} | numba {core.numba.__version__} | {threads} threads | "
            f"split v{_SPLIT_MEASURE_VERSION}")


def _calibration_segment(num_pixels: int, rng: np.random.Generator) -> SegmentBatch:
    """One segment of softmax-like errors (lognormal around 0.05, every one sorted; 5%
    foreground), as the extension sees them."""
    errors = np.minimum(np.exp(rng.standard_normal(num_pixels, dtype=np.float32)
                               - np.float32(3.0)), np.float32(1.0))
    fg = rng.random(num_pixels) < 0.05
    return _extension_batch(errors[None], fg[None], np.empty((1, num_pixels), np.float32))


def _decode_split_costs(entry: dict | None) -> SplitCosts | None:
    """The costs in a file entry, or None (missing, or not two numbers each)."""
    try:
        costs = SplitCosts(tuple(float(value) for value in entry["whole_ms"]),
                           tuple(float(value) for value in entry["split_ms"]))
    except (KeyError, TypeError, ValueError):
        return None
    return costs if len(costs.whole_ms) == len(costs.split_ms) == 2 else None


def measure_split_costs(threads: int) -> SplitCosts:
    """Time one segment of each measured size whole on one thread and split across
    ``threads`` threads (the paths a call takes; the other threads idle meanwhile, as when
    segments are left over), rounds interleaved, medians."""
    rng = np.random.default_rng(0)
    whole_ms, split_ms = [], []
    for num_pixels in SPLIT_MEASURED_PIXELS:
        batch = _calibration_segment(num_pixels, rng)
        methods = _sort_methods(num_pixels)
        keys, buffer = _key_scratch(num_pixels)
        loss = np.zeros(1)
        samples: dict[str, list[float]] = {"whole": [], "split": []}
        for round_index in range(-1, SPLIT_MEASURE_ROUNDS):  # a first untimed round
            start = time.perf_counter()
            _segments_task(batch, 1, np.zeros(1, dtype=np.int64), 1, loss, RADIX_MIN_KEYS,
                           methods)
            middle = time.perf_counter()
            _segment_blocked(batch, 0, keys, buffer, threads * BLOCKS_PER_THREAD,
                             RADIX_MIN_KEYS, methods)
            if round_index >= 0:
                samples["whole"].append(middle - start)
                samples["split"].append(time.perf_counter() - middle)
        whole_ms.append(round(statistics.median(samples["whole"]) * 1e3, 3))
        split_ms.append(round(statistics.median(samples["split"]) * 1e3, 3))
    return SplitCosts(tuple(whole_ms), tuple(split_ms))


def split_costs(threads: int) -> SplitCosts:
    """The costs with ``threads`` threads: this process's, the file's (:func:`split_choice_path`),
    or measured now (0.38 s on the 2-core development VM) and saved there. Results never
    depend on them beyond the loss's last bits (the gradient is the same bits either way)."""
    def measure() -> tuple[SplitCosts, dict]:
        costs = measure_split_costs(threads)
        return costs, {"whole_ms": list(costs.whole_ms), "split_ms": list(costs.split_ms)}

    return kept_or_measured(_split_costs, threads, _split_lock, split_choice_path(),
                            _split_key(threads), _decode_split_costs, measure,
                            what=f"when numba splits a segment across {threads} threads")


def forget_split_costs() -> None:
    """Drop this process's costs (tests; the file is read again on next use)."""
    _split_costs.clear()


def _host_floats(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous float32/float64 numpy array (float16/bfloat16 widened exactly)."""
    # bfloat16 is widened in errors_to_numpy; float16 here, by torch (faster than numpy)
    widened = tensor.to(torch.float32) if tensor.dtype == torch.float16 else tensor
    return np.ascontiguousarray(errors_to_numpy(widened))


def lovasz_extension(errors: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (S,) and gradient (S, P) of the Lovász extension on CPU tensors.

    float16/bfloat16 are widened to float32 (exactly) and float64 stays float64, so the
    kernels compile for two dtypes only. Segments run in parallel; with fewer segments than
    threads, each segment is split across threads where that pays (:func:`_split_pays`).
    """
    num_segments, num_pixels = errors.shape
    if num_pixels > MAX_PIXELS:
        raise ValueError(
            f"the numba backend packs pixel indices in 31 bits: segments of at most 2^31 "
            f"pixels; got {num_pixels}. Use backend='torch' for larger segments"
        )
    errors_np = _host_floats(errors)
    fg_np = np.ascontiguousarray(fg_to_numpy(fg))
    grad = output("numba extension gradient", errors_np.shape, errors_np.dtype,
                  keep=not budget_is_strict(_CPU))
    budget = _scratch_budget(max(grad.nbytes, chunk_floor_bytes(_CPU)),
                             _widened_bytes(errors, errors_np))
    loss = _run_batch(_extension_batch(errors_np, fg_np, grad), num_segments, budget)
    return results_to_torch(loss, grad, errors)


_CPU = torch.device("cpu")


def _widened_bytes(tensor: torch.Tensor, values: np.ndarray) -> int:
    """The bytes of ``values`` when :func:`_host_floats` made them (16-bit input), else 0."""
    return values.nbytes if tensor.element_size() < values.itemsize else 0


def _scratch_budget(call_budget: int, held_bytes: int = 0) -> int | None:
    """Under a strict budget (a floor set with ``lovasz_kernels.set_chunk_floor``), the bytes
    the kernels' scratch may take at once: ``call_budget`` (or, in a chunk of a chunked call,
    the chunk's allowance) less what the call holds besides its gradient (``held_bytes``);
    None otherwise."""
    if not budget_is_strict(_CPU):
        return None
    allowance = chunk_allowance_bytes()
    left = (call_budget if allowance is None else allowance) - held_bytes
    # an eighth is left for the C heap's slack, which peak RSS counts (2.03-2.09x the input
    # at 1024² x 2 without it)
    return max(left - left // 8, 0)


def label_census(labels: torch.Tensor, num_classes: int,
                 ignore_index: int | None) -> LabelCensus | None:
    """The labels (B, P) int64 counted and narrowed in one pass (see
    :class:`lovasz_kernels._plan.LabelCensus`), for 2 to 254 classes; None otherwise (one
    channel: the kernels read the int64 labels, see :func:`_narrow_labels`).

    Counted by a kernel on the worker threads, not by torch ops: ``torch.bincount`` of
    few classes waits on each counter's previous increment, and with the range check and
    the narrowing it was three passes over the labels (1024² x 2, right after a torch op:
    2.6-2.7 ms against 0.7 on a 2-core Intel Xeon VM, ``python tests/perf/label_census.py``)."""
    if num_classes < 2 or num_classes >= 255:
        return None
    flat = np.ascontiguousarray(labels.to(torch.int64).numpy()).reshape(-1)
    batch_size = labels.shape[0]
    num_pixels = flat.size // batch_size if batch_size else 0
    narrow = np.empty(flat.size, dtype=np.uint8)
    blocks = core.thread_count() if flat.size >= NARROW_SPLIT_LABELS else 1
    counts = np.zeros((blocks, batch_size, num_classes + 2), dtype=np.int64)
    has_ignore = ignore_index is not None
    if flat.size:
        core.run_tasks(_census_range, [
            (flat, num_pixels, num_classes, ignore_index if has_ignore else 0, has_ignore,
             narrow, counts[block], *_block_bounds(flat.size, blocks, block))
            for block in range(blocks)])
    total = counts.sum(axis=0)
    return LabelCensus(
        class_pixels=torch.from_numpy(total[:, :num_classes].copy()),
        valid_pixels=torch.from_numpy(total[:, :num_classes + 1].sum(axis=1, keepdims=True)),
        out_of_range=int(total[:, num_classes].sum()),
        labels=(narrow, num_classes + 1),
    )


def check_scores(scores: torch.Tensor, value_check: str) -> bool:
    """Whether one pass over a loss call's scores (B, C, P), float32 or float64 in one
    contiguous block, proves them valid for ``value_check``: "finite", "unit_interval"
    (every value in [+0.0, 1.0]) or "simplex" (that, and with C > 1 each pixel's sum over the
    channels within the shared tolerance of 1). False for anything else, anything it could
    not prove and calls it does not look at (then the shared checks decide, and explain).
    The sums are float64, proven within the tolerance less C * 2^-20, more than float32 sums
    (the shared check's) can differ from them: what this accepts, the shared check accepts.

    It looks at calls of at most one channel per thread and ``_CHECK_MOST_VALUES`` values,
    where it pays. The shared checks are torch reductions, after which torch's OpenMP
    threads spin for milliseconds by default, on the cores the kernels' threads need next:
    with a segment per thread, a kernel thread held back holds back the call. With more
    channels the kernels' shared counter gives such a thread fewer segments, and torch's
    two passes on its own threads cost less than this one on a core a spinning thread
    holds. On a 2-core Intel Xeon VM, each call right after a torch op (``python
    tests/perf/scores_check.py``, two runs): 1024² x 2 20.6-21.2 ms against 21.9-22.6 with
    the shared checks, 4 x 512² x 2 20.6 against 23.4, 2 x 1024² x 2 38.8-40.3 against
    41.0-42.6; at 21 channels its pass alone took 2.7-3.2 ms where the shared checks took
    2.2-2.4."""
    if (scores.dtype not in (torch.float32, torch.float64) or scores.dim() != 3
            or not scores.is_contiguous() or scores.numel() > _CHECK_MOST_VALUES
            or scores.shape[1] > core.thread_count()):
        return False
    values = scores.detach().numpy().reshape(-1)
    unsigned = np.dtype(f"uint{8 * values.itemsize}")  # the bits, read as unsigned integers
    bits, bits_of_one = values.view(unsigned), unsigned.type(_validate.BITS_OF_ONE[scores.dtype])
    batch_size, num_channels, num_pixels = scores.shape
    simplex = value_check == "simplex" and num_channels > 1
    blocks = max(1, values.size // _CHECK_TASK_VALUES)
    if simplex:
        slack = _validate.simplex_tolerance(scores.dtype) - num_channels * 2.0 ** -20
        pixels = batch_size * num_pixels
        counts = core.run_tasks(_count_off_simplex, [
            (values, bits, num_channels, num_pixels, *_block_bounds(pixels, blocks, block),
             bits_of_one, slack) for block in range(blocks)])
    else:
        counts = core.run_tasks(_count_outside, [
            (values, bits, *_block_bounds(values.size, blocks, block),
             value_check == "finite", bits_of_one) for block in range(blocks)])
    return sum(counts) == 0


def _narrow_labels(
    labels: torch.Tensor, ignore_index: int | None, num_channels: int, plan_labels=None,
) -> tuple[np.ndarray, int]:
    """Flat labels for the kernels and the ignore label they use: ``plan_labels`` (the
    plan's, from :func:`label_census`) when given.

    Every channel's segment re-reads the labels: with 2 to 254 classes they go as uint8 (8x
    less to read per segment), the ignore label becoming C + 1 and a label outside [0, C)
    (only where values were not checked) C, which no segment has as foreground. With one
    channel (the binary hinge, a sigmoid's one channel) each label is read once, so the
    kernels read the int64 labels themselves: narrowing would be one more pass over them
    (a hinge image of 1024² with few positive errors took 1.46-1.48x as long with it).
    """
    if plan_labels is not None:
        return plan_labels
    census = label_census(labels, num_channels, ignore_index)
    if census is None:
        flat = np.ascontiguousarray(labels.to(torch.int64).numpy()).reshape(-1)
        return flat, 0 if ignore_index is None else ignore_index
    return census.labels


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
        # a floor set puts memory first: no gradient memory held between calls
        grad = output("numba loss gradient", values.shape, values.dtype,
                      zeroed=np.unique(value_base).size != all_segments,  # else all written
                      keep=not budget_is_strict(_CPU))
        narrow_labels, ignore_label = _narrow_labels(labels, plan.ignore_index, num_channels,
                                                     plan.backend_labels)
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
        # narrowed labels and widened 16-bit scores are the call's own; arrays read as they
        # are, the caller's
        held = (narrow_labels.nbytes if narrow_labels.dtype == np.uint8 else 0) + (
            _widened_bytes(scores, values))
        segment_loss = _run_batch(batch, counted.size,
                                  _scratch_budget(call_budget_bytes(scores), held))
        total = float(np.dot(segment_loss, batch.grad_scale))
    else:
        grad = np.zeros(values.shape, dtype=values.dtype)
        total = 0.0
    return (
        torch.tensor(total, dtype=torch.float64, device=scores.device),
        torch.from_numpy(grad).to(_compute_dtype(scores.dtype)),
    )


def availability() -> tuple[bool, str]:
    """``(True, "")`` when numba is importable, else ``(False, install hint)``."""
    return (True, "") if core.NUMBA_AVAILABLE else (False, _INSTALL_HINT)


def details() -> str:
    """numba version, thread count and the sort in use, for ``lovasz-kernels info``."""
    if not core.NUMBA_AVAILABLE:
        return _INSTALL_HINT
    measured = core.measured_sort_choice()
    sort = (f"sort: {core.SORT_NAMES[measured.host]} (measured fastest here)" if measured
            else "sort: measured on first use")
    threads = core.thread_count()
    costs = kept_or_saved(_split_costs, threads, split_choice_path(), _split_key(threads),
                          _decode_split_costs)
    split = ("segments split across threads: measured on first use" if costs is None else
             "one segment of {} / {} pixels, whole {} / {} ms, split {} / {} ms".format(
                 *SPLIT_MEASURED_PIXELS, *costs.whole_ms, *costs.split_ms))
    return (f"numba {core.numba.__version__}, {threads} threads (nogil kernels on "
            f"blocking worker threads; numba's threading layer is not used), {sort}; {split}")


__all__ = ["availability", "check_scores", "details", "label_census", "lovasz_extension",
           "lovasz_loss"]
