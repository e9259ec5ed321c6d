"""Fwd+bwd of the losses and the bare kernel on the CPU, and the sort floor (asv)."""

from __future__ import annotations

from lovasz_kernels import bench, set_chunk_floor

from . import common


class _FwdBwd:
    """``time_fwd_bwd`` and ``peakmem_fwd_bwd`` of one (workload, contender) pair."""

    param_names = ["workload", "contender"]
    timeout = 300

    def setup(self, workload, contender):
        self.call = bench.warmed_call(workload, contender)  # JIT compilation is not timed

    def time_fwd_bwd(self, workload, contender):
        self.call()

    def peakmem_fwd_bwd(self, workload, contender):
        self.call()


class LovaszSoftmax(_FwdBwd):
    """``lovasz_softmax`` forward + backward (mean over present classes)."""

    params = [common.workloads("softmax"), common.contenders("softmax")]


class LovaszHinge(_FwdBwd):
    """``lovasz_hinge`` forward + backward."""

    params = [common.workloads("hinge"), common.contenders("hinge")]


class LovaszExtension(_FwdBwd):
    """The bare kernel ``lovasz_extension(errors, fg)`` on a softmax workload's (S, P) errors:
    it returns the loss and the gradient in one call, so this is the kernel's fwd+bwd."""

    params = [common.workloads("extension"), common.contenders("extension")]


class MemoryFirst:
    """The backends that keep a floor (numba, torch) with the CPU floor set to 0
    (``set_chunk_floor("cpu", 0)``: kept strictly, memory before speed) on the loss workloads:
    the standard workloads' forward + backward within twice their input, and what that costs
    in time."""

    params = [common.workloads("softmax") + common.workloads("hinge"),
              common.floor_keeping_backends()]
    param_names = ["workload", "backend"]
    timeout = 300

    def setup(self, workload, backend):
        set_chunk_floor("cpu", 0)
        self.call = bench.warmed_call(workload, backend)

    def teardown(self, workload, backend):
        set_chunk_floor("cpu", None)

    def time_fwd_bwd(self, workload, backend):
        self.call()

    def peakmem_fwd_bwd(self, workload, backend):
        self.call()


class SortFloor:
    """``np.sort`` of as many packed uint64 keys as each workload's loss sorts, segments
    spread over the available threads: the CPU floor of the tables above."""

    # the bare kernel's workloads sort the same keys as the softmax ones of their shape
    params = [common.workloads("softmax") + common.workloads("hinge")]
    param_names = ["workload"]
    timeout = 300

    def setup(self, workload):
        self.floor = bench.warmed_call(workload, bench.FLOOR)

    def teardown(self, workload):
        self.floor.close()

    def time_sort(self, workload):
        self.floor()
