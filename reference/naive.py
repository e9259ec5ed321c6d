"""Naive oracles transcribed from the paper's definitions. Test-only; never vectorized.

Everything here works on plain Python numbers (float64) with explicit loops and Python sets,
so that it shares no code, no library routine and no trick with any backend:

- the Jaccard loss as a set function of the mispredicted pixels (Eq. 3-5),
- its Lovász extension from Definition 1 (Eq. 8-9), evaluating the set function on every
  prefix of the sorted errors: O(P^2),
- the Lovász hinge (Eq. 10, §3.2) and the Lovász-Softmax (Eq. 11-12) with the reductions
  the package documents (mean over images with a valid pixel, classes "present"/"all"/list,
  class weights, the sigmoid case C == 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def jaccard_set_loss(mispredicted: set[int], foreground: set[int]) -> float:
    """Δ_J(M) = 1 − |F \\ M| / |F ∪ M| (Eq. 3-5), with Δ_J(∅) = 0."""
    union = foreground | mispredicted
    if not union:
        return 0.0
    return 1.0 - len(foreground - mispredicted) / len(union)


def lovasz_extension(errors: Sequence[float], fg: Sequence[bool]) -> tuple[float, list[float]]:
    """Δ̄_J(relu(errors)) and its gradient for one segment (Eq. 8-9).

    Pixels with error −inf are padding: outside the ground set, gradient 0. Ties are broken
    by pixel index (any order gives the same value).
    """
    pixels = [i for i in range(len(errors)) if errors[i] != -math.inf]
    foreground = {i for i in pixels if fg[i]}
    order = sorted(pixels, key=lambda i: (-errors[i], i))
    loss = 0.0
    grad = [0.0] * len(errors)
    previous = 0.0
    for k in range(len(order)):
        prefix = set(order[: k + 1])
        current = jaccard_set_loss(prefix, foreground)
        increment = current - previous
        previous = current
        pixel = order[k]
        margin = max(float(errors[pixel]), 0.0)
        loss += margin * increment
        grad[pixel] = increment if errors[pixel] > 0 else 0.0
    return loss, grad


def _flat(values) -> list:
    """A nested sequence, numpy array or tensor as a flat list of Python numbers."""
    if hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, (list, tuple)):
        out = []
        for v in values:
            out.extend(_flat(v))
        return out
    return [values]


def lovasz_hinge(
    logits, labels, per_image: bool = True, ignore_index: int | None = None
) -> tuple[float, list[float]]:
    """Lovász hinge: loss and d loss / d logits (flat, in the input's element order).

    ``logits`` and ``labels`` are (B, P)-shaped nested sequences or arrays.
    """
    logits_rows = [_flat(row) for row in logits]
    label_rows = [_flat(row) for row in labels]
    if per_image:
        groups = [[(b, i) for i in range(len(logits_rows[b]))] for b in range(len(logits_rows))]
    else:
        groups = [[(b, i) for b in range(len(logits_rows)) for i in range(len(logits_rows[b]))]]
    grad = {(b, i): 0.0 for b in range(len(logits_rows)) for i in range(len(logits_rows[b]))}
    segment_losses = []
    segment_grads = []
    for group in groups:
        valid = [(b, i) for (b, i) in group if label_rows[b][i] != ignore_index]
        if not valid:
            continue
        errors = []
        fg = []
        for b, i in valid:
            sign = 1.0 if label_rows[b][i] == 1 else -1.0
            errors.append(1.0 - float(logits_rows[b][i]) * sign)
            fg.append(label_rows[b][i] == 1)
        loss, g = lovasz_extension(errors, fg)
        segment_losses.append(loss)
        segment_grads.append((valid, fg, g))
    if not segment_losses:
        return 0.0, [0.0] * len(grad)
    count = len(segment_losses)
    for valid, fg, g in segment_grads:
        for (b, i), is_fg, g_i in zip(valid, fg, g):
            # error = 1 - logit on foreground, 1 + logit on background
            grad[(b, i)] += (-g_i if is_fg else g_i) / count
    flat_grad = [grad[(b, i)] for b in range(len(logits_rows)) for i in range(len(logits_rows[b]))]
    return sum(segment_losses) / count, flat_grad


def lovasz_softmax(
    probas,
    labels,
    classes="present",
    per_image: bool = False,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
) -> tuple[float, list[list[list[float]]]]:
    """Lovász-Softmax: loss and d loss / d probas as nested lists [b][c][i].

    ``probas`` is (B, C, P), ``labels`` (B, P). With C == 1 the channel is P(class 1).
    """
    probas_rows = [[_flat(channel) for channel in image] for image in probas]
    label_rows = [_flat(row) for row in labels]
    batch = len(probas_rows)
    num_classes = len(probas_rows[0]) if batch else 0
    num_pixels = len(label_rows[0]) if batch else 0
    grad = [[[0.0] * num_pixels for _ in range(num_classes)] for _ in range(batch)]
    images = [[b] for b in range(batch)] if per_image else [list(range(batch))]
    if num_classes == 1:
        class_channels = [(1, 0)]  # (class label, channel)
    elif classes in ("present", "all"):
        class_channels = [(c, c) for c in range(num_classes)]
    else:
        class_channels = [(c, c) for c in classes]

    image_losses = []
    image_parts = []
    for members in images:
        pixels = [(b, i) for b in members for i in range(num_pixels)
                  if label_rows[b][i] != ignore_index]
        if not pixels:
            continue
        parts = []
        for label, channel in class_channels:
            fg = [label_rows[b][i] == label for (b, i) in pixels]
            if classes == "present" and num_classes > 1 and not any(fg):
                continue
            weight = 1.0 if class_weights is None else float(class_weights[channel])
            if weight == 0.0:
                continue
            errors = []
            for (b, i), is_fg in zip(pixels, fg):
                p = float(probas_rows[b][channel][i])
                errors.append(1.0 - p if is_fg else p)
            loss, g = lovasz_extension(errors, fg)
            parts.append((weight, loss, channel, fg, g))
        if not parts:
            continue
        total_weight = sum(w for w, *_ in parts)
        image_losses.append(sum(w * loss for w, loss, *_ in parts) / total_weight)
        image_parts.append((pixels, parts, total_weight))
    if not image_losses:
        return 0.0, grad
    count = len(image_losses)
    for pixels, parts, total_weight in image_parts:
        for weight, _, channel, fg, g in parts:
            for (b, i), is_fg, g_i in zip(pixels, fg, g):
                # error = 1 - p on foreground, p on background
                grad[b][channel][i] += (-g_i if is_fg else g_i) * weight / total_weight / count
    return sum(image_losses) / count, grad


def lovasz_multilabel(
    scores,
    labels,
    hinge: bool,
    classes="present",
    per_image: bool = False,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
) -> tuple[float, list[list[list[float]]]]:
    """Multilabel Lovász loss: loss and d loss / d scores as nested lists [b][c][i].

    ``scores`` and ``labels`` are (B, C, P): channel c is its own binary problem with mask
    ``labels[b][c]``. Errors: the hinge's ``1 - s`` / ``1 + s`` (``hinge``), else the
    probabilities' ``1 - p`` / ``p``. A channel counts in a segment ("present") when it has a
    foreground pixel there, ("all") when it has a valid pixel; the loss is the weighted mean
    over counted channels, per image then over images when ``per_image``.
    """
    score_rows = [[_flat(channel) for channel in image] for image in scores]
    label_rows = [[_flat(channel) for channel in image] for image in labels]
    batch = len(score_rows)
    num_channels = len(score_rows[0]) if batch else 0
    num_pixels = len(score_rows[0][0]) if batch and num_channels else 0
    grad = [[[0.0] * num_pixels for _ in range(num_channels)] for _ in range(batch)]
    groups = [[b] for b in range(batch)] if per_image else [list(range(batch))]
    channels = range(num_channels) if classes in ("present", "all") else classes
    offset = 1.0 if hinge else 0.0
    group_results = []
    for members in groups:
        parts = []
        for c in channels:
            pixels = [(b, i) for b in members for i in range(num_pixels)
                      if label_rows[b][c][i] != ignore_index]
            fg = [label_rows[b][c][i] == 1 for (b, i) in pixels]
            if not pixels or (classes == "present" and not any(fg)):
                continue
            weight = 1.0 if class_weights is None else float(class_weights[c])
            if weight == 0.0:
                continue
            errors = [1.0 - float(score_rows[b][c][i]) if is_fg
                      else offset + float(score_rows[b][c][i])
                      for (b, i), is_fg in zip(pixels, fg)]
            loss, g = lovasz_extension(errors, fg)
            parts.append((weight, loss, c, pixels, fg, g))
        if parts:
            group_results.append(parts)
    if not group_results:
        return 0.0, grad
    total = 0.0
    for parts in group_results:
        total_weight = sum(part[0] for part in parts)
        total += sum(w * loss for w, loss, *_ in parts) / total_weight / len(group_results)
        for weight, _, c, pixels, fg, g in parts:
            for (b, i), is_fg, g_i in zip(pixels, fg, g):
                scale = weight / total_weight / len(group_results)
                grad[b][c][i] += (-g_i if is_fg else g_i) * scale
    return total, grad
