"""The torch backend's extension on short rows sorted as packed keys: going on in numpy after
the sort against torch's ops after it, toggled call by call in one process.

    python tests/perf/numpy_finish.py [--rounds 200] [--shapes 1x4096,8x4096,21x4096]

Each shape is rows x pixels, errors in [0, 1) and a 30% foreground (fixed per shape);
the packed sort is forced on every row (``method_forced``), and ``NUMPY_MAX_PIXELS`` is
set past every shape for numpy or to 0 for torch's ops. Prints the median of each (the first
tenth of the rounds left out) and torch's time over numpy's: the cap ``NUMPY_MAX_PIXELS``
sits below the sizes where that falls under 1.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lovasz_kernels._torch_sort import PACKED, method_forced
from lovasz_kernels.backends import torch_eager

DEFAULT_SHAPES = ("1x1024,1x4096,1x8192,1x16384,1x24576,2x4096,4x4096,8x2048,16x1024,"
                  "8x4096,2x16384,21x4096,40x4096")


def _shapes(text: str) -> list[tuple[int, int]]:
    """Comma-separated ROWSxPIXELS (an ``argparse`` type: a bad one is a usage error)."""
    shapes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            rows, pixels = (int(part) for part in item.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"a shape is ROWSxPIXELS, e.g. 8x4096; got {item!r}") from None
        if rows < 1 or pixels < 1:
            raise argparse.ArgumentTypeError(f"rows and pixels must be >= 1; got {item!r}")
        shapes.append((rows, pixels))
    return shapes


def _medians(shape: tuple[int, int], rounds: int) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(0)
    errors = torch.rand(shape, generator=generator)
    fg = torch.rand(shape, generator=generator) < 0.3
    times: dict[str, list[float]] = {"numpy": [], "torch": []}
    for _ in range(rounds):
        for way in times:
            torch_eager.NUMPY_MAX_PIXELS = errors.numel() if way == "numpy" else 0
            start = time.perf_counter()
            torch_eager.lovasz_extension(errors, fg)
            times[way].append(time.perf_counter() - start)
    skip = rounds // 10
    return (statistics.median(times["numpy"][skip:]) * 1e6,
            statistics.median(times["torch"][skip:]) * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--shapes", type=_shapes, default=DEFAULT_SHAPES,
                        help="comma-separated ROWSxPIXELS (default: %(default)s)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1; got {args.rounds}")
    cap = torch_eager.NUMPY_MAX_PIXELS
    try:
        with method_forced(PACKED):
            for shape in args.shapes:
                in_numpy, with_torch = _medians(shape, args.rounds)
                print(f"{shape[0]:3d} x {shape[1]:5d}: numpy {in_numpy:8.0f} us, torch ops "
                      f"{with_torch:8.0f} us, torch / numpy {with_torch / in_numpy:.2f}")
    finally:
        torch_eager.NUMPY_MAX_PIXELS = cap


if __name__ == "__main__":
    main()
