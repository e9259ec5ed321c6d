"""The per-class loop baseline (what benchmarks compare against) computes the same losses."""

from __future__ import annotations

import pytest
import torch

from lovasz_kernels import lovasz_hinge, lovasz_softmax
from lovasz_kernels._baselines import (
    SORT_PASS_BYTES,
    hinge_inputs,
    ideal_bytes,
    per_class_loop_lovasz_softmax,
    per_image_loop_lovasz_hinge,
    softmax_inputs,
)


@pytest.mark.parametrize("per_image", [False, True])
def test_softmax_loop_matches_lovasz_softmax(per_image):
    # float64 and continuous random probabilities: no ties, so gradients are unique
    probas, labels = softmax_inputs(3, 5, 11, torch.float64, seed=3)
    labels[1] = labels[1].clamp(max=2)  # classes absent from one image
    expected_scores = probas.clone().requires_grad_()
    expected = lovasz_softmax(expected_scores, labels, per_image=per_image, backend="numpy")
    expected.backward()
    scores = probas.clone().requires_grad_()
    loss = per_class_loop_lovasz_softmax(scores, labels, per_image)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(scores.grad, expected_scores.grad)


@pytest.mark.parametrize("per_image", [False, True])
def test_hinge_loop_matches_lovasz_hinge(per_image):
    logits, labels = hinge_inputs(4, 9, torch.float64, seed=5)
    expected_scores = logits.clone().requires_grad_()
    expected = lovasz_hinge(expected_scores, labels, per_image=per_image, backend="numpy")
    expected.backward()
    scores = logits.clone().requires_grad_()
    loss = per_image_loop_lovasz_hinge(scores, labels, per_image)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(scores.grad, expected_scores.grad)


def test_softmax_loop_without_present_classes_is_zero():
    probas = torch.full((1, 3, 2, 2), 1 / 3, requires_grad=True)
    # labels outside [0, C): no class present (the loop has no ignore label)
    loss = per_class_loop_lovasz_softmax(probas, torch.full((1, 2, 2), 7))
    loss.backward()
    assert loss.item() == 0 and probas.grad.abs().sum() == 0


def test_inputs_are_seeded_and_shaped():
    probas, labels = softmax_inputs(2, 4, 8, torch.float16)
    again, labels_again = softmax_inputs(2, 4, 8, torch.float16)
    assert probas.shape == (2, 4, 8, 8) and probas.dtype == torch.float16
    assert labels.shape == (2, 8, 8) and int(labels.max()) < 4
    assert torch.equal(probas, again) and torch.equal(labels, labels_again)
    torch.testing.assert_close(probas.float().sum(1), torch.ones(2, 8, 8), atol=3e-3, rtol=0)
    logits, binary = hinge_inputs(3, 5)
    assert logits.shape == binary.shape == (3, 5, 5) and set(binary.unique().tolist()) <= {0, 1}


def test_byte_model():
    # float32: 4 (scores) + 8 (keys+indices) + 16 (sort pass) + 8 (post-sort read) + 4 (grad)
    assert ideal_bytes(1000, 10) == 40 * 1000 + 8 * 10
    assert ideal_bytes(1000, 10, score_bytes=2, label_bytes=1) == 36 * 1000 + 10
    assert SORT_PASS_BYTES == 16
