import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from lovasz_kernels import get_backend, registered_backends

# the `backend` fixture is a constant string per test, safe to share across examples
_shared_fixture = [HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=_shared_fixture)
settings.register_profile("dev", max_examples=300, deadline=None,
                          suppress_health_check=_shared_fixture)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _backend_params() -> list:
    params = []
    for name in registered_backends():
        backend = get_backend(name)
        available, reason = backend.availability()
        marks = []
        if not available:
            marks.append(pytest.mark.skip(reason=reason))
        elif "cpu" not in backend.supported_devices():
            marks.append(pytest.mark.skip(reason=f"{name} does not run on CPU tensors here"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=_backend_params())
def backend(request) -> str:
    """Every registered backend, skipped with its own reason when it cannot run on the CPU."""
    return request.param


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
