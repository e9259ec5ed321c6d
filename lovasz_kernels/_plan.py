"""The one description of a loss call that every backend runs: :class:`SegmentPlan`.

Both losses reduce to the Lovász extension of a batch of *segments*: one class of one image
(``per_image=True``) or one class of the whole batch. A loss call is fully described by

- the scores (B, C, P): probabilities (softmax), or logits with C = 1 (the hinge);
- the labels (B, P) as int64 class indices (or the ignore label);
- a :class:`SegmentPlan`: which (image, channel) pairs are segments, their foreground label,
  their coefficient in the total loss, and how a score becomes an error.

:func:`plan_segments` builds the plan once per call, on the labels' device. "Classes present"
is a per-segment weight (0 for an absent class) computed from one scatter of label counts, so
the number of segments is known from the shapes alone and a GPU caller never waits for the
host. On the CPU, where reading a value costs nothing, the plan lists only the segments that
count (``compact``): absent and zero-weight classes are never sorted.

A backend runs a plan through its optional ``lovasz_loss(scores, labels, plan)`` (fused: keys
packed straight from the scores, the gradient written once into the (B, C, P) layout; the
torch backend's runs small CPU calls in numpy and declines the rest); every other backend,
and every call a ``lovasz_loss`` declines, gets :func:`generic_lovasz_loss`, which
materializes the (S, P) errors and foreground, calls the backend's ``lovasz_extension`` and
scatters the weighted, signed gradient back. The distributed exact and histogram modes are
the generic path with another extension (over the pixels of every rank).
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from lovasz_kernels._masked import count_true, negate_where_, select
from lovasz_kernels._validate import compute_dtype, valid_pixels

ExtensionFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
CountReducer = Callable[[torch.Tensor], torch.Tensor]

# On the CPU, reading a tensor's value costs nothing, so the plan lists only the segments that
# count (sorting fewer segments is faster) and backward may look at its upstream gradient;
# elsewhere a read is a device synchronisation, so the plan lists every (image, channel) with
# weights and nothing is read. Tests switch this off to run the device path on CPU tensors.
_SETTINGS = {"read_values_on_cpu": True}


@dataclass(frozen=True)
class SegmentPlan:
    """The segments of one loss call over scores (B, C, P) and labels (B, P).

    Segment s is channel ``channel[s]`` of image ``image[s]``, or of every image when
    ``image`` is None (a batch segment: its pixels are the B·P pixels of that channel, image
    by image). Its foreground is the valid pixels (label != ``ignore_index``) labelled
    ``fg_label[s]`` (``multilabel``: labels (B, C, P), and the foreground is label 1 in the
    segment's own channel). A pixel's error is ``1 - score`` on foreground and ``bg_offset + score``
    elsewhere (softmax: 0, hinge: 1), so d error / d score is -1 on foreground, +1 elsewhere.
    The total loss is ``Σ_s weight[s] · extension_s`` (float64 weights, ≥ 0).

    ``dense``: the segments are every (image, channel) in order, image-major (every channel
    when ``image`` is None), some with weight 0; the gradient of every pixel is written.
    Otherwise only segments with a positive weight are listed (no (image, channel) twice).
    """

    image: torch.Tensor | None  # (S,) int64, or None: batch segments
    channel: torch.Tensor  # (S,) int64
    fg_label: torch.Tensor  # (S,) int64
    weight: torch.Tensor  # (S,) float64
    bg_offset: float
    ignore_index: int | None
    dense: bool
    # labels (B, C, P), one binary problem per channel (fg: label 1 in the segment's own
    # channel), instead of (B, P) class indices
    multilabel: bool = False
    # every segment's weight, when they are known to be equal without a read of ``weight``
    # (a plan from the shapes alone): the gradient is scaled by a number, not a table
    uniform_weight: float | None = None
    # the labels as the backend's census left them for its ``lovasz_loss`` (see
    # :class:`LabelCensus`), or None
    backend_labels: object = None

    @property
    def num_segments(self) -> int:
        return self.channel.shape[0]

    def segments(self, start: int, stop: int) -> SegmentPlan:
        """The plan of segments ``start:stop`` alone (views of this plan's tables). It covers
        only part of the (image, channel) pairs, so it is never ``dense``."""
        return replace(
            self, image=None if self.image is None else self.image[start:stop],
            channel=self.channel[start:stop], fg_label=self.fg_label[start:stop],
            weight=self.weight[start:stop], dense=False, uniform_weight=self.uniform_weight)


@dataclass(frozen=True)
class LabelCensus:
    """One pass of a backend over a call's labels (B, P): what the plan and the label check
    need from them, and the labels in the form the backend's ``lovasz_loss`` reads (see
    ``label_census`` in :mod:`lovasz_kernels._registry`).

    ``class_pixels`` (B, max(C, 2)) int64: each image's pixels of each label in
    [0, max(C, 2)) that is not ``ignore_index``; ``valid_pixels`` (B, 1) int64: each image's
    pixels that are not ``ignore_index``; ``out_of_range``: the pixels whose label is
    neither in [0, max(C, 2)) nor ``ignore_index`` (the label check finds them again to
    explain them); ``labels``: passed to the backend as the plan's ``backend_labels``.
    """

    class_pixels: torch.Tensor
    valid_pixels: torch.Tensor
    out_of_range: int
    labels: object = None


# CPU plans that depend on the shapes alone are kept and handed out again (their tables are
# never written): a training loop calls with the same shapes every step, and building one is a
# handful of small ops, 5% of a small call (one 64² hinge image: 575 against 545 us on the
# development VM). Only on the CPU: a GPU plan's tables come from kernels on some stream,
# which another stream could read before they ran. Inference-mode tensors are kept apart.
SHAPE_PLANS_KEPT = 64
_SHAPE_PLANS: dict[tuple, SegmentPlan] = {}


def reads_are_free(device: torch.device) -> bool:
    """Whether the host may read values of tensors on ``device`` (see ``_SETTINGS``): then
    plans list only the segments that count."""
    return device.type == "cpu" and _SETTINGS["read_values_on_cpu"]


def plan_segments(
    labels: torch.Tensor,
    num_classes: int,
    classes: str,
    class_list: list[int],
    class_weights: torch.Tensor | None,
    per_image: bool,
    ignore_index: int | None,
    bg_offset: float,
    reduce_counts: CountReducer | None = None,
    labels_checked: bool = False,
    multilabel: bool = False,
    census: LabelCensus | None = None,
) -> SegmentPlan:
    """The plan of a loss call: which segments count and with which coefficient. A CPU plan
    that depends on the shapes alone is built once and handed out again: no caller writes
    its tables.

    Parameters
    ----------
    labels
        (B, P) int64 labels; with ``multilabel`` (B, C, P) in {0, 1, ignore_index}.
    num_classes
        C; C == 1 is the binary case (the channel scores class 1: sigmoid or hinge). Then the
        foreground class counts in every segment with a valid pixel, present or not.
    classes, class_list
        ``"present"``, ``"all"`` or ``"list"`` (the sorted ``class_list``).
    class_weights
        (C,) float64 on the labels' device, or None (all 1).
    per_image
        Segments per (image, class) and the loss is the mean over images that have a counted
        segment of each image's weighted class mean; else one segment per class over the batch.
    labels_checked
        The labels were validated (in range or ``ignore_index``); otherwise out-of-range
        labels count as ignored here and never index out of bounds.
    reduce_counts
        Batch segments only: sums the flat per-class and valid pixel counts over the ranks of
        a process group, so that every rank counts the same classes.
    multilabel
        One binary problem per channel: a channel counts in a group ("present") when it has
        a foreground pixel there, ("all") when it has a valid pixel.
    census
        The backend's count of ``labels`` (class indices, C >= 2): its counts replace the
        plan's own pass over them, and its labels become the plan's ``backend_labels``.
    """
    plan = _plan_segments(labels, num_classes, classes, class_list, class_weights, per_image,
                          ignore_index, bg_offset, reduce_counts, labels_checked, multilabel,
                          census)
    if census is not None and census.labels is not None:
        # after the shape cache: the labels are this call's own
        plan = replace(plan, backend_labels=census.labels)
    return plan


def _plan_segments(
    labels: torch.Tensor, num_classes: int, classes: str, class_list: list[int],
    class_weights: torch.Tensor | None, per_image: bool, ignore_index: int | None,
    bg_offset: float, reduce_counts: CountReducer | None, labels_checked: bool,
    multilabel: bool, census: LabelCensus | None,
) -> SegmentPlan:
    batch = labels.shape[0]
    groups = batch if per_image else 1
    device = labels.device
    # known without a look at the weights: every segment counts, each with this weight
    uniform_weight = None
    shape_key = None
    if _weights_need_labels(num_classes, classes, class_weights, ignore_index, reduce_counts,
                            multilabel):
        weight = _weights_from_counts(
            labels, num_classes, classes, class_list, class_weights, per_image, ignore_index,
            reduce_counts, labels_checked, multilabel, census)
    else:
        if reads_are_free(device):
            shape_key = (batch, labels.numel() == 0, num_classes, classes, tuple(class_list),
                         per_image, bg_offset, multilabel, torch.is_inference_mode_enabled())
            cached = _SHAPE_PLANS.get(shape_key)
            if cached is not None:
                return cached
        weight, uniform_weight = _weights_from_shapes(labels, num_classes, classes,
                                                      class_list, groups)

    # segment s of the dense plan is (image s // C, channel s % C). Where reads are free the
    # plan lists only the segments that count; when that is all of them, the list is the
    # dense plan and is marked so (the dense paths take slices, not index copies)
    dense = True
    if reads_are_free(device) and uniform_weight is None:
        kept = torch.nonzero(weight > 0).reshape(-1)
        dense = kept.numel() == weight.numel()
        if not dense:
            weight = weight[kept]
    if dense:
        kept = torch.arange(weight.numel(), device=device)
    channel = kept if groups == 1 else kept % num_classes
    image = kept // num_classes if per_image else None
    if multilabel:
        fg_label = torch.ones_like(channel)
    else:  # in the binary case channel 0 scores class 1
        fg_label = channel + 1 if num_classes == 1 else channel
    plan = SegmentPlan(
        image=image, channel=channel, fg_label=fg_label, weight=weight, bg_offset=bg_offset,
        ignore_index=ignore_index, dense=dense, multilabel=multilabel,
        uniform_weight=uniform_weight,
    )
    if shape_key is not None:
        if len(_SHAPE_PLANS) >= SHAPE_PLANS_KEPT:
            _SHAPE_PLANS.clear()
        _SHAPE_PLANS[shape_key] = plan
    return plan


def _weights_need_labels(
    num_classes: int, classes: str, class_weights: torch.Tensor | None,
    ignore_index: int | None, reduce_counts: CountReducer | None, multilabel: bool,
) -> bool:
    """Whether the segments' weights depend on label values: which classes are present,
    which pixels are ignored, or weights per class (whose normalization is a tensor op)."""
    if ignore_index is not None or class_weights is not None or reduce_counts is not None:
        return True
    binary = num_classes == 1 and not multilabel  # the foreground counts, present or not
    return classes == "present" and not binary


def _weights_from_shapes(
    labels: torch.Tensor, num_classes: int, classes: str, class_list: list[int], groups: int,
) -> tuple[torch.Tensor, float | None]:
    """The weights when no label value matters (see :func:`_weights_need_labels`), and their
    one value when every one is positive (else None): every group with a pixel counts the
    same classes, each with 1/(classes · groups), rounded as :func:`_weights_from_counts`
    rounds it."""
    size, device = groups * num_classes, labels.device
    chosen = class_list if classes == "list" and num_classes > 1 else range(num_classes)
    if labels.numel() == 0:  # no pixel: no group counts
        return torch.zeros(size, dtype=torch.float64, device=device), None
    each = 1.0 / len(chosen) / groups  # 1 over the group's total, then over the groups
    if len(chosen) == num_classes:
        return torch.full((size,), each, dtype=torch.float64, device=device), each
    weight = torch.zeros(size, dtype=torch.float64, device=device)
    weight.view(groups, num_classes)[:, list(chosen)] = each
    return weight, None


def _weights_from_counts(
    labels: torch.Tensor, num_classes: int, classes: str, class_list: list[int],
    class_weights: torch.Tensor | None, per_image: bool, ignore_index: int | None,
    reduce_counts: CountReducer | None, labels_checked: bool, multilabel: bool,
    census: LabelCensus | None = None,
) -> torch.Tensor:
    """The segments' weights (groups · C,) from the counts of valid and foreground pixels
    (the census's, when given): each group's weighted mean over the classes it counts, then
    the mean over the groups that count a class."""
    if multilabel:
        fg_count, valid_count = _channel_counts(labels, ignore_index)
    elif classes == "present" and num_classes > 1:
        if census is None:
            fg_count, valid_count = _class_counts(labels, num_classes, ignore_index,
                                                  labels_checked)
        else:  # as _class_counts counts: the pixels of a class in range
            fg_count = census.class_pixels
            valid_count = fg_count.sum(dim=1, keepdim=True)
    else:  # only whether each image has a valid pixel matters: no count of classes
        fg_count = valid_count = (_valid_counts(labels, ignore_index) if census is None
                                  else census.valid_pixels)
    if not per_image:
        fg_count = fg_count.sum(dim=0, keepdim=True)
        valid_count = valid_count.sum(dim=0, keepdim=True)
        if reduce_counts is not None:
            split = fg_count.numel()
            summed = reduce_counts(torch.cat([fg_count.reshape(-1), valid_count.reshape(-1)]))
            fg_count = summed[:split].reshape(fg_count.shape)
            valid_count = summed[split:].reshape(valid_count.shape)
    device = labels.device
    has_valid = valid_count > 0  # (groups, 1), or (groups, C) for multilabel
    if num_classes == 1 and not multilabel:
        counted = has_valid
    else:
        counted = has_valid.expand(-1, num_classes)
        if classes == "present":
            counted = counted & (fg_count[:, :num_classes] > 0)
        elif classes == "list":
            chosen = torch.zeros(num_classes, dtype=torch.bool, device=device)
            chosen[torch.tensor(class_list, dtype=torch.int64, device=device)] = True
            counted = counted & chosen
    weight = counted.to(torch.float64)
    if class_weights is not None:
        weight = weight * class_weights
    # the weighted mean over each group's classes, then the mean over groups that count (a
    # group with total 0 has only weights 0, which stay 0 divided by the clamped total)
    group_total = weight.sum(dim=1, keepdim=True)
    groups_counted = (group_total > 0).sum().clamp_min(1)
    return weight.div_(group_total.clamp_min(1e-300)).div_(groups_counted).reshape(-1)


def _class_counts(
    labels: torch.Tensor, num_classes: int, ignore_index: int | None, labels_checked: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels of each class (B, max(C, 2)) and valid pixels (B, 1) of each image."""
    batch, num_pixels = labels.shape
    device = labels.device
    bins = max(num_classes, 2)
    # one count of (image, label) pairs into B·bins counters; ignored labels (and, when the
    # values were not checked, out-of-range ones) go to one extra counter at the end
    if batch == 1:  # the labels are the pairs: no (B, P) array of them to fault in
        pair = labels
    else:
        pair = labels + torch.arange(0, batch * bins, bins, device=device)[:, None]
    counted = None if ignore_index is None else labels != ignore_index
    if not labels_checked:
        in_range = (labels >= 0) & (labels < bins)
        counted = in_range if counted is None else counted & in_range
    if counted is not None:
        pair = torch.where(counted, pair, batch * bins)
    if reads_are_free(device):
        counts = torch.bincount(pair.reshape(-1), minlength=batch * bins + 1)
    else:  # bincount reads the largest value to size its output: a synchronisation
        counts = torch.zeros(batch * bins + 1, dtype=torch.int64, device=device)
        counts.scatter_add_(0, pair.reshape(-1), torch.ones(
            (), dtype=torch.int64, device=device).expand(pair.numel()))
    class_pixels = counts[: batch * bins].reshape(batch, bins)
    return class_pixels, class_pixels.sum(dim=1, keepdim=True)


def _valid_counts(labels: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """Valid pixels (B, 1) of each image (no pass over the labels without an ignore label)."""
    batch, num_pixels = labels.shape
    if ignore_index is None:
        return torch.full((batch, 1), num_pixels, dtype=torch.int64, device=labels.device)
    return count_true(valid_pixels(labels, ignore_index))


def _channel_counts(
    labels: torch.Tensor, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground (label 1) and valid pixels of each (image, channel), both (B, C)."""
    valid = valid_pixels(labels, ignore_index)
    return count_true(labels == 1).squeeze(-1), count_true(valid).squeeze(-1)


def segment_errors(
    scores: torch.Tensor, labels: torch.Tensor, plan: SegmentPlan, start: int = 0,
    stop: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (k, P') errors and foreground of segments ``start:stop`` of the plan (``-inf`` /
    False where ignored), in the scores' compute dtype; P' = P per image, B·P for batch
    segments."""
    stop = plan.num_segments if stop is None else stop
    batch, num_channels, num_pixels = scores.shape
    compute = compute_dtype(scores.dtype)
    # multilabel: the labels have the scores' layout, are selected like them, and the
    # foreground of every segment is label 1
    per_channel = labels if plan.multilabel else None
    # one foreground label for all: label 1, in a binary problem (channel 0 scores class 1)
    # as in a multilabel one
    one_fg_label = plan.multilabel or num_channels == 1
    fg_label = 1 if one_fg_label else plan.fg_label[start:stop, None]
    if plan.image is None:
        # (k, B, P) views, not (k, B·P) copies: the errors come out contiguous, so their
        # (k, B·P) view is free
        channels = slice(start, stop) if plan.dense else plan.channel[start:stop]
        segment_scores = scores[:, channels].transpose(0, 1)
        if per_channel is None:
            segment_labels = labels.unsqueeze(0)
            if not one_fg_label:
                fg_label = plan.fg_label[start:stop, None, None]
        else:
            segment_labels = per_channel[:, channels].transpose(0, 1)
    elif plan.dense and start % num_channels == 0 and stop % num_channels == 0:
        # whole images: (k, C, P) scores against (k, 1, P) labels, no per-segment label copy
        first, last = start // num_channels, stop // num_channels
        whole = first == 0 and last == batch  # no slice
        segment_scores = scores if whole else scores[first:last]
        if per_channel is None:
            segment_labels = (labels if whole else labels[first:last]).unsqueeze(1)
            if not one_fg_label:
                fg_label = plan.fg_label[start:stop].reshape(last - first, num_channels, 1)
        else:
            segment_labels = per_channel if whole else per_channel[first:last]
    else:
        rows = slice(start, stop) if plan.dense else _rows(plan, start, stop, num_channels)
        segment_scores = scores.reshape(batch * num_channels, num_pixels)[rows]
        if per_channel is None:
            segment_labels = labels[plan.image[start:stop]]
        else:
            segment_labels = per_channel.reshape(batch * num_channels, num_pixels)[rows]
    fg = segment_labels == fg_label
    errors = _errors(segment_scores.to(compute), fg, plan.bg_offset)
    if plan.ignore_index is not None:
        ignored = ~valid_pixels(segment_labels, plan.ignore_index)
        fg.masked_fill_(ignored, False)
        errors.masked_fill_(ignored, -torch.inf)
    return errors.reshape(stop - start, -1), fg.reshape(stop - start, -1)


# On the CPU, errors of more than this many elements are made this many at a time (in blocks
# of columns): each block's temporaries (the foreground and background errors, the masked
# update's) are a block's worth, not arrays of the errors' size. A chunk of a strictly
# budgeted call (chunk_allowance_bytes) makes them in blocks whose temporaries, at most
# ERROR_TEMPORARIES_PER_ELEMENT elements of the compute dtype each, fit its allowance, on
# every device
ERROR_BLOCK_ELEMENTS = 1 << 20
ERROR_TEMPORARIES_PER_ELEMENT = 4


def _errors(scores: torch.Tensor, fg: torch.Tensor, bg_offset: float) -> torch.Tensor:
    """1 - score on foreground, score + ``bg_offset`` elsewhere (``fg`` broadcasts to the
    scores' shape), in one new contiguous array (scores that are a transposed view give one
    whose rows are whole segments)."""
    num_columns = scores.shape[-1]
    allowance = chunk_allowance_bytes()
    if allowance is None:
        block_elements = ERROR_BLOCK_ELEMENTS
    else:
        block_elements = allowance // (ERROR_TEMPORARIES_PER_ELEMENT * scores.element_size())
    if (scores.device.type != "cpu" and allowance is None) or scores.numel() <= block_elements:
        if scores.is_contiguous():  # one block, in as few ops as small calls can have
            errors = torch.rsub(scores, 1)
            background = scores + bg_offset if bg_offset else scores
            return select(fg, errors, background, out=errors)
        width = num_columns
    else:
        width = max(block_elements * num_columns // scores.numel(), 1024)
    errors = torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)
    one = torch.ones((), dtype=scores.dtype, device="cpu")  # 0-d: a scalar on every device
    for column in range(0, num_columns, width):
        block = slice(column, column + width)
        block_errors, block_scores = errors[..., block], scores[..., block]
        torch.sub(one, block_scores, out=block_errors)
        background = block_scores + bg_offset if bg_offset else block_scores
        select(fg[..., block], block_errors, background, out=block_errors)
    return errors


def _rows(plan: SegmentPlan, start: int, stop: int, num_channels: int) -> torch.Tensor:
    """Rows of segments start:stop (per-image) in the scores viewed as (B·C, P)."""
    return plan.image[start:stop] * num_channels + plan.channel[start:stop]


def sign_segment_grad(
    error_grad: torch.Tensor, fg: torch.Tensor, plan: SegmentPlan, start: int = 0,
) -> torch.Tensor:
    """Segments start:start+k's d extension / d errors (k, P'), weighted and signed (d error
    / d score is -1 on foreground), in place: ``error_grad`` itself."""
    if plan.uniform_weight is not None:
        # a number rounds to the gradient's dtype as the table's entries do (the same bits)
        if plan.uniform_weight != 1.0:
            error_grad.mul_(plan.uniform_weight)
    else:
        stop = start + error_grad.shape[0]
        error_grad.mul_(plan.weight[start:stop, None].to(error_grad.dtype))
    return negate_where_(error_grad, fg)


def write_segment_grad(
    grad: torch.Tensor, signed: torch.Tensor, plan: SegmentPlan, start: int = 0,
) -> None:
    """Put segments start:start+k's signed gradients (k, P') (:func:`sign_segment_grad`)
    into their places of ``grad`` (B, C, P)."""
    batch, num_channels, num_pixels = grad.shape
    stop = start + signed.shape[0]
    if plan.image is None:
        per_channel = signed.reshape(stop - start, batch, num_pixels).transpose(0, 1)
        if plan.dense:
            grad[:, start:stop] = per_channel
        else:
            grad[:, plan.channel[start:stop]] = per_channel
        return
    rows = grad.view(batch * num_channels, num_pixels)
    if plan.dense:
        rows[start:stop] = signed
    else:
        rows[_rows(plan, start, stop, num_channels)] = signed


def _owns_whole_storage(tensor: torch.Tensor) -> bool:
    """Contiguous and alone in its memory (not a view of a larger result, which it would
    keep alive)."""
    return (tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())


# A segment's temporaries on the generic path, per pixel, in bytes: the loss layer's errors,
# foreground and their transients (up to ~19), then the backend's (the torch backend's 21 in
# float32, the numpy reference's float64 arrays far more); the generic path runs at most a
# memory budget's worth of segments at once. Rounded up: a budget overrun costs more than a
# few more chunks. Under a strict budget a backend that says what it holds
# (``temporary_bytes_per_pixel``) gets chunks sized by that instead: there the errors'
# transients fit each chunk's allowance, and chunks of a third as many rows as fit cost up to
# 2.1x the time (small per-image inputs)
GENERIC_BYTES_PER_PIXEL = 64
# Below these budgets a call's temporaries are held at once, in one chunk. On the CPU smaller
# chunks save a few MB for 5-20% more time and idle cores. On a GPU every chunk is a whole
# pipeline of launches (a sort under 128 rows is itself two full radix sorts), about
# 0.2-0.8 ms of fixed cost on an H200: chunks under a few hundred MB made calls up to 6x
# slower there, at this floor every call of the bench grid ran as fast as in one chunk.
CPU_CHUNK_FLOOR_BYTES = 32 << 20
GPU_CHUNK_FLOOR_BYTES = 512 << 20


# floors set by set_chunk_floor, per "cpu" and "cuda" (every GPU): they replace the defaults
_FLOORS_SET: dict[str, int] = {}


def set_chunk_floor(device_type: str, num_bytes: int | None) -> None:
    """Set how many bytes of temporaries a loss call on ``device_type`` ("cpu" or "cuda")
    may hold at once whatever its input's size; None restores the default (32 MB on the
    CPU, 512 MB on a GPU).

    A call's temporaries stay within its gradient's size (so a call needs about twice its
    input) or this floor, whichever is larger. Below the floor everything runs in one
    chunk: fastest, since every chunk is a whole pipeline with a fixed cost. Lower it where
    memory is short and time is not: on an H200, a 32 MB GPU floor brought the torch and
    triton backends to 2.0x the input at 2^20 x 21 and 8 x 512² x 21 (from 3.3x and 2.3x
    for torch), at 2-5x the time (docs/gpu.md).

    The default floors bend the budget where keeping it costs time: a CPU chunk holds at
    least one row per thread, rows of up to 4M pixels are sorted whole, errors are made 2^20
    at a time. A floor set here is kept (:func:`budget_is_strict`) by the loss layer and the
    torch backend: chunks of as many rows as fit and no more, each told what the call's
    budget leaves it (:func:`chunk_allowance_bytes`), its errors made in blocks that fit
    that, every row whose sort would not fit sorted a range of values at a time, and no row
    sorted as numpy's packed keys (a copy outside the budget). With
    ``set_chunk_floor("cpu", 0)`` each standard workload needs at most twice its input in
    forward + backward (1.88-1.97x, against 1.3-6.8x by default), at 0.86-2.9x the time;
    inputs under a few MB add up to about 1 MB of fixed blocks (docs/performance.md). The
    numba backend keeps it too: its scratch within the budget, segments whose keys do not fit
    sorted a range of keys at a time (the same answer, bit for bit): its allocations within
    twice the input on every standard workload, at 1.1-1.9x the default's time where ranges
    run. The triton backend keeps the GPU floor set by handing a call where one segment's
    sort would not fit (a hinge, one or two classes) to the torch backend's ranges.

    >>> import lovasz_kernels
    >>> lovasz_kernels.set_chunk_floor("cuda", 32 << 20)  # memory before speed
    >>> lovasz_kernels.set_chunk_floor("cuda", None)  # back to the default
    """
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda'; got {device_type!r}")
    if num_bytes is None:
        _FLOORS_SET.pop(device_type, None)
        return
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, numbers.Integral):
        raise TypeError(f"num_bytes must be an int (bytes) or None; got {num_bytes!r}")
    if num_bytes < 0:
        raise ValueError(f"num_bytes must be >= 0; got {num_bytes}")
    _FLOORS_SET[device_type] = int(num_bytes)


@contextlib.contextmanager
def chunk_floor_set(device_type: str, num_bytes: int | None) -> Iterator[None]:
    """:func:`set_chunk_floor` for the ``with`` block, the floor before restored after it."""
    before = _FLOORS_SET.get(device_type)
    set_chunk_floor(device_type, num_bytes)
    try:
        yield
    finally:
        set_chunk_floor(device_type, before)


def budget_is_strict(device: torch.device) -> bool:
    """Whether calls on ``device`` keep their memory budget strictly: where
    :func:`set_chunk_floor` set its floor."""
    return ("cpu" if device.type == "cpu" else "cuda") in _FLOORS_SET


# Under a strict budget, the bytes a chunk of the loss call being run may still take for the
# backend's work (generic_lovasz_loss): the call's budget less the chunk's own errors and
# foreground. A chunk's gradient alone would allow far less than the call has, and rows
# sorted a range at a time in ranges that small cost many passes
_CHUNK_ALLOWANCE: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "lovasz_kernels_chunk_allowance", default=None)


def chunk_allowance_bytes() -> int | None:
    """What a backend's chunk of a strictly budgeted loss call may hold for its own work
    (see :func:`generic_lovasz_loss`), or None outside one."""
    return _CHUNK_ALLOWANCE.get()


@contextlib.contextmanager
def _chunk_allowance(num_bytes: int | None) -> Iterator[None]:
    token = _CHUNK_ALLOWANCE.set(num_bytes)
    try:
        yield
    finally:
        _CHUNK_ALLOWANCE.reset(token)


def chunk_floor_bytes(device: torch.device) -> int:
    """The temporaries a call on ``device`` may hold at once whatever its gradient's size
    (:func:`set_chunk_floor`)."""
    if device.type == "cpu":
        return _FLOORS_SET.get("cpu", CPU_CHUNK_FLOOR_BYTES)
    return _FLOORS_SET.get("cuda", GPU_CHUNK_FLOOR_BYTES)


def call_budget_bytes(scores: torch.Tensor) -> int:
    """The temporaries a loss call on ``scores`` (B, C, P) may hold at once: its gradient's
    size or the device's floor, whichever is larger."""
    gradient_bytes = scores.numel() * compute_dtype(scores.dtype).itemsize
    return max(gradient_bytes, chunk_floor_bytes(scores.device))


def segments_per_chunk(
    plan: SegmentPlan, scores: torch.Tensor, budget_bytes: int | None = None,
    backend_bytes_per_pixel: int | None = None,
) -> int:
    """How many segments the generic path runs at once: their temporaries stay within the
    budget (by default :func:`call_budget_bytes`: the size of the gradient, so the whole
    call needs about twice the input, or :func:`chunk_floor_bytes` if larger), but never
    fewer than the threads that sort rows in parallel on the CPU (:func:`rows_at_least_threads`).

    A segment's temporaries are :data:`GENERIC_BYTES_PER_PIXEL` a pixel, or, under a strict
    budget (:func:`budget_is_strict`) where the backend says what its extension holds
    (``backend_bytes_per_pixel``), that and the segment's own errors and foreground."""
    batch, num_channels, num_pixels = scores.shape
    if budget_bytes is None:
        budget_bytes = call_budget_bytes(scores)
    columns = num_pixels * (batch if plan.image is None else 1)
    per_pixel = GENERIC_BYTES_PER_PIXEL
    if backend_bytes_per_pixel is not None and budget_is_strict(scores.device):
        per_pixel = _held_bytes_per_pixel(scores) + backend_bytes_per_pixel
    count = budget_bytes // max(columns * per_pixel, 1)
    if plan.image is not None and plan.dense and count >= num_channels:
        count -= count % num_channels  # whole images: labels broadcast, not copied
    return rows_at_least_threads(count, scores.device)


def _held_bytes_per_pixel(scores: torch.Tensor) -> int:
    """What the generic path holds a pixel of a chunk while the backend works on it: the
    errors and the foreground."""
    return compute_dtype(scores.dtype).itemsize + 1


def rows_at_least_threads(count: int, device: torch.device) -> int:
    """``count`` rows, but never fewer than the threads that sort rows in parallel on the CPU
    (one (2, P) sort takes as long as one (1, P) sort there: fewer rows only idle a core),
    unless the budget is strict (:func:`budget_is_strict`)."""
    spread = device.type == "cpu" and not budget_is_strict(device)
    return int(max(count, torch.get_num_threads() if spread else 1, 1))


def reduce_per_image(
    plan: SegmentPlan, scores: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of a ``per_image`` plan under another reduction than the mean over the images
    that count, with its gradient, from that mean ``loss`` (0-d float64) and its ``grad``
    (scores (B, C, P) and ``grad`` alike): their "sum", or "none", the (B,) float64 loss of
    each image (0 for one that does not count) with ``grad`` holding each image's own
    derivative, the rows of the (block-diagonal) Jacobian.

    An image's loss needs no second run: the Lovász extension is positively homogeneous, so
    each segment's loss is <its increments, its errors>, and its increments are what its
    gradient holds (the weight times the increment, negated on the foreground, 0 where the
    error is not positive). So the loss is the sum of |grad| · error, with the foreground
    where grad < 0; pixels with grad = 0 add nothing, whatever their label."""
    batch = scores.shape[0]
    image_weight = torch.zeros(batch, dtype=torch.float64, device=grad.device)
    image_weight.index_add_(0, plan.image, plan.weight)
    counted = image_weight > 0
    # each counted image's segments weigh 1 / (images counted) in all: times that count, an
    # integer, they weigh what the image's own loss gives them
    images_counted = counted.sum()
    if reduction == "sum":
        return loss * images_counted, grad * images_counted.to(grad.dtype)
    scale = counted.to(grad.dtype) * images_counted.to(grad.dtype)
    grad = grad * scale.reshape(batch, 1, 1)
    scores = scores.to(grad.dtype)
    errors = torch.where(grad < 0, 1 - scores, scores + plan.bg_offset)
    losses = torch.sum(grad.abs().mul_(errors), dim=(1, 2), dtype=torch.float64)
    return losses, grad


def generic_lovasz_loss(
    extension: ExtensionFn, scores: torch.Tensor, labels: torch.Tensor, plan: SegmentPlan,
    chunked: bool = True, backend_bytes_per_pixel: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The default way to run a plan: segments as (k, P') errors, ``extension`` called on
    chunks of segments sized by :func:`segments_per_chunk` (one chunk when not ``chunked``:
    the distributed extensions are collectives, called the same number of times on every
    rank; under a strict budget by ``backend_bytes_per_pixel``, what ``extension`` holds
    a pixel, when given). The errors are this function's own and dead once passed:
    ``extension`` may overwrite them (``Backend.run_on_scratch``).

    Returns the 0-d float64 total loss and its gradient w.r.t. the scores (B, C, P) in the
    scores' compute dtype.
    """
    compute = compute_dtype(scores.dtype)
    # a dense plan writes every pixel; otherwise pixels of no segment keep 0
    allocate = torch.empty if plan.dense else torch.zeros
    grad = None
    loss = None
    step = (segments_per_chunk(plan, scores, backend_bytes_per_pixel=backend_bytes_per_pixel)
            if chunked else max(plan.num_segments, 1))
    # one chunk of every segment, rows in the gradient's own layout (images one after the
    # other, or one image's channels): its signed rows are the gradient, with no copy
    rows_are_grad = (plan.dense and step >= plan.num_segments
                     and (plan.image is not None or scores.shape[0] == 1))
    budget = call_budget_bytes(scores) if budget_is_strict(scores.device) else None
    # errors that become the gradient are not held beside it: then only the foreground
    held_per_pixel = 1 if rows_are_grad else _held_bytes_per_pixel(scores)
    columns = scores.shape[2] * (scores.shape[0] if plan.image is None else 1)
    for start in range(0, plan.num_segments, step):
        stop = min(start + step, plan.num_segments)
        allowance = None
        if budget is not None:
            allowance = max(budget - (stop - start) * columns * held_per_pixel, 0)
        with _chunk_allowance(allowance):
            errors, fg = segment_errors(scores, labels, plan, start, stop)
            segment_loss, error_grad = extension(errors, fg)
        del errors
        weight = plan.weight if step >= plan.num_segments else plan.weight[start:stop]
        chunk_loss = torch.dot(segment_loss.to(torch.float64), weight)
        loss = chunk_loss if loss is None else loss.add_(chunk_loss)
        signed = sign_segment_grad(error_grad, fg, plan, start)
        if rows_are_grad and signed.dtype == compute and _owns_whole_storage(signed):
            grad = signed.view(scores.shape)
        else:
            if grad is None:
                grad = allocate(scores.shape, dtype=compute, device=scores.device)
            write_segment_grad(grad, signed, plan, start)
        # freed before the next chunk allocates: alive then, they would be in its way
        del fg, error_grad, signed
    if grad is None:  # no segment
        grad = torch.zeros(scores.shape, dtype=compute, device=scores.device)
    if loss is None:  # no segment counts
        loss = torch.zeros((), dtype=torch.float64, device=scores.device)
    return loss, grad
