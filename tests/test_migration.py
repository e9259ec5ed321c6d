"""Every row of the README's migration table: a peer's call and ours with the mapped arguments
give the same loss.

The peers (the authors' ``lovasz_losses.py``, segmentation_models_pytorch's ``LovaszLoss``,
kornia's ``lovasz_softmax_loss`` / ``lovasz_hinge_loss``) all run the authors' algorithm; their
conventions differ. Each is transcribed here from its documented behaviour (the same per-class
loop, in float64 so that the comparison is about conventions, not rounding), not imported: none
of them is a dependency.
"""

from __future__ import annotations

import pytest
import torch

from lovasz_kernels import lovasz_hinge, lovasz_softmax

IGNORE = 255


def _extension(errors: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """The authors' flat loss: sort, Algorithm 1 by differences of Jaccard values, dot."""
    errors_sorted, order = torch.sort(errors, descending=True)
    gt = fg[order].to(errors.dtype)
    total = gt.sum()
    jaccard = 1 - (total - gt.cumsum(0)) / (total + (1 - gt).cumsum(0))
    jaccard[1:] = jaccard[1:] - jaccard[:-1].clone()
    return torch.dot(errors_sorted, jaccard)


def _authors_softmax_flat(probas, labels, classes):
    """probas (P, C), labels (P,): the mean over classes ("present": in labels)."""
    if probas.numel() == 0:
        return probas.sum() * 0.0  # only ignored pixels: counts as 0 in a per-image mean
    chosen = range(probas.shape[1]) if classes in ("all", "present") else classes
    losses = []
    for c in chosen:
        fg = labels == c
        if classes == "present" and not fg.any():
            continue
        losses.append(_extension((fg.to(probas.dtype) - probas[:, c]).abs(), fg))
    return torch.stack(losses).mean() if losses else probas.sum() * 0.0


def authors_lovasz_softmax(probas, labels, classes="present", per_image=False, ignore=None):
    def flat(p, y):
        p, y = p.movedim(0, -1).reshape(-1, p.shape[0]), y.reshape(-1)
        keep = torch.ones_like(y, dtype=torch.bool) if ignore is None else y != ignore
        return _authors_softmax_flat(p[keep], y[keep], classes)

    if per_image:
        return torch.stack([flat(p, y) for p, y in zip(probas, labels)]).mean()
    return flat(probas.movedim(0, 1).reshape(probas.shape[1], -1), labels)


def authors_lovasz_hinge(logits, labels, per_image=True, ignore=None):
    def flat(x, y):
        x, y = x.reshape(-1), y.reshape(-1)
        if ignore is not None:
            x, y = x[y != ignore], y[y != ignore]
        if x.numel() == 0:
            return x.sum() * 0.0
        return _extension(torch.relu(1 - x * (2 * y.to(x.dtype) - 1)), y == 1)

    if per_image:
        return torch.stack([flat(x, y) for x, y in zip(logits, labels)]).mean()
    return flat(logits, labels)


def smp_lovasz_loss(mode, y_pred, y_true, per_image=False, ignore_index=None):
    """segmentation_models_pytorch's LovaszLoss(mode, per_image, ignore_index): the authors'
    hinge on the raw (N, C, H, W) logits for "binary" and "multilabel" (channels pooled), the
    authors' Lovász-Softmax of the softmax for "multiclass" (its from_logits is not read)."""
    if mode in ("binary", "multilabel"):
        return authors_lovasz_hinge(y_pred, y_true, per_image, ignore_index)
    return authors_lovasz_softmax(y_pred.softmax(dim=1), y_true, "present", per_image,
                                  ignore_index)


def kornia_lovasz_softmax_loss(pred, target, weight=None):
    """kornia: softmax inside, every class, per image then the batch mean; a weight
    multiplies each class's term and the mean still divides by C; no ignore label."""
    probas = pred.softmax(dim=1)
    per_class = torch.stack([
        torch.stack([_authors_softmax_flat(p.reshape(p.shape[0], -1).T, y.reshape(-1), [c])
                     for c in range(pred.shape[1])])
        for p, y in zip(probas, target)
    ]).mean(dim=0)
    if weight is not None:
        per_class = per_class * weight
    return per_class.mean()


def kornia_lovasz_hinge_loss(pred, target):
    """kornia: logits (B, 1, H, W), per-image losses averaged over the batch."""
    return authors_lovasz_hinge(pred[:, 0], target, per_image=True)


@pytest.fixture
def batch(gen):
    logits = torch.randn(3, 4, 6, 5, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 3, (3, 6, 5), generator=gen)  # class 3 absent
    ignored = labels.clone()
    ignored[torch.rand(labels.shape, generator=gen) < 0.2] = IGNORE
    return logits, labels, ignored


def _same(ours, theirs):
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("classes", ["present", "all", [0, 3]], ids=str)
def test_authors_lovasz_softmax(batch, per_image, classes):
    logits, _, ignored = batch
    probas = logits.softmax(dim=1)
    _same(lovasz_softmax(probas, ignored, classes=classes, per_image=per_image,
                         ignore_index=IGNORE),
          authors_lovasz_softmax(probas, ignored, classes, per_image, ignore=IGNORE))


@pytest.mark.parametrize("per_image", [True, False])
def test_authors_lovasz_hinge(batch, per_image):
    logits, labels, ignored = batch
    binary = torch.where(ignored == IGNORE, IGNORE, ignored % 2)
    _same(lovasz_hinge(logits[:, 0], binary, per_image=per_image, ignore_index=IGNORE),
          authors_lovasz_hinge(logits[:, 0], binary, per_image, ignore=IGNORE))


def test_authors_per_image_counts_fully_ignored_images_as_zero(batch):
    """The one documented difference: an image with no valid pixel is left out of our
    per-image mean; the authors' code averages a 0 for it."""
    logits, _, ignored = batch
    ignored[1] = IGNORE
    probas = logits.softmax(dim=1)
    ours = lovasz_softmax(probas, ignored, per_image=True, ignore_index=IGNORE)
    theirs = authors_lovasz_softmax(probas, ignored, per_image=True, ignore=IGNORE)
    _same(ours * 2 / 3, theirs)
    # their convention exactly: the mean of every image's loss, 0 where nothing counts
    each = lovasz_softmax(probas, ignored, per_image=True, ignore_index=IGNORE,
                          reduction="none")
    _same(each.mean(), theirs)


@pytest.mark.parametrize("per_image", [False, True])
def test_smp_multiclass(batch, per_image):
    logits, _, ignored = batch
    _same(lovasz_softmax(logits, ignored, from_logits=True, per_image=per_image,
                         ignore_index=IGNORE),
          smp_lovasz_loss("multiclass", logits, ignored, per_image, IGNORE))


@pytest.mark.parametrize("mode", ["binary", "multilabel"])
def test_smp_binary_and_multilabel_pool_the_channels(gen, mode):
    """smp's default per_image=False against ours (whose hinge default is per_image=True);
    float masks as smp users pass them."""
    channels = 1 if mode == "binary" else 3
    logits = torch.randn(2, channels, 6, 5, generator=gen, dtype=torch.float64)
    masks = (torch.rand(2, channels, 6, 5, generator=gen) < 0.4).double()
    _same(lovasz_hinge(logits, masks, per_image=False),
          smp_lovasz_loss(mode, logits, masks, per_image=False))


def test_kornia_lovasz_softmax_loss_and_its_weight_convention(batch):
    """kornia = ours with per_image=True, classes="all", from_logits=True; kornia's weights
    give Σ w_c L_c / C where ours give the weighted mean Σ w_c L_c / Σ w_c."""
    logits, labels, _ = batch
    _same(lovasz_softmax(logits, labels, from_logits=True, per_image=True, classes="all"),
          kornia_lovasz_softmax_loss(logits, labels))
    weight = torch.tensor([0.5, 2.0, 1.0, 0.0], dtype=torch.float64)
    ours = lovasz_softmax(logits, labels, from_logits=True, per_image=True, classes="all",
                          class_weights=weight)
    _same(ours * weight.sum() / len(weight), kornia_lovasz_softmax_loss(logits, labels, weight))


def test_kornia_lovasz_hinge_loss(batch):
    logits, labels, _ = batch
    binary = labels % 2
    _same(lovasz_hinge(logits[:, :1], binary, per_image=True),
          kornia_lovasz_hinge_loss(logits[:, :1], binary))
