"""How much CPU torch's idle OpenMP threads burn after one parallel torch op, and for how long.

    python tests/perf/omp_spin.py [--rounds 15] [--elements 4194304] [--window-ms 100]

After a parallel region, GNU OpenMP's idle threads spin before they sleep (unless
``OMP_WAIT_POLICY=passive``): for that long they hold cores that the numba backend's threads,
or any other threads, would run on. This measures it on the machine at hand, so that a
slowdown after torch ops can be told apart from the kernels' own speed.

Each wait policy gets a process of its own (libgomp reads it once, at load). In each, every
round sleeps 100 ms (every pool asleep), multiplies ``--elements`` floats into a kept array (a
parallel torch op), then sleeps ``--window-ms`` in 1 ms steps while reading the process's CPU time:
whatever it grows by, less the sleeping thread's own, is other threads' work, torch's spinning
ones. Prints the medians over the rounds: the CPU time burned in the window, the time from the
op's end to 95% of it (how long the spin lasted), and the op itself (after the 100 ms idle:
its wall time, the calling thread's CPU time in it and the other threads'; CPU times that add
up to the wall time mean the threads ran as if they took turns on one core).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

POLICIES = ("default", "passive")
#: share of the window's burned CPU time that marks the spin's end
SPAN_SHARE = 0.95
#: less than this burned (ms) is no spin: the clock's own noise
NO_SPIN_MS = 0.1


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def _measure(rounds: int, elements: int, window_ms: int) -> dict[str, list[float]]:
    """This process's samples, ms: burned CPU, spin span and op time, one per round."""
    import torch

    values = torch.randn(elements)
    result = torch.empty_like(values)

    def parallel_op():  # into the same array every time: no allocation, no page faults
        torch.mul(values, 2.0, out=result)

    parallel_op()  # warm-up: threads created, pages touched
    samples: dict[str, list[float]] = {"burned": [], "span": [], "op": [], "op, caller CPU": [],
                                       "op, others' CPU": []}
    for _ in range(rounds):
        time.sleep(0.1)
        own_start, all_start = time.thread_time(), time.process_time()
        start = time.perf_counter()
        parallel_op()
        op_end = time.perf_counter()
        own_used, all_used = time.thread_time() - own_start, time.process_time() - all_start
        others_before = time.process_time() - time.thread_time()
        trace = []  # (ms after the op, other threads' CPU ms so far)
        while (now := time.perf_counter()) - op_end < window_ms / 1e3:
            time.sleep(0.001)
            others = time.process_time() - time.thread_time() - others_before
            trace.append(((now - op_end) * 1e3, others * 1e3))
        burned = max(trace[-1][1], 0.0) if trace else 0.0  # the two clocks' rounding
        span = next((at for at, used in trace if used >= SPAN_SHARE * burned), 0.0)
        samples["burned"].append(burned)
        samples["span"].append(span if burned >= NO_SPIN_MS else 0.0)
        samples["op"].append((op_end - start) * 1e3)
        samples["op, caller CPU"].append(own_used * 1e3)
        samples["op, others' CPU"].append(max(all_used - own_used, 0.0) * 1e3)
    return samples


def _run_policy(policy: str, args: argparse.Namespace) -> dict[str, list[float]]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "passive"
    done = subprocess.run(
        [sys.executable, __file__, "--child", "--rounds", str(args.rounds), "--elements",
         str(args.elements), "--window-ms", str(args.window_ms)],
        capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=_positive_int, default=15)
    parser.add_argument("--elements", type=_positive_int, default=1 << 22,
                        help="floats of the torch op (default 4194304)")
    parser.add_argument("--window-ms", type=_positive_int, default=100,
                        help="how long after the op to watch (default 100)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.rounds, args.elements, args.window_ms)))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of "
          f"{args.rounds} rounds, ms; torch.mul on {args.elements} floats, then "
          f"{args.window_ms} ms watched")
    columns = ("burned", "span", "op", "op, caller CPU", "op, others' CPU")
    titles = ("burned CPU", "spin lasted", "op", "its CPU: caller", "others")
    print(f"{'policy':8s} " + " ".join(f"{title:>15s}" for title in titles))
    for policy in POLICIES:
        samples = _run_policy(policy, args)
        print(f"{policy:8s} " + " ".join(f"{statistics.median(samples[column]):15.2f}"
                                         for column in columns))


if __name__ == "__main__":
    main()
