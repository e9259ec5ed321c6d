"""The per-class loop baseline (what benchmarks compare against) computes the same losses."""

from __future__ import annotations

import pytest
import torch

from lovasz_kernels import lovasz_hinge, lovasz_softmax
from lovasz_kernels.bench import hinge_inputs, softmax_inputs
from lovasz_kernels.bench.baselines import (
    per_class_loop_lovasz_softmax,
    per_image_loop_lovasz_hinge,
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
