"""Which contenders run here, and which calls are skipped as too slow.

One rule for every harness. A backend runs when it is available and accepts the device; by
default only natively (the Triton interpreter runs on a CPU for tests, not for timings). A
call is skipped when its estimated time exceeds the budget: estimated from the contender's
last measured call on a smaller workload (scaled by :func:`relative_work`) when there is one,
else from a fixed cost model of the two slow contenders (the numpy reference and the per-class
loop), fitted on the 2-core development machine and conservative there. The model is
deterministic, so the asv suite enumerates the same combinations on every machine.
"""

from __future__ import annotations

import math

from lovasz_kernels._registry import get_backend, registered_backends
from lovasz_kernels.bench.workloads import LOOP, TORCH_FLOAT64, Workload

REFERENCE = "numpy"
#: seconds per S·P·log2(P) of the numpy reference's fwd+bwd (measured 1.3–1.6e-8)
REFERENCE_S_PER_SORTED_ELEMENT = 2e-8
#: seconds per C²·pixels of the per-class loop's backward, which writes a (pixels, C) gradient
#: for each of the C classes
LOOP_S_PER_GRAD_ELEMENT = 2e-9
#: budget of one call (seconds) unless a harness says otherwise
DEFAULT_BUDGET_S = 10.0
#: the numpy reference is the cross-check where it should take at most this long; above it,
#: the torch backend in float64 on the benchmark's device
REFERENCE_CHECK_S = 3.0


def backend_problem(name: str, device_type: str, *, native_only: bool = True) -> str | None:
    """None when backend ``name`` can run on ``device_type`` here, else why it cannot.

    ``native_only``: also refuse a device the backend reaches only through an interpreter.
    Unknown names raise ``ValueError`` listing the registered ones.
    """
    backend = get_backend(name)
    available, reason = backend.availability()
    if not available:
        return reason
    if device_type not in backend.supported_devices():
        return f"{name} does not run on {device_type}"
    if native_only and device_type not in backend.devices:
        return (f"{name} runs on {device_type} only through an interpreter, for tests "
                "(name it in --backend to time it anyway)")
    return None


def backend_flag_problem(name: str, device_type: str) -> str | None:
    """:func:`backend_problem` for a script's ``--backend`` flag, where an unknown name is
    refused like any other: its message (listing the registered names), not an exception."""
    try:
        return backend_problem(name, device_type)
    except ValueError as exc:
        return str(exc)


def runnable_backends(device_type: str) -> list[str]:
    """Registered backends that run natively on ``device_type`` here, in priority order."""
    return [n for n in registered_backends() if backend_problem(n, device_type) is None]


def standard_contenders(loss: str, device_type: str, *, reference: bool = False) -> list[str]:
    """What the asv suite and ``tests/perf`` time on a workload of ``loss``: the backends that
    run natively on ``device_type``, the numpy reference only with ``reference`` (an oracle,
    not something to pick for speed), then the per-class loop for the losses."""
    backends = [b for b in runnable_backends(device_type) if reference or b != REFERENCE]
    return backends + ([] if loss == "extension" else [LOOP])


def relative_work(contender: str, workload: Workload) -> float:
    """Relative cost of a call, to scale a measured time to another workload."""
    sort_work = workload.elements * math.log2(max(workload.segment_pixels, 2))
    if contender == LOOP and workload.loss == "softmax":
        return sort_work + workload.pixels * workload.classes ** 2
    return sort_work


def modelled_seconds(contender: str, workload: Workload, device_type: str) -> float | None:
    """The cost model: seconds for the numpy reference (always on the CPU) and for the loop
    on the CPU; None for every other contender (fast, or not modelled)."""
    sort_work = workload.elements * math.log2(max(workload.segment_pixels, 2))
    if contender == REFERENCE:
        return REFERENCE_S_PER_SORTED_ELEMENT * sort_work
    if contender == LOOP and device_type == "cpu":
        grad_work = workload.pixels * workload.classes ** 2 if workload.loss == "softmax" else 0
        return REFERENCE_S_PER_SORTED_ELEMENT * sort_work + LOOP_S_PER_GRAD_ELEMENT * grad_work
    return None


class Budget:
    """Skips calls estimated to take longer than ``seconds``."""

    def __init__(self, seconds: float = DEFAULT_BUDGET_S, device_type: str = "cpu"):
        if math.isnan(seconds) or seconds < 0:
            raise ValueError(f"budget must be a number of seconds >= 0; got {seconds}")
        self.seconds = seconds
        self.device_type = device_type
        self._measured: dict[str, tuple[float, float]] = {}  # contender -> (work, seconds)

    def record(self, contender: str, workload: Workload, seconds: float) -> None:
        """Remember a measured call: later estimates scale from the largest one so far."""
        work = relative_work(contender, workload)
        if contender not in self._measured or work >= self._measured[contender][0]:
            self._measured[contender] = (work, seconds)

    def estimate(self, contender: str, workload: Workload) -> float | None:
        if contender in self._measured:
            work, seconds = self._measured[contender]
            return seconds * relative_work(contender, workload) / work
        return modelled_seconds(contender, workload, self.device_type)

    def skip_reason(self, contender: str, workload: Workload) -> str | None:
        """None when the call fits the budget (or cannot be estimated), else why it is skipped."""
        guess = self.estimate(contender, workload)
        if guess is None or guess <= self.seconds:
            return None
        return f"estimated {guess:.1f} s per call > budget {self.seconds:g} s"

    def reference_for_check(self, workload: Workload, *, reference_timed: bool) -> str:
        """The cross-check's answer: the numpy reference where it is cheap enough (or timed
        anyway, ``reference_timed``, and within the budget), else :data:`TORCH_FLOAT64`."""
        if reference_timed and self.skip_reason(REFERENCE, workload) is None:
            return REFERENCE
        guess = self.estimate(REFERENCE, workload)
        return REFERENCE if guess is not None and guess <= REFERENCE_CHECK_S else TORCH_FLOAT64
