"""The losses in modern training loops: torch.compile, torch.func, double backward,
TorchScript, value checks inside the operator, and calls with no host synchronisation.

Every comparison is against eager, for every CPU backend (triton through its interpreter where
a call is cheap). Compiled graphs are small (one conv and the loss) so Inductor's codegen stays
in seconds.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import lovasz_kernels
from lovasz_kernels import (
    LovaszHingeLoss,
    LovaszSigmoidLoss,
    LovaszSoftmaxLoss,
    _plan,
    _torch_sort,
    lovasz_extension,
    lovasz_grad,
    lovasz_hinge,
    lovasz_sigmoid,
    lovasz_softmax,
    set_validate_values,
)

TOLERANCE = dict(rtol=1e-6, atol=1e-6)
# TorchScript is deprecated in favour of torch.compile, and says so when a module is scripted
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(gen, classes=4, batch=2, side=6):
    images = torch.randn(batch, 3, side, side + 1, generator=gen)
    labels = torch.randint(0, classes, (batch, side, side + 1), generator=gen)
    labels[0, :2] = 255
    labels[1, :, :3] = 0
    return images, labels


def _model(classes=4):
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, classes, 3, padding=1)


def _value_and_grad(loss_fn, scores, labels):
    """A loss function's value and its gradient w.r.t. a fresh copy of ``scores``."""
    x = scores.clone().requires_grad_()
    value = loss_fn(x, labels)
    value.backward()
    return value.detach(), x.grad


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------------------------
# torch.compile


def test_compiled_training_step_matches_eager(backend, gen):
    """A whole step (model, loss, backward) under torch.compile's default mode."""
    images, labels = _inputs(gen)
    model = _model()

    def step(images, labels):
        model.zero_grad()
        loss = lovasz_softmax(model(images), labels, from_logits=True, ignore_index=255,
                              backend=backend)
        loss.backward()
        return loss

    eager_loss = step(images, labels)
    eager_grads = _grads(model)
    compiled = torch.compile(step)
    for _ in range(2):  # the second call runs the cached graph
        compiled_loss = compiled(images, labels)
        torch.testing.assert_close(compiled_loss, eager_loss, **TOLERANCE)
        for got, expected in zip(_grads(model), eager_grads):
            torch.testing.assert_close(got, expected, **TOLERANCE)


_SOFTMAX_OPTIONS = [
    dict(),
    dict(from_logits=True),
    dict(from_logits=True, ignore_index=255),
    dict(ignore_index=255, per_image=True),
    dict(from_logits=True, classes="all"),
    dict(from_logits=True, classes=[0, 2], per_image=True, ignore_index=255),
    dict(from_logits=True, class_weights=[0.5, 0.0, 2.0, 1.0]),
    dict(from_logits=True, class_weights=torch.tensor([1.0, 2.0, 0.0, 3.0]), per_image=True),
]


@pytest.mark.parametrize("options", _SOFTMAX_OPTIONS, ids=lambda o: str(o)[:60])
def test_fullgraph_softmax_matches_eager(backend, gen, options):
    """fullgraph=True: no graph break anywhere in our code, the eager loss and gradient."""
    images, labels = _inputs(gen)
    if "ignore_index" not in options:
        labels = labels.clamp(max=3)
    model = _model()
    from_logits = options.get("from_logits", False)

    def loss_of(images):
        scores = model(images)
        scores = scores if from_logits else scores.softmax(dim=1)
        return lovasz_softmax(scores, labels, backend=backend, **options)

    _assert_compiled_matches_eager(loss_of, images, model)


@pytest.mark.parametrize("per_image", [True, False])
def test_fullgraph_hinge_matches_eager(backend, gen, per_image):
    images, labels = _inputs(gen, classes=2)
    model = _model(classes=1)

    def loss_of(images):
        return lovasz_hinge(model(images), labels, per_image=per_image, ignore_index=255,
                            backend=backend)

    _assert_compiled_matches_eager(loss_of, images, model)


@pytest.mark.parametrize("from_logits", [True, False])
def test_fullgraph_multilabel_matches_eager(backend, gen, from_logits):
    images, _ = _inputs(gen)
    masks = torch.rand(2, 4, 6, 7, generator=gen) < 0.4
    model = _model()

    def loss_of(images):
        scores = model(images)
        sigmoid = lovasz_sigmoid(scores if from_logits else scores.sigmoid(), masks,
                                 from_logits=from_logits, per_image=True, backend=backend)
        return sigmoid + lovasz_hinge(scores, masks, multilabel=True, backend=backend)

    _assert_compiled_matches_eager(loss_of, images, model)


def _assert_compiled_matches_eager(loss_of, images, model):
    images = images.clone().requires_grad_()
    eager = loss_of(images)
    (eager_grad,) = torch.autograd.grad(eager, images)
    compiled = torch.compile(loss_of, fullgraph=True)
    got = compiled(images)
    (got_grad,) = torch.autograd.grad(got, images)
    torch.testing.assert_close(got, eager, **TOLERANCE)
    torch.testing.assert_close(got_grad, eager_grad, **TOLERANCE)
    explained = torch._dynamo.explain(loss_of)(images)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_kernel_api_compiles_fullgraph(backend, gen):
    errors = torch.randn(3, 17, generator=gen, dtype=torch.float64, requires_grad=True)
    fg = torch.rand(3, 17, generator=gen) < 0.4

    def total(errors):
        loss, _ = lovasz_extension(errors * 2, fg, backend=backend)
        return loss.sum() + lovasz_grad(fg).sum()

    eager = total(errors)
    (eager_grad,) = torch.autograd.grad(eager, errors)
    got = torch.compile(total, fullgraph=True)(errors)
    (got_grad,) = torch.autograd.grad(got, errors)
    torch.testing.assert_close(got, eager, **TOLERANCE)
    torch.testing.assert_close(got_grad, eager_grad, **TOLERANCE)


@pytest.mark.parametrize(
    ("make_bad", "message"),
    [
        (lambda p, y: (p, y.masked_fill(y == 1, 7)), r"labels must be in \[0, 4\)"),
        (lambda p, y: (p.masked_fill(y[:, None] == 2, float("nan")), y), r"probas must be finite"),
        (lambda p, y: (p * 2, y), r"probas must lie in \[0, 1\]"),
    ],
    ids=["label range", "nan", "not probabilities"],
)
def test_value_checks_run_inside_the_compiled_graph(gen, make_bad, message):
    """Checks that read values live in the operator: same ValueError, eager or compiled."""
    images, labels = _inputs(gen)
    probas = _model()(images).softmax(dim=1).detach()
    probas, labels = make_bad(probas, labels)
    with pytest.raises(ValueError, match=message):
        lovasz_softmax(probas, labels, ignore_index=255)
    compiled = torch.compile(lambda p: lovasz_softmax(p, labels, ignore_index=255),
                             fullgraph=True)
    with pytest.raises(ValueError, match=message):
        compiled(probas)
    set_validate_values(False)
    try:
        compiled(probas)  # switched off: the same graph runs without them
    finally:
        set_validate_values(True)


def test_autocast_logits_give_a_float32_loss(backend, gen):
    """Under autocast the model's bfloat16 logits go through a float32 softmax: a float32
    loss, float32 parameter gradients, close to the loss of the float32 model."""
    images, labels = _inputs(gen)
    model = _model()
    reference = lovasz_softmax(model(images), labels, from_logits=True, ignore_index=255,
                               backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
        assert logits.dtype == torch.bfloat16
        loss = lovasz_softmax(logits, labels, from_logits=True, ignore_index=255,
                              backend=backend)
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())
    assert abs(loss.item() - reference.item()) < 0.05


# --------------------------------------------------------------------------------------------
# torch.func and double backward


def test_func_grad_matches_autograd(backend, gen):
    probas = _model()(_inputs(gen)[0]).softmax(dim=1).detach()
    labels = _inputs(gen)[1]
    logits = torch.randn(2, 6, 7, generator=gen)
    hinge_labels = (labels == 1).long()
    for fn, x in (
        (lambda p: lovasz_softmax(p, labels, ignore_index=255, backend=backend), probas),
        (lambda p: lovasz_softmax(p, labels, per_image=True, ignore_index=255,
                                  backend=backend), probas),
        (lambda z: lovasz_hinge(z, hinge_labels, backend=backend), logits),
        (lambda e: lovasz_extension(e, hinge_labels.reshape(2, -1).bool(),
                                    backend=backend)[0].sum(), logits.reshape(2, -1)),
    ):
        expected_x = x.clone().requires_grad_()
        (expected,) = torch.autograd.grad(fn(expected_x), expected_x)
        torch.testing.assert_close(torch.func.grad(fn)(x), expected, **TOLERANCE)


def test_vmap_runs_each_slice(gen):
    """vmap maps the loss over a leading dimension (one operator call per slice), also for
    per-sample gradients (vmap of grad)."""
    probas = torch.randn(3, 2, 4, 5, 6, generator=gen).softmax(dim=2)
    labels = torch.randint(0, 4, (3, 2, 5, 6), generator=gen)
    mapped = torch.func.vmap(lambda p, y: lovasz_softmax(p, y, backend="torch"))(probas, labels)
    looped = torch.stack([lovasz_softmax(p, y, backend="torch") for p, y in zip(probas, labels)])
    torch.testing.assert_close(mapped, looped)
    per_sample = torch.func.vmap(torch.func.grad(
        lambda p, y: lovasz_softmax(p, y, backend="torch")))(probas, labels)
    for i, (p, y) in enumerate(zip(probas, labels)):
        expected = torch.func.grad(lambda p, y=y: lovasz_softmax(p, y, backend="torch"))(p)
        torch.testing.assert_close(per_sample[i], expected)


def _forward_mode_cases(gen, backend, dtype=torch.float64):
    """(name, function of one tensor, the tensor) for each kind of call."""
    labels = torch.randint(0, 4, (2, 5, 6), generator=gen)
    labels[0, :2] = 255
    probas = torch.rand(2, 4, 5, 6, generator=gen, dtype=torch.float64).softmax(dim=1)
    logits = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    masks = (torch.rand(2, 3, 5, 6, generator=gen) < 0.4).long()
    fg = torch.rand(3, 20, generator=gen) < 0.4
    return [
        ("softmax", lambda p: lovasz_softmax(p, labels, ignore_index=255, backend=backend),
         probas.to(dtype)),
        ("softmax per image", lambda p: lovasz_softmax(
            p, labels, per_image=True, classes="all", ignore_index=255, backend=backend),
         probas.to(dtype)),
        ("hinge", lambda z: lovasz_hinge(z, (labels == 1).long(), per_image=False,
                                         backend=backend), logits.to(dtype)),
        ("sigmoid", lambda z: lovasz_sigmoid(z, masks, from_logits=True, backend=backend),
         torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64).to(dtype)),
        ("extension", lambda e: lovasz_extension(e, fg, backend=backend)[0],
         torch.randn(3, 20, generator=gen, dtype=torch.float64).to(dtype)),
        ("softmax, one loss per image", lambda p: lovasz_softmax(
            p, labels, per_image=True, ignore_index=255, backend=backend, reduction="none"),
         probas.to(dtype)),
    ]


def test_forward_mode_is_the_gradient_times_the_tangent(backend, gen):
    """torch.func.jvp, torch.autograd.forward_ad and jacfwd give <gradient, tangent> (per row
    for the extension), and the Jacobian is the gradient: a tangent is never dropped to 0."""
    from torch.autograd import forward_ad

    for name, fn, x in _forward_mode_cases(gen, backend):
        tangent = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        expected_x = x.clone().requires_grad_()
        value = fn(expected_x)
        (grad,) = torch.autograd.grad(value.sum(), expected_x)
        expected = (grad * tangent).flatten(value.dim()).sum(-1)
        assert expected.abs().min() > 1e-3, name  # a zero tangent cannot pass
        primal, jvp = torch.func.jvp(fn, (x,), (tangent,))
        torch.testing.assert_close(primal, value.detach(), **TOLERANCE, msg=name)
        torch.testing.assert_close(jvp, expected, **TOLERANCE, msg=name)
        with forward_ad.dual_level():
            dual = fn(forward_ad.make_dual(x, tangent))
            torch.testing.assert_close(forward_ad.unpack_dual(dual).tangent, expected,
                                       **TOLERANCE, msg=name)
        if value.dim() == 0:
            torch.testing.assert_close(torch.func.jacfwd(fn)(x), grad, **TOLERANCE, msg=name)


def test_the_loss_operator_takes_its_group_name_where_forward_mode_reads_it():
    import inspect

    from lovasz_kernels import _ops

    parameters = list(inspect.signature(_ops._lovasz_loss_impl).parameters)
    assert parameters[_ops._LOSS_GROUP_ARGUMENT] == "group_name"


def test_forward_mode_of_16_bit_scores_is_in_the_loss_dtype(gen):
    """The tangent has the loss's dtype (float32 for 16-bit scores) and is the float32 saved
    gradient times the tangent (closer than the gradient rounded to 16 bits)."""
    for name, fn, x in _forward_mode_cases(gen, "torch", dtype=torch.bfloat16):
        tangent = torch.randn(x.shape, generator=gen).to(x.dtype)
        primal, jvp = torch.func.jvp(fn, (x,), (tangent,))
        assert jvp.dtype == primal.dtype == torch.float32, name
        wide = x.float().requires_grad_()
        value = fn(wide)
        (grad,) = torch.autograd.grad(value.sum(), wide)
        expected = (grad * tangent.float()).flatten(value.dim()).sum(-1)
        torch.testing.assert_close(jvp, expected, rtol=2e-2, atol=2e-2, msg=name)


def test_under_torch_compile_vmap_works_and_jvp_gives_zero_as_the_readme_says(gen):
    """The README's limits, pinned so that a PyTorch that lifts them fails here and the README
    is updated: inside torch.compile, vmap of the loss is the eager result, and a jvp comes out
    0 (Dynamo traces the bare custom operator, whose tangent PyTorch drops)."""
    probas = torch.randn(3, 2, 4, 5, 6, generator=gen).softmax(dim=2)
    labels = torch.randint(0, 4, (3, 2, 5, 6), generator=gen)

    def mapped(p, y):
        return torch.func.vmap(lambda a, b: lovasz_softmax(a, b, backend="torch"))(p, y)

    torch.testing.assert_close(torch.compile(mapped, fullgraph=True)(probas, labels),
                               mapped(probas, labels))
    torch._dynamo.reset()
    tangent = torch.randn(probas[0].shape, generator=gen)

    def tangent_of(p, t):
        return torch.func.jvp(lambda a: lovasz_softmax(a, labels[0], backend="torch"),
                              (p,), (t,))[1]

    assert tangent_of(probas[0], tangent) != 0
    assert torch.compile(tangent_of)(probas[0], tangent) == 0


def test_hessian_by_forward_over_reverse_is_zero(backend, gen):
    z = torch.randn(1, 5, 6, generator=gen, dtype=torch.float64)
    masks = (torch.rand(1, 5, 6, generator=gen) < 0.4).long()
    hessian = torch.func.hessian(lambda a: lovasz_hinge(a, masks, backend=backend))(z)
    assert hessian.shape == (1, 5, 6, 1, 5, 6) and not hessian.any()


@pytest.mark.parametrize("loss", ["hinge", "softmax", "extension"])
def test_second_derivative_is_zero(backend, gen, loss):
    """Piecewise linear: double backward (gradient penalties) returns zeros, no exception."""
    labels = torch.randint(0, 3, (2, 5, 6), generator=gen)
    if loss == "hinge":
        x = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
        value = lovasz_hinge(x, (labels == 1).long(), backend=backend)
    elif loss == "softmax":
        x = torch.rand(2, 3, 5, 6, generator=gen, dtype=torch.float64)
        x = (x / x.sum(dim=1, keepdim=True)).requires_grad_()
        value = lovasz_softmax(x, labels, backend=backend)
    else:
        x = torch.randn(2, 30, generator=gen, dtype=torch.float64, requires_grad=True)
        value = lovasz_extension(x, labels.reshape(2, -1) == 1, backend=backend)[0].sum()
    (grad,) = torch.autograd.grad(value, x, create_graph=True)
    assert grad.requires_grad
    penalty = (grad ** 2).sum()
    (second,) = torch.autograd.grad(penalty, x)
    assert torch.equal(second, torch.zeros_like(x))
    hessian_row = torch.autograd.functional.hessian(
        lambda z: lovasz_hinge(z, (labels[:1] == 1).long(), backend=backend),
        torch.randn(1, 5, 6, generator=gen, dtype=torch.float64))
    assert not hessian_row.any()


# --------------------------------------------------------------------------------------------
# TorchScript


@pytest.mark.parametrize(
    "module",
    [
        lambda b: LovaszSoftmaxLoss(from_logits=True, ignore_index=255, backend=b),
        lambda b: LovaszSoftmaxLoss(classes=[0, 3], per_image=True, class_weights=[1, 2, 0, 4],
                                    ignore_index=255, from_logits=True, backend=b),
        lambda b: LovaszHingeLoss(per_image=False, ignore_index=255, backend=b),
        lambda b: LovaszHingeLoss(multilabel=True, classes="all", ignore_index=255, backend=b),
        lambda b: LovaszSigmoidLoss(from_logits=True, per_image=True, ignore_index=255,
                                    class_weights=[1, 0, 2, 1], backend=b),
    ],
    ids=["softmax", "softmax options", "hinge", "multilabel hinge", "sigmoid"],
)
def test_modules_script_and_match_eager(backend, gen, module):
    criterion = module(backend)
    scripted = torch.jit.script(criterion)
    images, labels = _inputs(gen)
    multilabel = isinstance(criterion, LovaszSigmoidLoss) or getattr(criterion, "multilabel",
                                                                         False)
    classes = 1 if isinstance(criterion, LovaszHingeLoss) and not multilabel else 4
    if classes == 1:
        labels = torch.where(labels == 255, labels, labels % 2)
    if multilabel:  # one mask per channel
        labels = (torch.rand(labels.shape[0], 4, *labels.shape[1:], generator=gen) < 0.4).long()
        labels[:, :, 0] = 255
    scores = _model(classes)(images).detach()
    eager, from_script = (_value_and_grad(fn, scores, labels) for fn in (criterion, scripted))
    torch.testing.assert_close(from_script[0], eager[0], **TOLERANCE)
    torch.testing.assert_close(from_script[1], eager[1], **TOLERANCE)


@pytest.mark.parametrize(
    "module",
    [
        lambda: LovaszSoftmaxLoss(per_image=True, ignore_index=255, backend="torch"),
        lambda: LovaszHingeLoss(ignore_index=255, backend="torch"),
    ],
    ids=["softmax", "hinge"],
)
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the shape checks: constants
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
def test_modules_trace_and_match_eager_on_other_inputs(gen, module):
    """``torch.jit.trace`` records the operator (its sanity check, which traces twice and
    compares, passes), and the trace gives eager's loss and gradient on inputs other than
    the traced ones: which classes are present is decided inside the operator."""
    criterion = module()
    hinge = isinstance(criterion, LovaszHingeLoss)

    def inputs():
        labels = torch.randint(0, 2 if hinge else 4, (2, 9, 9), generator=gen)
        labels[0, :2] = 255
        if not hinge:
            labels[1][labels[1] == 3] = 0  # class 3 absent from image 1
            scores = torch.randn(2, 4, 9, 9, generator=gen).softmax(dim=1)
        else:
            scores = torch.randn(2, 9, 9, generator=gen)
        return scores, labels

    traced = torch.jit.trace(criterion, inputs())
    scores, labels = inputs()
    eager, from_trace = (_value_and_grad(fn, scores, labels) for fn in (criterion, traced))
    assert torch.equal(from_trace[0], eager[0]) and torch.equal(from_trace[1], eager[1])
    errors = torch.randn(3, 50, generator=gen)
    fg = torch.rand(3, 50, generator=gen) < 0.4
    traced_extension = torch.jit.trace(
        lambda e, f: lovasz_extension(e, f, backend="torch")[0], (errors, fg))
    assert torch.equal(traced_extension(errors * 2, ~fg),
                       lovasz_extension(errors * 2, ~fg, backend="torch")[0])


# --------------------------------------------------------------------------------------------
# No host synchronisation


@contextlib.contextmanager
def _host_reads_forbidden():
    """Make every Python-level device-to-host read raise (a GPU synchronisation)."""
    saved = {}

    def forbidden(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name}")
        return raiser

    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "numpy"):
        saved[name] = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, forbidden(name))
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


@pytest.fixture
def device_path(monkeypatch):
    """The plan as a GPU builds it (every segment listed, with weights), value checks off,
    and the torch backend's sort a GPU's: the comparison sort (the CPU's radix and packed
    sorts, and numpy after the packed one, are chosen by what was measured on this
    machine)."""
    monkeypatch.setitem(_plan._SETTINGS, "read_values_on_cpu", False)
    set_validate_values(False)
    with _torch_sort.method_forced(_torch_sort.COMPARED):
        yield
    set_validate_values(True)


_SYNC_FREE_BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("sync_free_backend", _SYNC_FREE_BACKENDS)
@pytest.mark.parametrize(
    "options",
    [dict(), dict(per_image=True, ignore_index=255), dict(classes=[0, 2]),
     dict(classes="all", class_weights=[1.0, 0.0, 2.0, 1.0])],
    ids=str,
)
def test_gpu_path_makes_no_host_synchronisation(gen, device_path, sync_free_backend, options):
    backend = lovasz_kernels.get_backend(sync_free_backend)
    if "cpu" not in backend.supported_devices() or not backend.availability()[0]:
        pytest.skip(f"{sync_free_backend} does not run on CPU tensors here")
    probas = torch.randn(2, 4, 5, 6, generator=gen).softmax(dim=1).requires_grad_()
    labels = torch.randint(0, 3, (2, 5, 6), generator=gen)  # class 3 absent
    labels[1, 0] = 255
    if "ignore_index" not in options:
        labels[1, 0] = 1
    weights = options.get("class_weights")
    if weights is not None:  # a tensor built before: a list is copied to the device per call
        options = dict(options, class_weights=torch.tensor(weights, dtype=torch.float64))
    with _host_reads_forbidden():
        loss = lovasz_softmax(probas, labels, backend=sync_free_backend, **options)
        loss.backward()
        hinge = lovasz_hinge(probas[:, 0], labels.clamp(max=1), backend=sync_free_backend)
    set_validate_values(True)
    _plan._SETTINGS["read_values_on_cpu"] = True
    expected = probas.detach().clone().requires_grad_()
    expected_loss = lovasz_softmax(expected, labels, backend="numpy", **options)
    expected_loss.backward()
    torch.testing.assert_close(loss.detach(), expected_loss.detach(), **TOLERANCE)
    torch.testing.assert_close(probas.grad, expected.grad, **TOLERANCE)
    torch.testing.assert_close(
        hinge, lovasz_hinge(probas[:, 0].detach(), labels.clamp(max=1), backend="numpy"),
        **TOLERANCE)


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@_CUDA
@pytest.mark.parametrize("cuda_backend", ["triton", "torch"])
@pytest.mark.parametrize("per_image", [False, True])
def test_cuda_loss_and_backward_never_synchronise(cuda_backend, per_image):
    """With value checks off, a CUDA call makes no host synchronisation (CUDA's own sync
    debug mode turns any into an error)."""
    backend = lovasz_kernels.get_backend(cuda_backend)
    if not backend.availability()[0]:
        pytest.skip(backend.availability()[1])
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(2, 5, 64, 64, device="cuda", generator=gen, requires_grad=True)
    labels = torch.randint(0, 4, (2, 64, 64), device="cuda", generator=gen)
    labels[0, :3] = 255
    expected = lovasz_softmax(logits, labels, from_logits=True, ignore_index=255,
                              per_image=per_image, backend=cuda_backend)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.cuda.synchronize()
    set_validate_values(False)
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = lovasz_softmax(logits, labels, from_logits=True, ignore_index=255,
                              per_image=per_image, backend=cuda_backend)
        (grad,) = torch.autograd.grad(loss, logits)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        set_validate_values(True)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6)


@_CUDA
def test_cuda_graph_capture_replays_the_loss():
    """Sync-free, so a CUDA graph can capture the loss operator and replay it."""
    backend = lovasz_kernels.get_backend("triton")
    if not backend.availability()[0]:
        pytest.skip(backend.availability()[1])
    gen = torch.Generator(device="cuda").manual_seed(1)
    probas = torch.randn(2, 5, 64, 64, device="cuda", generator=gen).softmax(dim=1)
    labels = torch.randint(0, 5, (2, 64, 64), device="cuda", generator=gen)
    expected_loss, expected_grad = torch.ops.lovasz_kernels.lovasz_loss(
        probas, labels, None, "present", [], False, None, "probas", "triton", "", "exact",
        "65536")
    set_validate_values(False)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up: compile and autotune outside the capture
                torch.ops.lovasz_kernels.lovasz_loss(
                    probas, labels, None, "present", [], False, None, "probas", "triton", "",
                    "exact", "65536")
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss, grad = torch.ops.lovasz_kernels.lovasz_loss(
                probas, labels, None, "present", [], False, None, "probas", "triton", "",
                "exact", "65536")
        graph.replay()
        torch.cuda.synchronize()
    finally:
        set_validate_values(True)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("where", ["FakeTensorMode", "meta"])
def test_fake_and_meta_tensors_give_shapes_forward_and_backward(where):
    """As memory and FLOP estimators run a training step: no value is read, not even the
    upstream gradient's (a fake tensor has none), and the shapes and dtypes are eager's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lovasz_kernels.optim import lovasz_hinge_moreau

    mode = FakeTensorMode() if where == "FakeTensorMode" else contextlib.nullcontext()
    device = "meta" if where == "meta" else "cpu"
    with mode:
        logits = torch.randn(2, 4, 5, 6, device=device, requires_grad=True)
        labels = torch.randint(0, 4, (2, 5, 6), device=device)
        calls = [
            lambda: lovasz_softmax(logits, labels, from_logits=True),
            lambda: lovasz_hinge(logits[:, 0], labels > 1),
            lambda: lovasz_softmax(logits.half(), labels, from_logits=True, per_image=True,
                                   reduction="none").sum(),
            lambda: lovasz_hinge_moreau(logits[:, 0], labels > 1, 0.3),
        ]
        for call in calls:
            loss = call()
            assert loss.shape == () and loss.dtype == torch.float32
            loss.backward()
            assert logits.grad.shape == logits.shape and logits.grad.dtype == torch.float32
            logits.grad = None

