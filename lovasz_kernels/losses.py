"""The Lovász losses: build segments, call a backend once, reduce, and differentiate.

Both losses reduce to the one kernel of DESIGN.md §1 on a batch of segments (one class of one
image, or one class of the whole batch). A segment's loss enters the total with a fixed
coefficient (the mean over images / classes, times optional class weights), so the loss is
linear in the segment losses and its gradient is the kernel's gradient, scaled, signed
(d error / d score is -1 on foreground and +1 on background for both losses) and scattered
back once to the input's layout. That gradient is computed in forward and saved: backward
never sorts again.

A backend with the optional fused path (``lovasz_segments``, see :mod:`lovasz_kernels._registry`)
gets the scores, the labels and a :class:`SegmentPlan` instead, and returns the total loss and
the input gradient itself: no (S, P) errors/fg tensors, no separate scaling and scatter. Every
other backend (and every distributed call) takes the generic path above.

With a ``process_group`` and ``per_image=False`` the segments span the pixels of every rank
(:mod:`lovasz_kernels.distributed`): forward communicates, backward never does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lovasz_kernels import _validate
from lovasz_kernels import distributed as _distributed
from lovasz_kernels._jaccard import jaccard_increments
from lovasz_kernels._registry import Backend, select_backend

__all__ = ["lovasz_extension", "lovasz_grad", "lovasz_hinge", "lovasz_softmax"]


def lovasz_extension(
    errors: torch.Tensor, fg: torch.Tensor, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel every loss reduces to: Lovász extension of the Jaccard loss per segment.

    For each row s, with x = relu(errors[s]) sorted in decreasing order and g the Jaccard
    increments of the correspondingly sorted ``fg`` (Algorithm 1), the loss is ⟨x_sorted, g⟩
    and the gradient puts g back at the original positions where errors > 0.

    Parameters
    ----------
    errors
        (S, P) float16/bfloat16/float32/float64. ``-inf`` marks padding (ignored pixels).
    fg
        (S, P) bool: the segment's ground truth (foreground pixels). Padding must be False.
    backend
        Backend name (see :func:`available_backends`); None picks the best for the device.

    Returns
    -------
    loss : (S,) tensor in max(dtype, float32); 0 for a segment without valid pixels.
    grad : (S, P) tensor in the dtype of ``errors``: d loss[s] / d errors[s].

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels import lovasz_extension
    >>> loss, grad = lovasz_extension(torch.tensor([[0.9, -0.5, 0.3]]),
    ...                               torch.tensor([[True, False, True]]))
    >>> loss
    tensor([0.6000])
    """
    _validate.check_extension_inputs(errors, fg)
    return select_backend(backend, errors.device).run(errors, fg)


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of the paper: the gradient of the Lovász extension w.r.t. sorted errors.

    Parameters
    ----------
    gt_sorted
        (..., P) ground truth (bool, or 0/1 numbers) of pixels sorted by decreasing error.

    Returns
    -------
    (..., P) float tensor g with g_k = Δ_J(first k+1 pixels) − Δ_J(first k pixels)
    (float64 for a float64 input, else float32).

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels import lovasz_grad
    >>> lovasz_grad(torch.tensor([1, 0, 1, 0]))
    tensor([0.5000, 0.1667, 0.3333, 0.0000])
    """
    gt_sorted = _validate.check_tensor("gt_sorted", gt_sorted)
    if gt_sorted.dim() == 0:
        raise ValueError("gt_sorted must have at least one dimension (..., P); got a scalar")
    dtype = torch.float64 if gt_sorted.dtype == torch.float64 else torch.float32
    if gt_sorted.dtype != torch.bool:
        if _validate.validate_values_enabled() and bool(
            ((gt_sorted != 0) & (gt_sorted != 1)).any()
        ):
            raise ValueError("gt_sorted must contain only 0 and 1 (or be a bool tensor)")
        gt_sorted = gt_sorted != 0
    if gt_sorted.shape[-1] == 0:
        return torch.zeros(gt_sorted.shape, dtype=dtype, device=gt_sorted.device)
    return jaccard_increments(gt_sorted, dtype)


# --------------------------------------------------------------------------------------------
# Segments and the autograd function shared by both losses


@dataclass
class _Segments:
    """The kernel's input for one loss call, and how to map its gradient back.

    ``weights[s]`` is the coefficient of segment s in the total loss; ``to_scores`` scatters a
    per-segment (S, P) gradient w.r.t. errors into the layout of the differentiable input.
    """

    errors: torch.Tensor
    fg: torch.Tensor
    weights: torch.Tensor
    to_scores: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SegmentPlan:
    """The segments of one loss call, for a backend's fused ``lovasz_segments`` path.

    Segment s is channel ``channel[s]`` of image ``image[s]`` of the (B, C, P) scores (of
    every image when ``image`` is None: one batch segment per channel). Its foreground is the
    valid pixels whose label is ``fg_label[s]``; a pixel is valid unless its label is
    ``ignore_index``. Errors are ``1 - s`` on foreground and ``bg_offset + s`` on background
    (the hinge: 1, softmax: 0), so d error / d score is -1 on foreground and +1 on background.
    The total loss is ``Σ_s weight[s] · extension_s`` (weights float64). Only segments that
    count are listed: empty images and zero-weight classes are already left out.
    """

    image: torch.Tensor | None  # (S,) int64, or None: every segment spans the batch
    channel: torch.Tensor  # (S,) int64
    fg_label: torch.Tensor  # (S,) int64
    weight: torch.Tensor  # (S,) float64
    bg_offset: float
    ignore_index: int | None


def _segment_weights(
    image_of_segment: torch.Tensor, class_weight: torch.Tensor, num_images: int
) -> torch.Tensor:
    """Mean over images of the (weighted) mean over each image's segments, as coefficients."""
    total_per_image = torch.zeros(num_images, dtype=torch.float64, device=class_weight.device)
    total_per_image.index_add_(0, image_of_segment, class_weight)
    images_counted = int((total_per_image > 0).sum())
    return class_weight / total_per_image[image_of_segment] / max(images_counted, 1)


class _LovaszFunction(torch.autograd.Function):
    """Runs the backend once in forward, saves the input gradient, and scales it in backward.

    ``fused`` (labels (B, P) int64, plan) is used when the backend has ``lovasz_segments``
    (and the call is not distributed); ``build`` makes the generic path's segments otherwise.

    With ``global_batch`` the segments' columns are this rank's share of global segments: the
    segment losses are the global ones and the saved gradient is d global loss / d local input.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        scores: torch.Tensor,
        build: Callable[[torch.Tensor], _Segments],
        backend: Backend,
        global_batch: _distributed.GlobalBatch | None = None,
        fused: tuple[torch.Tensor, SegmentPlan] | None = None,
    ) -> torch.Tensor:
        out_dtype = _validate.compute_dtype(scores.dtype)
        ctx.scores_dtype = scores.dtype
        fused_kernel = backend.lovasz_segments() if global_batch is None else None
        # an empty input has no channel count to read off its shape: the generic path
        if fused is not None and fused_kernel is not None and scores.numel():
            # labels (B, P) int64 and the plan: the backend packs keys straight from the
            # scores and scatters the weighted, signed gradient once into (B, C, P)
            labels, plan = fused
            batch, num_pixels = labels.shape
            compute_scores = scores.detach().reshape(batch, -1, num_pixels).to(out_dtype)
            result = fused_kernel(compute_scores, labels, plan)
            if result is not None:
                loss, score_grad = result
                if ctx.needs_input_grad[0]:
                    ctx.save_for_backward(score_grad.reshape(scores.shape))
                return loss.to(out_dtype)
        segments = build(scores.detach())
        if segments.errors.shape[0] == 0:
            ctx.save_for_backward(torch.zeros_like(scores))
            return torch.zeros((), dtype=out_dtype, device=scores.device)
        if global_batch is None:
            segment_loss, segment_grad = backend.run(segments.errors, segments.fg)
        else:  # every rank takes this branch together: the segments are the same everywhere
            segment_loss, segment_grad = global_batch.extension(
                segments.errors, segments.fg, backend
            )
        loss = torch.dot(segment_loss.to(torch.float64), segments.weights)
        if ctx.needs_input_grad[0]:
            coefficient = segments.weights.to(segment_grad.dtype)[:, None]
            error_grad = torch.where(segments.fg, -segment_grad, segment_grad) * coefficient
            ctx.save_for_backward(segments.to_scores(error_grad))
        return loss.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        (score_grad,) = ctx.saved_tensors
        if (
            grad_output.device.type == "cpu"
            and not grad_output.requires_grad
            and bool(grad_output == 1)
        ):
            # loss.backward(): the saved gradient is the answer, no full-size multiply. Safe
            # to hand out: autograd copies it before accumulating while the graph (and so this
            # saved tensor) is retained, and otherwise nothing else refers to it
            return score_grad.to(ctx.scores_dtype), None, None, None, None
        return (grad_output * score_grad).to(ctx.scores_dtype), None, None, None, None


# --------------------------------------------------------------------------------------------
# Lovász hinge


def _hinge_shapes(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten to (B, P): logits (B, *spatial) or (B, 1, *spatial), labels (B, *spatial)."""
    if logits.dim() == 0:
        raise ValueError("logits must have shape (B, *spatial) or (B, 1, *spatial); got a scalar")
    if labels.shape != logits.shape:
        squeezable = (
            logits.dim() >= 2
            and logits.shape[1] == 1
            and labels.shape == logits.shape[:1] + logits.shape[2:]
        )
        if not squeezable:
            raise ValueError(
                f"labels must have shape (B, *spatial) matching logits (B, *spatial) or "
                f"(B, 1, *spatial); got {_validate.shape_str(labels.shape)} for logits "
                f"{_validate.shape_str(logits.shape)}"
            )
    batch, num_pixels = logits.shape[0], math.prod(labels.shape[1:])
    return logits.reshape(batch, num_pixels), labels.reshape(batch, num_pixels)


def lovasz_hinge(
    logits: torch.Tensor,
    labels: torch.Tensor,
    per_image: bool = True,
    ignore_index: int | None = None,
    backend: str | None = None,
    process_group: torch.distributed.ProcessGroup | None = None,
    dist_mode: str = "exact",
    bins: int = 2**16,
) -> torch.Tensor:
    """Binary Lovász hinge loss (paper §3.2): the Lovász extension of the Jaccard loss of
    the foreground class applied to hinge errors ``1 - logit * (2 * label - 1)``.

    Parameters
    ----------
    logits
        (B, *spatial) or (B, 1, *spatial) float: scores of the foreground class (not sigmoid).
    labels
        (B, *spatial) integer or bool, values in {0, 1} or ``ignore_index``.
    per_image
        True: the mean over images of each image's loss (images with no valid pixel are left
        out of the mean). False: one loss over all pixels of the batch.
    ignore_index
        Label value whose pixels are ignored (no loss, zero gradient).
    backend
        Backend name; None picks the best available for the tensor's device.
    process_group
        With ``per_image=False``: the loss over the pixels of every rank of this
        ``torch.distributed`` group (e.g. ``dist.group.WORLD``), identical on every rank, each
        rank's backward giving d(global loss)/d(its logits). Every rank must call it together.
        Under DDP multiply the loss by the world size before ``backward()`` to get the
        single-process gradient of the concatenated batch (DDP averages gradients). Ignored
        with ``per_image=True`` (per-image losses need nothing from other ranks).
    dist_mode
        ``"exact"`` (all-gather the errors: O(P_global) per rank) or ``"histogram"``
        (all-reduce ``bins`` count histograms; loss within max-error/``bins`` of exact). See
        :mod:`lovasz_kernels.distributed`.
    bins
        Histogram mode: uniform bins over [0, max hinge error of the global batch] (hinge
        errors are unbounded, so the range costs one MAX all-reduce).

    Returns
    -------
    Scalar loss in max(logits.dtype, float32); 0 when no pixel is valid.

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels import lovasz_hinge
    >>> logits = torch.randn(2, 8, 8, requires_grad=True)
    >>> labels = (torch.rand(2, 8, 8) > 0.5).long()
    >>> loss = lovasz_hinge(logits, labels)
    >>> loss.backward()
    """
    logits = _validate.check_floating("logits", logits)
    labels = _validate.check_tensor("labels", labels)
    _validate.check_same_device("labels", labels, "logits", logits)
    per_image = _validate.check_flag("per_image", per_image)
    ignore_index = _validate.check_ignore_index(ignore_index)
    logits_2d, labels_2d = _hinge_shapes(logits, labels)
    labels_2d = _validate.label_values("labels", labels_2d, binary=True)
    _validate.check_labels(labels_2d, "{0, 1}", 2, ignore_index)
    _validate.check_finite("logits", logits_2d)
    _distributed.check_dist_options(process_group, dist_mode, bins, allow_fp16_grid=False)
    chosen = select_backend(backend, logits.device)
    compute = _validate.compute_dtype(logits.dtype)
    global_batch = None
    if process_group is not None and not per_image:
        # the batch segment exists on every rank as soon as any rank has a valid pixel
        valid_count = _valid_mask(labels_2d, ignore_index).sum().reshape(1)
        global_valid, global_batch = _distributed.census(
            process_group, labels_2d.numel(), valid_count, dist_mode, bins, value_range=None
        )

    def build(scores: torch.Tensor) -> _Segments:
        scores = scores.reshape(logits_2d.shape).to(compute)
        valid = _valid_mask(labels_2d, ignore_index)
        fg = (labels_2d == 1) & valid
        errors = torch.where(fg, 1 - scores, 1 + scores).masked_fill_(~valid, -torch.inf)
        if not per_image:
            errors, fg, valid = errors.reshape(1, -1), fg.reshape(1, -1), valid.reshape(1, -1)
        # the mean over segments that have a valid pixel (an all-ignored image has no loss)
        if global_batch is not None:
            rows = torch.arange(int(global_valid[0] > 0), device=errors.device)
        else:
            rows = torch.nonzero(valid.any(dim=1)).flatten()
        every_row = rows.numel() == errors.shape[0]
        weights = torch.full(
            (rows.numel(),), 1 / max(rows.numel(), 1), dtype=torch.float64, device=scores.device
        )

        def to_scores(error_grad: torch.Tensor) -> torch.Tensor:
            if every_row:
                return error_grad.reshape(logits.shape)
            grad = error_grad.new_zeros(errors.shape)
            grad[rows] = error_grad
            return grad.reshape(logits.shape)

        if every_row:
            return _Segments(errors, fg, weights, to_scores)
        return _Segments(errors[rows], fg[rows], weights, to_scores)

    fused = None
    if global_batch is None and chosen.lovasz_segments() is not None:
        fused = (labels_2d.long(), _hinge_plan(labels_2d, ignore_index, per_image))
    return _LovaszFunction.apply(logits, build, chosen, global_batch, fused)


def _hinge_plan(labels: torch.Tensor, ignore_index: int | None, per_image: bool) -> SegmentPlan:
    """One segment per image with a valid pixel (or one for the batch, if any pixel is
    valid), each weighing 1 / (number of segments): the mean over segments."""
    batch, num_pixels = labels.shape
    if ignore_index is None:
        image_has_valid = torch.full((batch,), num_pixels > 0, device=labels.device)
    else:
        image_has_valid = (labels != ignore_index).any(dim=1)
    if per_image:
        image = torch.nonzero(image_has_valid).flatten()
        num_segments = image.numel()
    else:
        image, num_segments = None, int(bool(image_has_valid.any()))
    return SegmentPlan(
        image=image,
        channel=torch.zeros(num_segments, dtype=torch.int64, device=labels.device),
        fg_label=torch.ones(num_segments, dtype=torch.int64, device=labels.device),
        weight=torch.full(
            (num_segments,), 1 / max(num_segments, 1), dtype=torch.float64, device=labels.device
        ),
        bg_offset=1.0,
        ignore_index=ignore_index,
    )


# --------------------------------------------------------------------------------------------
# Lovász-Softmax


def _valid_mask(labels: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    return _validate.valid_pixels(labels, ignore_index)


def _softmax_shapes(
    probas: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten to probas (B, C, P) and labels (B, P)."""
    if probas.dim() < 2:
        raise ValueError(
            f"probas must have shape (B, C, *spatial); got {_validate.shape_str(probas.shape)}"
        )
    batch, num_classes = probas.shape[:2]
    expected = probas.shape[:1] + probas.shape[2:]
    sigmoid_layout = num_classes == 1 and labels.shape == probas.shape
    if labels.shape != expected and not sigmoid_layout:
        raise ValueError(
            f"labels must have shape {_validate.shape_str(expected)} (B, *spatial) matching "
            f"probas (B, C, *spatial); got {_validate.shape_str(labels.shape)} for probas "
            f"{_validate.shape_str(probas.shape)}"
        )
    num_pixels = math.prod(probas.shape[2:])
    return probas.reshape(batch, num_classes, num_pixels), labels.reshape(batch, num_pixels)


def lovasz_softmax(
    probas: torch.Tensor,
    labels: torch.Tensor,
    classes: str | Sequence[int] = "present",
    per_image: bool = False,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | torch.Tensor | None = None,
    from_logits: bool = False,
    backend: str | None = None,
    process_group: torch.distributed.ProcessGroup | None = None,
    dist_mode: str = "exact",
    bins: int | str = 2**16,
) -> torch.Tensor:
    """Multi-class Lovász-Softmax loss (paper §3.3, Eq. 11-12): the mean over classes of the
    Lovász extension of each class's Jaccard loss applied to ``|1[label = c] - p_c|``.

    Parameters
    ----------
    probas
        (B, C, *spatial) class probabilities (softmax output), any number of spatial dims
        (2-D images, 3-D volumes). C == 1 is the sigmoid case: the channel is P(class 1),
        labels are in {0, 1}, and the loss is the foreground class's.
    labels
        (B, *spatial) integer class indices in [0, C) or ``ignore_index``.
    classes
        ``"present"`` (default): average over the classes present in each segment's ground
        truth; ``"all"``: over all C classes; or a list of class indices. With C == 1 the
        foreground class counts in every segment with a valid pixel (an image without
        foreground is still penalised for false positives, as the Lovász hinge is).
    per_image
        True: one loss per image (mean over classes), then the mean over images with at least
        one counted class. False (default): one loss per class over the whole batch.
    ignore_index
        Label value whose pixels are ignored.
    class_weights
        Optional (C,) non-negative weights: the class mean becomes a weighted mean.
    from_logits
        True: ``probas`` holds logits and the softmax (sigmoid when C == 1) is applied here,
        in float32 or wider.
    backend
        Backend name; None picks the best available for the tensor's device.
    process_group
        With ``per_image=False``: the loss over the pixels of every rank of this
        ``torch.distributed`` group (e.g. ``dist.group.WORLD``): classes counted when present
        anywhere in the global batch, the value identical on every rank, each rank's backward
        giving d(global loss)/d(its probas). Every rank must call it together (with the same
        ``classes`` and ``class_weights``). Under DDP multiply the loss by the world size
        before ``backward()`` to get the single-process gradient of the concatenated batch
        (DDP averages gradients over ranks). Ignored with ``per_image=True`` (nothing needs
        communicating).
    dist_mode
        ``"exact"`` (default; all-gathers every counted class's errors: O(S · P_global) bytes
        per rank) or ``"histogram"`` (all-reduces per-class count histograms of ``bins`` bins,
        independent of the pixel count; the loss is within 1/``bins`` of exact). See
        :mod:`lovasz_kernels.distributed`.
    bins
        Histogram mode: the number of uniform bins on [0, 1], or ``"fp16"`` for a grid with
        one bin per float16 value (28673 bins) that is exact for float16 probabilities.

    Returns
    -------
    Scalar loss in max(probas.dtype, float32); 0 when no class is counted.

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels import lovasz_softmax
    >>> logits = torch.randn(2, 5, 16, 16, requires_grad=True)
    >>> labels = torch.randint(0, 5, (2, 16, 16))
    >>> loss = lovasz_softmax(logits.softmax(dim=1), labels)
    >>> loss.backward()
    """
    probas = _validate.check_floating("probas", probas)
    labels = _validate.check_tensor("labels", labels)
    _validate.check_same_device("labels", labels, "probas", probas)
    per_image = _validate.check_flag("per_image", per_image)
    from_logits = _validate.check_flag("from_logits", from_logits)
    ignore_index = _validate.check_ignore_index(ignore_index)
    probas_3d, labels_2d = _softmax_shapes(probas, labels)
    batch, num_classes, num_pixels = probas_3d.shape
    sigmoid_case = num_classes == 1
    chosen_classes = _validate.resolve_classes(classes, num_classes)
    weights_per_class = _validate.resolve_class_weights(class_weights, num_classes, probas.device)
    valid_range = "{0, 1}" if sigmoid_case else f"[0, {num_classes})"
    labels_2d = _validate.label_values("labels", labels_2d, binary=sigmoid_case)
    _validate.check_labels(labels_2d, valid_range, max(num_classes, 2), ignore_index)
    _distributed.check_dist_options(process_group, dist_mode, bins, allow_fp16_grid=True)
    chosen = select_backend(backend, probas.device)
    global_batch = None
    if process_group is not None and not per_image:

        def global_counts(local_counts: torch.Tensor) -> torch.Tensor:
            nonlocal global_batch
            summed, global_batch = _distributed.census(
                process_group, labels_2d.numel(), local_counts, dist_mode, bins, value_range=1.0
            )
            return summed
    else:
        global_counts = None

    if from_logits:
        _validate.check_finite("probas (logits, from_logits=True)", probas_3d)
        compute = _validate.compute_dtype(probas.dtype)
        probas = (
            torch.sigmoid(probas.to(compute)) if sigmoid_case
            else torch.softmax(probas, dim=1, dtype=compute)
        )
    else:
        _validate.check_probas(probas_3d)

    valid = _valid_mask(labels_2d, ignore_index)
    segment_image, segment_class = _softmax_segments(
        labels_2d, valid, num_classes, chosen_classes, per_image, global_counts
    )
    class_weight = (
        torch.ones(segment_class.numel(), dtype=torch.float64, device=probas.device)
        if weights_per_class is None else weights_per_class[segment_class]
    )
    # a zero-weight class contributes nothing: do not sort it at all
    kept = class_weight > 0
    segment_image, segment_class, class_weight = (
        segment_image[kept], segment_class[kept], class_weight[kept]
    )
    weights = _segment_weights(segment_image, class_weight, batch if per_image else 1)
    # in the sigmoid case channel 0 holds class 1
    class_label = segment_class + 1 if sigmoid_case else segment_class
    num_segments = segment_class.numel()
    compute = _validate.compute_dtype(probas.dtype)

    def build(scores: torch.Tensor) -> _Segments:
        scores = scores.reshape(batch, num_classes, num_pixels).to(compute)
        if per_image:
            segment_probas = scores[segment_image, segment_class]  # (S, P)
            fg = labels_2d[segment_image] == class_label[:, None]
            segment_valid = valid[segment_image]
        else:
            segment_probas = scores[:, segment_class].transpose(0, 1)
            segment_probas = segment_probas.reshape(num_segments, batch * num_pixels)
            fg = labels_2d.reshape(1, -1) == class_label[:, None]
            segment_valid = valid.reshape(1, -1).expand_as(fg)
        fg &= segment_valid
        errors = torch.where(fg, 1 - segment_probas, segment_probas)
        errors.masked_fill_(~segment_valid, -torch.inf)

        def to_scores(error_grad: torch.Tensor) -> torch.Tensor:
            grad = error_grad.new_zeros(batch, num_classes, num_pixels)
            if per_image:
                grad[segment_image, segment_class] = error_grad
            else:
                per_class = error_grad.reshape(num_segments, batch, num_pixels)
                grad[:, segment_class] = per_class.transpose(0, 1)
            return grad.reshape(probas.shape)

        return _Segments(errors, fg, weights, to_scores)

    fused = None
    if global_batch is None and chosen.lovasz_segments() is not None:
        plan = SegmentPlan(
            image=segment_image if per_image else None,
            channel=segment_class,
            fg_label=class_label,
            weight=weights,
            bg_offset=0.0,
            ignore_index=ignore_index,
        )
        fused = (labels_2d.long(), plan)
    return _LovaszFunction.apply(probas, build, chosen, global_batch, fused)


def _softmax_segments(
    labels: torch.Tensor,
    valid: torch.Tensor,
    num_classes: int,
    classes: str | list[int],
    per_image: bool,
    global_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, class-channel) index of every counted segment.

    A segment needs at least one valid pixel; with ``classes="present"`` (and C > 1) it also
    needs at least one pixel of its class. ``global_counts`` (batch segments only) sums the
    batch's per-class and valid pixel counts over ranks, so every rank counts the same classes.
    """
    batch, num_pixels = labels.shape
    device = labels.device
    bins = max(num_classes, 2)
    # one bincount over (image, label) pairs; invalid pixels go to one extra bin at the end
    image_offset = torch.arange(batch, device=device)[:, None] * bins if batch > 1 else 0
    pair = (labels + image_offset).long()
    pair = torch.where(valid, pair, batch * bins)
    counts = torch.bincount(pair.reshape(-1), minlength=batch * bins + 1)
    class_pixels = counts[:batch * bins].reshape(batch, bins)
    valid_pixels = class_pixels.sum(dim=1, keepdim=True)
    if not per_image:
        class_pixels = class_pixels.sum(dim=0, keepdim=True)
        valid_pixels = valid_pixels.sum(dim=0, keepdim=True)
        if global_counts is not None:
            summed = global_counts(torch.cat([class_pixels, valid_pixels], dim=1).flatten())
            class_pixels, valid_pixels = summed[:-1].reshape(1, -1), summed[-1:].reshape(1, 1)
    if num_classes == 1:
        counted = valid_pixels > 0  # (images, 1): the foreground class, present or not
    else:
        counted = (valid_pixels > 0).expand_as(class_pixels).clone()
        if classes == "present":
            counted &= class_pixels > 0
        elif classes != "all":
            chosen = torch.zeros(num_classes, dtype=torch.bool, device=device)
            chosen[torch.tensor(classes, device=device)] = True
            counted &= chosen
    segment_image, segment_class = torch.nonzero(counted, as_tuple=True)
    return segment_image, segment_class
