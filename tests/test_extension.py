"""The bare kernel: every backend against the numpy reference and the naive oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lovasz_kernels import get_backend, lovasz_extension
from lovasz_kernels._cases import extension_cases, tie_group_sums
from reference import naive
from tests.helpers import (
    GRAD_TOLERANCE,
    LOSS_TOLERANCE,
    assert_close_report,
    distinct_float32,
    peak_allocated_bytes,
    tie_free_errors,
)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 2), (4, 7), (5, 123), (2, 1000), (1, 4099)]


def _run(backend: str, errors: torch.Tensor, fg: torch.Tensor):
    return lovasz_extension(errors, fg, backend=backend)


def _reference(errors: torch.Tensor, fg: torch.Tensor):
    return get_backend("numpy").run(errors, fg)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_tie_free(backend, dtype, shape, gen):
    errors = tie_free_errors(shape, dtype, gen)
    fg = torch.rand(shape, generator=gen) < 0.3
    loss, grad = _run(backend, errors, fg)
    ref_loss, ref_grad = _reference(errors, fg)
    assert loss.dtype == torch.promote_types(dtype, torch.float32)
    assert grad.dtype == dtype
    assert_close_report(loss, ref_loss, LOSS_TOLERANCE[dtype], f"{backend} loss")
    assert_close_report(grad, ref_grad, GRAD_TOLERANCE[dtype], f"{backend} grad")


@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize("fg_rate", [0.0, 0.2, 1.0])
def test_matches_naive_oracle_fp64(backend, gen, fg_rate, with_padding):
    """The acceptance bar: agreement with the O(P^2) definition to 1e-6 in fp64."""
    errors = tie_free_errors((3, 60), torch.float64, gen)
    fg = torch.rand(3, 60, generator=gen) < fg_rate
    if with_padding:
        errors[:, 45:] = -torch.inf
        errors[2] = -torch.inf
        fg &= errors > -torch.inf
    loss, grad = _run(backend, errors, fg)
    for s in range(3):
        oracle_loss, oracle_grad = naive.lovasz_extension(errors[s].tolist(), fg[s].tolist())
        assert loss[s].item() == pytest.approx(oracle_loss, abs=1e-6, rel=1e-6)
        np.testing.assert_allclose(grad[s].numpy(), oracle_grad, rtol=1e-6, atol=1e-9)


def test_closed_form_has_no_cancellation(backend, gen):
    """Float32 gradients stay within a few ulps of the float64 definition at 2^20 pixels,
    where the paper's jaccard[1:] - jaccard[:-1] in float32 is off by percents."""
    num_pixels = 1 << 20
    errors = distinct_float32(num_pixels, gen)
    fg = torch.rand(1, num_pixels, generator=gen) < 0.5
    _, grad = _run(backend, errors, fg)
    _, ref_grad = _reference(errors.double(), fg)
    assert_close_report(grad, ref_grad, GRAD_TOLERANCE[torch.float32], f"{backend} grad")


def test_ties_loss_and_tie_group_gradients(backend, gen):
    errors = torch.randint(-3, 5, (6, 300), generator=gen).double() / 4
    fg = torch.rand(6, 300, generator=gen) < 0.4
    loss, grad = _run(backend, errors, fg)
    ref_loss, ref_grad = _reference(errors, fg)
    assert_close_report(loss, ref_loss, LOSS_TOLERANCE[torch.float64], "loss on ties")
    assert_close_report(
        tie_group_sums(errors, grad), tie_group_sums(errors, ref_grad),
        GRAD_TOLERANCE[torch.float64], "gradient summed over each tie group",
    )


def test_ties_subgradient_inequality(backend, gen):
    """On tied inputs g is some subgradient: f(y) >= <g, y> for all y, f(x) = <g, x>."""
    errors = torch.randint(-2, 4, (4, 80), generator=gen).double()
    fg = torch.rand(4, 80, generator=gen) < 0.5
    loss, grad = _run(backend, errors, fg)
    assert torch.allclose(loss, (grad * errors.clamp_min(0)).sum(1), atol=1e-12)
    for _ in range(20):
        other = torch.randn(4, 80, generator=gen, dtype=torch.float64) * 3
        other_loss, _ = _reference(other, fg)
        # g vanishes where errors <= 0 and g >= 0, so <g, relu(y)> >= <g, y> bounds it too
        assert bool((other_loss >= (grad * other.clamp_min(0)).sum(1) - 1e-12).all())


def test_binary_vectors_equal_jaccard_set_function(backend, gen):
    """The extension interpolates Δ_J: on an indicator vector 1_M it equals Δ_J(M)."""
    for _ in range(10):
        mispredicted = torch.rand(1, 40, generator=gen) < 0.3
        fg = torch.rand(1, 40, generator=gen) < 0.4
        loss, _ = _run(backend, mispredicted.double(), fg)
        expected = naive.jaccard_set_loss(
            set(torch.nonzero(mispredicted[0]).flatten().tolist()),
            set(torch.nonzero(fg[0]).flatten().tolist()),
        )
        assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_edge_cases(backend):
    # empty segment: no valid pixel
    loss, grad = _run(backend, torch.full((2, 5), -torch.inf), torch.zeros(2, 5, dtype=torch.bool))
    assert loss.tolist() == [0.0, 0.0] and bool((grad == 0).all())
    # no foreground: the loss is the largest positive error, all on that pixel
    errors = torch.tensor([[0.2, 0.7, -0.1, 0.5]], dtype=torch.float64)
    loss, grad = _run(backend, errors, torch.zeros(1, 4, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.7)
    assert grad.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    # one pixel, foreground and background
    for is_fg in (True, False):
        loss, grad = _run(backend, torch.tensor([[0.25]]), torch.tensor([[is_fg]]))
        assert loss.item() == pytest.approx(0.25) and grad.item() == pytest.approx(1.0)
    # all errors <= 0 (including -0.0): loss 0, gradient 0
    errors = torch.tensor([[-0.0, 0.0, -1.0, -torch.inf]])
    loss, grad = _run(backend, errors, torch.tensor([[True, False, True, False]]))
    assert loss.item() == 0.0 and bool((grad == 0).all())
    # S = 0 or P = 0
    for shape in ((0, 4), (3, 0)):
        loss, grad = _run(backend, torch.zeros(shape), torch.zeros(shape, dtype=torch.bool))
        assert loss.shape == (shape[0],) and grad.shape == shape


def test_padding_does_not_change_the_answer(backend, gen):
    """-inf padding appended anywhere leaves loss and real-pixel gradients unchanged."""
    errors = tie_free_errors((3, 50), torch.float64, gen)
    fg = torch.rand(3, 50, generator=gen) < 0.3
    loss, grad = _run(backend, errors, fg)
    padded = torch.full((3, 80), -torch.inf, dtype=torch.float64)
    padded_fg = torch.zeros(3, 80, dtype=torch.bool)
    positions = torch.randperm(80, generator=gen)[:50].sort().values
    padded[:, positions], padded_fg[:, positions] = errors, fg
    padded_loss, padded_grad = _run(backend, padded, padded_fg)
    assert torch.allclose(padded_loss, loss, rtol=1e-12, atol=0)
    assert torch.allclose(padded_grad[:, positions], grad, rtol=1e-12, atol=0)
    mask = torch.ones(80, dtype=torch.bool)
    mask[positions] = False
    assert bool((padded_grad[:, mask] == 0).all())


def test_inputs_are_not_modified(backend, gen):
    errors = tie_free_errors((2, 30), torch.float32, gen)
    fg = torch.rand(2, 30, generator=gen) < 0.5
    errors_copy, fg_copy = errors.clone(), fg.clone()
    _run(backend, errors, fg)
    assert torch.equal(errors, errors_copy) and torch.equal(fg, fg_copy)


def test_non_contiguous_inputs(backend, gen):
    errors = tie_free_errors((40, 6), torch.float64, gen).t()
    fg = (torch.rand(40, 6, generator=gen) < 0.5).t()
    loss, grad = _run(backend, errors, fg)
    ref_loss, ref_grad = _reference(errors.contiguous(), fg.contiguous())
    assert_close_report(loss, ref_loss, LOSS_TOLERANCE[torch.float64], "loss")
    assert_close_report(grad, ref_grad, GRAD_TOLERANCE[torch.float64], "grad")


def test_check_cases_agree_with_reference(backend):
    """The cases `lovasz-kernels check` runs, here as a test."""
    for case in extension_cases():
        loss, grad = _run(backend, case.errors, case.fg)
        ref_loss, ref_grad = _reference(case.errors, case.fg)
        dtype = case.errors.dtype
        assert_close_report(loss, ref_loss, LOSS_TOLERANCE[dtype], f"{case.name} loss")
        if case.tie_free:
            assert_close_report(grad, ref_grad, GRAD_TOLERANCE[dtype], f"{case.name} grad")
        else:
            assert_close_report(
                tie_group_sums(case.errors, grad), tie_group_sums(case.errors, ref_grad),
                GRAD_TOLERANCE[dtype], f"{case.name} tie-group grad",
            )


@pytest.mark.slow
def test_huge_segment_gradient_matches_float64(backend, gen):
    """2^25 pixels in one segment: float32 counts would be wrong above 2^24.

    Errors are 2^25 distinct float32 values (consecutive bit patterns from 0.5 up), shuffled,
    so the sorted order is known without sorting; the expected increments are the Jaccard
    differences from the definition in float64 (error ~1e-9 relative at this size).
    """
    num_pixels = 1 << 25
    ranks = torch.randperm(num_pixels, generator=gen)  # pixel i has the ranks[i]-th largest
    bits = 0x3F000000 + (num_pixels - 1 - ranks).to(torch.int32)
    errors = bits.view(torch.float32).reshape(1, -1)
    fg_sorted = torch.rand(num_pixels, generator=gen) < 0.3
    fg = fg_sorted[ranks].reshape(1, -1)
    del bits
    _, grad = _run(backend, errors, fg)

    fg_seen = np.cumsum(fg_sorted.numpy(), dtype=np.int64)
    n_fg = int(fg_seen[-1])
    position = np.arange(1, num_pixels + 1, dtype=np.int64)
    jaccard = 1.0 - (n_fg - fg_seen) / (n_fg + position - fg_seen).astype(np.float64)
    expected_sorted = np.diff(jaccard, prepend=0.0)
    expected = torch.from_numpy(expected_sorted)[ranks]
    del jaccard, fg_seen, position, expected_sorted
    assert_close_report(grad[0], expected, GRAD_TOLERANCE[torch.float32], f"{backend} 2^25 grad")
    assert math.isclose(float(grad.double().sum()), 1.0, rel_tol=1e-6)  # telescopes to Δ(V)


@pytest.mark.parametrize("segments", [1, 2, 8])
def test_torch_backend_needs_21_bytes_per_pixel(gen, segments):
    """The torch backend's temporaries, float32: its own (S, P) keys-counts-gradient array
    and one block for the sort's outputs, the increments and the sorted labels (4 + 17 bytes
    per pixel), plus one row's worth of the sort's index row and the positions 1..P (which
    weigh most with one segment) and a column block of the float64 loss sum. The inputs'
    size is not counted."""
    num_pixels = 1 << 16
    errors = torch.randn(segments, num_pixels, generator=gen)
    fg = torch.rand(segments, num_pixels, generator=gen) < 0.3
    backend = get_backend("torch")
    backend.run(errors, fg)  # first-call allocations (thread pools, caches) are not the call's
    per_pixel = peak_allocated_bytes(lambda: backend.run(errors, fg)) / errors.numel()
    assert 21 <= per_pixel <= 21 + 8 / segments + 1.5


def test_numpy_reference_widens_one_segment_at_a_time(gen):
    """The reference computes in float64 one segment at a time and rounds each segment's
    gradient into the float32 result as it goes: its numpy arrays peak at the gradient plus
    one segment's float64 work (~90 bytes per pixel), not float64 copies of every row."""
    import tracemalloc

    segments, num_pixels = 16, 1 << 16
    errors = torch.randn(segments, num_pixels, generator=gen)
    fg = torch.rand(segments, num_pixels, generator=gen) < 0.3
    backend = get_backend("numpy")
    backend.run(errors, fg)
    tracemalloc.start()
    try:
        backend.run(errors, fg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= errors.numel() * 4 + 128 * num_pixels


def test_torch_backend_chunks_many_segments_within_the_gradients_size(gen, monkeypatch):
    """Many segments at once run in chunks of rows whose temporaries fit the gradient's
    size: the same bits as one chunk, at a fraction of its memory."""
    import lovasz_kernels._plan as _plan

    errors = tie_free_errors((24, 4096), torch.float32, gen)
    fg = torch.rand(errors.shape, generator=gen) < 0.3
    backend = get_backend("torch")
    whole = backend.run(errors, fg)
    whole_peak = peak_allocated_bytes(lambda: backend.run(errors, fg))
    monkeypatch.setattr(_plan, "CPU_CHUNK_FLOOR_BYTES", 0)  # chunk this small input
    chunked = backend.run(errors, fg)
    chunked_peak = peak_allocated_bytes(lambda: backend.run(errors, fg))
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
    gradient_bytes = errors.numel() * 4
    assert chunked_peak <= 2.5 * gradient_bytes < whole_peak / 2


def test_set_chunk_floor_moves_the_floor_and_checks_its_arguments(gen, monkeypatch):
    """``lovasz_kernels.set_chunk_floor``: a floor per device type (every GPU is "cuda"),
    None restores the default; the chunks follow it with the same answer; bad arguments
    get a clear error."""
    from lovasz_kernels import _plan, set_chunk_floor

    monkeypatch.setattr(_plan, "_FLOORS_SET", {})
    cpu, gpu = torch.device("cpu"), torch.device("meta")
    set_chunk_floor("cuda", 32 << 20)
    assert _plan.chunk_floor_bytes(gpu) == 32 << 20 and _plan.chunk_floor_bytes(cpu) == 32 << 20
    set_chunk_floor("cpu", 0)
    assert _plan.chunk_floor_bytes(cpu) == 0
    set_chunk_floor("cuda", None)
    assert _plan.chunk_floor_bytes(gpu) == _plan.GPU_CHUNK_FLOOR_BYTES
    errors = tie_free_errors((24, 4096), torch.float32, gen)
    fg = torch.rand(errors.shape, generator=gen) < 0.3
    backend = get_backend("torch")
    chunked = backend.run(errors, fg)
    chunked_peak = peak_allocated_bytes(lambda: backend.run(errors, fg))
    set_chunk_floor("cpu", None)
    assert _plan.chunk_floor_bytes(cpu) == _plan.CPU_CHUNK_FLOOR_BYTES
    whole = backend.run(errors, fg)
    whole_peak = peak_allocated_bytes(lambda: backend.run(errors, fg))
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
    assert chunked_peak < whole_peak / 2
    with pytest.raises(ValueError, match="device_type must be 'cpu' or 'cuda'; got 'gpu'"):
        set_chunk_floor("gpu", 1)
    with pytest.raises(TypeError, match="num_bytes must be an int"):
        set_chunk_floor("cuda", 1.5)
    with pytest.raises(TypeError, match="num_bytes must be an int"):
        set_chunk_floor("cuda", True)
    with pytest.raises(ValueError, match="num_bytes must be >= 0; got -1"):
        set_chunk_floor("cuda", -1)
    set_chunk_floor("cuda", np.int64(1 << 20))  # numpy integers are ints
    assert _plan.chunk_floor_bytes(gpu) == 1 << 20 and _plan._FLOORS_SET == {"cuda": 1 << 20}


@pytest.mark.parametrize("device, floor", [("cpu", 32 << 20), ("meta", 512 << 20)])
def test_generic_chunks_are_at_least_the_devices_floor(device, floor):
    """The generic path holds a gradient's size of temporaries at once, or the device's
    floor when that is larger: 32 MB on the CPU, 512 MB on a GPU (on a GPU a chunk is a
    whole pipeline of launches, and chunks much under that were several times slower)."""
    from lovasz_kernels._plan import (
        GENERIC_BYTES_PER_PIXEL,
        SegmentPlan,
        chunk_floor_bytes,
        segments_per_chunk,
    )

    assert chunk_floor_bytes(torch.device(device)) == floor
    num_pixels = 1 << 20
    # 21 segments of 2^20 pixels, 88 MB of float32 scores: no memory behind them
    scores = torch.empty((), device=device).expand(1, 21, num_pixels)
    channel = torch.arange(21)
    plan = SegmentPlan(image=None, channel=channel, fg_label=channel,
                       weight=torch.full((21,), 1 / 21, dtype=torch.float64), bg_offset=0.0,
                       ignore_index=None, dense=True)
    # CPU: the gradient's 88 MB hold one segment's 64 MB, but every thread sorts a row;
    # GPU: 512 MB hold eight
    expected = max(1, torch.get_num_threads()) if device == "cpu" else 8
    assert GENERIC_BYTES_PER_PIXEL * num_pixels == 64 << 20
    assert segments_per_chunk(plan, scores) == expected


def test_torch_backend_runs_long_rows_one_at_a_time(gen, monkeypatch):
    """Radix-sorted rows of at least ``ROW_BY_ROW_MIN_PIXELS`` go through the extension one
    by one, with one row's work arrays: the chunk-at-once answer bit for bit, with less than
    half its temporaries for four rows."""
    import lovasz_kernels.backends.torch_eager as torch_eager

    errors = torch.randn(4, 1 << 16, generator=gen)
    errors[0, :20] = -0.0
    errors[1, -30:] = -torch.inf
    errors[3] = errors[3].round(decimals=1)  # ties
    fg = torch.rand(errors.shape, generator=gen) < 0.3
    fg[2] = False  # no foreground: the first mistake costs the whole loss
    backend = get_backend("torch")

    def run_and_measure():
        backend.run(errors, fg)  # first-call allocations are not the call's
        per_pixel = peak_allocated_bytes(lambda: backend.run(errors, fg)) / errors.numel()
        return backend.run(errors, fg), per_pixel

    blocks = []
    real_block = torch_eager._extension_block
    monkeypatch.setattr(torch_eager, "_extension_block",
                        lambda e, *args: blocks.append(e.shape[0]) or real_block(e, *args))
    whole, whole_bytes = run_and_measure()
    assert set(blocks) == {4}  # under the minimum: the chunk at once
    blocks.clear()
    monkeypatch.setattr(torch_eager, "ROW_BY_ROW_MIN_PIXELS", 1 << 16)
    by_row, by_row_bytes = run_and_measure()
    assert set(blocks) == {1}
    assert torch.equal(by_row[0], whole[0]) and torch.equal(by_row[1], whole[1])
    assert whole_bytes >= 21 and by_row_bytes <= whole_bytes / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_torch_backend_keeps_small_work_arrays_per_thread(gen, monkeypatch, dtype):
    """Small CPU chunks keep their work arrays between calls: whatever an earlier call left
    in them (here garbage), the next call gives the bits of fresh arrays; inference mode keeps
    its own (written outside it, its arrays would raise); at most ``KEPT_WORK_SHAPES`` shapes
    are kept; each thread keeps its own."""
    import threading

    import lovasz_kernels.backends.torch_eager as torch_eager

    errors = torch.randn(2, 3000, generator=gen, dtype=dtype).round(decimals=1)  # ties
    errors[1, -40:] = -torch.inf
    errors[0, :30] = -0.0
    fg = (torch.rand(errors.shape, generator=gen) < 0.3) & (errors > -torch.inf)
    # short float32 rows sorted by numpy go on in numpy, with no torch work arrays
    monkeypatch.setattr(torch_eager, "NUMPY_MAX_PIXELS", 0)
    with monkeypatch.context() as patched:
        patched.setattr(torch_eager, "KEPT_WORK_MAX_ELEMENTS", 0)  # nothing kept
        fresh = torch_eager.lovasz_extension(errors, fg)

    def same_as_fresh(result):
        return torch.equal(result[0], fresh[0]) and torch.equal(result[1], fresh[1])

    monkeypatch.setattr(torch_eager, "_kept_work", threading.local())
    assert same_as_fresh(torch_eager.lovasz_extension(errors, fg))
    kept = torch_eager._kept_work.arrays
    assert kept and all(array.shape == errors.shape for arrays in kept.values()
                        for array in arrays)
    for arrays in kept.values():
        for array in arrays:
            if array.dtype.is_floating_point:
                array.fill_(torch.nan)
            else:
                array.copy_(torch.randint(-9, 9, array.shape, generator=gen))
    assert same_as_fresh(torch_eager.lovasz_extension(errors, fg))

    kept.clear()  # arrays made in inference mode first
    with torch.inference_mode():
        assert same_as_fresh(torch_eager.lovasz_extension(errors, fg))
    assert same_as_fresh(torch_eager.lovasz_extension(errors, fg))

    for columns in range(100, 100 + 2 * torch_eager.KEPT_WORK_SHAPES):
        torch_eager.lovasz_extension(errors[:, :columns], fg[:, :columns])
        assert len(torch_eager._kept_work.arrays) <= torch_eager.KEPT_WORK_SHAPES

    in_thread = {}

    def other_thread():
        in_thread["result"] = torch_eager.lovasz_extension(errors, fg)
        in_thread["store"] = torch_eager._kept_work.arrays

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert same_as_fresh(in_thread["result"])
    assert in_thread["store"] is not torch_eager._kept_work.arrays


def test_torch_backend_overwrites_only_errors_it_is_given(gen):
    """``lovasz_extension_`` (errors the loss layer gives up) holds the gradient in the
    errors' storage when they are contiguous and in the compute dtype, with the bits of
    ``lovasz_extension`` (its losses in float64, the same values rounded once less);
    otherwise it leaves them alone and allocates, as that does."""
    import lovasz_kernels.backends.torch_eager as torch_eager

    errors = torch.randn(3, 5000, generator=gen)
    errors[1, -40:] = -torch.inf
    errors[2, :30] = -0.0
    fg = (torch.rand(errors.shape, generator=gen) < 0.3) & (errors > -torch.inf)
    expected = torch_eager.lovasz_extension(errors, fg)
    scratch = errors.clone()
    loss, grad = torch_eager.lovasz_extension_(scratch, fg)
    assert grad.data_ptr() == scratch.data_ptr()
    assert loss.dtype == torch.float64 and torch.equal(loss.float(), expected[0])
    assert torch.equal(grad, expected[1])

    for kept in (errors.half(), errors.t().contiguous().t()):  # 16-bit; not contiguous
        before = kept.clone()
        loss, grad = torch_eager.lovasz_extension_(kept, fg)
        assert grad.data_ptr() != kept.data_ptr() and torch.equal(kept, before)
        reference = torch_eager.lovasz_extension(before, fg)
        assert torch.equal(loss, reference[0]) and torch.equal(grad, reference[1])


def test_generic_loss_path_lets_the_backend_reuse_its_errors(gen, monkeypatch):
    """The generic path hands the torch backend its own errors to overwrite: a hinge loss
    allocates about one input's size less at its peak, with the same loss and gradient; a
    backend without ``lovasz_extension_`` gets ``lovasz_extension`` (the user's tensors are
    never overwritten: the public extension)."""
    import lovasz_kernels.backends.torch_eager as torch_eager
    from lovasz_kernels import lovasz_hinge

    logits = torch.randn(1, 256, 256, generator=gen)
    masks = (torch.rand(1, 256, 256, generator=gen) < 0.3).long()

    def call():
        scores = logits.clone().requires_grad_()
        loss = lovasz_hinge(scores, masks, backend="torch")
        loss.backward()
        return loss.detach(), scores.grad

    reused = call()
    reused_peak = peak_allocated_bytes(call)
    monkeypatch.delattr(torch_eager, "lovasz_extension_")
    copied = call()
    copied_peak = peak_allocated_bytes(call)
    assert torch.equal(reused[0], copied[0]) and torch.equal(reused[1], copied[1])
    assert copied_peak - reused_peak >= 0.9 * logits.numel() * logits.element_size()

    errors = torch.randn(2, 300, generator=gen)
    fg = torch.rand(errors.shape, generator=gen) < 0.3
    before = errors.clone()
    numpy_result = get_backend("numpy").run_on_scratch(errors, fg)
    assert torch.equal(errors, before)
    reference = get_backend("numpy").run(errors, fg)
    assert torch.equal(numpy_result[0], reference[0])
    assert torch.equal(numpy_result[1], reference[1])
