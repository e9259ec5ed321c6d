"""The triton backend's own tests: how it runs (GPU or interpreter), forced tilings, the keys.

The shared suite (test_extension, test_losses, test_properties, ...) already runs the triton
backend on CPU tensors under ``TRITON_INTERPRET=1`` (tests/conftest.py switches the interpreter
on when there is no GPU). Here the launch settings are forced so that a few hundred pixels
exercise what large inputs do on a GPU: multi-tile scans with carries across many tiles and
several scan chunks, int64 offsets, and the fused ``tl.sort`` path for small segments.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lovasz_kernels import get_backend, lovasz_extension
from lovasz_kernels._cases import extension_cases, tie_group_sums
from lovasz_kernels._registry import select_backend
from tests.helpers import (
    GRAD_TOLERANCE,
    LOSS_TOLERANCE,
    assert_close_report,
    distinct_float32,
    tie_free_errors,
)

TRITON = get_backend("triton")
_available, _reason = TRITON.availability()
pytestmark = pytest.mark.skipif(
    not _available and "not installed" in _reason, reason=_reason
)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# launch settings that make small inputs take the code paths of large ones
TILINGS = {
    # 16-pixel tiles, 4 tile totals per scan chunk: (2, 1000) has 63 tiles in 16 chunks
    "tiny tiles": dict(small_segment_max=0, tile=16, scan_block=4),
    # int64 segment offsets and counts (automatic when S·P >= 2^31)
    "int64": dict(small_segment_max=0, tile=32, scan_block=8, force_int64=True),
}
# the fused one-program-per-segment path (tl.sort); fp64 keys leave no room for the index
FUSED = dict(small_segment_max=4096)


def _devices() -> list:
    """CPU tensors (run interpreted, or skipped saying why) and CUDA tensors when there is a GPU."""
    params = []
    for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        marks = []
        if not _available:
            marks.append(pytest.mark.skip(reason=_reason))
        elif device not in TRITON.supported_devices():
            marks.append(pytest.mark.skip(reason=f"triton does not run on {device} tensors here"))
        params.append(pytest.param(device, marks=marks, id=device))
    return params


@pytest.fixture(params=_devices())
def device(request) -> str:
    return request.param


def _module():
    return TRITON._load()


def _run(errors, fg, device, **settings):
    with _module()._override(**settings):
        loss, grad = lovasz_extension(errors.to(device), fg.to(device), backend="triton")
    return loss.cpu(), grad.cpu()


def _reference(errors, fg):
    return get_backend("numpy").run(errors, fg)


def _compare(errors, fg, loss, grad, what, tie_free=True):
    ref_loss, ref_grad = _reference(errors, fg)
    dtype = errors.dtype
    assert loss.dtype == torch.promote_types(dtype, torch.float32)
    assert grad.dtype == dtype
    assert_close_report(loss, ref_loss, LOSS_TOLERANCE[dtype], f"{what} loss")
    if tie_free:
        assert_close_report(grad, ref_grad, GRAD_TOLERANCE[dtype], f"{what} grad")
    else:
        assert_close_report(tie_group_sums(errors, grad), tie_group_sums(errors, ref_grad),
                            GRAD_TOLERANCE[dtype], f"{what} tie-group grad")


# ------------------------------------------------------------------------ how it runs


def test_interpreter_mode_is_explicit():
    """Under the interpreter the backend takes CPU tensors but is never picked automatically."""
    if not _available or "cpu" not in TRITON.supported_devices():
        pytest.skip("triton kernels are not interpreted in this process")
    assert "interpreter" in TRITON.details()
    assert TRITON.devices == ("cuda",)
    assert select_backend(None, torch.device("cpu")).name != "triton"


def test_unavailable_without_cuda_or_interpreter_says_how_to_fix():
    """No GPU and no TRITON_INTERPRET: a clear error, and auto-selection skips triton.

    Also: setting TRITON_INTERPRET after the module was imported is too late (Triton builds
    interpreted kernels when they are decorated), and the reason says so; without triton
    installed the module still imports and says how to install it.
    """
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    script = textwrap.dedent("""
        import os, torch
        from lovasz_kernels import get_backend, lovasz_extension
        from lovasz_kernels._registry import select_backend
        triton = get_backend("triton")
        print(triton.availability())
        try:
            lovasz_extension(torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool),
                             backend="triton")
        except ValueError as exc:
            print(type(exc).__name__, exc)
        print("auto:", select_backend(None, torch.device("cpu")).name)
        os.environ["TRITON_INTERPRET"] = "1"
        print(triton.availability())
        import importlib, sys
        import lovasz_kernels.backends.triton_gpu as module
        sys.modules["triton"] = None  # as if triton were not installed: still imports
        importlib.reload(module)
        print(module.availability())
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    lines = out.splitlines()
    if "not installed" in lines[0]:
        pytest.skip("triton is not installed")
    assert "no CUDA device" in lines[0] and "TRITON_INTERPRET=1" in lines[0]
    assert lines[1].startswith("BackendUnavailableError") and "no CUDA device" in lines[1]
    assert lines[2] != "auto: triton"
    assert "was set after" in lines[3] and "import" in lines[3]
    assert "(False, " in lines[4] and "not installed" in lines[4] and "pip install" in lines[4]


def test_override_rejects_unknown_settings():
    if not _available:
        pytest.skip(_reason)
    with pytest.raises(ValueError, match="unknown triton backend settings"), \
            _module()._override(block=4):
        pass


# ------------------------------------------------------------------- cross-validation


@pytest.mark.parametrize("tiling, shape", [
    *[("tiny tiles", shape) for shape in [(1, 1), (4, 7), (5, 123), (2, 1000)]],
    *[("int64", shape) for shape in [(1, 1), (4, 7), (5, 123)]],
], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_tile_scan_matches_reference(device, tiling, dtype, shape, gen):
    errors = tie_free_errors(shape, dtype, gen)
    fg = torch.rand(shape, generator=gen) < 0.3
    loss, grad = _run(errors, fg, device, **TILINGS[tiling])
    _compare(errors, fg, loss, grad, f"{tiling} {dtype} {shape}")


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (4, 7), (3, 123)], ids=str)
def test_fused_small_segments_match_reference(device, dtype, shape, gen):
    errors = tie_free_errors(shape, dtype, gen)
    fg = torch.rand(shape, generator=gen) < 0.3
    loss, grad = _run(errors, fg, device, **FUSED)
    _compare(errors, fg, loss, grad, f"fused {dtype} {shape}")


def test_check_cases_with_many_tiles(device):
    """Every `lovasz-kernels check` case (ties, padding, empty segment, no/all foreground,
    fp16/bf16, 2^18 pixels), cut into many tiles and scan chunks."""
    for case in extension_cases():
        num_pixels = case.errors.shape[1]
        tile = 128 if num_pixels <= 5000 else 4096  # the 2^18 case: 64 tiles, 16 chunks
        loss, grad = _run(case.errors, case.fg, device, small_segment_max=0, tile=tile,
                          scan_block=4)
        _compare(case.errors, case.fg, loss, grad, case.name, case.tie_free)


def test_check_cases_fused(device):
    """The small `check` cases through the fused tl.sort path (fp64 ones go the general way)."""
    for case in extension_cases():
        if case.errors.shape[1] > 64:
            continue
        for dtype in (torch.float32, torch.float16):
            errors = case.errors.to(dtype)
            fg = case.fg & (errors > -torch.inf)
            loss, grad = _run(errors, fg, device, **FUSED)
            _compare(errors, fg, loss, grad, f"fused {case.name} {dtype}", case.tie_free)


@pytest.mark.parametrize("settings", [TILINGS["tiny tiles"], FUSED], ids=["tiled", "fused"])
def test_ties_padding_and_strided_inputs(device, settings, gen):
    errors = torch.randint(-2, 4, (40, 6), generator=gen).float().t() / 2  # strided view
    fg = (torch.rand(40, 6, generator=gen) < 0.4).t()
    errors[:, 30:] = -torch.inf
    fg = fg & (errors > -torch.inf)
    loss, grad = _run(errors, fg, device, **settings)
    _compare(errors.contiguous(), fg.contiguous(), loss, grad, "ties", tie_free=False)
    assert bool((grad[:, 30:] == 0).all())


def test_one_ulp_apart_keep_their_order(device, gen):
    """Consecutive float32 bit patterns: the label folded into the key must not reorder them
    (a key that dropped the lowest value bit would tie such pairs and sort them by label)."""
    errors = distinct_float32(3000, gen)
    fg = torch.rand(1, 3000, generator=gen) < 0.5
    for settings in (dict(small_segment_max=0, tile=64, scan_block=4),
                     dict(small_segment_max=0, tile=1024)):
        loss, grad = _run(errors, fg, device, **settings)
        _compare(errors, fg, loss, grad, f"one ulp apart {settings}")


# ---------------------------------------------------- fp16/bf16 sort-free histogram path

HISTOGRAM = dict(histogram_min_pixels=1, small_segment_max=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 2000)], ids=str)
def test_histogram_path_matches_reference(device, dtype, shape, gen):
    errors = tie_free_errors(shape, dtype, gen)
    fg = torch.rand(shape, generator=gen) < 0.3
    loss, grad = _run(errors, fg, device, **HISTOGRAM)
    _compare(errors, fg, loss, grad, f"histogram {dtype} {shape}")


def _tie_class_means(errors: torch.Tensor, fg: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over each (row, error value, class) group, spread back per pixel."""
    rows = torch.arange(errors.shape[0])[:, None].expand(errors.shape)
    keys = torch.stack([rows.double(), errors.double(), fg.double()], dim=-1).reshape(-1, 3)
    _, inverse, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.numel(), dtype=torch.float64)
    sums.index_add_(0, inverse, values.double().flatten())
    return (sums / counts)[inverse].reshape(errors.shape)


def _two_order_class_means(errors: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """The histogram path's gradient, from the numpy reference (float64).

    The reference breaks ties by position (stable sort), so moving a segment's fg pixels to
    the front (or the back) orders every tie group fg-first (bg-first). Average the two
    gradients, then each (tie group, class): pixels of one class are interchangeable in Δ_J.
    """
    grads = []
    for label_last in (~fg, fg):  # fg first, then bg first
        perm = torch.argsort(label_last.to(torch.int8), dim=1, stable=True)
        _, grad = _reference(errors.double().gather(1, perm), fg.gather(1, perm))
        grads.append(torch.empty_like(grad).scatter_(1, perm, grad))
    return _tie_class_means(errors, fg, (grads[0] + grads[1]) / 2)


def _tie_class_violation(errors: torch.Tensor, fg: torch.Tensor, grad: torch.Tensor) -> float:
    """max of <g, y> - f(y) (≤ 0 for a subgradient), less the rounding allowance of g's dtype,
    over y = 1[M] for every set M = (pixels above a positive tie group) ∪ (the group's pixels
    of one class); f(1[M]) = Δ_J(M)."""
    sets, rows = [], []
    for row in range(errors.shape[0]):
        for value in errors[row].unique():
            if not value > 0:
                continue
            for label in (True, False):
                in_group = (errors[row] == value) & (fg[row] == label)
                if in_group.any():
                    sets.append((errors[row] > value) | in_group)
                    rows.append(row)
    if not sets:
        return -torch.inf
    y = torch.stack(sets).double()
    f_y, _ = _reference(y, fg[rows])
    inner = (grad[rows].double() * y).sum(dim=1)  # g ≥ 0
    tol = GRAD_TOLERANCE[grad.dtype]
    allowance = tol.rtol * inner + tol.atol * y.sum(dim=1)
    return float((inner - f_y.double() - allowance).max())


def _check_tie_classes(errors, fg, grad, what):
    """Equal gradients within each (tie group, class); the mean of the fg-first and bg-first
    orders' class totals; in the base polytope on every tie group's class prefix."""
    dtype = errors.dtype
    assert torch.equal(_tie_class_means(errors, fg, grad), grad.double()), \
        f"{what}: gradients differ within a (tie group, class)"
    violation = _tie_class_violation(errors, fg, grad)
    assert violation <= 0, f"{what}: <g, 1[M]> - Δ_J(M) exceeds rounding by {violation}"
    assert_close_report(grad, _two_order_class_means(errors, fg), GRAD_TOLERANCE[dtype],
                        f"{what} grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_histogram_path_mixed_tie_is_a_subgradient(device, dtype):
    """n_fg = 7; 6 fg and 5 bg pixels above (distinct errors), then one tie of 1 fg and 5 bg.

    The tie's total increment is G = J(7, 10) − J(6, 5) = 1 − 11/12 = 1/12 (J(A, N) =
    (A + N) / (n_fg + N)). Shared equally, the 5 bg pixels would get 5/72, but Δ_J allows them
    at most J(6, 10) − J(6, 5) = 16/17 − 11/12 = 5/204 (bg first). Averaging the fg-first and
    bg-first orders per class: fg ½(1/12 + 1/17) = 29/408, each bg (7 − 6 − ½)/(12·17) = 1/408.
    """
    errors = torch.tensor([[3.0, 2.875, 2.75, 2.625, 2.5, 2.375, 2.25, 2.125, 2.0, 1.875, 1.75]
                           + [1.0] * 6]).to(dtype)
    fg = torch.tensor([[True, False] * 5 + [True] + [True] + [False] * 5])
    loss, grad = _run(errors, fg, device, **HISTOGRAM)
    _compare(errors, fg, loss, grad, f"mixed tie {dtype}", tie_free=False)
    tol = GRAD_TOLERANCE[dtype]
    # y = 1[the 11 pixels above ∪ the tie's 5 bg pixels]: f(y) = Δ_J = J(6, 10) = 16/17
    y = torch.zeros(1, 17, dtype=torch.float64)
    y[0, :11] = 1.0
    y[0, 12:] = 1.0
    f_y, _ = _reference(y, fg)
    assert abs(f_y.item() - 16 / 17) < 1e-12
    inner = float((grad.double() * y).sum())  # 11/12 + 5/408 = 379/408 < 384/408
    assert inner <= 16 / 17 + tol.rtol * inner, f"<g, y> = {inner} > Δ_J = {16 / 17}"
    expected = torch.tensor([29 / 408] + [1 / 408] * 5, dtype=torch.float64)
    assert_close_report(grad[0, 11:], expected, tol, "tie increments")
    _check_tie_classes(errors, fg, grad, f"mixed tie {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_histogram_path_on_ties_padding_and_edge_cases(device, dtype, gen):
    """Exact loss on ties; within a tie group each class shares one gradient: the mean of the
    fg-first and bg-first orders (a deterministic subgradient)."""
    errors = (torch.randint(-2, 6, (4, 300), generator=gen).double() / 4).to(dtype)
    errors[1, 200:] = -torch.inf
    errors[2, :] = -1.0  # nothing above 0
    fg = torch.rand(4, 300, generator=gen) < 0.4
    fg[0] = False  # no foreground
    fg &= errors > -torch.inf
    loss, grad = _run(errors, fg, device, **HISTOGRAM)
    _compare(errors, fg, loss, grad, f"histogram ties {dtype}", tie_free=False)
    _check_tie_classes(errors, fg, grad, f"histogram ties {dtype}")
    assert not grad[1, 200:].any() and not grad[2].any()


def test_histogram_path_is_the_default_for_large_half_segments(device, gen):
    num_pixels = _module()._SETTINGS["histogram_min_pixels"]
    errors = torch.randn(1, num_pixels, generator=gen).half()
    fg = torch.rand(1, num_pixels, generator=gen) < 0.2
    loss, grad = _run(errors, fg, device)
    ref_loss, ref_grad = _reference(errors.float(), fg)  # increments rounded once, to float32
    assert_close_report(loss, ref_loss, LOSS_TOLERANCE[torch.float16], "loss")
    # each pixel's fp16 gradient is rounded on its own (many are subnormal at this size), so a
    # tie group's sum may be off by its size times half an fp16 ulp
    ours, exact = tie_group_sums(errors, grad)[0], tie_group_sums(errors, ref_grad)[0]
    group_size = torch.unique(errors, return_inverse=True, return_counts=True)
    group_size = group_size[2][group_size[1]][0].double()
    bound = 2.0**-11 * exact.abs() + group_size * 2.0**-25
    assert bool(((ours - exact).abs() <= bound).all()), float(((ours - exact).abs() / bound).max())
    values, inverse, group_sizes = torch.unique(errors, return_inverse=True, return_counts=True)
    fg_per_value = torch.bincount(inverse[fg], minlength=values.numel())
    mixed = (values > 0) & (fg_per_value > 0) & (fg_per_value < group_sizes)
    assert int(mixed.sum()) > 20  # ties of both classes: the histogram path averages per class
    assert torch.equal(_tie_class_means(errors, fg, grad), grad.double())
    assert_close_report(grad, _two_order_class_means(errors, fg), GRAD_TOLERANCE[torch.float16],
                        "per-class tie gradient")


# ------------------------------------------------------------------------------- keys


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keys_decode_exactly_and_sort_like_the_errors(device, dtype, gen):
    """key = 2 (bits(max(e, 0)) − 2^(w−2)) + fg in the float's own width: exact and monotone."""
    module = _module()
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, -1.0, -torch.inf, torch.inf, info.tiny, info.max,
                            info.smallest_normal / 4, 1.0], dtype=torch.float64).to(dtype)
    base = tie_free_errors((1, 200), dtype, gen)[0]
    key_dtype, half = module._KEYS[dtype]
    one_ulp_up = (base.abs().view(key_dtype) + 1).view(dtype)
    errors = torch.cat([special, base, one_ulp_up])
    errors = errors.reshape(1, -1)
    fg = torch.rand(errors.shape, generator=gen) < 0.5
    fg &= errors > -torch.inf
    grad = torch.empty(errors.shape, dtype=dtype)
    call = module._errors_call(errors.to(device), fg.to(device), grad.to(device))
    with module._override(tile=1024):
        keys = module._build_keys(call, flat=False).reshape(errors.shape)
    assert keys.dtype == key_dtype
    keys = keys.cpu().to(torch.int64)
    assert torch.equal(keys & 1, fg.to(torch.int64))
    clamped = torch.where(errors > 0, errors, torch.zeros_like(errors))
    decoded = ((keys >> 1) + half).to(key_dtype).view(dtype)
    assert torch.equal(decoded.view(key_dtype), clamped.view(key_dtype))
    # descending keys = descending clamped errors, ties broken by the label only
    order = torch.argsort(keys[0], descending=True)
    assert bool((clamped[0, order].double().diff() <= 0).all())
    width = 8 * errors.element_size()
    assert -(2 ** (width - 1)) <= int(keys.min()) and int(keys.max()) < 2 ** (width - 1)


# -------------------------------------------------------------------------- GPU only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(21, 1 << 14), (3, 3000), (5, 1000), (1, 1 << 20)], ids=str)
def test_cuda_autotuned_matches_reference(dtype, shape, gen):
    """Compiled kernels with the autotuned tile and the default fused threshold."""
    if shape[1] == 1 << 20:
        if dtype != torch.float32:
            pytest.skip("2^20 distinct values exist in float32 (and float64) only")
        errors = distinct_float32(shape[1], gen)
    else:
        errors = tie_free_errors(shape, dtype, gen)
    fg = torch.rand(shape, generator=gen) < 0.3
    loss, grad = lovasz_extension(errors.cuda(), fg.cuda(), backend="triton")
    _compare(errors, fg, loss.cpu(), grad.cpu(), f"cuda {dtype} {shape}")
