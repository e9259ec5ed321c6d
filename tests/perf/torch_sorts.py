"""The torch backend's CPU sorts: the 2-D descending comparison sort against row-by-row radix
sorts (ascending on the complemented keys, rows under PyTorch's grain size padded up to it)
and numpy's sort of packed keys.

    python tests/perf/torch_sorts.py [--rounds 50] [--float64] [--losses]

A hinge loss's errors at initialization, max(0, 1 - x) for standard normal x, as int32 keys
(``--float64``: float64 errors, int64 keys; errors clamped at 0 half the time, as a first
version of this script had them, flatter the comparison sort: 1.09 against 1.56x speedup of
the padded radix sort at 9216 pixels on the development VM), the shapes of the bench grid's
segments and the shapes around the backend's thresholds; the sorts
fill the same preallocated outputs, as the backend does, and alternate in every round. Every
call sorts keys it has not sorted in its previous calls (one of eight sets, in turn), as in
training: a comparison sort of the same keys over and over runs 2-4x faster at a few thousand
pixels on the development VM. Prints the median of each and their ratio.

The last column is the sort the backend gives such rows on this machine
(lovasz_kernels._torch_sort: rows under a grain are padded or packed where the 2-D sort would
run them one after the other and the extension of one such row was measured faster so here);
the speedups it measured are printed first.

``--losses`` times whole hinge losses (forward + backward) instead, on shapes where padded
or packed rows may be chosen: the torch backend as it chooses, the same with each sort
forced, and the authors' per-image loop, interleaved, new inputs every call.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time

import torch

from lovasz_kernels import _torch_sort

SHAPES = [(1, 1024), (1, 2048), (1, 4096), (1, 8192), (1, 9216), (1, 10240), (1, 12288),
          (2, 12288), (3, 12288), (8, 12288), (1, 16384), (8, 16384), (21, 16384), (40, 4096),
          (1, 65536), (1, 262144), (21, 262144), (2, 1 << 20)]
# distinct key sets per shape, used in turn
KEY_SETS = 8
METHODS = (_torch_sort.COMPARED, _torch_sort.RADIX, _torch_sort.PACKED)


def _medians_ms(rows: int, pixels: int, rounds: int, gen: torch.Generator,
                dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Median ms of each sort (the 2-D descending sort, the backend's row-by-row radix sort
    and, for int32 keys, its sort of packed keys)."""
    key_type = torch.int64 if dtype == torch.float64 else torch.int32
    key_sets = [(1 - torch.randn(rows, pixels, generator=gen, dtype=dtype)).clamp_(min=0)
                .view(key_type)
                for _ in range(KEY_SETS if rows * pixels <= 1 << 20 else 1)]
    keys_sorted = torch.empty_like(key_sets[0])
    order = torch.empty(keys_sorted.shape, dtype=torch.int64)
    work = torch.empty_like(key_sets[0])
    methods = METHODS if key_type == torch.int32 else METHODS[:2]
    samples: dict[str, list[float]] = {method: [] for method in methods}
    for round_index in range(rounds):
        for offset, (method, times) in enumerate(samples.items()):
            # the backend overwrites its keys: sorted from a copy, made outside the timing
            keys = work.copy_(key_sets[(round_index + offset) % len(key_sets)])
            start = time.perf_counter()
            _torch_sort.sort_descending(keys, keys_sorted, order, method)
            times.append(time.perf_counter() - start)
    return {method: statistics.median(times) * 1e3 for method, times in samples.items()}


LOSS_SHAPES = [  # (batch, side, per_image)
    (1, 64, True), (1, 90, True), (1, 96, True), (1, 100, True), (1, 112, True), (3, 64, False),
    (2, 112, True), (1, 128, True), (1, 160, True), (4, 128, True)]


def _loss_medians_ms(batch: int, side: int, per_image: bool, rounds: int,
                     gen: torch.Generator) -> dict[str, float]:
    """Median ms of a hinge loss's forward + backward: the torch backend as it chooses its
    sort, with rows under a grain given each sort, and the per-image loop."""
    from lovasz_kernels import lovasz_hinge
    from lovasz_kernels.bench.baselines import per_image_loop_lovasz_hinge

    inputs = [(torch.randn(batch, side, side, generator=gen),
               (torch.rand(batch, side, side, generator=gen) < 0.3).long())
              for _ in range(KEY_SETS)]

    def backend(method):
        def call(logits, masks):
            with (contextlib.nullcontext() if method is None
                  else _torch_sort.method_forced(method)):
                lovasz_hinge(logits.clone().requires_grad_(), masks, per_image=per_image,
                             backend="torch").backward()
        return call

    def loop(logits, masks):
        per_image_loop_lovasz_hinge(logits.clone().requires_grad_(), masks, per_image).backward()

    calls = {"chosen": backend(None), **{method: backend(method) for method in METHODS},
             "loop": loop}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names, shuffler = list(calls), random.Random(0)
    for round_index in range(-KEY_SETS, rounds):  # one untimed pass over the inputs first
        # a new order every round: a fixed one (even rotated) has one contender always run
        # right after the loop, which measured it 5-20% slower
        shuffler.shuffle(names)
        for offset, name in enumerate(names):
            call = calls[name]
            logits, masks = inputs[(round_index + offset) % KEY_SETS]
            start = time.perf_counter()
            call(logits, masks)
            if round_index >= 0:
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) * 1e3 for name, times in samples.items()}


def _print_losses(rounds: int, gen: torch.Generator) -> None:
    print(f"{torch.get_num_threads()} torch threads, hinge fwd+bwd, medians of {rounds} rounds")
    columns = ("chosen", *METHODS, "loop")
    print(f"{'input':>22} {'chooses':>9} " + " ".join(f"{name:>9}" for name in columns)
          + f" {'chosen/best':>12} {'loop/chosen':>12}")
    for batch, side, per_image in LOSS_SHAPES:
        medians = _loss_medians_ms(batch, side, per_image, rounds, gen)
        rows, pixels = (batch, side * side) if per_image else (1, batch * side * side)
        chooses = _torch_sort.sort_method(torch.empty(rows, pixels))
        name = f"{batch} x {side}² {'per image' if per_image else 'batch'}"
        best = min(medians[method] for method in METHODS)
        print(f"{name:>22} {chooses:>9} " + " ".join(
            f"{medians[key]:6.3f} ms" for key in columns)
            + f" {medians['chosen'] / best:11.3f} {medians['loop'] / medians['chosen']:11.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--float64", action="store_true",
                        help="sort float64 errors (int64 keys) instead of float32")
    parser.add_argument("--losses", action="store_true",
                        help="time whole hinge losses with each sort forced and as chosen")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    speedups = _torch_sort.short_row_speedups(threads)
    print(f"speedups over the comparison sort of one row at {_torch_sort.MEASURED_FRACTIONS} "
          f"of a grain, {threads} threads: {speedups} (kept in {_torch_sort.choice_path()})")
    if args.losses:
        _print_losses(args.rounds, gen)
        return
    dtype = torch.float64 if args.float64 else torch.float32
    methods = METHODS if dtype == torch.float32 else METHODS[:2]
    print(f"{threads} torch threads, medians of up to {args.rounds} rounds, ms")
    print(f"{'rows x pixels':>16} " + " ".join(f"{method:>9}" for method in methods)
          + "   chosen")
    for rows, pixels in SHAPES:
        chosen = _torch_sort.sort_method(  # no values read
            torch.empty((), dtype=dtype).expand(rows, pixels))
        rounds = max(3, min(args.rounds, (1 << 24) // (rows * pixels)))
        medians = _medians_ms(rows, pixels, rounds, gen, dtype)
        print(f"{rows:>7} x {pixels:<7} " + " ".join(
            f"{medians[method]:9.3f}" for method in methods) + f"   {chosen}")


if __name__ == "__main__":
    main()
