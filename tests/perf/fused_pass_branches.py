"""The Jaccard increments of a pass over sorted keys with a branch on each pixel's label, and
without, by the fraction of foreground pixels, in one process, rounds interleaved.

    python tests/perf/fused_pass_branches.py [--rounds 41] [--pixels 262144]

Each pass walks packed keys sorted as the numba backend sorts them (an error's order above
the pixel's offset and label), counts the foreground seen, takes
``_numba_core.jaccard_increment`` with ``branch_free`` False and True, scatters each
increment to its pixel and adds up error times increment: the numba backend's fused pass
reduced to what the choice changes. The keys' errors are uniform and their labels drawn at
random with the given fraction, so the label of the next sorted pixel is as unpredictable
as in a loss. Prints the medians, ms, and checks that both ways give the same bits.
``_numba_core.BRANCH_FREE_MIN_FRACTION`` is where the two cost the same.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

FRACTIONS = (1 / 32, 1 / 21, 1 / 16, 1 / 12, 1 / 8, 1 / 4, 1 / 2)


def _pass_kernel():
    from lovasz_kernels import _numba_core as core

    @core.njit(cache=False)
    def increments_pass(keys, grad, n_fg, branch_free):
        # as the backend's pass: unsigned offsets, the gradient's sign looked up by label
        signs = np.array([1.0, -1.0])
        fg_seen = 0
        loss = 0.0
        for k in range(keys.size):
            key = keys[k]
            offset = (key & np.uint64(0xFFFFFFFF)) >> np.uint64(1)
            is_fg = (key & np.uint64(1)) != 0
            fg_seen += np.int64(key & np.uint64(1))
            increment = core.jaccard_increment(n_fg, fg_seen, k + 1 - fg_seen, is_fg,
                                               branch_free)
            error = np.float64(core.float32_from_bits(
                np.uint32(np.uint64(0x7F800000) - (key >> np.uint64(32)))))
            grad[offset] = increment * signs[key & np.uint64(1)]
            loss += error * increment
        return loss

    return increments_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--pixels", type=int, default=1 << 18)
    args = parser.parse_args()
    increments_pass = _pass_kernel()
    rng = np.random.default_rng(0)
    count = args.pixels
    errors = rng.random(count, dtype=np.float32)
    order_bits = (np.uint64(0x7F800000) - errors.view(np.uint32).astype(np.uint64))
    print(f"{count} sorted keys; medians of {args.rounds} interleaved rounds, ms")
    print("foreground   branches   branch-free")
    for fraction in FRACTIONS:
        fg = rng.random(count) < fraction
        keys = np.sort((order_bits << np.uint64(32))
                       | (np.arange(count, dtype=np.uint64) << np.uint64(1))
                       | fg.astype(np.uint64))
        n_fg = int(fg.sum())
        grads = {False: np.zeros(count, np.float32), True: np.zeros(count, np.float32)}
        losses = {way: increments_pass(keys, grads[way], n_fg, way) for way in grads}
        if losses[False] != losses[True] or not np.array_equal(grads[False], grads[True]):
            raise SystemExit("the two ways differ: a bug in jaccard_increment")
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for way in times:
                start = time.perf_counter()
                increments_pass(keys, grads[way], n_fg, way)
                times[way].append(time.perf_counter() - start)
        branches, branch_free = (statistics.median(times[way]) * 1e3 for way in (False, True))
        print(f"1/{round(1 / fraction):<9}  {branches:8.3f}   {branch_free:8.3f}")


if __name__ == "__main__":
    main()
