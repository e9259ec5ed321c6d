"""GPU: ``lovasz_softmax`` fwd+bwd per backend, the sort floor, and achieved GB/s (asv).

Every combination raises ``NotImplementedError`` (skipped) without a CUDA device. The numpy
reference does not run here (it is a CPU oracle); ``torch.sort`` of the same (S, P) float32
keys is timed as the floor, and ``track_achieved_bandwidth`` reports GB/s against the byte model
of ``lovasz_kernels._baselines.ideal_bytes`` (an ideal key build + one sort pass + post-sort
pass; the sort floor's row counts one pass over its keys).
"""

from __future__ import annotations

import statistics
import time

import torch

import lovasz_kernels

from . import common

ROUNDS = 20  # timed calls per GB/s figure (median)


class CudaLovaszSoftmax:
    """``lovasz_softmax`` forward + backward on CUDA tensors."""

    params = [common.PIXELS, common.CLASSES, common.GPU_BACKENDS, common.PER_IMAGE,
              common.DTYPES]
    param_names = ["pixels", "classes", "backend", "per_image", "dtype"]
    timeout = 180

    def setup(self, pixels, classes, backend, per_image, dtype):
        common.require(backend, "cuda", pixels, classes, per_image)
        probas, labels = common.softmax_inputs(pixels, classes, dtype, "cuda")
        num_segments, segment_pixels = common.segments(pixels, classes, per_image)
        if backend == common.SORT_FLOOR:
            keys = common.sort_keys(num_segments, segment_pixels, "cuda")
            self.call = lambda: torch.sort(keys, dim=1, descending=True)
            self.bytes = 16 * keys.numel()  # one pass: read keys, write keys + int64 indices
        else:
            if backend == common.LOOP:
                def loss(scores):
                    return common.loop_softmax(scores, labels, per_image)
            else:
                def loss(scores):
                    return lovasz_kernels.lovasz_softmax(scores, labels, per_image=per_image,
                                                         backend=backend)
            self.call = lambda: loss(probas.detach().requires_grad_()).backward()
            self.bytes = common.ideal_bytes(num_segments * segment_pixels, pixels,
                                            probas.element_size())
        self.call()
        torch.cuda.synchronize()

    def time_fwd_bwd(self, *params):
        self.call()
        torch.cuda.synchronize()

    def track_achieved_bandwidth(self, *params):
        seconds = []
        for _ in range(ROUNDS):
            torch.cuda.synchronize()
            start = time.perf_counter()
            self.call()
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        return self.bytes / statistics.median(seconds) / 1e9

    track_achieved_bandwidth.unit = "GB/s"

    def track_peak_gpu_memory(self, *params):
        torch.cuda.reset_peak_memory_stats()
        self.call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20

    track_peak_gpu_memory.unit = "MiB"
