"""The proximal operator of the Lovász hinge and its Moreau envelope (lovasz_kernels.optim)."""

from __future__ import annotations

import importlib
import random
import sys
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("numba", reason="the prox kernels need numba")

from lovasz_kernels import lovasz_hinge  # noqa: E402
from lovasz_kernels.optim import (  # noqa: E402
    GreedyProx,
    lovasz_hinge_moreau,
    prox_lovasz_hinge,
)
from reference.brute_prox import brute_prox, prox_certificate  # noqa: E402
from tests.helpers import tie_free_margins  # noqa: E402

# values on a coarse grid make ties (between labels, and with the margin-0 boundary: a logit
# of ±1 is margin 0) frequent
_GRID = [-2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5]


def _tiny_case(rng: random.Random, num_pixels: int, kind: str) -> tuple[list, list]:
    logits = [rng.choice(_GRID) if rng.random() < 0.6 else rng.uniform(-2, 2)
              for _ in range(num_pixels)]
    if kind == "all_fg":
        labels = [1] * num_pixels
    elif kind == "all_bg":
        labels = [0] * num_pixels
    elif kind == "no_margin":  # every margin ≤ 0: the prox is the identity
        labels = [rng.choice([0, 1]) for _ in range(num_pixels)]
        logits = [(1.0 + rng.choice([0.0, 0.5])) * (1 if y else -1) for y in labels]
    else:
        labels = [rng.choice([0, 1, 1, 0, None]) for _ in range(num_pixels)]
    return logits, labels


def _fast_prox_row(logits: list, labels: list, lam: float, method: str = "exact") -> list:
    """One segment through the public function (ignored pixels as label 255)."""
    logits_t = torch.tensor([logits], dtype=torch.float64)
    labels_t = torch.tensor([[255 if y is None else y for y in labels]])
    out = prox_lovasz_hinge(logits_t, labels_t, lam, per_image=False, ignore_index=255,
                            method=method)
    if method == "greedy":
        out = out.prox
    return out[0].tolist()


@pytest.mark.parametrize("kind", ["mixed", "all_fg", "all_bg", "no_margin"])
def test_exact_prox_is_certified_and_matches_brute_force(kind):
    rng = random.Random(kind)
    for trial in range(60):
        num_pixels = 1 + trial % 8
        logits, labels = _tiny_case(rng, num_pixels, kind)
        lam = rng.choice([1e-3, 0.05, 0.3, 1.0, 4.0])
        fast = _fast_prox_row(logits, labels, lam)
        certificate = prox_certificate(logits, labels, fast, lam)
        assert certificate["negative_s"] <= 1e-9, (logits, labels, lam, certificate)
        assert certificate["polytope"] <= 1e-9, (logits, labels, lam, certificate)
        assert certificate["complementarity"] <= 1e-9, (logits, labels, lam, certificate)
        assert certificate["ignored"] == 0.0
        slow = brute_prox(logits, labels, lam)
        worst = max(abs(a - b) for a, b in zip(fast, slow))
        assert worst <= 1e-9, (logits, labels, lam, fast, slow)
        if kind == "no_margin":
            assert fast == logits


def test_per_image_prox_uses_lam_over_counted_images():
    rng = random.Random(7)
    rows = [_tiny_case(rng, 6, "mixed") for _ in range(3)]
    rows.append(([0.3, -0.1, 2.0, 0.0, 1.0, -1.0], [None] * 6))  # no valid pixel: not counted
    logits = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    labels = torch.tensor([[255 if y is None else y for y in r[1]] for r in rows])
    lam = 0.9
    out = prox_lovasz_hinge(logits, labels, lam, per_image=True, ignore_index=255)
    counted = sum(any(y is not None for y in r[1]) for r in rows)
    for row, (row_logits, row_labels) in enumerate(rows):
        expected = brute_prox(row_logits, row_labels, lam / counted)
        assert out[row].tolist() == pytest.approx(expected, abs=1e-9)


def test_prox_keeps_shape_dtype_ignored_and_margin_free_pixels(gen):
    logits = torch.randn(2, 1, 9, 7, generator=gen) * 2
    labels = (torch.rand(2, 9, 7, generator=gen) > 0.6).long()
    labels[0, :3] = 255
    out = prox_lovasz_hinge(logits, labels, 0.5, ignore_index=255)
    assert out.shape == logits.shape and out.dtype == logits.dtype
    assert not out.requires_grad
    ignored = (labels == 255).unsqueeze(1)
    assert torch.equal(out[ignored], logits[ignored])
    sign = (2 * labels - 1).unsqueeze(1).float()
    margin_free = (1 - sign * logits <= 0) & ~ignored
    assert bool(margin_free.any())
    assert torch.equal(out[margin_free], logits[margin_free])
    # the prox of a convex loss moves every margin towards 0 and never past it
    margins, new_margins = 1 - sign * logits, 1 - sign * out
    moved = ~margin_free & ~ignored
    assert bool((new_margins[moved] <= margins[moved] + 1e-6).all())
    assert bool((new_margins[moved] >= -1e-6).all())


@pytest.mark.parametrize("per_image", [True, False])
def test_small_lam_direction_is_the_hinge_gradient(gen, per_image):
    logits = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)  # tie-free
    labels = (torch.rand(3, 5, 7, generator=gen) > 0.5).long()
    labels[1, 0] = 255
    lam = 1e-7
    prox = prox_lovasz_hinge(logits, labels, lam, per_image=per_image, ignore_index=255)
    direction = (logits - prox) / lam
    scores = logits.clone().requires_grad_()
    lovasz_hinge(scores, labels, per_image=per_image, ignore_index=255,
                 backend="numpy").backward()
    torch.testing.assert_close(direction, scores.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["exact", "greedy"])
@pytest.mark.parametrize("per_image", [True, False])
def test_tiny_lam_direction_and_envelope_keep_full_precision(gen, per_image, method):
    """The direction (F − prox)/λ must not be formed by subtracting the prox from F: the
    difference keeps only the digits of F that λ moves (3 left at λ = 1e-8 on 65536
    pixels, none at 1e-12, and at 1e-300 an envelope of ~1e268)."""
    logits, labels = tie_free_margins(gen, (2, 128, 256))
    scores = logits.clone().requires_grad_()
    hinge = lovasz_hinge(scores, labels, per_image=per_image, backend="numpy")
    hinge.backward()
    for lam in (1e-8, 1e-10, 1e-12, 1e-100, 1e-300):
        point = logits.clone().requires_grad_()
        envelope = lovasz_hinge_moreau(point, labels, lam, per_image=per_image, method=method)
        envelope.backward()
        error = float((point.grad - scores.grad).abs().max() / scores.grad.abs().max())
        assert error <= 1e-12, (lam, error)
        # below the hinge (F is a candidate of the minimum) by about λ‖gradient‖²/2, that is
        # equal to it up to the rounding of two sums of 65536 terms in different orders
        value, at_input = float(envelope.detach()), float(hinge.detach())
        assert value <= at_input * (1 + 1e-13), (lam, value, at_input)
        assert value == pytest.approx(at_input, rel=1e-13), lam


@pytest.mark.parametrize(("method", "max_steps"), [("exact", None), ("greedy", None),
                                                   ("greedy", 40)])
def test_direction_equals_the_difference_where_that_is_accurate(gen, method, max_steps):
    """At λ of order 1, F − prox loses nothing: the direction the kernels build from the
    shifts must equal it, with pooled groups, margins clipped at 0, ties, ignored pixels
    and a greedy path stopped early."""
    logits = torch.randn(3, 30, 40, generator=gen, dtype=torch.float64)
    logits[1] = torch.round(logits[1] * 4) / 4  # many ties, inside and across labels
    labels = (torch.rand(3, 30, 40, generator=gen) > 0.6).long()
    labels[2, :5] = 255
    for lam in (0.05, 1.0, 30.0, 2000.0):
        point = logits.clone().requires_grad_()
        options = {"ignore_index": 255, "method": method, "max_steps": max_steps}
        lovasz_hinge_moreau(point, labels, lam, **options).backward()
        prox = prox_lovasz_hinge(logits, labels, lam, **options)
        if method == "greedy":
            prox = prox.prox
        torch.testing.assert_close(point.grad, (logits - prox) / lam, rtol=0, atol=1e-12)


def test_lam_below_what_float64_resolves_is_rejected():
    logits = torch.tensor([[0.5, -0.2], [0.3, 0.1]], dtype=torch.float64)
    labels = torch.tensor([[1, 0], [0, 1]])
    # each of the two images takes lam / 2, which must stay a normal float64
    with pytest.raises(ValueError, match="lam must be at least 4.45.*got 4e-308"):
        lovasz_hinge_moreau(logits, labels, 4e-308)
    with pytest.raises(ValueError, match="lam must be at least"):
        prox_lovasz_hinge(logits, labels, 1e-320, per_image=False)
    value = lovasz_hinge_moreau(logits, labels, 4e-308, per_image=False)
    assert float(value) == float(lovasz_hinge(logits, labels, per_image=False))


def test_lam_as_a_one_element_tensor(gen):
    """λ may be a one-element tensor (a schedule's value): the same prox as the number; a
    bool or a longer tensor is refused."""
    logits = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    labels = (torch.rand(2, 4, 5, generator=gen) > 0.5).long()
    expected = prox_lovasz_hinge(logits, labels, 2.0)
    for lam in (torch.tensor(2.0), torch.tensor([2.0]), torch.tensor([[2]])):
        assert torch.equal(prox_lovasz_hinge(logits, labels, lam), expected), lam
    for bad in (torch.tensor(True), torch.tensor([1.0, 2.0])):
        with pytest.raises(TypeError, match="lam must be a positive number; got Tensor"):
            prox_lovasz_hinge(logits, labels, bad)


def test_moreau_envelope_value_and_gradient(gen):
    logits = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    labels = (torch.rand(2, 4, 5, generator=gen) > 0.5).long()
    labels[0, 0, :2] = 255
    lam = 0.3

    def envelope(x):
        return lovasz_hinge_moreau(x, labels, lam, ignore_index=255)

    # gradient (F − prox)/λ against central finite differences (the envelope is C¹)
    torch.autograd.gradcheck(envelope, (logits.clone().requires_grad_(),), eps=1e-6,
                             atol=1e-6, rtol=1e-4)
    scores = logits.clone().requires_grad_()
    value = envelope(scores)
    value.backward()
    prox = prox_lovasz_hinge(logits, labels, lam, ignore_index=255)
    torch.testing.assert_close(scores.grad, (logits - prox) / lam)
    # value: L(prox) + ‖F − prox‖²/(2λ), below L(F), and → L(F) as λ → 0
    hinge = lovasz_hinge(prox, labels, ignore_index=255, backend="numpy")
    expected = hinge + ((logits - prox) ** 2).sum() / (2 * lam)
    torch.testing.assert_close(value.detach(), expected.to(value.dtype))
    at_input = lovasz_hinge(logits, labels, ignore_index=255, backend="numpy").double()
    assert float(value.detach()) <= float(at_input)
    small = lovasz_hinge_moreau(logits, labels, 1e-8, ignore_index=255)
    assert float(small) == pytest.approx(float(at_input), abs=1e-7)


def test_moreau_in_float32_returns_float32_gradient(gen):
    logits = torch.randn(2, 16, generator=gen, requires_grad=True)
    labels = (torch.rand(2, 16, generator=gen) > 0.5).long()
    value = lovasz_hinge_moreau(logits, labels, 0.1)
    assert value.dtype == torch.float32
    value.backward()
    assert logits.grad.dtype == torch.float32


def _objective(logits, labels, point, lam):
    hinge = lovasz_hinge(point, labels, per_image=False, backend="numpy").double()
    return float(hinge + ((point - logits) ** 2).sum() / (2 * lam))


# PyTorch's own modules, loaded by the compiler here, call the deprecated torch.jit.script
@pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")
def test_moreau_under_torch_compile_and_torch_func(gen):
    """A custom operator, as the losses are: a compiled step (fullgraph=True too) and
    torch.func.grad and vmap give the eager value and gradients. Its second derivative (the
    prox's Jacobian, not zero) is refused by name, and forward mode by PyTorch, rather than
    given as 0."""
    torch._dynamo.reset()
    model = torch.nn.Conv2d(3, 1, 3, padding=1, dtype=torch.float64)
    images = torch.randn(2, 3, 6, 7, generator=gen, dtype=torch.float64)
    labels = (torch.rand(2, 6, 7, generator=gen) < 0.4).long()
    labels[0, 0] = 255

    def forward():
        return lovasz_hinge_moreau(model(images)[:, 0], labels, 0.5, ignore_index=255)

    eager = forward()
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    for fullgraph in (False, True):
        model.zero_grad()
        compiled = torch.compile(forward, fullgraph=fullgraph)()
        compiled.backward()
        torch._dynamo.reset()
        torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-14)
        for param, expected in zip(model.parameters(), eager_grads):
            torch.testing.assert_close(param.grad, expected, rtol=1e-12, atol=1e-14)

    logits = model(images)[:, 0].detach()

    def envelope(x):
        return lovasz_hinge_moreau(x, labels, 0.5, ignore_index=255)

    x = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(envelope(x), x, create_graph=True)
    torch.testing.assert_close(torch.func.grad(envelope)(logits), grad.detach(), rtol=0,
                               atol=0)
    mapped = torch.func.vmap(lambda a, b: lovasz_hinge_moreau(a[None], b[None], 0.5))(
        logits, (labels == 1).long())
    alone = torch.stack([lovasz_hinge_moreau(logits[i:i + 1], (labels[i:i + 1] == 1).long(), 0.5)
                         for i in range(2)])
    torch.testing.assert_close(mapped, alone, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="lovasz_hinge_moreau has no second derivative"):
        torch.autograd.grad(grad.sum(), x)
    with pytest.raises(RuntimeError, match="lovasz_hinge_moreau has no second derivative"):
        torch.func.grad(lambda a: torch.func.grad(envelope)(a).sum())(logits)
    with pytest.raises(RuntimeError):
        torch.func.jvp(envelope, (logits,), (torch.ones_like(logits),))


def test_greedy_equals_exact_when_the_order_does_not_change(gen):
    labels = (torch.rand(1, 40, generator=gen) > 0.5).long()
    # distinct margins 0.04 apart (half of them ≤ 0, unchanged); every margin moves by at most
    # λ·max(g) ≤ λ = 1e-3: no two meet, none reaches 0
    margins = -0.8 + 0.04 * torch.randperm(40, generator=gen).to(torch.float64).reshape(1, 40)
    logits = (1 - margins) * (2 * labels - 1)
    lam = 1e-3
    exact = prox_lovasz_hinge(logits, labels, lam, per_image=False)
    greedy = prox_lovasz_hinge(logits, labels, lam, per_image=False, method="greedy")
    assert isinstance(greedy, GreedyProx) and greedy.finished
    torch.testing.assert_close(greedy.prox, exact, rtol=0, atol=1e-12)
    # freezing at margin 0 without any merge keeps it exact too
    rng = random.Random(3)
    for _ in range(30):
        row_logits, row_labels = _tiny_case(rng, 6, "mixed")
        lam = rng.choice([0.01, 0.3, 2.0])
        fast = _fast_prox_row(row_logits, row_labels, lam, method="greedy")
        if prox_certificate(row_logits, row_labels, fast, lam)["polytope"] <= 1e-12:
            slow = brute_prox(row_logits, row_labels, lam)
            assert max(abs(a - b) for a, b in zip(fast, slow)) <= 1e-9


def test_greedy_gap_to_exact_is_reported(gen):
    """When margins meet, the greedy point is feasible but not optimal: measure how far."""
    gaps = []
    for lam in (0.05, 0.5, 5.0):
        logits = torch.randn(1, 200, generator=gen, dtype=torch.float64)
        labels = (torch.rand(1, 200, generator=gen) > 0.7).long()
        exact = prox_lovasz_hinge(logits, labels, lam, per_image=False)
        greedy = prox_lovasz_hinge(logits, labels, lam, per_image=False, method="greedy").prox
        best = _objective(logits, labels, exact, lam)
        reached = _objective(logits, labels, greedy, lam)
        assert reached >= best - 1e-12  # the exact prox is the minimizer
        gaps.append((lam, reached - best, float((greedy - exact).abs().max())))
    print("greedy vs exact (lam, objective gap, max |difference|):", gaps)


def test_greedy_max_steps(gen):
    logits = torch.randn(2, 300, generator=gen, dtype=torch.float64)
    labels = (torch.rand(2, 300, generator=gen) > 0.5).long()
    full = prox_lovasz_hinge(logits, labels, 2.0, method="greedy")
    assert full.finished
    cut = prox_lovasz_hinge(logits, labels, 2.0, method="greedy", max_steps=1)
    assert not cut.finished
    assert not torch.equal(cut.prox, full.prox)
    many = prox_lovasz_hinge(logits, labels, 2.0, method="greedy", max_steps=10**6)
    assert many.finished and torch.equal(many.prox, full.prox)


def test_empty_and_all_ignored_inputs():
    empty = torch.zeros(0, 4)
    assert prox_lovasz_hinge(empty, empty.long(), 0.1).shape == (0, 4)
    logits = torch.tensor([[0.5, -0.5]])
    out = prox_lovasz_hinge(logits, torch.tensor([[255, 255]]), 0.1, ignore_index=255)
    assert torch.equal(out, logits)
    value = lovasz_hinge_moreau(logits, torch.tensor([[255, 255]]), 0.1, ignore_index=255)
    assert float(value) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lam": 0.0}, ValueError, "lam must be a positive"),
        ({"lam": -1.0}, ValueError, "lam must be a positive"),
        ({"lam": float("nan")}, ValueError, "lam must be a positive"),
        ({"lam": "0.1"}, TypeError, "lam must be a positive number"),
        ({"method": "fista"}, ValueError, "method must be 'exact' or 'greedy'"),
        ({"max_steps": 5}, ValueError, "max_steps applies to method='greedy'"),
        ({"method": "greedy", "max_steps": 0}, ValueError, "max_steps must be a positive"),
        ({"method": "greedy", "max_steps": 2.5}, TypeError, "max_steps must be a positive"),
        ({"per_image": 1}, TypeError, "per_image must be True or False"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    arguments = {"lam": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        prox_lovasz_hinge(torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.long), **arguments)


def test_bad_inputs():
    with pytest.raises(ValueError, match="labels must have shape"):
        prox_lovasz_hinge(torch.zeros(2, 4), torch.zeros(2, 5, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="labels must be in"):
        prox_lovasz_hinge(torch.zeros(1, 4), torch.tensor([[0, 1, 2, 0]]), 0.1)
    with pytest.raises(ValueError, match="logits must be finite"):
        prox_lovasz_hinge(torch.tensor([[0.0, float("nan")]]), torch.tensor([[0, 1]]), 0.1)
    with pytest.raises(TypeError, match="logits must be a float"):
        prox_lovasz_hinge(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 1]]), 0.1)


@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_float_and_bool_masks_equal_integer_labels(gen, method):
    """Binary masks as segmentation_models_pytorch users pass them (y.float(), bool): values
    exactly 0/1 or the ignore label give the prox and the envelope of integer labels."""
    logits = torch.randn(2, 9, 7, generator=gen, dtype=torch.float64)
    labels = (torch.rand(2, 9, 7, generator=gen) > 0.6).long()
    masked = labels.clone()
    masked[0, :2] = 255

    def outputs(mask, ignore_index):
        prox = prox_lovasz_hinge(logits, mask, 0.4, ignore_index=ignore_index, method=method)
        point = logits.clone().requires_grad_()
        value = lovasz_hinge_moreau(point, mask, 0.4, ignore_index=ignore_index, method=method)
        value.backward()
        return (prox.prox if method == "greedy" else prox), value.detach(), point.grad

    for reference, variants, ignore_index in (
        (labels, [labels.float(), labels.double(), labels.half(), labels.bool()], None),
        (masked, [masked.float(), masked.double()], 255),
    ):
        expected = outputs(reference, ignore_index)
        for mask in variants:
            for got, want in zip(outputs(mask, ignore_index), expected):
                assert torch.equal(got, want), mask.dtype


@pytest.mark.parametrize("value", [0.5, -1.0, 2.0, float("nan")])
def test_float_mask_values_other_than_0_1_are_rejected(value):
    mask = torch.tensor([[0.0, 1.0, 1.0, value]])
    expected = "labels as a floating mask must hold whole numbers|labels must be in"
    with pytest.raises(ValueError, match=expected):
        prox_lovasz_hinge(torch.zeros(1, 4), mask, 0.1)
    with pytest.raises(ValueError, match=expected):
        lovasz_hinge_moreau(torch.zeros(1, 4, requires_grad=True), mask, 0.1)


def test_missing_numba_says_how_to_install(monkeypatch):
    import lovasz_kernels.optim

    kernels = importlib.import_module("lovasz_kernels.optim._prox_kernels")
    # the re-import below rebinds the package's attribute too: restored after the test
    monkeypatch.setattr(lovasz_kernels.optim, "_prox_kernels", kernels)
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now raises ImportError
    monkeypatch.delitem(sys.modules, "lovasz_kernels.optim._prox_kernels")
    # the numba import itself happens in the shared core: re-imported without numba too
    monkeypatch.setattr(lovasz_kernels, "_numba_core", sys.modules["lovasz_kernels._numba_core"])
    monkeypatch.delitem(sys.modules, "lovasz_kernels._numba_core")
    with pytest.raises(ImportError, match=r"pip install numba"):
        prox_lovasz_hinge(torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.long), 0.1)


def test_rows_on_threads_gives_each_thread_its_own_workspace(monkeypatch):
    # any thread may take any task: here a pool thread takes the first task while the caller
    # takes the second; the caller's workspace must stay the caller's alone
    kernels = importlib.import_module("lovasz_kernels.optim._prox_kernels")
    workspace = np.zeros(kernels.workspace_slots(8), dtype=np.float64)
    used = {}

    def row_kernel(own, next_row):
        used[threading.get_ident()] = own.__array_interface__["data"][0]

    def tasks_swapped(function, tasks):
        other = threading.Thread(target=function, args=tasks[0])
        other.start()
        other.join()
        return [function(*args) for args in tasks[1:]]

    monkeypatch.setattr(kernels.core, "thread_count", lambda: 2)
    monkeypatch.setattr(kernels.core, "run_tasks", tasks_swapped)
    kernels._rows_on_threads(row_kernel, lambda own, next_row: (own, next_row),
                             np.zeros((2, 8)), workspace)
    caller = threading.get_ident()
    assert used[caller] == workspace.__array_interface__["data"][0]
    assert len(used) == 2 and len(set(used.values())) == 2, "two threads shared a workspace"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_trip(gen):
    logits = torch.randn(2, 64, generator=gen)
    labels = (torch.rand(2, 64, generator=gen) > 0.5).long()
    expected = prox_lovasz_hinge(logits, labels, 0.2)
    out = prox_lovasz_hinge(logits.cuda(), labels.cuda(), 0.2)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), expected)


def test_concurrent_threads_match_sequential_calls():
    """Each Python thread has its own kernel workspace: proxes computed in several threads at
    once (numba releases the GIL) equal the same calls made one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    gen = torch.Generator().manual_seed(11)
    inputs = [
        (torch.randn(2, 30, 40, generator=gen, dtype=torch.float64),
         torch.randint(0, 2, (2, 30, 40), generator=gen))
        for _ in range(6)
    ]

    def run(pair):
        return prox_lovasz_hinge(pair[0], pair[1], lam=0.5)

    sequential = [run(pair) for pair in inputs]
    with ThreadPoolExecutor(max_workers=3) as pool:
        for _ in range(3):
            for result, expected in zip(pool.map(run, inputs), sequential):
                assert torch.equal(result, expected)


# ---------------------------------------------------------------------------------------
# the exact kernel's two routes: one merge with PAV pooling (certified), and the recursive
# splitting it falls back on; each must be the prox on its own

def _kernel_rows(logits, labels, lam, merge_first: bool):
    """``_prox_exact_rows`` on float64 rows (label 255 ignored): (prox, loss_in, loss_out,
    direction)."""
    import numpy as np

    from lovasz_kernels.optim import _prox_kernels as kernels

    logits = np.ascontiguousarray(logits, dtype=np.float64)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    rows = logits.shape[0]
    out = np.empty_like(logits)
    loss_in, loss_out = np.zeros(rows), np.zeros(rows)
    workspace = np.empty(kernels.workspace_slots(logits.shape[1]))
    direction = np.empty_like(logits)
    kernels._prox_exact_rows(logits, labels, 255, True, np.full(rows, lam), out, direction,
                             loss_in, loss_out, workspace, merge_first)
    return out, loss_in, loss_out, direction


@pytest.mark.parametrize("merge_first", [True, False], ids=["merge", "splitting"])
def test_each_exact_route_is_certified_on_tiny_problems(merge_first):
    rng = random.Random(f"routes-{merge_first}")
    for trial in range(120):
        num_pixels = 1 + trial % 8
        kind = ["mixed", "all_fg", "all_bg", "mixed"][trial % 4]
        logits, labels = _tiny_case(rng, num_pixels, kind)
        lam = rng.choice([1e-3, 0.05, 0.3, 1.0, 4.0, 50.0])
        codes = [[255 if y is None else y for y in labels]]
        out = _kernel_rows([logits], codes, lam, merge_first)[0][0].tolist()
        certificate = prox_certificate(logits, labels, out, lam)
        assert max(certificate["negative_s"], certificate["polytope"],
                   certificate["complementarity"]) <= 1e-9, (logits, labels, lam, certificate)
        assert max(abs(a - b) for a, b in zip(out, brute_prox(logits, labels, lam))) <= 1e-9


@pytest.mark.parametrize("lam_per_pixel", [1e-6, 1e-3, 0.05, 0.15, 1.0, 20.0])
def test_exact_routes_agree_on_larger_problems(lam_per_pixel):
    """Merge and splitting on a few thousand pixels, from steps that move no pixel's order
    to steps where most pixels pool or clip (0.15 per pixel is where the prox direction
    starts to differ from the hinge gradient, see the README), with ties, ignored pixels,
    no foreground and no background."""
    import numpy as np

    rng = np.random.default_rng(int(lam_per_pixel * 1e6))
    num_pixels = 3000
    logits = rng.standard_normal((6, num_pixels))
    logits[1] = np.round(logits[1] * 4) / 4  # many ties, inside and across labels
    labels = (rng.random((6, num_pixels)) > 0.7).astype(np.int64)
    labels[2, rng.random(num_pixels) < 0.2] = 255
    labels[3] = 0
    labels[4] = 1
    logits[5] = 0.0  # every margin 1: one tie of all pixels
    lam = lam_per_pixel * num_pixels
    merged = _kernel_rows(logits, labels, lam, merge_first=True)
    split = _kernel_rows(logits, labels, lam, merge_first=False)
    np.testing.assert_allclose(merged[0], split[0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(merged[1], split[1], rtol=1e-12)
    np.testing.assert_allclose(merged[2], split[2], rtol=1e-9, atol=1e-12)
    # each route's direction, built from the shifts, is (F − prox) / λ
    for route in (merged, split):
        np.testing.assert_allclose(route[3], (logits - route[0]) / lam, rtol=0, atol=1e-9)


@pytest.mark.parametrize("merge_first", [True, False], ids=["merge", "splitting"])
def test_each_exact_route_keeps_the_direction_at_tiny_lam(gen, merge_first):
    logits, labels = tie_free_margins(gen, (1, 5000))
    scores = logits.clone().requires_grad_()
    lovasz_hinge(scores, labels, backend="numpy").backward()
    for lam in (1e-9, 1e-13, 1e-300):
        direction = _kernel_rows(logits.numpy(), labels.numpy(), lam, merge_first)[3]
        error = float((torch.from_numpy(direction) - scores.grad).abs().max()
                      / scores.grad.abs().max())
        assert error <= 1e-12, (lam, error)


def test_certificate_rejects_a_wrong_pooling():
    """The merge's result is used only when :func:`_certify_groups` accepts it: pooling
    pixels that the prox keeps apart must fail the check, the true grouping must pass."""
    import numpy as np

    from lovasz_kernels.optim import _prox_kernels as kernels

    z_pos = np.array([3.0, 0.5])
    z_neg = np.array([2.0])
    n_fg, lam = 2, 0.1
    inverse_union = np.array([1.0 / (n_fg + b) for b in range(z_neg.shape[0] + 1)])
    prefix = [np.empty(3), np.empty(3), np.empty(2), np.empty(2)]
    kernels._compensated_prefix(z_pos, prefix[0], prefix[1])
    kernels._compensated_prefix(z_neg, prefix[2], prefix[3])
    level_pos, level_neg = np.empty(2), np.empty(1)

    def certify(starts_pos, starts_neg):
        groups = len(starts_pos) - 1
        return kernels._certify_groups(
            z_pos, z_neg, n_fg, lam, inverse_union, *prefix,
            np.array(starts_pos, dtype=np.int64), np.array(starts_neg, dtype=np.int64),
            np.zeros(groups + 1), 0, groups, level_pos, level_neg, np.empty(3),
        )[0]

    # merged order of the prox: fg 3.0, bg 2.0, fg 0.5, each its own level
    singletons = certify([0, 1, 1, 2], [0, 0, 1, 1])
    all_pooled = certify([0, 2], [0, 1])
    assert singletons and not all_pooled


def test_kernel_checks_its_workspace():
    import numpy as np

    from lovasz_kernels.optim import _prox_kernels as kernels

    logits = np.zeros((1, 10))
    labels = np.zeros((1, 10), dtype=np.int64)
    short = np.empty(kernels.workspace_slots(10) - 1)
    with pytest.raises(ValueError, match="workspace"):
        kernels._prox_exact_rows(logits, labels, 255, False, np.ones(1), np.empty((1, 10)),
                                 np.empty((1, 10)), np.zeros(1), np.zeros(1), short, True)
    with pytest.raises(ValueError, match="workspace"):
        kernels._prox_greedy_rows(logits, labels, 255, False, np.ones(1), -1, np.empty((1, 10)),
                                  np.empty((1, 10)), np.zeros(1), np.zeros(1), short)


def test_merge_route_is_certified_on_random_problems():
    """The fast route must be the one taken: a merge whose check fails still gives the
    prox (through the splitting), only slowly, so no other test would notice."""
    import numpy as np

    from lovasz_kernels.optim import _prox_kernels as kernels

    rng = np.random.default_rng(3)
    for trial in range(300):
        size = int(rng.integers(2, 300))
        z = rng.choice([0.1, 0.5, 1.0, 1.5], size) if trial % 2 else rng.random(size) * 2
        is_fg = rng.random(size) < rng.random()
        z_pos, z_neg = np.sort(z[is_fg])[::-1].copy(), np.sort(z[~is_fg])[::-1].copy()
        n_pos, n_neg = z_pos.shape[0], z_neg.shape[0]
        n_fg = n_pos + int(rng.integers(0, 50))  # foreground pixels outside V+
        lam = float(10 ** rng.uniform(-2, 3))
        inverse_union = np.array([1.0 / (n_fg + b) if n_fg + b else 0.0 for b in range(n_neg + 1)])
        prefix = [np.empty(n_pos + 1), np.empty(n_pos + 1), np.empty(n_neg + 1),
                  np.empty(n_neg + 1)]
        kernels._compensated_prefix(z_pos, prefix[0], prefix[1])
        kernels._compensated_prefix(z_neg, prefix[2], prefix[3])
        weights = [np.empty(n_neg + 1) for _ in range(3)]
        kernels._merge_weights(z_neg, n_fg, lam, inverse_union, *weights)
        start_pos = np.empty(size + 1, dtype=np.int64)
        start_neg = np.empty(size + 1, dtype=np.int64)
        group_level, group_sum = np.empty(size + 1), np.empty(size + 1)
        level_pos, level_neg = np.empty(n_pos), np.empty(n_neg)
        groups = kernels._merge_and_pool(z_pos, z_neg, *weights, 0, n_pos, 0, n_neg, level_pos,
                                         level_neg, start_pos, start_neg, group_level, group_sum)
        certified, _ = kernels._certify_groups(
            z_pos, z_neg, n_fg, lam, inverse_union, *prefix, start_pos, start_neg, group_level,
            0, groups, level_pos, level_neg, np.empty(size),
        )
        assert certified, (trial, list(z_pos), list(z_neg), n_fg, lam)


@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_rows_on_threads_and_split_rows_match_one_thread(monkeypatch, method):
    """The kernels' three ways to run rows: all on the calling thread, rows taken by several
    threads from a shared counter (each with its own workspace), one row's steps split in two
    (the sorts, the merge beside the prefix sums, the certificate, the writes): the same prox
    and direction bit for bit, the losses to rounding (the certificate's halves are summed)."""
    import numpy as np

    from lovasz_kernels import _numba_core as core
    from lovasz_kernels.optim import _prox_kernels as kernels

    rng = np.random.default_rng(5)
    rows, num_pixels = 3, 5000
    logits = rng.standard_normal((rows, num_pixels))
    logits[1] = np.round(logits[1] * 4) / 4  # ties
    labels = (rng.random((rows, num_pixels)) > 0.7).astype(np.int64)
    labels[2, rng.random(num_pixels) < 0.2] = 255
    lam = np.full(rows, 30.0)
    workspace = np.empty(kernels.workspace_slots(num_pixels))

    def run(threads, one_row_at_a_time):
        monkeypatch.setattr(core, "thread_count", lambda: threads)
        out, direction = np.empty_like(logits), np.empty_like(logits)
        loss_in, loss_out = np.zeros(rows), np.zeros(rows)
        for first, stop in ([(r, r + 1) for r in range(rows)] if one_row_at_a_time
                            else [(0, rows)]):
            args = (logits[first:stop], labels[first:stop], 255, True, lam[first:stop])
            outputs = (out[first:stop], direction[first:stop], loss_in[first:stop],
                       loss_out[first:stop], workspace)
            if method == "exact":
                kernels._prox_exact_rows(*args, *outputs, True)
            else:
                kernels._prox_greedy_rows(*args, -1, *outputs)
        return out, direction, loss_in, loss_out

    monkeypatch.setattr(kernels, "SPLIT_MIN_PIXELS", 1000)
    split_calls = []
    split_row = kernels._exact_row_split if method == "exact" else kernels._greedy_row_split
    monkeypatch.setattr(kernels, split_row.__name__,
                        lambda *args: split_calls.append(1) or split_row(*args))
    serial = run(1, False)
    on_threads = run(2, False)
    assert not split_calls
    split = run(2, True)
    assert len(split_calls) == rows
    for other in (on_threads, split):
        assert np.array_equal(other[0], serial[0]) and np.array_equal(other[1], serial[1])
        np.testing.assert_allclose(other[2], serial[2], rtol=1e-13)
        np.testing.assert_allclose(other[3], serial[3], rtol=1e-13)
