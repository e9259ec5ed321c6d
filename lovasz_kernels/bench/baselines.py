"""The yardstick: the per-class loop of the common public implementation (the authors' code).

A Python loop over classes, each one ``torch.sort`` of float errors, Algorithm 1 by a float
cumulative sum and differences of consecutive Jaccard values, and autograd through the sort's
permutation. No loss here uses it: the benchmarks time it next to the backends so speed-ups
are quoted against what users replace. Its numerics are the ones the kernels avoid (float
counts, cancelling differences), so the benchmarks report its deviation without holding it to
the backends' tolerance.
"""

from __future__ import annotations

import torch


def _jaccard_gradient_by_differences(gt_sorted: torch.Tensor) -> torch.Tensor:
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if gt_sorted.numel() > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def per_class_loop_lovasz_softmax(
    probas: torch.Tensor, labels: torch.Tensor, per_image: bool = False
) -> torch.Tensor:
    """Lovász-Softmax over present classes, one Python iteration per class (and per image).

    ``probas`` (B, C, *spatial) probabilities, ``labels`` (B, *spatial); no ignore label.
    ``per_image=True`` is the public implementation's per-image mode: a Python loop over
    images, each a per-class loop, then the mean over images.
    """
    if per_image:
        return torch.stack([
            per_class_loop_lovasz_softmax(image_probas[None], image_labels[None])
            for image_probas, image_labels in zip(probas, labels)
        ]).mean()
    num_classes = probas.shape[1]
    flat = probas.movedim(1, -1).reshape(-1, num_classes)
    flat_labels = labels.reshape(-1)
    losses = []
    for c in range(num_classes):
        fg = (flat_labels == c).to(flat.dtype)
        if fg.sum() == 0:
            continue
        errors = (fg - flat[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, 0, descending=True)
        losses.append(torch.dot(errors_sorted, _jaccard_gradient_by_differences(fg[perm])))
    if not losses:
        return probas.sum() * 0.0
    return torch.stack(losses).mean()


def per_image_loop_lovasz_hinge(
    logits: torch.Tensor, labels: torch.Tensor, per_image: bool = True
) -> torch.Tensor:
    """Lovász hinge, one Python iteration per image (logits (B, *spatial), labels in {0, 1}).

    ``per_image=False`` treats the batch as one image, as the public implementation does.
    """
    if not per_image:
        logits, labels = logits.reshape(1, -1), labels.reshape(1, -1)
    losses = []
    for image_logits, image_labels in zip(logits, labels):
        signs = 2.0 * image_labels.reshape(-1).to(logits.dtype) - 1.0
        errors = 1.0 - image_logits.reshape(-1) * signs
        errors_sorted, perm = torch.sort(errors, 0, descending=True)
        gt_sorted = image_labels.reshape(-1)[perm].to(logits.dtype)
        losses.append(
            torch.dot(torch.relu(errors_sorted), _jaccard_gradient_by_differences(gt_sorted))
        )
    return torch.stack(losses).mean()
