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

import lovasz_kernels
from lovasz_kernels import _plan, get_backend, lovasz_extension
from lovasz_kernels._cases import extension_cases, tie_group_sums
from lovasz_kernels._registry import select_backend
from lovasz_kernels.bench.measure import CudaPeakMeter
from tests.helpers import (
    GRAD_TOLERANCE,
    LOSS_TOLERANCE,
    assert_close_report,
    distinct_float32,
    peak_allocated_bytes,
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
    """Compiled kernels with the default tile, autotuned warps and the default thresholds."""
    if shape[1] == 1 << 20:
        if dtype != torch.float32:
            pytest.skip("2^20 distinct values exist in float32 (and float64) only")
        errors = distinct_float32(shape[1], gen)
    else:
        errors = tie_free_errors(shape, dtype, gen)
    fg = torch.rand(shape, generator=gen) < 0.3
    loss, grad = lovasz_extension(errors.cuda(), fg.cuda(), backend="triton")
    _compare(errors, fg, loss.cpu(), grad.cpu(), f"cuda {dtype} {shape}")


# ------------------------------------------------------------------ the fused loss path

STRATEGIES = ["rows", "flat", "histogram"]
FUSED_TILINGS = {
    # 8-pixel tiles, 2 tile totals per scan chunk: several tiles per image and scan chunks
    "tiny tiles": dict(small_segment_max=0, tile=8, scan_block=2),
    "int64": dict(small_segment_max=0, tile=16, scan_block=4, force_int64=True),
    "in-register": dict(small_segment_max=4096),
}


@pytest.fixture
def no_value_checks():
    """Scores that are not a softmax (tie-free by construction): value checks off."""
    lovasz_kernels.set_validate_values(False)
    yield
    lovasz_kernels.set_validate_values(True)


def _tie_free_scores(kind: str, shape: tuple[int, int, int], dtype: torch.dtype,
                     generator: torch.Generator) -> torch.Tensor:
    """(B, C, P) scores whose errors are pairwise distinct within every channel, across images.

    Probabilities: distinct values in [0.01, 0.49] (bg errors p < 0.5 < fg errors 1 − p).
    Logits: distinct magnitudes in [0.01, 0.9] with random signs (1 − x = 1 + y needs y = −x).
    The float32 errors of 16-bit values are exact, so they stay distinct.
    """
    batch, channels, pixels = shape
    count = batch * pixels
    grid = torch.linspace(0.01, 0.9 if kind == "hinge" else 0.49, count, dtype=torch.float64)
    columns = []
    for _ in range(channels):
        values = grid[torch.randperm(count, generator=generator)]
        if kind == "hinge":
            values = values * torch.where(torch.rand(count, generator=generator) < 0.5, -1, 1)
        columns.append(values.to(dtype))
        assert torch.unique(columns[-1].abs()).numel() == count, "not tie-free in this dtype"
    return torch.stack(columns).reshape(channels, batch, pixels).transpose(0, 1).contiguous()


def _loss_inputs(kind, dtype, shape, ignore, generator):
    batch, channels, pixels = shape
    scores = _tie_free_scores(kind, shape, dtype, generator)
    labels = torch.randint(0, 2 if kind == "hinge" else channels, (batch, pixels),
                           generator=generator)
    if ignore:
        labels[torch.rand(batch, pixels, generator=generator) < 0.2] = 255
    if kind == "hinge":
        scores = scores[:, 0]
    return scores, labels


def _loss_and_grad(kind, scores, labels, backend, device="cpu", **options):
    # a leaf of its own: .to() of a CPU tensor onto the CPU is the caller's tensor itself
    scores = scores.detach().to(device).requires_grad_()
    loss_fn = lovasz_kernels.lovasz_hinge if kind == "hinge" else lovasz_kernels.lovasz_softmax
    loss = loss_fn(scores, labels.to(device), backend=backend, **options)
    loss.backward()
    return loss.detach().cpu(), scores.grad.cpu()


def _compare_losses(kind, scores, labels, device, what, **options):
    loss, grad = _loss_and_grad(kind, scores, labels, "triton", device, **options)
    ref_loss, ref_grad = _loss_and_grad(kind, scores, labels, "numpy", **options)
    assert loss.dtype == ref_loss.dtype and grad.dtype == scores.dtype
    assert_close_report(loss, ref_loss, LOSS_TOLERANCE[scores.dtype], f"{what} loss")
    assert_close_report(grad, ref_grad, GRAD_TOLERANCE[scores.dtype], f"{what} grad")


def _fused_cases() -> list:
    """(dtype, strategy, tiling) where the strategy applies: histogram for 16-bit scores, flat
    and the in-register path for keys of at most 32 bits (not float64)."""
    cases = []
    for dtype in DTYPES:
        half = dtype in (torch.float16, torch.bfloat16)
        for strategy in STRATEGIES:
            if (strategy == "histogram" and not half) or (
                    strategy == "flat" and dtype == torch.float64):
                continue
            cases += [(dtype, strategy, "tiny tiles"), (dtype, strategy, "int64")]
        if dtype != torch.float64:
            cases.append((dtype, "auto", "in-register"))
    return cases


@pytest.mark.parametrize("dtype, strategy, tiling", _fused_cases(), ids=str)
@pytest.mark.parametrize("kind, per_image, ignore", [
    ("softmax", False, True), ("softmax", True, False), ("hinge", False, False),
    ("hinge", True, True)], ids=str)
def test_fused_loss_matches_reference(device, no_value_checks, kind, per_image, ignore, dtype,
                                      strategy, tiling, gen):
    """Scores (B, C, P) in their own dtype through every strategy: the kernels form the errors
    from the scores and labels and write the weighted, signed gradient in place."""
    shape = (2, 3, 35)
    scores, labels = _loss_inputs(kind, dtype, shape, ignore, gen)
    with _module()._override(**FUSED_TILINGS[tiling], sort=strategy):
        num_cols = shape[2] if per_image else shape[0] * shape[2]
        expected = "in-register" if tiling == "in-register" else strategy
        assert _module().sort_strategy(dtype, num_cols) == expected
        _compare_losses(kind, scores, labels, device, f"{kind} {dtype} {strategy} {tiling}",
                        per_image=per_image, ignore_index=255 if ignore else None)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_fused_loss_options_and_strided_scores(device, strategy, gen):
    """Class weights, a class list, absent classes, an ignore label; scores as a non-contiguous
    view (channels last) read in place; 16-bit probabilities from a real softmax (ties)."""
    logits = torch.randn(2, 5, 6, 4, generator=gen)
    probas = logits.softmax(dim=1).half().contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 4, (2, 6, 4), generator=gen)  # class 4 absent
    labels[0, 0] = 255
    options = [dict(classes="all", class_weights=[1.0, 0.5, 2.0, 0.0, 1.0]),
               dict(classes=[1, 3, 4], per_image=True)]
    for option in options:
        with _module()._override(tile=8, scan_block=2, small_segment_max=0, sort=strategy):
            loss, grad = _loss_and_grad("softmax", probas, labels, "triton", device,
                                        ignore_index=255, **option)
        ref_loss, ref_grad = _loss_and_grad("softmax", probas, labels, "numpy",
                                            ignore_index=255, **option)
        assert_close_report(loss, ref_loss, LOSS_TOLERANCE[torch.float16], f"{option} loss")
        # ties: compare the sums over each (segment, error value) group
        per_image = option.get("per_image", False)
        errors = _segment_errors(probas, labels, per_image)
        assert_close_report(tie_group_sums(errors, _segment_rows(grad, per_image)),
                            tie_group_sums(errors, _segment_rows(ref_grad, per_image)),
                            GRAD_TOLERANCE[torch.float16], f"{option} tie-group grad")


def _segment_rows(tensor: torch.Tensor, per_image: bool) -> torch.Tensor:
    """(B, C, H, W) → the (S, P') rows of a dense plan (S = B·C per image, C for the batch)."""
    batch, channels = tensor.shape[:2]
    flat = tensor.reshape(batch, channels, -1).double()
    if per_image:
        return flat.reshape(batch * channels, -1)
    return flat.transpose(0, 1).reshape(channels, -1)


def _segment_errors(probas, labels, per_image):
    """Softmax errors of every (segment, pixel) as the reference forms them (−inf ignored)."""
    channels = probas.shape[1]
    classes = torch.arange(channels).reshape(1, channels, 1, 1)
    fg = labels[:, None] == classes
    errors = torch.where(fg, 1 - probas.float(), probas.float()).double()
    errors = errors.masked_fill((labels == 255)[:, None].expand_as(errors), -torch.inf)
    return _segment_rows(errors, per_image)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
@pytest.mark.parametrize("per_image", [False, True], ids=["batch", "per image"])
def test_fused_multilabel_losses_match_reference(device, strategy, per_image, gen):
    """Multilabel labels (B, C, P) are read per channel (foreground: label 1 there):
    the multilabel hinge on float32 logits and the Lovász-Sigmoid on 16-bit probabilities,
    with ignored pixels, class weights and an empty channel."""
    logits = torch.randn(2, 3, 5, 7, generator=gen)
    masks = torch.randint(0, 2, (2, 3, 5, 7), generator=gen)
    masks[:, 2] = 0  # no foreground in channel 2
    masks[0, :, 0] = 255
    probas = logits.sigmoid().half()
    calls = [
        (lovasz_kernels.lovasz_hinge, logits, dict(multilabel=True)),
        (lovasz_kernels.lovasz_sigmoid, probas, dict(class_weights=[1.0, 2.0, 1.0])),
    ]
    for loss_fn, scores, options in calls:
        results = []
        for backend, settings in (("triton", dict(tile=8, scan_block=2, small_segment_max=0,
                                                  sort=strategy)), ("numpy", {})):
            x = scores.detach().to(device if backend == "triton" else "cpu").requires_grad_()
            with _module()._override(**settings):
                loss = loss_fn(x, masks.to(x.device), per_image=per_image, ignore_index=255,
                               backend=backend, **options)
            loss.backward()
            results.append((loss.detach().cpu(), x.grad.cpu()))
        (loss, grad), (ref_loss, ref_grad) = results
        what = f"{loss_fn.__name__} {strategy} per_image={per_image}"
        assert_close_report(loss, ref_loss, LOSS_TOLERANCE[scores.dtype], f"{what} loss")
        if strategy == "histogram":  # tied pixels of a class share one increment there
            errors = _segment_rows(torch.where(masks == 1, 1 - scores.float(), scores.float())
                                   .masked_fill(masks == 255, -torch.inf), per_image)
            assert_close_report(tie_group_sums(errors, _segment_rows(grad, per_image)),
                                tie_group_sums(errors, _segment_rows(ref_grad, per_image)),
                                GRAD_TOLERANCE[scores.dtype], f"{what} tie-group grad")
        else:
            assert_close_report(grad, ref_grad, GRAD_TOLERANCE[scores.dtype], f"{what} grad")


def test_fused_loss_builds_no_segment_tensors(device, monkeypatch, gen):
    """The triton loss never materializes (S, P) errors nor scatters a gradient back."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the triton loss took the generic (S, P) path")

    monkeypatch.setattr(_plan, "segment_errors", forbidden)
    monkeypatch.setattr(_plan, "generic_lovasz_loss", forbidden)
    monkeypatch.setattr(_plan, "sign_segment_grad", forbidden)
    monkeypatch.setattr(_plan, "write_segment_grad", forbidden)
    from lovasz_kernels import _registry
    monkeypatch.setattr(_registry, "generic_lovasz_loss", forbidden)
    probas = torch.randn(2, 3, 7, generator=gen).softmax(dim=1)
    labels = torch.randint(0, 3, (2, 7), generator=gen)
    loss, grad = _loss_and_grad("softmax", probas, labels, "triton", device)
    assert torch.isfinite(loss) and grad.abs().sum() > 0
    masks = torch.randint(0, 2, (2, 3, 7), generator=gen)  # multilabel: fused as well
    scores = torch.randn(2, 3, 7, generator=gen).to(device).requires_grad_()
    lovasz_kernels.lovasz_hinge(scores, masks.to(device), multilabel=True,
                                backend="triton").backward()
    assert scores.grad.abs().sum() > 0


@pytest.mark.parametrize("dense", [True, False], ids=["dense plan", "compact plan"])
def test_fused_loss_writes_every_gradient_pixel(device, monkeypatch, dense, gen):
    """Every pixel of the gradient is written, 0 for segments of weight 0 (absent classes,
    ignored pixels): fresh buffers come back NaN-filled here, and none survives."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(torch.nan) if tensor.is_floating_point() else tensor.fill_(-7)

    probas = torch.randn(2, 4, 9, generator=gen).softmax(dim=1)
    labels = torch.randint(0, 2, (2, 9), generator=gen)  # classes 2 and 3 absent
    labels[1, :4] = 255
    monkeypatch.setitem(_plan._SETTINGS, "read_values_on_cpu", not dense)
    monkeypatch.setattr(torch, "empty", nan_empty)
    with _module()._override(tile=8, scan_block=2, small_segment_max=0, sort="rows"):
        loss, grad = _loss_and_grad("softmax", probas, labels, "triton", device,
                                    ignore_index=255, per_image=True)
    monkeypatch.undo()
    ref_loss, ref_grad = _loss_and_grad("softmax", probas, labels, "numpy", ignore_index=255,
                                        per_image=True)
    assert not grad.isnan().any()
    torch.testing.assert_close(grad, ref_grad)
    torch.testing.assert_close(loss, ref_loss)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["softmax", "hinge"])
def test_half_scores_reach_the_half_kernels(device, no_value_checks, monkeypatch, kind, dtype,
                                            gen):
    """16-bit scores arrive at the backend in their own dtype: sorting builds float32 keys
    (int32) from the exact float32 errors, and the histogram path keys on the 16-bit input
    (by default from ``histogram_min_pixels`` pixels on)."""
    module = _module()
    launches = _record_launches(monkeypatch)
    scores, labels = _loss_inputs(kind, dtype, (2, 3, 40), False, gen)
    with module._override(tile=16, scan_block=4, small_segment_max=0, sort="rows"):
        _compare_losses(kind, scores, labels, device, f"{kind} {dtype} sorted")
    keys = [meta for name, _, meta in launches if name == "_build_keys_kernel"]
    assert keys and all(meta["KEY_DTYPE"] == tl_int32() for meta in keys)
    assert all(meta["FROM_SCORES"] for meta in keys)
    launches.clear()
    # (the hinge's segments are per image by default: 40 pixels; the softmax's 80)
    with module._override(tile=16, scan_block=4, small_segment_max=0, histogram_min_pixels=40):
        assert module.sort_strategy(dtype, 40) == "histogram"
        _compare_losses(kind, scores, labels, device, f"{kind} {dtype} histogram")
    names = {name for name, _, _ in launches}
    assert "_histogram_kernel" in names and "_build_keys_kernel" not in names


def tl_int32():
    import triton.language as tl

    return tl.int32


def _record_launches(monkeypatch) -> list:
    """Record (kernel name, grid, meta) of every launch, then launch as usual."""
    module = _module()
    launches = []
    real_launch = module._launch

    def recording(kernel, programs, *args, **meta):
        name = getattr(kernel, "fn", kernel)
        name = getattr(name, "__name__", None) or getattr(getattr(name, "fn", None), "__name__",
                                                           str(name))
        launches.append((name, programs, dict(meta)))
        real_launch(kernel, programs, *args, **meta)

    monkeypatch.setattr(module, "_launch", recording)
    return launches


# ------------------------------------------------------------------ memory-bounded chunks

def _record_chunks(monkeypatch) -> list[int]:
    """Record the segments of every chunk a call runs (sorted or histogram), then run it."""
    module = _module()
    chunks = []
    for name in ("_run_sorted", "_run_histogram"):
        real = getattr(module, name)

        def recording(call, loss, *args, real=real, **kwargs):
            assert loss.shape == (call.num_segments,)
            chunks.append(call.num_segments)
            real(call, loss, *args, **kwargs)

        monkeypatch.setattr(module, name, recording)
    return chunks


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
@pytest.mark.parametrize("per_image", [False, True], ids=["batch", "per image"])
def test_segments_run_in_chunks_within_the_budget(device, monkeypatch, strategy, per_image,
                                                  gen):
    """A budget of two segments: the loss and the bare extension run two segments at a time
    and give the bits of one chunk (segment weights, gradient positions and segment losses
    all follow the chunk)."""
    module = _module()
    monkeypatch.setitem(_plan._SETTINGS, "read_values_on_cpu", False)  # dense, as on a GPU
    probas = torch.randn(2, 5, 40, generator=gen).softmax(dim=1).half()
    labels = torch.randint(0, 4, (2, 40), generator=gen)  # class 4 absent: weight 0
    labels[0, :6] = 255
    errors = tie_free_errors((5, 80), torch.float16, gen)
    fg = torch.rand(errors.shape, generator=gen) < 0.4
    settings = dict(tile=16, scan_block=2, small_segment_max=0, histogram_min_pixels=40,
                    sort=strategy)
    runs, chunks = {}, _record_chunks(monkeypatch)
    for name, chunk_bytes in (("whole", None), ("chunked", 2)):
        if chunk_bytes is not None:  # every segment one byte: two fit in two bytes
            monkeypatch.setattr(module, "_chunk_bytes", lambda call, strategy, rows: rows)
        chunks.clear()
        with module._override(**settings, chunk_bytes=chunk_bytes):
            runs[name] = (
                _loss_and_grad("softmax", probas, labels, "triton", device, ignore_index=255,
                               per_image=per_image),
                _run(errors, fg, device))
        loss_segments = 10 if per_image else 5
        expected = ([loss_segments, 5] if chunk_bytes is None
                    else [2] * (loss_segments // 2) + [1] * (loss_segments % 2) + [2, 2, 1])
        assert chunks == expected, f"{name}: chunks {chunks}"
    for whole, chunked in zip(runs["whole"], runs["chunked"]):
        for a, b in zip(whole, chunked):
            assert torch.equal(a, b)


def test_chunk_budget_is_the_gradients_size(monkeypatch, gen):
    """By default a chunk's temporaries fit in the gradient's size (at least the GPU's chunk
    floor), never fewer than one segment. A sort's bytes follow the path
    PyTorch's CUDA sort takes: per key, the keys, sorted keys and int64 order (16 bytes for
    32-bit keys) plus 32 bytes of pairs under 128 rows, 20 for CUB's segmented sort from 128
    rows on, and one row's scratch (20 bytes per column) for rows of a million keys."""
    module = _module()
    assert module._sort_bytes(21, 1000, 4) == 21 * 1000 * (16 + 32)
    assert module._sort_bytes(200, 1000, 4) == 200 * 1000 * (16 + 20)
    assert module._sort_bytes(3, 1 << 20, 4) == 3 * (1 << 20) * 16 + (1 << 20) * 20
    assert module._sort_bytes(1, 5000, 8) == 5000 * (24 + 24)
    errors = torch.rand(21, 1000, generator=gen)
    call = module._errors_call(errors, errors > 0.5, errors)
    assert module._chunk_bytes(call, "rows", 21) == module._sort_bytes(21, 1000, 4)
    assert module._chunk_bytes(call, "flat", 21) == module._sort_bytes(1, 21000, 8)
    assert module._chunk_bytes(call, "in-register", 21) == 0
    monkeypatch.setattr(_plan, "GPU_CHUNK_FLOOR_BYTES", 0)
    gradient = errors.numel() * 4  # 84 bytes per segment's column: one segment's 48 fit
    assert module._segments_per_chunk(call, "rows", gradient) == 21 * 4 // 48  # 1
    assert module._segments_per_chunk(call, "rows", 4 * 48 * 1000) == 4
    assert module._segments_per_chunk(call, "rows", 1) == 1
    assert module._segments_per_chunk(call, "in-register", 1) == 21
    monkeypatch.setattr(_plan, "GPU_CHUNK_FLOOR_BYTES", 10**9)
    assert module._segments_per_chunk(call, "rows", gradient) == 21
    with monkeypatch.context() as patched:  # the floor a user set: 0 on a GPU, not the CPU's
        patched.setitem(_plan._FLOORS_SET, "cuda", 0)
        patched.setitem(_plan._FLOORS_SET, "cpu", 10**9)
        assert module._segments_per_chunk(call, "rows", gradient) == 1


def test_chunked_extension_needs_about_twice_the_input(device, monkeypatch, gen):
    """Many segments at once: with the budget at the gradient's size the call's peak of
    torch allocations (CPU) or of CUDA's caching allocator is within 2.5x the gradient,
    under half of what one chunk needs."""
    module = _module()
    errors = tie_free_errors((24, 4096), torch.float32, gen).to(device)
    fg = (torch.rand(errors.shape, generator=gen) < 0.3).to(device)
    peak = CudaPeakMeter().extra_peak_bytes if device == "cuda" else peak_allocated_bytes
    with module._override(sort="rows"):
        whole = lovasz_extension(errors, fg, backend="triton")
        whole_peak = peak(lambda: lovasz_extension(errors, fg, backend="triton"))
        monkeypatch.setitem(_plan._FLOORS_SET, "cuda", 0)  # chunk this small input
        chunked = lovasz_extension(errors, fg, backend="triton")
        chunked_peak = peak(lambda: lovasz_extension(errors, fg, backend="triton"))
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
    gradient_bytes = errors.numel() * 4
    assert chunked_peak <= 2.5 * gradient_bytes < whole_peak / 2


def _record_delegations(monkeypatch) -> list[str]:
    """Record the backends this one hands a call to, then let them run it."""
    module = _module()
    names = []

    def recording(name):
        names.append(name)
        return get_backend(name)

    monkeypatch.setattr(module, "get_backend", recording)
    return names


def test_a_floor_set_hands_segments_whose_sort_cannot_fit_to_the_torch_ranges(
        device, monkeypatch, gen):
    """A GPU floor of 0 set, so the budget is the gradient's size: where one segment's sort
    alone would not fit (a row's sort holds 36 bytes a pixel, one class's float32 gradient
    4: a hinge, one or two classes), the call goes to the torch backend, which sorts such
    rows a range of values at a time, and matches the reference. Segments that each fit
    run this backend's own kernels, as every call does by default."""
    module = _module()
    delegated = _record_delegations(monkeypatch)
    logits = torch.randn(2, 1, 150, generator=gen)
    hinge_labels = torch.randint(0, 2, (2, 150), generator=gen)
    errors = tie_free_errors((2, 300), torch.float32, gen)
    fg = torch.rand(errors.shape, generator=gen) < 0.4
    probas = torch.randn(1, 21, 40, generator=gen).softmax(dim=1)
    labels = torch.randint(0, 21, (1, 40), generator=gen)
    with module._override(small_segment_max=0):
        _compare_losses("hinge", logits, hinge_labels, device, "default hinge")
        assert delegated == []
        monkeypatch.setitem(_plan._FLOORS_SET, "cuda", 0)
        for per_image in (False, True):
            _compare_losses("hinge", logits, hinge_labels, device, "hinge", per_image=per_image)
        loss, grad = _run(errors, fg, device)
        _compare(errors, fg, loss, grad, "extension")
        assert delegated == ["torch"] * 3
        # 21 classes of 40 pixels: one row's sort (1440 bytes) fits the gradient (3360)
        _compare_losses("softmax", probas, labels, device, "21 classes")
        assert delegated == ["torch"] * 3


def test_a_floor_set_keeps_one_and_two_class_calls_within_twice_their_input(monkeypatch):
    """Floors of 0 set (the GPU's, which this backend keeps even on CPU tensors, and the
    CPU's, which the torch backend keeps on them): the standard one- and two-class workloads
    hold at most twice their input in torch allocations, with the torch backend's answer bit
    for bit (its ranges run them; by default one 1024² hinge image's sort alone holds 9x
    its input)."""
    from lovasz_kernels.bench.workloads import SUITE, Prepared

    module = _module()
    hinge = next(w for w in SUITE if w.loss == "hinge" and w.side == 1024)
    assert module._sort_bytes(1, 1 << 20, 4) == 9 * 4 * (1 << 20)
    monkeypatch.setitem(_plan._FLOORS_SET, "cuda", 0)
    monkeypatch.setitem(_plan._FLOORS_SET, "cpu", 0)
    for workload in [hinge] + [w for w in SUITE if w.classes == 2]:
        prepared = Prepared(workload)
        ours = prepared.fwd_bwd("triton")
        theirs = prepared.fwd_bwd("torch")
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
        peak = peak_allocated_bytes(lambda prepared=prepared: prepared.fwd_bwd("triton"))
        assert peak <= 2 * prepared.input_bytes, (
            f"{workload.name}: {peak / prepared.input_bytes:.2f}x the input")


# ------------------------------------------------------------------------ strategies

@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extension_strategies_match_reference(device, strategy, dtype, gen):
    """lovasz_extension through each strategy (where it is exact; others sort by rows)."""
    errors = tie_free_errors((3, 150), dtype, gen)
    fg = torch.rand(3, 150, generator=gen) < 0.3
    loss, grad = _run(errors, fg, device, small_segment_max=0, tile=32, scan_block=2,
                      sort=strategy)
    _compare(errors, fg, loss, grad, f"{strategy} {dtype}")


def test_strategy_rules_and_the_switch(monkeypatch):
    """Explicit strategies run where they are exact; the environment variable is read per
    call, and a bad value names it and lists the choices."""
    module = _module()
    half, f32, f64 = torch.float16, torch.float32, torch.float64
    with module._override(small_segment_max=2048, histogram_min_pixels=1 << 16):
        monkeypatch.delenv(module.SORT_ENV, raising=False)
        assert module.requested_sort() == "auto"
        assert module.sort_strategy(f32, 2048) == "in-register"
        assert module.sort_strategy(f64, 100) == "rows"  # 64-bit keys: no room for a column
        assert module.sort_strategy(half, 1 << 16) == "histogram"
        assert module.sort_strategy(half, 1 << 16, from_scores=False) == "histogram"
        assert module.sort_strategy(f32, 1 << 20) == "rows"
        monkeypatch.setenv(module.SORT_ENV, "flat")
        assert module.sort_strategy(f32, 100) == "flat"
        assert module.sort_strategy(half, 1 << 20) == "flat"
        assert module.sort_strategy(f64, 1 << 20, from_scores=False) == "rows"
        monkeypatch.setenv(module.SORT_ENV, "histogram")
        assert module.sort_strategy(half, 10) == "histogram"
        assert module.sort_strategy(f32, 10) == "rows"
        with module._override(sort="rows"):  # the in-process setting wins
            assert module.sort_strategy(half, 1 << 20) == "rows"
        monkeypatch.setenv(module.SORT_ENV, "radix")
        with pytest.raises(ValueError, match="LOVASZ_TRITON_SORT must be one of auto, rows, "
                                             "flat, histogram; got 'radix'"):
            module.requested_sort()
    with pytest.raises(ValueError, match="sort must be one of"), module._override(sort="fast"):
        pass


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_environment_variable_selects_the_strategy(device, monkeypatch, strategy, gen):
    launches = _record_launches(monkeypatch)
    monkeypatch.setenv(_module().SORT_ENV, strategy)
    probas = torch.randn(2, 3, 20, generator=gen).softmax(dim=1).half()
    labels = torch.randint(0, 3, (2, 20), generator=gen)
    with _module()._override(tile=16, scan_block=4):
        _loss_and_grad("softmax", probas, labels, "triton", device)
    keys = [meta for name, _, meta in launches if name == "_build_keys_kernel"]
    if strategy == "histogram":
        assert not keys and any(name == "_histogram_kernel" for name, _, _ in launches)
    else:
        assert keys and all(meta["FLAT"] == (strategy == "flat") for meta in keys)


@pytest.mark.parametrize("per_image", [False, True], ids=["batch", "per image"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_keys_are_the_keys_of_the_segment_errors(device, monkeypatch, dtype, per_image,
                                                        gen):
    """The keys built from scores and labels equal the keys of the (S, P) errors the generic
    path forms (errors in max(dtype, float32)); flat keys hold the same keys, segment by
    segment. ``sort_keys`` gives benchmarks exactly what the loss sorts."""
    module = _module()
    monkeypatch.setitem(_plan._SETTINGS, "read_values_on_cpu", False)  # dense, as on a GPU
    probas = torch.randn(3, 4, 21, generator=gen).softmax(dim=1).to(dtype)
    labels = torch.randint(0, 4, (3, 21), generator=gen)
    labels[0, :5] = 255
    plan = _plan.plan_segments(labels, 4, "present", [], None, per_image, 255, 0.0)
    errors, fg = _plan.segment_errors(probas, labels, plan)
    probas, labels = probas.to(device), labels.to(device)
    device_plan = _plan.plan_segments(labels, 4, "present", [], None, per_image, 255, 0.0)
    with module._override(tile=16):
        keys = module.sort_keys(probas, labels, device_plan)
        grad = torch.empty(errors.shape, dtype=errors.dtype, device=device)
        expected = module._build_keys(
            module._errors_call(errors.to(device), fg.to(device), grad), flat=False)
    assert keys.shape == errors.shape and keys.dtype == module._KEYS[errors.dtype][0]
    assert torch.equal(keys.cpu(), expected.cpu().reshape(errors.shape))
    if dtype == torch.float64:
        with pytest.raises(ValueError, match="flat keys pack 32-bit keys"):
            module.sort_keys(probas, labels, device_plan, flat=True)
        return
    with module._override(tile=16):
        flat = module.sort_keys(probas, labels, device_plan, flat=True)
    segment = torch.arange(errors.shape[0])[:, None]
    unsigned = keys.cpu().to(torch.int64) + 2 * module._KEYS[errors.dtype][1]
    assert torch.equal(flat.cpu(), ((errors.shape[0] - 1 - segment) << 32 | unsigned).reshape(-1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bg_offset", [0.0, 1.0])
def test_histogram_rank_tables_order_every_candidate_error(dtype, bg_offset):
    """For every 16-bit score and class: bin_value[rank] is the float32 error's key value
    (max(e, 0); NaN above +inf), ranks order like the errors, equal errors share a rank."""
    module = _module()
    rank, bin_value = module._histogram_tables(dtype, bg_offset, torch.device("cpu"))
    assert rank.shape == (2, 1 << 16) and rank.dtype == torch.int32
    assert bin_value.numel() % 1024 == 0 and bin_value.numel() <= 1 << 16
    scores = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype).float()
    errors = torch.stack([scores + bg_offset, 1 - scores])
    keys = errors.view(torch.int32)
    keys = torch.where(keys > 0, keys, 0)
    assert torch.equal(bin_value[rank.long()].view(torch.int32), keys)
    order = torch.argsort(keys.reshape(-1))
    ranks = rank.reshape(-1)[order]
    assert bool((ranks.diff() >= 0).all())
    assert torch.unique(ranks).numel() == torch.unique(keys).numel()
    assert int(rank.min()) == 0 and int(keys.reshape(-1)[rank.reshape(-1) == 0].max()) == 0


# ----------------------------------------------------------------- launches and tiles

def test_every_launch_is_one_dimensional(device, monkeypatch, gen):
    """Every kernel runs on a 1-D grid (CUDA allows 2^31 − 1 programs on axis 0, only 65535
    on axes 1 and 2, which a segment of 2^26 pixels in 1024-pixel tiles passes): the programs
    are (segment, tile) pairs, counted here. A grid past axis 0's limit is refused clearly.

    The interpreter cannot run 65536 programs in test time; the flattened index math is what
    every tiled test runs (many segments × many tiles), and tests/triton_sm90.py compiles it.
    """
    module = _module()
    grids = []
    for name in ("_build_keys_kernel", "_tile_counts_kernel", "_scan_tiles_kernel",
                 "_apply_kernel", "_segment_loss_kernel", "_histogram_kernel",
                 "_histogram_scan_kernel", "_histogram_gather_kernel", "_small_segment_kernel"):
        monkeypatch.setattr(module, name, _GridSpy(getattr(module, name), name, grids))
    # compiled, the key and apply kernels launch through their autotuners
    monkeypatch.setattr(module, "_build_keys_tuned",
                        _GridSpy(module._build_keys_tuned, "_build_keys_kernel", grids))
    monkeypatch.setattr(module, "_apply_tuned",
                        _GridSpy(module._apply_tuned, "_apply_kernel", grids))
    probas = torch.randn(2, 3, 50, generator=gen).softmax(dim=1).half()
    labels = torch.randint(0, 3, (2, 50), generator=gen)
    for strategy in ("rows", "flat", "histogram"):
        with module._override(tile=16, scan_block=4, sort=strategy, small_segment_max=0):
            _loss_and_grad("softmax", probas, labels, "triton", device, per_image=False)
    with module._override(small_segment_max=4096):
        _loss_and_grad("softmax", probas, labels, "triton", device, per_image=True)
    assert all(len(grid) == 1 for _, grid in grids), grids
    programs = dict(grids)
    # 3 batch segments of 2 images × 4 pixel tiles; 3 segments × 7 tiles of 100 sorted pixels
    assert programs["_build_keys_kernel"] == (3 * 2 * 4,)
    assert programs["_apply_kernel"] == (3 * 7,) and programs["_scan_tiles_kernel"] == (3,)
    assert programs["_histogram_kernel"] == (3 * 2 * 4,)
    assert programs["_small_segment_kernel"] == (6,)
    with pytest.raises(ValueError, match="more than a CUDA grid holds"):
        module._launch(module._segment_loss_kernel, 2**31, None, None, 1)


class _GridSpy:
    """A kernel stand-in that records the grid of each launch and launches the kernel."""

    def __init__(self, kernel, name, grids):
        self.kernel, self.name, self.grids = kernel, name, grids

    def __getitem__(self, grid):
        self.grids.append((self.name, tuple(grid)))
        launch = self.kernel[grid]
        if type(self.kernel).__name__ == "Autotuner":  # it picks num_warps: _launch adds one
            return lambda *args, num_warps=None, **meta: launch(*args, **meta)
        return launch


def test_tile_is_chosen_per_call_never_by_the_autotuner():
    """The count and apply kernels must cut rows into the same tiles. The tile is a pure
    function of the call's sizes and settings; the autotuners vary num_warps only (results do
    not depend on it), so no thread can count with one tile and apply with another."""
    module = _module()
    for tuned in (module._build_keys_tuned, module._apply_tuned):
        assert all(config.kwargs == {} for config in tuned.configs)
        assert len({config.num_warps for config in tuned.configs}) == len(tuned.configs)
    assert module._tile(3000) == module._tile(3000)
    with module._override(tile=64):
        assert module._tile(10) == module._tile(1 << 30) == 64


def test_concurrent_calls_of_different_sizes(device, gen):
    """Two threads, sizes with different tiles, interleaved launches: each call keeps its own
    tile (no shared tuning state decides it), so both gradients match the reference.

    (The interpreter's grid position is process-wide, so interpreted launches take turns; the
    calls still interleave kernel by kernel.)
    """
    import threading

    inputs = []
    for num_pixels in (2000, 40000):  # interpreter tiles 1024 and 4096
        errors = distinct_float32(num_pixels, gen)
        inputs.append((errors, torch.rand(1, num_pixels, generator=gen) < 0.3))
    if device == "cpu":  # compiled kernels take one tile at every size
        assert len({_module()._tile(e.shape[1]) for e, _ in inputs}) == 2
    results = [None, None]
    barrier = threading.Barrier(2)

    def work(index):
        errors, fg = inputs[index]
        barrier.wait()
        for _ in range(2):
            results[index] = lovasz_extension(errors.to(device), fg.to(device), backend="triton")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    with _module()._override(small_segment_max=0, sort="rows"):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for (errors, fg), (loss, grad) in zip(inputs, results):
        _compare(errors, fg, loss.cpu(), grad.cpu(), f"thread {errors.shape[1]}")


# ------------------------------------------------- the fused loss at real sizes (and small)

def _check_fused_loss(probas, labels, per_image, device, what):
    """The backend's fused ``lovasz_loss`` on ``device`` against the numpy reference run on the
    (S, P) float64 errors of the same plan: the loss, and per (segment, error value) the sum of
    the unsigned increments (the gradient divided by ∓weight): invariant to the order of ties,
    which the sort breaks by label and the histogram by averaging per class."""
    module = _module()
    num_classes = probas.shape[1]
    plan = _plan.plan_segments(labels.to(device), num_classes, "present", [], None, per_image,
                               255, 0.0)
    loss, grad = module.lovasz_loss(probas.to(device), labels.to(device), plan)
    plan = _plan.SegmentPlan(**{name: getattr(plan, name).cpu()
                                if isinstance(getattr(plan, name), torch.Tensor)
                                else getattr(plan, name) for name in plan.__dataclass_fields__})
    errors, fg = _plan.segment_errors(probas, labels, plan)
    ref_segment_loss, ref_increments = get_backend("numpy").run(errors.double(), fg)
    ref_loss = torch.dot(ref_segment_loss.double(), plan.weight)
    assert loss.dtype == torch.float64 and grad.dtype == errors.dtype
    assert_close_report(loss.cpu(), ref_loss, LOSS_TOLERANCE[torch.float32], f"{what} loss")
    grad = grad.cpu().double()
    if plan.image is None:
        rows = grad[:, plan.channel].transpose(0, 1).reshape(plan.num_segments, -1)
    else:
        rows = grad[plan.image, plan.channel]
    counted = plan.weight > 0
    signed_weight = torch.where(fg, -1.0, 1.0) * plan.weight[:, None]
    increments = rows[counted] / signed_weight[counted]
    assert not rows[~counted].any(), f"{what}: segments of weight 0 got a gradient"
    assert_close_report(tie_group_sums(errors[counted], increments),
                        tie_group_sums(errors[counted], ref_increments[counted]),
                        GRAD_TOLERANCE[errors.dtype], f"{what} tie-group increments")


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_fused_loss_against_reference_errors(device, monkeypatch, strategy, gen):
    """The check the CUDA test below runs at real sizes, here on a few hundred pixels."""
    monkeypatch.setitem(_plan._SETTINGS, "read_values_on_cpu", False)  # dense, as on a GPU
    probas = torch.randn(2, 4, 150, generator=gen).softmax(dim=1).half()
    labels = torch.randint(0, 3, (2, 150), generator=gen)
    labels[:, :10] = 255
    with _module()._override(tile=64, scan_block=2, small_segment_max=0, sort=strategy):
        for per_image in (False, True):
            _check_fused_loss(probas, labels, per_image, device, f"{strategy} {per_image}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", ["auto", *STRATEGIES], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, per_image", [
    ((2, 21, 5000), False), ((4, 5, 3000), True), ((2, 3, 700), True), ((8, 3, 64), False)],
    ids=str)
def test_cuda_fused_loss_matches_reference(dtype, strategy, shape, per_image, gen):
    """Compiled fused kernels (default tile, autotuned warps) through every strategy: batch and
    per-image segments, tiled and in registers, odd sizes; the reference stays cheap on the CPU
    (tests/test_gpu.py takes the fused loss to 2^20 x 21 against float64 on the GPU)."""
    probas = torch.randn(*shape, generator=gen).softmax(dim=1).to(dtype)
    labels = torch.randint(0, shape[1], (shape[0], shape[2]), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.05] = 255
    with _module()._override(sort=strategy):
        _check_fused_loss(probas, labels, per_image, "cuda", f"cuda {dtype} {strategy} {shape}")
