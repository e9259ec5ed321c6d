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
    fg_seen = torch.cumsum(gt_sorted, dim=-1, dtype=count_dtype)
    n_fg = fg_seen[..., -1:]
    intersection = n_fg - fg_seen
    position = torch.arange(1, num_pixels + 1, device=gt_sorted.device, dtype=count_dtype)
    union = (intersection + position).to(dtype)
    on_background = intersection.to(dtype).div_(union * (union - 1).clamp_min_(1))
    increments = torch.where(gt_sorted, union.reciprocal_(), on_background)
    # U_k = 1 happens only at k = 0 when n_fg = 0: the first mistake alone costs the full loss
    increments[..., 0].masked_fill_(n_fg[..., 0] == 0, 1.0)
    return increments
