"""The ``torch`` backend: eager PyTorch, CPU and CUDA, one batched sort for all segments."""

from __future__ import annotations

import torch

from lovasz_kernels._jaccard import jaccard_increments
from lovasz_kernels._validate import compute_dtype

_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def _order_preserving_bits(values: torch.Tensor) -> torch.Tensor:
    """Reinterpret floats as signed ints with the same order (an involution on the bits).

    Non-negative floats already compare like their bit patterns; negative ones compare in
    reverse, so their magnitude bits are flipped. Sorting these ints is faster than sorting
    floats (no NaN handling) and the sorted values come back by applying the map again.
    """
    bits = values.view(_SAME_WIDTH_INT[values.dtype])
    magnitude_mask = torch.iinfo(bits.dtype).max
    return torch.where(bits < 0, bits ^ magnitude_mask, bits)


def lovasz_extension(errors: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (S,) and gradient (S, P) of the Lovász extension of every segment at once.

    One stable descending sort over (S, P) orders all segments together (``-inf`` padding
    sorts last); increments, the loss dot product (accumulated in float64) and the scatter of
    the gradient back to original positions are each one vectorized pass.
    """
    dtype = compute_dtype(errors.dtype)
    keys = _order_preserving_bits(errors.to(dtype))
    keys_sorted, order = torch.sort(keys, dim=1, descending=True)
    errors_sorted = _order_preserving_bits(keys_sorted.view(dtype)).view(dtype)
    increments = jaccard_increments(torch.gather(fg, 1, order), dtype)
    grad_sorted = increments.masked_fill_(errors_sorted <= 0, 0.0)
    loss = torch.sum(errors_sorted.clamp_min(0) * grad_sorted, dim=1, dtype=torch.float64)
    grad = torch.empty_like(grad_sorted).scatter_(1, order, grad_sorted)
    return loss.to(dtype), grad.to(errors.dtype)
