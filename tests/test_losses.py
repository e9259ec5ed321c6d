"""The losses end to end: every backend against the naive oracle, autograd, reductions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lovasz_kernels.backends.numpy_ref
from lovasz_kernels import (
    _jaccard,
    _torch_sort,
    get_backend,
    lovasz_extension,
    lovasz_grad,
    lovasz_hinge,
    lovasz_sigmoid,
    lovasz_softmax,
)
from reference import naive
from tests.helpers import GRAD_TOLERANCE, LOSS_TOLERANCE, assert_close_report


def _softmax_inputs(gen, batch=2, classes=4, spatial=(5, 7), dtype=torch.float64):
    logits = torch.randn(batch, classes, *spatial, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, classes, (batch, *spatial), generator=gen)
    return logits.softmax(dim=1).to(dtype), labels


def _loss_and_grad(fn, scores, *args, **kwargs):
    scores = scores.detach().clone().requires_grad_()
    loss = fn(scores, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, scores)
    return loss.detach(), grad


def _oracle_softmax(probas, labels, **kwargs):
    batch, classes = probas.shape[:2]
    loss, grad = naive.lovasz_softmax(
        probas.reshape(batch, classes, -1), labels.reshape(batch, -1), **kwargs
    )
    return loss, torch.tensor(grad, dtype=torch.float64).reshape(probas.shape)


def _assert_matches_oracle(loss, grad, oracle_loss, oracle_grad):
    assert loss.item() == pytest.approx(oracle_loss, rel=1e-9, abs=1e-12)
    assert_close_report(grad, oracle_grad, GRAD_TOLERANCE[torch.float64], "grad vs oracle")


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("classes", ["present", "all", [0, 2]], ids=str)
@pytest.mark.parametrize("ignore_index", [None, 255])
def test_softmax_matches_oracle(backend, gen, per_image, classes, ignore_index):
    probas, labels = _softmax_inputs(gen, batch=3, classes=4)
    labels[labels == 3] = 1  # class 3 absent everywhere: "present" and "all" differ
    labels[1, 0] = 2
    if ignore_index is not None:
        labels[0, :2] = ignore_index
        labels[2] = ignore_index  # a fully ignored image
    kwargs = dict(classes=classes, per_image=per_image, ignore_index=ignore_index)
    loss, grad = _loss_and_grad(lovasz_softmax, probas, labels, backend=backend, **kwargs)
    _assert_matches_oracle(loss, grad, *_oracle_softmax(probas, labels, **kwargs))


@pytest.mark.parametrize("per_image", [False, True])
def test_softmax_class_weights(backend, gen, per_image):
    probas, labels = _softmax_inputs(gen, batch=2, classes=3)
    weights = [0.5, 2.0, 0.0]
    kwargs = dict(per_image=per_image, class_weights=weights)
    loss, grad = _loss_and_grad(lovasz_softmax, probas, labels, backend=backend, **kwargs)
    _assert_matches_oracle(loss, grad, *_oracle_softmax(probas, labels, **kwargs))
    # uniform weights are the plain mean
    uniform = lovasz_softmax(probas, labels, per_image=per_image, class_weights=torch.ones(3) * 7)
    plain = lovasz_softmax(probas, labels, per_image=per_image)
    assert uniform.item() == pytest.approx(plain.item())


@pytest.mark.parametrize("scores_require_grad", [False, True])
def test_class_weights_that_require_grad_are_constants(backend, gen, scores_require_grad):
    """A weight tensor that requires grad (a learnt parameter, say) weighs the classes as its
    values do, on every backend, and gets no gradient, whether or not the scores need one."""
    probas, labels = _softmax_inputs(gen, batch=2, classes=3, dtype=torch.float32)
    weights = torch.tensor([0.5, 2.0, 1.0], requires_grad=True)
    expected = lovasz_softmax(probas, labels, class_weights=[0.5, 2.0, 1.0], backend=backend)
    for per_image in (False, True):
        scores = probas.clone().requires_grad_(scores_require_grad)
        loss = lovasz_softmax(scores, labels, per_image=per_image, class_weights=weights * 1,
                              backend=backend)
        assert loss.requires_grad == scores_require_grad
        if per_image:
            continue
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        if scores_require_grad:
            loss.backward()
    assert weights.grad is None


@pytest.mark.slow
@pytest.mark.parametrize("case", ["hinge margins", "one-hot probas", "extension"])
def test_no_positive_error_gives_zero_loss_and_gradient(backend, gen, case):
    """Every pixel right by a margin (a well-trained model): loss 0 and gradient 0, also on
    segments long enough for the torch backend to sort only the positive errors (none)."""
    side = 128  # 16384 pixels a segment
    if case == "extension":
        errors = -torch.rand(2, side * side, generator=gen)
        errors[1] = 0.0
        loss, grad = lovasz_extension(errors, torch.rand(errors.shape, generator=gen) < 0.5,
                                      backend=backend)
        assert torch.equal(loss, torch.zeros(2)) and not bool(grad.any())
        return
    labels = torch.randint(0, 2, (2, side, side), generator=gen)
    if case == "hinge margins":
        scores = (2.0 * labels - 1) * (1 + torch.rand(labels.shape, generator=gen))
        function = lovasz_hinge
    else:
        scores = torch.nn.functional.one_hot(labels, 2).movedim(-1, 1).float()
        function = lovasz_softmax
    for per_image in (False, True):
        loss, grad = _loss_and_grad(function, scores, labels, per_image=per_image,
                                    backend=backend)
        assert loss.item() == 0.0 and not bool(grad.any()), (per_image, loss)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("ignore_index", [None, -1])
def test_hinge_matches_oracle(backend, gen, per_image, ignore_index):
    logits = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 2, (3, 6, 5), generator=gen)
    labels[2] = 0  # an image without foreground still counts
    if ignore_index is not None:
        labels[0, 0] = ignore_index
        labels[1] = ignore_index  # fully ignored: left out of the mean
    loss, grad = _loss_and_grad(
        lovasz_hinge, logits, labels, per_image=per_image, ignore_index=ignore_index,
        backend=backend,
    )
    oracle_loss, oracle_grad = naive.lovasz_hinge(
        logits.reshape(3, -1), labels.reshape(3, -1), per_image, ignore_index
    )
    oracle_grad = torch.tensor(oracle_grad, dtype=torch.float64).reshape(3, 6, 5)
    _assert_matches_oracle(loss, grad, oracle_loss, oracle_grad)


def test_hinge_channel_layout(backend, gen):
    logits = torch.randn(2, 1, 4, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 2, (2, 4, 4), generator=gen)
    expected = lovasz_hinge(logits[:, 0], labels, backend=backend)
    assert lovasz_hinge(logits, labels, backend=backend).item() == expected.item()
    assert lovasz_hinge(logits, labels[:, None], backend=backend).item() == expected.item()
    loss, grad = _loss_and_grad(lovasz_hinge, logits, labels, backend=backend)
    assert grad.shape == logits.shape


def test_sigmoid_case_with_default_arguments(backend, gen):
    """C == 1: the channel is P(foreground); an image without foreground is still penalised."""
    probas = torch.rand(3, 1, 6, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 2, (3, 6, 6), generator=gen)
    labels[1] = 0
    loss, grad = _loss_and_grad(lovasz_softmax, probas, labels, backend=backend)
    _assert_matches_oracle(loss, grad, *_oracle_softmax(probas, labels))
    # per image: the image without foreground gets a gradient pushing its top error down
    loss_pi, grad_pi = _loss_and_grad(lovasz_softmax, probas, labels, per_image=True,
                                      backend=backend)
    _assert_matches_oracle(loss_pi, grad_pi, *_oracle_softmax(probas, labels, per_image=True))
    assert grad_pi[1].abs().max() > 0
    # the foreground class's Lovász extension on |y - p|, straight from the kernel
    same = lovasz_softmax(probas, labels[:, None], classes=[1], backend=backend)
    assert same.item() == pytest.approx(loss.item(), rel=1e-12)
    # from logits: sigmoid applied inside
    logits = torch.logit(probas)
    from_logits = lovasz_softmax(logits, labels, from_logits=True, backend=backend)
    assert from_logits.item() == pytest.approx(loss.item(), rel=1e-9)


def test_from_logits_equals_softmax_first(backend, gen):
    logits = torch.randn(2, 5, 6, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 6, 6), generator=gen)
    direct, grad_direct = _loss_and_grad(
        lambda x, y: lovasz_softmax(x.softmax(dim=1), y, backend=backend), logits, labels
    )
    inside, grad_inside = _loss_and_grad(
        lovasz_softmax, logits, labels, from_logits=True, backend=backend
    )
    assert inside.item() == pytest.approx(direct.item(), rel=1e-12)
    assert torch.allclose(grad_inside, grad_direct, rtol=1e-10, atol=1e-14)


def test_volumes_and_any_spatial_rank(backend, gen):
    """3-D volumes: the loss only sees pixel sets, so reshaping the spatial dims is a no-op."""
    probas, labels = _softmax_inputs(gen, batch=2, classes=3, spatial=(3, 4, 5))
    for per_image in (False, True):
        volume, grad = _loss_and_grad(lovasz_softmax, probas, labels, per_image=per_image,
                                      backend=backend)
        flat, flat_grad = _loss_and_grad(
            lovasz_softmax, probas.reshape(2, 3, 12, 5), labels.reshape(2, 12, 5),
            per_image=per_image, backend=backend,
        )
        assert volume.item() == pytest.approx(flat.item(), rel=1e-12)
        assert torch.equal(grad.reshape(flat_grad.shape), flat_grad)
        _assert_matches_oracle(volume, grad,
                               *_oracle_softmax(probas, labels, per_image=per_image))
    # no spatial dims at all: (B, C) classification
    loss, grad = _loss_and_grad(lovasz_softmax, probas[:, :, 0, 0, 0], labels[:, 0, 0, 0],
                                backend=backend)
    _assert_matches_oracle(loss, grad,
                           *_oracle_softmax(probas[:, :, 0, 0, 0], labels[:, 0, 0, 0]))


def test_per_image_differs_from_batch(backend, gen):
    probas, labels = _softmax_inputs(gen, batch=3, classes=4, spatial=(8, 8))
    batch_loss = lovasz_softmax(probas, labels, backend=backend)
    image_loss = lovasz_softmax(probas, labels, per_image=True, backend=backend)
    assert batch_loss.item() != pytest.approx(image_loss.item(), rel=1e-6)
    # with one image they coincide
    one = lovasz_softmax(probas[:1], labels[:1], backend=backend)
    assert one.item() == pytest.approx(
        lovasz_softmax(probas[:1], labels[:1], per_image=True, backend=backend).item(), rel=1e-12
    )


def test_single_valid_pixel_and_nothing_valid(backend, gen):
    probas, labels = _softmax_inputs(gen, batch=2, classes=3, spatial=(4, 4))
    labels.fill_(255)
    labels[1, 2, 3] = 2
    for per_image in (False, True):
        loss, grad = _loss_and_grad(lovasz_softmax, probas, labels, ignore_index=255,
                                    per_image=per_image, backend=backend)
        # one pixel of class 2: the loss is its error 1 - p_2
        assert loss.item() == pytest.approx(1 - probas[1, 2, 2, 3].item(), rel=1e-12)
        assert grad[1, 2, 2, 3].item() == pytest.approx(-1.0)
        assert int((grad != 0).sum()) == 1
    labels.fill_(255)
    for fn, scores in ((lovasz_softmax, probas), (lovasz_hinge, probas[:, 0])):
        loss, grad = _loss_and_grad(fn, scores, labels, ignore_index=255, backend=backend)
        assert loss.item() == 0.0 and bool((grad == 0).all())


def test_empty_batch(backend):
    probas = torch.empty(0, 3, 4, 4, dtype=torch.float64)
    labels = torch.empty(0, 4, 4, dtype=torch.long)
    loss, grad = _loss_and_grad(lovasz_softmax, probas, labels, backend=backend)
    assert loss.item() == 0.0 and grad.shape == probas.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_inputs(backend, gen, dtype):
    """The same values in a narrow dtype give the float64 answer (computed in >= float32).
    16-bit values tie often, and the torch backend's sorts may order ties differently
    (float64 rows never pack): both widths get the comparison sort here."""
    with _torch_sort.method_forced(_torch_sort.COMPARED):
        probas, labels = _softmax_inputs(gen, batch=2, classes=4, spatial=(9, 11),
                                         dtype=dtype)
        narrow_loss, narrow_grad = _loss_and_grad(lovasz_softmax, probas, labels,
                                                  backend=backend)
        wide_loss, wide_grad = _loss_and_grad(lovasz_softmax, probas.double(), labels,
                                              backend=backend)
        assert narrow_loss.dtype == torch.float32 and narrow_grad.dtype == dtype
        assert_close_report(narrow_loss, wide_loss, LOSS_TOLERANCE[dtype], "loss")
        assert_close_report(narrow_grad, wide_grad, GRAD_TOLERANCE[dtype], "grad")
        logits = torch.randn(2, 9, 11, generator=gen).to(dtype)
        binary = torch.randint(0, 2, (2, 9, 11), generator=gen)
        narrow_loss, narrow_grad = _loss_and_grad(lovasz_hinge, logits, binary,
                                                  backend=backend)
        wide_loss, wide_grad = _loss_and_grad(lovasz_hinge, logits.double(), binary,
                                              backend=backend)
        assert_close_report(narrow_loss, wide_loss, LOSS_TOLERANCE[dtype], "hinge loss")
        assert_close_report(narrow_grad, wide_grad, GRAD_TOLERANCE[dtype], "hinge grad")


def test_label_dtypes(backend, gen):
    probas, labels = _softmax_inputs(gen, batch=2, classes=3)
    expected = lovasz_softmax(probas, labels, backend=backend)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert lovasz_softmax(probas, labels.to(dtype), backend=backend).item() == expected.item()
    binary = labels.clamp(max=1)
    logits = torch.logit(probas[:, 1].clamp(1e-6, 1 - 1e-6))
    assert lovasz_hinge(logits, binary.bool(), backend=backend).item() == pytest.approx(
        lovasz_hinge(logits, binary, backend=backend).item()
    )


@pytest.mark.parametrize("per_image", [False, True])
def test_gradcheck_fp64(backend, gen, per_image):
    """Finite differences agree with autograd (inputs well separated: no kink crossed)."""
    logits = torch.randn(2, 3, 3, 4, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 3, (2, 3, 4), generator=gen)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: lovasz_softmax(x, labels, per_image=per_image, from_logits=True,
                                 backend=backend),
        (logits,), eps=1e-7, atol=1e-6,
    )
    probas = logits.detach().softmax(dim=1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p: lovasz_softmax(p, labels, per_image=per_image, backend=backend),
        (probas,), eps=1e-8, atol=1e-6,
    )
    hinge_logits = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).requires_grad_()
    binary = labels.clamp(max=1)
    assert torch.autograd.gradcheck(
        lambda x: lovasz_hinge(x, binary, per_image=per_image, backend=backend),
        (hinge_logits,), eps=1e-7, atol=1e-6,
    )


def test_backend_runs_once_per_forward_and_never_in_backward(backend, gen, monkeypatch):
    """Whichever entry point the backend offers (the fused ``lovasz_loss``,
    ``lovasz_extension_`` or ``lovasz_extension``), forward calls the backend once and
    backward never does (a fused path that declines the call, returning None, has not run
    it)."""
    module = get_backend(backend)._load()
    calls = []
    for entry_point in ("lovasz_extension", "lovasz_extension_", "lovasz_loss"):
        original = getattr(module, entry_point, None)
        if original is None:
            continue

        def counting(*args, _original=original):
            result = _original(*args)
            if result is not None:
                calls.append(args[0].shape)
            return result

        monkeypatch.setattr(module, entry_point, counting)
    probas, labels = _softmax_inputs(gen, batch=2, classes=4)
    probas.requires_grad_()
    loss = lovasz_softmax(probas, labels, per_image=True, backend=backend)
    assert len(calls) == 1
    (loss * 3).backward()
    assert len(calls) == 1
    # the gradient scales with the upstream gradient
    probas_2 = probas.detach().clone().requires_grad_()
    lovasz_softmax(probas_2, labels, per_image=True, backend=backend).backward()
    assert torch.allclose(probas.grad, 3 * probas_2.grad)


def test_double_backward_through_softmax(backend, gen):
    """Piecewise linear in the probabilities: second derivatives come only from the softmax."""
    logits = torch.randn(1, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (1, 4, 4), generator=gen)
    assert torch.autograd.gradgradcheck(
        lambda x: lovasz_softmax(x, labels, from_logits=True, backend=backend), (logits,)
    )


def test_no_grad_and_inference_mode(backend, gen):
    probas, labels = _softmax_inputs(gen)
    expected = lovasz_softmax(probas, labels, backend=backend)
    with torch.no_grad():
        assert lovasz_softmax(probas, labels, backend=backend).item() == expected.item()
    with torch.inference_mode():
        assert lovasz_softmax(probas, labels, backend=backend).item() == expected.item()


def test_present_classes_skip_absent_segments(gen, monkeypatch):
    """Only counted segments reach the kernel (150 classes, a handful present)."""
    shapes = []
    module = lovasz_kernels.backends.numpy_ref
    original = module.lovasz_extension
    monkeypatch.setattr(module, "lovasz_extension",
                        lambda e, f: shapes.append(tuple(e.shape)) or original(e, f))
    probas = torch.rand(2, 150, 4, 4, generator=gen).softmax(dim=1)
    labels = torch.randint(0, 3, (2, 4, 4), generator=gen)
    present = int(torch.unique(labels).numel())
    lovasz_softmax(probas, labels, backend="numpy")
    assert shapes[-1] == (present, 32)


def test_lovasz_grad_is_algorithm_1(gen):
    for _ in range(5):
        gt = (torch.rand(30, generator=gen) < 0.4).long()
        fg = set(torch.nonzero(gt).flatten().tolist())
        jaccard = [naive.jaccard_set_loss(set(range(k)), fg) for k in range(31)]
        expected = np.diff(jaccard)
        np.testing.assert_allclose(lovasz_grad(gt).numpy(), expected, rtol=1e-6, atol=1e-7)
        assert lovasz_grad(gt.double()).dtype == torch.float64
    batched = (torch.rand(4, 20, generator=gen) < 0.5)
    assert torch.equal(lovasz_grad(batched)[2], lovasz_grad(batched[2]))
    assert lovasz_grad(torch.zeros(0)).shape == (0,)
    assert lovasz_grad(torch.zeros(3)).tolist() == [1.0, 0.0, 0.0]  # no foreground


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_jaccard_counts_in_float_give_the_integer_counts_bits(gen, monkeypatch, dtype):
    """Counts kept in the float dtype (exact up to 2^24 pixels in float32) give the same
    increments, bit for bit, as integer counts; and buffers passed in are the ones written."""
    gt = torch.rand(3, 5000, generator=gen) < 0.3
    gt[1] = False  # no foreground: the first increment is 1
    in_float = _jaccard.jaccard_increments(gt, dtype)
    counts, out = torch.empty(gt.shape, dtype=dtype), torch.empty(gt.shape, dtype=dtype)
    assert _jaccard.jaccard_increments(gt, dtype, counts=counts, out=out) is out
    assert torch.equal(out, in_float)
    monkeypatch.setattr(_jaccard, "count_dtype", lambda num_pixels, dtype: torch.int32)
    assert torch.equal(_jaccard.jaccard_increments(gt, dtype), in_float)
    assert in_float[1, 0] == 1.0 and bool((in_float[1, 1:] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_small_arrays_take_fewer_passes_for_the_same_bits(gen, monkeypatch, dtype):
    """Small CPU arrays get the increments in fewer ops: the same bits as the in-place
    order, for whole rows and for the first pixels of longer rows (the top-k path's
    ``fg_total``), with and without foreground, one pixel included; larger arrays, and
    rows whose counts a float cannot hold exactly, keep the in-place order."""
    cases = [torch.rand(3, 2000, generator=gen) < 0.3, torch.rand(1, 4096, generator=gen) < 0.5,
             torch.rand(2, 1, generator=gen) < 0.5, torch.zeros(1, 7, dtype=torch.bool),
             torch.ones(2, 5, dtype=torch.bool)]
    cases[0][1] = False
    few_passes = [_jaccard.jaccard_increments(gt, dtype) for gt in cases]
    first = cases[0][:, :300]
    fg_total = cases[0].sum(dim=1, keepdim=True)
    partial = _jaccard.jaccard_increments(first, dtype, fg_total=fg_total, row_pixels=2000)
    calls = []
    monkeypatch.setattr(_jaccard, "_increments_in_few_passes",
                        lambda *args: calls.append(args) or pytest.fail("few passes taken"))
    monkeypatch.setattr(_jaccard, "FEW_PASSES_MAX_ELEMENTS", 0)
    for gt, expected in zip(cases, few_passes):
        assert torch.equal(_jaccard.jaccard_increments(gt, dtype), expected)
    assert torch.equal(partial, _jaccard.jaccard_increments(first, dtype, fg_total=fg_total,
                                                            row_pixels=2000))
    assert torch.equal(few_passes[0][:, :300], partial)
    monkeypatch.setattr(_jaccard, "FEW_PASSES_MAX_ELEMENTS", 8192)
    _jaccard.jaccard_increments(cases[0][:, :10], dtype, fg_total=fg_total, row_pixels=2**60)
    assert not calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64], ids=str)
def test_rows_scanned_one_by_one_give_the_same_counts(gen, dtype):
    """The per-row scan (a GPU's fast path for few long rows) gives the one scan's values,
    in place, for any leading shape."""
    for shape in [(3, 5000), (2, 2, 777), (1, 4096)]:
        labels = (torch.rand(shape, generator=gen) < 0.3).to(dtype)
        expected = labels.cumsum(dim=-1)
        scanned = labels.clone()
        assert _jaccard.cumsum_rows_(scanned, one_by_one=True) is scanned
        assert torch.equal(scanned, expected)
        assert torch.equal(_jaccard.cumsum_rows_(labels.clone()), expected)


def test_few_long_rows_are_scanned_one_by_one_on_a_gpu_only():
    """On a GPU, a 2-D scan walks each row with one warp (about 1.3 ns per column on an
    H200), a 1-D one is device-wide: one launch per row pays while a row has more columns
    than ``ONE_BY_ONE_COLUMNS_PER_ROW`` times the number of rows."""
    gpu, cpu = torch.device("meta"), torch.device("cpu")
    policy = _jaccard.scan_rows_one_by_one
    assert policy(torch.Size([4, 1 << 21]), gpu)  # 8 x 512^2 batch segments: 4 per chunk
    assert policy(torch.Size([21, 1 << 20]), gpu)
    assert not policy(torch.Size([128, 1 << 16]), gpu)  # many rows: the 2-D scan
    assert not policy(torch.Size([1, 1 << 20]), gpu)  # one row is already a 1-D scan
    assert not policy(torch.Size([1 << 20]), gpu)
    assert not policy(torch.Size([4, 1 << 21]), cpu)


@pytest.mark.parametrize("per_image", [True, False], ids=["per image", "batch"])
def test_cpu_plans_are_dense_exactly_when_every_segment_counts(gen, monkeypatch, per_image):
    """On the CPU the plan lists the segments that count; when that is all of them it is the
    device's dense plan (same tables) and runs the dense paths with the same bits."""
    from lovasz_kernels import _plan

    def plans(labels):
        arguments = (labels, 4, "present", [], None, per_image, 255, 0.0)
        compact = _plan.plan_segments(*arguments)
        monkeypatch.setitem(_plan._SETTINGS, "read_values_on_cpu", False)
        dense = _plan.plan_segments(*arguments)
        monkeypatch.setitem(_plan._SETTINGS, "read_values_on_cpu", True)
        return compact, dense

    probas, labels = _softmax_inputs(gen, batch=3, classes=4, spatial=(6, 6),
                                     dtype=torch.float32)
    labels.view(3, -1)[:, :4] = torch.arange(4)  # every class in every image
    compact, dense = plans(labels.view(3, -1))
    assert compact.dense and dense.dense
    for table in ("channel", "fg_label", "weight", "image"):
        ours, theirs = getattr(compact, table), getattr(dense, table)
        assert (ours is None) == (theirs is None) and (ours is None or torch.equal(ours, theirs))
    expected = torch.arange(12) % 4 if per_image else torch.arange(4)
    assert torch.equal(compact.channel, expected)

    with_dense_plan = _loss_and_grad(lovasz_softmax, probas, labels, per_image=per_image,
                                     backend="torch")
    # class 2 absent from image 1 (per image), from the batch (batch IoU)
    without = labels.clone()
    images = without[1:2] if per_image else without
    images[images == 2] = 255
    compact, dense = plans(without.view(3, -1))
    assert not compact.dense and dense.dense
    listed = dense.weight > 0
    assert compact.num_segments == int(listed.sum()) == (11 if per_image else 3)
    assert torch.equal(compact.channel, dense.channel[listed])
    assert torch.equal(compact.weight, dense.weight[listed])
    monkeypatch.setitem(_plan._SETTINGS, "read_values_on_cpu", False)
    as_on_a_device = _loss_and_grad(lovasz_softmax, probas, labels, per_image=per_image,
                                    backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(with_dense_plan, as_on_a_device))


@pytest.mark.parametrize("classes, class_list, num_classes, multilabel", [
    ("all", [], 4, False), ("list", [0, 2], 4, False), ("present", [], 1, False),
    ("all", [], 1, False), ("list", [1], 3, True), ("all", [], 3, True),
], ids=["all", "list", "binary", "binary all", "multilabel list", "multilabel all"])
@pytest.mark.parametrize("per_image", [True, False], ids=["per image", "batch"])
@pytest.mark.parametrize("reads_free", [True, False], ids=["cpu", "as on a device"])
def test_plans_without_label_values_match_the_counted_plans(
        gen, monkeypatch, classes, class_list, num_classes, multilabel, per_image, reads_free):
    """Where no label value matters (no ignore label, no class weights, and every chosen
    class counts), the weights come from the shapes alone: the same tables, bit for bit,
    as counting the labels gives, and no pass over them. Also with no pixel at all."""
    from lovasz_kernels import _plan

    monkeypatch.setitem(_plan._SETTINGS, "read_values_on_cpu", reads_free)
    label_shape = (3, num_classes, 10) if multilabel else (3, 10)
    some = torch.randint(0, 2 if multilabel else num_classes, label_shape, generator=gen)
    for labels in (some, some[..., :0]):
        arguments = dict(labels=labels, num_classes=num_classes, classes=classes,
                         class_list=class_list, class_weights=None, per_image=per_image,
                         ignore_index=None, bg_offset=0.0, multilabel=multilabel)
        assert not _plan._weights_need_labels(num_classes, classes, None, None, None,
                                              multilabel)
        from_shapes = _plan.plan_segments(**arguments)
        with monkeypatch.context() as patched:
            patched.setattr(_plan, "_weights_need_labels", lambda *args: True)
            counted = _plan.plan_segments(**arguments)
        assert from_shapes.dense == counted.dense
        for table in ("channel", "fg_label", "weight", "image"):
            ours, theirs = getattr(from_shapes, table), getattr(counted, table)
            assert (ours is None) == (theirs is None)
            assert ours is None or (ours.dtype == theirs.dtype and torch.equal(ours, theirs))
        # every chosen class counts in every group with a pixel: one weight for all, known
        # without a look at the table (and never claimed for a plan from counts)
        every_class_counts = labels.numel() > 0 and (classes != "list" or num_classes == 1)
        assert (from_shapes.uniform_weight is not None) == every_class_counts
        if every_class_counts:
            assert torch.all(from_shapes.weight == from_shapes.uniform_weight)
        assert counted.uniform_weight is None
    assert _plan._weights_need_labels(4, "present", None, None, None, False)
    assert _plan._weights_need_labels(1, "present", None, None, None, True)
    assert _plan._weights_need_labels(1, "all", None, 255, None, False)
    assert _plan._weights_need_labels(4, "all", torch.ones(4), None, None, False)
    assert _plan._weights_need_labels(4, "all", None, None, lambda counts: counts, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, num_classes, per_image", [
    (1, 1, True), (3, 1, True), (2, 5, False), (3, 7, True),
], ids=["weight 1", "1/3", "1/5", "1/21"])
def test_one_weight_for_all_scales_the_gradient_as_the_table_does(
        gen, dtype, batch, num_classes, per_image):
    """A plan whose segments share one weight scales the gradient by that number instead of
    by its table: the same losses and gradients, bit for bit."""
    from dataclasses import replace

    from lovasz_kernels import _plan

    labels = torch.randint(0, max(num_classes, 2), (batch, 96), generator=gen)
    scores = torch.randn(batch, num_classes, 96, generator=gen, dtype=dtype)
    if num_classes > 1:
        scores = scores.softmax(dim=1)
    plan = _plan.plan_segments(labels, num_classes, "all", [], None, per_image, None,
                               1.0 if num_classes == 1 else 0.0)
    assert plan.uniform_weight == 1 / num_classes / (batch if per_image else 1)
    extension = get_backend("torch").run_on_scratch
    loss, grad = _plan.generic_lovasz_loss(extension, scores, labels, plan)
    table_loss, table_grad = _plan.generic_lovasz_loss(
        extension, scores, labels, replace(plan, uniform_weight=None))
    assert torch.equal(loss, table_loss) and torch.equal(grad, table_grad)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "numba", "numpy"])
def test_cpu_plans_from_shapes_are_kept_and_never_written(gen, monkeypatch, backend):
    """A CPU plan that depends on the shapes alone is built once per shape and handed out
    again (also for other label values); losses leave its tables as they were; inference
    mode keeps its own; a full store starts afresh."""
    from lovasz_kernels import _plan

    if not get_backend(backend).availability()[0]:
        pytest.skip(f"{backend} not available")
    monkeypatch.setattr(_plan, "_SHAPE_PLANS", {})
    monkeypatch.setattr(_plan, "SHAPE_PLANS_KEPT", 3)

    def plan_of(labels, per_image=True):
        return _plan.plan_segments(labels, 1, "present", [], None, per_image, None, 1.0)

    labels = (torch.rand(2, 64, generator=gen) < 0.5).long()
    first = plan_of(labels)
    assert plan_of(1 - labels) is first
    assert plan_of(labels[:1]) is not first and plan_of(labels, per_image=False) is not first
    tables = {name: getattr(first, name).clone() for name in ("channel", "fg_label", "weight",
                                                              "image")}
    logits = torch.randn(2, 8, 8, generator=gen)
    for _ in range(2):
        _loss_and_grad(lovasz_hinge, logits, labels.view(2, 8, 8), backend=backend)
    assert plan_of(labels) is first
    for name, table in tables.items():
        assert torch.equal(getattr(first, name), table), name
    assert len(_plan._SHAPE_PLANS) == 3
    with torch.inference_mode():
        inference = plan_of(labels)
        assert inference is not first and inference.weight.is_inference()
    assert len(_plan._SHAPE_PLANS) == 1  # the store was full: started afresh
    assert plan_of(labels) is not first and not plan_of(labels).weight.is_inference()
    with monkeypatch.context() as patched:  # as on a device: nothing kept
        patched.setitem(_plan._SETTINGS, "read_values_on_cpu", False)
        assert plan_of(labels) is not plan_of(labels)


def test_eager_calls_skip_the_transform_ready_function(gen):
    """Plain eager calls take the cheaper ``forward(ctx, ...)`` twin; under ``torch.func``
    the ``setup_context`` Function runs, with the same gradient."""
    from lovasz_kernels import _ops

    probas, labels = _softmax_inputs(gen)
    scores = probas.clone().requires_grad_()
    loss = lovasz_softmax(scores, labels, backend="torch")
    assert type(loss.grad_fn).__name__ == "_EagerLossFunctionBackward"
    loss.backward()

    def loss_of(p):
        return lovasz_softmax(p, labels, backend="torch")

    assert _ops._function_for_call(_ops._CompiledLossFunction, _ops._LossFunction,
                                   _ops._EagerLossFunction) is _ops._EagerLossFunction
    assert torch.equal(torch.func.grad(loss_of)(probas), scores.grad)


def test_plain_eager_calls_skip_the_dispatcher_and_nothing_else_does(gen):
    """The operators' implementation runs directly for plain CPU tensors (no dispatch key
    has work there); the dispatcher still sees every call that it would change: a dispatch
    mode, the profiler (which then records the operator by name), ``torch.func``, meta and
    fake tensors. Loss and gradient are the same either way."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from lovasz_kernels import _ops

    probas, labels = _softmax_inputs(gen, dtype=torch.float32)
    assert not _ops._needs_dispatcher((probas, labels, None))
    assert _ops._needs_dispatcher((probas.to("meta"), labels, None))
    with FakeTensorMode() as fake_mode:
        fake = fake_mode.from_tensor(probas)
    assert _ops._needs_dispatcher((fake, labels, None))
    direct = _loss_and_grad(lovasz_softmax, probas, labels, backend="torch")

    class OperatorLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with OperatorLog() as log:
        assert _ops._needs_dispatcher((probas, labels, None))
        dispatched = _loss_and_grad(lovasz_softmax, probas, labels, backend="torch")
    assert "lovasz_kernels.lovasz_loss.default" in log.names
    with torch.profiler.profile() as profile:
        assert _ops._needs_dispatcher((probas, labels, None))
        profiled = _loss_and_grad(lovasz_softmax, probas, labels, backend="torch")
    assert "lovasz_kernels::lovasz_loss" in {event.name for event in profile.events()}
    for other in (dispatched, profiled):
        assert torch.equal(other[0], direct[0]) and torch.equal(other[1], direct[1])
    seen_under_vmap = []
    torch.func.vmap(lambda p: seen_under_vmap.append(_ops._needs_dispatcher((p,))) or p)(probas)
    assert seen_under_vmap == [True]


@pytest.mark.parametrize("per_image", [True, False], ids=["per image", "batch"])
def test_one_dense_chunk_signs_its_rows_into_the_gradient_without_a_copy(gen, per_image):
    """When one chunk holds every segment in the gradient's own layout, the extension's
    gradient rows, signed in place, are the loss's gradient (no second array of its size);
    a gradient that views a larger result (the distributed exact mode's local columns) is
    copied out rather than kept alive with it. Same values every way."""
    from lovasz_kernels import _plan
    from lovasz_kernels.backends import torch_eager

    batch = 2 if per_image else 1
    probas, labels = _softmax_inputs(gen, batch=batch, dtype=torch.float32)
    scores, flat_labels = probas.reshape(batch, 4, -1), labels.reshape(batch, -1)
    flat_labels[:, :4] = torch.arange(4)  # every class present: a dense plan
    plan = _plan.plan_segments(flat_labels, 4, "present", [], None, per_image, None, 0.0)
    assert plan.dense
    returned = []

    def extension(errors, fg):
        loss, grad = torch_eager.lovasz_extension(errors, fg)
        returned.append(grad)
        return loss, grad

    def padded_extension(errors, fg):  # the gradient as columns of a wider result
        loss, grad = torch_eager.lovasz_extension(errors, fg)
        wide = torch.zeros(grad.shape[0], grad.shape[1] + 3)
        wide[:, :grad.shape[1]] = grad
        returned.append(wide)
        return loss, wide[:, :grad.shape[1]]

    loss, grad = _plan.generic_lovasz_loss(extension, scores, flat_labels, plan)
    assert grad.data_ptr() == returned[-1].data_ptr() and grad.shape == scores.shape
    chunked_loss, chunked_grad = _plan.generic_lovasz_loss(
        extension, scores, flat_labels, plan.segments(0, 4))  # not dense: written, not taken
    assert chunked_grad.data_ptr() != returned[-1].data_ptr()
    padded_loss, padded_grad = _plan.generic_lovasz_loss(padded_extension, scores,
                                                         flat_labels, plan)
    assert padded_grad.untyped_storage().data_ptr() != returned[-1].untyped_storage().data_ptr()
    assert padded_grad.untyped_storage().nbytes() == padded_grad.numel() * 4
    assert torch.equal(loss, padded_loss) and torch.equal(grad, padded_grad)
    if batch == 1:  # the first image's segments are every segment
        assert torch.equal(loss, chunked_loss) and torch.equal(grad, chunked_grad)


def test_a_default_device_elsewhere_changes_nothing(backend, gen):
    """Under another default device (``torch.set_default_device`` or a ``torch.device``
    context), a loss of CPU tensors is computed and returned on the CPU, the same as
    without: no tensor of the call is made on the default device."""
    if backend == "triton":
        pytest.skip("triton's CPU tensors run in its interpreter: CUDA is its device")
    probas, labels = _softmax_inputs(gen, dtype=torch.float32)
    # 16900 pixels: the torch backend radix-sorts the padded row
    logits = torch.randn(1, 130, 130, generator=gen)
    masks = torch.rand(1, 130, 130, generator=gen) < 0.3
    expected = [_loss_and_grad(lovasz_softmax, probas, labels, backend=backend),
                _loss_and_grad(lovasz_hinge, logits, masks, backend=backend)]
    with torch.device("meta"):
        got = [_loss_and_grad(lovasz_softmax, probas, labels, backend=backend),
               _loss_and_grad(lovasz_hinge, logits, masks, backend=backend)]
    for (loss, grad), (ref_loss, ref_grad) in zip(got, expected):
        assert loss.device.type == grad.device.type == "cpu"
        assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)


def test_zero_weight_classes_are_not_sorted(gen, monkeypatch):
    """A class with weight 0 never reaches the kernel (the README promises it)."""
    shapes = []
    module = lovasz_kernels.backends.numpy_ref
    original = module.lovasz_extension
    monkeypatch.setattr(module, "lovasz_extension",
                        lambda e, f: shapes.append(tuple(e.shape)) or original(e, f))
    probas = torch.rand(2, 4, 4, 4, generator=gen).softmax(dim=1)
    labels = torch.arange(4).repeat(8).reshape(2, 4, 4)  # every class present
    lovasz_softmax(probas, labels, class_weights=[1.0, 0.0, 2.0, 0.0], backend="numpy")
    assert shapes[-1] == (2, 32)


# --------------------------------------------------------------------------------------------
# Multilabel: one binary problem per channel


@pytest.mark.parametrize("hinge", [True, False], ids=["hinge", "sigmoid"])
@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize(
    ("classes", "class_weights"),
    [("present", None), ("all", None), ([0, 2], None), ("present", [1.0, 0.0, 2.5])],
    ids=["present", "all", "list", "weights"],
)
@pytest.mark.parametrize("ignore_index", [None, 255])
def test_multilabel_matches_oracle(backend, gen, hinge, per_image, classes, class_weights,
                                   ignore_index):
    batch, channels = 3, 3
    labels = (torch.rand(batch, channels, 4, 5, generator=gen) < 0.4).long()
    labels[:, 1] = 0  # channel 1 has no foreground anywhere: "present" leaves it out
    labels[1, 2] = 0  # channel 2 absent from image 1 only
    if ignore_index is not None:
        labels[torch.rand(labels.shape, generator=gen) < 0.2] = ignore_index
        labels[2] = ignore_index  # an image with nothing valid
    if hinge:
        scores = torch.randn(batch, channels, 4, 5, generator=gen, dtype=torch.float64)
        loss_fn = lovasz_hinge
        kwargs = dict(multilabel=True)
    else:
        scores = torch.rand(batch, channels, 4, 5, generator=gen, dtype=torch.float64)
        loss_fn = lovasz_sigmoid
        kwargs = {}
    options = dict(classes=classes, per_image=per_image, ignore_index=ignore_index,
                   class_weights=class_weights)
    loss, grad = _loss_and_grad(loss_fn, scores, labels, backend=backend, **kwargs, **options)
    expected_loss, expected_grad = naive.lovasz_multilabel(
        scores.reshape(batch, channels, -1).tolist(), labels.reshape(batch, channels, -1).tolist(),
        hinge=hinge, **options)
    _assert_matches_oracle(loss, grad, expected_loss,
                           torch.tensor(expected_grad, dtype=torch.float64).reshape(scores.shape))


def test_multilabel_float_masks_and_from_logits(backend, gen):
    logits = torch.randn(2, 3, 6, 5, generator=gen, dtype=torch.float64)
    masks = torch.rand(2, 3, 6, 5, generator=gen) < 0.5
    expected = lovasz_sigmoid(logits.sigmoid(), masks.long(), backend=backend)
    assert lovasz_sigmoid(logits, masks.float(), from_logits=True, backend=backend).item() == (
        pytest.approx(expected.item(), rel=1e-12))


def test_hinge_without_multilabel_pools_the_channels(gen):
    """The default keeps segmentation_models_pytorch's multilabel convention: (B, C, ...)
    logits and masks pooled into one binary problem per image."""
    logits = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    masks = (torch.rand(2, 3, 4, 5, generator=gen) < 0.5).long()
    pooled = lovasz_hinge(logits, masks)
    assert pooled.item() == pytest.approx(
        lovasz_hinge(logits.reshape(2, -1), masks.reshape(2, -1)).item(), rel=1e-12)
    assert lovasz_hinge(logits, masks, multilabel=True).item() != pytest.approx(pooled.item())
    with pytest.raises(ValueError, match="pass multilabel=True"):
        lovasz_hinge(logits, masks, classes="all")
