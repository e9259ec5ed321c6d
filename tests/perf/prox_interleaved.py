"""Exact prox of the Lovász hinge against the hinge's own fwd+bwd, interleaved (issue 5).

    python tests/perf/prox_interleaved.py [--side 512] [--rounds 15]

The inputs of ``test_perf_prox.py`` (one image, 30% foreground), but every round times each
case once, in turn, so all of them see the same machine noise: the ratios to the hinge hold
up on a noisy machine better than pytest-benchmark's case-after-case runs. Prints medians and
ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lovasz_kernels import lovasz_hinge
from lovasz_kernels.optim import prox_lovasz_hinge

CASES = [("exact", 0.01), ("exact", 0.1), ("exact", 1.0), ("exact", 100.0), ("exact", 4e4),
         ("greedy", 1.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, args.side, args.side, generator=gen)
    labels = (torch.rand(1, args.side, args.side, generator=gen) > 0.7).long()

    def hinge() -> None:
        scores = logits.clone().requires_grad_()
        lovasz_hinge(scores, labels, backend="numba").backward()

    rows = {"numba lovasz_hinge fwd+bwd": hinge}
    for method, lam in CASES:
        rows[f"{method} prox, lam={lam:g}"] = (
            lambda method=method, lam=lam: prox_lovasz_hinge(logits, labels, lam, method=method)
        )
    for run in rows.values():  # compile / warm up
        run()
    samples: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, run in rows.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    base = statistics.median(samples["numba lovasz_hinge fwd+bwd"])
    print(f"one {args.side}^2 image, 30% foreground, medians of {args.rounds} interleaved rounds")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:28s} {median * 1e3:8.2f} ms  {median / base:5.2f}x the hinge")


if __name__ == "__main__":
    main()
