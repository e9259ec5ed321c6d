"""The numba loss inside a training step, its gradient in reused or new memory, alternating.

    python tests/perf/training_step.py [--steps 12] [--cases 1x256x150 4x512x21]

Each case (``BxSIDExC``: batch, image side, classes) trains a small CNN (two convolutions):
logits, softmax, ``lovasz_softmax`` on the numba backend (batch IoU), backward, an SGD step.
That is the pattern the backend's kept gradient memory is for: the loss's gradient is
consumed by the backward pass before the next step's loss call. Steps alternate between the
default (the gradient written into the previous one's memory) and new memory every call, as
before that memory was kept (the backend's ``output`` replaced by numpy's allocation, which
leaves the kept memory alone for the next default step), ``--steps`` of each after three
warm-up steps of each. The backend's loss entry point is
wrapped to read the process's minor page faults and system CPU time around it
(``getrusage``). Prints, per way, the medians of the step, the loss call (its forward, where
all its work is), and the faults and system time in that call, and the ratios of the times.
New memory costs a fault per page (2 MB with transparent huge pages, 4 KB otherwise),
expensive on a VM.
"""

from __future__ import annotations

import argparse
import re
import resource
import statistics
import time

WARM_UP_STEPS = 3
_CASE = re.compile(r"(\d+)x(\d+)x(\d+)")


def _case(text: str) -> tuple[int, int, int]:
    match = _CASE.fullmatch(text)
    if match is None or min(int(group) for group in match.groups()) < 1:
        raise argparse.ArgumentTypeError(
            f"a case is BxSIDExC of positive integers (e.g. 1x256x150); got {text!r}")
    batch, side, classes = (int(group) for group in match.groups())
    if classes < 2:
        raise argparse.ArgumentTypeError(f"the softmax needs at least 2 classes; got {text!r}")
    return batch, side, classes


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


WAYS = ("reused", "new memory")


def _train(case: tuple[int, int, int], steps: int) -> dict[str, dict[str, float]]:
    """Per way (:data:`WAYS`): medians (ms, or counts) over its steps after the warm-up."""
    import numpy as np
    import torch

    from lovasz_kernels import _scratch, lovasz_softmax
    from lovasz_kernels.backends import numba_cpu

    batch, side, classes = case
    calls: list[tuple[float, int, float]] = []  # (seconds, minor faults, system seconds)
    original = numba_cpu.lovasz_loss

    def new_memory(name, shape, dtype, zeroed=False, keep=True):
        """The gradient's memory before it was kept: numpy's, new every call."""
        return np.zeros(shape, dtype=dtype) if zeroed else np.empty(shape, dtype=dtype)

    def measured(*args, **kwargs):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            calls.append((seconds, after.ru_minflt - before.ru_minflt,
                          after.ru_stime - before.ru_stime))

    samples: dict[str, list[tuple[float, float, int, float]]] = {way: [] for way in WAYS}
    numba_cpu.lovasz_loss = measured
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(16, classes, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        images = torch.randn(batch, 3, side, side)
        labels = torch.randint(0, classes, (batch, side, side))
        for step in range(2 * (WARM_UP_STEPS + steps)):
            way = WAYS[step % 2]
            # not KEEP_OUTPUT_BYTES = 0: output would drop the kept memory, and the next
            # default step would find none to reuse
            numba_cpu.output = _scratch.output if way == "reused" else new_memory
            start = time.perf_counter()
            optimizer.zero_grad()
            probas = model(images).softmax(dim=1)
            lovasz_softmax(probas, labels, backend="numba").backward()
            optimizer.step()
            if step >= 2 * WARM_UP_STEPS:
                samples[way].append((time.perf_counter() - start, *calls[-1]))
    finally:
        numba_cpu.lovasz_loss, numba_cpu.output = original, _scratch.output
    return {way: {"step": statistics.median(sample[0] for sample in taken) * 1e3,
                  "loss": statistics.median(sample[1] for sample in taken) * 1e3,
                  "faults": statistics.median(sample[2] for sample in taken),
                  "system": statistics.median(sample[3] for sample in taken) * 1e3}
            for way, taken in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=_positive_int, default=12)
    parser.add_argument("--cases", type=_case, nargs="+",
                        default=[(1, 256, 150), (4, 512, 21)], metavar="BxSIDExC")
    args = parser.parse_args()
    print(f"medians of {args.steps} steps each way after {WARM_UP_STEPS} warm-up ones, the "
          "ways alternating; loss: the numba loss call; faults and system time: in that call")
    print(f"{'case':12s} {'gradient in':12s} {'step ms':>9s} {'loss ms':>9s} {'faults':>8s} "
          f"{'system ms':>10s}")
    for case in args.cases:
        result = _train(case, args.steps)
        name = "x".join(map(str, case))
        for way in WAYS:
            row = result[way]
            print(f"{name:12s} {way:12s} {row['step']:9.1f} {row['loss']:9.1f} "
                  f"{row['faults']:8.0f} {row['system']:10.1f}")
        new, reused = result["new memory"], result["reused"]
        print(f"{name:12s} {'new / reused':12s} {new['step'] / reused['step']:8.2f}x "
              f"{new['loss'] / reused['loss']:8.2f}x")


if __name__ == "__main__":
    main()
