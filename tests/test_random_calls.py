"""Loss calls with their options drawn together at random, on every backend, against the
naive oracle: the losses' options are each tested on their own elsewhere; here hypothesis
combines them (kind, shape, dtype, memory layout, label dtype, ignored pixels, class
selection and weights, per image or batch, tied values). The same calls with one fault put
in must fail with an error that names the faulty argument."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import assume, given, settings

from lovasz_kernels import lovasz_hinge, lovasz_sigmoid, lovasz_softmax
from lovasz_kernels._validate import compute_dtype
from reference import naive
from tests.helpers import GRAD_TOLERANCE, LOSS_TOLERANCE, assert_close_report

#: softmax over C >= 2 classes; its C == 1 case (the channel is P(class 1)); the binary
#: hinge; the multilabel sigmoid and hinge (one binary problem per channel)
KINDS = ("softmax", "one channel", "hinge", "multilabel sigmoid", "multilabel hinge")
_MULTILABEL = ("multilabel sigmoid", "multilabel hinge")
_HINGES = ("hinge", "multilabel hinge")
#: spatial shapes: one pixel, a row, an image, a volume (at most 12 pixels an image, so
#: the O(P^2) oracle stays fast over up to three images)
SPATIAL = ((1,), (7,), (3, 4), (2, 3, 2))
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool, torch.float32)


@st.composite
def loss_calls(draw):
    """A loss call's arguments, described by the draws (the values come from a seed)."""
    kind = draw(st.sampled_from(KINDS))
    binary_labels = kind != "softmax"
    call = {
        "kind": kind,
        "batch": draw(st.integers(1, 3)),
        "channels": 1 if kind in ("one channel", "hinge") else draw(st.integers(2, 5)),
        "spatial": draw(st.sampled_from(SPATIAL)),
        "dtype": draw(st.sampled_from(DTYPES)),
        # bool and floating masks hold only a binary problem's labels
        "label_dtype": draw(st.sampled_from(
            LABEL_DTYPES if binary_labels else LABEL_DTYPES[:4])),
        "layout": draw(st.sampled_from(("contiguous", "strided", "transposed"))),
        "per_image": draw(st.booleans()),
        # values from a few levels: ties everywhere (then only the loss is compared)
        "tied": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }
    ignores = call["label_dtype"] != torch.bool and draw(st.booleans())
    call["ignore_index"] = None
    if ignores:
        call["ignore_index"] = (-1 if call["label_dtype"] not in (torch.uint8, torch.float32)
                                and draw(st.booleans()) else 255)
        call["ignored_share"] = draw(st.sampled_from((0.2, 0.6, 1.0)))
    if kind in ("softmax", *_MULTILABEL):
        channels = call["channels"]
        call["classes"] = draw(st.one_of(
            st.sampled_from(("present", "all")),
            st.lists(st.integers(0, channels - 1), min_size=1, max_size=channels,
                     unique=True).map(sorted)))
        weights = draw(st.one_of(st.none(), st.lists(
            st.sampled_from((0.0, 0.5, 1.0, 3.0)), min_size=channels, max_size=channels)))
        if weights is not None and not any(weights):
            weights[0] = 1.0  # all-zero weights are refused (tested elsewhere)
        call["class_weights"] = weights
    return call


def _inputs(call):
    """(scores, labels) for the call in its dtype, layout and label dtype, and their
    float64 / int64 values as the oracle reads them ((B, C, P) and (B, P) or (B, C, P))."""
    gen = torch.Generator().manual_seed(call["seed"])
    batch, channels, spatial = call["batch"], call["channels"], call["spatial"]
    shape = (batch, channels, *spatial)
    kind = call["kind"]
    tied = call["tied"]
    if kind == "softmax":
        logits = (torch.randint(-1, 2, shape, generator=gen).double() if tied
                  else torch.randn(shape, generator=gen, dtype=torch.float64) * 2)
        scores = logits.softmax(dim=1)
        labels = torch.randint(0, channels, (batch, *spatial), generator=gen)
    else:
        if kind in _HINGES:
            scores = (torch.randint(-2, 3, shape, generator=gen).double() / 2 if tied
                      else torch.randn(shape, generator=gen, dtype=torch.float64) * 2)
        else:
            scores = (torch.randint(0, 5, shape, generator=gen).double() / 4 if tied
                      else torch.rand(shape, generator=gen, dtype=torch.float64))
        label_shape = shape if kind in _MULTILABEL else (batch, *spatial)
        labels = (torch.rand(label_shape, generator=gen) < 0.4).long()
    if call["ignore_index"] is not None:
        ignored = torch.rand(labels.shape, generator=gen) < call["ignored_share"]
        labels = labels.masked_fill(ignored, call["ignore_index"])
    scores = scores.to(call["dtype"])
    oracle_scores = scores.to(torch.float64, copy=True)  # a fault put in scores stays out
    oracle_labels = labels.clone()
    labels = labels.to(call["label_dtype"])
    if call["layout"] == "strided":  # every other element of a wider tensor
        scores = torch.stack([scores, torch.full_like(scores, float("nan"))], dim=-1)[..., 0]
        labels = torch.stack([labels, labels], dim=-1)[..., 0]
    elif call["layout"] == "transposed" and len(spatial) >= 2:
        # the same pixels stored with the spatial dims swapped: a view that is not contiguous
        scores = scores.transpose(-1, -2).contiguous().transpose(-1, -2)
        labels = labels.transpose(-1, -2).contiguous().transpose(-1, -2)
    flat = (batch, channels, -1)
    label_flat = flat if kind in _MULTILABEL else (batch, -1)
    return (scores, labels, oracle_scores.reshape(flat), oracle_labels.reshape(label_flat))


def _loss_and_grad(call, scores, labels, backend):
    scores = scores.detach().requires_grad_(scores.is_floating_point())
    kind = call["kind"]
    common = {"per_image": call["per_image"], "ignore_index": call["ignore_index"],
              "backend": backend}
    if kind in ("softmax", "one channel"):
        options = {k: call[k] for k in ("classes", "class_weights") if k in call}
        loss = lovasz_softmax(scores, labels, **options, **common)
    elif kind == "hinge":
        loss = lovasz_hinge(scores, labels, **common)
    elif kind == "multilabel sigmoid":
        loss = lovasz_sigmoid(scores, labels, classes=call["classes"],
                              class_weights=call["class_weights"], **common)
    else:
        loss = lovasz_hinge(scores, labels, multilabel=True, classes=call["classes"],
                            class_weights=call["class_weights"], **common)
    (grad,) = torch.autograd.grad(loss, scores)
    return loss.detach(), grad


def _oracle(call, scores, labels):
    """The naive oracle's loss (0-d) and gradient (B, C, P) on the float64 values."""
    kind = call["kind"]
    options = {"per_image": call["per_image"], "ignore_index": call["ignore_index"]}
    if kind in ("softmax", "one channel"):
        loss, grad = naive.lovasz_softmax(
            scores, labels, classes=call.get("classes", "present"),
            class_weights=call.get("class_weights"), **options)
    elif kind == "hinge":
        loss, grad = naive.lovasz_hinge(scores[:, 0], labels, **options)
    else:
        loss, grad = naive.lovasz_multilabel(
            scores, labels, hinge=kind == "multilabel hinge", classes=call["classes"],
            class_weights=call["class_weights"], **options)
    return (torch.tensor(loss, dtype=torch.float64),
            torch.tensor(grad, dtype=torch.float64).reshape(scores.shape))


def _positive_errors_tie(call, scores, labels) -> bool:
    """Whether two positive errors of one segment are equal in the compute dtype (then the
    gradient depends on how a sort orders them; the loss does not)."""
    kind = call["kind"]
    values = scores.to(compute_dtype(call["dtype"]))
    batch, channels, _ = values.shape
    ignore_index = call["ignore_index"]
    if kind in _MULTILABEL:
        fg = labels == 1
    else:
        label_of_channel = (torch.arange(channels)[None, :, None] if kind == "softmax"
                            else torch.ones(1, 1, 1, dtype=torch.long))
        fg = labels[:, None] == label_of_channel
        labels = labels[:, None].expand(values.shape)
    valid = (torch.ones(values.shape, dtype=torch.bool) if ignore_index is None
             else labels != ignore_index)
    offset = 1 if kind in _HINGES else 0
    errors = torch.where(fg, 1 - values, values + offset)
    groups = [slice(b, b + 1) for b in range(batch)] if call["per_image"] else [slice(None)]
    for group in groups:
        for channel in range(channels):
            segment = errors[group, channel][valid[group, channel]]
            positive = segment[segment > 0]
            if positive.unique().numel() != positive.numel():
                return True
    return False


@settings(max_examples=30)
@given(call=loss_calls())
def test_random_loss_calls_match_the_oracle(backend, call):
    scores, labels, oracle_scores, oracle_labels = _inputs(call)
    loss, grad = _loss_and_grad(call, scores, labels, backend)
    oracle_loss, oracle_grad = _oracle(call, oracle_scores, oracle_labels)
    dtype = call["dtype"]
    assert loss.dtype == compute_dtype(dtype) and grad.dtype == dtype, call
    assert grad.shape == scores.shape, call
    assert_close_report(loss, oracle_loss, LOSS_TOLERANCE[dtype], f"loss {call}")
    if not _positive_errors_tie(call, oracle_scores, oracle_labels):
        assert_close_report(grad.reshape(oracle_grad.shape), oracle_grad,
                            GRAD_TOLERANCE[dtype], f"grad {call}")


def test_the_random_calls_reach_every_option():
    """The strategy draws every kind, dtype, layout and label dtype, ignored pixels, class
    lists and weights, and tie-free inputs whose gradients are compared (a sample of the
    draws, so that a strategy that stopped drawing one would fail here)."""
    seen: dict[str, set] = {key: set() for key in (
        "kind", "dtype", "layout", "label_dtype", "ignore", "classes", "weights", "grad")}

    @settings(max_examples=300, database=None)
    @given(call=loss_calls())
    def record(call):
        for key in ("kind", "dtype", "layout", "label_dtype"):
            seen[key].add(call[key])
        seen["ignore"].add(call["ignore_index"] is not None)
        seen["classes"].add(type(call.get("classes")).__name__)
        seen["weights"].add(call.get("class_weights") is not None)
        _, _, oracle_scores, oracle_labels = _inputs(call)
        seen["grad"].add(not _positive_errors_tie(call, oracle_scores, oracle_labels))

    record()
    assert seen["kind"] == set(KINDS)
    assert seen["dtype"] == set(DTYPES)
    assert seen["layout"] == {"contiguous", "strided", "transposed"}
    assert seen["label_dtype"] == set(LABEL_DTYPES)
    assert seen["ignore"] == seen["weights"] == seen["grad"] == {True, False}
    assert seen["classes"] == {"str", "list", "NoneType"}


@pytest.mark.parametrize("kind", KINDS)
def test_the_oracle_comparison_can_fail(kind):
    """A gradient off by 1% and a loss off by 1% fail the comparisons the random calls use."""
    call = {"kind": kind, "batch": 2, "channels": 1 if kind in ("one channel", "hinge") else 3,
            "spatial": (3, 4), "dtype": torch.float32, "label_dtype": torch.int64,
            "layout": "contiguous", "per_image": False, "tied": False, "seed": 7,
            "ignore_index": None}
    if kind in ("softmax", *_MULTILABEL):
        call.update(classes="present", class_weights=None)
    scores, labels, oracle_scores, oracle_labels = _inputs(call)
    loss, grad = _loss_and_grad(call, scores, labels, "numpy")
    oracle_loss, oracle_grad = _oracle(call, oracle_scores, oracle_labels)
    assert not _positive_errors_tie(call, oracle_scores, oracle_labels)
    assert_close_report(grad.reshape(oracle_grad.shape), oracle_grad,
                        GRAD_TOLERANCE[torch.float32], "grad")
    with pytest.raises(AssertionError):
        assert_close_report(grad.reshape(oracle_grad.shape) * 1.01, oracle_grad,
                            GRAD_TOLERANCE[torch.float32], "grad")
    with pytest.raises(AssertionError):
        assert_close_report(loss * 1.01, oracle_loss,
                            LOSS_TOLERANCE[torch.float32], "loss")


#: one fault put into an otherwise valid call, and the argument its error must name
CORRUPTIONS = ("NaN score", "infinite score", "probability above 1", "label too large",
               "negative label", "labels one pixel short", "a weight too many",
               "class out of range", "floating labels for classes", "half a label",
               "integer scores")


def _corrupted(call, corruption, scores, labels):
    """(scores, labels, call) with ``corruption`` in them, and the argument the error names;
    None where the corruption does not apply to this call."""
    kind = call["kind"]
    scores_name = "logits" if kind in _HINGES else "probas"
    first = (0,) * scores.dim()
    label_first = (0,) * labels.dim()
    channels = call["channels"]
    label_dtype = call["label_dtype"]
    if corruption in ("NaN score", "infinite score", "probability above 1"):
        if corruption == "probability above 1" and kind in _HINGES:
            return None  # any finite logit is valid
        value = {"NaN score": float("nan"), "infinite score": float("inf"),
                 "probability above 1": 1.5}[corruption]
        scores[first] = value
        return scores, labels, call, scores_name
    if corruption in ("label too large", "negative label"):
        if label_dtype == torch.bool or (corruption == "negative label"
                                         and label_dtype == torch.uint8):
            return None
        value = (2 if kind != "softmax" else channels) if corruption == "label too large" \
            else -5
        if value == call["ignore_index"]:
            return None
        labels[label_first] = value
        return scores, labels, call, "labels"
    if corruption == "labels one pixel short":
        return scores, labels[..., :-1], call, "labels"
    if corruption == "a weight too many":
        if "class_weights" not in call:
            return None
        return scores, labels, {**call, "class_weights": [1.0] * (channels + 1)}, \
            "class_weights"
    if corruption == "class out of range":
        if "classes" not in call:
            return None
        return scores, labels, {**call, "classes": [channels]}, "classes"
    if corruption == "floating labels for classes":
        if kind != "softmax":
            return None  # binary problems take floating masks
        return scores, labels.to(torch.float32), call, "labels"
    if corruption == "half a label":
        if not labels.dtype.is_floating_point:
            return None
        labels[label_first] = 0.5
        return scores, labels, call, "labels"
    return scores.to(torch.int32), labels, call, scores_name  # integer scores


@settings(max_examples=30)
@given(call=loss_calls(), corruption=st.sampled_from(CORRUPTIONS))
def test_random_bad_calls_name_the_bad_argument(backend, call, corruption):
    """One fault in an otherwise valid call, whatever its kind, dtypes, layout and options:
    a ValueError or TypeError naming the argument, before any kernel runs."""
    scores, labels, _, _ = _inputs(call)
    corrupted = _corrupted(call, corruption, scores, labels)
    assume(corrupted is not None)
    scores, labels, call, name = corrupted
    with pytest.raises((ValueError, TypeError), match=name):
        _loss_and_grad(call, scores, labels, backend)
