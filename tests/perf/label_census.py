"""The numba backend's census of the labels against the passes it replaces, and whole calls
with and without it, in one process, rounds interleaved.

    python tests/perf/label_census.py [--rounds 25]

For each case (1024² × 2, 512² × 21, 256² × 150, 4 × 256² × 21 per image), right after a
torch op (as in a training step):

- ``shared passes``: what runs without a census: the label check (``torch.aminmax``), the
  plan's class counts (``torch.bincount``) and the backend's narrowing to uint8 (the
  census's kernel would be the fair narrowing, so a plain numpy cast stands in: the least
  a separate narrowing costs);
- ``census``: ``numba_cpu.label_census``, the one pass that gives all three;
- ``call with``, ``call without``: the whole loss, forward + backward, with the census and
  with the backend's ``label_census`` hidden from the registry (the shared check, counts and
  the backend's own narrowing then run).

Prints the medians, ms.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

CASES = {  # name: (batch, classes, side, per_image)
    "1024x2": (1, 2, 1024, False),
    "512x21": (1, 21, 512, False),
    "256x150": (1, 150, 256, False),
    "4x256x21-per-image": (4, 21, 256, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()

    from lovasz_kernels import _plan, _validate, lovasz_softmax
    from lovasz_kernels._registry import Backend
    from lovasz_kernels.backends import numba_cpu
    from lovasz_kernels.bench.measure import time_after

    with_census = Backend.label_census
    print(f"medians of {args.rounds} interleaved rounds, ms, each right after a torch op")
    print(f"{'case':20s} {'shared passes':>14s} {'census':>8s} {'call with':>10s} "
          f"{'call without':>13s}")
    for name, (batch, classes, side, per_image) in CASES.items():
        gen = torch.Generator().manual_seed(0)
        probas = torch.randn(batch, classes, side, side, generator=gen).softmax(dim=1)
        labels = torch.randint(0, classes, (batch, side, side), generator=gen)
        other = torch.randn(batch, classes, side, side, generator=gen)
        flat = labels.reshape(batch, -1)

        def torch_op(other=other):
            torch.softmax(other, dim=1)

        def shared(flat=flat, classes=classes):
            _validate.check_labels(flat, f"[0, {classes})", classes, None)
            _plan._class_counts(flat, classes, None, True)
            flat.numpy().astype(np.uint8)

        def census(flat=flat, classes=classes):
            numba_cpu.label_census(flat, classes, None)

        def call(probas=probas, labels=labels, per_image=per_image):
            scores = probas.clone().requires_grad_()
            lovasz_softmax(scores, labels, per_image=per_image, backend="numba").backward()

        def call_without():
            Backend.label_census = lambda self, *args: None
            try:
                call()
            finally:
                Backend.label_census = with_census

        timed = {"shared": shared, "census": census, "with": call, "without": call_without}
        for function in timed.values():  # compile, warm up
            function()
        samples: dict[str, list[float]] = {key: [] for key in timed}
        for round_index in range(args.rounds):
            order = list(timed) if round_index % 2 else list(reversed(timed))
            for key in order:
                samples[key].append(time_after(timed[key], torch_op))
        medians = {key: statistics.median(values) * 1e3 for key, values in samples.items()}
        print(f"{name:20s} {medians['shared']:14.3f} {medians['census']:8.3f} "
              f"{medians['with']:10.2f} {medians['without']:13.2f}")


if __name__ == "__main__":
    main()
