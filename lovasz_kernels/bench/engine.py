"""The benchmark driver: for each workload, cross-check, time in interleaved rounds, measure
peak memory, and hand back one JSON-ready record.

Per workload: each contender runs once (warm-up, and the cross-check against the numpy
reference or, where that would take more than a few seconds, the torch backend in float64 on
the same device); a contender that disagrees is not timed. Then every contender that passed,
the per-class loop and the sort floor are timed in interleaved rounds (small inputs on
:data:`INPUT_SETS` seeded sets in turn, as training sees new ones every step; the floor on
the first), and each one's extra peak memory is measured in one more call. Nothing here
prints: the caller gets each record through ``on_result`` and formats it
(:mod:`lovasz_kernels.bench.report`).

Layout: ``"cpu"`` (the floor is a threaded ``np.sort``; the numpy reference is a timed
contender) or ``"gpu"`` (the floor is ``torch.sort`` of the triton keys; the reference only
cross-checks; bytes for GB/s are recorded). It follows the device unless set, so the GPU
layout's logic can be run on CPU tensors.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from lovasz_kernels import _cases
from lovasz_kernels.bench import floors, measure
from lovasz_kernels.bench.rules import DEFAULT_BUDGET_S, REFERENCE, Budget
from lovasz_kernels.bench.workloads import FLOOR, LOOP, SEED, Prepared, Workload

LOOP_STATUS = "reported, not checked (float counts)"
FLOOR_STATUS = "a sort, not checked"
#: Inputs of at most ``ROTATED_MAX_INPUT_BYTES`` are timed on this many seeded sets in turn,
#: every contender on the same set in a round: a comparison sort of the few thousand keys it
#: sorted in its previous call runs 2-4x faster (the branch predictor has learnt them), which
#: training, with new inputs every step, never sees (one 4096-key row on the development VM:
#: 53 us sorted over and over, 180 us new). Larger sorts are not learnt.
INPUT_SETS = 4
ROTATED_MAX_INPUT_BYTES = 16 << 20


@dataclass
class Settings:
    """What to run: ``backends`` are timed (``numpy`` only in the CPU layout), next to the
    per-class loop and the sort floor."""

    workloads: Sequence[Workload]
    backends: Sequence[str]
    device: torch.device | str = "cpu"
    repeat: int = 5
    budget_s: float = DEFAULT_BUDGET_S
    layout: str | None = None
    measure_memory: bool = True

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.layout is None:
            self.layout = "gpu" if self.device.type == "cuda" else "cpu"
        if self.layout not in ("cpu", "gpu"):
            raise ValueError(f"layout must be 'cpu' or 'gpu'; got {self.layout!r}")
        if self.repeat < 1:
            raise ValueError(f"repeat must be at least 1; got {self.repeat}")

    @property
    def contenders(self) -> list[str]:
        backends = [b for b in self.backends if self.layout == "cpu" or b != REFERENCE]
        return [*backends, LOOP, FLOOR]


class _Silent:
    def update(self, steps: int = 1, status: str | None = None) -> None:
        pass

    def say(self, message: str) -> None:
        pass


def steps(settings: Settings) -> int:
    """Progress steps of :func:`run`: one per check, timed round and memory pass."""
    return len(settings.workloads) * (settings.repeat + 2)


def run(settings: Settings, on_result: Callable[[dict], None] | None = None,
        progress=None, clock: measure.Clock | None = None,
        meter: measure.PeakMeter | None = None) -> list[dict]:
    """Benchmark every workload (smallest first); returns their records in that order.

    ``progress`` has ``update(steps, status)`` and ``say(message)`` (skips are said there);
    ``clock`` defaults to CUDA events on a CUDA device, the wall clock elsewhere; ``meter``
    to the device's peak meter when ``settings.measure_memory`` (none where it cannot
    measure).
    """
    progress = progress or _Silent()
    clock = clock or measure.clock_for(settings.device)
    if meter is None and settings.measure_memory:
        meter, _ = measure.peak_meter_for(settings.device)
    budget = Budget(settings.budget_s, settings.device.type)
    results = []
    for workload in sorted(settings.workloads, key=lambda w: (w.elements, w.classes)):
        progress.update(0, workload.name)
        result = _run_workload(workload, settings, budget, clock, meter, progress)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def failures(results: Sequence[dict]) -> int:
    """Contenders that disagreed with the cross-check or raised."""
    return sum(entry["status"].startswith(("MISMATCH", "ERROR"))
               for result in results for entry in result["contenders"].values())


def _run_workload(workload: Workload, settings: Settings, budget: Budget,
                  clock: measure.Clock, meter, progress) -> dict:
    prepared = Prepared(workload, settings.device)
    errors, fg = prepared.sorted_segments()
    result = {**workload.key(), "sorted_segments": errors.shape[0],
              "input_bytes": prepared.input_bytes, "contenders": {}}
    if settings.layout == "gpu":
        result["bytes_model"] = {
            "ideal": floors.ideal_bytes(errors.numel(), workload.pixels,
                                        prepared.scores.element_size()),
            "floor": floors.SORT_PASS_BYTES * errors.numel(),
        }

    contenders = settings.contenders
    check = _CrossCheck(prepared, budget.reference_for_check(
        workload, reference_timed=REFERENCE in contenders))
    result["reference"] = check.reference
    if check.reference == REFERENCE:
        budget.record(REFERENCE, workload, check.seconds)

    rotation = _InputRotation(prepared)
    with ExitStack() as cleanup:
        calls: dict[str, Callable[[], object]] = {}
        for name in contenders:
            if name == LOOP and workload.loss == "extension":
                continue  # the loop is a loss; the kernel has no loop to compare with
            entry: dict = {"samples_s": [], "median_s": None}
            result["contenders"][name] = entry
            reason = budget.skip_reason(name, workload)
            if reason:
                entry["status"] = f"skipped: {reason}"
                progress.say(f"skipping {name} at {workload.name}: {reason}")
                continue
            if name == FLOOR:
                calls[name] = _floor_call(settings.layout, errors, fg, cleanup)
                calls[name]()  # warm-up
                entry["status"] = FLOOR_STATUS
                continue
            entry.update(check.run(name))  # also the warm-up
            if entry["status"] in ("ok", "reference", LOOP_STATUS):  # a wrong answer has no speed
                calls[name] = lambda name=name: rotation.current().fwd_bwd(name)
            else:
                progress.say(f"{name} at {workload.name}: {entry['status']}")
        progress.update(1)

        def after_round() -> None:
            rotation.advance()
            progress.update()

        times = measure.interleaved_times(calls, settings.repeat, clock, after_round=after_round)
        for name, samples in times.items():
            entry = result["contenders"][name]
            entry["samples_s"] = samples
            entry["median_s"] = statistics.median(samples)
            budget.record(name, workload, entry["median_s"])
        if meter is not None:
            for name, call in calls.items():
                if name != FLOOR:
                    result["contenders"][name]["peak_bytes"] = meter.extra_peak_bytes(call)
        progress.update(1)
    return result


class _InputRotation:
    """The input sets a workload is timed on (the first is the cross-checked one): one, or
    :data:`INPUT_SETS` when its input is small, the current one advanced each round."""

    def __init__(self, first: Prepared):
        self.sets = [first]
        if first.input_bytes <= ROTATED_MAX_INPUT_BYTES:
            self.sets += [Prepared(first.workload, first.device, seed=SEED + offset)
                          for offset in range(1, INPUT_SETS)]
        self.index = 0

    def current(self) -> Prepared:
        return self.sets[self.index]

    def advance(self) -> None:
        self.index = (self.index + 1) % len(self.sets)


class _CrossCheck:
    """The cross-check's answer for a workload, and each contender's comparison with it.

    Gradients are compared per tie group (see ``Prepared.tie_group_sums``), each group's total
    against the sum of its members' tolerances.
    """

    def __init__(self, prepared: Prepared, reference: str):
        self.prepared = prepared
        self.reference = reference
        start = time.perf_counter()
        self.loss, self.grad = prepared.reference(reference)
        self.seconds = time.perf_counter() - start
        dtype = prepared.workload.torch_dtype
        self.groups = prepared.tie_group_sums(self.grad)
        self.group_tol = prepared.tie_group_tolerance(self.grad, _cases.GRAD_TOLERANCE[dtype])
        self.loss_tol = _cases.LOSS_TOLERANCE[dtype]

    def run(self, name: str) -> dict:
        """Run contender ``name`` once: its status and deviations from the answer."""
        if name == self.reference:
            loss, grad = self.loss, self.grad  # the reference's own first call
        else:
            try:
                loss, grad = self.prepared.fwd_bwd(name)
            except Exception as exc:  # report and go on: one broken backend spoils no table
                return {"status": f"ERROR: {type(exc).__name__}: {exc}"}
        groups = self.prepared.tie_group_sums(grad)
        bad_loss = int(_cases.mismatches(loss, self.loss, self.loss_tol).sum())
        bad_grad = int(((groups - self.groups.to(groups.device)).abs()
                        > self.group_tol.to(groups.device)).sum())
        if name == LOOP:
            # float cumulative counts and cancelling differences: reported, not held to the
            # backends' tolerance
            status = LOOP_STATUS
        elif name == self.reference:
            status = "reference"
        elif bad_loss or bad_grad:
            status = f"MISMATCH ({bad_loss} loss, {bad_grad} grad entries)"
        else:
            status = "ok"
        return {"status": status,
                "max_abs_loss_deviation": _cases.max_deviation(loss, self.loss),
                "max_abs_grad_deviation": _cases.max_deviation(groups, self.groups)}


def _floor_call(layout: str, errors: torch.Tensor, fg: torch.Tensor,
                cleanup: ExitStack | None) -> Callable[[], object]:
    """The layout's floor for these segments; a CPU floor's threads stop with ``cleanup``."""
    if layout == "gpu":
        return floors.cuda_sort_floor(errors, fg)
    floor = floors.CpuSortFloor(errors.shape[0], errors.shape[1])
    return floor if cleanup is None else cleanup.enter_context(floor)


class OverBudget(NotImplementedError):
    """A call the cost model puts above the budget (asv reports ``NotImplementedError`` as
    ``n/a``)."""


def warmed_call(workload: Workload | str, contender: str, device: torch.device | str = "cpu",
                budget_s: float = DEFAULT_BUDGET_S) -> Callable[[], object]:
    """One contender's call on a workload, already run once, for harnesses that time calls
    themselves (asv, pytest-benchmark): a fwd+bwd, or the device's sort floor.

    Raises :class:`OverBudget` when the cost model puts the call above ``budget_s``. The CPU
    floor holds a thread pool: call its ``close()`` when done (or let the process end).
    """
    if isinstance(workload, str):
        workload = Workload.parse(workload)
    device = torch.device(device)
    reason = Budget(budget_s, device.type).skip_reason(contender, workload)
    if reason:
        raise OverBudget(reason)
    prepared = Prepared(workload, device)
    if contender == FLOOR:
        call = _floor_call("gpu" if device.type == "cuda" else "cpu",
                           *prepared.sorted_segments(), cleanup=None)
    else:
        def call() -> object:
            return prepared.fwd_bwd(contender)
    call()
    return call
