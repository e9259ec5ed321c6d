"""Bad input fails early with a ValueError/TypeError that names the argument.

Each case checks the exception type and the key phrase of its message; the matching "good"
inputs next to them make sure a check does not reject valid calls.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import lovasz_kernels
from lovasz_kernels import (
    _validate,
    lovasz_extension,
    lovasz_grad,
    lovasz_hinge,
    lovasz_sigmoid,
    lovasz_softmax,
    set_validate_values,
    validate_values_enabled,
)

NAN = float("nan")
INF = float("inf")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _probas(gen: torch.Generator, classes: int = 3) -> torch.Tensor:
    """(2, C, 4, 5) float64 probabilities summing to one over dim 1 (C > 1)."""
    logits = torch.randn(2, classes, 4, 5, generator=gen, dtype=torch.float64)
    return torch.sigmoid(logits) if classes == 1 else logits.softmax(dim=1)


def _labels(gen: torch.Generator, classes: int = 3) -> torch.Tensor:
    return torch.randint(0, max(classes, 2), (2, 4, 5), generator=gen)


def _logits(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)


def _errors_fg(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    errors = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    return errors, torch.rand(2, 5, generator=gen) < 0.5


@pytest.fixture
def values_unchecked():
    """Value checks off for one test, always switched back on."""
    set_validate_values(False)
    try:
        yield
    finally:
        set_validate_values(True)


# --------------------------------------------------------------------------------------------
# Types of the tensors


@pytest.mark.parametrize("bad", [[[0.5, 0.5]], np.full((2, 3, 4, 5), 1 / 3), None], ids=str)
def test_softmax_probas_not_a_tensor(gen, bad):
    with pytest.raises(TypeError, match=r"probas must be a torch\.Tensor"):
        lovasz_softmax(bad, _labels(gen))


@pytest.mark.parametrize("bad", [[0, 1], np.zeros((2, 4, 5), dtype=np.int64)], ids=str)
def test_softmax_labels_not_a_tensor(gen, bad):
    with pytest.raises(TypeError, match=r"labels must be a torch\.Tensor"):
        lovasz_softmax(_probas(gen), bad)


def test_hinge_logits_not_a_tensor(gen):
    with pytest.raises(TypeError, match=r"logits must be a torch\.Tensor"):
        lovasz_hinge(_logits(gen).tolist(), _labels(gen))


def test_hinge_labels_not_a_tensor(gen):
    with pytest.raises(TypeError, match=r"labels must be a torch\.Tensor; got list"):
        lovasz_hinge(_logits(gen), _labels(gen).tolist())


def test_extension_errors_not_a_tensor():
    with pytest.raises(TypeError, match=r"errors must be a torch\.Tensor; got list"):
        lovasz_extension([[0.5, -0.5]], torch.tensor([[True, False]]))


def test_extension_fg_not_a_tensor():
    with pytest.raises(TypeError, match=r"fg must be a torch\.Tensor; got list"):
        lovasz_extension(torch.tensor([[0.5, -0.5]]), [[True, False]])


def test_grad_not_a_tensor():
    with pytest.raises(TypeError, match=r"gt_sorted must be a torch\.Tensor; got list"):
        lovasz_grad([1, 0, 1])


def _sparse_and_nested_calls(gen):
    """(argument, layout, call) for each tensor argument given as a sparse or nested tensor."""
    from lovasz_kernels import LovaszSoftmaxLoss
    from lovasz_kernels.metrics import batch_miou
    from lovasz_kernels.optim import prox_lovasz_hinge

    probas, labels = _probas(gen), _labels(gen)
    logits = torch.randn(2, 4, 5, generator=gen)
    masks = (labels == 1).long()
    errors = torch.randn(2, 20, generator=gen)
    fg = errors > 0
    nested = torch.nested.nested_tensor([probas[0], probas[1]], layout=torch.jagged)
    return [
        ("probas", "torch.sparse_coo", lambda: lovasz_softmax(probas.to_sparse(), labels)),
        ("probas", "nested", lambda: lovasz_softmax(nested, labels)),
        ("labels", "torch.sparse_coo", lambda: lovasz_softmax(probas, labels.to_sparse())),
        ("logits", "torch.sparse_coo", lambda: lovasz_hinge(logits.to_sparse(), masks)),
        ("logits", "torch.sparse_csr", lambda: lovasz_hinge(logits.to_sparse_csr(), masks)),
        ("labels", "torch.sparse_coo", lambda: lovasz_sigmoid(probas, labels.to_sparse())),
        ("class_weights", "torch.sparse_coo", lambda: lovasz_softmax(
            probas, labels, class_weights=torch.ones(3).to_sparse())),
        ("class_weights", "torch.sparse_coo", lambda: LovaszSoftmaxLoss(
            class_weights=torch.ones(3).to_sparse())),
        ("errors", "torch.sparse_coo", lambda: lovasz_extension(errors.to_sparse(), fg)),
        ("fg", "torch.sparse_coo", lambda: lovasz_extension(errors, fg.to_sparse())),
        ("gt_sorted", "torch.sparse_coo", lambda: lovasz_grad(fg[0].to_sparse())),
        ("pred", "torch.sparse_coo", lambda: batch_miou(labels.to_sparse(), labels, num_classes=3)),
        ("logits", "torch.sparse_coo", lambda: prox_lovasz_hinge(logits.to_sparse(), masks, 0.1)),
    ]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_and_nested_tensors_are_refused_by_name(gen):
    """Sparse and nested tensors have no strides: a TypeError naming the argument, not an
    error from deep inside a reshape or a kernel."""
    for argument, layout, call in _sparse_and_nested_calls(gen):
        message = f"{argument} must be a dense (strided) tensor; got a {layout} tensor"
        with pytest.raises(TypeError, match=re.escape(message)):
            call()


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool], ids=str)
def test_softmax_integer_probas(gen, dtype):
    probas = torch.ones(2, 3, 4, 5, dtype=dtype)
    with pytest.raises(TypeError, match=rf"probas must be a float.*got {dtype}"):
        lovasz_softmax(probas, _labels(gen))


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool], ids=str)
def test_hinge_integer_logits(gen, dtype):
    with pytest.raises(TypeError, match=rf"logits must be a float.*got {dtype}"):
        lovasz_hinge(torch.ones(2, 4, 5, dtype=dtype), _labels(gen))


def test_extension_integer_errors():
    with pytest.raises(TypeError, match=r"errors must be a float.*got torch\.int64"):
        lovasz_extension(torch.tensor([[1, -1]]), torch.tensor([[True, False]]))


# --------------------------------------------------------------------------------------------
# Shapes


def test_softmax_labels_shape_mismatch_names_both_shapes(gen):
    with pytest.raises(ValueError) as info:
        lovasz_softmax(_probas(gen), torch.zeros(2, 4, dtype=torch.long))
    message = str(info.value)
    assert "labels must have shape" in message
    assert "(2, 4)" in message and "(2, 3, 4, 5)" in message
    assert "(2, 4, 5)" in message  # the expected labels shape


def test_softmax_probas_without_class_dim():
    with pytest.raises(ValueError, match=re.escape("probas must have shape (B, C, *spatial)")):
        lovasz_softmax(torch.full((6,), 0.5), torch.zeros(6, dtype=torch.long))


def test_softmax_sigmoid_layout_labels_accepted(gen):
    """C == 1: labels may be (B, *spatial) or (B, 1, *spatial)."""
    probas = _probas(gen, classes=1)
    labels = _labels(gen, classes=1)
    flat = lovasz_softmax(probas, labels)
    with_channel = lovasz_softmax(probas, labels[:, None])
    assert torch.equal(flat, with_channel)


def test_hinge_labels_shape_mismatch_names_both_shapes(gen):
    with pytest.raises(ValueError) as info:
        lovasz_hinge(_logits(gen), torch.zeros(2, 3, dtype=torch.long))
    message = str(info.value)
    assert "labels must have shape" in message
    assert "(2, 3)" in message and "(2, 4, 5)" in message


def test_hinge_channel_dim_accepted(gen):
    logits = _logits(gen)
    labels = _labels(gen, classes=2)
    assert torch.equal(lovasz_hinge(logits[:, None], labels), lovasz_hinge(logits, labels))


def test_hinge_scalar_logits():
    with pytest.raises(ValueError, match="logits must have shape .*got a scalar"):
        lovasz_hinge(torch.tensor(0.5), torch.tensor(1))


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)], ids=str)
def test_extension_errors_not_2d(shape):
    errors = torch.zeros(shape)
    with pytest.raises(ValueError, match=re.escape("errors must have shape (S, P)")):
        lovasz_extension(errors, torch.zeros(shape, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32], ids=str)
def test_extension_fg_not_bool(gen, dtype):
    errors, fg = _errors_fg(gen)
    with pytest.raises(TypeError, match=rf"fg must be a bool tensor; got {dtype}"):
        lovasz_extension(errors, fg.to(dtype))


def test_extension_fg_shape_mismatch(gen):
    errors, fg = _errors_fg(gen)
    with pytest.raises(ValueError, match=re.escape("fg must have the shape of errors (2, 5); "
                                                   "got (2, 4)")):
        lovasz_extension(errors, fg[:, :4])


def test_grad_scalar():
    with pytest.raises(ValueError, match="gt_sorted must have at least one dimension"):
        lovasz_grad(torch.tensor(1))


@pytest.mark.parametrize("bad", [torch.tensor([1, 2, 0]), torch.tensor([1.0, NAN, 0.0])],
                         ids=["two", "nan"])
def test_grad_values_not_binary(bad):
    with pytest.raises(ValueError, match="gt_sorted must contain only 0 and 1"):
        lovasz_grad(bad)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64, torch.float32])
def test_grad_accepts_binary_numbers(dtype):
    out = lovasz_grad(torch.tensor([1, 0, 1, 0]).to(dtype))
    expected = torch.tensor([0.5, 1 / 6, 1 / 3, 0.0])
    torch.testing.assert_close(out, expected)


# --------------------------------------------------------------------------------------------
# Labels


def test_softmax_float_labels(gen):
    with pytest.raises(TypeError, match=r"labels must be an integer.*labels\.long\(\)"):
        lovasz_softmax(_probas(gen), _labels(gen).double())


def test_hinge_float_mask_must_be_whole_numbers(gen):
    labels = _labels(gen, classes=2).float()
    labels[0, 1, 1] = 0.5
    with pytest.raises(ValueError, match=r"labels as a floating mask must hold whole numbers"):
        lovasz_hinge(_logits(gen), labels)
    labels[0, 1, 1] = 2.0  # whole, but not a class
    with pytest.raises(ValueError, match=r"labels must be in \{0, 1\}"):
        lovasz_hinge(_logits(gen), labels)


@pytest.mark.parametrize("bad_value", [3, -1, 255])
def test_softmax_labels_out_of_range(gen, bad_value):
    labels = _labels(gen)
    labels[1, 2, 3] = bad_value
    with pytest.raises(ValueError, match=rf"labels must be in \[0, 3\); got 1 out-of-range "
                                         rf"values \(e\.g\. {bad_value}\); pass "
                                         rf"ignore_index={bad_value} if those pixels are to be "
                                         rf"ignored$"):
        lovasz_softmax(_probas(gen), labels)


def test_labels_out_of_range_by_several_values_get_no_ignore_hint(gen):
    """The hint names one value: with two different ones out of range there is none."""
    labels = _labels(gen)
    labels[1, 2, 3] = 255
    labels[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"got 2 out-of-range values \(e\.g\. 7\)$"):
        lovasz_softmax(_probas(gen), labels)


def test_softmax_labels_out_of_range_with_ignore_index(gen):
    labels = _labels(gen)
    labels[0, 0] = 255
    labels[1, 1, 1] = 7
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\) or ignore_index=255; "
                                         r"got 1 out-of-range values \(e\.g\. 7\)"):
        lovasz_softmax(_probas(gen), labels, ignore_index=255)


@pytest.mark.parametrize("ignore_index", [255, -1])
def test_softmax_ignore_value_accepted(gen, backend, ignore_index):
    labels = _labels(gen)
    labels[0, 0] = ignore_index
    loss = lovasz_softmax(_probas(gen), labels, ignore_index=ignore_index, backend=backend)
    assert torch.isfinite(loss)


def test_hinge_labels_out_of_range(gen):
    labels = _labels(gen, classes=2)
    labels[0, 1, 1] = 2
    with pytest.raises(ValueError, match=r"labels must be in \{0, 1\}; got 1 out-of-range"):
        lovasz_hinge(_logits(gen), labels)


def test_hinge_labels_out_of_range_with_ignore_index(gen):
    labels = _labels(gen, classes=2)
    labels[0, 1] = 255
    labels[1, 0, 0] = -3
    with pytest.raises(ValueError, match=r"\{0, 1\} or ignore_index=255; .*\(e\.g\. -3\)"):
        lovasz_hinge(_logits(gen), labels, ignore_index=255)


def test_hinge_ignore_value_accepted(gen, backend):
    labels = _labels(gen, classes=2)
    labels[0, 1] = 255
    loss = lovasz_hinge(_logits(gen), labels, ignore_index=255, backend=backend)
    assert torch.isfinite(loss)


def test_sigmoid_case_labels_must_be_binary(gen):
    labels = _labels(gen, classes=1)
    labels[0, 0, 0] = 2
    with pytest.raises(ValueError, match=r"labels must be in \{0, 1\}"):
        lovasz_softmax(_probas(gen, classes=1), labels)


# --------------------------------------------------------------------------------------------
# Values of probas / logits / errors


@pytest.mark.parametrize(("bad", "phrase"), [(NAN, "1 NaN and 0 infinite"),
                                             (INF, "0 NaN and 1 infinite"),
                                             (-INF, "0 NaN and 1 infinite")])
def test_softmax_non_finite_probas(gen, bad, phrase):
    probas = _probas(gen)
    probas[1, 0, 2, 2] = bad
    with pytest.raises(ValueError, match=rf"probas must be finite; got {phrase} values"):
        lovasz_softmax(probas, _labels(gen))


@pytest.mark.parametrize("bad", [NAN, INF])
def test_softmax_non_finite_logits_with_from_logits(gen, bad):
    logits = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    logits[0, 1, 0, 0] = bad
    with pytest.raises(ValueError, match=r"from_logits=True\) must be finite"):
        lovasz_softmax(logits, _labels(gen), from_logits=True)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_hinge_non_finite_logits(gen, bad):
    logits = _logits(gen)
    logits[1, 3, 4] = bad
    with pytest.raises(ValueError, match="logits must be finite"):
        lovasz_hinge(logits, _labels(gen, classes=2))


@pytest.mark.parametrize("classes", [1, 3])
def test_softmax_probas_outside_unit_interval(gen, classes):
    probas = _probas(gen, classes)
    # one pixel with p_0 = 1.25 and the rest negative: the sum stays 1, so only the
    # range check can fire
    probas[0, 0, 1, 1] = 1.25
    if classes > 1:
        probas[0, 1:, 1, 1] = -0.25 / (classes - 1)
    with pytest.raises(ValueError, match=r"probas must lie in \[0, 1\]; .*from_logits=True"):
        lovasz_softmax(probas, _labels(gen, classes))


_EDGE_VALUES = [0.0, -0.0, 1.0, 0.5, 1e-45, 1e-300, -1e-45, 1.0 + 2.0 ** -52, 1.0 + 2.0 ** -10,
                2.0, -1.0, INF, -INF, NAN, -NAN]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32,
                                   torch.float64])
@pytest.mark.parametrize("value", _EDGE_VALUES)
def test_unit_interval_by_bits_agrees_with_the_floats(dtype, value):
    """The range check on the values' bits says yes exactly where the floats are in
    [+0.0, 1.0], and never for a value outside [0, 1] (-0.0 is the one value in [0, 1] it
    hands to the floats' own check)."""
    tensor = torch.tensor([0.25, value, 0.75], dtype=torch.float64).to(dtype)
    stored = float(tensor[1])
    in_floats = 0.0 <= stored <= 1.0
    by_bits = _validate._bits_in_unit_interval(tensor)
    assert by_bits == (in_floats and math.copysign(1.0, stored) > 0)
    # the whole check: -0.0 is accepted, everything outside [0, 1] refused
    probas = tensor.reshape(1, 3, 1)  # the sigmoid-like per-channel check: no sums
    if in_floats:
        _validate.check_probas(probas, simplex=False)
    else:
        with pytest.raises(ValueError, match=r"probas must (lie in \[0, 1\]|be finite)"):
            _validate.check_probas(probas, simplex=False)


def test_unit_interval_by_bits_reads_strided_views():
    """A view with gaps (a channel slice, transposed) is checked as its own values."""
    base = torch.rand(4, 6, 5, dtype=torch.float32, generator=torch.Generator().manual_seed(3))
    base[:, 1::2] = 2.0  # outside [0, 1], only in the skipped channels
    view = base[:, ::2].transpose(1, 2)
    assert _validate._bits_in_unit_interval(view)
    assert not _validate._bits_in_unit_interval(base.transpose(1, 2))


def test_softmax_probas_not_summing_to_one(gen):
    probas = _probas(gen) * 0.9
    with pytest.raises(ValueError, match=r"probas must sum to 1 .*C=3.*from_logits=True"):
        lovasz_softmax(probas, _labels(gen))


def test_softmax_logits_pass_with_from_logits(gen, backend):
    """Logits outside [0, 1] are fine once from_logits=True applies the softmax."""
    logits = 5 * torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    labels = _labels(gen)
    loss = lovasz_softmax(logits, labels, from_logits=True, backend=backend)
    expected = lovasz_softmax(logits.softmax(dim=1), labels, backend=backend)
    torch.testing.assert_close(loss, expected)


def test_sigmoid_case_probas_not_sum_checked(gen, backend):
    """With C == 1 the channel is P(class 1): any value in [0, 1] is valid."""
    probas = torch.full((2, 1, 4, 5), 0.3, dtype=torch.float64)
    loss = lovasz_softmax(probas, _labels(gen, classes=1), backend=backend)
    assert torch.isfinite(loss) and loss > 0


@pytest.mark.parametrize(("bad", "phrase"), [(NAN, "1 NaN and 0 \\+inf"),
                                             (INF, "0 NaN and 1 \\+inf")])
def test_extension_non_finite_errors(gen, bad, phrase):
    errors, fg = _errors_fg(gen)
    errors[1, 2] = bad
    with pytest.raises(ValueError, match=rf"errors must not contain NaN or \+inf .*got {phrase}"):
        lovasz_extension(errors, fg)


def test_extension_padding_marked_foreground(gen):
    errors, fg = _errors_fg(gen)
    errors[0, 3] = -INF
    fg[0, 3] = True
    with pytest.raises(ValueError, match="padding pixels .* must have fg == False; got 1"):
        lovasz_extension(errors, fg)


def test_extension_padding_as_background_accepted(gen, backend):
    errors, fg = _errors_fg(gen)
    errors[0, 3] = -INF
    fg[0, 3] = False
    loss, grad = lovasz_extension(errors, fg, backend=backend)
    assert torch.isfinite(loss).all()
    assert grad[0, 3] == 0


# --------------------------------------------------------------------------------------------
# Flags and ignore_index


@pytest.mark.parametrize("flag", ["per_image", "from_logits"])
@pytest.mark.parametrize("bad", ["yes", 1, None, np.bool_(True)], ids=repr)
def test_softmax_flags_must_be_bool(gen, flag, bad):
    with pytest.raises(TypeError, match=rf"{flag} must be True or False"):
        lovasz_softmax(_probas(gen), _labels(gen), **{flag: bad})


@pytest.mark.parametrize("bad", ["yes", 0], ids=repr)
def test_hinge_per_image_must_be_bool(gen, bad):
    with pytest.raises(TypeError, match="per_image must be True or False"):
        lovasz_hinge(_logits(gen), _labels(gen, classes=2), per_image=bad)


@pytest.mark.parametrize("bad", [255.0, True, False, "255", np.bool_(True), torch.tensor(255),
                                 np.float64(255)], ids=repr)
def test_softmax_ignore_index_type(gen, bad):
    with pytest.raises(TypeError, match=r"ignore_index must be an int or None"):
        lovasz_softmax(_probas(gen), _labels(gen), ignore_index=bad)


def test_numpy_integers_are_ints_everywhere(gen):
    """What ``np.unique`` and array indexing give (numpy integers) is taken as the int it
    holds: ignore_index, classes, num_classes, the sampler's classes, bins, max_steps."""
    from lovasz_kernels import EquiBatchSampler, LovaszSoftmaxLoss, batch_miou
    from lovasz_kernels.optim import prox_lovasz_hinge

    probas, labels = _probas(gen), _labels(gen)
    labels[0, 0] = 255
    as_numpy = dict(ignore_index=np.int64(255), classes=list(np.array([0, 2])))
    as_python = dict(ignore_index=255, classes=[0, 2])
    assert torch.equal(lovasz_softmax(probas, labels, **as_numpy),
                       lovasz_softmax(probas, labels, **as_python))
    module = LovaszSoftmaxLoss(ignore_index=np.uint8(255), classes=np.array([0, 2]).tolist(),
                               bins=np.int64(1024))
    assert type(module.ignore_index) is int and module.ignore_index == 255
    assert torch.equal(module(probas, labels), lovasz_softmax(probas, labels, **as_python))
    sampler = EquiBatchSampler([np.unique(np.array([0, 1, 1])), np.array([2], dtype=np.int32)],
                               num_classes=np.int64(3), seed=np.int32(0))
    assert sampler.classes == [0, 1, 2] and sorted(set(sampler)) == [0, 1]
    assert torch.equal(batch_miou(labels[1], labels[1], num_classes=np.int64(3)),
                       batch_miou(labels[1], labels[1], num_classes=3))
    logits = torch.randn(1, 8, generator=gen, dtype=torch.float64)
    masks = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1]])
    greedy = prox_lovasz_hinge(logits, masks, 0.5, method="greedy", max_steps=np.int64(2))
    assert torch.equal(greedy.prox, prox_lovasz_hinge(logits, masks, 0.5, method="greedy",
                                                      max_steps=2).prox)


@pytest.mark.parametrize("bad", [255.0, True], ids=repr)
def test_hinge_ignore_index_type(gen, bad):
    with pytest.raises(TypeError, match=r"ignore_index must be an int or None"):
        lovasz_hinge(_logits(gen), _labels(gen, classes=2), ignore_index=bad)


def test_softmax_ignore_index_beyond_int64(gen):
    with pytest.raises(ValueError, match="ignore_index"):
        lovasz_softmax(_probas(gen), _labels(gen), ignore_index=2**70)


# --------------------------------------------------------------------------------------------
# classes


@pytest.mark.parametrize(
    ("classes", "error", "pattern"),
    [
        ("some", ValueError, r"classes must be 'present', 'all' or a list"),
        ("", ValueError, r"classes must be 'present', 'all' or a list"),
        ([], ValueError, r"classes must not be an empty list"),
        ([0, 2, 0], ValueError, r"classes must not repeat a class; got \[0, 2, 0\]"),
        ([0, 3], ValueError, r"classes must be in \[0, 3\); got \[3\]"),
        ([-1, 1], ValueError, r"classes must be in \[0, 3\); got \[-1\]"),
        ([0, 1.0], TypeError, r"classes must be .* a sequence of ints"),
        (["0"], TypeError, r"classes must be .* a sequence of ints"),
        ([True], TypeError, r"classes must be .* a sequence of ints"),
        (2, TypeError, r"classes must be .* a sequence of ints; got 2"),
        (torch.tensor([0.0, 1.0]), TypeError, r"classes as a tensor or array must be 1-D int"),
        (torch.tensor([[0, 1]]), TypeError, r"classes as a tensor or array must be 1-D integer"),
        (np.array([0.0, 1.0]), TypeError, r"classes as a tensor or array must be 1-D integer"),
        (np.array([True, False]), TypeError, r"classes as a tensor or array must be 1-D int"),
        (np.array(["0", "1"]), TypeError, r"classes as an array must hold numbers; got dtype"),
        (np.array([3, 0]), ValueError, r"classes must be in \[0, 3\); got \[3\]"),
    ],
    ids=["bad-string", "empty-string", "empty-list", "duplicates", "too-large", "negative",
         "float-entry", "str-entry", "bool-entry", "int", "float-tensor", "2d-tensor",
         "float-array", "bool-array", "str-array", "too-large-array"],
)
def test_softmax_bad_classes(gen, classes, error, pattern):
    with pytest.raises(error, match=pattern):
        lovasz_softmax(_probas(gen), _labels(gen), classes=classes)


@pytest.mark.parametrize("classes", [[2, 0], (1,), torch.tensor([0, 2]), np.array([0, 2]),
                                     np.unique(np.array([2, 0, 2], dtype=np.uint8)), "all",
                                     "present"], ids=str)
def test_softmax_good_classes_accepted(gen, classes):
    loss = lovasz_softmax(_probas(gen), _labels(gen), classes=classes)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("classes", [[0], [0, 1], [1, 2], [2]], ids=str)
def test_sigmoid_case_classes_must_be_foreground(gen, classes):
    with pytest.raises(ValueError, match=r"with C == 1 .* only class is the foreground class 1"):
        lovasz_softmax(_probas(gen, classes=1), _labels(gen, classes=1), classes=classes)


def test_sigmoid_case_foreground_class_accepted(gen):
    probas, labels = _probas(gen, classes=1), _labels(gen, classes=1)
    assert torch.equal(lovasz_softmax(probas, labels, classes=[1]),
                       lovasz_softmax(probas, labels, classes="all"))


# --------------------------------------------------------------------------------------------
# class_weights


@pytest.mark.parametrize(
    ("weights", "error", "pattern"),
    [
        ([1.0, 2.0], ValueError, r"class_weights must have shape \(3,\).* got \(2,\)"),
        (torch.ones(3, 1), ValueError, r"class_weights must have shape \(3,\).* got \(3, 1\)"),
        ([1.0, -0.5, 1.0], ValueError, r"class_weights must be finite and >= 0"),
        ([1.0, NAN, 1.0], ValueError, r"class_weights must be finite and >= 0"),
        ([1.0, INF, 1.0], ValueError, r"class_weights must be finite and >= 0"),
        ([0.0, 0.0, 0.0], ValueError, r"class_weights must have at least one positive weight"),
        ("abc", TypeError, r"class_weights must be a sequence of numbers or a tensor; got str"),
        (1.0, TypeError, r"class_weights must be a sequence of numbers or a tensor; got float"),
        ({0: 1.0}, TypeError, r"class_weights must be a sequence of numbers or a tensor"),
        (["a", "b", "c"], TypeError, r"class_weights must be a sequence of numbers"),
        ([True, 1.0, 1.0], TypeError, r"class_weights must be a sequence of numbers"),
        (torch.tensor([1.0, -0.5, 1.0]), ValueError, r"class_weights must be finite and >= 0"),
        (torch.tensor([1.0, NAN, 1.0]), ValueError, r"class_weights must be finite and >= 0"),
        (torch.zeros(3), ValueError, r"class_weights must have at least one positive weight"),
        (torch.tensor(1.0), TypeError, r"class_weights must be a sequence .* got a 0-d tensor"),
        (torch.tensor([True, False, True]), TypeError,
         r"class_weights must be a sequence of numbers or a tensor of real numbers; "
         r"got torch.bool"),
        (torch.ones(3, dtype=torch.complex64), TypeError, r"tensor of real numbers; got "
                                                         r"torch.complex64"),
    ],
    ids=["short", "2d", "negative", "nan", "inf", "all-zero", "str", "float", "dict",
         "strings", "bools", "negative tensor", "nan tensor", "all-zero tensor", "0-d tensor",
         "bool tensor", "complex tensor"],
)
def test_softmax_bad_class_weights(gen, weights, error, pattern):
    with pytest.raises(error, match=pattern):
        lovasz_softmax(_probas(gen), _labels(gen), class_weights=weights)
    if error is TypeError:  # the module refuses them when it is built
        from lovasz_kernels import LovaszSoftmaxLoss

        with pytest.raises(error, match=pattern):
            LovaszSoftmaxLoss(class_weights=weights)


@pytest.mark.parametrize("weights", [[1.0, 0.0, 2.0], (1, 1, 1), torch.tensor([0.5, 1, 2])],
                         ids=str)
def test_softmax_good_class_weights_accepted(gen, weights):
    loss = lovasz_softmax(_probas(gen), _labels(gen), class_weights=weights)
    assert torch.isfinite(loss)


def test_class_weights_as_numpy_arrays(gen):
    """A numpy array of weights (inverse class frequencies, say) is taken as the tensor it
    holds, by the function and the module (which keeps a copy, not the caller's array); a
    bool array is refused as a bool tensor is."""
    from lovasz_kernels import LovaszSoftmaxLoss

    probas, labels = _probas(gen), _labels(gen)
    weights = np.array([0.5, 1.0, 2.0])
    expected = lovasz_softmax(probas, labels, class_weights=[0.5, 1.0, 2.0])
    assert torch.equal(lovasz_softmax(probas, labels, class_weights=weights), expected)
    module = LovaszSoftmaxLoss(class_weights=weights.astype(np.float32))
    assert torch.equal(module(probas, labels), expected)
    weights[:] = 0  # the module's buffer is its own
    assert torch.equal(module(probas, labels), expected)
    with pytest.raises(ValueError, match="class_weights must be finite and >= 0"):
        lovasz_softmax(probas, labels, class_weights=np.array([1.0, -1.0, 1.0]))
    for bad in (np.array([True, False, True]), np.array(["a", "b", "c"])):
        for make in (lambda w: lovasz_softmax(probas, labels, class_weights=w),
                     lambda w: LovaszSoftmaxLoss(class_weights=w)):
            with pytest.raises(TypeError, match="class_weights .*(real numbers|hold numbers)"):
                make(bad)


# --------------------------------------------------------------------------------------------
# backend names


def _assert_lists_backends(message: str) -> None:
    assert "unknown backend 'nope'" in message
    for name in ("'numpy'", "'torch'"):
        assert name in message, message


def test_softmax_unknown_backend(gen):
    with pytest.raises(ValueError) as info:
        lovasz_softmax(_probas(gen), _labels(gen), backend="nope")
    _assert_lists_backends(str(info.value))


def test_hinge_unknown_backend(gen):
    with pytest.raises(ValueError) as info:
        lovasz_hinge(_logits(gen), _labels(gen, classes=2), backend="nope")
    _assert_lists_backends(str(info.value))


def test_extension_unknown_backend(gen):
    with pytest.raises(ValueError) as info:
        lovasz_extension(*_errors_fg(gen), backend="nope")
    _assert_lists_backends(str(info.value))


def test_backend_name_must_be_str(gen):
    with pytest.raises(TypeError, match="backend must be a str or None; got int"):
        lovasz_softmax(_probas(gen), _labels(gen), backend=3)


# --------------------------------------------------------------------------------------------
# set_validate_values


def test_value_checks_on_by_default():
    assert validate_values_enabled() is True


@pytest.mark.parametrize("bad", ["yes", 1, None], ids=repr)
def test_set_validate_values_requires_bool(bad):
    with pytest.raises(TypeError, match="enabled must be a bool"):
        set_validate_values(bad)
    assert validate_values_enabled() is True


def test_value_checks_off_skips_nan_probas(gen, values_unchecked):
    assert validate_values_enabled() is False
    probas = _probas(gen)
    probas[0, 0, 0, 0] = NAN
    lovasz_softmax(probas, _labels(gen), backend="torch")  # no ValueError


def test_value_checks_off_skips_simplex_and_range(gen, values_unchecked):
    probas = _probas(gen) * 1.5  # sums to 1.5, some entries above 1
    loss = lovasz_softmax(probas, _labels(gen))
    assert torch.isfinite(loss)


def test_value_checks_off_skips_extension_values(gen, values_unchecked):
    errors, fg = _errors_fg(gen)
    errors[0, 0] = NAN
    lovasz_extension(errors, fg, backend="torch")  # no ValueError


def test_value_checks_off_keeps_shape_checks(gen, values_unchecked):
    with pytest.raises(ValueError, match="labels must have shape"):
        lovasz_softmax(_probas(gen), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("fg must have the shape of errors")):
        errors, fg = _errors_fg(gen)
        lovasz_extension(errors, fg[:1])


def test_value_checks_off_keeps_type_checks(gen, values_unchecked):
    with pytest.raises(TypeError, match=r"labels\.long\(\)"):
        lovasz_softmax(_probas(gen), _labels(gen).float())
    with pytest.raises(TypeError, match="per_image must be True or False"):
        lovasz_hinge(_logits(gen), _labels(gen, classes=2), per_image="yes")


def test_value_checks_switch_back_on(gen):
    probas = _probas(gen)
    probas[0, 0, 0, 0] = NAN
    set_validate_values(False)
    try:
        lovasz_softmax(probas, _labels(gen), backend="torch")
    finally:
        set_validate_values(True)
    with pytest.raises(ValueError, match="probas must be finite"):
        lovasz_softmax(probas, _labels(gen))


def test_set_validate_values_exported():
    assert lovasz_kernels.set_validate_values is set_validate_values


# --------------------------------------------------------------------------------------------
# Devices (need a GPU)


@requires_cuda
def test_softmax_labels_on_other_device(gen):
    probas = _probas(gen).cuda()
    with pytest.raises(ValueError, match=r"labels must be on the same device as probas"):
        lovasz_softmax(probas, _labels(gen))


@requires_cuda
def test_hinge_labels_on_other_device(gen):
    with pytest.raises(ValueError, match=r"labels must be on the same device as logits"):
        lovasz_hinge(_logits(gen).cuda(), _labels(gen, classes=2))


@requires_cuda
def test_extension_fg_on_other_device(gen):
    errors, fg = _errors_fg(gen)
    with pytest.raises(ValueError, match=r"fg must be on the same device as errors"):
        lovasz_extension(errors.cuda(), fg)


@requires_cuda
def test_cuda_tensor_to_numpy_backend(gen):
    with pytest.raises(ValueError, match=r"backend 'numpy' runs on cpu tensors only"):
        lovasz_softmax(_probas(gen).cuda(), _labels(gen).cuda(), backend="numpy")
    errors, fg = _errors_fg(gen)
    with pytest.raises(ValueError, match=r"backend 'numpy' runs on cpu tensors only"):
        lovasz_extension(errors.cuda(), fg.cuda(), backend="numpy")


# --------------------------------------------------------------------------------------------
# Shapes and labels of the multilabel losses, and C = 0


def test_zero_classes_is_a_value_error_naming_probas():
    with pytest.raises(ValueError, match=r"probas must have at least one class"):
        lovasz_softmax(torch.zeros(2, 0, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))


@pytest.mark.parametrize("shape", [(4,), (2, 0, 4)], ids=["no channel dim", "no channel"])
def test_multilabel_scores_without_channels_name_them(shape):
    with pytest.raises(ValueError, match=r"probas must have shape \(B, C, \*spatial\) with C >= 1"):
        lovasz_sigmoid(torch.rand(shape), torch.zeros(shape, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must have shape \(B, C, \*spatial\) with C >= 1"):
        lovasz_hinge(torch.rand(shape), torch.zeros(shape, dtype=torch.long), multilabel=True)


def test_multilabel_labels_need_the_scores_shape(gen):
    scores = torch.rand(2, 3, 4, 5, generator=gen)
    with pytest.raises(ValueError, match=r"labels must have the shape of probas \(2, 3, 4, 5\)"):
        lovasz_sigmoid(scores, torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must have the shape of logits"):
        lovasz_hinge(scores, torch.zeros(2, 4, 5, dtype=torch.long), multilabel=True)


def test_multilabel_labels_are_binary_and_probas_in_unit_interval(gen):
    scores = torch.rand(2, 3, 4, 5, generator=gen)
    masks = (torch.rand(2, 3, 4, 5, generator=gen) < 0.5).long()
    bad = masks.clone()
    bad[0, 1, 2, 3] = 2
    with pytest.raises(ValueError, match=r"labels must be in \{0, 1\}"):
        lovasz_sigmoid(scores, bad)
    with pytest.raises(ValueError, match=r"probas must lie in \[0, 1\]"):
        lovasz_sigmoid(scores * 3, masks)
    lovasz_sigmoid(scores * 0.1, masks)  # per-channel probabilities need not sum to one
