"""What the common public implementation does, kept as a yardstick for benchmarks.

A Python loop over classes, each one ``torch.sort`` of float errors, Algorithm 1 by a float
cumulative sum and differences of consecutive Jaccard values, and autograd through the sort's
permutation. It is not used by any loss here: benchmarks time it next to the backends
(``lovasz-kernels bench``, the asv suite) so speed-ups are quoted against what users replace.
Its numerics are the ones DESIGN.md §1 warns about (float counts, cancelling differences).
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


def per_class_loop_lovasz_softmax(probas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Batch Lovász-Softmax over present classes, one Python iteration per class.

    ``probas`` (B, C, *spatial) probabilities, ``labels`` (B, *spatial); no ignore label.
    """
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


def per_image_loop_lovasz_hinge(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-image Lovász hinge, one Python iteration per image (logits (B, *spatial))."""
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
