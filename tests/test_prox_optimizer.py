"""ProxLovasz: the proximal-gradient optimizer, and the example that compares it to SGD."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
import torch

pytest.importorskip("numba", reason="the prox kernels need numba")

from lovasz_kernels import lovasz_hinge  # noqa: E402
from lovasz_kernels.optim import ProxLovasz, lovasz_hinge_moreau, prox_lovasz_hinge  # noqa: E402
from tests.helpers import tie_free_margins  # noqa: E402

_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "prox_vs_momentum.py"


def _problem(gen, batch=2, size=6):
    logits = torch.randn(batch, size, size, generator=gen, dtype=torch.float64)
    labels = (torch.rand(batch, size, size, generator=gen) > 0.5).long()
    return logits, labels


def test_identity_model_one_step_is_the_prox(gen):
    logits, labels = _problem(gen)
    labels[0, 0] = 255
    for lam, lr in ((None, 0.7), (0.3, 0.3)):
        scores = torch.nn.Parameter(logits.clone())
        optimizer = ProxLovasz([scores], lr=lr, momentum=0.0, lam=lam)

        def closure(scores=scores, optimizer=optimizer):
            optimizer.zero_grad()
            return scores, labels, {"ignore_index": 255}

        loss = optimizer.step(closure)
        expected = prox_lovasz_hinge(logits, labels, lr, ignore_index=255)
        torch.testing.assert_close(scores.detach(), expected, rtol=0, atol=1e-12)
        reference = lovasz_hinge(logits, labels, ignore_index=255, backend="numpy")
        torch.testing.assert_close(loss, reference.to(loss.dtype))


@pytest.mark.parametrize(
    "options",
    [
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        {"momentum": 0.5, "dampening": 0.3},
    ],
    ids=["momentum", "nesterov-wd", "dampening"],
)
def test_matches_sgd_on_the_moreau_envelope(gen, options):
    """The update is torch's SGD applied to the envelope's gradient (F − prox)/λ, bit for
    bit: the same direction goes through the same functional update."""
    prox_opt, sgd = _step_beside_sgd(gen, lambda params: dict(lr=0.05, **options))
    for a, b in zip(prox_opt.param_groups[0]["params"], sgd.param_groups[0]["params"]):
        assert torch.equal(prox_opt.state[a]["momentum_buffer"], sgd.state[b]["momentum_buffer"])


def _step_beside_sgd(gen, options_of, scheduled=False, steps=4):
    """ProxLovasz (λ = 0.2) and torch.optim.SGD on the envelope, each on its own copy of one
    model, built with ``options_of(params)`` and stepped side by side (with a StepLR each
    when ``scheduled``); the parameters must come out equal. Returns both optimizers."""
    images = torch.randn(2, 3, 6, 6, generator=gen)
    labels = (torch.rand(2, 6, 6, generator=gen) > 0.5).long()
    models = [torch.nn.Conv2d(3, 1, 3, padding=1) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    prox_opt = ProxLovasz(models[0].parameters(), lam=0.2, **options_of(models[0]))
    sgd = torch.optim.SGD(models[1].parameters(), **options_of(models[1]))
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
                  for opt in (prox_opt, sgd)] if scheduled else []
    for _ in range(steps):
        def closure():
            prox_opt.zero_grad()
            return models[0](images)[:, 0], labels

        prox_opt.step(closure)
        sgd.zero_grad()
        lovasz_hinge_moreau(models[1](images)[:, 0], labels, 0.2).backward()
        sgd.step()
        for scheduler in schedulers:
            scheduler.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    return prox_opt, sgd


def test_sgd_state_dict_loads_into_prox_lovasz(gen):
    """The momentum buffers are SGD's: a checkpoint of torch.optim.SGD resumes in ProxLovasz
    (and back) with the same buffers."""
    model = torch.nn.Conv2d(3, 1, 3, padding=1)
    images = torch.randn(2, 3, 6, 6, generator=gen)
    labels = (torch.rand(2, 6, 6, generator=gen) > 0.5).long()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lovasz_hinge_moreau(model(images)[:, 0], labels, 0.05).backward()
    sgd.step()
    prox_opt = ProxLovasz(model.parameters(), lr=0.05, momentum=0.9)
    prox_opt.load_state_dict(sgd.state_dict())
    for param in model.parameters():
        assert torch.equal(prox_opt.state[param]["momentum_buffer"],
                           sgd.state[param]["momentum_buffer"])
    prox_opt.step(lambda: (model(images)[:, 0], labels))
    back = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    back.load_state_dict(prox_opt.state_dict())
    for param in model.parameters():
        assert torch.equal(back.state[param]["momentum_buffer"],
                           prox_opt.state[param]["momentum_buffer"])


@pytest.mark.parametrize("per_image", [True, False])
def test_tiny_lam_step_follows_the_hinge_gradient(gen, per_image):
    """With margins far apart compared with λ, the backpropagated direction is the hinge
    gradient to rounding at every λ, down to 1e-300 (not F − prox divided by λ, which keeps
    nothing of it)."""
    logits, labels = tie_free_margins(gen, (2, 64, 128))
    scores = logits.clone().requires_grad_()
    lovasz_hinge(scores, labels, per_image=per_image, backend="numpy").backward()
    for lam in (1e-8, 1e-12, 1e-300):
        point = torch.nn.Parameter(logits.clone())
        optimizer = ProxLovasz([point], lr=1.0, momentum=0.0, lam=lam)
        optimizer.step(lambda point=point: (point, labels, {"per_image": per_image}))
        error = float((point.grad - scores.grad).abs().max() / scores.grad.abs().max())
        assert error <= 1e-12, (lam, error)
        torch.testing.assert_close(point.detach(), logits - scores.grad, rtol=0, atol=1e-15)


def test_float_masks_step_like_integer_labels(gen):
    """segmentation_models_pytorch users pass y.float() masks: exactly 0/1 (or the ignore
    label) they give the same step as integer labels; anything else is rejected."""
    logits, labels = _problem(gen)
    labels[0, 0] = 255
    results = []
    for mask in (labels, labels.float(), labels.double(), labels.to(torch.uint8)):
        scores = torch.nn.Parameter(logits.clone())
        optimizer = ProxLovasz([scores], lr=0.3, momentum=0.0)
        loss = optimizer.step(lambda scores=scores, mask=mask: (scores, mask,
                                                                 {"ignore_index": 255}))
        results.append((float(loss), scores.detach()))
    for loss, point in results[1:]:
        assert loss == results[0][0]
        assert torch.equal(point, results[0][1])
    bad = labels.float()
    bad[1, 2, 3] = 0.5
    scores = torch.nn.Parameter(logits.clone())
    optimizer = ProxLovasz([scores], lr=0.3)
    with pytest.raises(ValueError, match="labels as a floating mask must hold whole numbers"):
        optimizer.step(lambda: (scores, bad))
    assert torch.equal(scores.detach(), logits)


def _train(model, optimizer, images, labels, steps):
    losses = []
    for _ in range(steps):
        def closure():
            optimizer.zero_grad()
            return model(images), labels

        losses.append(float(optimizer.step(closure)))
    return losses


def test_state_dict_round_trip(gen):
    images = torch.randn(2, 3, 6, 6, generator=gen)
    labels = (torch.rand(2, 1, 6, 6, generator=gen) > 0.5).long()[:, 0]
    model = torch.nn.Conv2d(3, 1, 3, padding=1)
    optimizer = ProxLovasz(model.parameters(), lr=0.05, lam=0.5)
    _train(model, optimizer, images, labels, 3)
    # through bytes, as a checkpoint would (state_dict() holds references to live buffers)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    saved_model, saved_optimizer = checkpoint["model"], checkpoint["optimizer"]
    assert all("momentum_buffer" in s for s in saved_optimizer["state"].values())

    clone = torch.nn.Conv2d(3, 1, 3, padding=1)
    clone.load_state_dict(saved_model)
    clone_optimizer = ProxLovasz(clone.parameters(), lr=1.0)  # overwritten by the load
    clone_optimizer.load_state_dict(saved_optimizer)
    assert clone_optimizer.param_groups[0]["lam"] == 0.5
    expected = _train(model, optimizer, images, labels, 2)
    got = _train(clone, clone_optimizer, images, labels, 2)
    assert got == expected
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_lr_scheduler_moves_lam_when_tied(gen):
    logits, labels = _problem(gen)
    scores = torch.nn.Parameter(logits.clone())
    optimizer = ProxLovasz([scores], lr=0.8, momentum=0.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.25)

    def closure():
        optimizer.zero_grad()
        return scores, labels

    optimizer.step(closure)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    before = scores.detach().clone()
    optimizer.step(closure)
    torch.testing.assert_close(scores.detach(), prox_lovasz_hinge(before, labels, 0.2),
                               rtol=0, atol=1e-12)


def test_tensor_lr_steps_like_sgd_and_ties_lam(gen):
    """A one-element tensor lr, as torch.optim.SGD takes it (schedulers then update it in
    place), gives SGD's update bit for bit, and λ follows it when tied."""
    prox_opt, _ = _step_beside_sgd(
        gen, lambda params: dict(lr=torch.tensor(0.05), momentum=0.9), scheduled=True, steps=3)
    assert isinstance(prox_opt.param_groups[0]["lr"], torch.Tensor)

    logits, labels = _problem(gen)
    scores = torch.nn.Parameter(logits.clone())
    tied = ProxLovasz([scores], lr=torch.tensor(0.4, dtype=torch.float64), momentum=0.0)
    tied.step(lambda: (scores, labels))
    torch.testing.assert_close(scores.detach(), prox_lovasz_hinge(logits, labels, 0.4),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("lr", "error", "match"),
    [
        (torch.tensor([0.1, 0.2]), TypeError, r"one-element real tensor; got a torch.float32 "
                                              r"tensor of shape \(2,\)"),
        (torch.tensor(True), TypeError, "one-element real tensor"),
        (torch.tensor(0.1j), TypeError, "one-element real tensor"),
        (torch.tensor(-0.1), ValueError, "Invalid learning rate"),
        (torch.tensor(float("nan")), ValueError, "Invalid learning rate"),
    ],
)
def test_bad_tensor_lr(lr, error, match):
    with pytest.raises(error, match=match):
        ProxLovasz([torch.nn.Parameter(torch.zeros(3))], lr=lr)


def test_param_groups_use_their_own_lr(gen):
    images = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    labels = (torch.rand(2, 6, 6, generator=gen) > 0.5).long()
    layers = [torch.nn.Conv2d(3, 4, 3, padding=1).double(), torch.nn.Conv2d(4, 1, 1).double()]
    copies = [torch.nn.Conv2d(3, 4, 3, padding=1).double(), torch.nn.Conv2d(4, 1, 1).double()]
    for layer, copy in zip(layers, copies):
        copy.load_state_dict(layer.state_dict())
    optimizer = ProxLovasz(
        [{"params": layers[0].parameters(), "lr": 0.01}, {"params": layers[1].parameters()}],
        lr=0.1, momentum=0.0, lam=0.5,
    )
    assert optimizer.param_groups[1]["lr"] == 0.1

    def closure():
        optimizer.zero_grad()
        return layers[1](layers[0](images))[:, 0], labels

    optimizer.step(closure)
    # each group steps along the envelope's gradient with its own learning rate
    lovasz_hinge_moreau(copies[1](copies[0](images))[:, 0], labels, 0.5).backward()
    for layer, copy, lr in zip(layers, copies, (0.01, 0.1)):
        for p, q in zip(layer.parameters(), copy.parameters()):
            torch.testing.assert_close(p.detach(), q.detach() - lr * q.grad)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": -1.0}, ValueError, "Invalid learning rate"),
        ({"lr": 0.0}, ValueError, "Invalid learning rate"),
        ({"lr": "0.1"}, TypeError, "lr must be a number"),
        ({"momentum": -0.1}, ValueError, "Invalid momentum value"),
        ({"dampening": 1.5}, ValueError, "Invalid dampening value"),
        ({"weight_decay": -1e-4}, ValueError, "Invalid weight_decay value"),
        ({"nesterov": 1}, TypeError, "nesterov must be True or False"),
        ({"nesterov": True, "momentum": 0.0}, ValueError, "Nesterov momentum requires"),
        ({"lam": 0.0}, ValueError, "lam must be a positive"),
        ({"lam": "big"}, TypeError, "lam must be a positive number"),
        ({"method": "fista"}, ValueError, "method must be 'exact' or 'greedy'"),
        ({"max_steps": 3}, ValueError, "max_steps applies to method='greedy'"),
        ({"method": "greedy", "max_steps": -2}, ValueError, "max_steps must be a positive"),
    ],
)
def test_bad_hyperparameters(kwargs, error, match):
    arguments = {"lr": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        ProxLovasz([torch.nn.Parameter(torch.zeros(3))], **arguments)


def test_bad_param_group_hyperparameters():
    with pytest.raises(ValueError, match="Invalid momentum value"):
        ProxLovasz([{"params": [torch.nn.Parameter(torch.zeros(3))], "momentum": -1.0}],
                   lr=0.1)


def test_bad_closures(gen):
    logits, labels = _problem(gen)
    scores = torch.nn.Parameter(logits.clone())
    optimizer = ProxLovasz([scores], lr=0.1)
    with pytest.raises(ValueError, match="needs a closure"):
        optimizer.step()
    with pytest.raises(TypeError, match="must return \\(logits, labels\\)"):
        optimizer.step(lambda: scores.sum())  # a loss, not (logits, labels)
    with pytest.raises(ValueError, match="requires_grad is False"):
        optimizer.step(lambda: (logits, labels))
    with pytest.raises(ValueError, match="closure options must be among"):
        optimizer.step(lambda: (scores, labels, {"classes": "all"}))
    with pytest.raises(TypeError, match=r"must return \(logits, labels\).*got tuple of 4"):
        optimizer.step(lambda: (scores, labels, {}, None))


@pytest.mark.parametrize("options", ["per_image", None, [("per_image", False)], False])
def test_closure_options_must_be_a_dict(gen, options):
    logits, labels = _problem(gen)
    scores = torch.nn.Parameter(logits.clone())
    optimizer = ProxLovasz([scores], lr=0.1)
    expected = (r"the closure must return \(logits, labels\) or \(logits, labels, options\) "
                r"with options a dict .*; got options .* of type")
    with pytest.raises(TypeError, match=expected):
        optimizer.step(lambda: (scores, labels, options))
    assert torch.equal(scores.detach(), logits)  # nothing moved


@pytest.mark.parametrize(
    ("key", "value", "error", "match"),
    [
        ("momentum", float("nan"), ValueError, "Invalid momentum value"),
        ("momentum", -0.5, ValueError, "Invalid momentum value"),
        ("lr", -0.1, ValueError, "Invalid learning rate"),
        ("lr", float("inf"), ValueError, "Invalid learning rate"),
        ("lr", "0.1", TypeError, "lr must be a number"),
        ("dampening", 2.0, ValueError, "Invalid dampening value"),
        ("weight_decay", float("nan"), ValueError, "Invalid weight_decay value"),
        ("nesterov", "yes", TypeError, "nesterov must be True or False"),
        ("lam", -1.0, ValueError, "lam must be a positive"),
        ("method", "fista", ValueError, "method must be 'exact' or 'greedy'"),
    ],
)
def test_group_hyperparameters_are_checked_at_each_step(gen, key, value, error, match):
    """A group edited after construction (by hand, a scheduler or add_param_group) gets the
    constructor's checks at the next step, before anything moves."""
    logits, labels = _problem(gen)
    scores = torch.nn.Parameter(logits.clone())
    other = torch.nn.Parameter(torch.zeros(3))
    optimizer = ProxLovasz([scores], lr=0.1)
    optimizer.add_param_group({"params": [other]})
    optimizer.step(lambda: (scores, labels))
    before = scores.detach().clone()
    optimizer.param_groups[1][key] = value
    with pytest.raises(error, match=match):
        optimizer.step(lambda: (scores, labels))
    assert torch.equal(scores.detach(), before)
    assert not torch.isnan(scores).any()


def test_greedy_optimizer_reports_whether_the_path_finished(gen):
    logits, labels = _problem(gen, size=10)
    scores = torch.nn.Parameter(logits.clone())
    optimizer = ProxLovasz([scores], lr=2.0, momentum=0.0, method="greedy", max_steps=1)
    optimizer.step(lambda: (scores, labels))
    assert optimizer.prox_finished is False
    optimizer.param_groups[0]["max_steps"] = None
    optimizer.step(lambda: (scores, labels))
    assert optimizer.prox_finished is True


def test_example_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("prox_vs_momentum", _EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "curves.png"
    results = example.main(["--size", "24", "--images", "4", "--iterations", "4",
                            "--out", str(out)])
    assert out.exists() and out.stat().st_size > 0
    assert set(results) >= {"SGD", "SGD + momentum", "ProxLovasz, λ = lr"}
    assert all(len(curve) == 5 for curve in results.values())
