"""When the numba backend splits a segment across threads: whole losses (forward + backward)
with segments split wherever the structure allows ("split"), never ("whole"), and as the
backend's rule decides ("rule", ``numba_cpu._split_pays``), interleaved in a new random order
every round, new inputs every call.

    python tests/perf/split_segments.py [--rounds 40] [--cases hinge-512 softmax-512x21 ...]

A segment is split only when it would leave threads idle: fewer segments than threads, or the
last ``S mod threads`` of them. Splitting runs four pool rounds per segment (pack, count, scatter,
sort and fuse), each a wait for the slowest thread: the script shows where that pays on this
machine and thread count (``NUMBA_NUM_THREADS``), and what the rule chose.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

CASES = {  # name: (loss, batch, side, classes, per_image)
    "hinge-256": ("hinge", 1, 256, 1, True),
    "hinge-512": ("hinge", 1, 512, 1, True),
    "hinge-1024": ("hinge", 1, 1024, 1, True),
    "softmax-512x21": ("softmax", 1, 512, 21, False),
    "softmax-256x21": ("softmax", 1, 256, 21, False),
    "softmax-1024x2": ("softmax", 1, 1024, 2, False),
    "softmax-1024x3": ("softmax", 1, 1024, 3, False),
}
INPUT_SETS = 3


def _inputs(loss: str, batch: int, side: int, classes: int, gen: torch.Generator):
    if loss == "hinge":
        return (torch.randn(batch, side, side, generator=gen),
                (torch.rand(batch, side, side, generator=gen) < 0.3).long())
    return (torch.randn(batch, classes, side, side, generator=gen).softmax(dim=1),
            torch.randint(0, classes, (batch, side, side), generator=gen))


def _medians_ms(name: str, rounds: int, gen: torch.Generator) -> tuple[dict[str, float], bool]:
    from lovasz_kernels import _numba_core as core
    from lovasz_kernels import lovasz_hinge, lovasz_softmax
    from lovasz_kernels.backends import numba_cpu

    loss, batch, side, classes, per_image = CASES[name]
    inputs = [_inputs(loss, batch, side, classes, gen) for _ in range(INPUT_SETS)]
    rule = numba_cpu._split_pays
    policies = {"split": lambda *args: True, "whole": lambda *args: False, "rule": rule}
    segments = classes * (batch if per_image else 1)
    pixels = side * side * (1 if per_image else batch)
    threads = core.thread_count()
    left = segments if segments < threads else segments % threads
    chosen = bool(left) and rule(left, pixels, threads)

    def call(scores, labels):
        scores = scores.clone().requires_grad_()
        if loss == "hinge":
            value = lovasz_hinge(scores, labels, per_image=per_image, backend="numba")
        else:
            value = lovasz_softmax(scores, labels, per_image=per_image, backend="numba")
        value.backward()

    samples: dict[str, list[float]] = {policy: [] for policy in policies}
    names, shuffler = list(policies), random.Random(0)
    try:
        for round_index in range(-INPUT_SETS, rounds):  # one untimed pass first
            shuffler.shuffle(names)
            for offset, policy in enumerate(names):
                numba_cpu._split_pays = policies[policy]
                scores, labels = inputs[(round_index + offset) % INPUT_SETS]
                start = time.perf_counter()
                call(scores, labels)
                if round_index >= 0:
                    samples[policy].append(time.perf_counter() - start)
    finally:
        numba_cpu._split_pays = rule
    return {policy: statistics.median(times) * 1e3 for policy, times in samples.items()}, chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    from lovasz_kernels import _numba_core as core

    gen = torch.Generator().manual_seed(0)
    print(f"{core.thread_count()} numba threads, {torch.get_num_threads()} torch threads, "
          f"medians of {args.rounds} rounds, fwd+bwd")
    print(f"{'case':>16} {'rule splits':>11} {'split':>10} {'whole':>10} {'rule':>10}"
          f" {'whole/split':>11}")
    for name in args.cases:
        medians, chosen = _medians_ms(name, args.rounds, gen)
        print(f"{name:>16} {'yes' if chosen else 'no':>11} "
              + " ".join(f"{medians[key]:7.2f} ms" for key in ("split", "whole", "rule"))
              + f" {medians['whole'] / medians['split']:11.2f}", flush=True)


if __name__ == "__main__":
    main()
