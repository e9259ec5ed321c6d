"""Jaccard index (IoU) of hard predictions: per class, per image, per batch, per dataset.

The paper (§3.1, Eq. 14) distinguishes how the IoU of a class is aggregated:

- **dataset-mIoU** (:func:`dataset_miou`, :class:`ConfusionMatrix`): one count over every pixel
  of the evaluation set, one IoU per class, then the mean over classes. This is the usual
  benchmark measure (Pascal VOC, Cityscapes) and what ``per_image=False`` losses target.
- **batch-mIoU** (:func:`batch_miou`): the same computed on one batch.
- **image-mIoU** (:func:`image_miou`): the IoU of each class in each image, averaged over the
  classes present in that image's ground truth or prediction, then over images. It is what
  ``per_image=True`` losses target; a single missed small object weighs as much as a large one.

All functions take integer label maps of any shape (any number of spatial dimensions), on any
device. The IoU of class c needs three counts: its true positives TP_c, its ground-truth pixels
T_c and its predicted pixels P_c (union = T_c + P_c - TP_c). They are counted with one scatter
into ``C * C`` bins of ``label * C + pred`` (per image where needed) when those bins are no more
than the pixels, and otherwise with three scatters into ``C`` bins each, so memory stays
O(pixels + C) whatever ``num_classes`` is. No Python loop over classes, and no host
synchronisation beyond the optional value checks (see :func:`lovasz_kernels.set_validate_values`).

Conventions (those of torchmetrics' ``MulticlassJaccardIndex`` and scikit-learn's
``jaccard_score`` where they agree):

- Results are float64 tensors on the input's device.
- A class absent from both ground truth and prediction has IoU ``zero_division``: NaN by default,
  left out of every mean (torchmetrics' ``average="macro"``); a number such as 0.0 or 1.0 is that
  class's IoU and counts in the means like any other (scikit-learn with ``labels=range(C)``).
- ``ignore_index``: pixels with that label are not counted, whatever is predicted there. If it
  names a class (0 <= ignore_index < C), that class has no IoU at all: NaN in per-class results
  whatever ``zero_division`` says, and never in a mean. A prediction of that class at a counted
  pixel is still a miss for the pixel's true class.
- A mean over no counted pixel (everything ignored, or an empty input) is NaN.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
import torch.distributed as dist

from lovasz_kernels import _validate

__all__ = [
    "ConfusionMatrix",
    "batch_miou",
    "confusion_matrix",
    "dataset_miou",
    "image_miou",
    "per_class_iou",
    "per_image_iou",
    "per_image_miou",
]

# Below this many bins the single C x C scatter is always used (it is one pass over the
# pixels; the per-class route takes three).
_MIN_PAIR_BINS = 2**16
# A C x C int64 matrix past 2^28 entries (2 GiB, C > 16384) is almost surely a wrong
# num_classes; allocating it could exhaust the machine's memory instead of raising.
_MAX_MATRIX_ENTRIES = 2**28

# Rows of the per-class counts, shape (..., 3, C).
_TRUE_POSITIVE, _LABEL_TOTAL, _PRED_TOTAL = 0, 1, 2


# --------------------------------------------------------------------------------------------
# Checks


def _check_num_classes(num_classes: object) -> int:
    number = _validate.as_int(num_classes)
    if number is None:
        raise TypeError(f"num_classes must be an int; got {num_classes!r}")
    if number < 1:
        raise ValueError(f"num_classes must be >= 1; got {number}")
    return number


def _check_matrix_size(num_classes: int) -> None:
    if num_classes * num_classes > _MAX_MATRIX_ENTRIES:
        gib = num_classes * num_classes * 8 / 2**30
        raise ValueError(
            f"num_classes={num_classes} needs a C x C int64 confusion matrix of {gib:.3g} GiB "
            f"(at most {_MAX_MATRIX_ENTRIES} entries, C <= {math.isqrt(_MAX_MATRIX_ENTRIES)}); "
            "per_class_iou, per_image_iou and dataset_miou count in O(C) memory"
        )


def _check_count_size(num_classes: int, num_groups: int) -> None:
    """The (G, 3, C) per-class counts, like the matrix, stay within its entries: beyond that
    num_classes is almost surely wrong, and allocating them could exhaust the machine's memory
    (a kill by the kernel, not an exception)."""
    entries = num_groups * 3 * num_classes
    if entries > _MAX_MATRIX_ENTRIES:
        gib = entries * 8 / 2**30
        images = f"{num_groups} images x " if num_groups > 1 else ""
        raise ValueError(
            f"num_classes={num_classes} needs per-class counts of {images}3 x C int64, "
            f"{gib:.3g} GiB (at most {_MAX_MATRIX_ENTRIES} entries)"
        )


def _check_zero_division(zero_division: object) -> float:
    if isinstance(zero_division, bool) or not isinstance(zero_division, numbers.Real):
        raise TypeError(
            f"zero_division must be a float: nan, or the IoU to give an absent class in [0, 1]; "
            f"got {zero_division!r}"
        )
    value = float(zero_division)
    if not (math.isnan(value) or 0.0 <= value <= 1.0):
        raise ValueError(f"zero_division must be nan or in [0, 1]; got {value}")
    return value


def _check_options(
    num_classes: object, ignore_index: object, zero_division: object
) -> tuple[int, int | None, float]:
    return (
        _check_num_classes(num_classes),
        _validate.check_ignore_index(ignore_index),
        _check_zero_division(zero_division),
    )


def _check_device(device: object) -> torch.device:
    """The device as torch resolves it (``"cuda"`` -> ``cuda:0``), usable on this machine."""
    if not isinstance(device, (torch.device, str)):
        raise TypeError(
            f"device must be a torch.device or a string such as 'cpu' or 'cuda:0'; "
            f"got {type(device).__name__}"
        )
    try:
        # parsing alone accepts devices this build or machine lacks ('cuda' on a CPU build):
        # a zero-size tensor proves the device usable and gives its full name
        return torch.empty(0, device=torch.device(device)).device
    except (RuntimeError, AssertionError) as err:  # torch raises either, depending on why
        raise ValueError(
            f"device must name a device torch can use here (e.g. 'cpu', 'cuda:0'); "
            f"got {device!r}: {err}"
        ) from None


def _check_label_map(name: str, value: object) -> torch.Tensor:
    tensor = _validate.check_tensor(name, value)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        hint = " (take pred = scores.argmax(dim=1) first)" if name == "pred" else ""
        raise TypeError(
            f"{name} must be an integer or bool tensor of class indices; got {tensor.dtype}{hint}"
        )
    return tensor


def _check_pair(
    pred: object,
    labels: object,
    num_classes: int,
    ignore_index: int | None,
    batched: bool,
    counts_device: torch.device | None = None,
    counts_why: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred, labels) as int64. Type, shape and device checks always; range checks when value
    checks are enabled. ``counts_device``: where the counts being added to are kept (and
    ``counts_why``: why they are there, for the message)."""
    pred = _check_label_map("pred", pred)
    labels = _check_label_map("labels", labels)
    if pred.shape != labels.shape:
        raise ValueError(
            f"pred must have the shape of labels {_validate.shape_str(labels.shape)}; "
            f"got {_validate.shape_str(pred.shape)}"
        )
    _validate.check_same_device("pred", pred, "labels", labels)
    if counts_device is not None and labels.device != counts_device:
        raise ValueError(
            f"pred and labels must be on {counts_device}, where the counts are kept "
            f"({counts_why}); got {labels.device}"
        )
    if batched and pred.dim() < 1:
        raise ValueError("pred and labels must have shape (B, *spatial); got scalars")
    labels = _validate.label_values("labels", labels, binary=False)
    pred = _validate.label_values("pred", pred, binary=False)
    _validate.check_labels(labels, f"[0, {num_classes})", num_classes, ignore_index)
    _check_predictions(pred, labels, num_classes, ignore_index)
    return pred, labels


def _check_predictions(
    pred: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int | None
) -> None:
    """``pred`` (int64) must lie in [0, C) wherever the label is not ignored."""
    if not _validate.validate_values_enabled() or pred.numel() == 0:
        return
    # one pass settles the usual case; the census runs only to explain a failure or to
    # forgive out-of-range predictions at ignored pixels
    low, high = (int(bound) for bound in torch.aminmax(pred))
    if low >= 0 and high < num_classes:
        return
    out_of_range = ((pred < 0) | (pred >= num_classes)) & _validate.valid_pixels(
        labels, ignore_index
    )
    n_bad = int(out_of_range.sum())
    if n_bad:
        example = int(pred[out_of_range].flatten()[0])
        raise ValueError(
            f"pred must be in [0, {num_classes}) at non-ignored pixels; got {n_bad} "
            f"out-of-range values (e.g. {example})"
        )


# --------------------------------------------------------------------------------------------
# Counting


def _grouped(
    pred: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int | None,
    num_groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pred, labels, counted) as (num_groups, pixels per group); dim 0 of the inputs indexes
    the groups (images). ``counted`` drops ignored pixels, and out-of-range values when value
    checks are off: boolean indexing would need a host synchronisation on a GPU, a mask that
    sends those pixels to a trash bin does not."""
    pixels_per_group = labels.numel() // num_groups if num_groups else 0
    labels = labels.reshape(num_groups, pixels_per_group)
    pred = pred.reshape(num_groups, pixels_per_group)
    counted = (
        _validate.valid_pixels(labels, ignore_index)
        & (labels >= 0) & (labels < num_classes)
        & (pred >= 0) & (pred < num_classes)
    )
    return pred, labels, counted


def _pairs_fit(num_groups: int, num_classes: int, num_pixels: int) -> bool:
    """Whether to count (label, pred) pairs in ``num_groups * C * C`` bins: one pass over the
    pixels, and no more memory than the pixels' own bin indices (or a fixed small amount)."""
    return num_groups * num_classes * num_classes <= max(num_pixels, _MIN_PAIR_BINS)


def _count_pairs(
    pred: torch.Tensor, labels: torch.Tensor, counted: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """(G, C, C) int64 confusion counts of grouped int64 maps; row = true class, column =
    predicted class."""
    num_groups = labels.shape[0]
    bins = num_classes * num_classes
    group = torch.arange(num_groups, device=labels.device, dtype=torch.int64)[:, None] * bins
    index = torch.where(counted, group + labels * num_classes + pred, num_groups * bins)
    counts = torch.zeros(num_groups * bins + 1, dtype=torch.int64, device=labels.device)
    counts.scatter_add_(0, index.flatten(), torch.ones_like(index).flatten())
    return counts[:-1].reshape(num_groups, num_classes, num_classes)


def _class_counts_from_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """(..., C, C) confusion counts -> (..., 3, C): true positives, label and pred totals."""
    return torch.stack(
        [pairs.diagonal(dim1=-2, dim2=-1), pairs.sum(dim=-1), pairs.sum(dim=-2)], dim=-2
    )


def _count_classes_directly(
    pred: torch.Tensor, labels: torch.Tensor, counted: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """(G, 3, C) int64 per-class counts of grouped int64 maps in O(G * C) memory."""
    num_groups = labels.shape[0]
    trash = num_groups * num_classes
    offset = torch.arange(num_groups, device=labels.device, dtype=torch.int64)[:, None]
    offset = offset * num_classes
    hit = counted & (labels == pred)
    ones = torch.ones(labels.numel(), dtype=torch.int64, device=labels.device)
    counts = torch.zeros(3, trash + 1, dtype=torch.int64, device=labels.device)
    for row, keep, classes in (
        (_TRUE_POSITIVE, hit, labels), (_LABEL_TOTAL, counted, labels), (_PRED_TOTAL, counted, pred)
    ):
        counts[row].scatter_add_(0, torch.where(keep, offset + classes, trash).flatten(), ones)
    return counts[:, :-1].reshape(3, num_groups, num_classes).transpose(0, 1)


def _class_counts(
    pred: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int | None,
    num_groups: int,
) -> torch.Tensor:
    """(G, 3, C) int64 per-class counts of checked int64 maps split into ``num_groups``."""
    pred, labels, counted = _grouped(pred, labels, num_classes, ignore_index, num_groups)
    if _pairs_fit(num_groups, num_classes, labels.numel()):
        return _class_counts_from_pairs(_count_pairs(pred, labels, counted, num_classes))
    return _count_classes_directly(pred, labels, counted, num_classes)


def _iou(
    class_counts: torch.Tensor, zero_division: float, ignore_index: int | None
) -> torch.Tensor:
    """(..., 3, C) per-class counts -> (..., C) float64 IoU; ``zero_division`` where the union
    is empty, NaN for the ignored class."""
    counts = class_counts.to(torch.float64)
    true_positive = counts[..., _TRUE_POSITIVE, :]
    union = counts[..., _LABEL_TOTAL, :] + counts[..., _PRED_TOTAL, :] - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), zero_division)
    if ignore_index is not None and 0 <= ignore_index < iou.shape[-1]:
        iou[..., ignore_index] = math.nan
    return iou


def _mean_over_classes(iou: torch.Tensor, class_counts: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim of the entries that are not NaN; NaN where no pixel was counted
    (whatever ``zero_division`` filled in) or no entry is left. No warning, no host sync."""
    has_value = ~torch.isnan(iou)
    total = torch.where(has_value, iou, 0).sum(dim=-1)
    n_values = has_value.sum(dim=-1)
    any_pixel = class_counts[..., _LABEL_TOTAL, :].sum(dim=-1) > 0
    return torch.where(any_pixel & (n_values > 0), total / n_values.clamp(min=1), math.nan)


def _checked_class_counts(
    pred: object, labels: object, num_classes: int, ignore_index: int | None, per_image: bool,
    counts_device: torch.device | None = None, counts_why: str = "",
) -> torch.Tensor:
    """Checks, then (G, 3, C) counts: G = B images with ``per_image``, else G = 1."""
    pred, labels = _check_pair(
        pred, labels, num_classes, ignore_index, batched=per_image,
        counts_device=counts_device, counts_why=counts_why,
    )
    num_groups = labels.shape[0] if per_image else 1
    _check_count_size(num_classes, num_groups)
    return _class_counts(pred, labels, num_classes, ignore_index, num_groups)


# --------------------------------------------------------------------------------------------
# Functions


def confusion_matrix(
    pred: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """(C, C) int64 confusion matrix: entry [t, p] counts pixels of true class t predicted p.

    Parameters
    ----------
    pred, labels
        Integer (or bool) label maps of the same shape, any number of dimensions, same device.
        ``labels`` values are in [0, C) or ``ignore_index``; ``pred`` values are in [0, C)
        wherever the label is not ignored.
    num_classes
        C >= 1, at most 16384 (a larger matrix takes over 2 GiB: use :func:`per_class_iou`,
        which counts in O(C) memory).
    ignore_index
        Label value whose pixels are not counted. If it names a class, that class's row is
        zero; its column still counts the pixels predicted as it.

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels import confusion_matrix
    >>> confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    tensor([[1, 0, 0],
            [0, 1, 0],
            [0, 1, 1]])
    """
    num_classes = _check_num_classes(num_classes)
    _check_matrix_size(num_classes)
    ignore_index = _validate.check_ignore_index(ignore_index)
    pred, labels = _check_pair(pred, labels, num_classes, ignore_index, batched=False)
    return _count_pairs(*_grouped(pred, labels, num_classes, ignore_index, 1), num_classes)[0]


def per_class_iou(
    pred: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    *,
    zero_division: float = math.nan,
) -> torch.Tensor:
    """IoU of each class over all pixels given: |pred = c and label = c| / |pred = c or label = c|.

    Parameters
    ----------
    pred, labels
        Integer label maps of the same shape (see :func:`confusion_matrix`).
    num_classes
        C >= 1 (memory is O(pixels + C): any C works).
    ignore_index
        Label value whose pixels are not counted (whatever is predicted there). If it names a
        class, that class's IoU is NaN.
    zero_division
        IoU of a class absent from both ground truth and prediction: NaN (default) or a value
        in [0, 1] (torchmetrics uses 0.0).

    Returns
    -------
    (C,) float64 tensor on the input's device.

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels import per_class_iou
    >>> pred, labels = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2])
    >>> per_class_iou(pred, labels, 4)
    tensor([1.0000, 0.5000, 0.5000,    nan], dtype=torch.float64)
    >>> per_class_iou(pred, labels, 4, zero_division=0.0)
    tensor([1.0000, 0.5000, 0.5000, 0.0000], dtype=torch.float64)
    >>> per_class_iou(pred, labels, 4, ignore_index=0)  # class 0 and its pixel dropped
    tensor([   nan, 0.5000, 0.5000,    nan], dtype=torch.float64)
    """
    num_classes, ignore_index, zero_division = _check_options(
        num_classes, ignore_index, zero_division
    )
    counts = _checked_class_counts(pred, labels, num_classes, ignore_index, per_image=False)
    return _iou(counts[0], zero_division, ignore_index)


def batch_miou(
    pred: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    *,
    zero_division: float = math.nan,
) -> torch.Tensor:
    """Batch-mIoU: the mean over classes of the IoU computed over every pixel of the batch.

    With the default ``zero_division=nan``, classes absent from both ground truth and
    prediction are left out of the mean (torchmetrics' ``MulticlassJaccardIndex`` with
    ``average="macro"``); with a number they count with that IoU.

    Parameters
    ----------
    pred, labels
        (B, *spatial) integer label maps (any shape works: all pixels form one pool).
    num_classes, ignore_index, zero_division
        As in :func:`per_class_iou`.

    Returns
    -------
    0-d float64 tensor; NaN when no pixel is counted.

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels import batch_miou
    >>> pred = torch.tensor([[0, 1], [1, 1]])
    >>> labels = torch.tensor([[0, 1], [0, 1]])
    >>> batch_miou(pred, labels, num_classes=3)  # (1/2 + 2/3) / 2; class 2 is absent
    tensor(0.5833, dtype=torch.float64)
    >>> batch_miou(pred, labels, num_classes=3, zero_division=0.0)  # (1/2 + 2/3 + 0) / 3
    tensor(0.3889, dtype=torch.float64)
    """
    num_classes, ignore_index, zero_division = _check_options(
        num_classes, ignore_index, zero_division
    )
    counts = _checked_class_counts(pred, labels, num_classes, ignore_index, per_image=False)
    return _mean_over_classes(_iou(counts[0], zero_division, ignore_index), counts[0])


def per_image_iou(
    pred: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    *,
    zero_division: float = math.nan,
) -> torch.Tensor:
    """(B, C) float64: the IoU of each class in each image.

    Entry [b, c] is the :func:`per_class_iou` of class c over image b's pixels alone. With -1
    for NaN it is torchmetrics' ``mean_iou(pred, labels, C, per_class=True,
    input_format="index")``.

    Parameters
    ----------
    pred, labels
        (B, *spatial) integer label maps; dim 0 indexes the images.
    num_classes, ignore_index, zero_division
        As in :func:`per_class_iou`.

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels import per_image_iou
    >>> pred = torch.tensor([[0, 1], [1, 1]])
    >>> labels = torch.tensor([[0, 1], [0, 1]])
    >>> per_image_iou(pred, labels, num_classes=3)
    tensor([[1.0000, 1.0000,    nan],
            [0.0000, 0.5000,    nan]], dtype=torch.float64)
    """
    num_classes, ignore_index, zero_division = _check_options(
        num_classes, ignore_index, zero_division
    )
    counts = _checked_class_counts(pred, labels, num_classes, ignore_index, per_image=True)
    return _iou(counts, zero_division, ignore_index)


def per_image_miou(
    pred: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    *,
    zero_division: float = math.nan,
) -> torch.Tensor:
    """(B,) float64: each image's mean IoU over the classes in its ground truth or prediction
    (the rows of :func:`per_image_iou` averaged), NaN for an image with no counted pixel.

    Parameters
    ----------
    pred, labels
        (B, *spatial) integer label maps; dim 0 indexes the images.
    num_classes, ignore_index, zero_division
        As in :func:`per_class_iou`.

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels import per_image_miou
    >>> pred = torch.tensor([[0, 1], [1, 1]])
    >>> labels = torch.tensor([[0, 1], [255, 255]])
    >>> per_image_miou(pred, labels, num_classes=3, ignore_index=255)
    tensor([1., nan], dtype=torch.float64)
    """
    num_classes, ignore_index, zero_division = _check_options(
        num_classes, ignore_index, zero_division
    )
    counts = _checked_class_counts(pred, labels, num_classes, ignore_index, per_image=True)
    return _mean_over_classes(_iou(counts, zero_division, ignore_index), counts)


def image_miou(
    pred: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    *,
    zero_division: float = math.nan,
) -> torch.Tensor:
    """Image-mIoU (paper §3.1): the mean over images of each image's mean IoU over the classes
    present in that image's ground truth or prediction.

    Parameters
    ----------
    pred, labels
        (B, *spatial) integer label maps; dim 0 indexes the images.
    num_classes, ignore_index, zero_division
        As in :func:`per_class_iou`.

    Returns
    -------
    0-d float64 tensor. An image with no counted pixel (all ignored) is left out of the mean;
    NaN when no image has one.

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels import image_miou
    >>> pred = torch.tensor([[0, 1], [1, 1]])
    >>> labels = torch.tensor([[0, 1], [0, 1]])
    >>> image_miou(pred, labels, num_classes=3)  # image 0: 1.0, image 1: (0 + 1/2) / 2
    tensor(0.6250, dtype=torch.float64)
    """
    per_image = per_image_miou(pred, labels, num_classes, ignore_index, zero_division=zero_division)
    counted = ~torch.isnan(per_image)
    total = torch.where(counted, per_image, 0).sum()
    return torch.where(counted.any(), total / counted.sum().clamp(min=1), math.nan)


def dataset_miou(
    preds: torch.Tensor | Iterable[torch.Tensor],
    labels: torch.Tensor | Iterable[torch.Tensor],
    num_classes: int,
    ignore_index: int | None = None,
    *,
    zero_division: float = math.nan,
) -> torch.Tensor:
    """Dataset-mIoU (paper Eq. 14): the pixels of every image counted together, one IoU per
    class, then the mean over classes (see :func:`batch_miou` for ``zero_division``).

    Parameters
    ----------
    preds, labels
        Either two tensors of the same shape, or two iterables of matching label maps (images
        or batches of different sizes, e.g. a list of full-resolution predictions), all on the
        device of the first.
    num_classes, ignore_index, zero_division
        As in :func:`per_class_iou`.

    Returns
    -------
    0-d float64 tensor; NaN when no pixel is counted.

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels import dataset_miou
    >>> preds = [torch.tensor([0, 1]), torch.tensor([[1, 1, 0]])]
    >>> labels = [torch.tensor([0, 1]), torch.tensor([[1, 0, 0]])]
    >>> dataset_miou(preds, labels, num_classes=2)
    tensor(0.6667, dtype=torch.float64)
    """
    num_classes, ignore_index, zero_division = _check_options(
        num_classes, ignore_index, zero_division
    )
    if isinstance(preds, torch.Tensor) or isinstance(labels, torch.Tensor):
        preds, labels = [preds], [labels]
    else:
        preds, labels = list(preds), list(labels)
        if len(preds) != len(labels):
            raise ValueError(
                f"preds and labels must hold the same number of label maps; got {len(preds)} "
                f"and {len(labels)}"
            )
    total = None
    for pred, label in zip(preds, labels):
        counts = _checked_class_counts(
            pred, label, num_classes, ignore_index, per_image=False,
            counts_device=None if total is None else total.device,
            counts_why="the device of the first label map",
        )[0]
        total = counts if total is None else total + counts
    if total is None:  # no label map at all
        total = torch.zeros(3, num_classes, dtype=torch.int64, device="cpu")
    return _mean_over_classes(_iou(total, zero_division, ignore_index), total)


# --------------------------------------------------------------------------------------------
# Streaming


class ConfusionMatrix:
    """A running confusion matrix for evaluation loops: dataset-mIoU (and image-mIoU) over
    any number of batches, without keeping predictions around.

    ``update`` adds a batch's counts; ``iou()``, ``miou()`` (= ``compute()``) and
    ``image_miou()`` read the totals at any time; ``reset()`` starts over. Counts live on
    ``device``, or else on the device of the first update; every update must be on that device
    (move the counts with :meth:`to`). Nothing synchronises with the host until you read a
    result with ``float()``. In distributed evaluation, call :meth:`all_reduce` on every rank
    after the last update, then read the results.

    Parameters
    ----------
    num_classes
        C >= 1, at most 16384 (the C x C matrix is kept; :func:`dataset_miou` counts in O(C)).
    ignore_index
        Label value whose pixels are not counted (see :func:`per_class_iou`).
    device
        Where to keep the counts; default: the device of the first update. Give it in
        distributed evaluation, so that a rank with no batch holds its counts where the
        collective expects them (CPU for gloo, the rank's GPU for NCCL).
    zero_division
        IoU of a class absent from both ground truth and prediction: NaN (default: left out of
        the means) or a value in [0, 1] (see :func:`batch_miou`).

    Attributes
    ----------
    matrix
        (C, C) int64 counts: row = true class, column = predicted class.
    num_updates
        How many batches were added (summed over ranks after :meth:`all_reduce`).

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels import ConfusionMatrix
    >>> cm = ConfusionMatrix(num_classes=3, ignore_index=255)
    >>> for pred, labels in [(torch.tensor([[0, 1]]), torch.tensor([[0, 1]])),
    ...                      (torch.tensor([[2, 2]]), torch.tensor([[1, 255]]))]:
    ...     _ = cm.update(pred, labels)
    >>> cm.iou()
    tensor([1.0000, 0.5000, 0.0000], dtype=torch.float64)
    >>> float(cm.miou())
    0.5
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = None,
        device: torch.device | str | None = None,
        *,
        zero_division: float = math.nan,
    ) -> None:
        self.num_classes, self.ignore_index, self.zero_division = _check_options(
            num_classes, ignore_index, zero_division
        )
        _check_matrix_size(self.num_classes)
        self._device = None if device is None else _check_device(device)
        self.reset()

    def reset(self) -> None:
        """Forget every update, and a past :meth:`all_reduce` (keeps the device)."""
        device = self._device if self._device is not None else torch.device("cpu")
        self.matrix = torch.zeros(
            self.num_classes, self.num_classes, dtype=torch.int64, device=device
        )
        self._image_miou_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._images_counted = torch.zeros((), dtype=torch.int64, device=device)
        self.num_updates = 0
        self._reduced = False

    @torch.no_grad()
    def update(self, pred: torch.Tensor, labels: torch.Tensor) -> ConfusionMatrix:
        """Add one batch: ``pred`` and ``labels`` of shape (B, *spatial) (dim 0 indexes images
        for :meth:`image_miou`; the pixel counts do not depend on the layout). Returns self."""
        if self._reduced:
            raise RuntimeError(
                "this ConfusionMatrix holds the sum over ranks from all_reduce(); call reset() "
                "before counting again (adding local batches to it would count them twice at "
                "the next all_reduce)"
            )
        pred, labels = _check_pair(
            pred, labels, self.num_classes, self.ignore_index, batched=True,
            counts_device=self._device,
            counts_why="this ConfusionMatrix's, set by device= or by its first update; move "
            "the inputs, or the counts with .to(device)",
        )
        if self._device is None:
            self.to(labels.device)
        num_classes = self.num_classes
        num_groups = labels.shape[0]
        grouped = _grouped(pred, labels, num_classes, self.ignore_index, num_groups)
        if _pairs_fit(num_groups, num_classes, labels.numel()):
            pairs = _count_pairs(*grouped, num_classes)
            self.matrix += pairs.sum(dim=0)
            image_counts = _class_counts_from_pairs(pairs)
        else:  # many images of few pixels: the image totals in O(B * C), the matrix once
            self.matrix += _count_pairs(*(t.reshape(1, -1) for t in grouped), num_classes)[0]
            image_counts = _count_classes_directly(*grouped, num_classes)
        image_mious = _mean_over_classes(
            _iou(image_counts, self.zero_division, self.ignore_index), image_counts
        )
        counted = ~torch.isnan(image_mious)
        self._image_miou_sum += torch.where(counted, image_mious, 0).sum()
        self._images_counted += counted.sum()
        self.num_updates += 1
        return self

    def iou(self) -> torch.Tensor:
        """(C,) float64 IoU per class over everything seen (``zero_division`` for classes never
        seen in ground truth or prediction, NaN for the ignored class)."""
        return _iou(_class_counts_from_pairs(self.matrix), self.zero_division, self.ignore_index)

    def miou(self) -> torch.Tensor:
        """Dataset-mIoU (Eq. 14): the mean of :meth:`iou` over classes that are not NaN; NaN
        when no pixel was counted."""
        return _mean_over_classes(self.iou(), _class_counts_from_pairs(self.matrix))

    compute = miou

    def image_miou(self) -> torch.Tensor:
        """Image-mIoU over every image seen (images with no counted pixel left out)."""
        return torch.where(
            self._images_counted > 0,
            self._image_miou_sum / self._images_counted.clamp(min=1),
            math.nan,
        )

    @torch.no_grad()
    def all_reduce(self, group: dist.ProcessGroup | None = None) -> ConfusionMatrix:
        """Sum the counts of every rank of ``group`` (default: the whole world), in place.

        A collective: every rank of the group calls it, after its last update; every rank then
        reads the same :meth:`iou`, :meth:`miou` and :meth:`image_miou`, those of the union of
        the ranks' batches. The ranks' ``num_classes``, ``ignore_index`` and ``zero_division``
        are compared first (one small object gather) and a mismatch raises the same
        ``ValueError`` on every rank instead of failing inside the backend. Afterwards
        :meth:`update` and a second ``all_reduce`` raise until :meth:`reset`, since either
        would count batches twice. Returns self.

        Examples
        --------
        >>> import torch, torch.distributed as dist
        >>> from lovasz_kernels import ConfusionMatrix
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> cm = ConfusionMatrix(2).update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
        >>> cm.all_reduce().matrix  # one rank: the sum is its own counts
        tensor([[1, 1],
                [0, 0]])
        >>> dist.destroy_process_group()
        """
        if self._reduced:
            raise RuntimeError(
                "this ConfusionMatrix already holds the sum over ranks; a second all_reduce() "
                "would count every batch again (call reset() to start a new evaluation)"
            )
        zero_division = "nan" if math.isnan(self.zero_division) else self.zero_division
        settings = (self.num_classes, self.ignore_index, zero_division)
        every_rank = [None] * dist.get_world_size(group)
        dist.all_gather_object(every_rank, (settings, self.num_updates), group=group)
        if any(other != settings for other, _ in every_rank):
            listed = "; ".join(
                f"rank {rank}: {other}" for rank, (other, _) in enumerate(every_rank)
            )
            raise ValueError(
                "every rank must build its ConfusionMatrix with the same (num_classes, "
                f"ignore_index, zero_division); got {listed}"
            )
        # counts stay exact in int64; only the sum of image mIoUs is a float
        counts = torch.cat([self.matrix.flatten(), self._images_counted.reshape(1)])
        dist.all_reduce(counts, group=group)
        dist.all_reduce(self._image_miou_sum, group=group)
        self.matrix = counts[:-1].reshape(self.num_classes, self.num_classes)
        self._images_counted = counts[-1]
        self.num_updates = sum(updates for _, updates in every_rank)
        self._reduced = True
        return self

    def to(self, device: torch.device | str) -> ConfusionMatrix:
        """Move the counts to ``device`` (later updates must be there too)."""
        self._device = _check_device(device)
        self.matrix = self.matrix.to(self._device)
        self._image_miou_sum = self._image_miou_sum.to(self._device)
        self._images_counted = self._images_counted.to(self._device)
        return self

    def __repr__(self) -> str:
        zero_division = "" if math.isnan(self.zero_division) else (
            f", zero_division={self.zero_division}"
        )
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"device={self.matrix.device}{zero_division}, updates={self.num_updates})"
        )
