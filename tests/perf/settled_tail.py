"""The settled tail left out of the sort, and kept in it, in one process, rounds interleaved.

    python tests/perf/settled_tail.py [--rounds 21] [--cases 512x21 256x150 ...]
        [--scores random trained] [--backend numba]

Past a segment's last fg pixel in sorted order every increment is 0, so where every fg pixel
has a positive error the background pixels there need no order. The numba backend leaves
them out of the sort where they are at least ``SETTLED_TAIL_MIN_FRACTION`` of the keys
(``numba_cpu._drop_settled_tail``); the torch backend sorts only the keys each row needs
(``torch_eager._few_needed``, torch.topk) where every row of a chunk needs at most
``TOP_K_MAX_FRACTION`` of its pixels. How many keys are left out depends on the data: every
background pixel of a softmax over many classes with random labels (the benchmarks' default
inputs), a share of them with scores that favour the label (``lovasz-kernels bench --scores
trained``), none where some fg pixel's error is 0 (a probability of exactly 1).

For each case and kind of scores, prints the share of the sorted keys left out (from the
errors under the backend's rule; for torch an upper bound, its rule being per chunk of
rows), and the medians
of whole calls (forward + backward through ``lovasz_softmax``, each right after a torch op,
as in a training step) with the tail left out (``dropped``) and kept (``whole``), the two in
a new order every round. For numba, ``whole`` swaps in packing without the drop, which only
the segments sorted by numpy's sort between two kernels look up at run time: on a machine
whose measured sort is a radix sort in the kernel (``lovasz-kernels info``) the script says
so and times ``dropped`` alone. For torch, ``whole`` sorts every pixel, as before.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

CASES = {  # name: (batch, classes, side, per_image)
    "512x21": (1, 21, 512, False),
    "256x150": (1, 150, 256, False),
    "4x256x21-per-image": (4, 21, 256, True),
    "1024x2": (1, 2, 1024, False),
    "512x8": (1, 8, 512, False),
}


def _left_out_share(errors: torch.Tensor, fg: torch.Tensor, backend: str) -> float:
    """Share of the positive errors of (S, P) rows that the backend leaves out of its sort,
    by the rows' needed keys (``torch_eager._needed_keys``, ties with the bound counted as
    needed): numba each row's tail of at least its minimum fraction; torch, at most, each
    tail of a row that then needs at most its top-k fraction of its pixels (a chunk of rows
    is sorted top-k only where every row of it does)."""
    from lovasz_kernels.backends import numba_cpu, torch_eager

    positives = (errors > 0).sum(dim=1)
    needed = torch.minimum(torch_eager._needed_keys(errors, fg).flatten(), positives)
    tails = positives - needed
    if backend == "numba":
        kept = tails >= numba_cpu.SETTLED_TAIL_MIN_FRACTION * positives
    elif errors.shape[1] < torch_eager.TOP_K_MIN_PIXELS:
        kept = torch.zeros_like(tails, dtype=torch.bool)
    else:
        kept = needed <= torch_eager.TOP_K_MAX_FRACTION * errors.shape[1]
    return int(tails[kept].sum()) / max(int(positives.sum()), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--cases", nargs="+", default=list(CASES)[:4], choices=list(CASES))
    parser.add_argument("--scores", nargs="+", default=["random", "trained"],
                        choices=["random", "trained"])
    parser.add_argument("--backend", default="numba", choices=["numba", "torch"])
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1; got {args.rounds}")
    _measure(args)


def _swaps(backend: str):
    """(module, attribute, the code that leaves the tail out, the code that keeps it, whether
    the swap takes effect here)."""
    from lovasz_kernels import _numba_core as core
    from lovasz_kernels.backends import numba_cpu, torch_eager

    if backend == "torch":
        return torch_eager, "_few_needed", torch_eager._few_needed, lambda *args: None, True

    def whole(batch, s, keys):
        return numba_cpu._pack_range(batch, s, 0, batch.rows * batch.num_cols, keys, 0)

    host_sorted = core.sort_choice().host == core.SORT_NUMPY
    return numba_cpu, "_pack_segment", numba_cpu._pack_segment, whole, host_sorted


def _measure(args: argparse.Namespace) -> None:
    from lovasz_kernels import bench, lovasz_softmax

    module, attribute, dropping, whole, swaps = _swaps(args.backend)
    ways = ("dropped", "whole") if swaps else ("dropped",)
    if not swaps:
        print("this machine sorts in the kernel (its measured sort is a radix sort): "
              "'whole' cannot be swapped in, 'dropped' alone is timed")
    print(f"medians of {args.rounds} rounds, ms, {args.backend} forward + backward after a "
          "torch op")
    print(f"{'case':20s} {'scores':8s} {'left out':>9s} "
          + " ".join(f"{way:>8s}" for way in ways)
          + (f" {'whole/dropped':>14s}" if swaps else ""))
    for name in args.cases:
        batch, classes, side, per_image = CASES[name]
        for scores in args.scores:
            workload = bench.Workload("softmax", batch, side, classes, per_image,
                                      scores=scores)
            prepared = bench.Prepared(workload)
            errors, fg = prepared.errors_and_fg
            share = _left_out_share(errors, fg, args.backend)
            probas = prepared.scores.clone().requires_grad_()
            other = torch.randn(probas.shape)
            times: dict[str, list[float]] = {way: [] for way in ways}
            for round_index in range(args.rounds + 1):
                order = ways if round_index % 2 == 0 else ways[::-1]
                for way in order:
                    setattr(module, attribute, dropping if way == "dropped" else whole)
                    try:
                        other.softmax(-1)  # a training step's last op before the loss
                        start = time.perf_counter()
                        loss = lovasz_softmax(probas, prepared.labels, per_image=per_image,
                                              backend=args.backend)
                        loss.backward()
                        elapsed = time.perf_counter() - start
                    finally:
                        setattr(module, attribute, dropping)
                    probas.grad = None
                    if round_index:  # the first round warms both up
                        times[way].append(elapsed)
            medians = {way: statistics.median(values) * 1e3 for way, values in times.items()}
            row = f"{name:20s} {scores:8s} {share:9.1%} " + " ".join(
                f"{medians[way]:8.2f}" for way in ways)
            if swaps:
                row += f" {medians['whole'] / medians['dropped']:14.2f}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
