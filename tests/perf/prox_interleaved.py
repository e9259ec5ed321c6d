"""Exact prox of the Lovász hinge against the hinge's own fwd+bwd, interleaved.

    python tests/perf/prox_interleaved.py [--side 512] [--rounds 15]

The inputs of ``test_perf_prox.py`` (one image, 30% foreground), timed in interleaved rounds
by ``lovasz_kernels.bench.measure`` (every round times each case once, in turn, so all of them
see the same machine noise: the ratios to the hinge hold up on a noisy machine better than
pytest-benchmark's case-after-case runs). Prints medians and ratios.
"""

from __future__ import annotations

import argparse
import statistics

from lovasz_kernels import bench, lovasz_hinge
from lovasz_kernels.bench import measure
from lovasz_kernels.optim import prox_lovasz_hinge

CASES = [("exact", 0.01), ("exact", 0.1), ("exact", 1.0), ("exact", 100.0), ("exact", 4e4),
         ("greedy", 1.0)]
FOREGROUND = 0.3
HINGE = "numba lovasz_hinge fwd+bwd"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    logits, labels = bench.hinge_inputs(1, args.side, foreground=FOREGROUND)

    def hinge() -> None:
        lovasz_hinge(logits.detach().requires_grad_(), labels, backend="numba").backward()

    calls = {HINGE: hinge}
    for method, lam in CASES:
        calls[f"{method} prox, lam={lam:g}"] = (
            lambda method=method, lam=lam: prox_lovasz_hinge(logits, labels, lam, method=method)
        )
    for call in calls.values():  # compile / warm up
        call()
    samples = measure.interleaved_times(calls, args.rounds, measure.WallClock())
    base = statistics.median(samples[HINGE])
    print(f"one {args.side}^2 image, 30% foreground, medians of {args.rounds} interleaved rounds")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:28s} {median * 1e3:8.2f} ms  {median / base:5.2f}x the hinge")


if __name__ == "__main__":
    main()
