"""The ``numpy`` backend: the reference every other backend is tested against.

Plain and readable on purpose: one segment at a time, a stable argsort, float64 values and
int64 counts throughout. Speed is the other backends' business.
"""

from __future__ import annotations

import numpy as np
import torch

from lovasz_kernels.backends._host import errors_to_numpy, fg_to_numpy, results_to_torch


def _jaccard_increments(gt_sorted: np.ndarray) -> np.ndarray:
    """Algorithm 1 of the paper in closed form: g_k = Δ_J(first k+1) − Δ_J(first k).

    With c_k the foreground pixels among the first k+1 and U_k = n_fg + (k+1) − c_k the
    union, g_k = 1/U_k on a foreground pixel and (n_fg − c_k)/(U_k (U_k − 1)) on a background
    one (g_0 = 1 when n_fg = 0). Subtracting consecutive Jaccard values instead would cancel
    catastrophically once U_k is large.
    """
    fg_seen = np.cumsum(gt_sorted, dtype=np.int64)
    n_fg = fg_seen[-1]
    position = np.arange(1, gt_sorted.size + 1, dtype=np.int64)
    union = n_fg + position - fg_seen
    intersection = n_fg - fg_seen
    increments = np.empty(gt_sorted.size, dtype=np.float64)
    increments[gt_sorted] = 1.0 / union[gt_sorted]
    background = ~gt_sorted
    # U_k = 1 only at k = 0 with n_fg = 0: the first mistake alone costs the whole loss
    denominator = np.maximum(union * (union - 1), 1).astype(np.float64)
    increments[background] = np.where(
        union[background] == 1, 1.0, intersection[background] / denominator[background]
    )
    return increments


def _segment(errors: np.ndarray, fg: np.ndarray) -> tuple[float, np.ndarray]:
    """Loss and gradient of one segment: errors (P,) float64, fg (P,) bool."""
    order = np.argsort(-errors, kind="stable")  # descending; -inf padding sorts last
    errors_sorted = errors[order]
    increments = _jaccard_increments(fg[order])
    positive = errors_sorted > 0
    loss = float(np.dot(errors_sorted[positive], increments[positive]))
    grad = np.zeros(errors.size, dtype=np.float64)
    grad[order] = np.where(positive, increments, 0.0)
    return loss, grad


def lovasz_extension(errors: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (S,) and gradient (S, P) of the Lovász extension, one segment at a time.

    Only one segment is ever widened to float64; each segment's gradient is rounded into an
    array of at least float32 as it is done (16-bit gradients round once more, from there, as
    torch rounds a float64 one), so the whole call needs about the gradient's size, not three
    float64 copies of the input.
    """
    errors_np = errors_to_numpy(errors)
    fg_np = fg_to_numpy(fg)
    losses = np.zeros(errors_np.shape[0], dtype=np.float64)
    grads = np.empty(errors_np.shape, dtype=np.promote_types(errors_np.dtype, np.float32))
    for s in range(errors_np.shape[0]):
        losses[s], grads[s] = _segment(errors_np[s].astype(np.float64), fg_np[s])
    return results_to_torch(losses, grads, errors)
