"""Helpers for backends that run on numpy arrays in host memory (numpy, numba)."""

from __future__ import annotations

import numpy as np
import torch


def errors_to_numpy(errors: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU errors tensor (no copy), bfloat16 widened to float32.

    numpy has no bfloat16; every bfloat16 value is exactly representable in float32, so
    widening loses nothing.
    """
    errors = errors.detach()
    if errors.dtype == torch.bfloat16:
        errors = errors.to(torch.float32)
    return errors.numpy()


def fg_to_numpy(fg: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU bool tensor (no copy)."""
    return fg.detach().numpy()


def results_to_torch(
    loss: np.ndarray, grad: np.ndarray, errors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wrap kernel outputs as tensors: loss in the compute dtype, grad in the input dtype."""
    from lovasz_kernels._validate import compute_dtype

    loss_tensor = torch.from_numpy(loss).to(compute_dtype(errors.dtype))
    grad_tensor = torch.from_numpy(grad).to(errors.dtype)
    return loss_tensor, grad_tensor
