"""The Lovász losses and kernel: argument handling around the custom operators.

Both losses reduce to the one kernel (the Lovász extension of the Jaccard loss, paper §3) on
a batch of segments: one class of one image, or one class of the whole batch. The functions
here check the arguments that need no value read (types, shapes, options), apply the softmax
for ``from_logits=True``, and hand everything else — value checks, which classes count, the
backend call — to the ``lovasz_kernels::lovasz_loss`` operator (:mod:`lovasz_kernels._ops`),
which runs a :class:`lovasz_kernels._plan.SegmentPlan` on the chosen backend and returns the
loss together with its gradient, computed once in forward: backward never sorts again.

With a ``process_group`` and ``per_image=False`` the segments span the pixels of every rank
(:mod:`lovasz_kernels.distributed`): forward communicates, backward never does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List, Optional  # noqa: UP035 - TorchScript reads these in kind_loss

import torch

from lovasz_kernels import _ops, _validate
from lovasz_kernels import distributed as _distributed
from lovasz_kernels._registry import get_backend

__all__ = [
    "lovasz_extension", "lovasz_grad", "lovasz_hinge", "lovasz_sigmoid", "lovasz_softmax",
]


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

    ``loss`` is differentiable w.r.t. ``errors`` (its gradient is ``grad``, its second
    derivative zero), also under ``torch.compile`` and ``torch.func``.

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels import lovasz_extension
    >>> loss, grad = lovasz_extension(torch.tensor([[0.9, -0.5, 0.3]]),
    ...                               torch.tensor([[True, False, True]]))
    >>> loss
    tensor([0.6000])
    """
    _validate.check_extension_shapes(errors, fg)
    return _ops.lovasz_extension(errors, fg, _backend_name(backend))


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
    return _ops.lovasz_grad_op(gt_sorted.detach())


def lovasz_hinge(
    logits: torch.Tensor,
    labels: torch.Tensor,
    per_image: bool = True,
    ignore_index: int | None = None,
    backend: str | None = None,
    process_group: torch.distributed.ProcessGroup | None = None,
    dist_mode: str = "exact",
    bins: int = 2**16,
    *,
    multilabel: bool = False,
    classes: str | Sequence[int] = "present",
    class_weights: Sequence[float] | torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Binary Lovász hinge loss (paper §3.2): the Lovász extension of the Jaccard loss of
    the foreground class applied to hinge errors ``1 - logit * (2 * label - 1)``.

    Parameters
    ----------
    logits
        (B, *spatial) or (B, 1, *spatial) float: scores of the foreground class (not sigmoid).
    labels
        (B, *spatial) integer or bool, values in {0, 1} or ``ignore_index``; floating 0/1
        masks (``y.float()``) are accepted too.
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
    multilabel
        False (default): one binary problem; logits and labels of shape (B, C, *spatial)
        with C > 1 are pooled into one mask per image, as segmentation_models_pytorch's
        ``LovaszLoss(mode="multilabel")`` does. True: logits and labels (B, C, *spatial) hold
        one binary problem per channel (overlapping classes): one segment per (image, channel)
        (``per_image=True``) or per channel over the batch, and the loss is the mean over the
        counted channels (of each image, then over images).
    classes, class_weights
        With ``multilabel=True``, as in :func:`lovasz_softmax`, per channel: ``"present"``
        counts the channels with a foreground pixel in the segment, ``"all"`` every channel
        with a valid pixel, or a list of channels; weights make the mean over channels a
        weighted mean.
    reduction
        With ``per_image=True``: ``"mean"`` (default) over the images with a valid pixel,
        ``"sum"`` over the images, or ``"none"``: one loss per image, (B,) (0 for an image
        with no valid pixel), each differentiable w.r.t. its own image's logits.

    Returns
    -------
    Scalar loss in max(logits.dtype, float32) ((B,) for ``reduction="none"``); 0 when no
    pixel is valid.

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
    per_image = _validate.check_flag("per_image", per_image)
    multilabel = _validate.check_flag("multilabel", multilabel)
    ignore_index = _validate.check_ignore_index(ignore_index)
    if not multilabel and (classes != "present" or class_weights is not None):
        raise ValueError("classes and class_weights select and weigh the channels of a "
                         "multilabel problem: pass multilabel=True (a binary hinge has one class)")
    return _checked_loss("multilabel_hinge" if multilabel else "hinge", logits, labels, classes,
                         class_weights, per_image, ignore_index, backend, process_group,
                         dist_mode, bins, reduction)


def lovasz_sigmoid(
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
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """Multilabel Lovász-Sigmoid loss: the Lovász-Softmax of each channel as its own binary
    problem, for overlapping classes (a pixel may belong to several).

    Channel c of every segment is a binary segmentation with probabilities ``probas[:, c]``
    (a sigmoid output) and mask ``labels[:, c]``; its errors are ``|labels - probas|``. The
    loss is the mean over the counted channels of their Lovász extensions (per image, then
    over images, with ``per_image=True``).

    Parameters
    ----------
    probas
        (B, C, *spatial) per-channel probabilities in [0, 1] (they need not sum to one).
    labels
        (B, C, *spatial) masks in {0, 1} (integer, bool or floating) or ``ignore_index``.
    classes
        ``"present"`` (default): the channels with a foreground pixel in the segment;
        ``"all"``: every channel with a valid pixel; or a list of channel indices.
    per_image
        True: the mean over images (with a counted channel) of each image's mean over
        channels; False (default): one segment per channel over the whole batch.
    ignore_index
        Label value whose pixels are ignored (per channel).
    class_weights
        Optional (C,) non-negative weights: the mean over channels becomes a weighted mean.
        Constants: no gradient flows to them (a tensor that requires grad is read detached).
    from_logits
        True: ``probas`` holds logits and the sigmoid is applied here, in float32 or wider.
    backend, process_group, dist_mode, bins, reduction
        As in :func:`lovasz_softmax`.

    Returns
    -------
    Scalar loss in max(probas.dtype, float32) ((B,) for ``reduction="none"``); 0 when no
    channel is counted.

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels import lovasz_sigmoid
    >>> logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    >>> masks = torch.rand(2, 3, 8, 8) > 0.5           # overlapping classes
    >>> loss = lovasz_sigmoid(logits, masks, from_logits=True)
    >>> loss.backward()
    """
    probas = _validate.check_floating("probas", probas)
    labels = _validate.check_tensor("labels", labels)
    per_image = _validate.check_flag("per_image", per_image)
    from_logits = _validate.check_flag("from_logits", from_logits)
    ignore_index = _validate.check_ignore_index(ignore_index)
    return _checked_loss("sigmoid_of_logits" if from_logits else "multilabel_probas", probas,
                         labels, classes, class_weights, per_image, ignore_index, backend,
                         process_group, dist_mode, bins, reduction)


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
    *,
    reduction: str = "mean",
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
        (B, *spatial) integer class indices in [0, C) or ``ignore_index`` (compared as int64
        values, so an ``ignore_index`` the labels' dtype cannot hold matches no pixel). With
        C == 1 floating 0/1 masks are accepted too.
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
        Constants: no gradient flows to them (a tensor that requires grad is read detached).
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
    reduction
        With ``per_image=True``: ``"mean"`` (default) over the images with a counted class,
        ``"sum"`` over the images, or ``"none"``: one loss per image, (B,) (0 for an image
        with no counted class), each differentiable w.r.t. its own image's probas. With
        ``per_image=False`` the batch has one loss: only ``"mean"``.

    Returns
    -------
    Scalar loss in max(probas.dtype, float32) ((B,) for ``reduction="none"``); 0 when no
    class is counted.

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
    per_image = _validate.check_flag("per_image", per_image)
    from_logits = _validate.check_flag("from_logits", from_logits)
    ignore_index = _validate.check_ignore_index(ignore_index)
    return _checked_loss("softmax_of_logits" if from_logits else "probas", probas, labels,
                         classes, class_weights, per_image, ignore_index, backend,
                         process_group, dist_mode, bins, reduction)


# --------------------------------------------------------------------------------------------
# Argument normalization shared by the functions and the modules


#: the kinds whose probabilities :func:`kind_loss` computes before the operator
_KINDS_OF_LOGITS = ("softmax_of_logits", "sigmoid_of_logits")


def _checked_loss(
    kind: str,
    scores: torch.Tensor,
    labels: torch.Tensor,
    classes: object,
    class_weights: object,
    per_image: bool,
    ignore_index: int | None,
    backend: object,
    process_group: object,
    dist_mode: str,
    bins: int | str,
    reduction: str,
) -> torch.Tensor:
    """The rest of a public loss call, once each function has checked its own arguments: the
    class selection, the weights, the reduction and the distributed options checked, then
    the operator, which checks the loss arguments (here already, before a softmax or
    sigmoid)."""
    reduction = _validate.check_reduction(reduction, per_image)
    classes_mode, class_list = _class_selection(classes)
    weights = _class_weights_tensor(class_weights, scores.device)
    if kind in _KINDS_OF_LOGITS:
        # the operator makes the same checks; the softmax before it must not meet bad shapes
        _ops.check_loss_arguments(kind, scores, labels, weights, classes_mode, class_list)
    # the fp16 grid bins probabilities: hinge errors are unbounded
    _distributed.check_dist_options(process_group, dist_mode, bins,
                                    allow_fp16_grid=not _ops.LOSS_KINDS[kind].bg_offset)
    return kind_loss(
        scores, labels, weights, classes_mode, class_list, per_image, ignore_index, kind,
        _backend_name(backend), _group_name(process_group, per_image), dist_mode, str(bins),
        reduction,
    )


def kind_loss(
    scores: torch.Tensor,
    labels: torch.Tensor,
    class_weights: Optional[torch.Tensor],  # noqa: UP045 - TorchScript reads Optional
    classes: str,
    class_list: List[int],  # noqa: UP006
    per_image: bool,
    ignore_index: Optional[int],  # noqa: UP045
    kind: str,
    backend: str,
    group_name: str = "",
    dist_mode: str = "exact",
    bins: str = "65536",
    reduction: str = "mean",
) -> torch.Tensor:
    """Any of the losses on normalized arguments (TorchScript-compatible): for the kinds
    computed from logits, the softmax (sigmoid with one channel, or per channel for
    multilabel) in float32 or wider; then the loss operator."""
    if kind == "softmax_of_logits" or kind == "sigmoid_of_logits":
        compute = torch.float64 if scores.dtype == torch.float64 else torch.float32
        if kind == "sigmoid_of_logits" or (scores.dim() >= 2 and scores.shape[1] == 1):
            scores = torch.sigmoid(scores.to(compute))
        else:
            scores = torch.softmax(scores, dim=1, dtype=compute)
    return _ops.lovasz_loss(
        scores, labels, class_weights, classes, class_list, per_image, ignore_index, kind,
        backend, group_name, dist_mode, bins, reduction,
    )


def _class_selection(classes: object) -> tuple[str, list[int]]:
    """``classes`` as the operator's (mode, sorted list): "present", "all" or "list"."""
    chosen = _validate.normalize_classes(classes)
    if isinstance(chosen, str):
        return chosen, []
    return "list", sorted(chosen)


def _class_weights_tensor(
    class_weights: object, device: torch.device
) -> torch.Tensor | None:
    """A (C,) float64 tensor on ``device`` (values of a tensor are checked in the operator,
    a Python sequence's here), or None; a numpy array is taken as a tensor."""
    class_weights = _validate.numpy_as_tensor("class_weights", class_weights)
    if isinstance(class_weights, torch.Tensor):
        _validate.check_class_weights_tensor(class_weights)
        return class_weights.to(device=device, dtype=torch.float64)
    weights = _validate.normalize_class_weights(class_weights)
    return None if weights is None else weights.to(device)


def _backend_name(backend: object) -> str:
    """The operator's backend argument: "" picks the best for the device."""
    if backend is None:
        return ""
    return get_backend(backend).name  # unknown names fail here, before any work


def _group_name(process_group: object, per_image: bool) -> str:
    """The operator's process group argument: "" when nothing is communicated."""
    if process_group is None or per_image:
        return ""
    return process_group.group_name
