"""Grids and seeded, cached inputs shared by every asv benchmark.

The grids are append-only: add values at the end, never change or remove one, so results stay
comparable across the project's history. ``BACKENDS`` names every registered backend (a new
backend joins the suite without editing it) and ``"loop"``, the per-class Python loop of the
common public implementation, as the yardstick.

Inputs: a batch of ``BATCH`` images holding ``pixels`` pixels *in total* (each image
``side x side/2``), so ``per_image=False`` sorts ``classes`` segments of ``pixels`` each (the
sizes quoted in the issues: 512² x 21 classes, one hinge segment of 1024²) and
``per_image=True`` sorts ``BATCH x classes`` segments of half the size.

Only the public API is used (plus ``_baselines`` where present), so the suite also runs against
older commits (``asv continuous``, ``asv run main~5..main``).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from lovasz_kernels import get_backend, registered_backends

# ------------------------------------------------------------------------------------------
# grids (append-only)

PIXELS = [64**2, 256**2, 512**2, 1024**2]
CLASSES = [2, 21, 150]
PER_IMAGE = [False, True]
DTYPES = ["float32", "float16"]
LOOP = "loop"
_BACKEND_ORDER = ["numpy", "torch", "numba", "triton", LOOP]
BACKENDS = _BACKEND_ORDER + sorted(set(registered_backends()) - set(_BACKEND_ORDER))
PROX_METHODS = ["exact", "greedy"]
SORT_FLOOR = "torch.sort"  # GPU suite only: one sort of the same (S, P) float32 keys
GPU_BACKENDS = [*BACKENDS, SORT_FLOOR]

BATCH = 2
SEED = 0
# the rule of the suite: a combination the numpy reference needs more than this for is skipped
REFERENCE_BUDGET_S = 10.0
# cost models (seconds), fitted on the 2-core development VM; deterministic on purpose, so the
# same combinations are skipped on every machine and every commit
_REFERENCE_S_PER_SORT_ELEMENT = 1.2e-8  # x S·P·log2(P), numpy reference fwd+bwd
_LOOP_S_PER_GRAD_ELEMENT = 2e-9  # x C²·P: the loop's backward writes a (P, C) grad per class


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def image_shape(pixels: int) -> tuple[int, int]:
    """(height, width) of each of the ``BATCH`` images holding ``pixels`` pixels in total."""
    height = math.isqrt(pixels)
    return height, pixels // (BATCH * height)


def segments(pixels: int, classes: int, per_image: bool) -> tuple[int, int]:
    """(S, P) of the kernel call: segments and pixels per segment (every class present)."""
    return (BATCH * classes, pixels // BATCH) if per_image else (classes, pixels)


def reference_seconds(pixels: int, classes: int, per_image: bool) -> float:
    num_segments, segment_pixels = segments(pixels, classes, per_image)
    return (_REFERENCE_S_PER_SORT_ELEMENT * num_segments * segment_pixels
            * math.log2(max(segment_pixels, 2)))


def loop_seconds(pixels: int, classes: int, per_image: bool) -> float:
    return (reference_seconds(pixels, classes, per_image)
            + _LOOP_S_PER_GRAD_ELEMENT * classes * classes * pixels)


def require(backend: str, device: str, pixels: int, classes: int, per_image: bool) -> None:
    """Raise ``NotImplementedError`` (asv: skipped) for combinations that do not run here."""
    if device == "cuda" and not torch.cuda.is_available():
        raise NotImplementedError("no CUDA device")
    guess = reference_seconds(pixels, classes, per_image)
    if device == "cpu" and guess > REFERENCE_BUDGET_S:
        raise NotImplementedError(f"the numpy reference would take ~{guess:.0f} s")
    if backend == LOOP:
        guess = loop_seconds(pixels, classes, per_image)
        if device == "cpu" and guess > REFERENCE_BUDGET_S:
            raise NotImplementedError(f"the per-class loop would take ~{guess:.0f} s")
        return
    if backend == SORT_FLOOR:
        return
    try:
        chosen = get_backend(backend)
    except ValueError as exc:  # a name from a newer grid run against an older commit
        raise NotImplementedError(str(exc)) from None
    available, reason = chosen.availability()
    if not available:
        raise NotImplementedError(reason)
    # native devices only: the Triton interpreter on a CPU is for tests, not for timing
    if device not in chosen.devices:
        raise NotImplementedError(f"{backend} does not run on {device}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------
# seeded, cached inputs (cached per process: asv runs each benchmark in its own process)


@lru_cache(maxsize=4)
def softmax_inputs(pixels: int, classes: int, dtype: str, device: str = "cpu"):
    """(probas (BATCH, C, h, w), labels (BATCH, h, w)): softmax of N(0, 1) logits, uniform
    labels."""
    gen = torch.Generator().manual_seed(SEED)
    height, width = image_shape(pixels)
    logits = torch.randn(BATCH, classes, height, width, generator=gen)
    labels = torch.randint(0, classes, (BATCH, height, width), generator=gen)
    return logits.softmax(dim=1).to(device, dtype_of(dtype)), labels.to(device)


@lru_cache(maxsize=4)
def hinge_inputs(pixels: int, dtype: str, device: str = "cpu"):
    """(logits (BATCH, h, w) ~ N(0, 1), labels (BATCH, h, w) in {0, 1})."""
    gen = torch.Generator().manual_seed(SEED)
    height, width = image_shape(pixels)
    logits = torch.randn(BATCH, height, width, generator=gen)
    labels = torch.randint(0, 2, (BATCH, height, width), generator=gen)
    return logits.to(device, dtype_of(dtype)), labels.to(device)


@lru_cache(maxsize=4)
def extension_inputs(pixels: int, classes: int, dtype: str, device: str = "cpu"):
    """(errors (C, pixels) ~ N(0, 1), fg (C, pixels) with P(fg) = 1/C): one segment per class."""
    gen = torch.Generator().manual_seed(SEED)
    errors = torch.randn(classes, pixels, generator=gen)
    fg = torch.rand(classes, pixels, generator=gen) < 1.0 / classes
    return errors.to(device, dtype_of(dtype)), fg.to(device)


@lru_cache(maxsize=2)
def sort_keys(num_segments: int, segment_pixels: int, device: str):
    gen = torch.Generator().manual_seed(SEED)
    return torch.rand(num_segments, segment_pixels, generator=gen).to(device)


# ------------------------------------------------------------------------------------------
# the yardstick and the byte model


def loop_softmax(probas: torch.Tensor, labels: torch.Tensor, per_image: bool) -> torch.Tensor:
    """The public implementation's Lovász-Softmax: a Python loop over classes (and images)."""
    try:
        from lovasz_kernels._baselines import per_class_loop_lovasz_softmax
    except ImportError:  # commits before the baseline existed
        raise NotImplementedError("no per-class loop baseline in this commit") from None
    if per_image:
        return torch.stack([per_class_loop_lovasz_softmax(p[None], y[None])
                            for p, y in zip(probas, labels)]).mean()
    return per_class_loop_lovasz_softmax(probas, labels)


def loop_hinge(logits: torch.Tensor, labels: torch.Tensor, per_image: bool) -> torch.Tensor:
    try:
        from lovasz_kernels._baselines import per_image_loop_lovasz_hinge
    except ImportError:
        raise NotImplementedError("no per-image loop baseline in this commit") from None
    if not per_image:
        logits, labels = logits.reshape(1, -1), labels.reshape(1, -1)
    return per_image_loop_lovasz_hinge(logits, labels)


def ideal_bytes(num_elements: int, num_pixels: int, score_bytes: int) -> int:
    """The byte model of ``lovasz_kernels._baselines.ideal_bytes`` (GB/s = bytes / time)."""
    try:
        from lovasz_kernels._baselines import ideal_bytes as model
    except ImportError:
        raise NotImplementedError("no byte model in this commit") from None
    return model(num_elements, num_pixels, score_bytes)
