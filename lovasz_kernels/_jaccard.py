"""Algorithm 1 of the paper (the Jaccard increments of a sorted label vector) in torch.

Used by the torch backend and by :func:`lovasz_kernels.lovasz_grad`; the numpy reference
keeps its own, independent transcription.
"""

from __future__ import annotations

import torch


def jaccard_increments(gt_sorted: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """g_k = Δ_J(first k+1 pixels) − Δ_J(first k), batched over the last dimension.

    Parameters
    ----------
    gt_sorted
        (..., P) bool: ground truth of the pixels in decreasing order of error.
    dtype
        Output float dtype (float32 or float64; arithmetic happens in it).

    Notes
    -----
    Counts are exact integers (float32 cumulative sums go wrong above 2^24 pixels) and each
    increment is evaluated in closed form from them: with c_k the foreground pixels among the
    first k+1 and U_k = n_fg + (k+1) − c_k, g_k = 1/U_k on foreground and
    (n_fg − c_k)/(U_k (U_k − 1)) on background (1 when U_k = 1). Each is a few roundings from
    exact; the paper's ``jaccard[1:] - jaccard[:-1]`` cancels and loses up to 2.5% in float32
    at 1M pixels.
    """
    num_pixels = gt_sorted.shape[-1]
    count_dtype = torch.int32 if num_pixels < 2**31 - 1 else torch.int64
    # in place wherever a temporary is dead, so that at most four (S, P) arrays live at once
    # (the torch backend's peak memory); every pass is still one wake-up of the thread pool
    intersection = torch.cumsum(gt_sorted, dim=-1, dtype=count_dtype)  # fg seen so far
    n_fg = intersection[..., -1:].clone()
    intersection.neg_().add_(n_fg)  # I_k = n_fg - c_k
    position = torch.arange(num_pixels, device=gt_sorted.device, dtype=count_dtype)
    union_minus_one = intersection + position  # U_k - 1, an exact integer
    # 1/U_k on foreground, I_k/(U_k (U_k − 1)) on background: numerator and the second factor
    # of the denominator are integers picked per pixel, the product and quotient one rounding
    # each
    denominator = torch.empty(intersection.shape, dtype=dtype, device=gt_sorted.device)
    torch.add(union_minus_one, 1, out=denominator)  # U_k, exact in integers, then one rounding
    denominator.mul_(union_minus_one.masked_fill_(gt_sorted, 1))
    del union_minus_one
    increments = torch.div(intersection.masked_fill_(gt_sorted, 1), denominator, out=denominator)
    # U_k = 1 happens only at k = 0 when n_fg = 0: the first mistake alone costs the full loss
    # (0/0 above)
    increments[..., 0].masked_fill_(n_fg[..., 0] == 0, 1.0)
    return increments
