"""The numba backend beside torch's thread pool: default OpenMP settings against passive ones.

    python tests/perf/cpu_threads_interleaved.py [--rounds 9] [--cases 512x21 1024x2 ...]

Each OpenMP wait policy gets a process of its own (libgomp reads it once, at load), and the
two processes run one after the other, twice, so both see the machine's drift. In each, every
round times, in turn: the numba loss (forward + backward) right after a torch op, as in a
training step; the backend's kernel call alone (``lovasz_loss`` on a plan made beforehand: no
validation, no class counting, which are torch ops); a torch op right after that; the same
torch op after 50 ms idle (every pool asleep); the floor, ``np.sort`` of as many random packed
uint64 keys as the loss sorts, segments spread over a plain thread pool, right after that torch
op too. Prints medians and the ratios that should be near 1: default / passive (the floor's
too: what torch's spinning threads take from any work on other threads, not only numba's),
numba / floor in each policy, and the torch op after numba / after idle.

``--numba-threads 1 4 16`` instead runs one process per thread count of the numba kernels
(``NUMBA_NUM_THREADS``; default OpenMP policy, torch's threads and the floor's unchanged) and
prints how the loss and the kernel scale, with the sort that each process chose (measured on
first use with that many threads busy, or read from the machine's cache file).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

CASES = {  # name: (batch, classes, side, per_image)
    "512x21": (1, 21, 512, False),
    "256x150": (1, 150, 256, False),
    "8x64x5-per-image": (8, 5, 64, True),
    "4x256x21-per-image": (4, 21, 256, True),
    "1024x2": (1, 2, 1024, False),
    "16x32x21-per-image": (16, 21, 32, True),
}


def _child(cases: list[str], rounds: int) -> dict:
    import numpy as np
    import torch

    from lovasz_kernels import _numba_core as core
    from lovasz_kernels import lovasz_softmax
    from lovasz_kernels._plan import plan_segments
    from lovasz_kernels.backends import numba_cpu

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    pool = ThreadPoolExecutor(threads)
    results = {}
    for name in cases:
        batch, classes, side, per_image = CASES[name]
        gen = torch.Generator().manual_seed(0)
        probas = torch.randn(batch, classes, side, side, generator=gen).softmax(dim=1)
        labels = torch.randint(0, classes, (batch, side, side), generator=gen)
        other = torch.randn(batch, classes, side, side, generator=gen)  # the torch op's input
        segments = classes * (batch if per_image else 1)
        pixels = side * side * (1 if per_image else batch)
        rng = np.random.default_rng(1)
        keys = [(rng.integers(0, 2**32, pixels, dtype=np.uint64) << np.uint64(32))
                | np.arange(pixels, dtype=np.uint64) for _ in range(segments)]
        blocks = [keys[i::threads] for i in range(threads)]

        flat_scores = probas.reshape(batch, classes, -1)
        flat_labels = labels.reshape(batch, -1)
        plan = plan_segments(flat_labels, classes, "present", [], None, per_image, None, 0.0)

        def loss_call(probas=probas, labels=labels, per_image=per_image):
            scores = probas.clone().requires_grad_()
            lovasz_softmax(scores, labels, per_image=per_image, backend="numba").backward()

        def kernel_call(scores=flat_scores, labels=flat_labels, plan=plan):
            numba_cpu.lovasz_loss(scores, labels, plan)

        def torch_op(other=other):
            torch.softmax(other, dim=1)

        def floor(blocks=blocks):
            list(pool.map(lambda rows: [np.sort(row) for row in rows], blocks))

        def timed(function) -> float:
            start = time.perf_counter()
            function()
            return (time.perf_counter() - start) * 1e3

        loss_call(), kernel_call(), torch_op(), floor()
        samples = {"numba": [], "numba kernel": [], "torch op after numba": [],
                   "torch op after idle": [], "floor": []}
        for _ in range(rounds):
            torch_op()
            samples["numba"].append(timed(loss_call))
            torch_op()
            samples["numba kernel"].append(timed(kernel_call))
            samples["torch op after numba"].append(timed(torch_op))
            time.sleep(0.05)
            samples["torch op after idle"].append(timed(torch_op))
            samples["floor"].append(timed(floor))
        results[name] = samples
    choice = core.measured_sort_choice()
    results["sort choice"] = (None if choice is None else
                              {"host": core.SORT_NAMES[choice.host],
                               "kernel": core.SORT_NAMES[choice.kernel], **choice.times_ms})
    costs = numba_cpu._split_costs.get(core.thread_count())
    results["split costs"] = (None if costs is None else
                              {"pixels": numba_cpu.SPLIT_MEASURED_PIXELS, **costs._asdict()})
    return results


def _run_child(args: argparse.Namespace, env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", "--rounds", str(args.rounds), "--cases",
         *args.cases], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def _print_thread_scaling(args: argparse.Namespace) -> None:
    print(f"medians of {args.rounds} rounds, one process per numba thread count, ms")
    print(f"{'case':20s} {'threads':>7s} {'numba':>8s} {'kernel':>8s} {'floor':>8s} "
          f"{'numba / floor':>14s}")
    for count in args.numba_threads:
        env = dict(os.environ, NUMBA_NUM_THREADS=str(count))
        env.pop("OMP_WAIT_POLICY", None)
        results = _run_child(args, env)
        for case in args.cases:
            rows = {row: statistics.median(values) for row, values in results[case].items()}
            print(f"{case:20s} {count:7d} {rows['numba']:8.2f} {rows['numba kernel']:8.2f} "
                  f"{rows['floor']:8.2f} {rows['numba'] / rows['floor']:14.2f}")
        print(f"{'':20s} sort choice with {count} threads: {results['sort choice']}")
        print(f"{'':20s} split costs with {count} threads: {results['split costs']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--numba-threads", nargs="+", type=int, metavar="N",
                        help="one process per numba thread count instead of per policy")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.cases, args.rounds)))
        return
    if args.numba_threads:
        _print_thread_scaling(args)
        return
    merged: dict[str, dict[str, dict[str, list[float]]]] = {"default": {}, "passive": {}}
    for _ in range(2):
        for policy in merged:
            env = dict(os.environ)
            env.pop("OMP_WAIT_POLICY", None)
            if policy == "passive":
                env["OMP_WAIT_POLICY"] = "passive"
            results = _run_child(args, env)
            for case in args.cases:
                for row, values in results[case].items():
                    merged[policy].setdefault(case, {}).setdefault(row, []).extend(values)
    print(f"medians of {2 * args.rounds} rounds per policy (two processes each), ms")
    print(f"{'case':20s} {'policy':8s} {'numba':>8s} {'kernel':>8s} {'floor':>8s} "
          f"{'op after numba':>15s} {'op after idle':>14s}")
    for case in args.cases:
        medians = {}
        for policy in merged:
            rows = {row: statistics.median(values) for row, values in merged[policy][case].items()}
            medians[policy] = rows
            print(f"{case:20s} {policy:8s} {rows['numba']:8.2f} {rows['numba kernel']:8.2f} "
                  f"{rows['floor']:8.2f} {rows['torch op after numba']:15.2f} "
                  f"{rows['torch op after idle']:14.2f}")
        default, passive = medians["default"], medians["passive"]
        op_ratio = default["torch op after numba"] / default["torch op after idle"]
        print(f"{'':20s} default / passive: numba {default['numba'] / passive['numba']:.2f}, "
              f"kernel {default['numba kernel'] / passive['numba kernel']:.2f}, floor "
              f"{default['floor'] / passive['floor']:.2f}; numba / floor "
              f"{default['numba'] / default['floor']:.2f} default, "
              f"{passive['numba'] / passive['floor']:.2f} passive; torch op after numba / "
              f"after idle {op_ratio:.2f}")


if __name__ == "__main__":
    main()
