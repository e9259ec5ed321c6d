"""The torch backend on segments shorter than PyTorch's sort grain (32768 pixels), next to the
authors' loop: forward + backward, new inputs every call.

    python tests/perf/short_rows.py [--rounds 40]

One hinge image of 64² and 128² pixels, and the bench grid's small per-image softmax inputs
(8 × 64² × 5, 16 × 32² × 21) and 4 × 128² × 21. Every call takes the next of eight seeded input
sets, the contenders in a new order every round: a comparison sort of the few thousand keys
it sorted in its previous call runs 2-4x faster, which training never sees. Only the public
API, so an old checkout can be timed the same way (``PYTHONPATH=<old checkout> python
tests/perf/short_rows.py``, alternating processes). Prints the median of each and the loop's
time over the backend's.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from lovasz_kernels import lovasz_hinge, lovasz_softmax
from lovasz_kernels.bench.baselines import (
    per_class_loop_lovasz_softmax,
    per_image_loop_lovasz_hinge,
)

INPUT_SETS = 8
# (name, batch, classes (0: a hinge), side)
CASES = [("hinge 1 x 64²", 1, 0, 64), ("hinge 1 x 128²", 1, 0, 128),
         ("softmax 8 x 64² x 5, per image", 8, 5, 64),
         ("softmax 16 x 32² x 21, per image", 16, 21, 32),
         ("softmax 4 x 128² x 21, per image", 4, 21, 128)]


def _inputs(batch: int, classes: int, side: int, gen: torch.Generator):
    if not classes:
        return (torch.randn(batch, side, side, generator=gen),
                (torch.rand(batch, side, side, generator=gen) < 0.3).long())
    return (torch.randn(batch, classes, side, side, generator=gen).softmax(dim=1),
            torch.randint(0, classes, (batch, side, side), generator=gen))


def _calls(classes: int):
    if not classes:
        return {"torch": lambda x, y: lovasz_hinge(x, y, per_image=True, backend="torch"),
                "loop": lambda x, y: per_image_loop_lovasz_hinge(x, y, True)}
    return {"torch": lambda x, y: lovasz_softmax(x, y, per_image=True, backend="torch"),
            "loop": lambda x, y: per_class_loop_lovasz_softmax(x, y, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    shuffler = random.Random(0)
    print(f"{torch.get_num_threads()} torch threads, medians of {args.rounds} rounds, ms")
    print(f"{'input':>34} {'torch':>8} {'loop':>8} {'loop / torch':>13}")
    for name, batch, classes, side in CASES:
        inputs = [_inputs(batch, classes, side, gen) for _ in range(INPUT_SETS)]
        calls = _calls(classes)
        samples: dict[str, list[float]] = {contender: [] for contender in calls}
        order = list(calls)
        for round_index in range(-INPUT_SETS, args.rounds):  # one untimed pass first
            shuffler.shuffle(order)
            scores, labels = inputs[round_index % INPUT_SETS]
            for contender in order:
                leaf = scores.clone().requires_grad_()
                start = time.perf_counter()
                calls[contender](leaf, labels).backward()
                if round_index >= 0:
                    samples[contender].append(time.perf_counter() - start)
        medians = {contender: statistics.median(times) * 1e3
                   for contender, times in samples.items()}
        print(f"{name:>34} {medians['torch']:8.3f} {medians['loop']:8.3f} "
              f"{medians['loop'] / medians['torch']:12.2f}x")


if __name__ == "__main__":
    main()
