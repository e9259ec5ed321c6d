"""The ``triton`` backend: Triton kernels on CUDA tensors (CPU tensors under the interpreter).

Two entry points run the same kernels:

- ``lovasz_loss(scores, labels, plan)``, the fused loss (see :mod:`lovasz_kernels._plan`):
  the kernels read the scores (B, C, P) in their own dtype and the int64 labels (B, P) in
  place, form each pixel's error on the fly (``1 − score`` on foreground, ``score +
  bg_offset`` elsewhere, in float32 for 16-bit scores, float64 for float64; ignored pixels
  carry no error), and write ``weight[s] · (∓1) · increment`` straight into the (B, C, P)
  gradient. No (S, P) errors tensor exists, the segment losses are summed with their weights
  on the device, and nothing is read back to the host.
- ``lovasz_extension(errors, fg)``, the bare kernel on (S, P) errors (the public kernel API
  and the distributed exact mode).

A segment is a row of ``num_cols`` pixels: one (image, channel) of P pixels, or for batch
segments (``per_image=False``) one channel of all B images (B·P pixels, image by image).

Pipeline (the sorting step is chosen per call: see *Sort strategies*):

1. ``_build_keys_kernel``: one integer key per pixel, as wide as the errors (int16 for
   fp16/bf16 errors, int32 for float32 — what 16-bit scores give —, int64 for float64).
   Errors ≤ 0 (and ignored pixels) map to 0: they carry no loss and no gradient, so their
   order among themselves is irrelevant, and clamping makes every remaining bit pattern a
   non-negative, monotone integer. The label is folded into the low bit *without* dropping a
   value bit: ``key = 2 (bits − 2^(w−2)) + fg`` fits in w signed bits exactly, so the sorted
   keys give back the error and the label with no gather, and values one ulp apart keep
   their order.
2. The sort, descending per segment: ``torch.sort`` (CUB radix sort on a GPU; the only step
   that is not a Triton kernel). Its indices are the scatter targets.
3. Exact integer prefix counts across tiles of the sorted rows, as a reduce-then-scan:
   ``_tile_counts_kernel`` counts foreground pixels per tile, ``_scan_tiles_kernel`` turns each
   segment's tile counts into exclusive carries (one program per segment walking the tile
   totals, not the pixels) and the segment's n_fg.
4. ``_apply_kernel``: in-tile ``tl.cumsum`` plus the tile's carry gives c_k; the closed-form
   Jaccard increment (no cancellation), the gradient scattered to the pixel's original
   position, and the tile's loss partial in float64.
5. ``_segment_loss_kernel``: a fixed-order float64 sum of the tile partials (deterministic).

Launches. Every grid is one-dimensional (CUDA caps grid axes 1 and 2 at 65535, which a
segment of 2^26 pixels in 1024-pixel tiles would pass): programs map to (segment, tile)
pairs. Kernels that read pixels in their original order go tile-major (the S programs of one
pixel tile are adjacent, so a tile of labels comes from memory once and from L2 for the other
channels); kernels that walk sorted rows go segment-major (consecutive programs scatter into
the same gradient rows, which stay in L2 while they fill). The tile is a pure function of the
call's own sizes (``_tile``): the count and apply kernels must cut a row into the same tiles,
so it is never left to the autotuner, which picks only ``num_warps`` (results do not depend on
it). The interpreter times nothing and uses fixed tiles; tests force tiny ones
(``_override``).

Sort strategies (``LOVASZ_TRITON_SORT`` or ``_override(sort=...)``; default ``auto``):

- ``rows``: ``torch.sort`` of the (S, num_cols) keys along dim 1 (a segmented sort, or one
  sort per row for long rows, as PyTorch decides).
- ``flat``: one 1-D ``torch.sort`` of int64 ``(S − 1 − segment) << 32 | (key + 2^(w−1))``
  (keys of at most 32 bits; float64 errors sort by rows): segments stay contiguous and in
  order, keys descend inside each.
- ``histogram``: sort-free and exact for 16-bit inputs (fp16/bf16 errors, or fp16/bf16
  scores whose float32 errors take at most 2 × 2^16 values). ``_histogram_kernel`` counts fg /
  bg pixels per error rank (integer atomics into a (2, NUM_BINS) table per segment);
  ``_histogram_scan_kernel`` walks the ranks from the largest error down with exact int64
  carries and gives the exact loss and one gradient per rank and class (a tie group's pixels
  of one class share one increment, the mean of ordering the tie fg-first and bg-first: a
  deterministic subgradient); ``_histogram_gather_kernel`` writes each pixel's gradient.
  For 16-bit errors the rank is the error's own bits; for 16-bit scores it is looked up in a
  table of every candidate error (both classes, all 2^16 inputs), sorted once per (dtype,
  bg_offset, device) and cached (``_histogram_tables``). Other inputs sort by rows. Pixels
  with one error value add to one counter: confident predictions (many pixels at p = 0 or 1)
  contend on a few bins, a cost no GPU run has measured yet.
- ``auto``: segments of at most ``small_segment_max`` pixels (2048; keys of ≤ 32 bits) are
  done by one program each (``_small_segment_kernel``: ``key << 12 | column`` sorted in
  registers with ``tl.sort``, then the whole scan, loss and scatter); 16-bit inputs with
  segments of at least ``histogram_min_pixels`` (2^16) take ``histogram``; the rest ``rows``.
  The interpreter emulates the bitonic sort slowly, so there the in-register path runs only
  when forced. An explicit strategy is used at every size where it is exact.

Memory: the segments of a call run in chunks (the same kernels on a slice of the segments)
whose temporaries — the keys, the sorted keys, the int64 order and the sort's scratch, which
depends on the path PyTorch's CUDA sort takes (``_sort_bytes``) — fit in the gradient's size
or the GPU's chunk floor, whichever is larger (``_segments_per_chunk``). By default a segment
whose sort alone does not fit is still sorted whole. Under a floor the user set
(``budget_is_strict``), such a call goes to the torch backend instead
(``_sort_over_strict_budget``), which sorts those segments a range of values at a time
within the budget: a slower path, with host reads, that only an explicit memory-first setting
takes (one or two classes, or a hinge: a row's sort needs 36 bytes a pixel, where the
gradient of one class has 4).

``sort_strategy(dtype, num_cols)`` says which path a call takes; ``sort_keys(scores, labels,
plan)`` returns the keys a loss call sorts (to time the sort alone). Every kernel launch goes
through ``_launch`` (one place for the grid-size check and for tests/triton_sm90.py, which
compiles every launched variant for sm_90 without a GPU).

Interpreter mode: Triton decides at decoration time, i.e. when this module is imported, whether
``@triton.jit`` builds compiled kernels or interpreted ones (``knobs.runtime.interpret`` reads
``TRITON_INTERPRET`` from the environment). So ``TRITON_INTERPRET=1`` must be set before this
module is imported; then the same kernels run on CPU (and CUDA) tensors through the
interpreter. ``availability()`` says so if the variable was set too late.
"""

from __future__ import annotations

# `from __future__ import annotations` keeps the kernels' `tl.constexpr` annotations as strings:
# Triton reads them as strings in both compiled and interpreted mode, and the module still
# imports (reporting why it cannot run) when triton is not installed.
import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lovasz_kernels._plan import (
    SegmentPlan,
    budget_is_strict,
    chunk_allowance_bytes,
    chunk_floor_bytes,
)
from lovasz_kernels._registry import get_backend
from lovasz_kernels._validate import compute_dtype

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the backend reports it through availability()
    triton = None
    tl = None
    _IMPORT_ERROR: str = str(exc)
else:
    _IMPORT_ERROR = ""


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


def _device_fn(fn):
    """``@triton.jit`` for a device function (called from kernels only).

    Under the interpreter a kernel calling a jitted helper re-patches ``triton.language`` on
    every call (a third of a small launch's time); the plain function runs identically inside
    an already-patched interpreted kernel, so it is used as is there.
    """
    jitted = _jit(fn)
    return fn if type(jitted).__name__ == "InterpretedFunction" else jitted


def _autotune_warps(warps: tuple[int, ...], key: list[str]):
    """``triton.autotune`` over ``num_warps`` only: a launch's results never depend on it."""

    def wrap(kernel):
        if triton is None:
            return kernel
        configs = [triton.Config({}, num_warps=w) for w in warps]
        return triton.autotune(configs=configs, key=key)(kernel)

    return wrap


# ----------------------------------------------------------------------- device functions
#
# Kernels that read pixels take the same "source" arguments, in this order:
#   values_ptr, labels_ptr, seg_image_ptr, seg_channel_ptr, seg_label_ptr, pixels_per_image,
#   ignore_index, bg_offset, stride_vb, stride_vc, stride_vp, stride_lb, stride_lc, stride_lp
# with the compile-time flags FROM_SCORES, BATCH_SEGMENTS, HAS_IGNORE. For (S, P) errors
# (FROM_SCORES False) values are the errors and labels the fg bytes, the "image" of segment s
# is s and the per-segment tables are unused. For a loss call values are the scores (B, C, P),
# labels the int64 labels: class indices (B, P) read with stride_lc = 0 (one label serves every
# channel), or multilabel (B, C, P) masks; the tables are the plan's image, channel, fg label.
# Kernels that write the gradient take grad_ptr, seg_weight_ptr, stride_gb, stride_gc,
# stride_gp: grad[image, channel, pixel] for scores, grad[s, col] for errors.


@_device_fn
def _make_key(errors, is_fg, KEY_DTYPE: tl.constexpr, KEY_HALF: tl.constexpr):
    """Sort key of each pixel: 2 (bits(max(e, 0)) − 2^(w−2)) + fg as a w-bit signed int.

    ``bits`` are the raw bits of the (clamped, non-negative) float, which order like the
    values; w is the float's width and KEY_HALF = 2^(w−2). The result lies in
    [−2^(w−1), 2^(w−1)), so it fits the float's own width and descending key order is
    descending error order, ties broken by the label.
    """
    bits = errors.to(KEY_DTYPE, bitcast=True)
    # as signed ints, exactly the floats > 0 have bits > 0 (no float compare: the interpreter
    # keeps bfloat16 as raw uint16); ≤ 0, -0.0 and -inf all become +0.0
    bits = tl.where(bits > 0, bits, 0)
    key = (bits - KEY_HALF) * 2 + is_fg
    return key.to(KEY_DTYPE)


@_device_fn
def _key_value(key, KEY_DTYPE: tl.constexpr, KEY_HALF: tl.constexpr, FLOAT_DTYPE: tl.constexpr):
    """Inverse of ``_make_key``: (error as FLOAT_DTYPE, error > 0, label as int)."""
    bits = ((key >> 1) + KEY_HALF).to(KEY_DTYPE)  # arithmetic shift drops the label bit
    value = bits.to(FLOAT_DTYPE, bitcast=True)
    return value, bits > 0, key & 1


@_device_fn
def _flat_key(key, segment, num_segments, KEY_HALF: tl.constexpr):
    """int64 ``(S − 1 − segment) << 32 | (key + 2^(w−1))`` for the one flat descending sort:
    segments come out in order, each with its keys descending (keys of w ≤ 32 bits)."""
    unsigned = key.to(tl.int64) + KEY_HALF + KEY_HALF  # in [0, 2^w): order-preserving
    return ((num_segments - 1 - segment).to(tl.int64) << 32) | unsigned


@_device_fn
def _flat_key_value(packed, KEY_DTYPE: tl.constexpr, KEY_HALF: tl.constexpr):
    """Inverse of ``_flat_key``: the pixel's ``_make_key`` key (packed is non-negative)."""
    low = packed - ((packed >> 32) << 32)
    return (low - KEY_HALF - KEY_HALF).to(KEY_DTYPE)


@_device_fn
def _jaccard_increment(is_fg, fg_seen, position, n_fg, COMPUTE_DTYPE: tl.constexpr):
    """The Jaccard increment g_k = Δ_J(first k+1 pixels) − Δ_J(first k) in closed form from
    exact integer counts.

    is_fg, fg_seen (c_k, inclusive), position (k + 1) and n_fg are integers; with
    U = n_fg + (k + 1) − c_k, g = 1/U on foreground, (n_fg − c_k) / (U (U − 1)) on background,
    and 1 when U = 1 (the first pixel of a segment without foreground).
    """
    union = n_fg + position - fg_seen
    union_f = union.to(COMPUTE_DTYPE)
    on_fg = 1.0 / union_f
    on_bg = (n_fg - fg_seen).to(COMPUTE_DTYPE) / (union_f * tl.maximum(union_f - 1.0, 1.0))
    on_bg = tl.where(union == 1, 1.0, on_bg)
    return tl.where(is_fg != 0, on_fg, on_bg)


@_device_fn
def _sorted_gradient_and_loss(errors, positive, is_fg, fg_seen, position, n_fg,
                              COMPUTE_DTYPE: tl.constexpr):
    """Gradient g_k · 1[e_k > 0] (COMPUTE_DTYPE) and loss Σ_k max(e_k, 0) g_k (float64).

    Pixels in descending error order: errors and positive (e_k > 0, False on padding lanes)
    come from ``_key_value``, the integer counts are those of ``_jaccard_increment``.
    """
    increments = _jaccard_increment(is_fg, fg_seen, position, n_fg, COMPUTE_DTYPE)
    grad = tl.where(positive, increments, 0.0)
    errors = tl.where(positive, errors.to(COMPUTE_DTYPE), 0.0)
    loss = tl.sum(errors.to(tl.float64) * grad.to(tl.float64), axis=0)
    return grad, loss


@_device_fn
def _program_id(INT64: tl.constexpr):
    """This program's index in the 1-D grid, as int64 when offsets can pass 2^31."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    return pid


@_device_fn
def _pixel_tile(num_segments, tiles_per_image, pixels_per_image, INT64: tl.constexpr,
                BLOCK: tl.constexpr):
    """(segment, image slot, pixels, pixels < P) of a program in the tile-major grid
    tiles × images per segment × segments (segments vary fastest).

    The image slot is the image of a batch segment (0 otherwise); pixels index one image.
    """
    pid = _program_id(INT64)
    segment = pid % num_segments
    rest = pid // num_segments
    slot = rest // tiles_per_image
    tile = rest - slot * tiles_per_image
    pixels = tile * BLOCK + tl.arange(0, BLOCK)
    return segment, slot, pixels, pixels < pixels_per_image


@_device_fn
def _sorted_tile(num_tiles, num_cols, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """(segment, tile, columns, columns < num_cols) of a program in the segment-major grid
    segments × tiles (tiles vary fastest)."""
    pid = _program_id(INT64)
    segment = pid // num_tiles
    tile = pid - segment * num_tiles
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    return segment, tile, cols, cols < num_cols


@_device_fn
def _segment_source(segment, slot, seg_image_ptr, seg_channel_ptr, seg_label_ptr,
                    FROM_SCORES: tl.constexpr, BATCH_SEGMENTS: tl.constexpr,
                    INT64: tl.constexpr):
    """(image, channel, fg label) of a segment; a batch segment's image is ``slot``.

    For (S, P) errors the "image" is the segment's row, the channel 0, the label unused.
    Image and channel come as int32 unless offsets can pass 2^31 (cheaper address math).
    """
    image = segment
    channel = 0
    fg_label = 0
    if FROM_SCORES:
        channel = tl.load(seg_channel_ptr + segment)
        fg_label = tl.load(seg_label_ptr + segment)
        image = slot
        if not BATCH_SEGMENTS:
            image = tl.load(seg_image_ptr + segment)
            if not INT64:
                image = image.to(tl.int32)
        if not INT64:
            channel = channel.to(tl.int32)
    return image, channel, fg_label


@_device_fn
def _column_pixels(image, cols, pixels_per_image, BATCH_SEGMENTS: tl.constexpr):
    """(image, pixel) of columns of a segment row: a batch segment's row is its images' pixels
    one image after the other; any other row is one image's pixels."""
    pixels = cols
    if BATCH_SEGMENTS:
        image = cols // pixels_per_image
        pixels = cols - image * pixels_per_image
    return image, pixels


@_device_fn
def _load_pixels(values_ptr, labels_ptr, image, channel, fg_label, pixels, mask, ignore_index,
                 stride_vb, stride_vc, stride_vp, stride_lb, stride_lc, stride_lp,
                 FROM_SCORES: tl.constexpr, HAS_IGNORE: tl.constexpr):
    """(values, valid, is_fg) of pixels: the raw score or error (0 where masked), whether the
    pixel counts, and whether it is foreground (False where it does not count). The label is
    labels[image, channel, pixel] (stride_lc = 0 for class indices shared by the channels).

    Scores: valid = label != ignore_index (compared in int64), is_fg = valid & (label ==
    fg_label). Errors: every pixel is valid (padding is -inf), is_fg = fg byte != 0.
    """
    values = tl.load(values_ptr + image * stride_vb + channel * stride_vc + pixels * stride_vp,
                     mask=mask, other=0.0)
    labels = tl.load(labels_ptr + image * stride_lb + channel * stride_lc + pixels * stride_lp,
                     mask=mask, other=0)
    if FROM_SCORES:
        valid = mask
        if HAS_IGNORE:
            valid = valid & (labels != ignore_index)
        is_fg = valid & (labels == fg_label)
    else:
        valid = mask
        is_fg = labels != 0
    return values, valid, is_fg


@_device_fn
def _pixel_errors(values, valid, is_fg, bg_offset, FROM_SCORES: tl.constexpr,
                  ERROR_DTYPE: tl.constexpr):
    """Errors in ERROR_DTYPE: ``1 − score`` on foreground, ``score + bg_offset`` elsewhere,
    -inf where the pixel does not count (any error ≤ 0 gets key 0); errors pass through."""
    errors = values
    if FROM_SCORES:
        scores = values.to(ERROR_DTYPE)
        errors = tl.where(is_fg, 1.0 - scores, scores + bg_offset)
        errors = tl.where(valid, errors, float("-inf"))
    return errors


@_device_fn
def _pixel_bins(values, valid, is_fg, rank_ptr, FROM_SCORES: tl.constexpr,
                NUM_BINS: tl.constexpr):
    """Flat index into a segment's (2, NUM_BINS) histogram (row 0 bg, row 1 fg).

    16-bit errors: the bits of max(e, 0), an order-preserving rank below 2^15 (errors ≤ 0
    share bin 0). 16-bit scores: the rank of the pixel's float32 error among every candidate
    error, from the (2, 2^16) table ``rank`` indexed by (is_fg, the score's bits); pixels that
    do not count go to bin 0 of the bg row (no loss, no gradient, not in n_fg).
    """
    bits = values.to(tl.int16, bitcast=True).to(tl.int32)
    if FROM_SCORES:
        index = is_fg.to(tl.int32) * 65536 + (bits & 0xFFFF)
        bins = tl.load(rank_ptr + index, mask=valid, other=0)
    else:
        bins = tl.where(bits > 0, bits, 0)
    return bins + is_fg.to(tl.int32) * NUM_BINS


@_device_fn
def _store_gradient(grad_ptr, seg_weight_ptr, segment, image, channel, pixels, is_fg,
                    increments, mask, stride_gb, stride_gc, stride_gp,
                    FROM_SCORES: tl.constexpr):
    """grad[image, channel, pixel] = weight[s] · (−1 on fg, +1 elsewhere) · increment for
    scores (d error / d score is ∓1); grad[s, col] = increment for (S, P) errors."""
    if FROM_SCORES:
        weight = tl.load(seg_weight_ptr + segment).to(increments.dtype)
        increments = tl.where(is_fg, -increments, increments) * weight
    tl.store(grad_ptr + image * stride_gb + channel * stride_gc + pixels * stride_gp,
             increments.to(grad_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------- kernels


@_jit
def _build_keys_kernel(
    values_ptr, labels_ptr, seg_image_ptr, seg_channel_ptr, seg_label_ptr, pixels_per_image,
    ignore_index, bg_offset, stride_vb, stride_vc, stride_vp, stride_lb, stride_lc, stride_lp,
    keys_ptr, num_segments, tiles_per_image, num_cols, size_class,
    FROM_SCORES: tl.constexpr, BATCH_SEGMENTS: tl.constexpr, HAS_IGNORE: tl.constexpr,
    ERROR_DTYPE: tl.constexpr, KEY_DTYPE: tl.constexpr, KEY_HALF: tl.constexpr,
    FLAT: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    """keys[s, col] ← ``_make_key(error, fg)`` of every pixel of every segment.

    keys: (S, num_cols) contiguous in KEY_DTYPE, or with FLAT the int64 ``_flat_key`` of
    each. Tile-major grid over (tile, image slot, segment); ``size_class`` is only the
    autotuning key.
    """
    segment, slot, pixels, mask = _pixel_tile(num_segments, tiles_per_image, pixels_per_image,
                                              INT64, BLOCK)
    image, channel, fg_label = _segment_source(segment, slot, seg_image_ptr, seg_channel_ptr,
                                               seg_label_ptr, FROM_SCORES, BATCH_SEGMENTS, INT64)
    values, valid, is_fg = _load_pixels(values_ptr, labels_ptr, image, channel, fg_label,
                                        pixels, mask, ignore_index, stride_vb, stride_vc,
                                        stride_vp, stride_lb, stride_lc, stride_lp, FROM_SCORES,
                                        HAS_IGNORE)
    errors = _pixel_errors(values, valid, is_fg, bg_offset, FROM_SCORES, ERROR_DTYPE)
    key = _make_key(errors, is_fg.to(KEY_DTYPE), KEY_DTYPE, KEY_HALF)
    if FLAT:
        key = _flat_key(key, segment, num_segments, KEY_HALF)
    cols = slot * pixels_per_image + pixels
    tl.store(keys_ptr + segment * num_cols + cols, key, mask=mask)


@_jit
def _tile_counts_kernel(
    sorted_ptr, counts_ptr, num_cols, num_tiles,
    COUNT_DTYPE: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    """counts[s, t] = Σ label bits of sorted keys[s, t·BLOCK : (t+1)·BLOCK] (int32 or int64).

    sorted: (S, num_cols) keys or flat keys (the label is bit 0 of both); counts (S, num_tiles).
    Segment-major grid.
    """
    segment, tile, cols, mask = _sorted_tile(num_tiles, num_cols, INT64, BLOCK)
    keys = tl.load(sorted_ptr + segment * num_cols + cols, mask=mask, other=0)
    labels = (keys & 1).to(COUNT_DTYPE)
    tl.store(counts_ptr + segment * num_tiles + tile, tl.sum(labels, axis=0))


@_jit
def _scan_tiles_kernel(
    counts_ptr, carries_ptr, n_fg_ptr, num_tiles,
    COUNT_DTYPE: tl.constexpr, INT64: tl.constexpr, SCAN_BLOCK: tl.constexpr,
):
    """carries[s, t] = Σ_{u<t} counts[s, u] (exclusive scan); n_fg[s] = Σ_u counts[s, u].

    Grid (S,): one program per segment walks its row of tile totals in chunks of SCAN_BLOCK,
    carrying the running total between chunks (the pixels themselves are never read here).
    """
    segment = _program_id(INT64)
    row = segment * num_tiles
    carry = tl.full([], 0, COUNT_DTYPE)
    # a while loop: Triton 3.6's interpreter cannot range() up to a kernel argument
    start = 0
    while start < num_tiles:
        idx = start + tl.arange(0, SCAN_BLOCK)
        mask = idx < num_tiles
        counts = tl.load(counts_ptr + row + idx, mask=mask, other=0)
        inclusive = tl.cumsum(counts, axis=0)
        tl.store(carries_ptr + row + idx, carry + inclusive - counts, mask=mask)
        carry += tl.sum(counts, axis=0)
        start += SCAN_BLOCK
    tl.store(n_fg_ptr + segment, carry)


@_jit
def _apply_kernel(
    values_ptr, labels_ptr, seg_image_ptr, seg_channel_ptr, seg_label_ptr, pixels_per_image,
    ignore_index, bg_offset, stride_vb, stride_vc, stride_vp, stride_lb, stride_lc, stride_lp,
    grad_ptr, seg_weight_ptr, stride_gb, stride_gc, stride_gp,
    sorted_ptr, order_ptr, carries_ptr, n_fg_ptr, partial_ptr, num_cols, num_tiles, size_class,
    FROM_SCORES: tl.constexpr, BATCH_SEGMENTS: tl.constexpr, HAS_IGNORE: tl.constexpr,
    ERROR_DTYPE: tl.constexpr, KEY_DTYPE: tl.constexpr, KEY_HALF: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, COUNT_DTYPE: tl.constexpr, FLAT: tl.constexpr,
    INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Increments, loss partials and the gradient scatter for one tile of sorted keys.

    sorted, order: (S, num_cols) sorted keys (flat keys with FLAT) and the column each came
    from (its flat index with FLAT); carries, n_fg: from ``_scan_tiles_kernel``. Writes the
    gradient of each pixel at its original position (``_store_gradient``) and
    partial[s, t] = Σ_{k in tile} max(e_k, 0) g_k in float64. Segment-major grid.
    """
    segment, tile, cols, mask = _sorted_tile(num_tiles, num_cols, INT64, BLOCK)
    row = segment * num_cols
    keys = tl.load(sorted_ptr + row + cols, mask=mask, other=0)
    order = tl.load(order_ptr + row + cols, mask=mask, other=0)
    if FLAT:
        keys = _flat_key_value(keys, KEY_DTYPE, KEY_HALF)
        order = order - row
    if not INT64:
        order = order.to(tl.int32)  # 32-bit division below for batch segments
    errors, positive, is_fg = _key_value(keys, KEY_DTYPE, KEY_HALF, ERROR_DTYPE)
    is_fg = tl.where(mask, is_fg, 0).to(COUNT_DTYPE)
    carry = tl.load(carries_ptr + segment * num_tiles + tile)
    fg_seen = carry + tl.cumsum(is_fg, axis=0)
    n_fg = tl.load(n_fg_ptr + segment)
    grad, partial = _sorted_gradient_and_loss(errors, positive & mask, is_fg, fg_seen,
                                              (cols + 1).to(COUNT_DTYPE), n_fg, COMPUTE_DTYPE)
    tl.store(partial_ptr + segment * num_tiles + tile, partial)
    image, channel, _ = _segment_source(segment, 0, seg_image_ptr, seg_channel_ptr,
                                        seg_label_ptr, FROM_SCORES, BATCH_SEGMENTS, INT64)
    image, pixels = _column_pixels(image, order, pixels_per_image, BATCH_SEGMENTS)
    _store_gradient(grad_ptr, seg_weight_ptr, segment, image, channel, pixels, is_fg != 0, grad,
                    mask, stride_gb, stride_gc, stride_gp, FROM_SCORES)


@_jit
def _segment_loss_kernel(
    partial_ptr, loss_ptr, num_tiles, INT64: tl.constexpr, SCAN_BLOCK: tl.constexpr,
):
    """loss[s] = Σ_t partial[s, t], in float64 and a fixed order (deterministic). Grid (S,)."""
    segment = _program_id(INT64)
    row = partial_ptr + segment * num_tiles
    total = tl.zeros([SCAN_BLOCK], dtype=tl.float64)
    start = 0
    while start < num_tiles:  # (not range(): see _scan_tiles_kernel)
        idx = start + tl.arange(0, SCAN_BLOCK)
        total += tl.load(row + idx, mask=idx < num_tiles, other=0.0)
        start += SCAN_BLOCK
    tl.store(loss_ptr + segment, tl.sum(total, axis=0).to(loss_ptr.dtype.element_ty))


@_jit
def _small_segment_kernel(
    values_ptr, labels_ptr, seg_image_ptr, seg_channel_ptr, seg_label_ptr, pixels_per_image,
    ignore_index, bg_offset, stride_vb, stride_vc, stride_vp, stride_lb, stride_lc, stride_lp,
    grad_ptr, seg_weight_ptr, stride_gb, stride_gc, stride_gp,
    loss_ptr, num_cols,
    FROM_SCORES: tl.constexpr, BATCH_SEGMENTS: tl.constexpr, HAS_IGNORE: tl.constexpr,
    ERROR_DTYPE: tl.constexpr, KEY_DTYPE: tl.constexpr, KEY_HALF: tl.constexpr,
    INDEX_BITS: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Whole pipeline for segments of num_cols ≤ BLOCK ≤ 2^INDEX_BITS pixels, one program each.

    Packs ``key << INDEX_BITS | column`` (int64; keys of at most 32 bits), sorts it descending
    with ``tl.sort`` (bitonic, in registers), then scans, scatters the gradient and writes the
    segment's loss. Grid (S,).
    """
    segment = _program_id(INT64)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_cols
    image, channel, fg_label = _segment_source(segment, 0, seg_image_ptr, seg_channel_ptr,
                                               seg_label_ptr, FROM_SCORES, BATCH_SEGMENTS, INT64)
    images, pixels = _column_pixels(image, cols, pixels_per_image, BATCH_SEGMENTS)
    values, valid, is_fg = _load_pixels(values_ptr, labels_ptr, images, channel, fg_label,
                                        pixels, mask, ignore_index, stride_vb, stride_vc,
                                        stride_vp, stride_lb, stride_lc, stride_lp, FROM_SCORES,
                                        HAS_IGNORE)
    errors = _pixel_errors(values, valid, is_fg, bg_offset, FROM_SCORES, ERROR_DTYPE)
    key = _make_key(errors, is_fg.to(KEY_DTYPE), KEY_DTYPE, KEY_HALF).to(tl.int64)
    # every real key is ≥ −2^31, so (key << INDEX_BITS) ≥ −2^43: padding lanes sort last
    packed = tl.where(mask, (key << INDEX_BITS) | cols, -(1 << 62))
    packed = tl.sort(packed, 0, descending=True)
    columns = (packed & ((1 << INDEX_BITS) - 1)).to(tl.int32)
    errors, positive, labels = _key_value(packed >> INDEX_BITS, KEY_DTYPE, KEY_HALF,
                                          ERROR_DTYPE)
    labels = tl.where(mask, labels, 0).to(tl.int32)  # after the sort, position k < P is real
    fg_seen = tl.cumsum(labels, axis=0)
    n_fg = tl.sum(labels, axis=0)
    compute = tl.float32  # keys of ≤ 32 bits: 16- or 32-bit errors
    grad, loss = _sorted_gradient_and_loss(errors, positive & mask, labels, fg_seen, cols + 1,
                                           n_fg, compute)
    tl.store(loss_ptr + segment, loss.to(loss_ptr.dtype.element_ty))
    images, pixels = _column_pixels(image, columns, pixels_per_image, BATCH_SEGMENTS)
    _store_gradient(grad_ptr, seg_weight_ptr, segment, images, channel, pixels, labels != 0,
                    grad, mask, stride_gb, stride_gc, stride_gp, FROM_SCORES)


@_jit
def _histogram_kernel(
    values_ptr, labels_ptr, seg_image_ptr, seg_channel_ptr, seg_label_ptr, pixels_per_image,
    ignore_index, bg_offset, stride_vb, stride_vc, stride_vp, stride_lb, stride_lc, stride_lp,
    hist_ptr, rank_ptr, num_segments, tiles_per_image,
    FROM_SCORES: tl.constexpr, BATCH_SEGMENTS: tl.constexpr, HAS_IGNORE: tl.constexpr,
    NUM_BINS: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    """hist[s, fg, bin] += 1 for every pixel, bins as in ``_pixel_bins``.

    hist: (S, 2, NUM_BINS) int32, zeroed. Tile-major grid over (tile, image slot, segment).
    Integer atomics: the counts do not depend on their order.
    """
    segment, slot, pixels, mask = _pixel_tile(num_segments, tiles_per_image, pixels_per_image,
                                              INT64, BLOCK)
    image, channel, fg_label = _segment_source(segment, slot, seg_image_ptr, seg_channel_ptr,
                                               seg_label_ptr, FROM_SCORES, BATCH_SEGMENTS, INT64)
    values, valid, is_fg = _load_pixels(values_ptr, labels_ptr, image, channel, fg_label,
                                        pixels, mask, ignore_index, stride_vb, stride_vc,
                                        stride_vp, stride_lb, stride_lc, stride_lp, FROM_SCORES,
                                        HAS_IGNORE)
    bins = _pixel_bins(values, valid, is_fg, rank_ptr, FROM_SCORES, NUM_BINS)
    tl.atomic_add(hist_ptr + segment * (2 * NUM_BINS) + bins, 1, mask=mask)


@_jit
def _histogram_scan_kernel(
    hist_ptr, bin_grad_ptr, bin_value_ptr, loss_ptr,
    NUM_BINS: tl.constexpr, SCAN_BLOCK: tl.constexpr,
):
    """Exact loss and per-bin, per-class gradient of one segment from its (fg, bg) histogram.

    hist: (S, 2, NUM_BINS) int32 (row 0 bg, row 1 fg); bin_grad: (S, 2, NUM_BINS) float32,
    same layout; bin_value: (NUM_BINS,) float32, the error of each bin (ascending); loss: (S,).
    Grid (S,).

    Bins are visited from the largest error down, carrying the fg / bg pixels seen so far
    (c, b). A bin holding a fg and β bg pixels moves Δ_J from 1 − I₀/U₀ to 1 − I₁/U₁ with
    I = n_fg − c, U = n_fg + b; the difference G = (I₀U₁ − I₁U₀)/(U₀U₁) is formed from exact
    int64 products (no cancellation), and loss[s] = Σ value(bin) · G (float64; ties do not
    change the loss).

    Gradient: Δ_J(A, N) = (A + N)/(n_fg + N) for a set of A fg and N bg pixels, so pixels of one
    class are interchangeable and only the order of the classes inside a tie matters. Ordered
    fg-first, each fg pixel adds 1/U₀ and the bg pixels (I₀ − a)β/(U₀U₁) in all; bg-first,
    the bg pixels add I₀β/(U₀U₁) and each fg pixel 1/U₁. Their mean is a convex combination of
    two orders consistent with the sort, hence a subgradient (and deterministic):

        fg pixel: (1/U₀ + 1/U₁) / 2        bg pixel: (2 I₀ − a) / (2 U₀ U₁)

    (bg pixel: 1/β when U₀ = 0, i.e. no fg at all and nothing above). The class totals sum to
    G. Sharing G equally over the a + β pixels instead is *not* a subgradient when a tie
    mixes classes: its bg pixels can get more than Δ_J allows any bg-first prefix.
    """
    segment = tl.program_id(0).to(tl.int64)
    fg_row = hist_ptr + segment * (2 * NUM_BINS) + NUM_BINS
    bg_row = hist_ptr + segment * (2 * NUM_BINS)
    n_fg = tl.full([], 0, tl.int64)
    for start in range(0, NUM_BINS, SCAN_BLOCK):
        n_fg += tl.sum(tl.load(fg_row + start + tl.arange(0, SCAN_BLOCK)).to(tl.int64), axis=0)
    fg_before = tl.full([], 0, tl.int64)
    bg_before = tl.full([], 0, tl.int64)
    loss = tl.zeros([SCAN_BLOCK], dtype=tl.float64)
    for start in range(0, NUM_BINS, SCAN_BLOCK):
        bins = NUM_BINS - 1 - start - tl.arange(0, SCAN_BLOCK)  # descending errors
        fg_count = tl.load(fg_row + bins).to(tl.int64)
        bg_count = tl.load(bg_row + bins).to(tl.int64)
        fg_after = fg_before + tl.cumsum(fg_count, axis=0)
        bg_after = bg_before + tl.cumsum(bg_count, axis=0)
        inter_0 = n_fg - (fg_after - fg_count)
        union_0 = n_fg + (bg_after - bg_count)
        inter_1 = n_fg - fg_after
        union_1 = n_fg + bg_after
        numerator = (inter_0 * union_1 - inter_1 * union_0).to(tl.float64)
        denominator = union_0.to(tl.float64) * union_1.to(tl.float64)
        # U₀ = 0 only before any pixel of a segment without foreground: Δ_J was 0 there
        first = (union_1 - inter_1).to(tl.float64) / tl.maximum(union_1, 1).to(tl.float64)
        difference = tl.where(union_0 == 0, first, numerator / tl.maximum(denominator, 1.0))
        positive = bins > 0  # bin 0 holds the errors ≤ 0: no loss, no gradient
        occupied = (fg_count + bg_count > 0) & positive
        difference = tl.where(occupied, difference, 0.0)
        # read the values of occupied bins only: the others may be inf / NaN
        value = tl.load(bin_value_ptr + bins, mask=occupied, other=0.0)
        loss += value.to(tl.float64) * difference
        # per class, the mean of the fg-first and bg-first orders (see the docstring); a bin
        # with fg has n_fg > 0, so U₀ ≥ 1 there
        fg_grad = 0.5 / tl.maximum(union_0, 1).to(tl.float64) + 0.5 / tl.maximum(
            union_1, 1).to(tl.float64)
        bg_grad = (2 * inter_0 - fg_count).to(tl.float64) / (2.0 * tl.maximum(denominator, 1.0))
        bg_grad = tl.where(union_0 == 0, 1.0 / tl.maximum(bg_count, 1).to(tl.float64), bg_grad)
        fg_grad = tl.where((fg_count > 0) & positive, fg_grad, 0.0)
        bg_grad = tl.where((bg_count > 0) & positive, bg_grad, 0.0)
        grad_row = bin_grad_ptr + segment * (2 * NUM_BINS) + bins
        tl.store(grad_row, bg_grad.to(tl.float32))
        tl.store(grad_row + NUM_BINS, fg_grad.to(tl.float32))
        fg_before += tl.sum(fg_count, axis=0)
        bg_before += tl.sum(bg_count, axis=0)
    tl.store(loss_ptr + segment, tl.sum(loss, axis=0).to(loss_ptr.dtype.element_ty))


@_jit
def _histogram_gather_kernel(
    values_ptr, labels_ptr, seg_image_ptr, seg_channel_ptr, seg_label_ptr, pixels_per_image,
    ignore_index, bg_offset, stride_vb, stride_vc, stride_vp, stride_lb, stride_lc, stride_lp,
    grad_ptr, seg_weight_ptr, stride_gb, stride_gc, stride_gp,
    bin_grad_ptr, rank_ptr, num_segments, tiles_per_image,
    FROM_SCORES: tl.constexpr, BATCH_SEGMENTS: tl.constexpr, HAS_IGNORE: tl.constexpr,
    NUM_BINS: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Each pixel's gradient from its bin: bin_grad[s, fg, bin] (``_store_gradient``).

    bin_grad: (S, 2, NUM_BINS) float32 (row 0 bg, row 1 fg). Tile-major grid.
    """
    segment, slot, pixels, mask = _pixel_tile(num_segments, tiles_per_image, pixels_per_image,
                                              INT64, BLOCK)
    image, channel, fg_label = _segment_source(segment, slot, seg_image_ptr, seg_channel_ptr,
                                               seg_label_ptr, FROM_SCORES, BATCH_SEGMENTS, INT64)
    values, valid, is_fg = _load_pixels(values_ptr, labels_ptr, image, channel, fg_label,
                                        pixels, mask, ignore_index, stride_vb, stride_vc,
                                        stride_vp, stride_lb, stride_lc, stride_lp, FROM_SCORES,
                                        HAS_IGNORE)
    bins = _pixel_bins(values, valid, is_fg, rank_ptr, FROM_SCORES, NUM_BINS)
    grad = tl.load(bin_grad_ptr + segment * (2 * NUM_BINS) + bins, mask=mask, other=0.0)
    _store_gradient(grad_ptr, seg_weight_ptr, segment, image, channel, pixels, is_fg, grad,
                    mask, stride_gb, stride_gc, stride_gp, FROM_SCORES)


# autotuned entry points for compiled mode: num_warps only (the tile is fixed per call)
_TUNED_WARPS = (4, 8, 16)
_TUNE_KEY = ["size_class", "BLOCK", "FROM_SCORES", "FLAT"]
_build_keys_tuned = _autotune_warps(_TUNED_WARPS[:2], key=_TUNE_KEY)(_build_keys_kernel)
_apply_tuned = _autotune_warps(_TUNED_WARPS, key=_TUNE_KEY)(_apply_kernel)
_FIXED_WARPS = 4  # the kernels that are not autotuned (scans, counts, histogram)

try:  # which kind of kernels the decorators built (fixed at import, see the module docstring)
    from triton.runtime.interpreter import InterpretedFunction

    _INTERPRETED = isinstance(_tile_counts_kernel, InterpretedFunction)
except ImportError:
    _INTERPRETED = False


# ------------------------------------------------------------------------------------ host

# key integer type and 2^(w−2) per error float width
_KEYS = {
    torch.float16: (torch.int16, 1 << 14),
    torch.bfloat16: (torch.int16, 1 << 14),
    torch.float32: (torch.int32, 1 << 30),
    torch.float64: (torch.int64, 1 << 62),
}
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_SMALL_INDEX_BITS = 12  # the fused tl.sort path packs a 12-bit column under a ≤ 32-bit key
_COMPILED_TILE = 1024  # tile of every tiled kernel on a GPU (the autotuner's pick on an H200)
_HISTOGRAM_HALF_BINS = 1 << 15  # bits of a non-negative 16-bit float
_BIN_ALIGN = 1024  # histogram tables are padded to a multiple of their scan's chunk
_MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on grid axis 0 (axes 1 and 2: 65535)
SORT_STRATEGIES = ("auto", "rows", "flat", "histogram")
SORT_ENV = "LOVASZ_TRITON_SORT"
_SETTINGS = {
    # segments up to this many pixels take the fused tl.sort path (keys of ≤ 32 bits). Its
    # break-even with the global radix sort is estimated at ~2-4K pixels (not yet measured on a
    # GPU). The interpreter emulates the bitonic network slowly (~2 ms per pixel), so there it
    # is used only when a test forces it.
    "small_segment_max": None,  # None: 2048 compiled, 0 interpreted
    # tile of every tiled kernel (power of two). None: _COMPILED_TILE on a GPU; the interpreter
    # costs ~3 ms per program and little per pixel, so there it takes the fewest tiles:
    # num_cols/16 (at least 1024, at most 16384: multi-tile scans from 16K pixels on; tests
    # force tiny tiles)
    "tile": None,
    "scan_block": 1024,  # chunk of the tile scans (power of two)
    "force_int64": False,
    # "auto" only: 16-bit segments with at least this many pixels take the sort-free histogram
    # path. Its tables are 2 × NUM_BINS int32 counts and float32 per-class gradients per
    # segment (256 KiB each for 16-bit errors, up to 512 KiB for 16-bit scores), the order of a
    # segment's own traffic at 2^16 pixels; the speed break-even is not yet measured on a GPU.
    # None disables it.
    "histogram_min_pixels": 1 << 16,
    # one of SORT_STRATEGIES; None: the LOVASZ_TRITON_SORT environment variable, else "auto"
    "sort": None,
    # temporary bytes a chunk of segments may hold (see _segments_per_chunk). None: the
    # gradient's size, at least the GPU's chunk floor; tests force small chunks, benchmarks one
    "chunk_bytes": None,
}
# one launch at a time through an autotuner (it keeps per-launch state on the shared kernel
# object while it benchmarks; results never depend on the config it picks) and through the
# interpreter (its grid position is process-wide state)
_LAUNCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _override(**settings) -> Iterator[None]:
    """Temporarily change launch settings (tests force tiny tiles, int64 offsets, a strategy).

    Keys: ``small_segment_max``, ``tile`` (power of two), ``scan_block`` (power of two),
    ``force_int64``, ``histogram_min_pixels``, ``sort``, ``chunk_bytes``. Process-wide: not for
    concurrent calls with different settings.
    """
    unknown = set(settings) - set(_SETTINGS)
    if unknown:
        raise ValueError(f"unknown triton backend settings: {sorted(unknown)}")
    if "sort" in settings and settings["sort"] is not None:
        _check_strategy(settings["sort"], "sort")
    saved = dict(_SETTINGS)
    _SETTINGS.update(settings)
    try:
        yield
    finally:
        _SETTINGS.clear()
        _SETTINGS.update(saved)


def _check_strategy(name: object, where: str) -> str:
    if name not in SORT_STRATEGIES:
        raise ValueError(f"{where} must be one of {', '.join(SORT_STRATEGIES)}; got {name!r}")
    return name


def requested_sort() -> str:
    """The sort strategy asked for: ``_override(sort=...)``, else ``$LOVASZ_TRITON_SORT``,
    else ``"auto"`` (see the module docstring)."""
    if _SETTINGS["sort"] is not None:
        return _SETTINGS["sort"]
    value = os.environ.get(SORT_ENV, "").strip()
    return _check_strategy(value, f"the environment variable {SORT_ENV}") if value else "auto"


def sort_strategy(dtype: torch.dtype, num_cols: int, *, from_scores: bool = True) -> str:
    """The strategy a call takes now: ``"in-register"`` (one ``tl.sort`` program per
    segment), ``"rows"``, ``"flat"`` or ``"histogram"``.

    ``dtype`` is the scores' dtype (``from_scores``, a loss call) or the errors' dtype (a
    ``lovasz_extension`` call); ``num_cols`` the pixels per segment (B·P for batch segments).
    An explicit strategy runs at every size where it is exact: ``flat`` needs keys of at most
    32 bits (float64 errors sort by rows), ``histogram`` 16-bit inputs (others sort by rows).
    """
    error_dtype = compute_dtype(dtype) if from_scores else dtype
    narrow_keys = error_dtype != torch.float64
    requested = requested_sort()
    if requested == "rows":
        return "rows"
    if requested == "flat":
        return "flat" if narrow_keys else "rows"
    if requested == "histogram":
        return "histogram" if dtype in _HALF_DTYPES else "rows"
    small_max = _SETTINGS["small_segment_max"]
    if small_max is None:
        small_max = 0 if _INTERPRETED else 2048
    if narrow_keys and num_cols <= min(small_max, 1 << _SMALL_INDEX_BITS):
        return "in-register"
    histogram_min = _SETTINGS["histogram_min_pixels"]
    if dtype in _HALF_DTYPES and histogram_min is not None and num_cols >= histogram_min:
        return "histogram"
    return "rows"


def _tile(num_cols: int) -> int:
    """The tile of every tiled kernel of a call: a pure function of its sizes and the
    settings (never of shared tuning state), so every kernel of the call agrees on it."""
    if _SETTINGS["tile"] is not None:
        return _SETTINGS["tile"]
    if _INTERPRETED:
        return min(max(triton.next_power_of_2(triton.cdiv(num_cols, 16)), 1024), 16384)
    return _COMPILED_TILE


def _launch(kernel, programs: int, *args, **meta) -> None:
    """Launch ``kernel`` on a 1-D grid of ``programs`` programs (every launch goes through
    here; the ahead-of-time compile test swaps it for compilation)."""
    if programs > _MAX_PROGRAMS:
        raise ValueError(f"a launch needs {programs} programs, more than a CUDA grid holds "
                         f"({_MAX_PROGRAMS}); the segments are too long")
    if not isinstance(kernel, triton.runtime.Autotuner):
        meta.setdefault("num_warps", _FIXED_WARPS)
    if _INTERPRETED or isinstance(kernel, triton.runtime.Autotuner):
        with _LAUNCH_LOCK:
            kernel[(programs,)](*args, **meta)
    else:
        kernel[(programs,)](*args, **meta)


def _tl_dtype(dtype: torch.dtype):
    return {torch.int16: tl.int16, torch.int32: tl.int32, torch.int64: tl.int64,
            torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


def _max_offset(tensor: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))


@dataclass(frozen=True)
class _Call:
    """One call's segments as the kernels see them (see "source" arguments above)."""

    num_segments: int
    num_cols: int  # pixels per segment: the length of a sorted row
    pixels_per_image: int
    images_per_segment: int  # B for batch segments, else 1
    input_dtype: torch.dtype  # of the scores or errors read
    error_dtype: torch.dtype  # the errors' (and the keys' width)
    bg_offset: float
    source: tuple
    gradient: tuple
    flags: dict
    int64: bool
    device: torch.device
    # the same call on segments start:stop alone (a chunk: see _segments_per_chunk)
    segments: Callable[[int, int], _Call]

    def tiles_per_image(self, block: int) -> int:
        return triton.cdiv(self.pixels_per_image, block)

    def pixel_programs(self, block: int) -> int:
        return self.num_segments * self.images_per_segment * self.tiles_per_image(block)


def _needs_int64(num_keys: int, *tensors: torch.Tensor) -> bool:
    """Whether an offset into the keys or any tensor can pass 2^31 (or a test forces int64)."""
    widest = max([num_keys] + [_max_offset(t) + 1 for t in tensors])
    return _SETTINGS["force_int64"] or widest >= 2**31


def _run(call: _Call, loss: torch.Tensor, gradient_bytes: int) -> None:
    """Write every segment's loss into ``loss`` (S,) and every pixel's gradient, segments in
    chunks whose temporaries stay within ``gradient_bytes`` or the GPU's chunk floor
    (``_segments_per_chunk``)."""
    strategy = sort_strategy(call.input_dtype, call.num_cols,
                             from_scores=call.flags["FROM_SCORES"])
    step = _segments_per_chunk(call, strategy, gradient_bytes)
    for start in range(0, call.num_segments, step):
        stop = min(start + step, call.num_segments)
        chunk = call if stop - start == call.num_segments else call.segments(start, stop)
        if strategy == "in-register":
            _run_in_registers(chunk, loss[start:stop])
        elif strategy == "histogram":
            _run_histogram(chunk, loss[start:stop])
        else:
            _run_sorted(chunk, loss[start:stop], flat=strategy == "flat")


def _sort_bytes(rows: int, cols: int, key_bytes: int) -> int:
    """Bytes a ``torch.sort`` of (rows, cols) keys of ``key_bytes`` along dim 1 holds at its
    peak on a GPU, the keys included: the keys, the sorted keys and the int64 order, plus its
    scratch, which depends on the path PyTorch's CUDA sort takes (measured on an H200, see
    docs/gpu.md): rows of at least a million keys, or one row, are sorted one after the
    other (an int64 index row and CUB's alternate key and index rows, for one row at a
    time); fewer than 128 shorter rows are sorted as one array of (key, row and column) pairs
    (two int32 pair arrays, a key copy and CUB's alternate keys and pairs); more rows by
    CUB's segmented sort (an int64 index array and alternate keys and indices)."""
    keys = rows * cols
    held = keys * (2 * key_bytes + 8)
    if rows == 1 or cols >= 1_000_000:
        return held + cols * (8 + key_bytes + 8)
    if rows < 128:
        return held + keys * (8 + 8 + key_bytes + key_bytes + 8)
    return held + keys * (8 + key_bytes + 8)


def _chunk_bytes(call: _Call, strategy: str, rows: int) -> int:
    """Temporary bytes a chunk of ``rows`` segments of ``call`` holds at its peak, besides the
    gradient: the sort and its keys (``flat``: one row of int64 keys); the two (2, bins)
    tables per segment of the histogram path; nothing in registers. The tile counts and
    partials are a thousandth of that and not counted."""
    if strategy == "in-register":
        return 0
    if strategy == "histogram":
        from_scores = call.flags["FROM_SCORES"]
        _, bin_value = _histogram_tables(call.input_dtype,
                                         call.bg_offset if from_scores else None, call.device)
        return rows * 2 * bin_value.numel() * (4 + 4)  # int32 counts, float32 gradients
    if strategy == "flat":
        return _sort_bytes(1, rows * call.num_cols, 8)
    return _sort_bytes(rows, call.num_cols, _KEYS[call.error_dtype][0].itemsize)


# Below the GPU's chunk floor of temporaries a call runs in one chunk (why: ``_plan``'s
# floors; set_chunk_floor moves it); above it, a call's temporaries stay within its
# gradient's size, so inputs past the floor need about twice their size. The GPU floor even on
# CPU tensors: this is a GPU backend.
_GPU = torch.device("cuda")


def _budget_bytes(gradient_bytes: int) -> int:
    """The temporaries a call may hold at once: the gradient's size or the GPU's chunk floor,
    whichever is larger; within a chunk of a strictly budgeted loss call that runs through
    the generic path, what the loss layer allows it (``chunk_allowance_bytes``)."""
    budget = _SETTINGS["chunk_bytes"]
    if budget is None:
        budget = chunk_allowance_bytes()
    if budget is None:
        budget = max(gradient_bytes, chunk_floor_bytes(_GPU))
    return budget


def _sort_over_strict_budget(call: _Call, gradient_bytes: int) -> bool:
    """Whether the budget is strict (a GPU floor the user set) and one segment's sort alone
    would not fit in it: this backend never splits a segment's sort, so the call goes to the
    torch backend, which sorts such segments a range of values at a time."""
    if not budget_is_strict(_GPU):
        return False
    strategy = sort_strategy(call.input_dtype, call.num_cols,
                             from_scores=call.flags["FROM_SCORES"])
    return _chunk_bytes(call, strategy, 1) > _budget_bytes(gradient_bytes)


def _segments_per_chunk(call: _Call, strategy: str, gradient_bytes: int) -> int:
    """How many segments run at once: the most whose temporaries (``_chunk_bytes``) stay
    within the budget (``_budget_bytes``); one segment when even one does not fit (a
    segment's sort is never split: under a strict budget such a call does not get here,
    :func:`_sort_over_strict_budget`)."""
    total = max(call.num_segments, 1)
    budget = _budget_bytes(gradient_bytes)
    if _chunk_bytes(call, strategy, total) <= budget:
        return total
    low, high = 1, total  # the answer is in [low, high): chunks of `high` rows do not fit
    while high - low > 1:
        middle = (low + high) // 2
        if _chunk_bytes(call, strategy, middle) <= budget:
            low = middle
        else:
            high = middle
    return low


def _run_in_registers(call: _Call, loss: torch.Tensor) -> None:
    key_dtype, key_half = _KEYS[call.error_dtype]
    _launch(
        _small_segment_kernel, call.num_segments, *call.source, *call.gradient, loss,
        call.num_cols, **call.flags, ERROR_DTYPE=_tl_dtype(call.error_dtype),
        KEY_DTYPE=_tl_dtype(key_dtype), KEY_HALF=key_half, INDEX_BITS=_SMALL_INDEX_BITS,
        INT64=call.int64, BLOCK=max(16, triton.next_power_of_2(call.num_cols)),
        num_warps=4 if call.num_cols <= 1024 else 8,
    )


def _build_keys(call: _Call, flat: bool) -> torch.Tensor:
    """The (S·num_cols,) sort keys of every pixel (``_build_keys_kernel``): ``_make_key`` keys
    in their own width, or the int64 ``_flat_key`` of each with ``flat``."""
    key_dtype, key_half = _KEYS[call.error_dtype]
    block = min(_tile(call.num_cols), max(16, triton.next_power_of_2(call.pixels_per_image)))
    keys = torch.empty(call.num_segments * call.num_cols,
                       dtype=torch.int64 if flat else key_dtype, device=call.device)
    _launch(
        _build_keys_kernel if _INTERPRETED else _build_keys_tuned, call.pixel_programs(block),
        *call.source, keys, call.num_segments, call.tiles_per_image(block), call.num_cols,
        call.num_cols.bit_length(), **call.flags, ERROR_DTYPE=_tl_dtype(call.error_dtype),
        KEY_DTYPE=_tl_dtype(key_dtype), KEY_HALF=key_half, FLAT=flat, INT64=call.int64,
        BLOCK=block,
    )
    return keys


def _run_sorted(call: _Call, loss: torch.Tensor, flat: bool) -> None:
    num_segments, num_cols, device = call.num_segments, call.num_cols, call.device
    key_dtype, key_half = _KEYS[call.error_dtype]
    keys = _build_keys(call, flat)
    # the one step outside Triton: CUB's radix sort (values come back as keys)
    if flat:
        keys_sorted, order = torch.sort(keys, descending=True)
    else:
        keys_sorted, order = torch.sort(keys.view(num_segments, num_cols), dim=1,
                                        descending=True)
    del keys

    count_dtype = torch.int64 if call.int64 else torch.int32
    count_tl = _tl_dtype(count_dtype)
    tile = _tile(num_cols)
    num_tiles = triton.cdiv(num_cols, tile)
    counts = torch.empty((num_segments, num_tiles), dtype=count_dtype, device=device)
    _launch(_tile_counts_kernel, num_segments * num_tiles, keys_sorted, counts, num_cols,
            num_tiles, COUNT_DTYPE=count_tl, INT64=call.int64, BLOCK=tile)
    carries = torch.empty_like(counts)
    n_fg = torch.empty(num_segments, dtype=count_dtype, device=device)
    _launch(_scan_tiles_kernel, num_segments, counts, carries, n_fg, num_tiles,
            COUNT_DTYPE=count_tl, INT64=call.int64, SCAN_BLOCK=_SETTINGS["scan_block"])
    partials = torch.empty((num_segments, num_tiles), dtype=torch.float64, device=device)
    compute = tl.float64 if call.error_dtype == torch.float64 else tl.float32
    _launch(
        _apply_kernel if _INTERPRETED else _apply_tuned, num_segments * num_tiles,
        *call.source, *call.gradient, keys_sorted, order, carries, n_fg, partials, num_cols,
        num_tiles, num_cols.bit_length(), **call.flags, ERROR_DTYPE=_tl_dtype(call.error_dtype),
        KEY_DTYPE=_tl_dtype(key_dtype), KEY_HALF=key_half, COMPUTE_DTYPE=compute,
        COUNT_DTYPE=count_tl, FLAT=flat, INT64=call.int64, BLOCK=tile,
    )
    _launch(_segment_loss_kernel, num_segments, partials, loss, num_tiles, INT64=call.int64,
            SCAN_BLOCK=_SETTINGS["scan_block"])


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _histogram_tables(
    dtype: torch.dtype, bg_offset: float | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank, bin_value) for the histogram path, built on the host once per (dtype,
    bg_offset, device) and cached (no device synchronisation after the first call).

    16-bit errors (``bg_offset`` None): bins are the bits of max(e, 0); ``bin_value`` (2^15,)
    float32 holds their values; no rank is looked up (``rank`` is ``bin_value``, a placeholder
    pointer).

    16-bit scores: every score bit pattern x gives two candidate errors, computed exactly as
    the kernels compute them (float32 ``1 − x`` on foreground, ``x + bg_offset`` elsewhere),
    each turned into its sort key's value bits (``_make_key`` without the label: bits of
    max(e, 0)). ``rank`` (2, 2^16) int32 maps (is_fg, bits of x) to the index of that value
    among the sorted distinct values, so ranks order like the errors and equal errors share a
    rank whatever their class; ``bin_value`` holds each rank's error, padded with zeros to a
    multiple of 1024 (at most 64513 ranks for float16 softmax).
    """
    cache_key = (dtype, bg_offset, device)
    tables = _TABLES.get(cache_key)
    if tables is not None:
        return tables
    if bg_offset is None:
        bits = torch.arange(_HISTOGRAM_HALF_BINS, dtype=torch.int16)
        bin_value = bits.view(dtype).to(torch.float32)
        rank = bin_value
    else:
        scores = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype).float()
        errors = torch.stack([scores + bg_offset, 1.0 - scores])  # row 0 bg, row 1 fg
        keys = errors.view(torch.int32)
        keys = torch.where(keys > 0, keys, 0)  # as _make_key: ≤ 0, -0.0, negative NaN → +0.0
        values, inverse = torch.unique(torch.cat([keys.reshape(-1), keys.new_zeros(1)]),
                                       sorted=True, return_inverse=True)
        rank = inverse[:-1].reshape(2, 1 << 16).to(torch.int32)
        num_bins = triton.cdiv(values.numel(), _BIN_ALIGN) * _BIN_ALIGN
        bin_value = torch.zeros(num_bins, dtype=torch.float32)
        bin_value[: values.numel()] = values.view(torch.float32)
    tables = (rank.to(device), bin_value.to(device))
    _TABLES[cache_key] = tables
    return tables


def _run_histogram(call: _Call, loss: torch.Tensor) -> None:
    from_scores = call.flags["FROM_SCORES"]
    rank, bin_value = _histogram_tables(call.input_dtype,
                                        call.bg_offset if from_scores else None, call.device)
    num_bins = bin_value.numel()
    num_segments, device = call.num_segments, call.device
    block = min(_tile(call.num_cols), max(16, triton.next_power_of_2(call.pixels_per_image)))
    programs, tiles = call.pixel_programs(block), call.tiles_per_image(block)
    meta = dict(**call.flags, NUM_BINS=num_bins, INT64=call.int64, BLOCK=block)
    hist = torch.zeros((num_segments, 2, num_bins), dtype=torch.int32, device=device)
    _launch(_histogram_kernel, programs, *call.source, hist, rank, num_segments, tiles, **meta)
    bin_grad = torch.empty((num_segments, 2, num_bins), dtype=torch.float32, device=device)
    _launch(_histogram_scan_kernel, num_segments, hist, bin_grad, bin_value, loss,
            NUM_BINS=num_bins, SCAN_BLOCK=_BIN_ALIGN)
    _launch(_histogram_gather_kernel, programs, *call.source, *call.gradient, bin_grad, rank,
            num_segments, tiles, **meta)


def lovasz_extension(errors: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (S,) and gradient (S, P) of the Lovász extension with Triton kernels.

    Inputs are validated (S, P ≥ 1, same device, ``-inf`` padding with fg False); strided
    inputs are read in place. The loss is in max(dtype, float32), the gradient in the input
    dtype. See the module docstring for the kernels; under a strict budget that one
    segment's sort would not fit, the torch backend's extension runs instead.
    """
    gradient_bytes = errors.numel() * errors.element_size()
    # the errors stand in for the gradient: only the call's sizes are read
    if _sort_over_strict_budget(_errors_call(errors, fg, errors), gradient_bytes):
        return get_backend("torch").run(errors, fg)
    with _on_device(errors.device):
        grad = torch.empty(errors.shape, dtype=errors.dtype, device=errors.device)
        loss = torch.empty(errors.shape[0], dtype=compute_dtype(errors.dtype),
                           device=errors.device)
        _run(_errors_call(errors, fg, grad), loss, gradient_bytes)
        return loss, grad


def _errors_call(errors: torch.Tensor, fg: torch.Tensor, grad: torch.Tensor) -> _Call:
    """(S, P) errors and fg read in place, the (S, P) gradient written into ``grad``."""
    num_segments, num_pixels = errors.shape
    fg_bytes = fg.view(torch.uint8)  # same strides; Triton loads bytes, no bool quirks
    source = (errors, fg_bytes, errors, errors, errors, num_pixels, 0, 0.0,
              errors.stride(0), 0, errors.stride(1), fg_bytes.stride(0), 0, fg_bytes.stride(1))
    return _Call(
        num_segments=num_segments, num_cols=num_pixels, pixels_per_image=num_pixels,
        images_per_segment=1, input_dtype=errors.dtype, error_dtype=errors.dtype,
        bg_offset=0.0, source=source, gradient=(grad, errors, num_pixels, 0, 1),
        flags=dict(FROM_SCORES=False, BATCH_SEGMENTS=False, HAS_IGNORE=False),
        int64=_needs_int64(num_segments * num_pixels, errors, fg_bytes, grad),
        device=errors.device,
        segments=lambda start, stop: _errors_call(errors[start:stop], fg[start:stop],
                                                  grad[start:stop]),
    )



def lovasz_loss(
    scores: torch.Tensor, labels: torch.Tensor, plan: SegmentPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused loss path (see :mod:`lovasz_kernels._plan` and the module docstring).

    ``scores`` (B, C, P) in their own dtype, ``labels`` (B, P) int64 class indices, or
    (B, C, P) {0, 1} masks for a multilabel plan (foreground: label 1 in the segment's channel),
    both read in place.
    Returns the 0-d float64 total ``Σ_s weight[s] · extension_s`` and its gradient w.r.t. the
    scores (B, C, P) in max(dtype, float32). Makes no host synchronisation: the segment losses
    are summed with their weights on the device, and with a dense plan every pixel of the
    gradient is written by the kernels (0 for segments of weight 0). Under a strict budget
    that one segment's sort would not fit, the torch backend runs the call instead (with host
    reads: its ranges are cut where the values fall).
    """
    compute = compute_dtype(scores.dtype)
    device = scores.device
    num_segments = plan.num_segments
    if num_segments == 0 or scores.numel() == 0:
        return (torch.zeros((), dtype=torch.float64, device=device),
                torch.zeros(scores.shape, dtype=compute, device=device))
    gradient_bytes = scores.numel() * compute.itemsize
    # the scores stand in for the gradient: only the call's sizes are read
    if _sort_over_strict_budget(_scores_call(scores, labels, plan, scores), gradient_bytes):
        return get_backend("torch").run_loss(scores, labels, plan)
    with _on_device(device):
        # a dense plan covers every (image, channel) once: the kernels write every pixel
        allocate = torch.empty if plan.dense else torch.zeros
        grad = allocate(scores.shape, dtype=compute, device=device)
        segment_loss = torch.empty(num_segments, dtype=torch.float64, device=device)
        _run(_scores_call(scores, labels, plan, grad), segment_loss, gradient_bytes)
        return torch.dot(segment_loss, plan.weight), grad


def _scores_call(
    scores: torch.Tensor, labels: torch.Tensor, plan: SegmentPlan, grad: torch.Tensor
) -> _Call:
    """The plan's segments of scores (B, C, P) and labels (B, P), read in place; the
    weighted, signed gradient written into ``grad`` (B, C, P)."""
    batch, _, num_pixels = scores.shape
    batch_segments = plan.image is None
    num_cols = batch * num_pixels if batch_segments else num_pixels
    image = plan.channel if batch_segments else plan.image  # (unused for batch segments)
    # as _validate.valid_pixels: an ignore_index int64 labels cannot hold matches nothing
    has_ignore = plan.ignore_index is not None and -(2**63) <= plan.ignore_index < 2**63
    ignore_index = plan.ignore_index if has_ignore else 0
    # class indices (B, P) serve every channel; multilabel labels (B, C, P) are per channel
    label_strides = (labels.stride() if plan.multilabel
                     else (labels.stride(0), 0, labels.stride(1)))
    source = (scores, labels, image, plan.channel, plan.fg_label, num_pixels, ignore_index,
              float(plan.bg_offset), *scores.stride(), *label_strides)
    return _Call(
        num_segments=plan.num_segments, num_cols=num_cols, pixels_per_image=num_pixels,
        images_per_segment=batch if batch_segments else 1, input_dtype=scores.dtype,
        error_dtype=compute_dtype(scores.dtype), bg_offset=float(plan.bg_offset),
        source=source, gradient=(grad, plan.weight, *grad.stride()),
        flags=dict(FROM_SCORES=True, BATCH_SEGMENTS=batch_segments, HAS_IGNORE=has_ignore),
        int64=_needs_int64(plan.num_segments * num_cols, scores, labels, grad),
        device=scores.device,
        segments=lambda start, stop: _scores_call(scores, labels, plan.segments(start, stop),
                                                  grad),
    )



def sort_keys(
    scores: torch.Tensor, labels: torch.Tensor, plan: SegmentPlan, *, flat: bool = False
) -> torch.Tensor:
    """The keys a fused loss call sorts, for timing the sort on its own (benchmarks).

    Returns (S, num_cols) keys (int32 for float32 and 16-bit scores, int64 for float64),
    sorted by ``torch.sort(keys, dim=1, descending=True)`` under ``rows``; with ``flat`` the
    (S·num_cols,) int64 flat keys, sorted by ``torch.sort(keys, descending=True)`` (scores
    up to 32 bits: float64 scores always sort by rows).
    """
    if flat and scores.dtype == torch.float64:
        raise ValueError("flat keys pack 32-bit keys; float64 scores have 64-bit keys and sort "
                         "by rows (flat=False)")
    with _on_device(scores.device):
        # only the keys kernel runs: nothing writes a gradient (the scores stand in for it)
        call = _scores_call(scores, labels, plan, scores)
        keys = _build_keys(call, flat)
    return keys if flat else keys.view(call.num_segments, call.num_cols)


@contextlib.contextmanager
def _on_device(device: torch.device) -> Iterator[None]:
    """Triton launches on the current CUDA device: make it the tensors'."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


# lovasz_loss runs multilabel plans too (see lovasz_kernels._registry)
FUSED_MULTILABEL = True


def availability() -> tuple[bool, str]:
    """Whether the kernels can run here: triton installed and a CUDA device or the interpreter."""
    if triton is None:
        return False, (f"triton is not installed ({_IMPORT_ERROR}); pip install 'triton>=3.6' "
                       "(Linux; from a clone: pip install -e '.[triton]')")
    if _INTERPRETED or torch.cuda.is_available():
        return True, ""
    if triton.knobs.runtime.interpret:
        return False, ("no CUDA device, and TRITON_INTERPRET=1 was set after "
                       "lovasz_kernels.backends.triton_gpu was imported (kernels are built at "
                       "import): set it before, e.g. in the shell")
    return False, "no CUDA device; set TRITON_INTERPRET=1 to run the kernels on the CPU for testing"


def supported_devices() -> tuple[str, ...]:
    """CUDA tensors; CPU tensors too when the kernels run in Triton's interpreter."""
    return ("cuda", "cpu") if _INTERPRETED else ("cuda",)


def details() -> str:
    """One line for ``lovasz-kernels info``."""
    sort = f"sort {requested_sort()} (${SORT_ENV})"
    if _INTERPRETED:
        return (f"triton {triton.__version__}, interpreter mode (TRITON_INTERPRET=1, slow; "
                f"tests), {sort}")
    if torch.cuda.is_available():
        return f"triton {triton.__version__} on {torch.cuda.get_device_name()}, {sort}"
    return ""
