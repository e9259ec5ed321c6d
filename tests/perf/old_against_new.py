"""An old checkout's losses and this one's in one process, interleaved with the authors' loop.

    python tests/perf/old_against_new.py OLD_CHECKOUT [--pixels 64] [--batch 1]
        [--classes 1] [--batch-iou] [--chunk-floor MB] [--rounds 41] [--backend torch]

Small calls differ by a few percent between versions while this VM's speed drifts by more
between processes, so both versions run in one process: the old checkout's package is copied
to a temporary folder under another name (every ``lovasz_kernels`` in its text renamed, the
operators' namespace included, so both register) and imported beside this one. Each round
times the old code, the new code and the loop, in a new order every round, over four input
sets in turn; prints the medians and the ratios. ``--classes 1`` is the hinge (per image),
more the softmax (per image; ``--batch-iou``: the batch's IoU instead); ``--chunk-floor``
sets both versions' CPU floor (``set_chunk_floor``, in MB). For the torch backend: two
copies of numba's kernels in one process slow each other down, so compare numba in separate
processes instead (``lovasz-kernels bench``).
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import torch

import lovasz_kernels
from lovasz_kernels.bench.baselines import (
    per_class_loop_lovasz_softmax,
    per_image_loop_lovasz_hinge,
)

OLD_NAME = "lovasz_kernels_old"


def import_old(checkout: pathlib.Path, folder: pathlib.Path):
    """The package of ``checkout`` imported as :data:`OLD_NAME` from a renamed copy."""
    copy = folder / OLD_NAME
    shutil.copytree(checkout / "lovasz_kernels", copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in copy.rglob("*.py"):
        path.write_text(path.read_text().replace("lovasz_kernels", OLD_NAME))
    sys.path.insert(0, str(folder))
    return importlib.import_module(OLD_NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old_checkout", type=pathlib.Path)
    parser.add_argument("--pixels", type=int, default=64, help="image side")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--classes", type=int, default=1, help="1: the hinge")
    parser.add_argument("--batch-iou", action="store_true", help="per_image=False")
    parser.add_argument("--chunk-floor", type=float, default=None, metavar="MB",
                        help="set both versions' CPU chunk floor (default: left as it is)")
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--backend", default="torch")
    args = parser.parse_args()
    if not (args.old_checkout / "lovasz_kernels" / "__init__.py").is_file():
        parser.error(f"{args.old_checkout} holds no lovasz_kernels package")

    gen = torch.Generator().manual_seed(0)
    side, batch, classes = args.pixels, args.batch, args.classes
    per_image = classes == 1 or not args.batch_iou
    inputs = []
    for _ in range(4):
        if classes == 1:
            scores = torch.randn(batch, side, side, generator=gen)
            labels = (torch.rand(batch, side, side, generator=gen) < 0.5).long()
        else:
            scores = torch.randn(batch, classes, side, side, generator=gen).softmax(dim=1)
            labels = torch.randint(0, classes, (batch, side, side), generator=gen)
        inputs.append((scores.requires_grad_(), labels))

    def ours(module):
        def call(scores, labels):
            if classes == 1:
                loss = module.lovasz_hinge(scores, labels, per_image=True, backend=args.backend)
            else:
                loss = module.lovasz_softmax(scores, labels, per_image=per_image,
                                             backend=args.backend)
            loss.backward()
            scores.grad = None
        return call

    def loop(scores, labels):
        if classes == 1:
            loss = per_image_loop_lovasz_hinge(scores, labels)
        else:
            loss = per_class_loop_lovasz_softmax(scores, labels, per_image=per_image)
        loss.backward()
        scores.grad = None

    with tempfile.TemporaryDirectory() as folder:
        old = import_old(args.old_checkout.resolve(), pathlib.Path(folder))
        if args.chunk_floor is not None:
            for module in (old, lovasz_kernels):
                module.set_chunk_floor("cpu", int(args.chunk_floor * (1 << 20)))
        contenders = {"old": ours(old), "new": ours(lovasz_kernels), "loop": loop}
        for call in contenders.values():  # warm-up: compilation, first-use measurements
            for index in range(8):
                call(*inputs[index % 4])
        calls_per_round = 20
        times: dict[str, list[float]] = {name: [] for name in contenders}
        names = list(contenders)
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                for index in range(calls_per_round):
                    contenders[name](*inputs[index % 4])
                times[name].append((time.perf_counter() - start) / calls_per_round * 1e3)
    median = {name: statistics.median(values) for name, values in times.items()}
    what = "hinge" if classes == 1 else f"softmax, {classes} classes"
    floor = "" if args.chunk_floor is None else f", floor {args.chunk_floor:g} MB set"
    print(f"{batch} x {side}² ({what}, {'per image' if per_image else 'batch'}{floor}), "
          f"{args.backend}, median of {args.rounds} rounds: "
          + ", ".join(f"{name} {value:.3f} ms" for name, value in median.items()))
    print(f"loop / old {median['loop'] / median['old']:.3f}, loop / new "
          f"{median['loop'] / median['new']:.3f}, old / new {median['old'] / median['new']:.3f}")


if __name__ == "__main__":
    main()
