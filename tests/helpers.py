"""Input builders and comparisons shared by the tests (not by any backend)."""

from __future__ import annotations

import contextlib
import math
import sys
import types
from collections.abc import Iterator

import torch

from lovasz_kernels import Backend, get_backend, register_backend
from lovasz_kernels._cases import GRAD_TOLERANCE, LOSS_TOLERANCE, Tolerance, mismatches
from lovasz_kernels._registry import unregister_backend
from lovasz_kernels.bench.measure import TorchAllocationPeakMeter

__all__ = [
    "GRAD_TOLERANCE",
    "LOSS_TOLERANCE",
    "assert_close_report",
    "distinct_float32",
    "measured_choice_file",
    "peak_allocated_bytes",
    "registered_fake_backend",
    "tie_free_errors",
    "tie_free_margins",
]

# bit ranges of finite values in (-2, 2) excluding ±0, per 16-bit dtype: drawing distinct
# bit patterns gives distinct values, so tie-free half-precision inputs exist at any size
_HALF_POSITIVE_BITS = {torch.float16: (0x0001, 0x4000), torch.bfloat16: (0x0001, 0x4000)}


def tie_free_errors(
    shape: tuple[int, int], dtype: torch.dtype, generator: torch.Generator
) -> torch.Tensor:
    """(S, P) errors with no two equal values in a row, about half of them negative."""
    rows, cols = shape
    if dtype in _HALF_POSITIVE_BITS:
        low, high = _HALF_POSITIVE_BITS[dtype]
        span = high - low
        out = torch.empty(rows, cols, dtype=torch.int16)
        for r in range(rows):
            picks = torch.randperm(2 * span, generator=generator)[:cols]
            negative = picks >= span
            bits = low + picks % span
            bits = torch.where(negative, bits | 0x8000, bits)  # set the sign bit
            out[r] = bits.to(torch.int32).to(torch.int16)
        return out.view(dtype)
    values = torch.randn(rows, cols, generator=generator, dtype=torch.float64).to(dtype)
    for r in range(rows):
        while torch.unique(values[r]).numel() != cols:  # practically never
            values[r] = torch.randn(cols, generator=generator, dtype=torch.float64).to(dtype)
    return values


def tie_free_margins(
    generator: torch.Generator, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary (logits, labels): float64 logits whose hinge margins 1 − y·F are all distinct
    (3/P apart in (−1, 2), none 0, across the whole batch), 40% foreground. A prox step too
    small to move a margin past another has the hinge gradient as its direction."""
    count = math.prod(shape)
    ranks = torch.randperm(count, generator=generator, dtype=torch.float64)
    margins = -1.0 + 3.0 * (ranks + 0.5) / count
    labels = (torch.rand(count, generator=generator) > 0.6).long()
    logits = (1.0 - margins) * (2 * labels - 1)
    return logits.reshape(shape), labels.reshape(shape)


def distinct_float32(num_pixels: int, generator: torch.Generator) -> torch.Tensor:
    """(1, P) float32 errors in [0.5, ...), pairwise distinct at any P up to 2^30, shuffled.

    Random float32 values collide by the birthday bound (~30k ties at 2^20 draws of
    torch.rand); consecutive bit patterns never do.
    """
    ranks = torch.randperm(num_pixels, generator=generator).to(torch.int32)
    return (0x3F000000 + ranks).view(torch.float32).reshape(1, -1)


def assert_close_report(
    actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance, what: str
) -> None:
    """Fail with how many entries mismatch, where, and by how much."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bad = mismatches(actual, expected, tol)
    if bool(bad.any()):
        where = torch.nonzero(bad)[:5].tolist()
        a = actual.detach().double().cpu()[bad][:5].tolist()
        e = expected.detach().double().cpu()[bad][:5].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} entries differ beyond "
            f"rtol={tol.rtol}, atol={tol.atol}; first at {where}: got {a}, expected {e}"
        )


def peak_allocated_bytes(call) -> int:
    """Peak bytes of torch's CPU allocations during ``call()`` (see the meter's docstring)."""
    return TorchAllocationPeakMeter().extra_peak_bytes(call)


@contextlib.contextmanager
def registered_fake_backend(
    name: str, scale_grad: float = 1.0, scale_loss: float = 1.0, raises: str | None = None,
    unavailable: str | None = None,
) -> Iterator[str]:
    """A backend registered as ``name`` for the block: the numpy reference's answer with the
    gradient and loss scaled, or raising ``RuntimeError(raises)``, or unavailable (reason)."""
    module = types.ModuleType(f"tests_fake_backend_{name}")

    def lovasz_extension(errors, fg):
        if raises:
            raise RuntimeError(raises)
        loss, grad = get_backend("numpy").run(errors, fg)
        return loss * scale_loss, grad * scale_grad

    module.lovasz_extension = lovasz_extension
    if unavailable:
        module.availability = lambda: (False, unavailable)
    sys.modules[module.__name__] = module
    register_backend(Backend(name=name, module=module.__name__, devices=("cpu",), priority=0,
                             summary="a test double"))
    try:
        yield name
    finally:
        unregister_backend(name)
        del sys.modules[module.__name__]


@contextlib.contextmanager
def measured_choice_file(monkeypatch, tmp_path, module: types.ModuleType, filename: str,
                         forget, measurement: str, result) -> Iterator[tuple[object, list]]:
    """A choice measured once per machine (``module.choice_path``), kept in an empty place
    under ``tmp_path`` instead of the user's cache, its measurement (``module.<measurement>``)
    replaced by one that returns ``result`` and counts its calls; this process's copy is
    dropped (``forget``) before and after. Yields the file's path and the list of calls."""
    path = tmp_path / "cache" / filename
    monkeypatch.setattr(module, "choice_path", lambda: str(path))
    forget()
    measured: list[int] = []
    monkeypatch.setattr(module, measurement, lambda: measured.append(1) or result)
    try:
        yield path, measured
    finally:
        forget()
