"""Compile every launchable triton kernel variant for sm_90 (H100) ahead of time, with no GPU.

Run as ``python -m tests.triton_sm90 [--all] [--json PATH]`` in a process without
``TRITON_INTERPRET`` (tests/test_triton_sm90.py does, in a subprocess). A fake Triton driver
reports a CUDA target of compute capability 9.0; the backend's host code then runs as on a GPU
on CPU tensors, except that its one launch helper (``_launch``) compiles each kernel through
Triton's own path (``JITFunction.warmup``: specialization of the real arguments, MLIR, PTX, the
bundled ptxas) instead of launching it. So the variants compiled are exactly the ones the host
code would launch — dtypes, flags, tiles, ``tl.sort`` sizes, every autotuning config — with the
argument specializations real tensors give.

Prints one JSON object: the variants driven, the kernels compiled, the largest shared memory a
kernel asks for (sm_90 gives a block at most 227 KiB of the SM's 228 KiB) and the seconds taken.
Exits 77 (skip), saying why, when Triton's NVIDIA backend or its ptxas is missing.

By default a representative subset (every kernel, every error/key width, both entry points,
every strategy, int64 offsets, the smallest and largest ``tl.sort`` block); ``--all`` (or
``LOVASZ_SM90_ALL=1``) the full product.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
SKIP = 77


def _fake_driver(capability: int = 90, warp_size: int = 32):
    """A Triton driver that reports a CUDA target and no device: enough to compile."""
    import torch
    from triton.backends.compiler import GPUTarget

    class FakeCudaDriver:
        target = GPUTarget("cuda", capability, warp_size)

        @staticmethod
        def is_active() -> bool:
            return True

        def get_current_target(self):
            return self.target

        @staticmethod
        def get_current_device() -> int:
            return 0

        @staticmethod
        def get_current_stream(device=None) -> int:
            return 0

        @staticmethod
        def get_active_torch_device():
            return torch.device("cpu")

    return FakeCudaDriver()


def missing_toolchain() -> str:
    """Why kernels cannot be compiled for sm_90 here ("" when they can): Triton, its NVIDIA
    backend or the ptxas it runs is missing."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as exc:
        return f"triton with its NVIDIA backend is not installed ({exc})"
    try:
        ptxas = get_ptxas(90).path
    except (RuntimeError, OSError) as exc:  # Triton raises when it finds no ptxas at all
        return f"no ptxas for sm_90 ({exc}); set TRITON_PTXAS_PATH"
    if not ptxas or not os.access(ptxas, os.X_OK):
        return f"no executable ptxas for sm_90 at {ptxas!r}; set TRITON_PTXAS_PATH"
    return ""


def _variants(full: bool) -> list[dict]:
    """The calls to drive: entry point, input dtype, strategy, segment kind, flags, size."""
    import torch

    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    strategies = ["in-register", "rows", "flat", "histogram"]
    if full:
        variants = []
        for entry, dtype, strategy, int64 in itertools.product(
                ["extension", "loss"], dtypes, strategies, [False, True]):
            if strategy == "histogram" and dtype not in (torch.float16, torch.bfloat16):
                continue
            if strategy in ("in-register", "flat") and entry == "extension" \
                    and dtype == torch.float64:
                continue
            sizes = [16, 1000, 2048] if strategy == "in-register" else [4096, 1000]
            kinds = ["per_image", "batch"] if entry == "loss" else [None]
            for size, kind, ignore in itertools.product(sizes, kinds, [False, True]):
                if entry == "extension" and ignore:
                    continue
                if strategy == "in-register" and kind == "batch":
                    size //= 2  # two images per batch segment
                variants.append(dict(entry=entry, dtype=dtype, strategy=strategy, int64=int64,
                                     size=size, kind=kind, ignore=ignore))
        return variants
    f64, f32, f16, bf16 = dtypes
    return [
        dict(entry="extension", dtype=f32, strategy="rows", int64=False, size=4096),
        dict(entry="extension", dtype=f16, strategy="histogram", int64=False, size=4096),
        dict(entry="extension", dtype=bf16, strategy="flat", int64=True, size=1000),
        dict(entry="extension", dtype=f64, strategy="rows", int64=True, size=4096),
        dict(entry="extension", dtype=f32, strategy="in-register", int64=False, size=2048),
        dict(entry="extension", dtype=f16, strategy="in-register", int64=False, size=16),
        dict(entry="loss", dtype=f32, strategy="rows", int64=False, size=4096, kind="batch",
             ignore=False),
        dict(entry="loss", dtype=f32, strategy="flat", int64=False, size=4096,
             kind="per_image", ignore=True),
        dict(entry="loss", dtype=f16, strategy="histogram", int64=False, size=4096,
             kind="per_image", ignore=True),
        dict(entry="loss", dtype=bf16, strategy="histogram", int64=True, size=1000,
             kind="batch", ignore=False),
        dict(entry="loss", dtype=bf16, strategy="rows", int64=True, size=1000, kind="batch",
             ignore=True),
        dict(entry="loss", dtype=f64, strategy="rows", int64=False, size=1000,
             kind="per_image", ignore=True),
        dict(entry="loss", dtype=f32, strategy="in-register", int64=False, size=2048,
             kind="per_image", ignore=True),
        dict(entry="loss", dtype=f16, strategy="in-register", int64=True, size=8, kind="batch",
             ignore=False),
    ]


def _drive(module, variant: dict) -> None:
    """Run one call's host code (kernels compiled, not launched) on CPU tensors."""
    import torch

    from lovasz_kernels import _plan

    strategy = variant["strategy"]
    settings = dict(force_int64=variant["int64"],
                    sort="auto" if strategy == "in-register" else strategy)
    if strategy != "in-register":
        settings["small_segment_max"] = 0
    size, dtype = variant["size"], variant["dtype"]
    with module._override(**settings):
        if variant["entry"] == "extension":
            errors = torch.zeros(3, size, dtype=dtype)
            module.lovasz_extension(errors, torch.zeros(3, size, dtype=torch.bool))
            return
        labels = torch.zeros(2, size, dtype=torch.int64)
        plan = _plan.plan_segments(
            labels, num_classes=3, classes="present", class_list=[], class_weights=None,
            per_image=variant["kind"] == "per_image",
            ignore_index=255 if variant["ignore"] else None, bg_offset=0.0)
        module.lovasz_loss(torch.zeros(2, 3, size, dtype=dtype), labels, plan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="the full product of variants")
    parser.add_argument("--json", help="also write the JSON summary to this file")
    args = parser.parse_args(argv)
    full = args.all or os.environ.get("LOVASZ_SM90_ALL") == "1"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: kernels would be interpreted, not compiled")
        return 2
    missing = missing_toolchain()
    if missing:
        print(f"skip: {missing}")
        return SKIP
    import triton
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner

    driver.set_active(_fake_driver())
    from lovasz_kernels import _plan
    from lovasz_kernels.backends import triton_gpu as module

    _plan._SETTINGS["read_values_on_cpu"] = False  # dense plans, as a GPU builds them
    compiled: dict[int, dict] = {}

    def compile_instead_of_launch(kernel, programs, *kernel_args, **meta):
        if programs > module._MAX_PROGRAMS:
            raise ValueError(f"{programs} programs")
        if isinstance(kernel, Autotuner):  # every config the autotuner may pick
            kernels = kernel.warmup(*kernel_args, grid=(programs,), **meta)
        else:
            meta.setdefault("num_warps", module._FIXED_WARPS)
            kernels = [kernel.warmup(*kernel_args, grid=(programs,), **meta)]
        for binary in kernels:
            compiled.setdefault(id(binary), dict(
                kernel=binary.name, num_warps=binary.metadata.num_warps,
                shared=binary.metadata.shared, binary=binary))

    module._launch = compile_instead_of_launch
    start = time.perf_counter()
    variants = _variants(full)
    for variant in variants:
        _drive(module, variant)
    elapsed = time.perf_counter() - start
    kernels = sorted((dict(kernel=r["kernel"], num_warps=r["num_warps"], shared=r["shared"])
                      for r in compiled.values()), key=lambda r: (r["kernel"], -r["shared"]))
    widest = max(kernels, key=lambda r: r["shared"])
    summary = dict(
        triton=triton.__version__, target="cuda sm_90", full=full, variants=len(variants),
        kernels_compiled=len(kernels), kernel_names=sorted({r["kernel"] for r in kernels}),
        max_shared_bytes=widest["shared"], max_shared_kernel=widest["kernel"],
        shared_limit_bytes=SHARED_LIMIT, seconds=round(elapsed, 1),
        over_limit=[r for r in kernels if r["shared"] > SHARED_LIMIT],
    )
    text = json.dumps(summary)
    print(text)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text + "\n")
    return 1 if summary["over_limit"] else 0


if __name__ == "__main__":
    sys.exit(main())
