"""Fwd+bwd timings per backend, grouped per input so ``--benchmark-compare`` lines up backends.

    pytest tests/perf --benchmark-only                        # run, one table per group
    pytest tests/perf --benchmark-only --benchmark-autosave   # save under .benchmarks/
    pytest tests/perf --benchmark-only --benchmark-compare    # against the last saved run
    pytest-benchmark compare --group-by=group --sort=mean     # saved runs side by side

Each test is one (input, backend) pair; ``benchmark.group`` names the input, so every table
(and every comparison) shows the backends and the per-class loop of one input side by side.
The inputs are the ones of ``lovasz-kernels bench`` (``lovasz_kernels._baselines``).
"""

from __future__ import annotations

import pytest
import torch

from lovasz_kernels import lovasz_extension, lovasz_hinge, lovasz_softmax, registered_backends
from lovasz_kernels._baselines import (
    hinge_inputs,
    per_class_loop_lovasz_softmax,
    per_image_loop_lovasz_hinge,
    softmax_inputs,
)
from lovasz_kernels._registry import get_backend

LOOP = "loop"
BACKENDS = [*registered_backends(), LOOP]


def _require(backend: str) -> None:
    if backend == LOOP:
        return
    chosen = get_backend(backend)
    available, reason = chosen.availability()
    if not available:
        pytest.skip(reason)
    if "cpu" not in chosen.devices:  # the Triton interpreter is for tests, not timings
        pytest.skip(f"{backend} does not run natively on the CPU")


# (batch, classes, side, per_image): the issue-3 sizes, kept small enough for a quick run
SOFTMAX_INPUTS = [(1, 21, 256, False), (1, 21, 512, False), (4, 21, 256, True),
                  (1, 150, 256, False)]
HINGE_INPUTS = [(1, 1024), (8, 256)]  # one 1024² segment (within-segment parallelism); 8 images


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,classes,side,per_image", SOFTMAX_INPUTS,
                         ids=[f"{b}x{c}x{s}^2{'-per-image' if p else ''}"
                              for b, c, s, p in SOFTMAX_INPUTS])
def test_lovasz_softmax(benchmark, backend, batch, classes, side, per_image):
    _require(backend)
    probas, labels = softmax_inputs(batch, classes, side)
    benchmark.group = f"lovasz_softmax fwd+bwd {batch}x{classes}x{side}^2 per_image={per_image}"
    benchmark.extra_info.update(pixels=side * side, classes=classes, batch=batch)

    def fwd_bwd():
        scores = probas.detach().requires_grad_()
        if backend == LOOP:
            loss = per_class_loop_lovasz_softmax(scores, labels, per_image)
        else:
            loss = lovasz_softmax(scores, labels, per_image=per_image, backend=backend)
        loss.backward()

    fwd_bwd()  # warm-up (JIT compilation is not timed)
    benchmark.pedantic(fwd_bwd, rounds=5, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,side", HINGE_INPUTS,
                         ids=[f"{b}x{s}^2" for b, s in HINGE_INPUTS])
def test_lovasz_hinge(benchmark, backend, batch, side):
    _require(backend)
    logits, labels = hinge_inputs(batch, side)
    benchmark.group = f"lovasz_hinge fwd+bwd {batch}x{side}^2 per_image=True"

    def fwd_bwd():
        scores = logits.detach().requires_grad_()
        if backend == LOOP:
            loss = per_image_loop_lovasz_hinge(scores, labels)
        else:
            loss = lovasz_hinge(scores, labels, backend=backend)
        loss.backward()

    fwd_bwd()
    benchmark.pedantic(fwd_bwd, rounds=5, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("backend", registered_backends())
@pytest.mark.parametrize("segments,pixels", [(21, 1 << 16), (1, 1 << 20)],
                         ids=["21x2^16", "1x2^20"])
def test_lovasz_extension(benchmark, backend, segments, pixels):
    _require(backend)
    gen = torch.Generator().manual_seed(0)
    errors = torch.randn(segments, pixels, generator=gen)
    fg = torch.rand(segments, pixels, generator=gen) < 0.3
    benchmark.group = f"lovasz_extension {segments}x{pixels}"
    lovasz_extension(errors, fg, backend=backend)
    benchmark.pedantic(lovasz_extension, args=(errors, fg), kwargs={"backend": backend},
                       rounds=5, iterations=1, warmup_rounds=0)
