"""The numba loss inside a training step: its time, and the page faults and kernel time in it.

    python tests/perf/training_step.py [--steps 12] [--cases 1x256x150 4x512x21]

Each case (``BxSIDExC``: batch, image side, classes) trains a small CNN (two convolutions)
for ``--steps`` steps: logits, softmax, ``lovasz_softmax`` on the numba backend (batch IoU),
backward, an SGD step. That is the pattern the backend's kept gradient memory is for: the
loss's gradient is consumed by the backward pass before the next step's loss call. The
backend's loss entry point is wrapped to read the process's minor page faults and system CPU
time around it (``getrusage``). Prints medians over the steps after three warm-up steps: the
step, the loss call (its forward, where all its work is), and the faults and system time in
that call. Fresh memory costs a fault per page (2 MB with transparent huge pages, 4 KB
otherwise), expensive on a VM. An old checkout is timed the same way
(``PYTHONPATH=<old checkout> python tests/perf/training_step.py``), alternating processes.
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


def _train(case: tuple[int, int, int], steps: int) -> dict[str, float]:
    """Medians (ms, or counts) over the steps after the warm-up ones."""
    import torch

    from lovasz_kernels import lovasz_softmax
    from lovasz_kernels.backends import numba_cpu

    batch, side, classes = case
    calls: list[tuple[float, int, float]] = []  # (seconds, minor faults, system seconds)
    original = numba_cpu.lovasz_loss

    def measured(*args, **kwargs):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            calls.append((seconds, after.ru_minflt - before.ru_minflt,
                          after.ru_stime - before.ru_stime))

    numba_cpu.lovasz_loss = measured
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(16, classes, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        images = torch.randn(batch, 3, side, side)
        labels = torch.randint(0, classes, (batch, side, side))
        step_seconds = []
        for _ in range(WARM_UP_STEPS + steps):
            start = time.perf_counter()
            optimizer.zero_grad()
            probas = model(images).softmax(dim=1)
            lovasz_softmax(probas, labels, backend="numba").backward()
            optimizer.step()
            step_seconds.append(time.perf_counter() - start)
    finally:
        numba_cpu.lovasz_loss = original
    timed = calls[WARM_UP_STEPS:]
    return {"step": statistics.median(step_seconds[WARM_UP_STEPS:]) * 1e3,
            "loss": statistics.median(seconds for seconds, _, _ in timed) * 1e3,
            "faults": statistics.median(faults for _, faults, _ in timed),
            "system": statistics.median(system for _, _, system in timed) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=_positive_int, default=12)
    parser.add_argument("--cases", type=_case, nargs="+",
                        default=[(1, 256, 150), (4, 512, 21)], metavar="BxSIDExC")
    args = parser.parse_args()
    print(f"medians of {args.steps} steps after {WARM_UP_STEPS} warm-up ones; loss: the "
          "numba loss call; faults and system time: in that call")
    print(f"{'case':12s} {'step ms':>9s} {'loss ms':>9s} {'faults':>8s} {'system ms':>10s}")
    for case in args.cases:
        result = _train(case, args.steps)
        name = "x".join(map(str, case))
        print(f"{name:12s} {result['step']:9.1f} {result['loss']:9.1f} {result['faults']:8.0f} "
              f"{result['system']:10.1f}")


if __name__ == "__main__":
    main()
