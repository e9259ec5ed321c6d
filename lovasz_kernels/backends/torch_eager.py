"""The ``torch`` backend: eager PyTorch, CPU and CUDA, one batched sort for all segments (on
the CPU, long rows get one radix sort each, and shorter ones a radix sort or numpy's sort of
packed keys where that was measured faster on this machine:
:mod:`lovasz_kernels._torch_sort`; a small chunk of packed rows goes on in numpy after the
sort, :func:`_extension_in_numpy`, and a small float32 call runs in numpy from the scores
on, :func:`lovasz_loss`)."""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch

from lovasz_kernels._jaccard import count_dtype, jaccard_increments, union_and_background
from lovasz_kernels._masked import count_true
from lovasz_kernels._plan import (
    SegmentPlan,
    budget_is_strict,
    chunk_allowance_bytes,
    chunk_floor_bytes,
    rows_at_least_threads,
)
from lovasz_kernels._scratch import new_kept_store
from lovasz_kernels._torch_sort import (
    MEASURED_FRACTIONS,
    PACKED,
    RADIX,
    RADIX_SORT_MIN_PIXELS,
    forced_method,
    holds_buffers,
    packed_sort_descending_arrays,
    saved_short_row_speedups,
    sort_descending,
    sort_method,
    sort_picked_descending,
)
from lovasz_kernels._validate import compute_dtype

_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64}
#: a chunk's work arrays (:func:`_extension_block`), widest first, in two blocks: the sort's
#: outputs (its order, the sorted keys), then what follows it (the increments, the sorted
#: labels), allocated, before a sort that holds buffers of its own, once those are freed
_SORT_DTYPES = {dtype: (torch.int64, _SAME_WIDTH_INT[dtype]) for dtype in _SAME_WIDTH_INT}
_AFTER_SORT_DTYPES = {dtype: (dtype, torch.bool) for dtype in _SAME_WIDTH_INT}


def temporary_bytes_per_pixel(dtype: torch.dtype) -> int:
    """A chunk's temporaries per pixel on errors of ``dtype`` (float32 or float64), besides
    the inputs and the gradient: the blocks (int64 order, sorted keys, increments, sorted
    labels), plus one for what each row adds (torch.sort's index row, the positions 1..P, a
    column block of the float64 loss sum): 18 bytes in float32, 26 in float64."""
    return 8 + 2 * dtype.itemsize + 1 + 1


# below this size the work arrays are allocated one by one: on small calls three views per
# array cost more than an allocation, and the heap does not fragment
_ONE_BLOCK_MIN_BYTES = 1 << 20


# The work arrays of CPU chunks of at most this many elements are kept between calls, per
# thread, for at most KEPT_WORK_SHAPES shapes (under 1 MB in all): there an allocation costs
# as much as a pass over the array, and a training loop calls with the same shapes every
# step (one 64² hinge image: 3-8% of the call). Never on a GPU, where a kernel on another
# stream could still be reading them; inference-mode arrays are kept apart (they cannot be
# written outside it). Every array is written in full before it is read.
KEPT_WORK_MAX_ELEMENTS = 8192
KEPT_WORK_SHAPES = 4
_kept_work = threading.local()


def _work_arrays(shape: torch.Size, dtypes: tuple[torch.dtype, ...], device: torch.device):
    """Arrays of ``shape``, one per dtype (widest first, so every view is aligned), carved
    from one allocation when large, kept between calls when small (``KEPT_WORK_MAX_ELEMENTS``;
    no two requests of one call may ask for the same shape and dtypes)."""
    if device.type == "cpu" and shape.numel() <= KEPT_WORK_MAX_ELEMENTS:
        return _kept_work_arrays(shape, dtypes)
    sizes = [shape.numel() * dtype.itemsize for dtype in dtypes]
    if sum(sizes) < _ONE_BLOCK_MIN_BYTES:
        return [torch.empty(shape, dtype=dtype, device=device) for dtype in dtypes]
    block = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    arrays, offset = [], 0
    for dtype, size in zip(dtypes, sizes):
        arrays.append(block[offset:offset + size].view(dtype).view(shape))
        offset += size
    return arrays


def _kept_work_arrays(shape: torch.Size, dtypes: tuple[torch.dtype, ...]) -> list[torch.Tensor]:
    """This thread's CPU arrays of ``shape`` and ``dtypes``, made on first request."""
    kept = getattr(_kept_work, "arrays", None)
    if kept is None:
        kept = _kept_work.arrays = new_kept_store()
    key = (tuple(shape), dtypes, torch.is_inference_mode_enabled())
    arrays = kept.get(key)
    if arrays is None:
        if len(kept) >= KEPT_WORK_SHAPES:
            kept.clear()
        arrays = kept[key] = [torch.empty(shape, dtype=dtype) for dtype in dtypes]
    return arrays


# a float64 sum of a float32 array converts the whole array first (8 bytes per pixel, the
# call's peak): summed in this many column blocks, the copy is an eighth of that
_SUM_BLOCKS = 8
# ... and on the CPU, many short rows are summed this many elements at a time (40 rows of
# 64² pixels: the whole float64 copy was the call's peak)
_SUM_GROUP_ELEMENTS = 1 << 16


def _row_sums_float64(values: torch.Tensor) -> torch.Tensor:
    """Σ over the last dimension, accumulated in float64, without a float64 copy of it all."""
    num_rows, num_columns = values.shape
    width = max(-(-num_columns // _SUM_BLOCKS), 4096)
    step = num_rows
    if values.device.type == "cpu":
        step = max(1, _SUM_GROUP_ELEMENTS // min(width, num_columns))
    if step >= num_rows:
        return _column_block_sums(values, width)
    total = torch.empty(num_rows, dtype=torch.float64, device=values.device)
    for start in range(0, num_rows, step):
        total[start:start + step] = _column_block_sums(values[start:start + step], width)
    return total


def _column_block_sums(values: torch.Tensor, width: int) -> torch.Tensor:
    if width >= values.shape[1]:  # one block: no slice (an op of its own)
        return values.sum(dim=1, dtype=torch.float64)
    total = values[:, :width].sum(dim=1, dtype=torch.float64)
    for start in range(width, values.shape[1], width):
        total += values[:, start:start + width].sum(dim=1, dtype=torch.float64)
    return total


def lovasz_extension(errors: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (S,) and gradient (S, P) of the Lovász extension, segments in chunks of rows
    whose temporaries (:func:`temporary_bytes_per_pixel`) stay within the gradient's size
    (``chunk_floor_bytes`` at least): the extension called on many segments at once needs
    about twice its input, not six times. Each chunk's gradient rows double as its work
    array. A loss call's chunks (``generic_lovasz_loss``) are already that small."""
    grad = torch.empty(errors.shape, dtype=compute_dtype(errors.dtype), device=errors.device)
    loss, grad = _extension_into(errors, fg, grad)
    return loss.to(grad.dtype), grad.to(errors.dtype)


def lovasz_extension_(errors: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lovasz_extension` on errors the caller gives up (the loss layer's own): when
    they are contiguous and in the compute dtype their storage becomes the gradient, which
    each row overwrites once its errors are read (one array of the input's size less).
    The losses then stay in float64, as the loss path sums them (two conversions less)."""
    if errors.dtype != compute_dtype(errors.dtype) or not errors.is_contiguous():
        return lovasz_extension(errors, fg)
    return _extension_into(errors, fg, errors)


def _extension_into(errors: torch.Tensor, fg: torch.Tensor,
                    grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The extension's float64 losses, its gradient written into ``grad`` (contiguous,
    compute dtype; ``errors`` itself is allowed: each chunk reads its rows before it writes
    them)."""
    num_segments, num_pixels = errors.shape
    budget = chunk_allowance_bytes()  # a chunk of a strictly budgeted loss call
    if budget is None:
        budget = max(grad.numel() * grad.dtype.itemsize, chunk_floor_bytes(grad.device))
    row_bytes = num_pixels * temporary_bytes_per_pixel(grad.dtype)
    step = rows_at_least_threads(budget // row_bytes, grad.device)
    if step >= num_segments:
        loss = _extension_chunk(errors, fg, grad, budget)
    else:
        # whether a settled tail is worth looking for, decided once: a chunk's look costs
        # 0.2-0.3 ms inside a call, a dozen chunks 2-3% of a 512² x 21 call that has none
        settled = (num_pixels < TOP_K_MIN_PIXELS or errors.device.type != "cpu"
                   or not _sample_needs_many(errors[:1], fg[:1]))
        loss = torch.cat([_extension_chunk(errors[start:start + step], fg[start:start + step],
                                           grad[start:start + step], budget, settled)
                          for start in range(0, num_segments, step)])
    return loss, grad


# A chunk whose rows each need at most this fraction of their pixels sorted (see
# _needed_keys: a trained model's hinge, whose margins are above 1 almost everywhere, or a
# softmax over many classes, whose background pixels past the last fg pixel need no order)
# sorts only those, the k largest keys of each row (torch.topk), on the CPU, where the count
# is free to read. One hinge image on the development VM, forward + backward, top k against
# sorting every pixel: 1024² 1.7x as fast with 1% of the errors positive, 1.3x with 5%, even
# at 12.5%, 0.6x at 25%
TOP_K_MAX_FRACTION = 1 / 16
# rows shorter than this are sorted whole: there one sort costs little next to the call
TOP_K_MIN_PIXELS = 1 << 14
# pixels of the first row looked at before counting: where few of these are positive (a
# trained hinge) the positive errors are counted; where most are (every softmax, a hinge
# early in training), a larger sample of the first row, then the whole first row, say
# whether the settled tails leave few keys before every row is counted
TOP_K_SAMPLE = 256
# that larger sample: runs of contiguous pixels spread over the row, enough fg pixels among
# them that their smallest error comes near the row's (on the 2-core Intel VM, one 512² x 21
# row of trained-like scores: 0.1 ms against 0.65 for counting the row). Its count is low,
# not high, and 4096 pixels count 1/16 of them within about 4%: a row is passed over from
# TOP_K_SETTLED_MARGIN times the fraction
TOP_K_SETTLED_SAMPLE = 4096
TOP_K_SETTLED_BLOCKS = 16
TOP_K_SETTLED_MARGIN = 1.25


def _needed_keys(errors: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """The keys each row of ``errors`` needs sorted, (S, 1) int64: its errors from the largest
    down to its smallest fg error where every fg error is positive, else its positive errors.

    Errors ≤ 0 neither add to the loss nor get a gradient. Past a row's last fg pixel in
    sorted order every increment is 0 (the intersection is empty: the settled tail), so the
    background pixels there need no order either, and with no fg pixel only the largest
    errors (the first pixel's increment is 1, the others' 0). An fg error ≤ 0 still counts
    in n_fg and sorts after every positive error, so past the last positive fg error the
    increments go on: such a row needs every positive error.
    """
    dtype = errors.dtype
    fg_smallest = torch.where(fg, errors, torch.tensor(torch.inf, dtype=dtype)).amin(
        dim=1, keepdim=True)
    has_fg = fg.any(dim=1, keepdim=True)
    bound = fg_smallest if bool(has_fg.all()) else torch.where(
        has_fg, fg_smallest, errors.amax(dim=1, keepdim=True))
    # a bound ≤ 0 (an fg error ≤ 0, or no positive error at all): the positive errors
    smallest_positive = torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype))
    return count_true(errors >= torch.clamp(bound, min=smallest_positive))


def _sample_needs_many(errors: torch.Tensor, fg: torch.Tensor) -> bool:
    """Whether a sample of the (1, P) row already needs more than ``TOP_K_SETTLED_MARGIN``
    times ``TOP_K_MAX_FRACTION`` of its keys: the sample's smallest fg error is at least the row's,
    so its count under-estimates the row's (a softmax over few classes, or a trained one:
    its surest fg pixel is sure beyond most background ones).

    The sample is ``TOP_K_SETTLED_BLOCKS`` runs of contiguous pixels spread over the row (a
    strided one reads a cache line per pixel, and the row is new to the cache), counted in
    numpy (a dozen torch ops on a few thousand values cost 0.25 ms, in every chunk).
    """
    blocks = TOP_K_SETTLED_BLOCKS
    stride = errors.shape[1] // blocks
    width = min(stride, TOP_K_SETTLED_SAMPLE // blocks)

    def runs(row: torch.Tensor) -> np.ndarray:
        return row[0, :blocks * stride].view(blocks, stride)[:, :width].numpy().reshape(-1)

    sample = runs(errors.detach() if errors.dtype in (torch.float32, torch.float64)
                  else errors.detach().float())
    sample_fg = runs(fg)
    bound = sample[sample_fg].min() if sample_fg.any() else sample.max()
    smallest_positive = np.nextafter(sample.dtype.type(0), sample.dtype.type(1))
    needed = np.count_nonzero(sample >= max(bound, smallest_positive))
    return needed > TOP_K_SETTLED_MARGIN * TOP_K_MAX_FRACTION * sample.size


def _few_needed(errors: torch.Tensor, fg: torch.Tensor, settled: bool = True) -> int | None:
    """The most keys a row of ``errors`` needs sorted (:func:`_needed_keys`) when every row
    needs at most ``TOP_K_MAX_FRACTION`` of its pixels (CPU rows of ``TOP_K_MIN_PIXELS`` or
    more), else None. Without ``settled`` (a call whose first row's sample needs many keys,
    :func:`_sample_needs_many`), rows with mostly positive errors are not looked at."""
    num_pixels = errors.shape[1]
    if errors.device.type != "cpu" or num_pixels < TOP_K_MIN_PIXELS or not errors.shape[0]:
        return None
    most = num_pixels * TOP_K_MAX_FRACTION
    step = num_pixels // TOP_K_SAMPLE
    sample = errors[:1, ::step]
    if int(count_true(sample > 0)) <= 2 * TOP_K_MAX_FRACTION * sample.numel():
        # few positive (a trained hinge): they bound what a row needs, and they are
        # cheaper to count
        needed = int(count_true(errors > 0).max())
    elif not settled or _sample_needs_many(errors[:1], fg[:1]):
        return None
    else:
        # a row's smallest fg error is an extreme that no sample estimates: the first row is
        # counted whole before the others are
        needed = int(_needed_keys(errors[:1], fg[:1]))
        if needed <= most and errors.shape[0] > 1:
            needed = int(_needed_keys(errors, fg).max())
    # no positive error at all (a model that gets every pixel right by a margin): one key
    # each, a zero, whose increment the error's sign clears: a loss of 0, a gradient of 0
    return max(needed, 1) if needed <= most else None


def _extension_chunk(errors: torch.Tensor, fg: torch.Tensor, grad: torch.Tensor,
                     budget: int, settled: bool = True) -> torch.Tensor:
    """One chunk's float64 losses, its gradient written into ``grad``: only the keys each row
    needs sorted where they are few (:func:`_few_needed`); long rows with fewer
    positive errors, or whose work arrays would not fit in ``budget`` bytes, a range of
    errors at a time (:func:`_extension_by_ranges`, :func:`_ranges_pay`); else every pixel
    at once."""
    needed = _few_needed(errors, fg, settled)
    if needed is not None:
        return _extension_top(errors, fg, grad, needed)
    num_rows, num_pixels = errors.shape
    over_budget = num_pixels * temporary_bytes_per_pixel(grad.dtype) > budget
    if not over_budget and (errors.device.type != "cpu"
                            or num_pixels < POSITIVES_ONLY_MIN_PIXELS):
        return _extension_rows(errors, fg, grad)
    by_ranges = [_ranges_pay(errors[row:row + 1], over_budget) for row in range(num_rows)]
    if not any(by_ranges):
        return _extension_rows(errors, fg, grad)
    # the row's pick of a range, 1 byte a pixel, comes out of the budget too; and however
    # small the budget, at most RANGES_MOST ranges (each is a pass over the row)
    range_pixels = max((budget - num_pixels) // _range_bytes_per_pixel(grad),
                       -(-num_pixels // RANGES_MOST), 1)
    losses = []
    for row, ranges in enumerate(by_ranges):
        rows = slice(row, row + 1)
        extension = (_extension_by_ranges(errors[rows], fg[rows], grad[rows], range_pixels)
                     if ranges else _extension_rows(errors[rows], fg[rows], grad[rows]))
        losses.append(extension)
    return torch.cat(losses)


def _extension_top(errors: torch.Tensor, fg: torch.Tensor, grad: torch.Tensor,
                   count: int) -> torch.Tensor:
    """:func:`_extension_block` on each row's ``count`` largest errors (every key it needs:
    :func:`_needed_keys`), taken by ``torch.topk`` from the same clamped keys; the increments
    count each whole row's foreground. Rows that need fewer take some more: zeros, whose
    increments the errors' sign clears, or background pixels past the last fg pixel, whose
    increments are 0."""
    dtype = grad.dtype
    keys = torch.clamp(errors.to(dtype), min=0, out=grad).view(_SAME_WIDTH_INT[dtype])
    fg_total = count_true(fg)
    keys_sorted, order = torch.topk(keys, count, dim=1)
    errors_sorted = keys_sorted.view(dtype)
    increments = jaccard_increments(torch.gather(fg, 1, order), dtype, fg_total=fg_total,
                                    row_pixels=errors.shape[1])
    increments.mul_(torch.sign(errors_sorted))
    loss = _row_sums_float64(torch.mul(errors_sorted, increments))
    grad.zero_().scatter_(1, order, increments)
    return loss


# A row sorted a range at a time holds, per pixel of one range: its positions (int64), keys
# and labels, the sorted keys, the sort's order (int64) and a radix sort's own buffers, the
# sorted labels, the increments and their positions 1..n: measured 39.6 bytes in float32 and
# 66.7 in float64 (4M-pixel rows, ranges of 2^19), plus the row's pick (1 byte per pixel of
# the row); rounded up.
RANGE_BYTES_PER_PIXEL = {torch.float32: 48, torch.float64: 80}
# Under a strict budget (small ranges: each one's pick, a pass over the row, is most of the
# time) a float32 range on the CPU is sorted as its positions with the keys packed in
# (:func:`~lovasz_kernels._torch_sort.sort_picked_descending`): no order, no copy of the keys
# or labels, no radix buffers: 28.6 bytes measured the same way, so 1.5x as many pixels fit a
# range (a 1024² hinge image with the floor at 0 set: 1.13x as fast, 1024² x 2 1.22x). With
# the default budget's large ranges the radix sort is faster (8 x 1024² x 2: 0.90x packed):
# its two scatters stay in cache where one through sorted positions jumps across the row
PACKED_RANGE_BYTES_PER_PIXEL = 32
# keys looked at to place the ranges' edges: every (P / RANGE_SAMPLE)-th one
RANGE_SAMPLE = 1 << 12


# A row over the budget is sorted a range at a time from RANGES_MIN_PIXELS if at most
# RANGES_MAX_POSITIVE_SHARE of a strided sample of its errors is positive, and from
# RANGES_ANY_SHARE_MIN_PIXELS whatever the share; shorter rows are sorted whole. Each range
# costs a pass over the whole row to pick it, which sorting fewer keys in cache pays for only
# on long rows where some errors are not sorted at all. Loss calls on the development VM,
# batch IoU, ranges against whole rows toggled call by call (tests/perf/long_rows.py
# --toggle): a hinge of random logits (84% positive) 0.82-0.84x as fast at 2 x 1024² (once
# 1.03x), 1.09-1.33x at 4 x 1024², 1.08-1.24x at 8 x 1024²; two classes (every error
# positive) 0.77-0.83x at 4 x 1024², 0.95-1.12x at 8 x 1024²
RANGES_MIN_PIXELS = 1 << 22
RANGES_ANY_SHARE_MIN_PIXELS = 1 << 23
RANGES_MAX_POSITIVE_SHARE = 7 / 8
# at most this many ranges a row, each a pass over it (a strict budget of about the row's
# gradient gives about 24 in float32)
RANGES_MOST = 64
# Rows within the budget go by ranges too, on the CPU, from POSITIVES_ONLY_MIN_PIXELS with at
# most POSITIVES_ONLY_MAX_SHARE of a sample positive (a hinge partly trained): the ranges,
# usually one, sort only the positive errors. The extension alone, toggled call by call:
# rows of 2^18 and 2^20 pixels 1.2-4.4x as fast at 8-45% positive, 0.88-1.01x at 55%; rows
# of 2^16 only at 8% (where the top k already runs). Hinge images, loss calls
# (tests/perf/few_keys.py --torch-positives): 512² 1.24-1.42x at 10-30% positive, 0.93x at
# 40%; 1024² 1.13-2.13x at 10-30%, 1.09x at 40%
POSITIVES_ONLY_MIN_PIXELS = 1 << 18
POSITIVES_ONLY_MAX_SHARE = 0.3


def _packs_ranges(grad: torch.Tensor) -> bool:
    """Whether a row's ranges are sorted as packed positions: under a strict budget, in
    float32 on the CPU (an int32 key and a position under 2^32 fit in 64 bits)."""
    return (grad.device.type == "cpu" and grad.dtype == torch.float32
            and grad.shape[-1] <= 1 << 32 and budget_is_strict(grad.device))


def _range_bytes_per_pixel(grad: torch.Tensor) -> int:
    """What a row's range holds a pixel of it (:data:`RANGE_BYTES_PER_PIXEL`, or
    :data:`PACKED_RANGE_BYTES_PER_PIXEL` where :func:`_packs_ranges`)."""
    if _packs_ranges(grad):
        return PACKED_RANGE_BYTES_PER_PIXEL
    return RANGE_BYTES_PER_PIXEL[grad.dtype]


def _ranges_pay(errors: torch.Tensor, over_budget: bool) -> bool:
    """Whether one row (1, P) is sorted a range at a time: over the budget, from
    :data:`RANGES_MIN_PIXELS` with few enough positive errors in a strided sample and from
    :data:`RANGES_ANY_SHARE_MIN_PIXELS` whatever their share, at any length where the budget
    is strict (:func:`~lovasz_kernels._plan.budget_is_strict`); within it, on the CPU, from
    :data:`POSITIVES_ONLY_MIN_PIXELS` with at most :data:`POSITIVES_ONLY_MAX_SHARE`
    positive."""
    num_pixels = errors.shape[1]
    if over_budget and (num_pixels >= RANGES_ANY_SHARE_MIN_PIXELS
                        or budget_is_strict(errors.device)):
        return True
    positives_only = errors.device.type == "cpu" and num_pixels >= POSITIVES_ONLY_MIN_PIXELS
    long_over_budget = over_budget and num_pixels >= RANGES_MIN_PIXELS
    if not (positives_only or long_over_budget):
        return False
    sample = errors[0, ::max(num_pixels // RANGE_SAMPLE, 1)]
    share = int(count_true(sample > 0)) / sample.numel()
    return ((positives_only and share <= POSITIVES_ONLY_MAX_SHARE)
            or (long_over_budget and share <= RANGES_MAX_POSITIVE_SHARE))


def _range_edges(keys: torch.Tensor, range_pixels: int) -> list[int]:
    """Descending key values that cut the positive keys of one row into ranges of about
    ``range_pixels`` keys each (from a strided sample), ending with 0."""
    num_pixels = keys.shape[0]
    sample = keys[::max(num_pixels // RANGE_SAMPLE, 1)]
    positive = torch.sort(sample[sample > 0], descending=True).values
    estimate = positive.numel() * num_pixels / sample.numel()
    ranges = max(-(-int(estimate) // range_pixels), 1)
    picks = [positive.numel() * part // ranges for part in range(1, ranges)]
    return [*positive[picks].tolist(), 0]


def _extension_by_ranges(errors: torch.Tensor, fg: torch.Tensor, grad: torch.Tensor,
                         range_pixels: int) -> torch.Tensor:
    """One row's float64 loss (1,), its gradient written into ``grad`` (1, P), the positive
    errors sorted one range of values at a time, the largest first: about ``range_pixels``
    pixels' work arrays at once (:func:`_range_bytes_per_pixel`), not the row's.

    The keys stay in ``grad``; each range is the keys above its lower edge, picked in one
    pass (the ranges before have been taken out), sorted (as packed positions where
    :func:`_packs_ranges`, else by order and gather), and given the increments of those
    positions of the whole row (counts carried over from the ranges before). Its gradient
    goes in negated: a negative key is never picked again. Errors ≤ 0 are never picked, and
    keep a gradient of 0. Exact ties may be ordered differently from the whole-row sort
    (the sum over a group of ties does not change). A group of tied keys stays in one range:
    where the sample shows one larger than a range (two edges alike), the row is sorted
    whole instead.

    Each range's sort, gather and scatter stay in cache and errors ≤ 0 are not sorted at
    all, but picking a range is a pass over the whole row: :func:`_ranges_pay` says where
    that is worth it."""
    dtype = grad.dtype
    num_pixels = errors.shape[1]
    keys = torch.clamp(errors.to(dtype), min=0, out=grad).view(_SAME_WIDTH_INT[dtype])[0]
    edges = _range_edges(keys, range_pixels)
    if len(set(edges)) < len(edges):
        # a group of tied errors larger than a range (every logit 0, as a model may start,
        # ties every hinge error at 1): one range would hold it all, with more work arrays
        # per pixel than the whole row's sort; ``grad`` holds the clamped errors, which
        # clamp to themselves
        return _extension_block(grad, fg, grad)
    labels = fg[0]
    fg_total = count_true(fg)
    fg_before = torch.zeros_like(fg_total)
    pixels_before = 0
    reuse_keys_as_counts = count_dtype(num_pixels, dtype) == dtype
    packs = _packs_ranges(grad)
    loss = torch.zeros(1, dtype=torch.float64, device=errors.device)
    for edge in edges:
        positions = torch.nonzero(keys > edge).squeeze(1)  # ascending
        count = positions.numel()
        if not count:
            continue
        if packs:
            # the positions themselves end up sorted, the keys beside them: no order
            keys_sorted = sort_picked_descending(keys, positions).unsqueeze(0)
            labels_sorted = torch.index_select(labels, 0, positions).unsqueeze(0)
            order = counts = None
        else:
            range_keys = torch.index_select(keys, 0, positions).unsqueeze(0)
            range_labels = torch.index_select(labels, 0, positions).unsqueeze(0)
            keys_sorted = torch.empty_like(range_keys)
            order = torch.empty(range_keys.shape, dtype=torch.int64, device=errors.device)
            sort_descending(range_keys, keys_sorted, order)
            labels_sorted = torch.gather(range_labels, 1, order)
            del range_labels
            counts = range_keys.view(dtype) if reuse_keys_as_counts else None
        increments = jaccard_increments(
            labels_sorted, dtype, counts=counts, fg_total=fg_total, row_pixels=num_pixels,
            pixels_before=pixels_before, fg_before=fg_before)
        errors_sorted = keys_sorted.view(dtype)
        loss += _row_sums_float64(torch.mul(errors_sorted, increments, out=errors_sorted))
        fg_before += count_true(labels_sorted)
        pixels_before += count
        if order is None:
            grad[0].scatter_(0, positions, increments.neg_()[0])
            continue
        # back to the range's own order (in the sorted keys' buffer), then into the row in
        # ascending positions: two passes that stay in cache, where one scatter through the
        # sorted positions would jump across the whole row
        in_range_order = errors_sorted.scatter_(1, order, increments.neg_())
        grad[0].scatter_(0, positions, in_range_order[0])
    grad.abs_()  # the increments back to their sign; -0.0 (an error clamped from -0.0) to 0
    return loss


# Radix-sorted rows from this many pixels go through the extension one at a time (see
# _extension_rows): measured faster from a million pixels, slower at 262k
ROW_BY_ROW_MIN_PIXELS = 1 << 20


def _extension_rows(errors: torch.Tensor, fg: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The float64 losses of some segments, their gradient written into ``grad``.

    Radix-sorted rows of at least ``ROW_BY_ROW_MIN_PIXELS`` (sorted one by one anyway) go
    through :func:`_extension_block` one at a time, reusing one row's work arrays: 17 bytes
    per pixel of one row, not of every row (1024² x 2: 5.4x the input against 7.5x), and
    faster there (each pass over one row stays in cache). Shorter rows keep one pass over the
    chunk: the cumulative sum, gather and scatter of one row run on one thread, where the
    chunk's rows run in parallel (row by row cost 15% more at 262k-pixel rows)."""
    num_rows, num_pixels = errors.shape
    if num_rows == 1 or num_pixels < ROW_BY_ROW_MIN_PIXELS or sort_method(errors) != RADIX:
        return _extension_block(errors, fg, grad)
    sort_work = _work_arrays(errors[:1].shape, _SORT_DTYPES[grad.dtype], errors.device)
    return torch.cat([_extension_block(errors[row:row + 1], fg[row:row + 1],
                                       grad[row:row + 1], sort_work)
                      for row in range(num_rows)])


def _extension_block(errors: torch.Tensor, fg: torch.Tensor, grad: torch.Tensor,
                     sort_work: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The float64 losses of some segments, their gradient written into ``grad`` (contiguous).

    Errors ≤ 0 (``-inf`` padding included) neither add to the loss nor get a gradient, and
    they sort after every positive error: clamped to 0, every key is a non-negative float,
    whose bit pattern orders like its value. So one descending sort of those bits as integers
    (faster than a float sort: no NaN handling) orders all segments together and gives back
    the sorted errors with no second pass (on the CPU, long rows are radix-sorted one by one
    instead, and short ones may be: :func:`~lovasz_kernels._torch_sort.sort_descending`).
    Increments, the loss dot product (accumulated in float64) and the scatter of the
    gradient back to original positions are each one vectorized pass: every pass is one more
    wake-up of torch's thread pool, which on a busy machine costs more than the pass.

    Memory: ``grad`` holds the keys, then the counts, then the errors' signs, then the
    loss's products, then the gradient; blocks (:func:`_work_arrays`) hold the sort's
    outputs (``sort_work``, which rows run one by one share) and the increments and the
    sorted labels: 12 + 5 bytes per pixel in float32, the same sizes on every chunk of a
    call (a dozen arrays freed in between would fragment the heap). Before a radix sort or a
    sort of packed keys, which hold buffers of their own (8 bytes per pixel, a long row's
    peak), only the first block is allocated, the second after the sort; before a
    comparison sort, both at once.
    """
    dtype = grad.dtype
    shape = errors.shape
    torch.clamp(errors.to(dtype), min=0, out=grad)
    keys = grad.view(_SAME_WIDTH_INT[dtype])
    method = sort_method(keys)
    if _runs_in_numpy(method, grad):
        return _extension_in_numpy(fg, grad)
    after_sort = None
    if sort_work is not None:
        order, keys_sorted = sort_work
    elif holds_buffers(method):
        order, keys_sorted = _work_arrays(shape, _SORT_DTYPES[dtype], errors.device)
    else:  # a comparison sort holds no buffers of its own: one block, one allocation
        order, keys_sorted, *after_sort = _work_arrays(
            shape, _SORT_DTYPES[dtype] + _AFTER_SORT_DTYPES[dtype], errors.device)
    sort_descending(keys, keys_sorted, order, method)
    errors_sorted = keys_sorted.view(dtype)
    increments, labels_sorted = after_sort or _work_arrays(shape, _AFTER_SORT_DTYPES[dtype],
                                                           errors.device)
    torch.gather(fg, 1, order, out=labels_sorted)
    # the keys are dead once sorted: ``grad`` holds the counts, unless they need an integer
    jaccard_increments(labels_sorted, dtype,
                       counts=grad if count_dtype(shape[1], dtype) == dtype else None,
                       out=increments)
    # no increment where the error is 0 (a clamped -0.0 error included): times the error's
    # sign, 0 or 1, one float pass where a masked fill by a comparison takes two slow ones on
    # the CPU (lovasz_kernels._masked); ``grad`` is free again
    increments.mul_(torch.sign(errors_sorted, out=grad))
    loss = _row_sums_float64(torch.mul(errors_sorted, increments, out=grad))
    grad.scatter_(1, order, increments)
    return loss


# A chunk of at most this many pixels whose rows are sorted as packed keys by numpy (short
# rows, on machines where that was measured faster) runs in numpy from the sort on: the same
# closed form and roundings, numpy's few-microsecond ops on small arrays in place of torch's,
# each of which costs 5-10 us however small. The extension, packed keys forced, numpy from the
# sort against torch ops after it, toggled call by call on the development VM: 1.22-1.34x as
# fast for one row of 1024-24576 pixels, 1.11-1.23x for 2-16 rows of up to 2^15 pixels in
# all; 21 x 4096 0.97x, 40 x 4096 0.92x (torch's ops spread over the threads):
# python tests/perf/numpy_finish.py
NUMPY_MAX_PIXELS = 1 << 15


def _runs_in_numpy(method: str, grad: torch.Tensor) -> bool:
    """Whether :func:`_extension_block` goes on in :func:`_extension_in_numpy`: rows sorted
    as packed keys (never under a floor set, see
    :func:`~lovasz_kernels._torch_sort.sort_method`), float32, at most
    :data:`NUMPY_MAX_PIXELS` in all."""
    return (method == PACKED and grad.dtype == torch.float32
            and grad.numel() <= NUMPY_MAX_PIXELS)


def _extension_in_numpy(fg: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """:func:`_extension_block` from its keys on (the clamped errors' bits, in ``grad``), on
    numpy views of the same arrays (:func:`_extension_arrays`). Returns the float64 losses
    (S,)."""
    return torch.from_numpy(_extension_arrays(fg.numpy(), grad.numpy()))


def _extension_arrays(fg: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """The extension of float32 rows whose clamped errors (>= 0, or -0.0) are in ``grad``
    (S, P), contiguous, foreground ``fg`` (S, P) bool: the packed keys' sort, the sorted
    labels, the increments (:func:`union_and_background`; counts exact in float32 under 2^24
    pixels), times the sorted errors' signs, the float64 row sums of their products, the
    increments scattered into ``grad``. Returns the float64 losses (S,)."""
    keys_sorted = np.empty(grad.shape, dtype=np.int32)
    order = np.empty(grad.shape, dtype=np.int64)
    packed_sort_descending_arrays(grad.view(np.int32), keys_sorted, order)
    errors_sorted = keys_sorted.view(np.float32)
    # row by row: a fancy index of one row costs a sixth of take_along_axis on a few rows
    labels_sorted = np.stack([fg[row][row_order] for row, row_order in enumerate(order)])
    # an integer running count, then exact floats: a cumulative sum from bools into
    # float32 is three times slower
    counts = np.cumsum(labels_sorted.view(np.uint8), axis=1, dtype=np.int32)
    counts = counts.astype(np.float32)
    with np.errstate(invalid="ignore"):  # U_0 = 1 gives 0/0: mended below
        union, background = union_and_background(counts, counts[:, -1:],
                                                 _numpy_positions(grad.shape[1]))
    increments = np.where(labels_sorted, 1 / union, background)
    first = increments[:, 0]
    first[np.isnan(first)] = 1.0  # U_0 = 1: 0/0, as in jaccard_increments
    increments *= np.sign(errors_sorted)  # no increment where the error is 0
    loss = np.sum(errors_sorted * increments, axis=1, dtype=np.float64)
    for row, row_order in enumerate(order):
        grad[row][row_order] = increments[row]
    return loss


# A whole loss call of at most this many (segment, pixel) pairs on the CPU in float32 runs in
# numpy from the scores on (:func:`lovasz_loss`): the errors, the extension
# (:func:`_extension_arrays`) and the signed, weighted gradient, a dozen numpy ops where the
# generic path's errors, chunking and signs take twice as many torch ops, each 2-10 us
# however small. Every op of a call costs more inside it than timed alone (the rest of the
# call evicts its code from the caches), so the count is what decides. Forward + backward,
# the two paths toggled call by call in one process on a 2-core Intel Xeon VM: one hinge
# image 32² 491-498 -> 408-420 us, 64² 576 -> 514-518 us; 2 x 32² x 5 softmax per image
# 1304-1313 -> 923-933 us. The gain fades with the pixels (numpy's ops run on one thread, its
# gather and scatter row by row): 1.07x at one 128² image and 1.02x at 4 x 64² (2^14 pairs),
# 0.99-1.01x at 2^14-2^15 pairs, 0.95-0.98x at 8 x 64² (python tests/perf/small_call_numpy.py)
SMALL_CALL_MAX_PIXELS = 1 << 14


def lovasz_loss(scores: torch.Tensor, labels: torch.Tensor,
                plan: SegmentPlan) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The registry's fused loss path (:mod:`lovasz_kernels._registry`) for small calls:
    CPU scores whose compute dtype is float32 and at most :data:`SMALL_CALL_MAX_PIXELS`
    (segment, pixel) pairs run in numpy (:func:`_loss_in_numpy`). Elsewhere None: the
    generic path runs the call, as it does on a GPU, in float64, under a floor set (numpy's
    arrays are outside the budget), under deterministic algorithms or a forced sort other
    than the packed one (both keep short rows on the comparison sort there)."""
    num_segments, (batch, _, num_pixels) = plan.num_segments, scores.shape
    pairs = num_segments * num_pixels * (batch if plan.image is None else 1)
    if (scores.device.type != "cpu" or compute_dtype(scores.dtype) != torch.float32
            or not 0 < pairs <= SMALL_CALL_MAX_PIXELS or budget_is_strict(scores.device)
            or torch.are_deterministic_algorithms_enabled()
            or forced_method() not in (None, PACKED)):
        return None
    return _loss_in_numpy(scores, labels, plan)


#: the fused path runs multilabel plans too (see lovasz_kernels._registry)
FUSED_MULTILABEL = True


def _loss_in_numpy(scores: torch.Tensor, labels: torch.Tensor,
                   plan: SegmentPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """A loss call's 0-d float64 total and float32 gradient (B, C, P) as the generic path
    with the numpy finish gives them, bit for bit, in numpy: the segments' errors (1 - s on
    foreground, s + ``bg_offset`` elsewhere, 0 where ignored, clamped at 0), the extension,
    the weight and the sign (v - 2v·m, as :func:`~lovasz_kernels._masked.negate_where_`),
    and the rows put in their places."""
    batch, num_channels, num_pixels = scores.shape
    values = scores.detach().to(torch.float32).numpy()
    label_values = labels.numpy()
    channel = plan.channel.numpy()
    num_segments = channel.shape[0]
    if plan.image is None:  # a segment is one channel of every image, image after image
        segment_values = values[:, channel].transpose(1, 0, 2).reshape(num_segments, -1)
        segment_labels = (label_values[:, channel].transpose(1, 0, 2).reshape(num_segments, -1)
                          if plan.multilabel else label_values.reshape(1, -1))
    else:
        rows = plan.image.numpy() * num_channels + channel
        segment_values = values.reshape(-1, num_pixels)[rows]
        segment_labels = (label_values.reshape(-1, num_pixels)[rows] if plan.multilabel
                          else label_values[plan.image.numpy()])
    one_fg_label = plan.multilabel or num_channels == 1
    fg = segment_labels == (1 if one_fg_label else plan.fg_label.numpy()[:, None])
    errors = np.where(fg, 1 - segment_values, segment_values + plan.bg_offset)
    if plan.ignore_index is not None:
        ignored = segment_labels == plan.ignore_index
        fg &= ~ignored
        np.copyto(errors, 0, where=ignored)
    np.maximum(errors, 0, out=errors)
    segment_loss = _extension_arrays(fg, errors)
    if plan.uniform_weight is None:
        errors *= plan.weight.numpy()[:, None].astype(np.float32)
    elif plan.uniform_weight != 1.0:
        errors *= plan.uniform_weight
    errors -= 2 * errors * fg
    if plan.image is None:
        per_channel = errors.reshape(num_segments, batch, num_pixels).transpose(1, 0, 2)
        if plan.dense:
            grad = np.ascontiguousarray(per_channel)
        else:
            grad = np.zeros(values.shape, dtype=np.float32)
            grad[:, channel] = per_channel
    elif plan.dense:  # every (image, channel) in order: the rows are the gradient
        grad = errors.reshape(values.shape)
    else:
        grad = np.zeros((batch * num_channels, num_pixels), dtype=np.float32)
        grad[rows] = errors
    loss = torch.dot(torch.from_numpy(segment_loss), plan.weight)
    return loss, torch.from_numpy(grad).view(scores.shape)


@functools.lru_cache(maxsize=8)
def _numpy_positions(num_pixels: int) -> np.ndarray:
    """1, 2, …, ``num_pixels`` in float32, made once per size; never written."""
    positions = np.arange(1, num_pixels + 1, dtype=np.float32)
    positions.flags.writeable = False
    return positions


def details() -> str:
    """The CPU sorts in use, for ``lovasz-kernels info``."""
    threads = torch.get_num_threads()
    speedups = saved_short_row_speedups(threads)
    if speedups is None:
        measured = "measured on first use"
    else:
        sizes = ", ".join(str(int(fraction * RADIX_SORT_MIN_PIXELS))
                          for fraction in MEASURED_FRACTIONS)
        measured = "; ".join(
            f"{method} {', '.join(f'{value:g}x' for value in values)}"
            for method, values in speedups.items())
        measured = f"speedups over the comparison sort measured here at {sizes} pixels: {measured}"
    return (f"CPU: float32 calls of at most {SMALL_CALL_MAX_PIXELS} (segment, pixel) pairs "
            f"in numpy; rows of {RADIX_SORT_MIN_PIXELS} pixels or more radix-sorted one by "
            f"one, shorter ones padded or packed and sorted by numpy where that pays "
            f"({measured}; {threads} threads)")
