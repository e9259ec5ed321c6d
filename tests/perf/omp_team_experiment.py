"""An experiment, not a feature: the numba tasks run on torch's own OpenMP team.

    python tests/perf/omp_team_experiment.py [--rounds 15] [--scratch-per-os-thread]

Linux, a torch built with GNU OpenMP only. After any parallel torch op, torch's idle OpenMP
threads spin for milliseconds; the numba backend's pool threads then share a core with them.
Here ``run_tasks`` is swapped for one that calls that runtime's ``GOMP_parallel`` with a
ctypes callback: the spinning threads themselves take the tasks (the same hand-out as the
pool's, so a thread that starts late takes nothing). Both variants are timed in interleaved
rounds, each call right after a torch op, as in a training step, and the medians printed.

What it leaves out, and why it is not the backend's code: scratch arrays are per Python
thread, and a callback thread's state lasts one call, so tasks on the OpenMP threads get fresh
scratch every call (``--scratch-per-os-thread`` keys the scratch by the OS thread instead, for
every variant); several Python threads calling at once, ``fork``, ``torch.set_num_threads``
and other OpenMP runtimes are not handled.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import statistics
import sys
import time


def _torch_gomp():
    """torch's GNU OpenMP library as loaded in this process, or None."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            found = re.findall(r"\S*/torch/lib/libgomp\S*", maps.read())
    except OSError:
        return None
    return ctypes.CDLL(found[0]) if found else None


class _ScratchPerOsThread:
    """Stands in for the scratch module's ``threading.local``: attributes kept per OS thread,
    so an OpenMP thread finds its arrays again on its next callback."""

    def __init__(self):
        object.__setattr__(self, "_by_thread", {})

    def __getattr__(self, name):
        import threading

        return self._by_thread.get((threading.get_native_id(), name))

    def __setattr__(self, name, value):
        import threading

        self._by_thread[(threading.get_native_id(), name)] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--scratch-per-os-thread", action="store_true")
    args = parser.parse_args()
    if args.scratch_per_os_thread:
        from lovasz_kernels import _scratch

        _scratch._cache = _ScratchPerOsThread()

    import torch

    from lovasz_kernels import _numba_core as core
    from lovasz_kernels import lovasz_extension, lovasz_hinge, lovasz_softmax

    gomp = _torch_gomp()
    if gomp is None or not hasattr(gomp, "GOMP_parallel"):
        sys.exit("needs Linux and a torch whose OpenMP runtime is GNU libgomp")
    callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    gomp.GOMP_parallel.argtypes = [callback_type, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    gomp.GOMP_parallel.restype = None
    running: dict[str, object] = {}
    take_tasks = callback_type(lambda _: running["work"].run_untaken())

    def run_tasks_on_omp_team(function, tasks):
        if len(tasks) == 1:
            return [function(*tasks[0])]
        work = core._TaskList(function, tasks)
        running["work"] = work
        gomp.GOMP_parallel(take_tasks, None, min(len(tasks), core.thread_count()), 0)
        work.wait()
        for error in work.errors:
            if error is not None:
                raise error
        return work.results

    variants = {"pool": core.run_tasks, "omp team": run_tasks_on_omp_team}
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 512, 512, generator=gen)
    masks = (torch.rand(1, 512, 512, generator=gen) < 0.3).long()
    errors = torch.randn(1, 512 * 512, generator=gen)
    fg = torch.rand(1, 512 * 512, generator=gen) < 0.3

    def softmax_inputs(batch, classes, side):
        probas = torch.randn(batch, classes, side, side, generator=gen).softmax(dim=1)
        return probas, torch.randint(0, classes, (batch, side, side), generator=gen)

    small, two_classes, batch21, images21 = (softmax_inputs(8, 5, 64), softmax_inputs(1, 2, 1024),
                                            softmax_inputs(1, 21, 512), softmax_inputs(4, 21, 256))

    def softmax_call(inputs, per_image):
        probas, labels = inputs
        return lambda: lovasz_softmax(probas.clone().requires_grad_(), labels,
                                      per_image=per_image, backend="numba").backward()

    calls = {
        "hinge 512², fwd+bwd": lambda: lovasz_hinge(
            logits.clone().requires_grad_(), masks, backend="numba").backward(),
        "extension, 262k pixels": lambda: lovasz_extension(errors, fg, backend="numba"),
        "8 x 64² x 5 per image": softmax_call(small, True),
        "1024² x 2": softmax_call(two_classes, False),
        "512² x 21": softmax_call(batch21, False),
        "4 x 256² x 21 per image": softmax_call(images21, True),
    }
    model_op_input = torch.randn(4, 64, 128, 128, generator=gen)

    def use(variant):
        core.run_tasks = variants[variant]

    samples = {(variant, name): [] for variant in variants for name in calls}
    try:
        for variant in variants:  # compile or load, warm up
            use(variant)
            for call in calls.values():
                call()
                call()
        for _ in range(args.rounds):
            for variant in variants:
                use(variant)
                for name, call in calls.items():
                    torch.relu(model_op_input)  # untimed: torch's team spins after it
                    start = time.perf_counter()
                    call()
                    samples[(variant, name)].append(time.perf_counter() - start)
    finally:
        use("pool")
    print(f"medians of {args.rounds} interleaved rounds, ms")
    for name in calls:
        cells = "  ".join(f"{variant} {statistics.median(samples[(variant, name)]) * 1e3:7.2f}"
                          for variant in variants)
        print(f"{name:26s} {cells}")


if __name__ == "__main__":
    main()
