"""Masked updates by a random mask, fast on the CPU.

torch's CPU kernels for ``where`` and ``masked_fill_`` run a branch per element. On a mask the
branch predictor has not seen before (a segment's foreground, in pixel order or sorted by
error) every unpredictable element costs a misprediction, 3-5 ns on the development VM:
with half the pixels foreground that is 10-20x an arithmetic pass over the same array. The
mask's bytes viewed as 0/1 integers (:func:`as_bytes`) take part in vectorized arithmetic
instead, and multiplying by 0 or 1 is exact, so each helper here does its update as exact
arithmetic on CPU arrays of at least :data:`ARITHMETIC_MIN_ELEMENTS` (below that, one op's
fixed cost outweighs the pass), and calls torch's op elsewhere (a GPU runs ``where`` as one
fast kernel).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: CPU arrays from this size get the arithmetic. On the development VM, with a new mask every
#: call (``python tests/perf/masked_updates.py``), its two or three ops cost as much as the
#: branchy op at 2048-4096 elements when half of them are set, 4096-8192 when a fifth are and
#: 8192-16384 when a twentieth are; at 8192 they take 0.37-0.40x its time with half set,
#: 0.71-0.74x with a fifth and 1.2-1.3x with a twentieth, from 16384 on 0.1-0.92x. (A mask
#: timed over and over, as first measured, is learnt by the branch predictor, which made the
#: branchy op look up to 4x faster than a call ever sees it.)
ARITHMETIC_MIN_ELEMENTS = 8192
#: :func:`one_where_` works on groups of whole rows of about this many elements: the mask's
#: bytes converted to the values' type are one group's worth, not the whole array's
GROUP_ELEMENTS = 1 << 16
#: ... and on a row longer than this, a block of this many columns at a time (a row of 2^20
#: pixels then converts a quarter of its mask at once, for 3-12 more ops); the size of
#: :func:`negate_where_`'s groups
LONG_ROW_BLOCK = 1 << 18
#: :func:`count_true` sums CPU masks in blocks of about this many elements
COUNT_BLOCK_ELEMENTS = 1 << 16


def as_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask's own memory as uint8 0/1 (no copy): arithmetic with it is vectorized."""
    return mask.view(torch.uint8)


def count_true(mask: torch.Tensor) -> torch.Tensor:
    """The True elements of ``mask`` along its last dimension, int64, the dimension kept.

    torch's CPU sum of a bool (or uint8) array first converts all of it to int64: 8 bytes
    per element, and about 15x the time of the sum itself (2 x 2^22 elements on the
    development VM: 22 ms against 1.5 ms in blocks of 2^16). On the CPU the mask is therefore
    summed in blocks of about :data:`COUNT_BLOCK_ELEMENTS`, whose int64 copies stay small."""
    if mask.device.type != "cpu" or mask.numel() <= COUNT_BLOCK_ELEMENTS:
        return mask.sum(dim=-1, keepdim=True)
    num_columns = mask.shape[-1]
    rows = as_bytes(mask).reshape(-1, num_columns)
    width = min(num_columns, max(COUNT_BLOCK_ELEMENTS // rows.shape[0], 4096))
    step = max(COUNT_BLOCK_ELEMENTS // width, 1)
    counts = torch.empty((rows.shape[0], 1), dtype=torch.int64)
    for start in range(0, rows.shape[0], step):
        group = rows[start:start + step]
        total = group[:, :width].sum(dim=1, keepdim=True)
        for column in range(width, num_columns, width):
            total += group[:, column:column + width].sum(dim=1, keepdim=True)
        counts[start:start + step] = total
    return counts.reshape(*mask.shape[:-1], 1)


def _by_arithmetic(values: torch.Tensor) -> bool:
    return values.device.type == "cpu" and values.numel() >= ARITHMETIC_MIN_ELEMENTS


def select(mask: torch.Tensor, if_true: torch.Tensor, if_false: torch.Tensor,
           out: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, if_true, if_false, out=out)`` for finite values (``out`` may be
    ``if_true``), the same values: on the CPU ``if_true·m + if_false·(1 − m)``, each product
    exact and each sum one with a zero (a ``-0.0`` picked comes out ``+0.0``). An infinity
    times 0 would be NaN: callers pass finite values."""
    if not _by_arithmetic(out):
        return torch.where(mask, if_true, if_false, out=out)
    ones = as_bytes(mask)
    unpicked = torch.addcmul(if_false, if_false, ones, value=-1)
    return torch.mul(if_true, ones, out=out).add_(unpicked)


def negate_where_(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` negated where ``mask``, in place: ``v − 2·v·m``, exact for values below half
    the type's largest (2v is, and v − 2v is −v), on every device (one elementwise pass, as
    ``where`` is on a GPU); a ``+0.0`` stays ``+0.0``. On the CPU, contiguous ``values`` of
    ``mask``'s shape go in groups of about :data:`LONG_ROW_BLOCK` elements
    (:func:`_in_groups`), whose converted mask is one group's worth, not an array of the
    values' size (smaller groups cost 3% of a small per-image call)."""
    ones = as_bytes(mask)
    if (values.device.type != "cpu" or not values.is_contiguous()
            or mask.shape != values.shape):
        return values.addcmul_(values, ones, value=-2)
    return _in_groups(values, ones,
                      lambda part, part_ones: part.addcmul_(part, part_ones, value=-2),
                      group_elements=LONG_ROW_BLOCK)


def one_where_(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values.masked_fill_(mask, 1)`` for contiguous, integer-valued ``values`` (counts, in an
    integer type or a float type that holds them exactly), rows along the last dimension: on
    CPU arrays of at least :data:`ARITHMETIC_MIN_ELEMENTS`, ``(v − 1)(1 − m) + 1``, every step
    an integer and exact, in groups (:func:`_in_groups`)."""
    if values.device.type != "cpu" or values.numel() < ARITHMETIC_MIN_ELEMENTS:
        return values.masked_fill_(mask, 1)
    return _in_groups(values, as_bytes(mask),
                      lambda part, part_ones: part.sub_(1).addcmul_(part, part_ones,
                                                                    value=-1).add_(1))


def _in_groups(values: torch.Tensor, ones: torch.Tensor,
               update: Callable[[torch.Tensor, torch.Tensor], object],
               group_elements: int = GROUP_ELEMENTS) -> torch.Tensor:
    """``update(part, its mask bytes)`` on groups of whole rows (the last dimension) of about
    ``group_elements``, a row longer than :data:`LONG_ROW_BLOCK` a block of that many
    columns at a time: a CPU op between a float array and the mask's bytes first converts the
    bytes into a temporary of the array's type, one group's worth. ``values`` contiguous,
    ``ones`` of its shape; returns ``values``."""
    num_columns = values.shape[-1]
    if values.numel() <= max(min(num_columns, LONG_ROW_BLOCK), group_elements):  # one group
        update(values, ones)
        return values
    rows, row_masks = values.view(-1, num_columns), ones.reshape(-1, num_columns)
    if num_columns > LONG_ROW_BLOCK:  # a long row: a block of its columns at a time
        for row, row_mask in zip(rows, row_masks):
            for column in range(0, num_columns, LONG_ROW_BLOCK):
                block = slice(column, column + LONG_ROW_BLOCK)
                update(row[block], row_mask[block])
        return values
    step = max(1, group_elements // num_columns)
    for start in range(0, rows.shape[0], step):
        update(rows[start:start + step], row_masks[start:start + step])
    return values


__all__ = ["ARITHMETIC_MIN_ELEMENTS", "COUNT_BLOCK_ELEMENTS", "GROUP_ELEMENTS", "LONG_ROW_BLOCK",
           "as_bytes", "count_true", "negate_where_", "one_where_", "select"]
