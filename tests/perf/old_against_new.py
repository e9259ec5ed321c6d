"""An old checkout's losses and this one's in one process, interleaved with the authors' loop.

    python tests/perf/old_against_new.py OLD_CHECKOUT [--pixels 64] [--batch 1]
        [--classes 1] [--batch-iou] [--chunk-floor MB] [--rounds 41] [--backend torch]
        [--segments]

Small calls differ by a few percent between versions while this VM's speed drifts by more
between processes, so both versions run in one process: the old checkout's package is copied
under another name (every ``lovasz_kernels`` in its text renamed, the operators' namespace
included, so both register) and imported beside this one. The copy is kept in the cache folder
under a name made from its text, so numba compiles an old version's kernels once, not every
run. Each round times the old code, the new code and the loop, in a new order every round,
over four input sets in turn; prints the medians and the ratios. ``--classes 1`` is the hinge
(per image), more the softmax (per image; ``--batch-iou``: the batch's IoU instead);
``--chunk-floor`` sets both versions' CPU floor (``set_chunk_floor``, in MB).

Whole numba calls do not compare well here: two copies of numba's kernels, thread pools and
scratch in one process slow each other down unevenly (on the development VM a change later
measured neutral read 1.04-1.13x this way), so compare them in separate processes
(``lovasz-kernels bench``). ``--segments`` compares numba's segment kernels alone instead, on
this script's own threads, on the errors of the first input set as the loss computes them
(one segment per image and class, or per class with ``--batch-iou``): every segment on one
thread, then shared by two, both versions' bits checked equal first. Run it once with this
checkout as the old one: on the development VM, with the same code on both sides, it read
0.94-0.99 at 512² × 21 and 0.60-0.85 at 2 × 128² × 5 (per image), so differences that small
mean nothing, and small segments mean little here (the same kernels driven from the main
thread read 1.19x the other way).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import pathlib
import shutil
import statistics
import sys
import time

import torch

import lovasz_kernels
from lovasz_kernels.bench.baselines import (
    per_class_loop_lovasz_softmax,
    per_image_loop_lovasz_hinge,
)

OLD_NAME = "lovasz_kernels_old"


def import_old(checkout: pathlib.Path):
    """The package of ``checkout`` imported as :data:`OLD_NAME` from a renamed copy, kept
    under the cache folder in a directory named by a hash of its text."""
    sources = sorted((checkout / "lovasz_kernels").rglob("*.py"))
    digest = hashlib.sha1()
    for path in sources:
        digest.update(str(path.relative_to(checkout)).encode() + b"\0" + path.read_bytes())
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    folder = cache / "lovasz_kernels" / "old-checkouts" / digest.hexdigest()[:16]
    copy = folder / OLD_NAME
    if not copy.is_dir():
        staging = folder.with_name(folder.name + f".{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(checkout / "lovasz_kernels", staging / OLD_NAME,
                        ignore=shutil.ignore_patterns("__pycache__"))
        for path in (staging / OLD_NAME).rglob("*.py"):
            path.write_text(path.read_text().replace("lovasz_kernels", OLD_NAME))
        try:
            staging.rename(folder)
        except OSError:  # another run made it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    sys.path.insert(0, str(folder))
    return importlib.import_module(OLD_NAME)


def _segment_errors(scores: torch.Tensor, labels: torch.Tensor, classes: int, per_image: bool):
    """(errors, fg) of the call's segments as float32 / bool arrays (S, P), as the loss
    computes them: 1 - p on foreground, p elsewhere (the hinge: 1 - y·logit)."""
    if classes == 1:
        signs = labels.float() * 2 - 1
        errors = (1 - scores.detach() * signs).reshape(labels.shape[0], -1)
        return errors.numpy(), labels.reshape(labels.shape[0], -1).bool().numpy()
    probas = scores.detach().movedim(1, 0)  # (C, B, H, W)
    fg = labels[None] == torch.arange(classes).view(-1, 1, 1, 1)
    errors = torch.where(fg, 1 - probas, probas)
    if per_image:
        errors, fg = errors.transpose(0, 1), fg.transpose(0, 1)
    rows = errors.shape[0] * errors.shape[1] if per_image else classes
    return (errors.reshape(rows, -1).contiguous().numpy(),
            fg.reshape(rows, -1).contiguous().numpy())


def compare_segments(old, errors, fg, rounds: int) -> None:
    """Both versions' numba segment kernels (``_segments_shared``) on the same segments, on
    one thread and shared by two of this script's threads, interleaved; prints the medians."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from lovasz_kernels import _numba_core
    from lovasz_kernels.backends import numba_cpu

    num_segments, num_pixels = errors.shape
    versions = {}
    for name, backend, core in (
            ("old", importlib.import_module(f"{old.__name__}.backends.numba_cpu"),
             importlib.import_module(f"{old.__name__}._numba_core")),
            ("new", numba_cpu, _numba_core)):
        grad = np.empty_like(errors)
        versions[name] = (backend, backend._extension_batch(errors, fg, grad), grad,
                          core.RADIX_MIN_KEYS, core.SORT_LSD)
    scratch = [(np.empty(num_pixels, np.uint64), np.empty(num_pixels, np.uint64))
               for _ in range(2)]
    pool = ThreadPoolExecutor(2)

    def run(name: str, threads: int) -> np.ndarray:
        backend, batch, _, radix_min, method = versions[name]
        loss = np.zeros(num_segments)
        counter = np.zeros(1, dtype=np.int64)
        tasks = [pool.submit(backend._segments_shared, batch, num_segments, counter, 1, loss,
                             *scratch[thread], radix_min, method) for thread in range(threads)]
        for task in tasks:
            task.result()
        return loss

    if not (np.array_equal(run("old", 1), run("new", 1))
            and np.array_equal(versions["old"][2], versions["new"][2])):
        raise SystemExit("error: the old and new kernels disagree on these segments")
    for threads in (1, 2):
        times: dict[str, list[float]] = {"old": [], "new": []}
        for round_index in range(rounds):
            for name in (("old", "new") if round_index % 2 else ("new", "old")):
                start = time.perf_counter()
                run(name, threads)
                times[name].append((time.perf_counter() - start) * 1e3)
        median = {name: statistics.median(values) for name, values in times.items()}
        print(f"{num_segments} segments of {num_pixels} pixels, {threads} thread(s), median of "
              f"{rounds} rounds: old {median['old']:.2f} ms, new {median['new']:.2f} ms, "
              f"old / new {median['old'] / median['new']:.3f}")


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
    parser.add_argument("--segments", action="store_true",
                        help="numba's segment kernels alone, on one thread and two")
    args = parser.parse_args()
    for flag in ("pixels", "batch", "classes", "rounds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.segments and args.chunk_floor is not None:
        parser.error("--chunk-floor does not apply to --segments (the kernels run whole)")
    if args.segments and args.backend not in ("torch", "numba"):  # torch: the flag's default
        parser.error(f"--segments times numba's kernels; --backend {args.backend} does not apply")
    if args.segments and not lovasz_kernels.get_backend("numba").availability()[0]:
        parser.error("--segments needs numba: pip install numba")
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

    old = import_old(args.old_checkout.resolve())
    if args.segments:
        compare_segments(old, *_segment_errors(*inputs[0], classes, per_image), args.rounds)
        return
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
