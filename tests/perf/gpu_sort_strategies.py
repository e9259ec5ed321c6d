"""Time the triton backend's sort strategies on one CUDA GPU, in one process.

For float32 and float16 scores at 2^20 pixels x 21 classes (per_image=False): one torch.sort
of the very keys a loss call sorts (rows and flat), and the fused forward + backward under
each strategy (value checks off, CUDA events, medians of 20 after 3 warm-up calls), with the
path each call took. Run by benchmarks/gpu_check.sh; by hand:
python tests/perf/gpu_sort_strategies.py
"""

import statistics

import torch

from lovasz_kernels import _plan, lovasz_softmax, set_validate_values
from lovasz_kernels.backends import triton_gpu

PIXELS, CLASSES, ROUNDS = 1 << 20, 21, 20


def median_ms(fn):
    for _ in range(3):  # compile and autotune first
        fn()
    times = []
    for _ in range(ROUNDS):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    gen = torch.Generator(device="cuda").manual_seed(0)
    labels = torch.randint(0, CLASSES, (1, PIXELS), device="cuda", generator=gen)
    logits = torch.randn(1, CLASSES, PIXELS, device="cuda", generator=gen)
    set_validate_values(False)  # the value checks synchronise: time the loss alone

    def step(probas):
        x = probas.detach().requires_grad_()
        lovasz_softmax(x, labels, backend="triton").backward()

    # the plan of these calls (per_image=False, classes present), to build the keys they sort
    plan = _plan.plan_segments(labels, CLASSES, "present", [], None, False, None, 0.0)
    for dtype in (torch.float32, torch.float16):
        probas = logits.softmax(dim=1).to(dtype)
        keys = triton_gpu.sort_keys(probas, labels, plan)
        flat_keys = triton_gpu.sort_keys(probas, labels, plan, flat=True)
        print(f"{str(dtype):14s} sort of its keys: rows "
              f"{median_ms(lambda keys=keys: torch.sort(keys, dim=1, descending=True)):7.3f} ms, "
              f"flat {median_ms(lambda keys=flat_keys: torch.sort(keys, descending=True)):7.3f} ms")
        for strategy in ("rows", "flat", "histogram"):
            with triton_gpu._override(sort=strategy):
                taken = triton_gpu.sort_strategy(dtype, PIXELS)
                print(f"{str(dtype):14s} {strategy:9s} (ran {taken:9s}) "
                      f"{median_ms(lambda probas=probas: step(probas)):7.3f} ms fwd+bwd")


if __name__ == "__main__":
    main()
