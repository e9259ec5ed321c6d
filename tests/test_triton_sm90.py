"""Every triton kernel variant the host code can launch compiles for sm_90 (H100), no GPU needed.

The interpreter (how the other triton tests run here) never compiles a kernel, so a kernel that
Triton cannot lower, or that asks for more shared memory than an H100 block has, would pass
them. tests/triton_sm90.py drives the backend's host code with a fake CUDA driver and compiles
each launch through Triton's own path down to a cubin with the bundled ptxas; it runs in a
subprocess because this process interprets the kernels (TRITON_INTERPRET is read at import).

By default a representative subset (~25 s on 2 cores: every kernel, both entry points, every
strategy and key width, int64 offsets, the smallest and largest tl.sort blocks);
``LOVASZ_SM90_ALL=1`` compiles the full product (~970 kernels, ~15 min on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"_apply_kernel", "_build_keys_kernel", "_histogram_gather_kernel",
           "_histogram_kernel", "_histogram_scan_kernel", "_scan_tiles_kernel",
           "_segment_loss_kernel", "_small_segment_kernel", "_tile_counts_kernel"}


def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default, stated (Triton 3.9 warns)
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache  # compile for real, not from an earlier run's cache
        done = subprocess.run([sys.executable, "-m", "tests.triton_sm90"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=3600)
    output = done.stdout.strip().splitlines()
    if done.returncode == 77:
        pytest.skip(output[-1] if output else "tests/triton_sm90.py skipped")
    assert done.returncode in (0, 1), f"compile run failed:\n{done.stdout}\n{done.stderr[-6000:]}"
    summary = json.loads(output[-1])
    assert summary["over_limit"] == [], "kernels asking for more shared memory than sm_90 has"
    assert done.returncode == 0
    assert set(summary["kernel_names"]) == KERNELS
    assert summary["max_shared_bytes"] <= summary["shared_limit_bytes"]
    print(f"sm_90: {summary['kernels_compiled']} kernels from {summary['variants']} calls in "
          f"{summary['seconds']} s, max shared memory {summary['max_shared_bytes']} bytes "
          f"({summary['max_shared_kernel']})")


def test_the_kernel_list_is_complete():
    """Every ``@triton.jit`` kernel of the backend is one the compile run must see."""
    from lovasz_kernels import get_backend

    backend = get_backend("triton")
    if not backend.availability()[0]:
        pytest.skip(backend.availability()[1])
    module = backend._load()
    defined = {name for name in vars(module) if name.endswith("_kernel")}
    assert defined == KERNELS


def test_a_missing_ptxas_is_a_reason_to_skip(monkeypatch):
    """Without ptxas the compile run exits 77 with the reason, and the test above skips."""
    from triton.backends.nvidia import compiler

    from tests import triton_sm90

    assert triton_sm90.missing_toolchain() == ""

    def no_ptxas(arch):
        raise RuntimeError("Cannot find ptxas")

    monkeypatch.setattr(compiler, "get_ptxas", no_ptxas)
    assert "no ptxas for sm_90 (Cannot find ptxas)" in triton_sm90.missing_toolchain()
