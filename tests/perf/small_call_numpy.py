"""Small torch-backend calls in numpy against the generic path, in one process, rounds
interleaved.

    python tests/perf/small_call_numpy.py [--rounds 400] [--cases hinge-32 hinge-64 ...]

Forward + backward through the public API with the torch backend, the numpy path on
(``numpy``: the backend's ``lovasz_loss`` runs calls of at most ``SMALL_CALL_MAX_PIXELS``
(segment, pixel) pairs) and off (``generic``: the cap set to 0, so the generic path runs),
the two in a new order every round, and the authors' per-image loop beside them for scale.
The rows sort as the machine chose in both (``lovasz-kernels info``), so ``generic`` is what
a call cost before the numpy path. Prints medians in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

CASES = {  # name: (kind, batch, classes, side, per_image)
    "hinge-32": ("hinge", 1, 1, 32, True),
    "hinge-64": ("hinge", 1, 1, 64, True),
    "hinge-128": ("hinge", 1, 1, 128, True),
    "4x32-hinge": ("hinge", 4, 1, 32, True),
    "4x64-hinge": ("hinge", 4, 1, 64, True),
    "8x64-hinge": ("hinge", 8, 1, 64, True),  # at the cap
    "2x128-hinge": ("hinge", 2, 1, 128, True),  # at the cap, two long rows
    "softmax-32x5": ("softmax", 1, 5, 32, False),
    "2x32x5-per-image": ("softmax", 2, 5, 32, True),
    "64x5-per-image": ("softmax", 1, 5, 64, True),
    "2x64x3-per-image": ("softmax", 2, 3, 64, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1; got {args.rounds}")

    from lovasz_kernels import lovasz_hinge, lovasz_softmax
    from lovasz_kernels.backends import torch_eager
    from lovasz_kernels.bench.baselines import (
        per_class_loop_lovasz_softmax,
        per_image_loop_lovasz_hinge,
    )

    cap = torch_eager.SMALL_CALL_MAX_PIXELS
    ways = ("numpy", "generic", "loop")
    print(f"{torch.get_num_threads()} torch threads; medians of {args.rounds} interleaved "
          f"rounds, forward + backward, us (numpy path up to {cap} pairs)")
    print(f"{'case':20s} {'numpy':>8s} {'generic':>8s} {'loop':>8s} {'generic/numpy':>14s}")
    for name in args.cases:
        kind, batch, classes, side, per_image = CASES[name]
        gen = torch.Generator().manual_seed(0)
        if kind == "hinge":
            scores = torch.randn(batch, side, side, generator=gen)
            labels = (torch.rand(batch, side, side, generator=gen) < 0.5).long()
        else:
            scores = torch.randn(batch, classes, side, side, generator=gen).softmax(dim=1)
            labels = torch.randint(0, classes, (batch, side, side), generator=gen)

        def call(way, scores=scores, labels=labels, kind=kind, per_image=per_image):
            inputs = scores.clone().requires_grad_()
            if way == "loop":
                loop = (per_image_loop_lovasz_hinge if kind == "hinge"
                        else per_class_loop_lovasz_softmax)
                loss = loop(inputs, labels, per_image)
            else:
                torch_eager.SMALL_CALL_MAX_PIXELS = cap if way == "numpy" else 0
                loss_fn = lovasz_hinge if kind == "hinge" else lovasz_softmax
                loss = loss_fn(inputs, labels, per_image=per_image, backend="torch")
            loss.backward()

        try:
            medians = _medians(call, ways, args.rounds)
        finally:
            torch_eager.SMALL_CALL_MAX_PIXELS = cap
        print(f"{name:20s} {medians['numpy']:8.1f} {medians['generic']:8.1f} "
              f"{medians['loop']:8.1f} {medians['generic'] / medians['numpy']:14.2f}")


def _medians(call, ways: tuple[str, ...], rounds: int) -> dict[str, float]:
    """Median microseconds of ``call(way)`` for each way over ``rounds`` rounds, the ways in a
    new order every round, after ten untimed rounds."""
    samples: dict[str, list[float]] = {way: [] for way in ways}
    for round_index in range(-10, rounds):
        shift = round_index % len(ways)
        for way in ways[shift:] + ways[:shift]:
            start = time.perf_counter()
            call(way)
            elapsed = time.perf_counter() - start
            if round_index >= 0:
                samples[way].append(elapsed)
    return {way: statistics.median(values) * 1e6 for way, values in samples.items()}


if __name__ == "__main__":
    main()
