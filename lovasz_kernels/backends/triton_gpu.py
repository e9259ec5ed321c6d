"""The ``triton`` backend: Triton kernels on CUDA tensors (CPU tensors under the interpreter).

Pipeline for an (S, P) batch of segments (DESIGN.md §1, §5):

1. ``_build_keys_kernel``: one integer key per pixel, as wide as the input float (int16 for
   fp16/bf16, int32 for fp32, int64 for fp64). Errors ≤ 0 (and ``-inf`` padding) map to 0:
   they carry no loss and no gradient, so their order among themselves is irrelevant, and
   clamping makes every remaining bit pattern a non-negative, monotone integer. The label is
   folded into the low bit *without* dropping a value bit: ``key = 2 (bits − 2^(w−2)) + fg``
   fits in w signed bits exactly, so the sorted keys give back the error and the label with no
   gather, and values one ulp apart keep their order.
2. ``torch.sort`` of the keys, descending, per row (CUB segmented radix sort on the GPU; the
   only step that is not a Triton kernel). Its indices are the scatter targets.
3. Exact integer prefix counts across tiles, as a reduce-then-scan: ``_tile_counts_kernel``
   counts foreground pixels per tile (grid S × tiles), ``_scan_tiles_kernel`` turns each row of
   tile counts into exclusive carries (one program per segment, a chunked ``tl.cumsum`` loop
   over the few thousand tile totals, not over the pixels) and the segment's n_fg.
4. ``_apply_kernel`` (grid S × tiles): in-tile ``tl.cumsum`` plus the tile's carry gives c_k;
   the closed-form Jaccard increment (no cancellation), the gradient scattered back to the
   pixel's original position, and the tile's loss partial in float64.
5. ``_segment_loss_kernel``: a fixed-order float64 sum of the tile partials (deterministic).

On a GPU the key, counts and apply kernels are ``triton.autotune``-d (block size and warps; the
counts kernel's tile is reused by the apply kernel, as both must cut a row into the same tiles).
The interpreter times nothing, so it uses fixed tiles; tests force tiny ones (``_override``).

Segments of at most ``small_segment_max`` pixels (2048; fp16/bf16/fp32) skip steps 2–5: one
program per segment packs ``key << 12 | index`` into int64, sorts it in registers with
``tl.sort`` and does the whole scan, loss and scatter in one kernel (``_small_segment_kernel``).
The interpreter emulates that bitonic sort slowly, so there this path runs only when forced.

fp16/bf16 segments of at least ``histogram_min_pixels`` (2^16) take the sort-free path of
DESIGN.md §5 instead: ``_histogram_kernel`` counts fg / bg pixels per 16-bit error value
(integer atomics into 2^15 bins per segment), ``_histogram_scan_kernel`` walks the bins from
the largest error down with exact int64 carries and gives the exact loss and one gradient per
bin and class (a tie group's pixels of one class share one increment, the mean of ordering the
tie fg-first and bg-first: a deterministic subgradient), and ``_histogram_gather_kernel``
writes each pixel's gradient. O(P + 2^15) per segment, no sort.

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
from collections.abc import Iterator

import torch

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


def _autotune(configs: list, key: list[str]):
    def wrap(kernel):
        return kernel if triton is None else triton.autotune(configs=configs, key=key)(kernel)

    return wrap


def _configs(blocks: tuple[int, ...], warps: tuple[int, ...]) -> list:
    if triton is None:
        return []
    if not blocks:
        return [triton.Config({}, num_warps=w) for w in warps]
    return [triton.Config({"BLOCK": b}, num_warps=w) for b in blocks for w in warps]


# --------------------------------------------------------------------------------- kernels


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
    # keeps bfloat16 as raw uint16); ≤ 0, -0.0 and -inf padding all become +0.0
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
def _jaccard_increment(is_fg, fg_seen, position, n_fg, COMPUTE_DTYPE: tl.constexpr):
    """g_k of DESIGN.md §1 in closed form from exact integer counts.

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
def _segment_index(INT64: tl.constexpr):
    """This program's segment (grid axis 0), as int64 when offsets can pass 2^31."""
    segment = tl.program_id(0)
    if INT64:
        segment = segment.to(tl.int64)
    return segment


@_device_fn
def _tile_columns(num_pixels, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """(segment, tile, columns, columns < P) of a program in a grid (S, cdiv(P, BLOCK)).

    With INT64 all are int64, so ``segment * stride + columns * stride`` cannot overflow.
    """
    segment = _segment_index(INT64)
    tile = tl.program_id(1)
    if INT64:
        tile = tile.to(tl.int64)
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    return segment, tile, cols, cols < num_pixels


@_device_fn
def _load_pixels(errors_ptr, fg_ptr, segment, cols, mask,
                 stride_es, stride_ep, stride_fs, stride_fp):
    """errors[segment, cols] (0.0 where masked) and fg[segment, cols] != 0 (False where masked).

    errors, fg: (S, P) strided, fg as uint8 bytes.
    """
    errors = tl.load(errors_ptr + segment * stride_es + cols * stride_ep, mask=mask, other=0.0)
    is_fg = tl.load(fg_ptr + segment * stride_fs + cols * stride_fp, mask=mask, other=0)
    return errors, is_fg != 0


@_device_fn
def _histogram_bin(errors, is_fg, NUM_BINS: tl.constexpr):
    """Flat index into a segment's (2, NUM_BINS) table (row 0 bg, row 1 fg) by bits of max(e, 0).

    The bits of a non-negative 16-bit float are an order-preserving rank below NUM_BINS = 2^15;
    errors ≤ 0 share bin 0.
    """
    bits = errors.to(tl.int16, bitcast=True).to(tl.int32)
    return tl.where(bits > 0, bits, 0) + is_fg.to(tl.int32) * NUM_BINS


@_jit
def _build_keys_kernel(
    errors_ptr, fg_ptr, keys_ptr, num_pixels, size_class,
    stride_es, stride_ep, stride_fs, stride_fp,
    KEY_DTYPE: tl.constexpr, KEY_HALF: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    """keys (S, P) contiguous, KEY_DTYPE ← ``_make_key(errors (S, P), fg (S, P) as uint8)``.

    Grid (S, cdiv(P, BLOCK)). ``size_class`` is only the autotuning key.
    """
    segment, _, cols, mask = _tile_columns(num_pixels, INT64, BLOCK)
    errors, is_fg = _load_pixels(errors_ptr, fg_ptr, segment, cols, mask,
                                 stride_es, stride_ep, stride_fs, stride_fp)
    key = _make_key(errors, is_fg.to(KEY_DTYPE), KEY_DTYPE, KEY_HALF)
    tl.store(keys_ptr + segment * num_pixels + cols, key, mask=mask)


@_jit
def _tile_counts_kernel(
    keys_ptr, counts_ptr, num_pixels, counts_stride, size_class,
    COUNT_DTYPE: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    """counts[s, t] = Σ label bits of sorted keys[s, t·BLOCK : (t+1)·BLOCK] (int32 or int64).

    Grid (S, cdiv(P, BLOCK)); ``counts`` rows are ``counts_stride`` long.
    """
    segment, tile, cols, mask = _tile_columns(num_pixels, INT64, BLOCK)
    keys = tl.load(keys_ptr + segment * num_pixels + cols, mask=mask, other=0)
    labels = (keys & 1).to(COUNT_DTYPE)
    tl.store(counts_ptr + segment * counts_stride + tile, tl.sum(labels, axis=0))


@_jit
def _scan_tiles_kernel(
    counts_ptr, carries_ptr, n_fg_ptr, num_tiles, counts_stride,
    COUNT_DTYPE: tl.constexpr, INT64: tl.constexpr, SCAN_BLOCK: tl.constexpr,
):
    """carries[s, t] = Σ_{u<t} counts[s, u] (exclusive scan); n_fg[s] = Σ_u counts[s, u].

    Grid (S,): one program per segment walks its row of tile totals in chunks of SCAN_BLOCK,
    carrying the running total between chunks (the pixels themselves are never read here).
    """
    segment = _segment_index(INT64)
    row = segment * counts_stride
    carry = tl.full([], 0, COUNT_DTYPE)
    for start in range(0, num_tiles, SCAN_BLOCK):
        idx = start + tl.arange(0, SCAN_BLOCK)
        mask = idx < num_tiles
        counts = tl.load(counts_ptr + row + idx, mask=mask, other=0)
        inclusive = tl.cumsum(counts, axis=0)
        tl.store(carries_ptr + row + idx, carry + inclusive - counts, mask=mask)
        carry += tl.sum(counts, axis=0)
    tl.store(n_fg_ptr + segment, carry)


@_jit
def _apply_kernel(
    keys_ptr, order_ptr, carries_ptr, n_fg_ptr, grad_ptr, partial_ptr,
    num_pixels, counts_stride, size_class,
    KEY_DTYPE: tl.constexpr, KEY_HALF: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    COUNT_DTYPE: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Increments, loss partials and the gradient scatter for one tile of sorted keys.

    keys, order: (S, P) sorted keys and the original column of each; carries, n_fg: from
    ``_scan_tiles_kernel``. Writes grad[s, order[s, k]] = g_k · 1[e_k > 0] (grad dtype) and
    partial[s, t] = Σ_{k in tile} max(e_k, 0) g_k in float64. Grid (S, cdiv(P, BLOCK)).
    """
    segment, tile, cols, mask = _tile_columns(num_pixels, INT64, BLOCK)
    keys = tl.load(keys_ptr + segment * num_pixels + cols, mask=mask, other=0)
    errors, positive, is_fg = _key_value(keys, KEY_DTYPE, KEY_HALF, grad_ptr.dtype.element_ty)
    is_fg = tl.where(mask, is_fg, 0).to(COUNT_DTYPE)
    carry = tl.load(carries_ptr + segment * counts_stride + tile)
    fg_seen = carry + tl.cumsum(is_fg, axis=0)
    n_fg = tl.load(n_fg_ptr + segment)
    grad, partial = _sorted_gradient_and_loss(errors, positive & mask, is_fg, fg_seen,
                                              (cols + 1).to(COUNT_DTYPE), n_fg, COMPUTE_DTYPE)
    tl.store(partial_ptr + segment * counts_stride + tile, partial)
    order = tl.load(order_ptr + segment * num_pixels + cols, mask=mask, other=0)
    grad_row = grad_ptr + segment * num_pixels
    tl.store(grad_row + order, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@_jit
def _segment_loss_kernel(
    partial_ptr, loss_ptr, num_tiles, counts_stride, INT64: tl.constexpr, SCAN_BLOCK: tl.constexpr,
):
    """loss[s] = Σ_t partial[s, t], in float64 and a fixed order (deterministic). Grid (S,)."""
    segment = _segment_index(INT64)
    row = partial_ptr + segment * counts_stride
    total = tl.zeros([SCAN_BLOCK], dtype=tl.float64)
    for start in range(0, num_tiles, SCAN_BLOCK):
        idx = start + tl.arange(0, SCAN_BLOCK)
        total += tl.load(row + idx, mask=idx < num_tiles, other=0.0)
    tl.store(loss_ptr + segment, tl.sum(total, axis=0).to(loss_ptr.dtype.element_ty))


@_jit
def _small_segment_kernel(
    errors_ptr, fg_ptr, grad_ptr, loss_ptr, num_pixels,
    stride_es, stride_ep, stride_fs, stride_fp,
    KEY_DTYPE: tl.constexpr, KEY_HALF: tl.constexpr, INDEX_BITS: tl.constexpr,
    INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Whole pipeline for segments of P ≤ BLOCK = 2^INDEX_BITS pixels, one program each.

    Packs ``key << INDEX_BITS | column`` (int64; keys of at most 32 bits), sorts it descending
    with ``tl.sort`` (bitonic, in registers), then scans, scatters the gradient and writes the
    float32 loss. errors, fg: (S, P) strided; grad (S, P) contiguous. Grid (S,).
    """
    segment = _segment_index(INT64)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_pixels
    errors, is_fg = _load_pixels(errors_ptr, fg_ptr, segment, cols, mask,
                                 stride_es, stride_ep, stride_fs, stride_fp)
    key = _make_key(errors, is_fg.to(KEY_DTYPE), KEY_DTYPE, KEY_HALF).to(tl.int64)
    # every real key is ≥ −2^31, so (key << INDEX_BITS) ≥ −2^43: padding lanes sort last
    packed = tl.where(mask, (key << INDEX_BITS) | cols, -(1 << 62))
    packed = tl.sort(packed, 0, descending=True)
    columns = packed & ((1 << INDEX_BITS) - 1)
    errors, positive, labels = _key_value(packed >> INDEX_BITS, KEY_DTYPE, KEY_HALF,
                                          grad_ptr.dtype.element_ty)
    labels = tl.where(mask, labels, 0).to(tl.int32)  # after the sort, position k < P is real
    fg_seen = tl.cumsum(labels, axis=0)
    n_fg = tl.sum(labels, axis=0)
    grad, loss = _sorted_gradient_and_loss(errors, positive & mask, labels, fg_seen, cols + 1,
                                           n_fg, tl.float32)
    tl.store(loss_ptr + segment, loss.to(loss_ptr.dtype.element_ty))
    tl.store(grad_ptr + segment * num_pixels + columns, grad.to(grad_ptr.dtype.element_ty),
             mask=mask)


@_jit
def _histogram_kernel(
    errors_ptr, fg_ptr, hist_ptr, num_pixels, stride_es, stride_ep, stride_fs, stride_fp,
    NUM_BINS: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    """hist[s, fg, bin] += 1 for every pixel; bin = bits of max(e, 0) as a 16-bit float.

    Bins as in ``_histogram_bin`` (an order-preserving rank; errors ≤ 0 share bin 0).
    hist: (S, 2, NUM_BINS) int32, zeroed. Grid (S, cdiv(P, BLOCK)).
    Integer atomics: the counts do not depend on their order.
    """
    segment, _, cols, mask = _tile_columns(num_pixels, INT64, BLOCK)
    errors, is_fg = _load_pixels(errors_ptr, fg_ptr, segment, cols, mask,
                                 stride_es, stride_ep, stride_fs, stride_fp)
    bins = _histogram_bin(errors, is_fg, NUM_BINS)
    tl.atomic_add(hist_ptr + segment * (2 * NUM_BINS) + bins, 1, mask=mask)


@_jit
def _histogram_scan_kernel(
    hist_ptr, bin_grad_ptr, loss_ptr,
    FLOAT_DTYPE: tl.constexpr, NUM_BINS: tl.constexpr, SCAN_BLOCK: tl.constexpr,
):
    """Exact loss and per-bin, per-class gradient of one segment from its (fg, bg) histogram.

    hist: (S, 2, NUM_BINS) int32 (row 0 bg, row 1 fg); bin_grad: (S, 2, NUM_BINS) float32,
    same layout; loss: (S,). Grid (S,).

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
        difference = tl.where((fg_count + bg_count > 0) & positive, difference, 0.0)
        # empty bins may be inf / NaN bit patterns: decode only the occupied ones
        occupied_bins = tl.where(difference != 0.0, bins, 0).to(tl.int16)
        value = occupied_bins.to(FLOAT_DTYPE, bitcast=True).to(tl.float32)
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
    errors_ptr, fg_ptr, bin_grad_ptr, grad_ptr, num_pixels, stride_es, stride_ep, stride_fs,
    stride_fp, NUM_BINS: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    """grad[s, p] = bin_grad[s, fg[s, p], bin(errors[s, p])] in the grad dtype.

    bin_grad: (S, 2, NUM_BINS) float32 (row 0 bg, row 1 fg). Grid (S, cdiv(P, BLOCK)).
    """
    segment, _, cols, mask = _tile_columns(num_pixels, INT64, BLOCK)
    errors, is_fg = _load_pixels(errors_ptr, fg_ptr, segment, cols, mask,
                                 stride_es, stride_ep, stride_fs, stride_fp)
    bins = _histogram_bin(errors, is_fg, NUM_BINS)
    grad = tl.load(bin_grad_ptr + segment * (2 * NUM_BINS) + bins, mask=mask, other=0.0)
    tl.store(grad_ptr + segment * num_pixels + cols, grad.to(grad_ptr.dtype.element_ty),
             mask=mask)



# autotuned entry points for compiled mode. The tile size is tuned on the counts kernel and
# reused by the apply kernel (both must cut the sorted row into the same tiles); the apply
# kernel then tunes its warps for that tile.
_TILE_BLOCKS = (1024, 2048, 4096)
_build_keys_tuned = _autotune(_configs((1024, 2048, 4096), (4, 8)), key=["size_class"])(
    _build_keys_kernel
)
_tile_counts_tuned = _autotune(_configs(_TILE_BLOCKS, (4, 8)), key=["size_class"])(
    _tile_counts_kernel
)
_apply_tuned = _autotune(_configs((), (4, 8, 16)), key=["size_class", "BLOCK"])(_apply_kernel)

try:  # which kind of kernels the decorators built (fixed at import, see the module docstring)
    from triton.runtime.interpreter import InterpretedFunction

    _INTERPRETED = isinstance(_tile_counts_kernel, InterpretedFunction)
except ImportError:
    _INTERPRETED = False


# ------------------------------------------------------------------------------------ host

# key integer type and 2^(w−2) per input float width
_KEYS = {
    torch.float16: (torch.int16, 1 << 14),
    torch.bfloat16: (torch.int16, 1 << 14),
    torch.float32: (torch.int32, 1 << 30),
    torch.float64: (torch.int64, 1 << 62),
}
_SMALL_INDEX_BITS = 12  # the fused tl.sort path packs a 12-bit column under a ≤ 32-bit key
_SETTINGS = {
    # segments up to this many pixels take the fused tl.sort path (fp16/bf16/fp32). DESIGN §5
    # puts its break-even with the global radix sort at ~2-4K pixels (not yet measured on a
    # GPU). The interpreter emulates the bitonic network slowly (~2 ms per pixel), so there it
    # is used only when a test forces it.
    "small_segment_max": None,  # None: 2048 compiled, 0 interpreted
    # tile of the scan and apply kernels: None autotunes on a GPU. The interpreter times nothing
    # and costs ~3 ms per program and little per pixel, so it takes the fewest tiles: P/16 (at
    # least 1024, at most 16384: multi-tile scans from 16K pixels on; tests force tiny tiles)
    "tile": None,
    "scan_block": 1024,
    "force_int64": False,
    # fp16/bf16 segments with at least this many pixels take the sort-free histogram path
    # (DESIGN §5). Its tables are 2 × 2^15 int32 counts and 2 × 2^15 float32 per-class
    # gradients per segment (256 KiB each), the order of a segment's own traffic at 2^16
    # pixels (128 KiB of fp16 errors, 64 KiB of labels, 128 KiB of gradient); the speed
    # break-even is not yet measured on a GPU. None disables it.
    "histogram_min_pixels": 1 << 16,
}
_HISTOGRAM_BINS = 1 << 15  # bits of a non-negative 16-bit float


@contextlib.contextmanager
def _override(**settings) -> Iterator[None]:
    """Temporarily change launch settings (tests force tiny tiles, int64 offsets, no fusion).

    Keys: ``small_segment_max``, ``tile`` (power of two), ``scan_block`` (power of two),
    ``force_int64``, ``histogram_min_pixels``. A forced ``tile`` also bypasses autotuning.
    """
    unknown = set(settings) - set(_SETTINGS)
    if unknown:
        raise ValueError(f"unknown triton backend settings: {sorted(unknown)}")
    saved = dict(_SETTINGS)
    _SETTINGS.update(settings)
    try:
        yield
    finally:
        _SETTINGS.clear()
        _SETTINGS.update(saved)


def _tl_dtype(dtype: torch.dtype):
    return {torch.int16: tl.int16, torch.int32: tl.int32, torch.int64: tl.int64,
            torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


def _max_offset(tensor: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))


def lovasz_extension(errors: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (S,) and gradient (S, P) of the Lovász extension with Triton kernels.

    Inputs are validated (S, P ≥ 1, same device, ``-inf`` padding with fg False); strided
    inputs are read in place. The loss is in max(dtype, float32), the gradient in the input
    dtype. See the module docstring for the kernels.
    """
    if errors.device.type == "cuda":
        with torch.cuda.device(errors.device):  # Triton launches on the current device
            return _lovasz_extension(errors, fg)
    return _lovasz_extension(errors, fg)


def _lovasz_extension(errors: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num_segments, num_pixels = errors.shape
    device = errors.device
    key_dtype, key_half = _KEYS[errors.dtype]
    fg_bytes = fg.view(torch.uint8)  # same strides; Triton loads bytes, no bool quirks
    int64 = _SETTINGS["force_int64"] or max(
        num_segments * num_pixels, _max_offset(errors) + 1, _max_offset(fg_bytes) + 1
    ) >= 2**31
    grad = torch.empty((num_segments, num_pixels), dtype=errors.dtype, device=device)
    loss = torch.empty(num_segments, dtype=compute_dtype(errors.dtype), device=device)
    strides = (*errors.stride(), *fg_bytes.stride())

    small_max = _SETTINGS["small_segment_max"]
    if small_max is None:
        small_max = 0 if _INTERPRETED else 2048
    small_max = min(small_max, 1 << _SMALL_INDEX_BITS)
    if num_pixels <= small_max and errors.dtype != torch.float64:
        _small_segment_kernel[(num_segments,)](
            errors, fg_bytes, grad, loss, num_pixels, *strides,
            KEY_DTYPE=_tl_dtype(key_dtype), KEY_HALF=key_half, INDEX_BITS=_SMALL_INDEX_BITS,
            INT64=int64, BLOCK=max(16, triton.next_power_of_2(num_pixels)),
            num_warps=4 if num_pixels <= 1024 else 8,
        )
        return loss, grad

    tile = _SETTINGS["tile"]
    if tile is None and _INTERPRETED:
        tile = min(max(triton.next_power_of_2(triton.cdiv(num_pixels, 16)), 1024), 16384)

    histogram_min = _SETTINGS["histogram_min_pixels"]
    if (errors.dtype in (torch.float16, torch.bfloat16) and histogram_min is not None
            and num_pixels >= histogram_min):
        hist = torch.zeros((num_segments, 2, _HISTOGRAM_BINS), dtype=torch.int32, device=device)
        block = tile or 1024
        grid = (num_segments, triton.cdiv(num_pixels, block))
        _histogram_kernel[grid](
            errors, fg_bytes, hist, num_pixels, *strides,
            NUM_BINS=_HISTOGRAM_BINS, INT64=int64, BLOCK=block,
        )
        bin_grad = torch.empty((num_segments, 2, _HISTOGRAM_BINS), dtype=torch.float32,
                               device=device)
        _histogram_scan_kernel[(num_segments,)](
            hist, bin_grad, loss, FLOAT_DTYPE=_tl_dtype(errors.dtype), NUM_BINS=_HISTOGRAM_BINS,
            SCAN_BLOCK=_SETTINGS["scan_block"],
        )
        _histogram_gather_kernel[grid](
            errors, fg_bytes, bin_grad, grad, num_pixels, *strides,
            NUM_BINS=_HISTOGRAM_BINS, INT64=int64, BLOCK=block,
        )
        return loss, grad

    size_class = num_pixels.bit_length()  # autotuning key: retune per power of two, not per P
    keys = torch.empty((num_segments, num_pixels), dtype=key_dtype, device=device)
    key_args = (errors, fg_bytes, keys, num_pixels, size_class, *strides)
    key_meta = dict(KEY_DTYPE=_tl_dtype(key_dtype), KEY_HALF=key_half, INT64=int64)
    if tile is None:
        _build_keys_tuned[lambda meta: (num_segments, triton.cdiv(num_pixels, meta["BLOCK"]))](
            *key_args, **key_meta
        )
    else:
        _build_keys_kernel[(num_segments, triton.cdiv(num_pixels, tile))](
            *key_args, **key_meta, BLOCK=tile
        )

    # the one step outside Triton: CUB's segmented radix sort (values come back as keys)
    keys_sorted, order = torch.sort(keys, dim=1, descending=True)
    del keys
    keys_sorted, order = keys_sorted.contiguous(), order.contiguous()

    count_dtype = torch.int64 if int64 else torch.int32
    count_tl = _tl_dtype(count_dtype)
    counts_stride = triton.cdiv(num_pixels, tile or min(_TILE_BLOCKS))
    counts = torch.empty((num_segments, counts_stride), dtype=count_dtype, device=device)
    count_args = (keys_sorted, counts, num_pixels, counts_stride, size_class)
    if tile is None:
        _tile_counts_tuned[lambda meta: (num_segments, triton.cdiv(num_pixels, meta["BLOCK"]))](
            *count_args, COUNT_DTYPE=count_tl, INT64=int64
        )
        tile = _tile_counts_tuned.best_config.kwargs["BLOCK"]
        apply_kernel = _apply_tuned
    else:
        _tile_counts_kernel[(num_segments, triton.cdiv(num_pixels, tile))](
            *count_args, COUNT_DTYPE=count_tl, INT64=int64, BLOCK=tile
        )
        apply_kernel = _apply_kernel
    num_tiles = triton.cdiv(num_pixels, tile)

    scan_block = _SETTINGS["scan_block"]
    carries = torch.empty_like(counts)
    n_fg = torch.empty(num_segments, dtype=count_dtype, device=device)
    _scan_tiles_kernel[(num_segments,)](
        counts, carries, n_fg, num_tiles, counts_stride,
        COUNT_DTYPE=count_tl, INT64=int64, SCAN_BLOCK=scan_block,
    )
    partials = torch.empty((num_segments, counts_stride), dtype=torch.float64, device=device)
    compute = tl.float64 if errors.dtype == torch.float64 else tl.float32
    apply_kernel[(num_segments, num_tiles)](
        keys_sorted, order, carries, n_fg, grad, partials, num_pixels, counts_stride, size_class,
        KEY_DTYPE=_tl_dtype(key_dtype), KEY_HALF=key_half, COMPUTE_DTYPE=compute,
        COUNT_DTYPE=count_tl, INT64=int64, BLOCK=tile,
    )
    _segment_loss_kernel[(num_segments,)](
        partials, loss, num_tiles, counts_stride, INT64=int64, SCAN_BLOCK=scan_block
    )
    return loss, grad


def availability() -> tuple[bool, str]:
    """Whether the kernels can run here: triton installed and a CUDA device or the interpreter."""
    if triton is None:
        return False, (f"triton is not installed ({_IMPORT_ERROR}); "
                       "pip install 'lovasz-kernels[triton]' (Linux)")
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
    if _INTERPRETED:
        return f"triton {triton.__version__}, interpreter mode (TRITON_INTERPRET=1, slow; tests)"
    if torch.cuda.is_available():
        return f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    return ""
