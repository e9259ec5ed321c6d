"""The batch Lovász losses over the global batch of a ``torch.distributed`` process group.

Under data parallelism each rank holds a slice of the batch. The batch losses
(``per_image=False``) are *not* sums over pixels: every segment's loss is the Lovász extension
of the Jaccard loss of the whole segment, so the mean of per-rank losses is a different
function (a class rare on one rank weighs as much there as a frequent one). This module
computes the loss of the concatenated global batch, identically on every rank, together with
each rank's exact share of the gradient (d global loss / d local pixels). Two modes:

``"exact"``
    One small all-gather of a census (local pixel count and label counts, so the set of
    counted classes is global), then one all-gather of every segment's errors and labels
    (padded to the largest rank with the ``-inf`` / ``False`` sentinel and packed into one
    byte tensor, so it is a single collective of equal sizes). Every rank runs the backend
    once on the global ``(S, P_global)`` segments, in rank order (the concatenated batch),
    and keeps the columns of its own pixels. Received volume per rank:
    ``S * world * max_rank_pixels * (itemsize + 1)`` bytes, i.e. O(S · P_global).

``"histogram"``
    Errors are quantized by an order-preserving map into ``bins`` + 1 bins; per-segment fg/bg
    count histograms are all-reduced (``2 * S * (bins + 1)`` int32: 8 bytes per bin and
    segment, independent of the pixel count), every rank derives its pixels' Jaccard
    increments from the global cumulative counts (no sort), and the per-segment losses are
    all-reduced (``S`` floats; hinge adds one MAX all-reduce of ``S`` floats for the range). See
    :func:`histogram_extension` for the increments and the error bound.

Exact mode costs every rank the sort of the whole global batch (redundant, identical work)
and O(S · P_global) memory; histogram mode costs O(S · (P_local + bins)) per rank.

Nothing is communicated in backward: the gradient is computed in forward (as in
:mod:`lovasz_kernels.losses`) and only the local slice is kept.

Usage and the DDP factor::

    criterion = LovaszSoftmaxLoss(from_logits=True, process_group=dist.group.WORLD)
    loss = criterion(ddp_model(images), labels)   # the same value on every rank
    (loss * dist.get_world_size()).backward()      # DDP averages gradients over ranks

Each rank's backward yields d(global loss)/d(its own inputs), so the *sum* over ranks of the
parameter gradients is the single-process gradient of the concatenated batch. DDP averages
(divides the sum by the world size), so backpropagate ``world_size * loss`` to reproduce the
single-process gradient exactly (or keep ``loss`` and scale the learning rate by the world
size; for SGD the two are the same). The returned value itself is never scaled.

Every rank must make the call (collectives): with the same ``classes``, ``class_weights``,
``dist_mode`` and ``bins``, and segments of the same dtype. A rank whose inputs fail the
checks (say, invalid labels) still makes the first collective, to say so: it raises its own
``ValueError``, every other rank one naming it, and the group stays usable.
With ``per_image=True`` no collective is made and ``process_group`` is ignored.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lovasz_kernels._ops import LOSS_KINDS
from lovasz_kernels._registry import Backend
from lovasz_kernels._validate import as_int

__all__ = ["DIST_MODES", "FP16_GRID_BINS", "histogram_extension", "quantize"]

DIST_MODES = ("exact", "histogram")
_FP16_HALF = 0x3800  # bit pattern of float16(0.5): the rank of 0.5 among non-negative halves
FP16_GRID_BINS = 2 * _FP16_HALF + 1  # 28673 codes of the "fp16" grid (< 2^15)


def check_dist_options(
    process_group: object, dist_mode: object, bins: object, *, allow_fp16_grid: bool
) -> None:
    """Validate ``process_group``, ``dist_mode`` and ``bins`` (always, used or not)."""
    if process_group is not None:
        if not dist.is_available():
            raise ValueError("process_group was given but torch.distributed is not available")
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                "process_group must be a torch.distributed ProcessGroup (e.g. "
                f"dist.group.WORLD) or None; got {type(process_group).__name__}"
            )
    if dist_mode not in DIST_MODES:
        raise ValueError(f"dist_mode must be 'exact' or 'histogram'; got {dist_mode!r}")
    or_fp16 = " or 'fp16'" if allow_fp16_grid else ""
    if isinstance(bins, str):
        if bins != "fp16" or not allow_fp16_grid:
            raise ValueError(f"bins must be a positive int{or_fp16}; got {bins!r}")
    elif (count := as_int(bins)) is None or not 1 <= count <= 2**26:
        raise ValueError(f"bins must be an int in [1, 2^26]{or_fp16}; got {bins!r}")


def _all_gather_equal(local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(world, *local.shape): ``local`` of every rank, stacked in rank order."""
    world = dist.get_world_size(group)
    flat = local.contiguous().reshape(-1)
    out = flat.new_empty(world * flat.numel())  # the concatenated form (every backend has it)
    gather_single = getattr(dist, "all_gather_single", None)  # the new name (torch >= 2.10)
    if gather_single is None:
        gather_single = dist.all_gather_into_tensor
    gather_single(out, flat, group=group)
    return out.view(world, *local.shape)


# the options every rank of one call must share, in the order of the agreement's header
_AGREED_OPTIONS = ("C (classes)", "kind of loss", "dist_mode", "bins", "dtype", "classes")
_CODES = {
    "kind of loss": tuple(LOSS_KINDS),
    "dist_mode": DIST_MODES,
    "classes": ("present", "all", "list"),
}


class GroupBatch:
    """The distributed side of one batch loss call: the loss over the pixels of every rank.

    Made inside the loss operator on every rank; its collectives, in order:

    1. :meth:`agree`: an all-gather of a fixed-size header (this rank's pixel count, whether
       its inputs passed validation, and a code of every option that must match), so ranks
       called with different options all raise the same ``ValueError``, and with one rank's
       inputs rejected that rank raises its own and the others one naming it, instead of
       deadlocking or aborting in a collective of mismatched sizes;
    2. :meth:`census`: an all-gather of the per-class pixel counts, summed, so that every
       rank counts the same classes;
    3. :meth:`extension_with`'s extension: the exact gather or the histogram all-reduce.
    """

    def __init__(
        self, group_name: str, mode: str, bins: str, local_columns: int,
        value_range: float | None,
    ) -> None:
        from torch.distributed.distributed_c10d import _resolve_process_group

        self.group = _resolve_process_group(group_name)
        self.mode = mode
        self.bins: int | str = bins if bins == "fp16" else int(bins)
        self.local_columns = local_columns
        self.value_range = value_range  # the errors' known upper bound (1 for softmax)
        self.columns: list[int] = []  # every rank's local pixel count, after agree()
        self.rank = dist.get_rank(self.group)

    def agree(self, options: dict[str, object], device: torch.device, failed: bool) -> None:
        """Exchange the header; raise on every rank if any rank failed or options differ.

        ``options`` maps each name of ``_AGREED_OPTIONS`` to this rank's value.
        """
        codes = [_option_code(name, options[name]) for name in _AGREED_OPTIONS]
        header = torch.tensor([self.local_columns, int(failed), *codes], dtype=torch.int64,
                              device=device)
        every = _all_gather_equal(header, self.group).tolist()
        self.columns = [row[0] for row in every]
        failed_ranks = [rank for rank, row in enumerate(every) if row[1]]
        if failed_ranks and not failed:
            raise ValueError(
                f"rank(s) {failed_ranks} of the process group rejected their inputs (see the "
                "error on those ranks); the distributed loss cannot go on without them"
            )
        for position, name in enumerate(_AGREED_OPTIONS, start=2):
            values = [row[position] for row in every]
            if len(set(values)) > 1:
                shown = ", ".join(
                    f"rank {rank}: {_option_text(name, value)}" for rank, value in enumerate(values)
                )
                raise ValueError(
                    f"every rank of the process group must call the loss with the same "
                    f"{name}; got {shown}"
                )

    def census(self, counts: torch.Tensor) -> torch.Tensor:
        """``counts`` (int64, 1-D, the same length on every rank) summed over the ranks."""
        return _all_gather_equal(counts.to(torch.int64), self.group).sum(dim=0)

    def extension_with(self, backend: Backend):
        """The extension of the global segments, run by ``backend`` (exact mode), for
        :func:`lovasz_kernels._plan.generic_lovasz_loss`."""
        def extension(errors: torch.Tensor, fg: torch.Tensor):
            if self.mode == "exact":
                return self._exact(errors, fg, backend)
            return histogram_extension(
                errors, fg, self.bins, self.value_range, self.group, sum(self.columns)
            )

        return extension

    def _exact(
        self, errors: torch.Tensor, fg: torch.Tensor, backend: Backend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(S,) global segment losses and the (S, P_local) gradient of the local pixels."""
        num_segments, local_columns = errors.shape
        widest = max(self.columns)
        padded_errors = errors.new_full((num_segments, widest), -torch.inf)
        padded_errors[:, :local_columns] = errors
        padded_fg = fg.new_zeros((num_segments, widest))
        padded_fg[:, :local_columns] = fg
        # one collective: the error bytes and the label bytes of every segment, side by side
        error_bytes = padded_errors.view(torch.uint8).reshape(num_segments, -1)
        packed = torch.cat([error_bytes, padded_fg.view(torch.uint8)], dim=1)
        gathered = _all_gather_equal(packed, self.group)  # (world, S, widest * (itemsize + 1))
        split = error_bytes.shape[1]
        every_errors = gathered[:, :, :split].contiguous().view(errors.dtype)
        every_fg = gathered[:, :, split:].contiguous().view(torch.bool)
        # the concatenated batch, in rank order, without the padding
        global_errors = torch.cat(
            [every_errors[r, :, :n] for r, n in enumerate(self.columns)], dim=1
        )
        global_fg = torch.cat([every_fg[r, :, :n] for r, n in enumerate(self.columns)], dim=1)
        segment_loss, global_grad = backend.run(global_errors, global_fg)
        start = sum(self.columns[: self.rank])
        return segment_loss, global_grad[:, start : start + local_columns]


def _option_code(name: str, value: object) -> int:
    if name in _CODES:
        return _CODES[name].index(value)
    if name == "bins":
        return -1 if value == "fp16" else int(value)
    if name == "dtype":
        return _DTYPE_CODES.index(value)
    return int(value)


def _option_text(name: str, code: int) -> str:
    if name in _CODES:
        return repr(_CODES[name][code])
    if name == "bins":
        return "'fp16'" if code == -1 else str(code)
    if name == "dtype":
        return str(_DTYPE_CODES[code])
    return str(code)


_DTYPE_CODES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Histogram mode


def quantize(
    relu_errors: torch.Tensor, bins: int | str, value_range: torch.Tensor | float
) -> tuple[torch.Tensor, int]:
    """Order-preserving bin codes of non-negative errors, and the number of codes.

    ``bins`` an int: a uniform grid on ``[0, value_range]``: code 0 holds exactly the zero
    errors, code k >= 1 the errors in ((k - 1) w, k w] with w = value_range / bins (up to one
    rounding), so ``bins + 1`` codes. ``bins="fp16"`` (errors in [0, 1], i.e. softmax): the
    errors are folded around 1/2, d = min(e, 1 - e), rounded to float16 and ranked by bit
    pattern (0.5 is pattern 0x3800), code = rank(d) for e <= 1/2 and 2 * 0x3800 - rank(d)
    above: 28673 codes, one per distinct error when the probabilities are float16 values
    (then e and 1 - e are exact in float32 and d is a float16 value). Widest bin: 2^-12.

    Both maps are non-decreasing in the error, so a bin is a contiguous run of the sorted order.
    """
    if bins == "fp16":
        clamped = relu_errors.clamp(0, 1)
        folded = torch.minimum(clamped, 1 - clamped)
        rank = folded.to(torch.float16).view(torch.int16).to(torch.int64)
        codes = torch.where(clamped <= 0.5, rank, 2 * _FP16_HALF - rank)
        return codes, FP16_GRID_BINS
    num_bins = int(bins)
    scaled = torch.ceil(relu_errors / value_range * num_bins)
    return scaled.clamp_(0, num_bins).to(torch.int64), num_bins + 1


def sum_over_group(tensor: torch.Tensor, group_name: str) -> None:
    """``tensor`` summed over the ranks of the process group named ``group_name``, in place
    (the tangent of a global-batch loss)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    _all_reduce(tensor, _resolve_process_group(group_name))


def _all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None, op=None) -> None:
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group)


def histogram_extension(
    errors: torch.Tensor,
    fg: torch.Tensor,
    bins: int | str,
    value_range: float | None,
    group: dist.ProcessGroup | None,
    global_columns: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lovász extension of the global segments from all-reduced bin histograms (no sort).

    Parameters
    ----------
    errors, fg
        (S, P_local) local columns of the segments (``-inf`` / False marks padding).
    bins
        Number of uniform bins, or ``"fp16"`` (see :func:`quantize`).
    value_range
        Upper bound of the errors (1 for softmax); None: the per-segment maximum of
        relu(errors) over all ranks (one MAX all-reduce of S floats).
    group
        Process group, or None for the local batch alone (no communication).
    global_columns
        Pixels per segment over all ranks, when known: below 2^31 the histograms are
        all-reduced as int32 (``8 * S * (bins + 1)`` bytes), else as int64.

    Returns
    -------
    loss : (S,) float64, identical on every rank; grad : (S, P_local) in ``errors.dtype``.

    Notes
    -----
    **Increments.** Bins are visited in decreasing order of error. For a segment with n_fg
    foreground pixels, let a bin hold a foreground and n background pixels (global counts) and
    let A, N be the foreground / background counts of all higher bins. The Jaccard loss of a
    prefix with (A, N) pixels is J(A, N) = (A + N) / (n_fg + N). Order the bin foreground-first,
    then background-first, and average the two: every foreground pixel of the bin gets
    (1 / (n_fg + N) + 1 / (n_fg + N + n)) / 2 and every background pixel
    (n_fg − A − a/2) / ((n_fg + N)(n_fg + N + n)) (1/n when n_fg + N = 0), in closed form from
    exact integer counts, without cancellation. Each rank's pixel then gets its bin's
    increment (times 1[error > 0]); the loss is Σ_pixels relu(error) · increment, summed
    over ranks by one all-reduce.

    **Subgradient.** Pixels of one class are interchangeable in J, so averaging within a class
    is averaging over orderings of that class; the result is a convex combination of the
    gradients of two orderings consistent with the sort, hence, when every bin holds a single
    error value (a tie), a valid subgradient at the errors, deterministic and identical on all
    ranks. (The plain per-bin average G_b / (a + n) is *not* in general: it can exceed J on
    a subset of the bin.)

    **Error bound.** Let G_b ≥ 0 be a bin's total increment (J at the end of the bin minus J
    before it; it depends only on the counts, not on the order inside the bin). The exact loss
    is Σ_k x_(k) g_k over the sorted relu-errors x with increments g_k ≥ 0 (J is monotone);
    the increments of a bin's positions sum to G_b whatever the order inside it, and every x in
    bin b lies in [lo_b, hi_b], so the exact loss lies in [Σ_b lo_b G_b, Σ_b hi_b G_b]. The
    histogram loss Σ_b Σ_{p ∈ b} x_p ḡ_p has non-negative ḡ summing to G_b over each bin, so it
    lies in the same interval. Hence |histogram − exact| ≤ Σ_b (hi_b − lo_b) G_b
    ≤ w · Σ_b G_b = w · J(all positive-error pixels) ≤ w, the widest bin's width. A loss that
    is a weighted mean of segment losses (weights summing to 1) inherits the bound. When every
    bin holds one distinct value, hi_b = lo_b and the loss is exact.
    """
    num_segments = errors.shape[0]
    compute = torch.float64
    valid = ~torch.isneginf(errors)
    relu_errors = errors.clamp_min(0)  # -inf padding becomes 0 and is masked out below
    if value_range is None and bins != "fp16":
        upper = relu_errors.amax(dim=1).to(compute) if errors.shape[1] else (
            errors.new_zeros(num_segments, dtype=compute)
        )
        _all_reduce(upper, group, dist.ReduceOp.MAX if group is not None else None)
        # an all-zero segment has no loss; any positive range keeps the division defined
        scale = torch.where(upper > 0, upper, 1.0)[:, None].to(relu_errors.dtype)
    else:
        scale = 1.0 if value_range is None else value_range
    codes, num_codes = quantize(relu_errors, bins, scale)

    # per-segment fg / bg counts of every code, all-reduced as one (2, S, codes) tensor
    flat = codes + torch.arange(num_segments, device=codes.device)[:, None] * num_codes
    if group is None:
        global_columns = errors.shape[1]
    small = global_columns is not None and global_columns < 2**31
    count_dtype = torch.int32 if small else torch.int64
    size = num_segments * num_codes
    fg_valid, bg_valid = fg & valid, valid & ~fg
    counts = torch.stack(
        [torch.bincount(flat[mask], minlength=size) for mask in (fg_valid, bg_valid)]
    ).to(count_dtype)
    _all_reduce(counts, group)
    fg_count, bg_count = counts.view(2, num_segments, num_codes).to(compute).unbind(0)

    # counts strictly above each bin (bins are visited from the highest code down)
    fg_above = fg_count.flip(1).cumsum(1).flip(1) - fg_count
    bg_above = bg_count.flip(1).cumsum(1).flip(1) - bg_count
    n_fg = fg_count.sum(dim=1, keepdim=True)
    union_before = n_fg + bg_above  # n_fg + N
    union_after = union_before + bg_count  # n_fg + N + n
    # a bin with foreground has n_fg > 0, so both unions are positive there
    fg_increment = torch.where(
        fg_count > 0, 0.5 / union_before.clamp_min(1) + 0.5 / union_after.clamp_min(1), 0.0
    )
    bg_increment = torch.where(
        union_before > 0,
        (n_fg - fg_above - 0.5 * fg_count) / (union_before * union_after).clamp_min(1),
        1 / bg_count.clamp_min(1),  # no foreground anywhere and nothing above: J jumps to 1
    )
    bg_increment = torch.where(bg_count > 0, bg_increment, 0.0)

    fg_pixel = torch.gather(fg_increment, 1, codes)
    bg_pixel = torch.gather(bg_increment, 1, codes)
    increments = torch.where(fg, fg_pixel, bg_pixel).masked_fill_(~(errors > 0), 0.0)
    loss = torch.sum(relu_errors.to(compute) * increments, dim=1)
    _all_reduce(loss, group)
    return loss, increments.to(errors.dtype)

