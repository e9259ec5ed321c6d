"""Masked updates by a random mask, fast on the CPU.

torch's CPU kernels for ``where`` and ``masked_fill_`` run a branch per element: on a random
mask (a segment's foreground, in pixel order or sorted by error) that is about 2 ns per
element on the development VM, 20x an arithmetic pass over the same array. The mask's bytes
viewed as 0/1 integers (:func:`as_bytes`) take part in vectorized arithmetic instead, and
multiplying by 0 or 1 is exact, so each helper here does its update as exact arithmetic on CPU
arrays of at least :data:`ARITHMETIC_MIN_ELEMENTS` (below that, one op's fixed cost outweighs
the pass), and calls torch's op elsewhere (a GPU runs ``where`` as one fast kernel).
"""

from __future__ import annotations

import torch

#: CPU arrays from this size get the arithmetic: its two or three ops cost as much as the one
#: branchy op at about 16k elements on the development VM, 3-6x less from 64k elements on
#: (``python tests/perf/masked_updates.py``)
ARITHMETIC_MIN_ELEMENTS = 32768


def as_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask's own memory as uint8 0/1 (no copy): arithmetic with it is vectorized."""
    return mask.view(torch.uint8)


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
    ``where`` is on a GPU); a ``+0.0`` stays ``+0.0``."""
    return values.addcmul_(values, as_bytes(mask), value=-2)


def one_where_(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values.masked_fill_(mask, 1)`` for contiguous, integer-valued ``values`` (counts, in an
    integer type or a float type that holds them exactly), rows along the last dimension: on
    the CPU, rows of at least :data:`ARITHMETIC_MIN_ELEMENTS` get ``(v − 1)(1 − m) + 1``, every
    step an integer and exact, one row at a time (a CPU op between a float array and the
    mask's bytes first converts the bytes into a temporary of the array's type: one row's
    worth, not the whole array's)."""
    num_columns = values.shape[-1] if values.dim() else 1
    if values.device.type != "cpu" or num_columns < ARITHMETIC_MIN_ELEMENTS:
        return values.masked_fill_(mask, 1)
    rows, row_masks = values.view(-1, num_columns), as_bytes(mask).reshape(-1, num_columns)
    for index in range(rows.shape[0]):
        row = rows[index]
        row.sub_(1).addcmul_(row, row_masks[index], value=-1).add_(1)
    return values


__all__ = ["ARITHMETIC_MIN_ELEMENTS", "as_bytes", "negate_where_", "one_where_", "select"]
