"""The ``torch`` backend: eager PyTorch, CPU and CUDA, one batched sort for all segments (on
the CPU, rows of 16384 pixels or more, or of 9216 when the comparison sort would run them on
one thread, get one radix sort each)."""

from __future__ import annotations

import torch

from lovasz_kernels._jaccard import count_dtype, jaccard_increments
from lovasz_kernels._plan import chunk_floor_bytes, rows_at_least_threads
from lovasz_kernels._validate import compute_dtype

_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64}
#: a chunk's work arrays (:func:`_extension_block`), widest first: the sort's order, the
#: sorted keys, the increments, the sorted labels
_WORK_DTYPES = {dtype: (torch.int64, _SAME_WIDTH_INT[dtype], dtype, torch.bool)
                for dtype in _SAME_WIDTH_INT}
#: a chunk's temporaries per pixel, float32, besides the inputs and the gradient: the block
#: (int64 order, sorted keys, increments, sorted labels), plus one for what each row adds
#: (torch.sort's index row, the positions 1..P, a column block of the float64 loss sum)
TEMPORARY_BYTES_PER_PIXEL = 8 + 4 + 4 + 1 + 1


# below this size the work arrays are allocated one by one: on small calls three views per
# array cost more than an allocation, and the heap does not fragment
_ONE_BLOCK_MIN_BYTES = 1 << 20


def _work_arrays(shape: torch.Size, dtypes: tuple[torch.dtype, ...], device: torch.device):
    """Arrays of ``shape``, one per dtype (widest first, so every view is aligned), carved
    from one allocation when large."""
    sizes = [shape.numel() * dtype.itemsize for dtype in dtypes]
    if sum(sizes) < _ONE_BLOCK_MIN_BYTES:
        return [torch.empty(shape, dtype=dtype, device=device) for dtype in dtypes]
    block = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    arrays, offset = [], 0
    for dtype, size in zip(dtypes, sizes):
        arrays.append(block[offset:offset + size].view(dtype).view(shape))
        offset += size
    return arrays


# a float64 sum of a float32 array converts the whole array first (8 bytes per pixel, the
# call's peak): summed in this many column blocks, the copy is an eighth of that
_SUM_BLOCKS = 8


def _row_sums_float64(values: torch.Tensor) -> torch.Tensor:
    """Σ over the last dimension, accumulated in float64, without a float64 copy of it all."""
    num_columns = values.shape[1]
    width = max(-(-num_columns // _SUM_BLOCKS), 4096)
    total = values[:, :width].sum(dim=1, dtype=torch.float64)
    for start in range(width, num_columns, width):
        total += values[:, start:start + width].sum(dim=1, dtype=torch.float64)
    return total


def lovasz_extension(errors: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (S,) and gradient (S, P) of the Lovász extension, segments in chunks of rows
    whose temporaries (``TEMPORARY_BYTES_PER_PIXEL``) stay within the gradient's size
    (``chunk_floor_bytes`` at least): the extension called on many segments at once needs
    about twice its input, not six times. Each chunk's gradient rows double as its work
    array. A loss call's chunks (``generic_lovasz_loss``) are already that small."""
    grad = torch.empty(errors.shape, dtype=compute_dtype(errors.dtype), device=errors.device)
    return _extension_into(errors, fg, grad)


def lovasz_extension_(errors: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lovasz_extension` on errors the caller gives up (the loss layer's own): when
    they are contiguous and in the compute dtype their storage becomes the gradient, which
    each row overwrites once its errors are read (one array of the input's size less)."""
    if errors.dtype != compute_dtype(errors.dtype) or not errors.is_contiguous():
        return lovasz_extension(errors, fg)
    return _extension_into(errors, fg, errors)


def _extension_into(errors: torch.Tensor, fg: torch.Tensor,
                    grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The extension with its gradient written into ``grad`` (contiguous, compute dtype;
    ``errors`` itself is allowed: each chunk reads its rows before it writes them)."""
    num_segments, num_pixels = errors.shape
    budget = max(grad.numel() * grad.dtype.itemsize, chunk_floor_bytes(grad.device))
    step = rows_at_least_threads(budget // (num_pixels * TEMPORARY_BYTES_PER_PIXEL), grad.device)
    if step >= num_segments:
        loss = _extension_rows(errors, fg, grad)
    else:
        loss = torch.cat([_extension_rows(errors[start:start + step], fg[start:start + step],
                                          grad[start:start + step])
                          for start in range(0, num_segments, step)])
    return loss.to(grad.dtype), grad.to(errors.dtype)


# PyTorch sorts a 1-D integer array of at least this many values (its grain size) in
# ascending order with a parallel radix sort on the CPU; a descending or a 2-D sort is a
# comparison sort. Row by row, radix-sorted: 4-5x faster per 262k-pixel row on the
# development VM, 2-3x for a whole 512² x 21 or 1024² x 2 sort. Shorter rows are padded up to
# it, which costs about as much as sorting a full one: worth it from half as many pixels
# (float32: 1.1-2.1x faster at 16384 pixels on 2 threads, 1.5x on one, whatever the rows).
RADIX_SORT_MIN_PIXELS = 32768
# The 2-D sort hands its rows to threads in tasks of one grain of values: rows that fit in one
# grain run on one thread, however many there are (measured: 2 x 12288 took twice 1 x 12288,
# 3 x 12288 not much more than 2). There the padded radix sort pays from this many pixels:
# the sort 1.1-1.6x faster at 9216-12288 pixels on 2 threads, 0.8-1.2x at 8192, and a whole
# hinge loss 0.74-0.89x the time at 12288-12544 pixels, 0.84-0.95x at 96²-100², either way at
# 90². With one thread, whose radix sort is not parallel either, from the second constant
# (1.2x at 12288, 0.9x at 9216). tests/perf/torch_sorts.py, with fresh keys every call: a
# comparison sort of the same keys over and over runs 2-4x faster at a few thousand pixels
# than on new ones, as in training.
LONE_ROW_RADIX_MIN_PIXELS = 96 * 96
LONE_ROW_RADIX_MIN_PIXELS_ONE_THREAD = 12288


def _radix_sorted(rows: torch.Tensor) -> bool:
    """Whether the rows of an (S, P) array of this shape, device and element size are
    radix-sorted."""
    if rows.device.type != "cpu":
        return False
    num_rows, num_pixels = rows.shape
    if num_pixels >= RADIX_SORT_MIN_PIXELS:
        return True
    one_grain = num_rows * num_pixels <= RADIX_SORT_MIN_PIXELS  # the 2-D sort: one thread
    if rows.element_size() == 8:
        # int64 keys take more radix passes: padded rows pay only from half the grain, and
        # only where the 2-D sort would run them on one thread (1.5x at 1 x 16384; 0.78-0.80x
        # at 8 and 21 x 16384, 0.72-0.88x at 9216, 0.92-1.16x at 12288: --float64)
        return one_grain and 2 * num_pixels >= RADIX_SORT_MIN_PIXELS
    if 2 * num_pixels >= RADIX_SORT_MIN_PIXELS:
        return True
    return one_grain and num_pixels >= (LONE_ROW_RADIX_MIN_PIXELS if torch.get_num_threads() > 1
                                        else LONE_ROW_RADIX_MIN_PIXELS_ONE_THREAD)


def _sort_descending(keys: torch.Tensor, keys_sorted: torch.Tensor, order: torch.Tensor) -> None:
    """Sort each row of the integer ``keys`` (overwritten) in descending order into
    ``keys_sorted`` and ``order`` (its indices)."""
    if not _radix_sorted(keys):
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
    if num_rows == 1 or num_pixels < ROW_BY_ROW_MIN_PIXELS or not _radix_sorted(errors):
        return _extension_block(errors, fg, grad)
    work = _work_arrays(errors[:1].shape, _WORK_DTYPES[grad.dtype], errors.device)
    return torch.cat([_extension_block(errors[row:row + 1], fg[row:row + 1],
                                       grad[row:row + 1], work)
                      for row in range(num_rows)])


def _extension_block(errors: torch.Tensor, fg: torch.Tensor, grad: torch.Tensor,
                     work: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The float64 losses of some segments, their gradient written into ``grad`` (contiguous).

    Errors ≤ 0 (``-inf`` padding included) neither add to the loss nor get a gradient, and
    they sort after every positive error: clamped to 0, every key is a non-negative float,
    whose bit pattern orders like its value. So one descending sort of those bits as integers
    (faster than a float sort: no NaN handling) orders all segments together and gives back
    the sorted errors with no second pass (on the CPU, long rows are radix-sorted one by one
    instead: :func:`_sort_descending`). Increments, the loss dot product
    (accumulated in float64) and the scatter of the gradient back to original positions are
    each one vectorized pass: every pass is one more wake-up of torch's thread pool, which on
    a busy machine costs more than the pass.

    Memory: one allocation. ``grad`` holds the keys, then the counts, then the errors'
    signs, then the loss's products, then the gradient; one block holds the sort's outputs,
    the increments and the sorted labels (:func:`_work_arrays`): 17 bytes per pixel in
    float32, the same size on every chunk of a call (a dozen arrays freed in between would
    fragment the heap).
    """
    dtype = grad.dtype
    shape = errors.shape
    torch.clamp(errors.to(dtype), min=0, out=grad)
    order, keys_sorted, increments, labels_sorted = (
        work or _work_arrays(shape, _WORK_DTYPES[dtype], errors.device))
    _sort_descending(grad.view(_SAME_WIDTH_INT[dtype]), keys_sorted, order)
    errors_sorted = keys_sorted.view(dtype)
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
