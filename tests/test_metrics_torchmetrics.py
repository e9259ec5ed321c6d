"""The IoU metrics against torchmetrics, where users come from.

Where the conventions agree the numbers must agree (torchmetrics computes in float32, hence the
tolerance); where they differ by design, the difference is asserted, so that the README's
mapping stays true:

- ``MulticlassJaccardIndex(average=None, zero_division=z)`` == ``per_class_iou(zero_division=z)``
  except at an ``ignore_index`` naming a class: torchmetrics reports 0 there (or z when the
  class is never predicted), we report NaN.
- ``MulticlassJaccardIndex(average="macro")`` (any ``zero_division``) == ``batch_miou`` /
  ``dataset_miou`` / ``ConfusionMatrix.miou`` with the default ``zero_division=nan``: absent
  classes and the ignored class are left out. A numeric ``zero_division`` makes ours count
  absent classes in the mean (scikit-learn's convention), torchmetrics' macro does not.
- ``MulticlassConfusionMatrix`` == ``confusion_matrix`` / ``ConfusionMatrix.matrix``.
- functional ``mean_iou(input_format="index")`` on (B, 1 or more, ...) maps == ``per_image_miou``,
  and with ``per_class=True`` == ``per_image_iou`` with -1 for NaN (no ``ignore_index`` there).
- ``MeanIoU`` (streaming) averages the IoU over every (image, class) pair present, pooled; our
  image-mIoU averages each image's mean: they differ when images hold different numbers of
  classes.
"""

from __future__ import annotations

import math

import pytest
import torch

from lovasz_kernels import (
    ConfusionMatrix,
    batch_miou,
    confusion_matrix,
    dataset_miou,
    image_miou,
    per_class_iou,
    per_image_iou,
    per_image_miou,
)

pytest.importorskip("torchmetrics")
from torchmetrics.classification import (  # noqa: E402
    MulticlassConfusionMatrix,
    MulticlassJaccardIndex,
)
from torchmetrics.functional.segmentation import mean_iou  # noqa: E402
from torchmetrics.segmentation import MeanIoU  # noqa: E402

NUM_CLASSES = 6
ABSENT = 5  # in neither ground truth nor prediction
PREDICTED_ONLY = 4  # never in the ground truth: IoU 0
SPATIAL = [(23,), (7, 9), (3, 4, 5)]  # 1-D, 2-D and 3-D images
IGNORE = [None, 255, 2]  # none, outside [0, C), naming a class
SEEDS = [0, 1, 2]


def random_batch(seed: int, spatial: tuple[int, ...], ignore: int | None, batch: int = 4):
    """(pred, labels) of shape (batch, *spatial); class ``ABSENT`` appears nowhere, class
    ``PREDICTED_ONLY`` only in the prediction, ignored pixels at 20 %."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *spatial)
    labels = torch.randint(0, PREDICTED_ONLY, shape, generator=gen)
    noise = torch.randint(0, PREDICTED_ONLY + 1, shape, generator=gen)
    pred = torch.where(torch.rand(shape, generator=gen) < 0.6, labels, noise)
    if ignore is not None:
        labels = torch.where(torch.rand(shape, generator=gen) < 0.2, ignore, labels)
    return pred, labels


def names_a_class(ignore: int | None) -> bool:
    return ignore is not None and 0 <= ignore < NUM_CLASSES


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Same values (theirs in float32), and NaN exactly where theirs is NaN."""
    assert ours.dtype == torch.float64, what
    torch.testing.assert_close(ours, theirs.to(torch.float64), rtol=1e-6, atol=1e-6,
                               equal_nan=True, msg=what)


def jaccard(average, ignore, **kwargs) -> MulticlassJaccardIndex:
    return MulticlassJaccardIndex(NUM_CLASSES, average=average, ignore_index=ignore, **kwargs)


@pytest.mark.parametrize("zero_division", [0.0, 1.0])
@pytest.mark.parametrize("ignore", IGNORE)
@pytest.mark.parametrize("spatial", SPATIAL, ids=str)
def test_per_class_iou_is_jaccard_average_none(spatial, ignore, zero_division):
    for seed in SEEDS:
        pred, labels = random_batch(seed, spatial, ignore)
        what = f"{spatial}, ignore={ignore}, zero_division={zero_division}, seed {seed}"
        theirs = jaccard(None, ignore, zero_division=zero_division)(pred, labels)
        ours = per_class_iou(pred, labels, NUM_CLASSES, ignore, zero_division=zero_division)
        others = [c for c in range(NUM_CLASSES) if c != ignore]
        assert_matches(ours[others], theirs[others], what)
        assert ours[ABSENT] == zero_division and ours[PREDICTED_ONLY] == 0.0, what
        if names_a_class(ignore):  # by design: the ignored class has no IoU here
            assert torch.isnan(ours[ignore]), what
            assert theirs[ignore] == 0.0, what  # predicted somewhere, never a true pixel
        # the default reports an absent class as NaN where torchmetrics gives zero_division
        default = per_class_iou(pred, labels, NUM_CLASSES, ignore)
        assert torch.isnan(default[ABSENT]), what
        assert_matches(default[[PREDICTED_ONLY]], theirs[[PREDICTED_ONLY]], what)


@pytest.mark.parametrize("ignore", IGNORE)
@pytest.mark.parametrize("spatial", SPATIAL, ids=str)
def test_means_are_jaccard_macro(spatial, ignore):
    for seed in SEEDS:
        pred, labels = random_batch(seed, spatial, ignore)
        what = f"{spatial}, ignore={ignore}, seed {seed}"
        # torchmetrics' macro leaves absent classes out whatever its zero_division says
        for their_zero_division in (0.0, 1.0):
            theirs = jaccard("macro", ignore, zero_division=their_zero_division)(pred, labels)
            assert_matches(batch_miou(pred, labels, NUM_CLASSES, ignore), theirs, what)
            assert_matches(dataset_miou(pred, labels, NUM_CLASSES, ignore), theirs, what)
        # by design: a numeric zero_division counts the absent class in our mean
        per_class = jaccard(None, ignore, zero_division=0.0)(pred, labels)
        counted = [c for c in range(NUM_CLASSES) if c != ignore]
        ours_zero = batch_miou(pred, labels, NUM_CLASSES, ignore, zero_division=0.0)
        assert_matches(ours_zero, per_class[counted].mean(), what)
        assert ours_zero < theirs, what


@pytest.mark.parametrize("ignore", IGNORE)
def test_streaming_is_jaccard_and_confusion_matrix_updated_per_batch(ignore):
    """Batches of different shapes (1-D, 2-D, 3-D images) into one running count."""
    theirs_iou = jaccard(None, ignore, zero_division=0.0)
    theirs_miou = jaccard("macro", ignore)
    theirs_matrix = MulticlassConfusionMatrix(NUM_CLASSES, ignore_index=ignore)
    ours = ConfusionMatrix(NUM_CLASSES, ignore_index=ignore)
    ours_zero = ConfusionMatrix(NUM_CLASSES, ignore_index=ignore, zero_division=0.0)
    preds, labels = [], []
    for seed, spatial in enumerate(SPATIAL):
        pred, label = random_batch(seed, spatial, ignore, batch=seed + 1)
        preds.append(pred)
        labels.append(label)
        for metric in (theirs_iou, theirs_miou, theirs_matrix, ours, ours_zero):
            metric.update(pred, label)
        assert torch.equal(confusion_matrix(pred, label, NUM_CLASSES, ignore),
                           MulticlassConfusionMatrix(NUM_CLASSES, ignore_index=ignore)(pred, label))
    assert torch.equal(ours.matrix, theirs_matrix.compute())
    assert_matches(ours.miou(), theirs_miou.compute(), "miou")
    assert_matches(dataset_miou(preds, labels, NUM_CLASSES, ignore), theirs_miou.compute(),
                   "dataset_miou over a ragged list")
    others = [c for c in range(NUM_CLASSES) if c != ignore]
    assert_matches(ours_zero.iou()[others], theirs_iou.compute()[others], "iou")
    assert_matches(ours.iou()[[PREDICTED_ONLY]], theirs_iou.compute()[[PREDICTED_ONLY]], "iou")
    assert torch.isnan(ours.iou()[ABSENT])


def with_channel(maps: torch.Tensor) -> torch.Tensor:
    """torchmetrics reads (B, N) index maps as one B x N image: give 1-D images a dim."""
    return maps[:, None] if maps.dim() == 2 else maps


@pytest.mark.parametrize("spatial", SPATIAL, ids=str)
def test_per_image_is_functional_mean_iou(spatial):
    """Without ignore_index, which torchmetrics' mean_iou does not have."""
    for seed in SEEDS:
        pred, labels = random_batch(seed, spatial, ignore=None)
        what = f"{spatial}, seed {seed}"
        args = (with_channel(pred), with_channel(labels), NUM_CLASSES)
        theirs = mean_iou(*args, input_format="index")
        assert_matches(per_image_miou(pred, labels, NUM_CLASSES), theirs, what)
        theirs_per_class = mean_iou(*args, input_format="index", per_class=True)
        ours_per_class = per_image_iou(pred, labels, NUM_CLASSES)
        assert_matches(ours_per_class.nan_to_num(-1.0), theirs_per_class, what)
        assert bool((ours_per_class[:, ABSENT].isnan()).all()), what


def test_streaming_mean_iou_pools_image_class_pairs():
    """MeanIoU averages every (image, class) IoU present; image-mIoU averages each image's
    mean. Images with different numbers of classes tell them apart."""
    pred = torch.tensor([[[0, 0, 1, 1]], [[0, 0, 0, 0]]])
    labels = torch.tensor([[[0, 1, 1, 1]], [[0, 0, 0, 0]]])
    # image 0: class 0 1/2, class 1 2/3; image 1: class 0 1
    pooled = (1 / 2 + 2 / 3 + 1) / 3
    mean_of_means = ((1 / 2 + 2 / 3) / 2 + 1) / 2
    theirs = MeanIoU(num_classes=3, input_format="index")
    theirs_per_class = MeanIoU(num_classes=3, input_format="index", per_class=True)
    for metric in (theirs, theirs_per_class):
        metric.update(pred, labels)
    iou = per_image_iou(pred, labels, 3)
    assert_matches(torch.nanmean(iou), theirs.compute(), "pooled")
    assert_matches(torch.nanmean(iou), torch.tensor(pooled), "pooled by hand")
    assert_matches(image_miou(pred, labels, 3), torch.tensor(mean_of_means), "ours")
    assert not math.isclose(pooled, mean_of_means)
    assert_matches(torch.nanmean(iou, dim=0).nan_to_num(-1.0), theirs_per_class.compute(),
                   "per class over images")
