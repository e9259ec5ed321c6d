"""Fixed inputs for cross-validating backends (``lovasz-kernels check``), and how to compare.

Random and awkward segments for the bare kernel (ties, padding, empty segments, no
foreground, one pixel, half precision, a wide segment) and a few loss-level cases, with the
tolerances and the tie-order-independent comparison every cross-check uses. Deterministic:
seeded generators.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lovasz_kernels.losses import lovasz_hinge, lovasz_softmax


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


LossCase = Callable[[str, torch.device], tuple[torch.Tensor, torch.Tensor]]


def loss_cases() -> list[tuple[str, LossCase]]:
    """Loss-level cases: (name, run(backend, device) -> (loss, grad of the input)), float64,
    with an ignore label, per-image and batch modes, all classes counted."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 17, 23, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 6, (3, 17, 23), generator=gen)
    labels[0, :4] = 255
    binary = torch.randint(0, 2, (3, 17, 23), generator=gen)

    def softmax_case(**kwargs) -> LossCase:
        def run(backend: str, device: torch.device):
            scores = logits.to(device).softmax(dim=1).requires_grad_()
            loss = lovasz_softmax(scores, labels.to(device), ignore_index=255, backend=backend,
                                  **kwargs)
            return loss, torch.autograd.grad(loss, scores)[0]
        return run

    def hinge_case(**kwargs) -> LossCase:
        def run(backend: str, device: torch.device):
            scores = logits[:, 0].to(device).requires_grad_()
            loss = lovasz_hinge(scores, binary.to(device), backend=backend, **kwargs)
            return loss, torch.autograd.grad(loss, scores)[0]
        return run

    return [
        ("softmax batch, ignore", softmax_case()),
        ("softmax per-image, all classes", softmax_case(per_image=True, classes="all")),
        ("hinge per-image", hinge_case()),
        ("hinge batch", hinge_case(per_image=False)),
    ]


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
    two backends' gradients on tied inputs. Computed on the tensors' device, in memory linear
    in their size.
    """
    errors = errors.to(torch.float64)
    grad = grad.to(torch.float64)
    _, value_ids = torch.unique(errors, return_inverse=True)
    num_values = int(value_ids.max()) + 1 if value_ids.numel() else 1
    segment_ids = torch.arange(errors.shape[0], device=errors.device)[:, None]
    _, group = torch.unique(segment_ids * num_values + value_ids, return_inverse=True)
    sums = torch.zeros(group.numel(), dtype=torch.float64, device=errors.device)
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
    """Boolean mask of entries outside the tolerance (compared in float64 on the device of
    ``actual``)."""
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(actual.device, torch.float64)
    return (actual - expected).abs() > tol.atol + tol.rtol * expected.abs()


def max_deviation(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    actual = actual.detach().to(torch.float64)
    diff = actual - expected.detach().to(actual.device, torch.float64)
    return float(diff.abs().max())
