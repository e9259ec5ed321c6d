"""The numba backend's cold start: the first loss calls of a process with an empty numba cache.

    python tests/perf/cold_start.py [--runs 3] [--classes 21]

Each run starts a new Python with ``NUMBA_CACHE_DIR`` set to a new empty folder (the machine's
measured choices in ``~/.cache/lovasz_kernels`` stay: they take under a second) and times,
in it, the first ``lovasz_softmax`` call (forward + backward, one 64² image of ``--classes``
classes, float32), which compiles the kernels, then the first ``lovasz_hinge`` call, which
compiles those that read one channel's int64 labels. Prints both per run, in seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

_CHILD = """
import sys, time, torch
from lovasz_kernels import lovasz_hinge, lovasz_softmax
classes = int(sys.argv[1])
probas = torch.randn(1, classes, 64, 64).softmax(1).requires_grad_()
labels = torch.randint(0, classes, (1, 64, 64))
start = time.perf_counter()
lovasz_softmax(probas, labels, backend="numba").backward()
softmax = time.perf_counter() - start
logits = torch.randn(1, 64, 64, requires_grad=True)
start = time.perf_counter()
lovasz_hinge(logits, (torch.rand(1, 64, 64) < 0.5).long(), backend="numba").backward()
print(f"{softmax:.2f} {time.perf_counter() - start:.2f}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--classes", type=int, default=21)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1; got {args.runs}")
    if not 2 <= args.classes <= 254:
        parser.error(f"--classes must be from 2 to 254; got {args.classes}")
    _runs(args.runs, args.classes)


def _runs(runs: int, classes: int) -> None:
    print(f"first calls with an empty numba cache, {classes} classes, s")
    print(f"{'run':>4s} {'softmax':>8s} {'then hinge':>11s}")
    for run in range(1, runs + 1):
        with tempfile.TemporaryDirectory() as cache:
            done = subprocess.run([sys.executable, "-c", _CHILD, str(classes)],
                                  env={**os.environ, "NUMBA_CACHE_DIR": cache},
                                  capture_output=True, text=True, check=True)
        softmax, hinge = done.stdout.split()
        print(f"{run:4d} {float(softmax):8.2f} {float(hinge):11.2f}", flush=True)


if __name__ == "__main__":
    main()
