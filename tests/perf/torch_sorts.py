"""The torch backend's CPU sorts: the 2-D descending comparison sort against row-by-row radix
sorts (ascending on the complemented keys, rows under PyTorch's grain size padded up to it).

    python tests/perf/torch_sorts.py [--rounds 50] [--float64] [--losses]

Random clamped float32 errors as int32 keys (``--float64``: float64 errors, int64 keys), the
shapes of the bench grid's segments and the shapes around the backend's thresholds; both sorts
fill the same preallocated outputs, as the backend does, and alternate in every round. Every
call sorts keys it has not sorted in its previous calls (one of eight sets, in turn), as in
training: a comparison sort of the same keys over and over runs 2-4x faster at a few thousand
pixels on the development VM. Prints the median of each and their ratio.

``--losses`` times whole hinge losses (forward + backward) instead, on the shapes where the
lone-row rule (``LONE_ROW_RADIX_MIN_PIXELS``) decides: the torch backend with that rule, the
same with the rule off (the comparison sort), and the authors' per-image loop, interleaved,
new inputs every call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lovasz_kernels.backends import torch_eager

SHAPES = [(1, 4096), (1, 8192), (1, 9216), (1, 10240), (1, 12288), (2, 12288), (3, 12288),
          (8, 12288), (1, 16384), (8, 16384), (21, 16384), (1, 65536), (1, 262144),
          (21, 262144), (2, 1 << 20)]
# distinct key sets per shape, used in turn
KEY_SETS = 8


def _medians_ms(rows: int, pixels: int, rounds: int, gen: torch.Generator,
                dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """Median ms of the 2-D descending sort and of the backend's row-by-row radix sort."""
    key_type = torch.int64 if dtype == torch.float64 else torch.int32
    key_sets = [torch.randn(rows, pixels, generator=gen, dtype=dtype).clamp_(min=0).view(key_type)
                for _ in range(KEY_SETS if rows * pixels <= 1 << 20 else 1)]
    keys_sorted = torch.empty_like(key_sets[0])
    order = torch.empty(keys_sorted.shape, dtype=torch.int64)
    work = torch.empty_like(key_sets[0])

    def compared(keys):
        torch.sort(keys, dim=1, descending=True, out=(keys_sorted, order))

    def radix(keys):
        torch_eager._sort_descending(keys, keys_sorted, order)  # overwrites its keys

    samples = {compared: [], radix: []}
    for round_index in range(rounds):
        for offset, (call, times) in enumerate(samples.items()):
            # the backend overwrites its keys: sorted from a copy, made outside the timing
            keys = work.copy_(key_sets[(round_index + offset) % len(key_sets)])
            start = time.perf_counter()
            call(keys)
            times.append(time.perf_counter() - start)
    return (statistics.median(samples[compared]) * 1e3, statistics.median(samples[radix]) * 1e3)


LOSS_SHAPES = [  # (batch, side, per_image)
    (1, 90, True), (1, 96, True), (1, 100, True), (1, 112, True), (3, 64, False), (2, 112, True)]


def _loss_medians_ms(batch: int, side: int, per_image: bool, rounds: int,
                     gen: torch.Generator) -> dict[str, float]:
    """Median ms of a hinge loss's forward + backward: the torch backend with its lone-row
    rule and without, and the per-image loop."""
    from lovasz_kernels import lovasz_hinge
    from lovasz_kernels.bench.baselines import per_image_loop_lovasz_hinge

    inputs = [(torch.randn(batch, side, side, generator=gen),
               (torch.rand(batch, side, side, generator=gen) < 0.3).long())
              for _ in range(KEY_SETS)]
    names = ("LONE_ROW_RADIX_MIN_PIXELS", "LONE_ROW_RADIX_MIN_PIXELS_ONE_THREAD")
    rule = tuple(getattr(torch_eager, name) for name in names)

    def backend(minimums):
        def call(logits, masks):
            for name, value in zip(names, minimums):
                setattr(torch_eager, name, value)
            try:
                lovasz_hinge(logits.clone().requires_grad_(), masks, per_image=per_image,
                             backend="torch").backward()
            finally:
                for name, value in zip(names, rule):
                    setattr(torch_eager, name, value)
        return call

    def loop(logits, masks):
        per_image_loop_lovasz_hinge(logits.clone().requires_grad_(), masks, per_image).backward()

    calls = {"with the rule": backend(rule), "without": backend((1 << 62,) * 2), "loop": loop}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(-KEY_SETS, rounds):  # one untimed pass over the inputs first
        for offset, (name, call) in enumerate(calls.items()):
            logits, masks = inputs[(round_index + offset) % KEY_SETS]
            start = time.perf_counter()
            call(logits, masks)
            if round_index >= 0:
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) * 1e3 for name, times in samples.items()}


def _print_losses(rounds: int, gen: torch.Generator) -> None:
    print(f"{torch.get_num_threads()} torch threads, hinge fwd+bwd, medians of {rounds} rounds, "
          f"LONE_ROW_RADIX_MIN_PIXELS = {torch_eager.LONE_ROW_RADIX_MIN_PIXELS}")
    print(f"{'input':>22} {'with the rule':>14} {'without':>10} {'loop':>10} {'with/without':>13}"
          f" {'loop/with':>10}")
    for batch, side, per_image in LOSS_SHAPES:
        medians = _loss_medians_ms(batch, side, per_image, rounds, gen)
        name = f"{batch} x {side}² {'per image' if per_image else 'batch'}"
        print(f"{name:>22} {medians['with the rule']:11.3f} ms {medians['without']:7.3f} ms "
              f"{medians['loop']:7.3f} ms {medians['with the rule'] / medians['without']:12.3f}"
              f" {medians['loop'] / medians['with the rule']:9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--float64", action="store_true",
                        help="sort float64 errors (int64 keys) instead of float32")
    parser.add_argument("--losses", action="store_true",
                        help="time whole hinge losses with and without the lone-row rule")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    if args.losses:
        _print_losses(args.rounds, gen)
        return
    print(f"{torch.get_num_threads()} torch threads, medians of up to {args.rounds} rounds")
    print(f"{'rows x pixels':>16} {'2-D descending':>15} {'row-by-row radix':>17} {'ratio':>6}")
    chooses = torch_eager._radix_sorted
    for rows, pixels in SHAPES:
        dtype = torch.float64 if args.float64 else torch.float32
        used = chooses(torch.empty((), dtype=dtype).expand(rows, pixels))  # no values read
        rounds = max(3, min(args.rounds, (1 << 24) // (rows * pixels)))
        try:  # below the backend's threshold: the padded radix sort it would not take
            torch_eager._radix_sorted = lambda keys: True
            compared_ms, radix_ms = _medians_ms(rows, pixels, rounds, gen, dtype)
        finally:
            torch_eager._radix_sorted = chooses
        print(f"{rows:>7} x {pixels:<7} {compared_ms:12.3f} ms {radix_ms:14.3f} ms "
              f"{compared_ms / radix_ms:5.2f}x" + ("" if used else "  (radix not used)"))


if __name__ == "__main__":
    main()
