"""Yardsticks for benchmarks: the common public implementation, seeded inputs, a byte model.

A Python loop over classes, each one ``torch.sort`` of float errors, Algorithm 1 by a float
cumulative sum and differences of consecutive Jaccard values, and autograd through the sort's
permutation. It is not used by any loss here: benchmarks time it next to the backends
(``lovasz-kernels bench``, the asv suite) so speed-ups are quoted against what users replace.
Its numerics are the ones DESIGN.md §1 warns about (float counts, cancelling differences).

Also here, so that ``lovasz-kernels bench`` and the asv suite time the same thing: seeded input
builders (:func:`softmax_inputs`, :func:`hinge_inputs`) and the byte model behind the GB/s figures
reported on GPUs (:func:`ideal_bytes`).
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


# --------------------------------------------------------------------------------------------
# inputs and the byte model shared by ``lovasz-kernels bench`` and benchmarks/ (asv)


def softmax_inputs(
    batch: int, num_classes: int, side: int, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``(probas (B, C, side, side), labels (B, side, side))`` for Lovász-Softmax.

    Probabilities are a softmax of standard normal logits computed in float32, then cast to
    ``dtype`` (so every dtype sees the same distribution); labels are uniform over classes.
    """
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_classes, side, side, generator=gen)
    labels = torch.randint(0, num_classes, (batch, side, side), generator=gen)
    return logits.softmax(dim=1).to(device, dtype), labels.to(device)


def hinge_inputs(
    batch: int, side: int, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``(logits (B, side, side), labels (B, side, side) in {0, 1})`` for the hinge."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, side, side, generator=gen)
    labels = torch.randint(0, 2, (batch, side, side), generator=gen)
    return logits.to(device, dtype), labels.to(device)


#: bytes per sort element of one ideal pass of a key/payload sort: read a 32-bit key, write
#: the sorted 32-bit key and a 64-bit index (what ``torch.sort`` of float32 keys returns)
SORT_PASS_BYTES = 4 + 4 + 8


def ideal_bytes(
    num_elements: int, num_pixels: int, score_bytes: int = 4, label_bytes: int = 8
) -> int:
    """Bytes an ideal fwd+bwd must move: the denominator of the GB/s the GPU benchmarks print.

    ``num_elements`` = S·P (segments × pixels per segment), ``num_pixels`` = pixels in the
    batch (each label is read once however many classes use it). Three passes, each reading
    and writing every byte exactly once, nothing re-read from cache:

    - key build: read the scores (``score_bytes`` per element) and labels (``label_bytes``
      per pixel), write one 32-bit key and one 32-bit pixel index per element (8 B);
    - sort: one ideal pass over (key, index) pairs: read 8 B and write 8 B per element
      (a real radix sort makes several such passes: this is a floor, not an estimate);
    - post-sort: read the sorted pairs (8 B), write the gradient (``score_bytes``) per element.

    That is ``(2·score_bytes + 32)·S·P + label_bytes·pixels``: 40 B per element for float32.
    """
    per_element = score_bytes + 8 + 16 + 8 + score_bytes
    return per_element * num_elements + label_bytes * num_pixels
