"""Timing and peak memory, apart from what is timed.

Interleaved rounds: every round calls each contender once, in turn, so all of them see the
same machine noise (a busy neighbour, frequency changes); their ratios hold up on a noisy
machine even when absolute times drift. The clock is a parameter: wall time (CUDA synchronized
around each call) or CUDA events, so the logic runs and is tested without a GPU.

Peak memory: the extra memory one call needs over what exists before it (its inputs, and
whatever the process already holds), measured once per contender after the warm-up call.
CPU: peak resident set size (Linux: reset with ``/proc/self/clear_refs``, read as ``VmHWM``);
CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``). The arrays that
CPU calls keep between them (numba's sort keys and radix buffers, the torch backend's small
work arrays: :mod:`lovasz_kernels._scratch`) are released first, so the peak counts them as
the call's: kept from the warm-up call, they would be in the baseline, and a call that needs
several times its input would look as if it needed none.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from collections.abc import Callable
from typing import Protocol

import torch

from lovasz_kernels._scratch import release_kept

# --------------------------------------------------------------------------------------------
# clocks


class Clock(Protocol):
    name: str

    def measure(self, call: Callable[[], object]) -> Callable[[], float]:
        """Run ``call`` once; return a function giving its time in seconds (read it later,
        so a GPU clock need not wait for the device between calls)."""


class WallClock:
    """``time.perf_counter`` around the call, the device synchronized before and after."""

    def __init__(self, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self.name = "wall clock" + (", CUDA synchronized" if device.type == "cuda" else "")
        self._sync: Callable[[], None] = (
            (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        )

    def measure(self, call: Callable[[], object]) -> Callable[[], float]:
        self._sync()
        start = time.perf_counter()
        call()
        self._sync()
        elapsed = time.perf_counter() - start
        return lambda: elapsed


class CudaEventClock:
    """CUDA events recorded around the call on the current stream.

    The device is synchronized before each call, so the host's launch overhead (large for
    the per-class loop) is inside the measured span rather than hidden behind queued work.
    ``event`` and ``synchronize`` are injectable for tests without a GPU.
    """

    name = "CUDA events"

    def __init__(self, device: torch.device | str = "cuda",
                 event: Callable[..., object] | None = None,
                 synchronize: Callable[[], None] | None = None):
        device = torch.device(device)
        self._event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self._sync = synchronize or (lambda: torch.cuda.synchronize(device))

    def measure(self, call: Callable[[], object]) -> Callable[[], float]:
        start, end = self._event(), self._event()
        self._sync()
        start.record()
        call()
        end.record()

        def read() -> float:
            end.synchronize()
            return start.elapsed_time(end) / 1e3  # ms -> s

        return read


def clock_for(device: torch.device | str) -> Clock:
    """CUDA events on a CUDA device, the wall clock elsewhere."""
    return CudaEventClock(device) if torch.device(device).type == "cuda" else WallClock(device)


def interleaved_times(
    calls: dict[str, Callable[[], object]], repeat: int, clock: Clock,
    after_round: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """``repeat`` rounds, each calling every entry of ``calls`` once in order: seconds per call."""
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1; got {repeat}")
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        pending = {name: clock.measure(call) for name, call in calls.items()}
        for name, read in pending.items():
            times[name].append(read())
        if after_round is not None:
            after_round()
    return times


def time_after(call: Callable[[], object], before: Callable[[], object],
               clock: Clock | None = None) -> float:
    """Seconds ``call()`` takes right after ``before()`` (a torch op, as a training step's
    last op before the loss), ``before`` not timed; the wall clock unless ``clock`` is given."""
    before()
    return (clock or WallClock()).measure(call)()


# --------------------------------------------------------------------------------------------
# peak memory

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"
_RESET_PEAK_RSS = "5"  # clear_refs command: reset VmHWM (peak RSS) to the current RSS


class PeakMeter(Protocol):
    name: str

    def extra_peak_bytes(self, call: Callable[[], object]) -> int:
        """Peak memory during ``call`` minus the memory in use just before it."""


def _status_kib(field: str, path: str = _STATUS) -> int:
    with open(path, encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{path} has no {field} line")


def _release_free_heap() -> None:
    """Collect garbage and hand free heap pages back to the OS (glibc), so the baseline RSS
    is what is in use, not what an earlier call freed but the allocator kept."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(None).malloc_trim(0)


class RssPeakMeter:
    """Extra peak resident memory of a call, what calls keep between them released first
    (Linux: ``clear_refs`` resets ``VmHWM``)."""

    name = ("peak RSS over the RSS before the call, kept scratch released first (Linux VmHWM, "
            "reset via /proc/self/clear_refs)")

    def __init__(self, clear_refs: str | None = None, status: str | None = None):
        self._clear_refs = clear_refs or _CLEAR_REFS
        self._status = status or _STATUS

    def _reset(self) -> None:
        with open(self._clear_refs, "w", encoding="ascii") as handle:
            handle.write(_RESET_PEAK_RSS)

    def unavailable_reason(self) -> str | None:
        """None when peaks can be measured here, else why not."""
        try:
            self._reset()
            _status_kib("VmHWM", self._status)
            _status_kib("VmRSS", self._status)
        except OSError as exc:
            return f"peak RSS cannot be reset here ({exc}): needs Linux's {_CLEAR_REFS}"
        return None

    def extra_peak_bytes(self, call: Callable[[], object]) -> int:
        release_kept()
        _release_free_heap()
        self._reset()
        before = _status_kib("VmRSS", self._status)
        call()
        peak = _status_kib("VmHWM", self._status)
        return max(peak - before, 0) * 1024


class CudaPeakMeter:
    """Extra peak of the CUDA caching allocator during a call."""

    name = "torch.cuda.max_memory_allocated over memory_allocated before the call"

    def __init__(self, device: torch.device | str = "cuda"):
        self.device = torch.device(device)

    def extra_peak_bytes(self, call: Callable[[], object]) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        call()
        torch.cuda.synchronize(self.device)
        return max(torch.cuda.max_memory_allocated(self.device) - before, 0)


class TorchAllocationPeakMeter:
    """Peak bytes held by tensors that torch's CPU allocator hands out during a call.

    torch's profiler records every allocation and free; the running sum's maximum is what
    the call needs, deterministic and free of the heap fragmentation that a peak RSS adds
    (it is what ``torch.cuda.max_memory_allocated`` reports for the same code on a GPU).
    numpy arrays are not counted: for the torch backend, not for numpy or numba. Work arrays
    kept between calls are released first (as by :class:`RssPeakMeter`).
    """

    name = "peak of torch's CPU allocations during the call (profiler allocation records)"

    def extra_peak_bytes(self, call: Callable[[], object]) -> int:
        from torch.profiler import ProfilerActivity, profile

        release_kept()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
        changes = sorted((event.start_ns(), event.nbytes())
                         for event in prof.profiler.kineto_results.events()
                         if event.name() == "[memory]")
        live = peak = 0
        for _, change in changes:
            live += change
            peak = max(peak, live)
        return peak


class NumpyAllocationPeakMeter:
    """The peak of the memory that ``tracemalloc`` traces during a call (numpy reports its
    arrays' data to it, from every thread; Python objects count too), kept arrays released
    first: what :class:`TorchAllocationPeakMeter` does not see."""

    name = "peak of numpy's allocations during the call (tracemalloc)"

    def extra_peak_bytes(self, call: Callable[[], object]) -> int:
        import tracemalloc

        release_kept()
        tracemalloc.start()
        try:
            call()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()


def peak_meter_for(device: torch.device | str) -> tuple[PeakMeter | None, str]:
    """(meter, how it measures) for ``device``; (None, why not) where it cannot measure."""
    if torch.device(device).type == "cuda":
        meter = CudaPeakMeter(device)
        return meter, meter.name
    rss = RssPeakMeter()
    reason = rss.unavailable_reason()
    return (None, reason) if reason else (rss, rss.name)
