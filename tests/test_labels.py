"""The one label rule, in every entry point that takes labels.

Labels are compared with ``ignore_index`` as int64 values (an ``ignore_index`` the labels'
dtype cannot hold matches no pixel; it never wraps onto a class), a negative label is never
taken for a large ``ignore_index``, and binary problems (the hinge, the sigmoid case, the
multilabel losses, the prox) accept 0/1 float and bool masks. Each entry point is one row of
``ENTRY_POINTS``: a function of (generator, labels, ignore_index) giving a float to compare.
"""

from __future__ import annotations

import pytest
import torch

from lovasz_kernels import lovasz_hinge, lovasz_sigmoid, lovasz_softmax, per_class_iou


def _softmax(gen, labels, ignore_index):
    probas = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64).softmax(dim=1)
    return lovasz_softmax(probas, labels, ignore_index=ignore_index).item()


def _hinge(gen, labels, ignore_index):
    logits = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    return lovasz_hinge(logits, labels, ignore_index=ignore_index).item()


def _sigmoid_case(gen, labels, ignore_index):
    probas = torch.rand(2, 1, 4, 5, generator=gen, dtype=torch.float64)
    return lovasz_softmax(probas, labels, ignore_index=ignore_index).item()


def _multilabel(gen, labels, ignore_index):
    logits = torch.randn(2, 1, 4, 5, generator=gen, dtype=torch.float64)
    masks = labels[:, None]
    return (lovasz_sigmoid(logits.sigmoid(), masks, ignore_index=ignore_index).item()
            + lovasz_hinge(logits, masks, multilabel=True, ignore_index=ignore_index).item())


def _prox(gen, labels, ignore_index):
    from lovasz_kernels.optim import lovasz_hinge_moreau

    logits = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    return float(lovasz_hinge_moreau(logits, labels, 0.3, ignore_index=ignore_index))


def _metrics(gen, labels, ignore_index):
    pred = torch.randint(0, 2, labels.shape, generator=gen)
    return float(torch.nan_to_num(per_class_iou(pred, labels, 3, ignore_index=ignore_index),
                                  nan=-1).sum())


ENTRY_POINTS = {"softmax": _softmax, "hinge": _hinge, "sigmoid case": _sigmoid_case,
                "multilabel": _multilabel, "prox": _prox, "metrics": _metrics}
BINARY = ["hinge", "sigmoid case", "multilabel", "prox"]


def _binary_labels(seed=3):
    return (torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(seed)) < 0.5).long()


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(
    ("dtype", "ignore_index"),
    [(torch.uint8, 256), (torch.uint8, -100), (torch.int32, 2**40), (torch.int16, 65536)],
    ids=["uint8 256", "uint8 -100", "int32 2^40", "int16 65536"],
)
def test_an_ignore_index_the_dtype_cannot_hold_ignores_nothing(entry, dtype, ignore_index):
    labels = _binary_labels()
    fn = ENTRY_POINTS[entry]
    expected = fn(torch.Generator().manual_seed(0), labels, None)
    got = fn(torch.Generator().manual_seed(0), labels.to(dtype), ignore_index)
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("entry", sorted(set(ENTRY_POINTS) - {"metrics"}))
def test_a_negative_int8_label_is_not_taken_for_ignore_index_255(entry):
    labels = _binary_labels().to(torch.int8)
    labels[0, 0, 0] = -1
    with pytest.raises(ValueError, match=r"labels must be in .* or ignore_index=255"):
        ENTRY_POINTS[entry](torch.Generator().manual_seed(0), labels, 255)


@pytest.mark.parametrize("entry", BINARY)
def test_binary_problems_take_float_and_bool_masks(entry):
    labels = _binary_labels()
    fn = ENTRY_POINTS[entry]
    expected = fn(torch.Generator().manual_seed(0), labels, None)
    for mask in (labels.float(), labels.double(), labels.half(), labels.bool()):
        assert fn(torch.Generator().manual_seed(0), mask, None) == pytest.approx(
            expected, rel=1e-12)
    bad = labels.float()
    bad[0, 1, 1] = 0.5
    with pytest.raises(ValueError, match=r"labels as a floating mask must hold whole numbers"):
        fn(torch.Generator().manual_seed(0), bad, None)


def test_class_labels_are_never_float():
    labels = _binary_labels().float()
    with pytest.raises(TypeError, match=r"labels must be an integer or bool tensor"):
        _softmax(torch.Generator().manual_seed(0), labels, None)
