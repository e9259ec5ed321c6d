"""The ``torch`` backend: eager PyTorch, CPU and CUDA, one batched sort for all segments."""

from __future__ import annotations

import torch

from lovasz_kernels._jaccard import jaccard_increments
from lovasz_kernels._validate import compute_dtype

_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def lovasz_extension(errors: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (S,) and gradient (S, P) of the Lovász extension of every segment at once.

    Errors ≤ 0 (``-inf`` padding included) neither add to the loss nor get a gradient, and
    they sort after every positive error: clamped to 0, every key is a non-negative float,
    whose bit pattern orders like its value. So one descending sort of those bits as integers
    (faster than a float sort: no NaN handling) orders all segments together and gives back
    the sorted errors with no second pass. Increments, the loss dot product
    (accumulated in float64) and the scatter of the gradient back to original positions are
    each one vectorized pass: every pass is one more wake-up of torch's thread pool, which on
    a busy machine costs more than the pass.
    """
    dtype = compute_dtype(errors.dtype)
    keys = errors.to(dtype).clamp_min(0).view(_SAME_WIDTH_INT[dtype])
    keys_sorted, order = torch.sort(keys, dim=1, descending=True)
    del keys  # freed once dead: the peak is the sort's outputs and the increments' temporaries
    errors_sorted = keys_sorted.view(dtype)
    grad_sorted = jaccard_increments(torch.gather(fg, 1, order), dtype)
    grad_sorted.masked_fill_(errors_sorted == 0, 0.0)
    loss = torch.sum(errors_sorted * grad_sorted, dim=1, dtype=torch.float64)
    del keys_sorted, errors_sorted
    grad = torch.empty_like(grad_sorted).scatter_(1, order, grad_sorted)
    return loss.to(dtype), grad.to(errors.dtype)
