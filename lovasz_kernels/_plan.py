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
packed straight from the scores, the gradient written once into the (B, C, P) layout); every
other backend gets :func:`generic_lovasz_loss`, which materializes the (S, P) errors and
foreground, calls the backend's ``lovasz_extension`` and scatters the weighted, signed
gradient back. The distributed exact and histogram modes are the generic path with another
extension (over the pixels of every rank).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lovasz_kernels._validate import valid_pixels

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
    ``fg_label[s]``. A pixel's error is ``1 - score`` on foreground and ``bg_offset + score``
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

    @property
    def num_segments(self) -> int:
        return self.channel.shape[0]


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
) -> SegmentPlan:
    """The plan of a loss call: which segments count and with which coefficient.

    Parameters
    ----------
    labels
        (B, P) int64 labels (validated, or garbage-tolerant: out-of-range values count as
        ignored here and never index out of bounds).
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
    reduce_counts
        Batch segments only: sums the flat per-class and valid pixel counts over the ranks of
        a process group, so that every rank counts the same classes.
    """
    batch, num_pixels = labels.shape
    device = labels.device
    bins = max(num_classes, 2)
    # one scatter of (image, label) pairs into B·bins counters; ignored and out-of-range
    # labels go to one extra counter at the end
    in_range = valid_pixels(labels, ignore_index) & (labels >= 0) & (labels < bins)
    image_offset = torch.arange(batch, device=device, dtype=torch.int64)[:, None] * bins
    pair = torch.where(in_range, labels + image_offset, batch * bins)
    counts = torch.zeros(batch * bins + 1, dtype=torch.int64, device=device)
    if pair.numel():
        counts.scatter_add_(0, pair.reshape(-1), torch.ones((), dtype=torch.int64,
                                                            device=device).expand(pair.numel()))
    class_pixels = counts[: batch * bins].reshape(batch, bins)
    valid_count = class_pixels.sum(dim=1, keepdim=True)
    if not per_image:
        class_pixels = class_pixels.sum(dim=0, keepdim=True)
        valid_count = valid_count.sum(dim=0, keepdim=True)
        if reduce_counts is not None:
            summed = reduce_counts(torch.cat([class_pixels, valid_count], dim=1).reshape(-1))
            class_pixels, valid_count = summed[:-1].reshape(1, bins), summed[-1:].reshape(1, 1)

    has_valid = valid_count > 0  # (groups, 1)
    if num_classes == 1:
        counted = has_valid
    else:
        counted = has_valid.expand(-1, num_classes)
        if classes == "present":
            counted = counted & (class_pixels[:, :num_classes] > 0)
        elif classes == "list":
            chosen = torch.zeros(num_classes, dtype=torch.bool, device=device)
            chosen[torch.tensor(class_list, dtype=torch.int64, device=device)] = True
            counted = counted & chosen
    weight = counted.to(torch.float64)
    if class_weights is not None:
        weight = weight * class_weights
    # the weighted mean over each group's classes, then the mean over groups that count
    group_total = weight.sum(dim=1, keepdim=True)
    groups_counted = (group_total > 0).sum().clamp_min(1)
    weight = torch.where(group_total > 0, weight / group_total.clamp_min(1e-300), 0.0)
    weight = (weight / groups_counted).reshape(-1)

    groups = weight.shape[0] // num_classes
    channel = torch.arange(num_classes, device=device, dtype=torch.int64).repeat(groups)
    image = (
        torch.arange(groups, device=device, dtype=torch.int64).repeat_interleave(num_classes)
        if per_image else None
    )
    if reads_are_free(device):
        kept = torch.nonzero(weight > 0).reshape(-1)
        channel, weight = channel[kept], weight[kept]
        image = None if image is None else image[kept]
    # in the binary case channel 0 scores class 1
    fg_label = channel + 1 if num_classes == 1 else channel
    return SegmentPlan(
        image=image, channel=channel, fg_label=fg_label, weight=weight, bg_offset=bg_offset,
        ignore_index=ignore_index, dense=not reads_are_free(device),
    )


def segment_errors(
    scores: torch.Tensor, labels: torch.Tensor, plan: SegmentPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (S, P') errors and foreground of the plan's segments (``-inf`` / False where
    ignored), in the scores' compute dtype; P' = P per image, B·P for batch segments."""
    batch, num_channels, num_pixels = scores.shape
    compute = torch.promote_types(scores.dtype, torch.float32)
    valid = valid_pixels(labels, plan.ignore_index)
    fg_label = plan.fg_label[:, None]
    if plan.image is None:
        channels = scores if plan.dense else scores[:, plan.channel]
        segment_scores = channels.transpose(0, 1).reshape(plan.num_segments, batch * num_pixels)
        segment_labels, segment_valid = labels.reshape(1, -1), valid.reshape(1, -1)
    elif plan.dense:
        # (B, C, P) broadcast against (B, 1, P) labels: no per-segment copy of the labels
        segment_scores = scores
        segment_labels, segment_valid = labels[:, None, :], valid[:, None, :]
        fg_label = plan.fg_label.reshape(batch, num_channels, 1)
    else:
        segment_scores = scores[plan.image, plan.channel]
        segment_labels, segment_valid = labels[plan.image], valid[plan.image]
    fg = (segment_labels == fg_label) & segment_valid
    segment_scores = segment_scores.to(compute)
    errors = torch.where(fg, 1 - segment_scores, segment_scores + plan.bg_offset)
    errors = errors.masked_fill_(~segment_valid, -torch.inf)
    num_cols = errors.shape[-1]
    return errors.reshape(plan.num_segments, num_cols), fg.reshape(plan.num_segments, num_cols)


def scatter_segment_grad(
    error_grad: torch.Tensor, fg: torch.Tensor, plan: SegmentPlan, shape: torch.Size
) -> torch.Tensor:
    """d total / d scores (B, C, P) from the per-segment d extension / d errors (S, P')."""
    batch, num_channels, num_pixels = shape
    coefficient = plan.weight.to(error_grad.dtype)[:, None]
    signed = torch.where(fg, -error_grad, error_grad).mul_(coefficient)
    if plan.image is None:
        per_channel = signed.reshape(plan.num_segments, batch, num_pixels).transpose(0, 1)
        if plan.dense:
            return per_channel.contiguous()
        grad = signed.new_zeros(shape)
        grad[:, plan.channel] = per_channel
        return grad
    if plan.dense:
        return signed.reshape(shape)
    grad = signed.new_zeros(shape)
    grad[plan.image, plan.channel] = signed
    return grad


def generic_lovasz_loss(
    extension: ExtensionFn, scores: torch.Tensor, labels: torch.Tensor, plan: SegmentPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """The default way to run a plan: segments as (S, P) errors, one ``extension`` call.

    Returns the 0-d float64 total loss and its gradient w.r.t. the scores (B, C, P) in the
    scores' compute dtype.
    """
    if plan.num_segments == 0:  # (never skip on an empty local batch: ranks call together)
        compute = torch.promote_types(scores.dtype, torch.float32)
        return (torch.zeros((), dtype=torch.float64, device=scores.device),
                torch.zeros(scores.shape, dtype=compute, device=scores.device))
    errors, fg = segment_errors(scores, labels, plan)
    segment_loss, error_grad = extension(errors, fg)
    loss = torch.dot(segment_loss.to(torch.float64), plan.weight)
    return loss, scatter_segment_grad(error_grad, fg, plan, scores.shape)
