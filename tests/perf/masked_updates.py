"""torch's branchy masked ops against lovasz_kernels._masked's arithmetic, on the CPU.

    python tests/perf/masked_updates.py [--rounds 7]

For each size, a random mask (as a segment's foreground is, sorted by error or not) and
medians of interleaved rounds of: ``torch.where`` against ``select``, ``masked_fill_(mask, 1)``
against ``one_where_``, and the copy of a bool array into a float one against the copy of its
bytes. The sizes where the arithmetic wins set ``ARITHMETIC_MIN_ELEMENTS``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lovasz_kernels import _masked


def _time(function, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls * 1e6


def _contenders(size: int, gen: torch.Generator) -> dict:
    mask = torch.rand(1, size, generator=gen) < 0.5
    a, b = torch.rand(1, size, generator=gen), torch.rand(1, size, generator=gen)
    out, counts = torch.empty(1, size), torch.randint(0, 1000, (1, size)).float()
    return {"where": lambda: torch.where(mask, a, b, out=out),
            "select": lambda: _masked.select(mask, a, b, out=out),
            "fill": lambda: counts.masked_fill_(mask, 1),
            "one_where": lambda: _masked.one_where_(counts, mask),
            "copy bool": lambda: out.copy_(mask),
            "copy bytes": lambda: out.copy_(_masked.as_bytes(mask))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"medians of {args.rounds} rounds, microseconds per call")
    print(f"{'elements':>9s} {'where':>8s} {'select':>8s} {'fill':>8s} {'one_where':>9s} "
          f"{'copy bool':>9s} {'copy bytes':>10s}")
    for size in (1024, 4096, 8192, 16384, 65536, 262144, 1 << 20):
        forced = _contenders(size, gen)
        calls = max(10, 2_000_000 // size)
        samples = {name: [] for name in forced}
        threshold = _masked.ARITHMETIC_MIN_ELEMENTS
        _masked.ARITHMETIC_MIN_ELEMENTS = 0  # the arithmetic at every size
        try:
            for _ in range(args.rounds):
                for name, function in forced.items():
                    samples[name].append(_time(function, calls))
        finally:
            _masked.ARITHMETIC_MIN_ELEMENTS = threshold
        cells = " ".join(f"{statistics.median(samples[name]):{max(len(name), 8)}.1f}"
                         for name in forced)
        print(f"{size:9d} {cells}")


if __name__ == "__main__":
    main()
