"""The ``torch`` backend: eager PyTorch, CPU and CUDA, one batched sort for all segments."""

from __future__ import annotations

import torch

from lovasz_kernels._jaccard import count_dtype, jaccard_increments
from lovasz_kernels._plan import chunk_floor_bytes, rows_at_least_threads
from lovasz_kernels._validate import compute_dtype

_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64}
#: a chunk's temporaries per pixel, float32, besides the inputs and the gradient: the block
#: (int64 order, sorted keys, increments, sorted labels), plus one for what each row adds
#: (torch.sort's index row, the positions 1..P, a column block of the float64 loss sum)
TEMPORARY_BYTES_PER_PIXEL = 8 + 4 + 4 + 1 + 1


def _carve(block: torch.Tensor, offset: int, shape: torch.Size, dtype: torch.dtype):
    """A ``dtype`` array of ``shape`` at byte ``offset`` of a flat uint8 ``block``, and the
    offset after it (callers order the arrays widest first, so every view is aligned)."""
    size = shape.numel() * dtype.itemsize
    return block[offset:offset + size].view(dtype).view(shape), offset + size


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
    dtype = compute_dtype(errors.dtype)
    num_segments, num_pixels = errors.shape
    grad = torch.empty(errors.shape, dtype=dtype, device=errors.device)
    budget = max(grad.numel() * dtype.itemsize, chunk_floor_bytes(grad.device))
    step = rows_at_least_threads(budget // (num_pixels * TEMPORARY_BYTES_PER_PIXEL), grad.device)
    losses = [_extension_rows(errors[start:start + step], fg[start:start + step],
                              grad[start:start + step])
              for start in range(0, num_segments, step)]
    loss = losses[0] if len(losses) == 1 else torch.cat(losses)
    return loss.to(dtype), grad.to(errors.dtype)


def _extension_rows(errors: torch.Tensor, fg: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The float64 losses of some segments, their gradient written into ``grad`` (contiguous).

    Errors ≤ 0 (``-inf`` padding included) neither add to the loss nor get a gradient, and
    they sort after every positive error: clamped to 0, every key is a non-negative float,
    whose bit pattern orders like its value. So one descending sort of those bits as integers
    (faster than a float sort: no NaN handling) orders all segments together and gives back
    the sorted errors with no second pass. Increments, the loss dot product
    (accumulated in float64) and the scatter of the gradient back to original positions are
    each one vectorized pass: every pass is one more wake-up of torch's thread pool, which on
    a busy machine costs more than the pass.

    Memory: one allocation. ``grad`` holds the keys, then the counts, then the loss's
    products, then the gradient; one block holds the sort's outputs, the increments and the
    sorted labels: 17 bytes per pixel in float32, the same size on every chunk of a call
    (a dozen arrays freed in between would fragment the heap).
    """
    dtype = grad.dtype
    shape = errors.shape
    torch.clamp(errors.to(dtype), min=0, out=grad)
    block = torch.empty(shape.numel() * (8 + 2 * dtype.itemsize + 1), dtype=torch.uint8,
                        device=errors.device)
    order, offset = _carve(block, 0, shape, torch.int64)
    keys_sorted, offset = _carve(block, offset, shape, _SAME_WIDTH_INT[dtype])
    increments, offset = _carve(block, offset, shape, dtype)
    labels_sorted, _ = _carve(block, offset, shape, torch.bool)
    torch.sort(grad.view(_SAME_WIDTH_INT[dtype]), dim=1, descending=True,
               out=(keys_sorted, order))
    errors_sorted = keys_sorted.view(dtype)
    torch.gather(fg, 1, order, out=labels_sorted)
    # the keys are dead once sorted: ``grad`` holds the counts, unless they need an integer
    jaccard_increments(labels_sorted, dtype,
                       counts=grad if count_dtype(shape[1], dtype) == dtype else None,
                       out=increments)
    # a float comparison: -0.0 (a clamped -0.0 error) counts as zero
    increments.masked_fill_(torch.eq(errors_sorted, 0, out=labels_sorted), 0.0)
    loss = _row_sums_float64(torch.mul(errors_sorted, increments, out=grad))
    grad.scatter_(1, order, increments)
    return loss
