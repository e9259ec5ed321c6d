"""The ``nn.Module`` wrappers: same numbers as the functions, repr, buffers, state_dict."""

from __future__ import annotations

import pytest
import torch

from lovasz_kernels import LovaszHingeLoss, LovaszSoftmaxLoss, lovasz_hinge, lovasz_softmax


def _softmax_inputs(gen: torch.Generator, from_logits: bool):
    logits = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64)
    scores = logits if from_logits else logits.softmax(dim=1)
    labels = torch.randint(0, 3, (2, 5, 6), generator=gen)
    labels[0, :2] = 255
    return scores, labels


def _hinge_inputs(gen: torch.Generator):
    logits = torch.randn(2, 1, 5, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 2, (2, 5, 6), generator=gen)
    labels[1, 0] = 255
    return logits, labels


def _loss_and_grad(fn, scores: torch.Tensor, labels: torch.Tensor):
    scores = scores.clone().requires_grad_()
    loss = fn(scores, labels)
    (grad,) = torch.autograd.grad(loss, scores)
    return loss, grad


def _assert_same(module_result, functional_result):
    module_loss, module_grad = module_result
    functional_loss, functional_grad = functional_result
    assert module_loss.dtype == functional_loss.dtype == torch.float64
    torch.testing.assert_close(module_loss, functional_loss, rtol=0, atol=0)
    torch.testing.assert_close(module_grad, functional_grad, rtol=0, atol=0)
    assert module_grad.abs().sum() > 0  # the comparison is not between two zero gradients


# --------------------------------------------------------------------------------------------
# forward == functional


@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("ignore_index", [None, 255])
def test_hinge_module_matches_function(backend, gen, per_image, ignore_index):
    logits, labels = _hinge_inputs(gen)
    if ignore_index is None:
        labels = labels.clamp(max=1)
    kwargs = dict(per_image=per_image, ignore_index=ignore_index, backend=backend)
    criterion = LovaszHingeLoss(**kwargs)
    _assert_same(
        _loss_and_grad(criterion, logits, labels),
        _loss_and_grad(lambda s, t: lovasz_hinge(s, t, **kwargs), logits, labels),
    )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"classes": "all", "per_image": True},
        {"classes": [0, 2], "class_weights": [1.0, 0.5, 2.0]},
        {"per_image": True, "class_weights": torch.tensor([0.0, 1.0, 3.0]), "from_logits": True},
        {"classes": (2, 1), "from_logits": True},
    ],
    ids=["defaults", "all-per-image", "list-weights", "tensor-weights-logits", "tuple-logits"],
)
def test_softmax_module_matches_function(backend, gen, options):
    scores, labels = _softmax_inputs(gen, options.get("from_logits", False))
    kwargs = dict(options, ignore_index=255, backend=backend)
    criterion = LovaszSoftmaxLoss(**kwargs)
    _assert_same(
        _loss_and_grad(criterion, scores, labels),
        _loss_and_grad(lambda s, t: lovasz_softmax(s, t, **kwargs), scores, labels),
    )


def test_softmax_module_weights_change_the_loss(gen):
    """The buffer is actually passed to the function (not silently dropped)."""
    scores, labels = _softmax_inputs(gen, from_logits=False)
    plain = LovaszSoftmaxLoss(ignore_index=255)(scores, labels)
    weighted = LovaszSoftmaxLoss(ignore_index=255, class_weights=[1.0, 0.0, 0.0])(scores, labels)
    only_class_0 = lovasz_softmax(scores, labels, ignore_index=255, classes=[0])
    assert not torch.equal(plain, weighted)
    torch.testing.assert_close(weighted, only_class_0)


def test_softmax_module_accepts_tensor_classes_like_function(gen):
    scores, labels = _softmax_inputs(gen, from_logits=False)
    classes = torch.tensor([0, 2])
    expected = lovasz_softmax(scores, labels, classes=classes, ignore_index=255)
    got = LovaszSoftmaxLoss(classes=classes, ignore_index=255)(scores, labels)
    torch.testing.assert_close(got, expected)


# --------------------------------------------------------------------------------------------
# repr


def test_hinge_repr_defaults():
    assert repr(LovaszHingeLoss()) == "LovaszHingeLoss(per_image=True, ignore_index=None, " \
                                      "backend=None)"


def test_hinge_repr_every_argument():
    criterion = LovaszHingeLoss(per_image=False, ignore_index=255, backend="numpy")
    assert criterion.extra_repr() == "per_image=False, ignore_index=255, backend='numpy'"


def test_softmax_repr_defaults():
    assert LovaszSoftmaxLoss().extra_repr() == (
        "classes='present', per_image=False, ignore_index=None, from_logits=False, "
        "backend=None"
    )


def test_softmax_repr_every_argument():
    criterion = LovaszSoftmaxLoss(
        classes=(0, 2), per_image=True, ignore_index=-1, class_weights=[1 / 3, 0.5, 2],
        from_logits=True, backend="torch",
    )
    assert criterion.extra_repr() == (
        "classes=[0, 2], per_image=True, ignore_index=-1, class_weights=[0.3333, 0.5, 2.0], "
        "from_logits=True, backend='torch'"
    )
    assert repr(criterion) == f"LovaszSoftmaxLoss({criterion.extra_repr()})"


# --------------------------------------------------------------------------------------------
# Construction errors


@pytest.mark.parametrize("module", [LovaszHingeLoss, LovaszSoftmaxLoss])
def test_unknown_backend_fails_at_construction(module):
    with pytest.raises(ValueError, match=r"unknown backend 'nope'; registered backends: .*"
                                         r"'numpy'"):
        module(backend="nope")


@pytest.mark.parametrize("module", [LovaszHingeLoss, LovaszSoftmaxLoss])
def test_backend_name_type_checked_at_construction(module):
    with pytest.raises(TypeError, match="backend must be a str"):
        module(backend=1)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"per_image": "yes"}, TypeError, "per_image must be True or False"),
        ({"ignore_index": 255.0}, TypeError, "ignore_index must be an int or None"),
        ({"ignore_index": True}, TypeError, "ignore_index must be an int or None"),
    ],
    ids=["per_image", "ignore_index-float", "ignore_index-bool"],
)
def test_hinge_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        LovaszHingeLoss(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"per_image": "yes"}, TypeError, "per_image must be True or False"),
        ({"from_logits": 1}, TypeError, "from_logits must be True or False"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int or None"),
        ({"classes": "some"}, ValueError, "classes must be 'present', 'all'"),
        ({"class_weights": [-1.0, 1.0]}, ValueError, "class_weights must be finite and >= 0"),
        ({"class_weights": [0.0, 0.0]}, ValueError, "class_weights must have at least one"),
        ({"class_weights": [1.0, float("nan")]}, ValueError, "class_weights must be finite"),
        ({"class_weights": "ab"}, TypeError, "class_weights must be a sequence of numbers"),
        ({"class_weights": torch.ones(2, 3)}, ValueError,
         r"class_weights must be 1-D, one weight per class; got shape \(2, 3\)"),
    ],
    ids=["per_image", "from_logits", "ignore_index", "classes", "weights-negative",
         "weights-zero", "weights-nan", "weights-str", "weights-2d"],
)
def test_softmax_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        LovaszSoftmaxLoss(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"class_weights": 1.0}, "class_weights"),
     ({"class_weights": torch.tensor(2.0)}, "class_weights"),
     ({"classes": 5}, "classes")],
    ids=["weights-float", "weights-0d-tensor", "classes-int"],
)
def test_softmax_unsized_arguments_named(kwargs, name):
    with pytest.raises(TypeError, match=name):
        LovaszSoftmaxLoss(**kwargs)


def test_softmax_classes_list_checked_against_input(gen):
    """A class list can only be checked against C once an input arrives."""
    scores, labels = _softmax_inputs(gen, from_logits=False)
    criterion = LovaszSoftmaxLoss(classes=[0, 3], ignore_index=255)
    with pytest.raises(ValueError, match=r"classes must be in \[0, 3\); got \[3\]"):
        criterion(scores, labels)


def test_softmax_weights_length_checked_against_input(gen):
    scores, labels = _softmax_inputs(gen, from_logits=False)
    criterion = LovaszSoftmaxLoss(class_weights=[1.0, 1.0], ignore_index=255)
    with pytest.raises(ValueError, match=r"class_weights must have shape \(3,\)"):
        criterion(scores, labels)


# --------------------------------------------------------------------------------------------
# class_weights buffer


def test_class_weights_is_a_buffer():
    criterion = LovaszSoftmaxLoss(class_weights=[1.0, 2.0, 0.5])
    buffers = dict(criterion.named_buffers())
    assert "class_weights" in buffers
    assert list(dict(criterion.named_parameters())) == []
    torch.testing.assert_close(buffers["class_weights"],
                               torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    state = criterion.state_dict()
    assert list(state) == ["class_weights"]
    torch.testing.assert_close(state["class_weights"], buffers["class_weights"])


def test_no_class_weights_no_state():
    criterion = LovaszSoftmaxLoss()
    assert criterion.class_weights is None
    assert "class_weights" not in criterion.state_dict()
    assert LovaszHingeLoss().state_dict() == {}


def test_class_weights_follow_to():
    criterion = LovaszSoftmaxLoss(class_weights=[1.0, 2.0, 0.5])
    assert criterion.class_weights.dtype == torch.float64
    criterion.to(torch.float32)
    assert criterion.class_weights.dtype == torch.float32
    criterion.to(torch.float64)
    assert criterion.class_weights.dtype == torch.float64
    criterion.to("cpu")
    assert criterion.class_weights.device.type == "cpu"
    torch.testing.assert_close(criterion.class_weights,
                               torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))


def test_converted_module_still_matches_function(gen):
    scores, labels = _softmax_inputs(gen, from_logits=False)
    criterion = LovaszSoftmaxLoss(class_weights=[1.0, 2.0, 0.5], ignore_index=255)
    criterion.to(torch.float32)
    expected = lovasz_softmax(scores, labels, ignore_index=255, class_weights=[1.0, 2.0, 0.5])
    torch.testing.assert_close(criterion(scores, labels), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_class_weights_follow_to_cuda(gen):
    criterion = LovaszSoftmaxLoss(class_weights=[1.0, 2.0, 0.5], ignore_index=255).to("cuda")
    assert criterion.class_weights.device.type == "cuda"
    scores, labels = _softmax_inputs(gen, from_logits=False)
    loss = criterion(scores.cuda(), labels.cuda())
    expected = lovasz_softmax(scores, labels, ignore_index=255, class_weights=[1.0, 2.0, 0.5])
    torch.testing.assert_close(loss.cpu(), expected)


def test_state_dict_round_trip(gen):
    source = LovaszSoftmaxLoss(class_weights=[0.25, 1.0, 4.0], ignore_index=255)
    target = LovaszSoftmaxLoss(class_weights=[1.0, 1.0, 1.0], ignore_index=255)
    result = target.load_state_dict(source.state_dict())
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    torch.testing.assert_close(target.class_weights, source.class_weights)
    assert "class_weights=[0.25, 1.0, 4.0]" in repr(target)
    scores, labels = _softmax_inputs(gen, from_logits=False)
    torch.testing.assert_close(target(scores, labels), source(scores, labels))
    # the saved tensor is a copy: changing the source afterwards leaves the target alone
    source.class_weights.fill_(1.0)
    assert target.class_weights.tolist() == [0.25, 1.0, 4.0]


def test_state_dict_round_trip_through_torch_save(tmp_path):
    source = LovaszSoftmaxLoss(class_weights=torch.tensor([3.0, 0.0, 1.0]))
    path = tmp_path / "criterion.pt"
    torch.save(source.state_dict(), path)
    target = LovaszSoftmaxLoss(class_weights=[1.0, 1.0, 1.0])
    target.load_state_dict(torch.load(path, weights_only=True))
    assert target.class_weights.tolist() == [3.0, 0.0, 1.0]
