"""Segments with few sorted keys: numba's radix sort against the comparison sort it replaced
there, toggled per round in one process.

    python tests/perf/few_keys.py [--rounds 41]
    python tests/perf/few_keys.py --prox [--rounds 41]

First the sort alone (``_numba_core.sort_keys``) on 32 to 1023 packed keys, softmax-like
(27 varying prefix bits) and hinge-like (more), a new set of keys every call from a pool: a
comparison sort timed over and over on the same keys runs 2-4x faster than a loss ever sees
it, because the branch predictor learns them. Then whole numba calls, forward + backward,
whose segments sort few keys: hinge images of a trained-like model (margins around 3.5, so
about 0.6% of the pixels have a positive error), small per-image softmax, and the exact
"radix" is ``RADIX_MIN_KEYS`` as it is; "comparison" raises it to 1024, as it was first set.
Medians, and the ratio comparison / radix.

Then the torch backend on such hinges: only each row's positive errors taken by
``torch.topk`` ("top k", as now) against sorting every pixel ("sort all"), toggled per round;
and on partly trained hinges (10-30% of the errors positive, ``--torch-positives`` alone):
only the positive errors sorted, by ranges ("positives", as now), against every pixel.

Last, where few keys are sorted the passes around the sort show: hinge calls (one channel,
so each label is read by one segment) with the labels narrowed to uint8 by a pass of their
own first, as every call once did ("narrowed"), against the kernels reading the int64 labels
("int64", as now), toggled per round.

``--prox``: only the exact prox of such a hinge (8 x 256², per image). Its kernels compile
``RADIX_MIN_KEYS`` in as a constant, so the two settings cannot be toggled in one process:
time two checkouts in alternating processes (``PYTHONPATH=<checkout> python
tests/perf/few_keys.py --prox``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch

from lovasz_kernels import _numba_core as core
from lovasz_kernels import lovasz_hinge, lovasz_softmax
from lovasz_kernels.backends import numba_cpu
from lovasz_kernels.optim.prox import prox_lovasz_hinge

FIRST_RADIX_MIN_KEYS = 1024
SORT_SIZES = (32, 64, 128, 512, 1023)
POOL = 256


def _hinge_like_keys(count: int, seed: int) -> np.ndarray:
    """Packed keys of positive hinge errors |N(1, 1)|, in pixel order."""
    rng = np.random.default_rng(seed)
    errors = np.abs(rng.standard_normal(count, dtype=np.float32) + np.float32(1)) + np.float32(
        1e-3)
    prefix = np.uint64(0x7F800000) - errors.view(np.uint32).astype(np.uint64)
    payload = np.arange(count, dtype=np.uint64) << np.uint64(1)
    return (prefix << np.uint64(32)) | payload


def sorts(rounds: int) -> None:
    print("the sort alone, us per call")
    for name, make in (("softmax-like", core.calibration_keys), ("hinge-like", _hinge_like_keys)):
        for count in SORT_SIZES:
            pool = [make(count, seed) for seed in range(POOL)]
            work, buffer = np.empty(count, np.uint64), np.empty(count, np.uint64)
            samples = {"radix": [], "comparison": []}
            for round_index in range(-1, rounds):
                for label, radix_min in (("radix", core.RADIX_MIN_KEYS),
                                         ("comparison", FIRST_RADIX_MIN_KEYS)):
                    start = time.perf_counter()
                    for keys in pool:
                        work[:] = keys
                        core.sort_keys(work, buffer, count, radix_min, core.SORT_LSD)
                    if round_index >= 0:
                        samples[label].append((time.perf_counter() - start) / POOL * 1e6)
            radix, comparison = (statistics.median(samples[key]) for key in ("radix", "comparison"))
            print(f"  {name:12s} {count:5d} keys: radix {radix:6.2f}, comparison "
                  f"{comparison:6.2f} ({comparison / radix:.2f}x)")


def _trained_hinge(batch: int, side: int, gen: torch.Generator, mean_margin: float = 3.5):
    """Logits whose margins are N(mean_margin, 1): 3.5 leaves 0.6% of the errors positive,
    2.645 5%."""
    labels = (torch.rand(batch, side, side, generator=gen) < 0.5).long()
    margins = torch.randn(batch, side, side, generator=gen) + mean_margin
    return (labels * 2 - 1) * margins, labels


def _softmax(batch: int, side: int, classes: int, gen: torch.Generator):
    probas = torch.randn(batch, classes, side, side, generator=gen).softmax(dim=1)
    return probas, torch.randint(0, classes, (batch, side, side), generator=gen)


CALLS = {
    "hinge 8 x 256², 0.6% positive, per image": lambda gen: (
        lovasz_hinge, _trained_hinge(8, 256, gen), {"per_image": True}),
    "hinge 512², 0.6% positive": lambda gen: (
        lovasz_hinge, _trained_hinge(1, 512, gen), {"per_image": True}),
    "softmax 32 x 16² x 21, per image": lambda gen: (
        lovasz_softmax, _softmax(32, 16, 21, gen), {"per_image": True}),
    "softmax 16 x 24² x 5, per image": lambda gen: (
        lovasz_softmax, _softmax(16, 24, 5, gen), {"per_image": True}),
}


def calls(rounds: int) -> None:
    print("numba, forward + backward, ms per call")
    gen = torch.Generator().manual_seed(0)
    order = random.Random(0)
    for name, make in CALLS.items():
        samples = {"radix": [], "comparison": []}
        for round_index in range(-3, rounds):
            labels_order = [("radix", core.RADIX_MIN_KEYS), ("comparison", FIRST_RADIX_MIN_KEYS)]
            order.shuffle(labels_order)
            for label, radix_min in labels_order:
                loss_fn, (scores, labels), options = make(gen)
                scores.requires_grad_()
                numba_cpu.RADIX_MIN_KEYS = radix_min
                start = time.perf_counter()
                loss_fn(scores, labels, backend="numba", **options).backward()
                if round_index >= 0:
                    samples[label].append(time.perf_counter() - start)
        radix, comparison = (statistics.median(samples[key]) * 1e3
                             for key in ("radix", "comparison"))
        print(f"  {name:42s} radix {radix:7.3f}, comparison {comparison:7.3f} "
              f"({comparison / radix:.2f}x)")
    numba_cpu.RADIX_MIN_KEYS = core.RADIX_MIN_KEYS


def _hinge_inputs(batch: int, side: int, gen: torch.Generator, mean_margin: float | None):
    """A trained-like hinge's logits and labels (:func:`_trained_hinge`), or random logits
    (N(0, 1): 84% of the errors positive) when ``mean_margin`` is None."""
    if mean_margin is not None:
        return _trained_hinge(batch, side, gen, mean_margin)
    logits = torch.randn(batch, side, side, generator=gen)
    return logits, (torch.rand(batch, side, side, generator=gen) < 0.5).long()


def _toggled_hinges(title: str, backend: str, module, name: str, ways: dict, cases: dict,
                    rounds: int, seed: int) -> None:
    """Hinge calls, forward + backward, per image, with ``module.name`` set to each of
    ``ways`` (label: function; the first is the code as it is) in a new order every round.
    ``cases``: name: (batch, side, mean margin or None). Prints the medians in ms and how
    much faster the first way is."""
    print(title)
    gen = torch.Generator().manual_seed(seed)
    order = random.Random(seed)
    kept = getattr(module, name)
    now_label, before_label = ways
    try:
        for case, (batch, side, mean_margin) in cases.items():
            samples = {label: [] for label in ways}
            for round_index in range(-3, rounds):
                shuffled = list(ways.items())
                order.shuffle(shuffled)
                for label, function in shuffled:
                    logits, labels = _hinge_inputs(batch, side, gen, mean_margin)
                    logits.requires_grad_()
                    setattr(module, name, function)
                    start = time.perf_counter()
                    lovasz_hinge(logits, labels, per_image=True, backend=backend).backward()
                    if round_index >= 0:
                        samples[label].append(time.perf_counter() - start)
            now, before = (statistics.median(samples[key]) * 1e3
                           for key in (now_label, before_label))
            print(f"  {case:36s} {now_label} {now:7.3f}, {before_label} {before:7.3f} "
                  f"({before / now:.2f}x)")
    finally:
        setattr(module, name, kept)


TORCH_TOP_K_CASES = {  # name: (batch, side, mean margin)
    "256², 0.6% positive": (1, 256, 3.5),
    "1024², 0.6% positive": (1, 1024, 3.5),
    "1024², 5% positive": (1, 1024, 2.645),
    "8 x 256² per image, 0.6% positive": (8, 256, 3.5),
    "8 x 256² per image, 5% positive": (8, 256, 2.645),
}


def torch_top_k(rounds: int) -> None:
    from lovasz_kernels.backends import torch_eager

    _toggled_hinges(
        "torch backend hinge, forward + backward, ms per call: top k or every pixel sorted",
        "torch", torch_eager, "_few_needed",
        {"top k": torch_eager._few_needed, "sort all": lambda *args: None},
        TORCH_TOP_K_CASES, rounds, seed=3)


TORCH_POSITIVES_CASES = {  # name: (batch, side, mean margin)
    "512², 10% positive": (1, 512, 2.28),
    "512², 25% positive": (1, 512, 1.674),
    "512², 30% positive": (1, 512, 1.524),
    "1024², 10% positive": (1, 1024, 2.28),
    "1024², 25% positive": (1, 1024, 1.674),
    "1024², 30% positive": (1, 1024, 1.524),
    "4 x 512² per image, 25% positive": (4, 512, 1.674),
}


def torch_positives_only(rounds: int) -> None:
    from lovasz_kernels.backends import torch_eager

    _toggled_hinges(
        "torch backend hinge, forward + backward, ms per call: only the positive errors "
        "sorted (by ranges) or every pixel",
        "torch", torch_eager, "_ranges_pay",
        {"positives": torch_eager._ranges_pay, "sort all": lambda errors, over_budget: False},
        TORCH_POSITIVES_CASES, rounds, seed=4)


HINGE_LABEL_CASES = {  # name: (batch, side, mean margin; None: random logits)
    "8 x 256² per image, 0.6% positive": (8, 256, 3.5),
    "8 x 256² per image, random": (8, 256, None),
    "1024², 0.6% positive": (1, 1024, 3.5),
    "1024², random": (1, 1024, None),
}


def hinge_labels(rounds: int) -> None:
    reading = numba_cpu._narrow_labels

    def narrowing(labels, ignore_index, num_channels, plan_labels=None):
        return reading(labels, ignore_index, max(num_channels, 2))  # 2 channels: uint8

    _toggled_hinges(
        "numba hinge, forward + backward, ms per call: labels narrowed first or read as int64",
        "numba", numba_cpu, "_narrow_labels", {"int64": reading, "narrowed": narrowing},
        HINGE_LABEL_CASES, rounds, seed=2)


def prox(rounds: int) -> None:
    gen = torch.Generator().manual_seed(1)
    samples = []
    for round_index in range(-2, rounds):
        logits, labels = _trained_hinge(8, 256, gen)
        start = time.perf_counter()
        prox_lovasz_hinge(logits, labels, 0.5)
        if round_index >= 0:
            samples.append(time.perf_counter() - start)
    print(f"prox_lovasz_hinge 8 x 256², 0.6% positive, exact: "
          f"{statistics.median(samples) * 1e3:.3f} ms per call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--prox", action="store_true", help="only the prox (any checkout)")
    parser.add_argument("--torch-positives", action="store_true",
                        help="only the torch backend's partly trained hinges")
    args = parser.parse_args()
    print(f"numba {core.numba.__version__}, {core.thread_count()} threads; "
          f"medians of {args.rounds} rounds")
    if args.prox:
        prox(args.rounds)
        return
    if args.torch_positives:
        torch_positives_only(args.rounds)
        return
    sorts(args.rounds)
    calls(args.rounds)
    torch_top_k(args.rounds)
    torch_positives_only(args.rounds)
    hinge_labels(args.rounds)


if __name__ == "__main__":
    main()
