"""Jaccard index (IoU) of hard predictions: per class, per image, per batch, per dataset.

The paper (§3.1, Eq. 14) distinguishes how the IoU of a class is aggregated:

- **dataset-mIoU** (:func:`dataset_miou`, :class:`ConfusionMatrix`): one confusion matrix over
  every pixel of the evaluation set, one IoU per class, then the mean over classes. This is the
  usual benchmark measure (Pascal VOC, Cityscapes) and what ``per_image=False`` losses target.
- **batch-mIoU** (:func:`batch_miou`): the same computed on one batch.
- **image-mIoU** (:func:`image_miou`): the IoU of each class in each image, averaged over the
  classes present in that image's ground truth or prediction, then over images. It is what
  ``per_image=True`` losses target; a single missed small object weighs as much as a large one.

All functions take integer label maps of any shape (any number of spatial dimensions), on any
device, and count pixels with one scatter into ``C * C`` bins of ``label * C + pred`` (per image
for the image-mIoU): no Python loop over classes and no host synchronisation beyond the optional
value checks (see :func:`lovasz_kernels.set_validate_values`). Results are float64 tensors on the
input's device; a class absent from both ground truth and prediction has IoU NaN and is left out
of every mean.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lovasz_kernels import _validate

__all__ = [
    "ConfusionMatrix",
    "batch_miou",
    "confusion_matrix",
    "dataset_miou",
    "image_miou",
    "per_class_iou",
    "per_image_miou",
]


# --------------------------------------------------------------------------------------------
# Checks and counting


def _check_num_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int; got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    return num_classes


def _check_label_map(name: str, value: object) -> torch.Tensor:
    tensor = _validate.check_tensor(name, value)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        hint = " (take pred = scores.argmax(dim=1) first)" if name == "pred" else ""
        raise TypeError(
            f"{name} must be an integer or bool tensor of class indices; got {tensor.dtype}{hint}"
        )
    return tensor


def _check_pair(
    pred: object, labels: object, num_classes: int, ignore_index: int | None, batched: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Type, shape and device checks always; range checks when value checks are enabled."""
    pred = _check_label_map("pred", pred)
    labels = _check_label_map("labels", labels)
    if pred.shape != labels.shape:
        raise ValueError(
            f"pred must have the shape of labels {_validate.shape_str(labels.shape)}; "
            f"got {_validate.shape_str(pred.shape)}"
        )
    _validate.check_same_device("pred", pred, "labels", labels)
    if batched and pred.dim() < 1:
        raise ValueError("pred and labels must have shape (B, *spatial); got scalars")
    if _validate.validate_values_enabled() and labels.numel():
        valid = _valid(labels, ignore_index)
        for name, tensor in (("labels", labels), ("pred", pred)):
            out_of_range = valid & ((tensor < 0) | (tensor >= num_classes))
            n_bad = int(out_of_range.sum())
            if n_bad:
                example = int(tensor[out_of_range].flatten()[0])
                ignore = "" if ignore_index is None or name == "pred" else (
                    f" or ignore_index={ignore_index}"
                )
                where = " at non-ignored pixels" if name == "pred" else ""
                raise ValueError(
                    f"{name} must be in [0, {num_classes}){ignore}{where}; got {n_bad} "
                    f"out-of-range values (e.g. {example})"
                )
    return pred, labels


def _valid(labels: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    if ignore_index is None:
        return torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    return labels != ignore_index


def _count(
    pred: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int | None,
    num_groups: int = 1,
) -> torch.Tensor:
    """(num_groups, C, C) int64 counts; row = true class, column = predicted class.

    With ``num_groups > 1`` dim 0 of the inputs indexes the groups (images). Ignored pixels,
    and out-of-range values when value checks are off, go to one trash bin that is dropped:
    boolean indexing would need a host synchronisation on a GPU, a fixed-size scatter does not.
    """
    bins = num_classes * num_classes
    pixels_per_group = labels.numel() // num_groups if num_groups else 0
    labels64 = labels.reshape(num_groups, pixels_per_group).to(torch.int64)
    pred64 = pred.reshape(num_groups, pixels_per_group).to(torch.int64)
    keep = (
        _valid(labels64, ignore_index)
        & (labels64 >= 0) & (labels64 < num_classes)
        & (pred64 >= 0) & (pred64 < num_classes)
    )
    group = torch.arange(num_groups, device=labels.device, dtype=torch.int64)[:, None] * bins
    index = torch.where(keep, group + labels64 * num_classes + pred64, num_groups * bins)
    counts = torch.zeros(num_groups * bins + 1, dtype=torch.int64, device=labels.device)
    if index.numel():
        counts.scatter_add_(0, index.flatten(), torch.ones_like(index).flatten())
    return counts[:-1].reshape(num_groups, num_classes, num_classes)


def _iou_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """(..., C, C) confusion counts -> (..., C) float64 IoU, NaN where the union is empty."""
    counts = counts.to(torch.float64)
    true_positive = counts.diagonal(dim1=-2, dim2=-1)
    union = counts.sum(dim=-1) + counts.sum(dim=-2) - true_positive
    return torch.where(union > 0, true_positive / union.clamp(min=1), torch.nan)


def _nanmean(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of the non-NaN entries; NaN when there are none (no warning, no host sync)."""
    present = ~torch.isnan(values)
    total = torch.where(present, values, 0).sum() if dim is None else (
        torch.where(present, values, 0).sum(dim=dim)
    )
    count = present.sum() if dim is None else present.sum(dim=dim)
    return torch.where(count > 0, total / count.clamp(min=1), torch.nan)


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
        C >= 1.
    ignore_index
        Label value whose pixels are not counted.

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
    ignore_index = _validate.check_ignore_index(ignore_index)
    pred, labels = _check_pair(pred, labels, num_classes, ignore_index, batched=False)
    return _count(pred, labels, num_classes, ignore_index)[0]


def per_class_iou(
    pred: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """IoU of each class over all pixels given: |pred = c and label = c| / |pred = c or label = c|.

    Parameters
    ----------
    pred, labels
        Integer label maps of the same shape (see :func:`confusion_matrix`).
    num_classes
        C >= 1.
    ignore_index
        Label value whose pixels are not counted (whatever is predicted there).

    Returns
    -------
    (C,) float64 tensor on the input's device; NaN for a class absent from both the ground truth
    and the prediction.

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels import per_class_iou
    >>> per_class_iou(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 4)
    tensor([1.0000, 0.5000, 0.5000,    nan], dtype=torch.float64)
    """
    return _iou_from_counts(confusion_matrix(pred, labels, num_classes, ignore_index))


def batch_miou(
    pred: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """Batch-mIoU: the mean over classes of the IoU computed over every pixel of the batch.

    Classes absent from both ground truth and prediction are left out of the mean.

    Parameters
    ----------
    pred, labels
        (B, *spatial) integer label maps (any shape works: all pixels form one pool).
    num_classes, ignore_index
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
    """
    return _nanmean(per_class_iou(pred, labels, num_classes, ignore_index))


def image_miou(
    pred: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """Image-mIoU (paper §3.1): the mean over images of each image's mean IoU over the classes
    present in that image's ground truth or prediction.

    Parameters
    ----------
    pred, labels
        (B, *spatial) integer label maps; dim 0 indexes the images.
    num_classes, ignore_index
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
    return _nanmean(per_image_miou(pred, labels, num_classes, ignore_index))


def per_image_miou(
    pred: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """(B,) float64: each image's mean IoU over the classes in its ground truth or prediction
    (NaN for an image with no counted pixel). See :func:`image_miou`."""
    num_classes = _check_num_classes(num_classes)
    ignore_index = _validate.check_ignore_index(ignore_index)
    pred, labels = _check_pair(pred, labels, num_classes, ignore_index, batched=True)
    counts = _count(pred, labels, num_classes, ignore_index, num_groups=labels.shape[0])
    return _nanmean(_iou_from_counts(counts), dim=-1)


def dataset_miou(
    preds: torch.Tensor | Iterable[torch.Tensor],
    labels: torch.Tensor | Iterable[torch.Tensor],
    num_classes: int,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Dataset-mIoU (paper Eq. 14): one confusion matrix accumulated over every pixel of every
    image, one IoU per class, then the mean over classes present in ground truth or prediction.

    Parameters
    ----------
    preds, labels
        Either two tensors of the same shape, or two iterables of matching label maps (images
        or batches of different sizes, e.g. a list of full-resolution predictions).
    num_classes, ignore_index
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
    matrix = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    if isinstance(preds, torch.Tensor) or isinstance(labels, torch.Tensor):
        matrix.update(preds, labels)
        return matrix.miou()
    preds, labels = list(preds), list(labels)
    if len(preds) != len(labels):
        raise ValueError(
            f"preds and labels must hold the same number of label maps; got {len(preds)} "
            f"and {len(labels)}"
        )
    for pred, label in zip(preds, labels):
        matrix.update(pred, label)
    return matrix.miou()


# --------------------------------------------------------------------------------------------
# Streaming


class ConfusionMatrix:
    """A running confusion matrix for evaluation loops: dataset-mIoU (and image-mIoU) over
    any number of batches, without keeping predictions around.

    ``update`` adds a batch's counts; ``iou()``, ``miou()`` (= ``compute()``) and
    ``image_miou()`` read the totals at any time; ``reset()`` starts over. Counts live on the
    device of the first update (or ``device``); later updates on another device are counted
    there and moved. Nothing synchronises with the host until you read a result with
    ``float()``. In distributed evaluation, sum ``matrix`` over ranks (``all_reduce``) before
    reading ``iou()``.

    Parameters
    ----------
    num_classes
        C >= 1.
    ignore_index
        Label value whose pixels are not counted.
    device
        Where to keep the counts; default: the device of the first update.

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
    ) -> None:
        self.num_classes = _check_num_classes(num_classes)
        self.ignore_index = _validate.check_ignore_index(ignore_index)
        self._device = None if device is None else torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forget every update (keeps the device)."""
        device = self._device if self._device is not None else torch.device("cpu")
        self.matrix = torch.zeros(
            self.num_classes, self.num_classes, dtype=torch.int64, device=device
        )
        self._image_miou_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._images_counted = torch.zeros((), dtype=torch.int64, device=device)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, labels: torch.Tensor) -> ConfusionMatrix:
        """Add one batch: ``pred`` and ``labels`` of shape (B, *spatial) (dim 0 indexes images
        for :meth:`image_miou`; the pixel counts do not depend on the layout). Returns self."""
        ignore_index = self.ignore_index
        pred, labels = _check_pair(pred, labels, self.num_classes, ignore_index, batched=True)
        if self._device is None:
            self._device = labels.device
            self.matrix = self.matrix.to(self._device)
            self._image_miou_sum = self._image_miou_sum.to(self._device)
            self._images_counted = self._images_counted.to(self._device)
        counts = _count(pred, labels, self.num_classes, ignore_index, num_groups=labels.shape[0])
        self.matrix += counts.sum(dim=0).to(self._device)
        image_mious = _nanmean(_iou_from_counts(counts), dim=-1)
        counted = ~torch.isnan(image_mious)
        self._image_miou_sum += torch.where(counted, image_mious, 0).sum().to(self._device)
        self._images_counted += counted.sum().to(self._device)
        self.num_updates += 1
        return self

    def iou(self) -> torch.Tensor:
        """(C,) float64 IoU per class over everything seen; NaN for classes never seen in
        ground truth or prediction."""
        return _iou_from_counts(self.matrix)

    def miou(self) -> torch.Tensor:
        """Dataset-mIoU (Eq. 14): the mean of :meth:`iou` over classes that are not NaN."""
        return _nanmean(self.iou())

    compute = miou

    def image_miou(self) -> torch.Tensor:
        """Image-mIoU over every image seen (images with no counted pixel left out)."""
        return torch.where(
            self._images_counted > 0,
            self._image_miou_sum / self._images_counted.clamp(min=1),
            torch.nan,
        )

    def to(self, device: torch.device | str) -> ConfusionMatrix:
        """Move the counts to ``device`` (later updates are counted there too)."""
        self._device = torch.device(device)
        self.matrix = self.matrix.to(self._device)
        self._image_miou_sum = self._image_miou_sum.to(self._device)
        self._images_counted = self._images_counted.to(self._device)
        return self

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"device={self.matrix.device}, updates={self.num_updates})"
        )

