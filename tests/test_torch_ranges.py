"""The torch backend's rows too long for the call's memory budget: sorted one range of error
values at a time (torch_eager._extension_by_ranges), with the answer of sorting the whole row
and a bounded peak; and the pieces it stands on (increments of a later part of a row, masks
counted in blocks, the loss layer's errors made in blocks)."""

from __future__ import annotations

import pytest
import torch

from lovasz_kernels import (
    _jaccard,
    _masked,
    _plan,
    _torch_sort,
    get_backend,
    lovasz_hinge,
    lovasz_softmax,
)
from lovasz_kernels.backends import torch_eager
from lovasz_kernels.bench.measure import NumpyAllocationPeakMeter
from tests.helpers import (
    GRAD_TOLERANCE,
    LOSS_TOLERANCE,
    assert_close_report,
    distinct_float32,
    peak_allocated_bytes,
)
from tests.test_extension import _reference


def _signed_distinct(shape, dtype, gen, positive_share):
    """(S, P) errors, no two of the same magnitude, about ``positive_share`` of them > 0."""
    rows, cols = shape
    magnitudes = distinct_float32(rows * cols, gen).reshape(rows, cols).to(dtype)
    positive = torch.rand(shape, generator=gen) < positive_share
    return torch.where(positive, magnitudes, -magnitudes)


def _by_ranges(errors, fg, range_pixels):
    grad = torch.empty_like(errors)
    loss = torch.cat([torch_eager._extension_by_ranges(errors[row:row + 1].clone(),
                                                       fg[row:row + 1], grad[row:row + 1],
                                                       range_pixels)
                      for row in range(errors.shape[0])])
    return loss, grad


def _record_ranges(monkeypatch) -> list[int]:
    """A list that each call of ``_extension_by_ranges`` appends its range size to."""
    calls = []
    real = torch_eager._extension_by_ranges
    monkeypatch.setattr(torch_eager, "_extension_by_ranges",
                        lambda *args: calls.append(args[-1]) or real(*args))
    return calls


def _assert_loss_matches_reference(call, scores, labels, **options):
    """``call`` (a loss) with the torch backend and with the numpy reference: the same loss
    and gradient w.r.t. ``scores`` (float64: no ties, one gradient)."""
    results = {}
    for backend in ("torch", "numpy"):
        x = scores.clone().requires_grad_()
        loss = call(x, labels, backend=backend, **options)
        loss.backward()
        results[backend] = loss.detach(), x.grad
    assert_close_report(results["torch"][0], results["numpy"][0],
                        LOSS_TOLERANCE[torch.float64], "loss")
    assert_close_report(results["torch"][1], results["numpy"][1],
                        GRAD_TOLERANCE[torch.float64], "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("range_pixels", [1, 777, 5000, 1 << 20])
def test_ranges_give_the_whole_rows_gradient_bit_for_bit(gen, dtype, range_pixels):
    """Rows with all, half and no errors positive, -inf padding, a -0.0 and a row without
    foreground, cut into ranges of every size from one pixel to the whole row: the gradient
    of sorting each whole row bit for bit (no errors tie), the loss up to the order of its
    float64 sum, and both the numpy reference's."""
    columns = 3000
    errors = _signed_distinct((5, columns), dtype, gen, positive_share=0.5)
    errors[0] = errors[0].abs()
    errors[1] = -errors[1].abs()
    errors[2, columns // 2:] = -torch.inf
    errors[3, 11] = -0.0
    fg = torch.rand(errors.shape, generator=gen) < 0.4
    fg[2, columns // 2:] = False
    fg[4] = False
    if range_pixels == 1:  # every positive error a range of its own: a short row will do
        errors, fg = errors[:, :300], fg[:, :300]
    loss, grad = _by_ranges(errors, fg, range_pixels)
    whole_grad = torch.empty_like(errors)
    whole_loss = torch_eager._extension_block(errors.clone(), fg, whole_grad)
    assert torch.equal(grad, whole_grad)
    torch.testing.assert_close(loss, whole_loss, rtol=1e-12, atol=0)
    assert bool((grad[errors <= 0] == 0).all()) and not bool(torch.signbit(grad).any())
    ref_loss, ref_grad = _reference(errors, fg)
    assert_close_report(loss.to(dtype), ref_loss, LOSS_TOLERANCE[dtype], "loss")
    assert_close_report(grad, ref_grad, GRAD_TOLERANCE[dtype], "grad")


def test_ranges_with_tied_errors_keep_each_tie_groups_gradient(gen):
    """Ties across a range's edge and within ranges (errors in steps of 1/8): the loss and each
    tie group's gradient sum are the reference's."""
    from lovasz_kernels._cases import tie_group_sums

    errors = (torch.randn(2, 20000, generator=gen) * 8).round() / 8
    fg = torch.rand(errors.shape, generator=gen) < 0.5
    loss, grad = _by_ranges(errors, fg, 1500)
    ref_loss, ref_grad = _reference(errors, fg)
    assert_close_report(loss.float(), ref_loss, LOSS_TOLERANCE[torch.float32], "loss")
    assert_close_report(tie_group_sums(errors, grad), tie_group_sums(errors, ref_grad),
                        GRAD_TOLERANCE[torch.float32], "tie-group grad")


def test_which_rows_go_by_ranges(gen, monkeypatch):
    """Over the budget: rows from RANGES_MIN_PIXELS with at most RANGES_MAX_POSITIVE_SHARE of
    a strided sample positive, every row from RANGES_ANY_SHARE_MIN_PIXELS. Within it, CPU rows
    from POSITIVES_ONLY_MIN_PIXELS with at most POSITIVES_ONLY_MAX_SHARE positive. Shorter
    rows never."""
    errors = torch.rand(1, 40000, generator=gen)  # every error positive
    fewer = errors.clone()
    fewer[0, ::4] = -fewer[0, ::4]  # three quarters positive
    fewest = -errors
    fewest[0, ::4] = errors[0, ::4]  # a quarter positive
    rows = (errors, fewer, fewest)

    def paying(over_budget):
        return [torch_eager._ranges_pay(row, over_budget) for row in rows]

    assert paying(True) == paying(False) == [False, False, False]
    monkeypatch.setattr(torch_eager, "RANGES_MIN_PIXELS", 40000)
    assert paying(True) == [False, True, True] and paying(False) == [False, False, False]
    monkeypatch.setattr(torch_eager, "POSITIVES_ONLY_MIN_PIXELS", 40000)
    assert paying(False) == [False, False, True]
    assert not torch_eager._ranges_pay(fewest.to("meta"), False)  # not on a GPU
    monkeypatch.setattr(torch_eager, "RANGES_ANY_SHARE_MIN_PIXELS", 40000)
    assert paying(True) == [True, True, True]


def test_partly_trained_hinges_sort_only_their_positive_errors(gen, monkeypatch):
    """A 512² hinge image with about a fifth of its errors positive, within the budget: one
    range of its positive errors, the numpy reference's loss and gradient (float64 logits:
    no ties)."""
    labels = (torch.rand(1, 512, 512, generator=gen) < 0.4).long()
    margins = torch.randn(1, 512, 512, generator=gen, dtype=torch.float64) + 1.84
    logits = (2 * labels - 1) * margins
    calls = _record_ranges(monkeypatch)
    _assert_loss_matches_reference(lovasz_hinge, logits, labels)
    assert len(calls) == 1 and calls[0] >= 512 * 512 // 4


def test_chunks_mix_rows_by_ranges_and_whole_rows(gen, monkeypatch):
    """In one chunk over the budget, a row with many errors ≤ 0 goes by ranges and an all
    positive one whole: each row's gradient is what its own path gives alone."""
    monkeypatch.setattr(_plan, "CPU_CHUNK_FLOOR_BYTES", 1 << 18)
    monkeypatch.setattr(torch_eager, "RANGES_MIN_PIXELS", 1)
    errors = _signed_distinct((2, 1 << 15), torch.float32, gen, positive_share=0.5)
    errors[1] = errors[1].abs()
    fg = torch.rand(errors.shape, generator=gen) < 0.3
    calls = _record_ranges(monkeypatch)
    loss, grad = get_backend("torch").run(errors, fg)
    assert len(calls) == 1
    ref_loss, ref_grad = _reference(errors, fg)
    assert_close_report(loss, ref_loss, LOSS_TOLERANCE[torch.float32], "loss")
    assert_close_report(grad, ref_grad, GRAD_TOLERANCE[torch.float32], "grad")


@pytest.mark.parametrize("tied_share", [1.0, 0.5])
def test_a_tie_group_larger_than_a_range_sorts_the_row_whole(gen, monkeypatch, tied_share):
    """Every error (or half of them) tied at 1, as zero logits give a hinge: the sample's
    edges repeat, and the row is sorted whole rather than as one range holding the group;
    the loss and each tie group's gradient are the reference's."""
    from lovasz_kernels._cases import tie_group_sums

    errors = torch.rand(1, 40000, generator=gen)
    errors[torch.rand(errors.shape, generator=gen) < tied_share] = 1.0
    fg = torch.rand(errors.shape, generator=gen) < 0.4
    blocks = []
    real = torch_eager._extension_block
    monkeypatch.setattr(torch_eager, "_extension_block",
                        lambda *args: blocks.append(args[0].shape) or real(*args))
    loss, grad = _by_ranges(errors, fg, 5000)
    assert blocks == [errors.shape]
    ref_loss, ref_grad = _reference(errors, fg)
    assert_close_report(loss.float(), ref_loss, LOSS_TOLERANCE[torch.float32], "loss")
    assert_close_report(tie_group_sums(errors, grad), tie_group_sums(errors, ref_grad),
                        GRAD_TOLERANCE[torch.float32], "tie-group grad")


def test_range_edges_cut_the_positive_keys_evenly_and_end_at_zero(gen):
    """About ``range_pixels`` positive keys between consecutive edges, the last edge 0; one
    range when they all fit."""
    errors = torch.rand(1, 1 << 18, generator=gen) - 0.25
    keys = errors.clamp(min=0).view(torch.int32)[0]
    edges = torch_eager._range_edges(keys, 1 << 15)
    assert edges[-1] == 0 and edges == sorted(edges, reverse=True)
    positive = int((keys > 0).sum())
    fewest = -(-positive // (1 << 15))
    assert len(edges) in (fewest, fewest + 1)  # the count is estimated from a sample
    bounds = [torch.iinfo(torch.int32).max, *edges]
    sizes = [int(((keys > low) & (keys <= high)).sum()) for high, low in zip(bounds, edges)]
    assert sum(sizes) == positive
    assert max(sizes) <= 1.15 * (1 << 15)
    assert torch_eager._range_edges(keys, 1 << 20) == [0]
    assert torch_eager._range_edges(torch.zeros(1000, dtype=torch.int32), 10) == [0]


def test_rows_over_the_budget_go_by_ranges_with_a_bounded_peak(gen, monkeypatch):
    """A row whose work arrays would not fit in the budget (a small CPU floor here) goes by
    ranges: the same gradient, and a peak of about one range's work plus the row's own
    arrays, under half of sorting it whole."""
    monkeypatch.setattr(_plan, "CPU_CHUNK_FLOOR_BYTES", 1 << 20)
    monkeypatch.setattr(torch_eager, "RANGES_MIN_PIXELS", 1)
    errors = _signed_distinct((1, 1 << 18), torch.float32, gen, positive_share=0.7)
    fg = torch.rand(errors.shape, generator=gen) < 0.3
    backend = get_backend("torch")
    calls = _record_ranges(monkeypatch)
    loss, grad = backend.run(errors, fg)
    # the budget less the row's pick of a range (a byte a pixel)
    range_pixels = ((1 << 20) - (1 << 18)) // torch_eager.RANGE_BYTES_PER_PIXEL[torch.float32]
    assert calls == [range_pixels]
    ranged_peak = peak_allocated_bytes(lambda: backend.run(errors, fg))
    monkeypatch.setattr(_plan, "CPU_CHUNK_FLOOR_BYTES", 1 << 30)
    calls.clear()
    whole_loss, whole_grad = backend.run(errors, fg)
    assert not calls
    whole_peak = peak_allocated_bytes(lambda: backend.run(errors, fg))
    assert torch.equal(grad, whole_grad)
    torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=0)
    # the gradient (4 bytes per pixel), the pick of a range (1), a block of the count of
    # foreground pixels and the budget
    bound = errors.numel() * 5 + 8 * _masked.COUNT_BLOCK_ELEMENTS + (1 << 20)
    assert ranged_peak <= bound < whole_peak / 2


def _loss_with_ignored_pixels(loss_kind, side, gen):
    """(loss, scores, labels): two side² images, float64 scores (no two errors tie, so the
    gradient is unique), a few pixels ignored (label 255); the softmax with three classes."""
    if loss_kind == "hinge":
        scores = torch.randn(2, side, side, generator=gen, dtype=torch.float64)
        labels = (torch.rand(scores.shape, generator=gen) < 0.4).long()
        labels[0, :5] = 255
        return lovasz_hinge, scores, labels
    scores = torch.randn(2, 3, side, side, generator=gen, dtype=torch.float64).softmax(1)
    labels = torch.randint(0, 3, (2, side, side), generator=gen)
    labels[1, -4:] = 255
    return lovasz_softmax, scores, labels


@pytest.mark.parametrize("loss_kind", ["hinge", "softmax"])
def test_losses_over_the_budget_match_the_reference(gen, monkeypatch, loss_kind):
    """Through the loss layer, batch IoU (one long segment per class) with ignored pixels and a
    small CPU floor: the ranges give the numpy reference's loss and gradient."""
    monkeypatch.setattr(_plan, "CPU_CHUNK_FLOOR_BYTES", 1 << 18)
    monkeypatch.setattr(torch_eager, "RANGES_ANY_SHARE_MIN_PIXELS", 1)  # every row
    call, scores, labels = _loss_with_ignored_pixels(loss_kind, 96, gen)
    ranged = _record_ranges(monkeypatch)
    _assert_loss_matches_reference(call, scores, labels, per_image=False, ignore_index=255)
    assert ranged and len(ranged) == (1 if loss_kind == "hinge" else 3)


def test_increments_of_a_later_part_equal_the_whole_rows(gen):
    """jaccard_increments on pixels k0.. of sorted rows, told the pixels and foreground before
    them, the row's foreground and length, gives the whole row's increments there bit for bit
    (counts in an integer type too)."""
    gt = torch.rand(3, 5000, generator=gen) < 0.3
    gt[1] = False
    for dtype in (torch.float32, torch.float64):
        whole = _jaccard.jaccard_increments(gt, dtype)
        for start, stop in ((0, 700), (700, 2300), (2300, 5000)):
            part = _jaccard.jaccard_increments(
                gt[:, start:stop], dtype, fg_total=gt.sum(dim=1, keepdim=True),
                row_pixels=gt.shape[1], pixels_before=start,
                fg_before=gt[:, :start].sum(dim=1, keepdim=True))
            assert torch.equal(part, whole[:, start:stop])
    big = torch.zeros(1, 2**24 + 8, dtype=torch.bool)
    big[0, ::3] = True
    start = 2**24 - 32
    part = _jaccard.jaccard_increments(
        big[:, start:start + 64], torch.float32, fg_total=big.sum(dim=1, keepdim=True),
        row_pixels=big.shape[1], pixels_before=start,
        fg_before=big[:, :start].sum(dim=1, keepdim=True))
    assert torch.equal(part, _jaccard.jaccard_increments(big, torch.float32)[:, start:start + 64])


@pytest.mark.parametrize("shape", [(5,), (3, 1000), (1, 700_001), (3, 90_001), (4000, 70),
                                   (2, 3, 50_000)])
def test_count_true_counts_along_the_last_dimension(gen, shape):
    """Below and above the block size, one long row, many short ones, more dimensions and a
    view that is not contiguous: the sum, as int64, the last dimension kept."""
    mask = torch.rand(shape, generator=gen) < 0.3
    expected = mask.sum(dim=-1, keepdim=True)
    counted = _masked.count_true(mask)
    assert counted.dtype == torch.int64 and torch.equal(counted, expected)
    if len(shape) > 1:
        transposed = mask.transpose(-1, -2)
        assert torch.equal(_masked.count_true(transposed), transposed.sum(dim=-1, keepdim=True))


def test_count_true_does_not_widen_the_whole_mask(gen):
    """torch's sum of a bool array makes an int64 copy of it all; counted in blocks the peak
    is a block's worth."""
    mask = torch.rand(2, 1 << 20, generator=gen) < 0.3
    assert peak_allocated_bytes(lambda: mask.sum(dim=-1)) >= 8 * mask.numel()
    assert peak_allocated_bytes(lambda: _masked.count_true(mask)) <= (
        8 * _masked.COUNT_BLOCK_ELEMENTS + 4096)


@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("kind", ["probas", "hinge"])
def test_segment_errors_made_in_blocks_are_the_same(gen, monkeypatch, per_image, kind):
    """The loss layer's errors made a block of columns at a time (a small block size here):
    1 - score on foreground, score + offset elsewhere, -inf where ignored, as computed
    directly; the same bits as in one block; rows contiguous, batch segments (a transposed
    view of the scores) included."""
    from lovasz_kernels._ops import LOSS_KINDS

    batch, classes, pixels = 3, 4, 2000
    scores = torch.randn(batch, classes, pixels, generator=gen)
    labels = torch.randint(0, classes, (batch, pixels), generator=gen)
    labels[:, :7] = 255
    bg_offset = LOSS_KINDS[kind].bg_offset
    plan = _plan.plan_segments(labels, classes, "all", [], None, per_image, 255, bg_offset)
    whole = _plan.segment_errors(scores, labels, plan)
    monkeypatch.setattr(_plan, "ERROR_BLOCK_ELEMENTS", 1000)
    blocked = _plan.segment_errors(scores, labels, plan)
    assert torch.equal(blocked[0], whole[0]) and torch.equal(blocked[1], whole[1])
    assert blocked[0].is_contiguous()

    # segment rows: (image, class) per image, class per batch (images one after the other)
    fg = labels[:, None, :] == torch.arange(classes)[None, :, None]  # (B, C, P)
    expected = torch.where(fg, 1 - scores, scores + bg_offset)
    expected = expected.masked_fill((labels == 255)[:, None, :], -torch.inf)
    if not per_image:
        expected, fg = expected.transpose(0, 1), fg.transpose(0, 1)
    expected = expected.reshape(plan.num_segments, -1)
    fg = fg.reshape(plan.num_segments, -1) & (expected > -torch.inf)
    assert torch.equal(blocked[0], expected) and torch.equal(blocked[1], fg)


def test_one_where_converts_a_long_rows_mask_a_block_at_a_time(gen):
    """The counts of one long row masked in blocks of LONG_ROW_BLOCK columns: the converted
    mask is a block's worth, not the row's (which the whole-row extension's peak would add)."""
    columns = 4 * _masked.LONG_ROW_BLOCK
    mask = torch.rand(1, columns, generator=gen) < 0.5
    values = torch.randint(0, 1000, (1, columns), generator=gen).float()
    peak = peak_allocated_bytes(lambda: _masked.one_where_(values, mask))
    assert peak <= 4 * _masked.LONG_ROW_BLOCK + 4096 < 4 * columns


@pytest.mark.parametrize("strict", [False, True], ids=["default: radix", "floor set: packed"])
def test_float32_ranges_sort_whole_rows_either_way(gen, monkeypatch, strict):
    """A float32 row by ranges, its ranges radix-sorted (default) or sorted as packed
    positions (a floor set, where smaller ranges fit): the whole-row sort's loss and
    gradient bit for bit, exact ties included (a tie group stays in one range and both
    order it by position; ranges under a grain are radix-sorted padded here, as the
    comparison sort, which a machine may measure fastest for them, orders ties otherwise)."""
    monkeypatch.setattr(_plan, "_FLOORS_SET", {"cpu": 1 << 20} if strict else {})
    errors = torch.rand(1, 100_000, generator=gen)
    errors[0, ::7] = 0.5  # a tie group, within one range
    errors[0, ::5] = -errors[0, ::5]
    fg = torch.rand(errors.shape, generator=gen) < 0.3
    grad = torch.empty_like(errors)
    packed = []
    real = torch_eager.sort_picked_descending
    monkeypatch.setattr(torch_eager, "sort_picked_descending",
                        lambda keys, positions: packed.append(positions.numel())
                        or real(keys, positions))
    with _torch_sort.method_forced(_torch_sort.RADIX):
        loss = torch_eager._extension_by_ranges(errors.clone(), fg, grad, 10_000)
    assert len(packed) >= 6 if strict else not packed  # about 8 ranges
    whole_grad = torch.empty_like(errors)
    whole_loss = torch_eager._extension_block(errors.clone(), fg, whole_grad)
    assert torch.equal(grad, whole_grad)
    torch.testing.assert_close(loss, whole_loss, rtol=1e-12, atol=0)


def test_ranges_on_a_row_past_float32_counts_match_the_whole_row(gen):
    """A float32 row of more than 2^24 pixels counts in int32 (float32 would round the
    counts): by ranges, the whole-row sort's gradient bit for bit, in about 12 ranges."""
    columns = 2**24 + 1000
    magnitudes = (0x3F000000 + torch.randperm(columns, generator=gen).to(torch.int32))
    errors = magnitudes.view(torch.float32).reshape(1, -1)
    errors[0, ::3] = -errors[0, ::3]
    fg = torch.rand(errors.shape, generator=gen) < 0.3
    grad = torch.empty_like(errors)
    loss = torch_eager._extension_by_ranges(errors.clone(), fg, grad, 1 << 20)
    whole_grad = torch.empty_like(errors)
    whole_loss = torch_eager._extension_block(errors.clone(), fg, whole_grad)
    assert torch.equal(grad, whole_grad)
    torch.testing.assert_close(loss, whole_loss, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(336, 1024), (40, 4096), (3, 100_000), (1, 5)])
def test_float64_row_sums_in_groups_of_rows_are_the_sums(gen, shape):
    """Many short rows summed a group of rows at a time (and long rows by column blocks): each
    row's float64 sum of one float64 conversion per block, the same as summing each row
    alone; the float64 copy a group's worth, not the array's."""
    values = torch.rand(shape, generator=gen)
    sums = torch_eager._row_sums_float64(values)
    assert sums.dtype == torch.float64 and sums.shape == (shape[0],)
    alone = torch.stack([torch_eager._row_sums_float64(values[row:row + 1])[0]
                         for row in range(shape[0])])
    assert torch.equal(sums, alone)
    torch.testing.assert_close(sums, values.double().sum(dim=1), rtol=1e-12, atol=0)
    if shape[0] * shape[1] > 4 * torch_eager._SUM_GROUP_ELEMENTS:
        peak = peak_allocated_bytes(lambda: torch_eager._row_sums_float64(values))
        assert peak <= 8 * torch_eager._SUM_GROUP_ELEMENTS + 8 * shape[0] + 4096


# ------------------------------------------------------------------ a floor set: strict


def test_a_floor_set_keeps_every_standard_workload_within_twice_its_input(monkeypatch):
    """``set_chunk_floor("cpu", 0)``: forward + backward of each workload of the standard
    grid holds at most twice its input beyond the input, torch's allocations and numpy's
    (measured apart, so their sum bounds the two at once; with the default floor the long
    rows and small calls need 4-7x), and the loss is the default path's."""
    from lovasz_kernels.bench.workloads import SUITE, Prepared

    monkeypatch.setattr(_plan, "_FLOORS_SET", {})
    for workload in SUITE:
        prepared = Prepared(workload)
        default_loss, _ = prepared.fwd_bwd("torch")
        _plan.set_chunk_floor("cpu", 0)
        strict_loss, _ = prepared.fwd_bwd("torch")
        peak = peak_allocated_bytes(lambda prepared=prepared: prepared.fwd_bwd("torch"))
        peak += NumpyAllocationPeakMeter().extra_peak_bytes(
            lambda prepared=prepared: prepared.fwd_bwd("torch"))
        _plan.set_chunk_floor("cpu", None)
        assert peak <= 2 * prepared.input_bytes, (
            f"{workload.name}: {peak / prepared.input_bytes:.2f}x the input")
        torch.testing.assert_close(strict_loss.double(), default_loss.double(), rtol=1e-5,
                                   atol=0, msg=workload.name)


@pytest.mark.parametrize(("loss_kind", "per_image", "by_ranges"),
                         [("hinge", True, True), ("hinge", False, True),
                          ("softmax", True, False), ("softmax", False, True)])
def test_losses_under_a_floor_set_match_the_reference(gen, monkeypatch, loss_kind, per_image,
                                                      by_ranges):
    """A floor of 0 set: rows too long for their chunk's allowance go by ranges at any length
    (a per-image softmax row, a sixth of the call, fits whole), chunks hold as few rows as
    fit, errors are made in blocks; with ignored pixels, the numpy reference's loss and
    gradient (float64: no ties)."""
    monkeypatch.setattr(_plan, "_FLOORS_SET", {"cpu": 0})
    call, scores, labels = _loss_with_ignored_pixels(loss_kind, 160, gen)
    ranged = _record_ranges(monkeypatch)
    _assert_loss_matches_reference(call, scores, labels, per_image=per_image,
                                   ignore_index=255)
    assert bool(ranged) == by_ranges


@pytest.mark.parametrize(("backend", "dtype", "expected"),
                         [("torch", torch.float16, 18), ("torch", torch.float32, 18),
                          ("torch", torch.float64, 26), ("numpy", torch.float32, None)])
def test_a_backend_says_what_its_chunks_hold(gen, monkeypatch, backend, dtype, expected):
    """The generic path learns from the backend what its extension holds a pixel, for the
    scores' compute dtype (16-bit scores compute in float32), and sizes strictly budgeted
    chunks by it; a backend that does not say gets the generic path's own figure. (A call
    this small would run in numpy on the torch backend: that path is off here.)"""
    from lovasz_kernels import _registry
    from lovasz_kernels.backends import torch_eager

    monkeypatch.setattr(torch_eager, "SMALL_CALL_MAX_PIXELS", 0)
    told = []
    generic = _registry.generic_lovasz_loss

    def recording(*args, backend_bytes_per_pixel=None, **kwargs):
        told.append(backend_bytes_per_pixel)
        return generic(*args, backend_bytes_per_pixel=backend_bytes_per_pixel, **kwargs)

    monkeypatch.setattr(_registry, "generic_lovasz_loss", recording)
    probas = torch.rand(2, 3, 50, generator=gen).softmax(dim=1).to(dtype)
    lovasz_softmax(probas, torch.randint(0, 3, (2, 50), generator=gen), backend=backend)
    assert told == [expected]


def test_a_strict_call_tells_each_chunk_its_allowance(gen, monkeypatch):
    """Under a floor set, the loss layer runs each chunk within the call's budget less the
    chunk's own errors and foreground, and tells the extension so; with the default floors
    it says nothing. A strict budget spreads no chunk over the threads."""
    labels = torch.randint(0, 3, (4, 1000), generator=gen)
    scores = torch.rand(4, 3, 1000, generator=gen, dtype=torch.float64)
    scores = scores / scores.sum(dim=1, keepdim=True)
    plan = _plan.plan_segments(labels, 3, "all", [], None, True, None, 0.0)
    seen = []

    def extension(errors, fg):
        seen.append((errors.shape[0], _plan.chunk_allowance_bytes()))
        return get_backend("torch").run(errors, fg)

    monkeypatch.setattr(_plan, "_FLOORS_SET", {})
    default = _plan.generic_lovasz_loss(extension, scores, labels, plan)
    assert all(allowance is None for _, allowance in seen)
    budget = scores.numel() * 8
    monkeypatch.setattr(_plan, "_FLOORS_SET", {"cpu": 0})
    seen.clear()
    # a backend that does not say what it holds: the generic path's generous figure, 1 row
    generic = _plan.generic_lovasz_loss(extension, scores, labels, plan)
    assert [count for count, _ in seen] == [budget // (1000 * _plan.GENERIC_BYTES_PER_PIXEL)] * 12
    # one that does: as many rows as fit with their errors and foreground (9 bytes a pixel
    # in float64) and its work arrays (26), here 2, even with 2 threads or more
    seen.clear()
    held = torch_eager.temporary_bytes_per_pixel(torch.float64)
    strict = _plan.generic_lovasz_loss(extension, scores, labels, plan,
                                       backend_bytes_per_pixel=held)
    rows = budget // (1000 * (9 + held))
    assert rows == 2 and [count for count, _ in seen] == [rows] * 6
    assert [allowance for _, allowance in seen] == [budget - rows * 1000 * (1 + 8)] * len(seen)
    assert _plan.chunk_allowance_bytes() is None
    for answer in (generic, strict):
        torch.testing.assert_close(answer[0], default[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(answer[1], default[1], rtol=1e-12, atol=1e-15)
