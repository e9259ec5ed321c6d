"""``reduction`` of the per-image losses: "none" is each image's own loss (the loss of that
image alone), "sum" their sum, on every backend and kind of loss, with the gradient of any
weighting of the images, under torch.compile and TorchScript."""

from __future__ import annotations

import pytest
import torch

from lovasz_kernels import (
    LovaszHingeLoss,
    LovaszSigmoidLoss,
    LovaszSoftmaxLoss,
    _plan,
    lovasz_hinge,
    lovasz_sigmoid,
    lovasz_softmax,
)

IGNORE = 255
# TorchScript is deprecated in favour of torch.compile, and says so when a module is scripted
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")


def _cases(gen, dtype=torch.float64):
    """(name, loss function of (scores, labels, **options), scores, labels) per kind, each
    batch with an image that does not count (every pixel ignored) and one with a class
    missing."""
    batch, classes = 4, 5
    labels = torch.randint(0, classes, (batch, 7, 6), generator=gen)
    labels[1] = IGNORE
    labels[2, :3] = IGNORE
    labels[3][labels[3] == 2] = 0
    logits = torch.randn(batch, classes, 7, 6, generator=gen, dtype=torch.float64).to(dtype)
    masks = (torch.rand(batch, 3, 7, 6, generator=gen) < 0.3).long()
    masks[1] = IGNORE
    binary = (labels == 1).long().masked_fill(labels == IGNORE, IGNORE)
    return [
        ("softmax", lambda x, y, **o: lovasz_softmax(x.softmax(dim=1), y, **o), logits, labels),
        ("softmax of logits, weighted", lambda x, y, **o: lovasz_softmax(
            x, y, from_logits=True, class_weights=[1, 2, 0.5, 1, 3], **o), logits, labels),
        ("softmax, a class list", lambda x, y, **o: lovasz_softmax(
            x, y, from_logits=True, classes=[0, 2, 4], **o), logits, labels),
        ("hinge", lambda x, y, **o: lovasz_hinge(x, y, **o), logits[:, 0], binary),
        ("sigmoid case (C = 1)", lambda x, y, **o: lovasz_softmax(x.sigmoid(), y, **o),
         logits[:, :1], binary),
        ("multilabel hinge", lambda x, y, **o: lovasz_hinge(x, y, multilabel=True, **o),
         logits[:, :3], masks),
        ("lovasz_sigmoid", lambda x, y, **o: lovasz_sigmoid(x, y, from_logits=True, **o),
         logits[:, :3], masks),
    ]


def _value_and_grad(fn, scores, labels, image_weights, **options):
    x = scores.clone().requires_grad_()
    value = fn(x, labels, per_image=True, ignore_index=IGNORE, **options)
    weighted = value * image_weights if value.dim() else value
    (grad,) = torch.autograd.grad(weighted.sum(), x)
    return value.detach(), grad


@pytest.mark.parametrize("reads_free", [True, False], ids=["cpu-plans", "device-plans"])
def test_none_is_each_image_alone_and_sum_their_sum(backend, reads_free, gen, monkeypatch):
    """Against each image's loss alone; also with the plans a GPU gets (every segment listed,
    nothing read), run on CPU tensors."""
    monkeypatch.setitem(_plan._SETTINGS, "read_values_on_cpu", reads_free)
    for name, fn, scores, labels in _cases(gen):
        batch = scores.shape[0]
        image_weights = torch.rand(batch, generator=gen, dtype=torch.float64) + 0.5
        alone = [_value_and_grad(fn, scores[i:i + 1], labels[i:i + 1], image_weights[i],
                                 backend=backend) for i in range(batch)]
        expected_losses = torch.cat([value.reshape(1) for value, _ in alone])
        expected_grad = torch.cat([grad * image_weights[i] for i, (_, grad) in enumerate(alone)])
        assert expected_losses[1] == 0 and expected_losses.min() >= 0, name

        losses, grad = _value_and_grad(fn, scores, labels, image_weights, backend=backend,
                                       reduction="none")
        assert losses.shape == (batch,), name
        torch.testing.assert_close(losses, expected_losses, rtol=1e-12, atol=1e-14, msg=name)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14, msg=name)

        total, grad = _value_and_grad(fn, scores, labels, 1.0, backend=backend,
                                      reduction="sum")
        torch.testing.assert_close(total, expected_losses.sum(), rtol=1e-12, atol=1e-14,
                                   msg=name)
        torch.testing.assert_close(grad, torch.cat([g for _, g in alone]), rtol=1e-12,
                                   atol=1e-14, msg=name)

        # the mean, as before: over the images that count (all but the ignored one)
        mean, _ = _value_and_grad(fn, scores, labels, 1.0, backend=backend)
        torch.testing.assert_close(mean, expected_losses.sum() / (batch - 1), rtol=1e-12,
                                   atol=1e-14, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_narrow_scores_give_float32_losses_close_to_wide(dtype, gen):
    for name, fn, scores, labels in _cases(gen, dtype=dtype):
        losses, grad = _value_and_grad(fn, scores, labels, 1.0, reduction="none")
        assert losses.dtype == torch.float32 and grad.dtype == dtype, name
        wide, _ = _value_and_grad(fn, scores.double(), labels, 1.0, reduction="none")
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(losses.double(), wide, rtol=tolerance, atol=tolerance,
                                   msg=name)


def test_modules_scripted_and_compiled_agree(gen):
    logits = torch.randn(3, 4, 6, 5, generator=gen)
    labels = torch.randint(0, 4, (3, 6, 5), generator=gen)
    labels[0] = IGNORE
    expected = lovasz_softmax(logits, labels, from_logits=True, per_image=True,
                              ignore_index=IGNORE, reduction="none")
    criterion = LovaszSoftmaxLoss(from_logits=True, per_image=True, ignore_index=IGNORE,
                                  reduction="none")
    assert "reduction='none'" in repr(criterion)
    assert "reduction" not in repr(LovaszSoftmaxLoss())  # the default is not shown
    torch.testing.assert_close(criterion(logits, labels), expected, rtol=0, atol=0)
    scripted = torch.jit.script(criterion)
    torch.testing.assert_close(scripted(logits, labels), expected, rtol=0, atol=0)

    torch._dynamo.reset()
    model = torch.nn.Conv2d(4, 4, 1)
    weights = torch.tensor([0.0, 1.0, 2.0])

    def step(x, y):
        return (criterion(model(x), y) * weights).sum()

    x = logits.clone().requires_grad_()
    eager = step(x, labels)
    (eager_grad,) = torch.autograd.grad(eager, x)
    x_compiled = logits.clone().requires_grad_()
    compiled = torch.compile(step, fullgraph=True)(x_compiled, labels)
    (compiled_grad,) = torch.autograd.grad(compiled, x_compiled)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)
    torch.testing.assert_close(torch.func.grad(step)(logits, labels), eager_grad)

    hinge = LovaszHingeLoss(reduction="sum")
    masks = (labels == 1).long()
    torch.testing.assert_close(hinge(logits[:, 0], masks),
                               lovasz_hinge(logits[:, 0], masks, reduction="none").sum())
    sigmoid = LovaszSigmoidLoss(per_image=True, from_logits=True, reduction="none")
    assert sigmoid(logits, torch.rand(logits.shape, generator=gen) > 0.5).shape == (3,)


def test_empty_batch_gives_no_losses():
    losses = lovasz_softmax(torch.rand(0, 3, 4, 4, requires_grad=True),
                            torch.zeros(0, 4, 4, dtype=torch.long), per_image=True,
                            reduction="none")
    assert losses.shape == (0,)
    assert lovasz_hinge(torch.randn(0, 4, 4), torch.zeros(0, 4, 4, dtype=torch.long),
                        reduction="sum") == 0


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x, y: lovasz_softmax(x, y, per_image=True, reduction="avg"), ValueError,
         r"reduction must be one of \('mean', 'sum', 'none'\); got 'avg'"),
        (lambda x, y: lovasz_softmax(x, y, per_image=True, reduction=None), TypeError,
         "reduction must be one of"),
        (lambda x, y: lovasz_softmax(x, y, reduction="none"), ValueError,
         "reduction='none' reduces the per-image losses and needs per_image=True"),
        (lambda x, y: lovasz_sigmoid(x, y > 0, reduction="sum"), ValueError,
         "reduction='sum' reduces the per-image losses and needs per_image=True"),
        (lambda x, y: lovasz_hinge(x[:, 0], y > 0, per_image=False, reduction="none"),
         ValueError, "needs per_image=True"),
        (lambda x, y: LovaszSoftmaxLoss(reduction="none"), ValueError, "needs per_image=True"),
        (lambda x, y: LovaszHingeLoss(reduction="mena"), ValueError, "got 'mena'"),
    ],
)
def test_bad_reduction_is_refused_by_name(call, error, match):
    probas = torch.rand(2, 3, 4, 4).softmax(dim=1)
    labels = torch.randint(0, 3, (2, 4, 4))
    with pytest.raises(error, match=match):
        call(probas, labels)
