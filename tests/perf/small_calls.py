"""Small calls, where a fixed cost or a busy second core shows, interleaved.

    python tests/perf/small_calls.py [--rounds 40]

numba: one 512² hinge image and 8 × 64² × 5 per-image softmax (forward + backward), and the
bare extension on one 512² segment twice: alone, and right after a parallel torch op (an
aminmax of 262k labels, as the loss layer's value checks run before the kernels). Then one
64² hinge image, forward + backward, with the authors' per-class loop, the torch backend and
numba: almost nothing but the fixed cost per call. Only the public API, so an old checkout
can be timed the same way (``PYTHONPATH=<old checkout> python tests/perf/small_calls.py``,
alternating processes). Prints the median of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lovasz_kernels import lovasz_extension, lovasz_hinge, lovasz_softmax
from lovasz_kernels.bench.baselines import per_image_loop_lovasz_hinge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 512, 512, generator=gen)
    masks = (torch.rand(1, 512, 512, generator=gen) < 0.3).long()
    probas = torch.randn(8, 5, 64, 64, generator=gen).softmax(dim=1)
    labels = torch.randint(0, 5, (8, 64, 64), generator=gen)
    errors = torch.randn(1, 512 * 512, generator=gen)
    fg = torch.rand(1, 512 * 512, generator=gen) < 0.3
    flat_labels = masks.reshape(1, -1)
    small_logits = torch.randn(1, 64, 64, generator=gen)
    small_masks = (torch.rand(1, 64, 64, generator=gen) < 0.3).long()

    def small_hinge(backend):
        scores = small_logits.clone().requires_grad_()
        if backend == "loop":
            per_image_loop_lovasz_hinge(scores, small_masks, True).backward()
        else:
            lovasz_hinge(scores, small_masks, per_image=True, backend=backend).backward()

    calls = {
        "hinge 1x512x512 fwd+bwd": lambda: lovasz_hinge(
            logits.clone().requires_grad_(), masks, backend="numba").backward(),
        "softmax 8x5x64x64 per image fwd+bwd": lambda: lovasz_softmax(
            probas.clone().requires_grad_(), labels, per_image=True, backend="numba").backward(),
        "extension 1x262144": lambda: lovasz_extension(errors, fg, backend="numba"),
        "extension 1x262144 after a torch op": lambda: lovasz_extension(errors, fg,
                                                                        backend="numba"),
        "hinge 1x64x64 fwd+bwd, loop": lambda: small_hinge("loop"),
        "hinge 1x64x64 fwd+bwd, torch": lambda: small_hinge("torch"),
        "hinge 1x64x64 fwd+bwd, numba": lambda: small_hinge("numba"),
    }
    for call in calls.values():  # compile or load, warm up
        call()
        call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            if name.endswith("after a torch op"):
                torch.aminmax(flat_labels)  # untimed: the kernel's time is what changes
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    print(f"{torch.get_num_threads()} torch threads, medians of {args.rounds} rounds")
    for name, values in samples.items():
        print(f"{name:40s} {statistics.median(values) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
