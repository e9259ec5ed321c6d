"""The backend registry: names, availability, explicit requests and automatic selection.

Fake backends are registered for one test and always removed in the fixture's teardown, so
the registry every other test sees is the package's own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import lovasz_kernels.backends.torch_eager as torch_eager
from lovasz_kernels import (
    Backend,
    BackendUnavailableError,
    available_backends,
    get_backend,
    lovasz_extension,
    lovasz_hinge,
    lovasz_softmax,
    register_backend,
    registered_backends,
)
from lovasz_kernels._registry import select_backend, unregister_backend

CPU = torch.device("cpu")


def _fake(name: str, module: str, devices: tuple[str, ...], priority: int = 99) -> Backend:
    return Backend(name=name, module=module, devices=devices, priority=priority,
                   summary=f"test fake: {name}")


def _registered(backend: Backend) -> Iterator[Backend]:
    register_backend(backend)
    try:
        yield backend
    finally:
        unregister_backend(backend.name)


@pytest.fixture
def fake_missing() -> Iterator[Backend]:
    """Highest priority, CPU, but its module does not exist."""
    yield from _registered(
        _fake("fake_missing", "lovasz_kernels.nonexistent_module", ("cpu",))
    )


@pytest.fixture
def fake_cuda_only() -> Iterator[Backend]:
    """Highest priority, importable, but only for CUDA tensors."""
    yield from _registered(
        _fake("fake_cuda_only", "lovasz_kernels.backends.torch_eager", ("cuda",))
    )


@pytest.fixture
def fake_fast_cpu() -> Iterator[Backend]:
    """Highest priority, importable, CPU: automatic selection must pick it."""
    yield from _registered(
        _fake("fake_fast_cpu", "lovasz_kernels.backends.numpy_ref", ("cpu",))
    )


@pytest.fixture
def inputs(gen):
    probas = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64).softmax(dim=1)
    labels = torch.randint(0, 3, (2, 4, 5), generator=gen)
    return probas, labels


def _first_available_for(device_type: str) -> str:
    for name in registered_backends():
        backend = get_backend(name)
        if device_type in backend.devices and backend.availability()[0]:
            return name
    raise AssertionError(f"no available backend for {device_type}")


# --------------------------------------------------------------------------------------------
# The package's own registry


def test_builtin_backends_registered():
    names = registered_backends()
    assert "numpy" in names and "torch" in names
    assert len(set(names)) == len(names)


def test_registered_in_priority_order():
    priorities = [get_backend(name).priority for name in registered_backends()]
    assert priorities == sorted(priorities, reverse=True)
    assert registered_backends().index("torch") < registered_backends().index("numpy")


def test_available_backends_covers_every_registered_backend():
    status = available_backends()
    assert list(status) == list(registered_backends())
    for name, entry in status.items():
        assert isinstance(entry, tuple) and len(entry) == 2, name
        available, reason = entry
        assert isinstance(available, bool) and isinstance(reason, str), name
        assert (reason == "") == available, f"{name}: {entry}"


def test_builtin_backends_available():
    status = available_backends()
    assert status["numpy"] == (True, "")
    assert status["torch"] == (True, "")


def test_get_backend_returns_record():
    backend = get_backend("numpy")
    assert isinstance(backend, Backend)
    assert backend.name == "numpy"
    assert "cpu" in backend.devices


def test_get_backend_unknown_lists_names():
    with pytest.raises(ValueError) as info:
        get_backend("nope")
    message = str(info.value)
    assert "unknown backend 'nope'" in message
    for name in registered_backends():
        assert repr(name) in message


@pytest.mark.parametrize("bad", [3, None, b"numpy"], ids=repr)
def test_get_backend_non_string(bad):
    with pytest.raises(TypeError, match="backend must be a str"):
        get_backend(bad)


# --------------------------------------------------------------------------------------------
# register_backend / unregister_backend


def test_register_duplicate_name_rejected():
    duplicate = _fake("numpy", "lovasz_kernels.backends.torch_eager", ("cpu",))
    with pytest.raises(ValueError, match="a backend named 'numpy' is already registered; "
                                         "pass replace=True"):
        register_backend(duplicate)
    assert get_backend("numpy").module == "lovasz_kernels.backends.numpy_ref"


def test_register_replace():
    first = _fake("fake_replaced", "lovasz_kernels.backends.numpy_ref", ("cpu",), priority=-5)
    second = _fake("fake_replaced", "lovasz_kernels.backends.torch_eager", ("cpu",),
                   priority=-6)
    register_backend(first)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_backend(second)
        assert get_backend("fake_replaced") is first
        assert register_backend(second, replace=True) is second
        assert get_backend("fake_replaced") is second
        assert registered_backends().count("fake_replaced") == 1
    finally:
        unregister_backend("fake_replaced")
    assert "fake_replaced" not in registered_backends()


def test_register_requires_backend_record():
    with pytest.raises(TypeError, match="backend must be a Backend record; got dict"):
        register_backend({"name": "x", "module": "y"})


def test_unregister_unknown_is_a_no_op():
    before = registered_backends()
    unregister_backend("never_registered")
    assert registered_backends() == before


# --------------------------------------------------------------------------------------------
# A backend whose module cannot be imported


def test_missing_backend_reported_unavailable(fake_missing):
    assert registered_backends()[0] == "fake_missing"  # it would win on priority
    available, reason = available_backends()["fake_missing"]
    assert available is False
    assert "lovasz_kernels.nonexistent_module" in reason


def test_missing_backend_explicit_softmax_raises(fake_missing, inputs):
    with pytest.raises(BackendUnavailableError, match="backend 'fake_missing' is not available: .*"
                                           "nonexistent_module"):
        lovasz_softmax(*inputs, backend="fake_missing")


def test_missing_backend_explicit_hinge_and_extension_raise(fake_missing, gen):
    logits = torch.randn(2, 6, generator=gen)
    labels = torch.randint(0, 2, (2, 6), generator=gen)
    with pytest.raises(ValueError, match="not available"):  # BackendUnavailableError
        lovasz_hinge(logits, labels, backend="fake_missing")
    with pytest.raises(RuntimeError, match="not available"):
        lovasz_extension(logits, labels.bool(), backend="fake_missing")


def test_missing_backend_skipped_by_auto_selection(fake_missing, inputs):
    assert select_backend(None, CPU).name != "fake_missing"
    assert select_backend(None, CPU).name == _first_available_for("cpu")
    auto = lovasz_softmax(*inputs)  # no error
    explicit = lovasz_softmax(*inputs, backend=_first_available_for("cpu"))
    assert torch.equal(auto, explicit)


def test_module_availability_hook(monkeypatch, inputs):
    """A module's own ``availability()`` is consulted and its reason reaches the user."""
    monkeypatch.setattr(torch_eager, "availability", lambda: (False, "needs a flux capacitor"),
                        raising=False)
    assert available_backends()["torch"] == (False, "needs a flux capacitor")
    with pytest.raises(RuntimeError, match="'torch' is not available: needs a flux capacitor"):
        lovasz_softmax(*inputs, backend="torch")
    assert select_backend(None, CPU).name != "torch"
    lovasz_softmax(*inputs)  # falls back silently


# --------------------------------------------------------------------------------------------
# A backend for another device


def test_cuda_only_backend_explicit_on_cpu_raises(fake_cuda_only, inputs):
    with pytest.raises(ValueError) as info:
        lovasz_softmax(*inputs, backend="fake_cuda_only")
    message = str(info.value)
    assert "backend 'fake_cuda_only' runs on cuda tensors only" in message
    assert "cpu" in message
    cpu_backends = message.rsplit("backend for cpu:", 1)[1]
    for name in registered_backends():
        backend = get_backend(name)
        if "cpu" in backend.supported_devices() and backend.availability()[0]:
            assert name in cpu_backends, message
    assert "fake_cuda_only" not in cpu_backends


def test_cuda_only_backend_explicit_extension_on_cpu_raises(fake_cuda_only, gen):
    errors = torch.randn(2, 5, generator=gen)
    with pytest.raises(ValueError, match="runs on cuda tensors only"):
        lovasz_extension(errors, errors > 0, backend="fake_cuda_only")


def test_cuda_only_backend_skipped_by_auto_selection(fake_cuda_only, inputs):
    assert registered_backends()[0] == "fake_cuda_only"
    assert select_backend(None, CPU).name == _first_available_for("cpu")
    assert select_backend(None, CPU).name != "fake_cuda_only"
    lovasz_softmax(*inputs)  # no error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_only_backend_auto_selected_on_cuda(fake_cuda_only):
    assert select_backend(None, torch.device("cuda")).name == "fake_cuda_only"


def test_widened_devices_not_used_by_auto_selection(fake_cuda_only, monkeypatch, inputs):
    """A module's ``supported_devices()`` (an interpreter mode) allows explicit use only."""
    monkeypatch.setattr(torch_eager, "supported_devices", lambda: ("cpu", "cuda"),
                        raising=False)
    assert get_backend("fake_cuda_only").supported_devices() == ("cpu", "cuda")
    explicit = lovasz_softmax(*inputs, backend="fake_cuda_only")
    torch.testing.assert_close(explicit, lovasz_softmax(*inputs, backend="torch"))
    assert select_backend(None, CPU).name != "fake_cuda_only"


# --------------------------------------------------------------------------------------------
# Automatic selection


def test_auto_selection_picks_highest_priority_cpu_backend():
    assert select_backend(None, CPU).name == _first_available_for("cpu")


def test_auto_selection_prefers_new_higher_priority_backend(fake_fast_cpu, inputs):
    assert select_backend(None, CPU).name == "fake_fast_cpu"
    calls = []
    original = fake_fast_cpu.run

    def counting_run(errors, fg):
        calls.append(errors.shape)
        return original(errors, fg)

    object.__setattr__(fake_fast_cpu, "run", counting_run)  # frozen dataclass instance
    lovasz_softmax(*inputs)
    assert len(calls) == 1


def test_explicit_name_overrides_priority(fake_fast_cpu):
    assert select_backend("numpy", CPU).name == "numpy"
    assert select_backend("torch", CPU).name == "torch"


def test_no_backend_for_device_raises():
    with pytest.raises(RuntimeError, match="no available backend accepts meta tensors"):
        select_backend(None, torch.device("meta"))
