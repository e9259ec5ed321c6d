"""Whole numba loss calls with and without the backend's own check of the scores, in one
process, rounds interleaved.

    python tests/perf/scores_check.py [--rounds 25] [--cases 1024x2 512x21 ...]

Each call runs right after a torch op (as in a training step), forward + backward:
``with`` as the loss runs (the backend's ``check_scores`` proves the scores valid where it
looks: at most one channel per thread), ``without`` with that hook hidden from the registry
(the shared torch checks run). Also the checks alone, after the same torch op: ``shared``
(``_validate.check_probas``) and ``backend`` (``numba_cpu.check_scores``, with its own
decision whether to look bypassed, so it is timed everywhere). The order of the four turns
round every round. Prints medians, ms.
"""

from __future__ import annotations

import argparse
import statistics

import torch

CASES = {  # name: (batch, classes, side, per_image)
    "1024x2": (1, 2, 1024, False),
    "4x512x2": (4, 2, 512, False),
    "8x256x2-per-image": (8, 2, 256, True),
    "2x1024x2": (2, 2, 1024, False),
    "512x8": (1, 8, 512, False),
    "512x21": (1, 21, 512, False),
    "4x256x21-per-image": (4, 21, 256, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()

    from lovasz_kernels import _numba_core as core
    from lovasz_kernels import _validate, lovasz_softmax
    from lovasz_kernels._registry import Backend
    from lovasz_kernels.backends import numba_cpu
    from lovasz_kernels.bench.measure import time_after

    with_check = Backend.check_scores
    threads = core.thread_count()
    print(f"{threads} threads; medians of {args.rounds} interleaved rounds, ms, each right "
          "after a torch op")
    print(f"{'case':20s} {'with':>8s} {'without':>8s} {'shared':>8s} {'backend':>8s}")
    for name in args.cases:
        batch, classes, side, per_image = CASES[name]
        gen = torch.Generator().manual_seed(0)
        probas = torch.randn(batch, classes, side, side, generator=gen).softmax(dim=1)
        labels = torch.randint(0, classes, (batch, side, side), generator=gen)
        other = torch.randn(batch, classes, side, side, generator=gen)
        flat = probas.reshape(batch, classes, -1)

        def torch_op(other=other):
            torch.softmax(other, dim=1)

        def call(probas=probas, labels=labels, per_image=per_image):
            scores = probas.clone().requires_grad_()
            lovasz_softmax(scores, labels, per_image=per_image, backend="numba").backward()

        def call_without(call=call):
            Backend.check_scores = lambda self, *args: False
            try:
                call()
            finally:
                Backend.check_scores = with_check

        def backend_check(flat=flat, classes=classes):
            looks_at, most = core.thread_count, numba_cpu._CHECK_MOST_VALUES
            core.thread_count = lambda: max(classes, threads)
            numba_cpu._CHECK_MOST_VALUES = flat.numel()
            try:
                numba_cpu.check_scores(flat, "simplex")
            finally:
                core.thread_count, numba_cpu._CHECK_MOST_VALUES = looks_at, most

        timed = {"with": call, "without": call_without,
                 "shared": lambda flat=flat: _validate.check_probas(flat),
                 "backend": backend_check}
        for function in timed.values():
            function()  # warm-up (and compilation)
        times: dict[str, list[float]] = {key: [] for key in timed}
        for round_ in range(args.rounds):
            order = list(timed) if round_ % 2 == 0 else list(timed)[::-1]  # no order favoured
            for key in order:
                times[key].append(time_after(timed[key], torch_op))
        row = " ".join(f"{statistics.median(times[key]) * 1e3:8.2f}" for key in timed)
        print(f"{name:20s} {row}")


if __name__ == "__main__":
    main()
