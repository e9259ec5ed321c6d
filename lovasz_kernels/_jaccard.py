"""Algorithm 1 of the paper (the Jaccard increments of a sorted label vector) in torch.

Used by the torch backend and by :func:`lovasz_kernels.lovasz_grad`; the numpy reference
keeps its own, independent transcription.
"""

from __future__ import annotations

import functools

import torch

from lovasz_kernels._masked import as_bytes, one_where_


def count_dtype(num_pixels: int, dtype: torch.dtype) -> torch.dtype:
    """The type that holds a segment's pixel counts exactly: ``dtype`` itself while every
    integer up to ``num_pixels`` is a ``dtype`` value (2^24 in float32), else an integer."""
    if num_pixels <= 2 / torch.finfo(dtype).eps:  # 2^(mantissa bits + 1)
        return dtype
    return torch.int32 if num_pixels < 2**31 - 1 else torch.int64


# PyTorch's CUDA scan of the last dimension of a 2-D array walks each row with one warp (about
# 1.3 ns per column on an H200, however many rows), while a 1-D array gets one device-wide
# scan, about 6 us for a million values. Rows are therefore scanned one by one while
# that takes fewer launches than this many columns each.
ONE_BY_ONE_COLUMNS_PER_ROW = 4096


def scan_rows_one_by_one(shape: torch.Size, device: torch.device) -> bool:
    """Whether :func:`cumsum_rows_` scans the rows of an array of ``shape`` one by one: on a
    GPU, for few long rows."""
    if device.type == "cpu" or len(shape) == 0:
        return False
    rows = shape[:-1].numel()
    return rows > 1 and rows * ONE_BY_ONE_COLUMNS_PER_ROW < shape[-1]


def cumsum_rows_(values: torch.Tensor, one_by_one: bool | None = None) -> torch.Tensor:
    """``values.cumsum_(dim=-1)`` (contiguous ``values``), on a GPU in the faster of one scan
    of every row and a scan of each row (``one_by_one``; by default
    :func:`scan_rows_one_by_one`)."""
    if one_by_one is None:
        one_by_one = scan_rows_one_by_one(values.shape, values.device)
    if not one_by_one:
        return values.cumsum_(dim=-1)
    for row in values.view(-1, values.shape[-1]):
        row.cumsum_(dim=0)
    return values


#: CPU arrays of at most this many elements get :func:`_increments_in_few_passes`: there each
#: pass costs about as much as the op that runs it, and ten ops with their own temporaries
#: beat the fifteen in place (4096 sorted labels on the development VM, new labels every
#: call: 80 against 110 us; 1024: 59 against 83 us; equal at 16384, slower beyond)
FEW_PASSES_MAX_ELEMENTS = 8192


def jaccard_increments(
    gt_sorted: torch.Tensor, dtype: torch.dtype, *, counts: torch.Tensor | None = None,
    out: torch.Tensor | None = None, fg_total: torch.Tensor | None = None,
    row_pixels: int | None = None, pixels_before: int = 0,
    fg_before: torch.Tensor | None = None,
) -> torch.Tensor:
    """g_k = Δ_J(first k+1 pixels) − Δ_J(first k), batched over the last dimension.

    Parameters
    ----------
    gt_sorted
        (..., P) bool: ground truth of the pixels in decreasing order of error.
    dtype
        Output float dtype (float32 or float64; arithmetic happens in it).
    counts, out
        Optional buffers of ``gt_sorted``'s shape to work in: ``counts`` of
        :func:`count_dtype` (overwritten), ``out`` of ``dtype`` (returned). Without them
        both are allocated; these two arrays are all the memory the increments take.
    fg_total, row_pixels
        When ``gt_sorted`` holds only the first pixels of longer rows (the rest have no
        increment worth computing: their errors are ≤ 0): each row's foreground pixels in
        all, (..., 1), and the rows' length, ``row_pixels`` (which sets the count type).
        The increments are those of the whole rows' first pixels, bit for bit.
    pixels_before, fg_before
        With ``fg_total`` and ``row_pixels``: ``gt_sorted`` holds the pixels that come after
        the first ``pixels_before`` of each row, of which ``fg_before`` (..., 1) are
        foreground (a row sorted a range of errors at a time). The increments are those of
        the same positions of the whole rows, bit for bit.

    Notes
    -----
    Counts are exact integers (float32 cumulative sums go wrong above 2^24 pixels: there
    they are kept in an integer type) and each increment is evaluated in closed form from
    them: with c_k the foreground pixels among the first k+1 and U_k = n_fg + (k+1) − c_k,
    g_k = 1/U_k on foreground and (n_fg − c_k)/(U_k (U_k − 1)) on background (1 when
    U_k = 1). Each is a few roundings from exact; the paper's ``jaccard[1:] - jaccard[:-1]``
    cancels and loses up to 2.5% in float32 at 1M pixels.
    """
    num_pixels = gt_sorted.shape[-1]
    device = gt_sorted.device
    if num_pixels == 0:
        return torch.empty(gt_sorted.shape, dtype=dtype, device=device) if out is None else out
    if (fg_before is None and pixels_before == 0 and device.type == "cpu"
            and gt_sorted.numel() <= FEW_PASSES_MAX_ELEMENTS
            and count_dtype(row_pixels or num_pixels, dtype) == dtype):
        return _increments_in_few_passes(gt_sorted, dtype, out, fg_total)
    if counts is None:
        counts = torch.empty(gt_sorted.shape, device=device,
                             dtype=count_dtype(row_pixels or num_pixels, dtype))
    # copied, then summed in place: a cumulative sum that converts the labels itself makes a
    # converted copy of them first (copied from their bytes: a copy from bool is a scalar loop)
    cumsum_rows_(counts.copy_(as_bytes(gt_sorted)))
    if fg_before is not None:
        counts.add_(fg_before.to(counts.dtype))
    n_fg = counts[..., -1:].clone() if fg_total is None else fg_total.to(counts.dtype)
    position = torch.arange(pixels_before + 1, pixels_before + num_pixels + 1,  # k + 1
                            device=device, dtype=counts.dtype)
    # everything in place in ``counts`` and ``out``: every pass is one wake-up of the thread
    # pool, every extra (..., P) array more peak memory (and integer counts, when needed,
    # cost a hidden float copy in each mixed-type op below)
    torch.sub(position, counts, out=counts).add_(n_fg)  # U_k = n_fg + (k+1) - c_k, exact
    increments = torch.empty(counts.shape, dtype=dtype, device=device) if out is None else out
    increments.copy_(counts)  # U_k, at most one rounding
    # 1/U_k on foreground, I_k/(U_k (U_k − 1)) on background: the numerator and the second
    # factor of the denominator are integers picked per pixel, the product and the quotient
    # one rounding each
    increments.mul_(one_where_(counts.sub_(1), gt_sorted))
    one_where_(counts.sub_(position.sub_(1)), gt_sorted)  # I_k = (U_k - 1) - k
    torch.div(counts, increments, out=increments)
    # U_k = 1 happens only at k = 0 when n_fg = 0: the first mistake alone costs the full loss
    # (0/0 above, the only NaN: U_k >= 2 everywhere else)
    if pixels_before == 0:
        increments[..., 0].nan_to_num_(nan=1.0)
    return increments


def _increments_in_few_passes(gt_sorted: torch.Tensor, dtype: torch.dtype,
                              out: torch.Tensor | None,
                              fg_total: torch.Tensor | None) -> torch.Tensor:
    """:func:`jaccard_increments` of small whole rows, bit for bit, in fewer ops: both cases
    of the closed form computed everywhere (new arrays, not a count buffer reused in place)
    and the foreground's picked, one masked select where the other order takes two. Counts
    in ``dtype`` itself (the caller checks that they are exact there)."""
    num_pixels = gt_sorted.shape[-1]
    counts = torch.cumsum(as_bytes(gt_sorted), dim=-1, dtype=dtype)  # c_k, exact
    n_fg = counts[..., -1:] if fg_total is None else fg_total.to(dtype)
    positions = _positions(num_pixels, dtype, torch.is_inference_mode_enabled())
    union, background = union_and_background(counts, n_fg, positions)
    if out is None:
        out = torch.empty(gt_sorted.shape, dtype=dtype, device=gt_sorted.device)
    torch.where(gt_sorted, union.reciprocal_(), background, out=out)  # 1 / U_k on foreground
    out[..., 0].nan_to_num_(nan=1.0)  # U_0 = 1: 0/0, as in jaccard_increments
    return out


def union_and_background(counts, n_fg, positions):
    """U_k and the background increment I_k / (U_k (U_k − 1)) from exact counts c_k, the
    foreground total n_fg and the positions k + 1, all in the increments' float dtype: torch
    tensors or numpy arrays alike (the same roundings, so the same bits), new arrays. The
    foreground's increment is 1 / U_k."""
    intersection = n_fg - counts  # I_k = n_fg - c_k
    union = intersection + positions  # U_k = n_fg + (k+1) - c_k
    background = (union - 1) * union  # U_k (U_k - 1), one rounding
    return union, intersection / background


@functools.lru_cache(maxsize=16)
def _positions(num_pixels: int, dtype: torch.dtype, inference: bool) -> torch.Tensor:
    """1, 2, …, ``num_pixels`` on the CPU, made once per size (a loop calls with the same
    sizes every step; one op less in calls where every op counts). Never written: callers
    only read it. Inference-mode tensors are kept apart (``inference``)."""
    return torch.arange(1, num_pixels + 1, dtype=dtype)
