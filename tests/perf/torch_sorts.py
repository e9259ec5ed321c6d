"""The torch backend's CPU sorts: the 2-D descending comparison sort against row-by-row radix
sorts (ascending on the complemented keys, rows under PyTorch's grain size padded up to it).

    python tests/perf/torch_sorts.py [--rounds 50]

Random clamped float32 errors as int32 keys, the shapes of the bench grid's segments; both
sorts fill the same preallocated outputs, as the backend does, and alternate in every round.
Prints the median of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lovasz_kernels.backends import torch_eager

SHAPES = [(1, 8192), (1, 16384), (1, 65536), (1, 262144), (21, 262144), (2, 1 << 20)]


def _medians_ms(rows: int, pixels: int, rounds: int, gen: torch.Generator) -> tuple[float, float]:
    """Median ms of the 2-D descending sort and of the backend's row-by-row radix sort."""
    keys = torch.randn(rows, pixels, generator=gen).clamp_(min=0).view(torch.int32)
    keys_sorted = torch.empty_like(keys)
    order = torch.empty(keys.shape, dtype=torch.int64)

    def compared():
        torch.sort(keys, dim=1, descending=True, out=(keys_sorted, order))

    def radix():
        # the backend overwrites its keys: a copy keeps every round's input the same
        torch_eager._sort_descending(keys.clone(), keys_sorted, order)

    samples = {compared: [], radix: []}
    for _ in range(rounds):
        for call, times in samples.items():
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return (statistics.median(samples[compared]) * 1e3, statistics.median(samples[radix]) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"{torch.get_num_threads()} torch threads, medians of up to {args.rounds} rounds")
    print(f"{'rows x pixels':>16} {'2-D descending':>15} {'row-by-row radix':>17} {'ratio':>6}")
    chooses = torch_eager._radix_sorted
    for rows, pixels in SHAPES:
        used = chooses(torch.empty(()).expand(rows, pixels))  # shape and device only
        rounds = max(3, min(args.rounds, (1 << 24) // (rows * pixels)))
        try:  # below the backend's threshold: the padded radix sort it would not take
            torch_eager._radix_sorted = lambda keys: True
            compared_ms, radix_ms = _medians_ms(rows, pixels, rounds, gen)
        finally:
            torch_eager._radix_sorted = chooses
        print(f"{rows:>7} x {pixels:<7} {compared_ms:12.3f} ms {radix_ms:14.3f} ms "
              f"{compared_ms / radix_ms:5.2f}x" + ("" if used else "  (radix not used)"))


if __name__ == "__main__":
    main()
