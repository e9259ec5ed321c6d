"""torch's branchy masked ops against lovasz_kernels._masked's arithmetic, on the CPU.

    python tests/perf/masked_updates.py [--rounds 9]
    python tests/perf/masked_updates.py --losses [--rounds 101]

For each size and share of the mask set (a half, a fifth, a twentieth: a binary segment's
foreground, or one class among a few or among many), medians of interleaved rounds of:
``torch.where`` against ``select``, ``masked_fill_(mask, 1)`` against ``one_where_``, and
(half set) the copy of a bool array into a float one against the copy of its bytes. Every
call gets a mask it has not had for a while, from a pool of random masks: a branchy op timed
over and over on one mask runs up to 4x faster than a call sees it, because the branch
predictor learns the mask. The sizes where the arithmetic wins set
``ARITHMETIC_MIN_ELEMENTS``.

``--losses``: whole torch-backend calls, forward + backward, of one hinge image per size
(random labels: half foreground), with ``ARITHMETIC_MIN_ELEMENTS`` as it is and at 32768 (as
first set), next to the authors' per-class loop; new inputs every call, the three in a new
order every round, medians.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from lovasz_kernels import _masked

SIZES = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 262144, 1 << 20)
SHARES = (0.5, 0.2, 0.05)
# masks in the pool: enough that none is seen again before the predictor has forgotten it,
# at most this many elements in all
POOL_ELEMENTS = 1 << 22


def _time(function, masks: list[torch.Tensor], calls: int) -> float:
    start = time.perf_counter()
    for index in range(calls):
        function(masks[index % len(masks)])
    return (time.perf_counter() - start) / calls * 1e6


def _contenders(size: int, gen: torch.Generator) -> dict:
    a, b = torch.rand(1, size, generator=gen), torch.rand(1, size, generator=gen)
    out = torch.empty(1, size)
    counts = torch.randint(0, 1000, (1, size), generator=gen).float()
    return {"where": lambda mask: torch.where(mask, a, b, out=out),
            "select": lambda mask: _masked.select(mask, a, b, out=out),
            "fill": lambda mask: counts.masked_fill_(mask, 1),
            "one_where": lambda mask: _masked.one_where_(counts, mask),
            "copy bool": lambda mask: out.copy_(mask),
            "copy bytes": lambda mask: out.copy_(_masked.as_bytes(mask))}


#: ``--losses``: hinge image sides, from under the threshold to just under 32768 pixels
LOSS_SIDES = (64, 91, 128, 150, 181)
FIRST_THRESHOLD = 32768


def _hinge_call(side: int, threshold: int | None, gen: torch.Generator) -> float:
    import lovasz_kernels
    from lovasz_kernels.bench.workloads import per_image_loop_lovasz_hinge

    scores = torch.randn(1, side, side, generator=gen).requires_grad_()
    labels = (torch.rand(1, side, side, generator=gen) < 0.5).long()
    start = time.perf_counter()
    if threshold is None:
        per_image_loop_lovasz_hinge(scores, labels, True).backward()
    else:
        _masked.ARITHMETIC_MIN_ELEMENTS = threshold
        lovasz_kernels.lovasz_hinge(scores, labels, per_image=True, backend="torch").backward()
    return time.perf_counter() - start


def losses(rounds: int) -> None:
    gen = torch.Generator().manual_seed(0)
    order = random.Random(0)
    current = _masked.ARITHMETIC_MIN_ELEMENTS
    contenders = {f"threshold {current}": current, f"threshold {FIRST_THRESHOLD}":
                  FIRST_THRESHOLD, "loop": None}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; one hinge image, "
          f"fwd+bwd, medians of {rounds} rounds, ms")
    try:
        for side in LOSS_SIDES:
            samples = {name: [] for name in contenders}
            for round_index in range(-3, rounds):  # three untimed rounds first
                names = list(contenders)
                order.shuffle(names)
                for name in names:
                    elapsed = _hinge_call(side, contenders[name], gen)
                    if round_index >= 0:
                        samples[name].append(elapsed)
            ms = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
            new, old = ms[f"threshold {current}"], ms[f"threshold {FIRST_THRESHOLD}"]
            print(f"{side:4d}² ({side * side:5d} px): {new:.3f} against {old:.3f} "
                  f"({old / new:.2f}x faster); loop {ms['loop']:.3f} "
                  f"({ms['loop'] / new:.2f}x against {ms['loop'] / old:.2f}x)")
    finally:
        _masked.ARITHMETIC_MIN_ELEMENTS = current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per size (default 9; --losses: 101)")
    parser.add_argument("--losses", action="store_true",
                        help="whole hinge calls at each threshold, next to the loop")
    args = parser.parse_args()
    if args.losses:
        losses(args.rounds or 101)
        return
    args.rounds = args.rounds or 9
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of "
          f"{args.rounds} rounds, microseconds per call, a new mask every call")
    names = ("where", "select", "fill", "one_where")
    print(f"{'set':>5s} {'elements':>9s} " + " ".join(f"{name:>9s}" for name in names)
          + f" {'where/select':>12s} {'fill/one_where':>14s} {'copy bool':>9s} {'bytes':>7s}")
    threshold = _masked.ARITHMETIC_MIN_ELEMENTS
    _masked.ARITHMETIC_MIN_ELEMENTS = 0  # the arithmetic at every size
    try:
        for share in SHARES:
            for size in SIZES:
                contenders = _contenders(size, gen)
                if share != 0.5:
                    contenders = {name: contenders[name] for name in names}
                masks = [torch.rand(1, size, generator=gen) < share
                         for _ in range(max(4, min(64, POOL_ELEMENTS // size)))]
                calls = max(2 * len(masks), 2_000_000 // size)
                samples = {name: [] for name in contenders}
                for _ in range(args.rounds):
                    for name, function in contenders.items():
                        samples[name].append(_time(function, masks, calls))
                medians = {name: statistics.median(values) for name, values in samples.items()}
                cells = " ".join(f"{medians[name]:9.1f}" for name in names)
                ratios = (f" {medians['where'] / medians['select']:12.2f}"
                          f" {medians['fill'] / medians['one_where']:14.2f}")
                copies = (f" {medians['copy bool']:9.1f} {medians['copy bytes']:7.1f}"
                          if "copy bool" in medians else "")
                print(f"{share:5.2f} {size:9d} {cells}{ratios}{copies}")
    finally:
        _masked.ARITHMETIC_MIN_ELEMENTS = threshold


if __name__ == "__main__":
    main()
