"""The exact prox of the Lovász hinge next to the hinge's own fwd+bwd, its yardstick.

    pytest tests/perf/test_perf_prox.py --benchmark-only

One group per image size: the numba ``lovasz_hinge`` forward + backward and the prox at
several step sizes λ on the same 30%-foreground image, so the table reads as "prox cost in
units of one loss evaluation".
"""

from __future__ import annotations

import pytest
import torch

from lovasz_kernels import available_backends, bench, lovasz_hinge

optim = pytest.importorskip("lovasz_kernels.optim")

SIDES = [256, 512]
FOREGROUND = 0.3
PROX_CASES = [("exact", 0.01), ("exact", 0.1), ("exact", 1.0), ("exact", 100.0), ("exact", 4e4),
              ("greedy", 1.0)]


def _image(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    return bench.hinge_inputs(1, side, foreground=FOREGROUND)


@pytest.mark.parametrize("side", SIDES, ids=[f"{s}^2" for s in SIDES])
def test_hinge_fwd_bwd(benchmark, side):
    if not available_backends()["numba"][0]:
        pytest.skip(available_backends()["numba"][1])
    logits, labels = _image(side)
    benchmark.group = f"prox vs hinge, one {side}^2 image"

    def fwd_bwd():
        scores = logits.clone().requires_grad_()
        lovasz_hinge(scores, labels, backend="numba").backward()

    benchmark(fwd_bwd)


@pytest.mark.parametrize("method,lam", PROX_CASES, ids=[f"{m}-lam{l:g}" for m, l in PROX_CASES])
@pytest.mark.parametrize("side", SIDES, ids=[f"{s}^2" for s in SIDES])
def test_prox(benchmark, side, method, lam):
    logits, labels = _image(side)
    benchmark.group = f"prox vs hinge, one {side}^2 image"
    benchmark(lambda: optim.prox_lovasz_hinge(logits, labels, lam, method=method))
