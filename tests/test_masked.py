"""The masked updates of lovasz_kernels._masked: the arithmetic the CPU gets for large arrays
gives what torch's own ops give, value for value, on both sides of the size threshold."""

from __future__ import annotations

import pytest
import torch

from lovasz_kernels import _masked
from lovasz_kernels._jaccard import jaccard_increments

LARGE = _masked.ARITHMETIC_MIN_ELEMENTS
SMALL = _masked.ARITHMETIC_MIN_ELEMENTS // 4


def _finite_values(gen, shape, dtype=torch.float32):
    values = torch.randn(shape, generator=gen, dtype=torch.float64) * 10
    values.view(-1)[:8] = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e30, 3e38, -3e38])
    return values.to(dtype)


@pytest.mark.parametrize("columns", [SMALL, LARGE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_select_is_where(gen, columns, dtype):
    mask = torch.rand(3, columns, generator=gen) < 0.5
    if_true = _finite_values(gen, (3, columns), dtype)
    if_false = _finite_values(gen, (3, columns), dtype)
    expected = torch.where(mask, if_true, if_false)
    out = if_true.clone()  # the caller's pattern: the result overwrites if_true
    got = _masked.select(mask, out, if_false, out=out)
    assert got is out
    assert torch.equal(got, expected)
    # the same values; only a picked -0.0 may come out +0.0
    bits = torch.int64 if dtype == torch.float64 else torch.int32
    differing_bits = got.view(bits) != expected.view(bits)
    assert bool((expected[differing_bits] == 0).all())


def test_select_broadcasts_a_column(gen):
    """segment_errors picks between a full array and one shifted by a constant; a (k, 1)
    column must broadcast too."""
    mask = torch.rand(4, LARGE, generator=gen) < 0.3
    if_true = torch.rand(4, LARGE, generator=gen)
    column = torch.rand(4, 1, generator=gen)
    expected = torch.where(mask, if_true, column)
    assert torch.equal(_masked.select(mask, if_true.clone(), column, out=if_true.clone()), expected)


@pytest.mark.parametrize("columns", [SMALL, LARGE])
def test_negate_where(gen, columns):
    mask = torch.rand(2, columns, generator=gen) < 0.5
    values = _finite_values(gen, (2, columns))
    values.view(-1)[:2] = torch.tensor([1.5e38, -1.5e38])  # 2v overflows, -v does not
    values[mask & ~torch.isfinite(2 * values)] = 1.0  # 2v must stay finite: v - 2v = -v
    expected = torch.where(mask, -values, values)
    got = _masked.negate_where_(values.clone(), mask)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("shape", [(2 * _masked.LONG_ROW_BLOCK // 1024 + 3, 1024),
                                   (2, _masked.LONG_ROW_BLOCK + 5)])
def test_negate_where_converts_the_mask_a_group_at_a_time(gen, shape):
    """Groups of short rows, or a long row's blocks: the values of the one-pass update, and
    a converted mask of one group's worth at a time, not the values' size; a mask that
    broadcasts takes the one pass."""
    from tests.helpers import peak_allocated_bytes

    mask = torch.rand(shape, generator=gen) < 0.5
    values = _finite_values(gen, shape)
    values[mask & ~torch.isfinite(2 * values)] = 1.0  # 2v must stay finite: v - 2v = -v
    expected = torch.where(mask, -values, values)
    got = values.clone()
    peak = peak_allocated_bytes(lambda: _masked.negate_where_(got, mask))
    assert torch.equal(got, expected)
    one_pass = values.clone()
    one_pass_peak = peak_allocated_bytes(lambda: one_pass.addcmul_(one_pass, mask.view(torch.uint8),
                                                                   value=-2))
    assert peak <= 4 * _masked.LONG_ROW_BLOCK + 4096
    assert peak < one_pass_peak / 2
    column = mask[:, :1]
    assert torch.equal(_masked.negate_where_(values.clone(), column),
                       torch.where(column, -values, values))


# (rows, columns): below the threshold; one group of one long row; one group of short rows
# whose total crosses the threshold; several groups of short rows, the last one partial; one
# row longer than a group; rows longer than a long row's block, the last block partial
ONE_WHERE_SHAPES = [(3, SMALL), (1, LARGE), (LARGE // 512, 1024),
                    (_masked.GROUP_ELEMENTS // 1024 * 2 + 5, 1024),
                    (3, _masked.GROUP_ELEMENTS + 7), (2, 2 * _masked.LONG_ROW_BLOCK + 3)]


@pytest.mark.parametrize("shape", ONE_WHERE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_one_where_on_counts(gen, shape, dtype):
    mask = torch.rand(shape, generator=gen) < 0.5
    top = 2**24 if dtype == torch.float32 else 2**30
    values = torch.randint(-5, top, shape, generator=gen).to(dtype)
    expected = values.masked_fill(mask, 1)
    got = _masked.one_where_(values.clone(), mask)
    assert got.dtype == dtype
    assert torch.equal(got, expected)


def test_one_where_decides_by_the_whole_array(monkeypatch, gen):
    """Short rows that make a large array get the arithmetic (the branchy op is what costs
    there, whatever the rows' length), and a small array the branchy op."""
    filled = []
    original = torch.Tensor.masked_fill_
    monkeypatch.setattr(torch.Tensor, "masked_fill_",
                        lambda self, *args: filled.append(self.shape) or original(self, *args))
    short_rows = torch.zeros(LARGE // 256, 256)
    _masked.one_where_(short_rows, torch.rand(short_rows.shape, generator=gen) < 0.5)
    assert filled == []
    small = torch.zeros(2, SMALL // 2)
    _masked.one_where_(small, torch.rand(small.shape, generator=gen) < 0.5)
    assert filled == [small.shape]


@pytest.mark.parametrize("shape", [(3, LARGE), (_masked.GROUP_ELEMENTS // 1024 * 2 + 5, 1024)])
def test_one_where_takes_a_non_contiguous_mask(gen, shape):
    mask = (torch.rand(shape[::-1], generator=gen) < 0.5).t()
    values = torch.randint(0, 1000, shape, generator=gen).float()
    assert torch.equal(_masked.one_where_(values.clone(), mask), values.masked_fill(mask, 1))


def test_increments_equal_on_both_sides_of_the_threshold(gen, monkeypatch):
    """Algorithm 1's increments come out bit for bit the same whichever way the counts are
    masked: forced to the branchy op, then to the arithmetic."""
    gt = torch.rand(4, LARGE, generator=gen) < 0.4
    gt[1] = False  # no foreground: the 0/0 at k = 0
    gt[2] = True
    arithmetic = jaccard_increments(gt, torch.float32)
    monkeypatch.setattr(_masked, "ARITHMETIC_MIN_ELEMENTS", 1 << 62)
    branchy = jaccard_increments(gt, torch.float32)
    assert torch.equal(arithmetic.view(torch.int32), branchy.view(torch.int32))
    assert not torch.isnan(arithmetic).any()
