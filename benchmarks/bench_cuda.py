"""GPU: fwd+bwd per contender, achieved GB/s, peak GPU memory, and the sort floor (asv).

Defined only where torch sees a CUDA device (asv lists nothing here otherwise). The numpy
reference does not run on GPU tensors; the floor is one ``torch.sort`` of the integer keys the
triton backend sorts, and ``track_achieved_bandwidth`` divides the byte model of
``lovasz_kernels.bench.floors.ideal_bytes`` by the median of CUDA-event timings.
"""

from __future__ import annotations

import statistics

from lovasz_kernels import bench
from lovasz_kernels.bench import floors, measure

from . import common

DEVICE = "cuda"
ROUNDS = 20  # timed calls per GB/s figure (median)
WORKLOADS = common.workloads("softmax", bench.CUDA_SUITE) + common.workloads(
    "hinge", bench.CUDA_SUITE)


def _synchronized(call):
    """asv times on the host: wait for the GPU so its time counts."""
    return lambda: measure.WallClock(DEVICE).measure(call)


class _CudaFwdBwd:
    """fwd+bwd on CUDA tensors: time, GB/s against the byte model, extra peak memory."""

    param_names = ["workload", "contender"]
    timeout = 300

    def setup(self, workload, contender):
        self.call = bench.warmed_call(workload, contender, DEVICE)
        self.timed = _synchronized(self.call)
        parsed = bench.Workload.parse(workload)
        self.bytes = floors.ideal_bytes(parsed.elements, parsed.pixels,
                                        parsed.torch_dtype.itemsize)

    def time_fwd_bwd(self, workload, contender):
        self.timed()

    def track_achieved_bandwidth(self, workload, contender):
        clock = measure.clock_for(DEVICE)
        times = measure.interleaved_times({"call": self.call}, ROUNDS, clock)["call"]
        return self.bytes / statistics.median(times) / 1e9

    track_achieved_bandwidth.unit = "GB/s"

    def track_peak_memory(self, workload, contender):
        meter, _ = measure.peak_meter_for(DEVICE)
        return meter.extra_peak_bytes(self.call) / 2**20

    track_peak_memory.unit = "MiB"


class _CudaSortFloor:
    """One ``torch.sort`` of the triton keys of each workload's segments."""

    param_names = ["workload"]
    timeout = 300

    def setup(self, workload):
        self.timed = _synchronized(bench.warmed_call(workload, bench.FLOOR, DEVICE))

    def time_sort(self, workload):
        self.timed()


if common.CUDA_AVAILABLE:
    class CudaLovaszLoss(_CudaFwdBwd):
        params = [WORKLOADS, common.contenders("softmax", DEVICE)]

    class CudaSortFloor(_CudaSortFloor):
        params = [WORKLOADS]
