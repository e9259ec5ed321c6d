"""Fixed inputs for cross-validating backends (``lovasz-kernels check``).

Random and awkward segments for the bare kernel: ties, padding, empty segments, no
foreground, one pixel, half precision, a wide segment. Deterministic: seeded generator.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExtensionCase:
    name: str
    errors: torch.Tensor
    fg: torch.Tensor
    tie_free: bool


def extension_cases(device: torch.device | str = "cpu", seed: int = 0) -> Iterator[ExtensionCase]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def coin(*shape: int, p: float = 0.5) -> torch.Tensor:
        return torch.rand(*shape, generator=gen) < p

    def case(name: str, errors: torch.Tensor, fg: torch.Tensor):
        fg = fg & (errors > -torch.inf)
        return ExtensionCase(name, errors.to(device), fg.to(device), _tie_free(errors))

    yield case("random 8x300 fp64", randn(8, 300), coin(8, 300))
    yield case("random 4x5000 fp32", randn(4, 5000).float(), coin(4, 5000, p=0.1))
    yield case("one pixel", randn(3, 1), torch.tensor([[True], [False], [True]]))
    no_fg = randn(2, 64)
    yield case("no foreground", no_fg, torch.zeros(2, 64, dtype=torch.bool))
    yield case("all foreground", randn(2, 64), torch.ones(2, 64, dtype=torch.bool))
    yield case("all errors <= 0", -randn(2, 50).abs(), coin(2, 50))
    padded = randn(4, 200)
    padded[:, 150:] = -torch.inf
    padded[3] = -torch.inf  # an empty segment
    yield case("padding and an empty segment", padded, coin(4, 200))
    tied = torch.randint(-2, 4, (5, 400), generator=gen).double() / 2
    yield case("ties", tied, coin(5, 400))
    yield case("fp16", randn(3, 700).half(), coin(3, 700))
    yield case("bf16", randn(3, 700).bfloat16(), coin(3, 700))
    yield case("wide segment 1x2^18", randn(1, 1 << 18).float(), coin(1, 1 << 18, p=0.3))


def _tie_free(errors: torch.Tensor) -> bool:
    """No two equal positive errors in a row (ties among errors <= 0 carry no gradient)."""
    for row in errors:
        positive = row[row > 0]
        if torch.unique(positive).numel() != positive.numel():
            return False
    return True


def tie_group_sums(errors: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Sum of the gradient over each group of equal errors in a row, spread back per pixel.

    The order of tied errors is arbitrary, but each tie group's total gradient is not: it is
    Δ_J(prefix ending after the group) − Δ_J(prefix before it). Comparing these sums compares
    two backends' gradients on tied inputs.
    """
    errors = errors.to(torch.float64)
    grad = grad.to(torch.float64)
    _, inverse = torch.unique(errors, return_inverse=True)
    groups_per_row = int(inverse.max()) + 1 if inverse.numel() else 1
    rows = torch.arange(errors.shape[0], device=errors.device)[:, None]
    group = rows * groups_per_row + inverse
    sums = torch.zeros(errors.shape[0] * groups_per_row, dtype=torch.float64,
                       device=errors.device)
    sums.index_add_(0, group.flatten(), grad.flatten())
    return sums[group]


@dataclass(frozen=True)
class Tolerance:
    """|actual − expected| ≤ atol + rtol·|expected|, elementwise."""

    rtol: float
    atol: float


# The gradient is returned in the input dtype, so half-precision gradients may differ by one
# rounding (and fp16 increments of ~1/P sit in the subnormal range, spaced 2^-24). Losses are
# computed in at least float32 whatever the input.
GRAD_TOLERANCE = {
    torch.float64: Tolerance(1e-9, 1e-15),
    torch.float32: Tolerance(1e-5, 1e-12),
    torch.float16: Tolerance(2e-3, 2.0**-24),
    torch.bfloat16: Tolerance(1.6e-2, 1e-30),
}
LOSS_TOLERANCE = {
    torch.float64: Tolerance(1e-9, 1e-12),
    torch.float32: Tolerance(1e-5, 1e-7),
    torch.float16: Tolerance(1e-5, 1e-7),
    torch.bfloat16: Tolerance(1e-5, 1e-7),
}


def mismatches(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance) -> torch.Tensor:
    """Boolean mask of entries outside the tolerance (compared in float64 on the CPU)."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    return (actual - expected).abs() > tol.atol + tol.rtol * expected.abs()


def max_deviation(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    diff = actual.detach().to("cpu", torch.float64) - expected.detach().to("cpu", torch.float64)
    return float(diff.abs().max())


def softmax_tie_group_sums(
    probas: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """:func:`tie_group_sums` for a ``lovasz_softmax`` gradient w.r.t. (B, C, ...) probas.

    Groups pixels by (class, error); each such group is a union of whole tie groups of the
    segments (per image or per batch), so its gradient total does not depend on tie order.
    """
    batch, num_classes = probas.shape[:2]

    def per_class(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float64).reshape(batch, num_classes, -1)
        return x.transpose(0, 1).reshape(num_classes, -1)

    fg = labels.cpu().reshape(1, -1) == torch.arange(num_classes)[:, None]
    errors = torch.where(fg, 1 - per_class(probas), per_class(probas))
    error_grad = torch.where(fg, -per_class(grad), per_class(grad))
    return tie_group_sums(errors, error_grad)
