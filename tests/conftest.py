import functools
import os

import torch

# Triton decides when a kernel is *decorated* (at import of lovasz_kernels.backends.triton_gpu)
# whether @triton.jit compiles for a GPU or builds an interpreted kernel; it reads
# TRITON_INTERPRET from the environment then. So without a GPU, switch the interpreter on here,
# before anything imports that module (conftest runs before collection, and the backend is
# imported lazily). setdefault: an explicit TRITON_INTERPRET=0 in the environment wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from lovasz_kernels import (  # noqa: E402
    _numba_core,
    _torch_sort,
    get_backend,
    registered_backends,
)
from lovasz_kernels.backends import numba_cpu  # noqa: E402

# the `backend` fixture is a constant string per test, safe to share across examples
_shared_fixture = [HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=_shared_fixture)
settings.register_profile("dev", max_examples=300, deadline=None,
                          suppress_health_check=_shared_fixture)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="session")
def _machine_choices_in_a_session_folder(tmp_path_factory):
    """The choices measured on first use (numba's sort and when it splits a segment across
    threads, the torch backend's padding) are measured into a folder of this session, not
    the user's cache: a choice measured while the tests load the machine would otherwise be
    kept for every later run on it."""
    folder = tmp_path_factory.mktemp("machine-choices")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_numba_core, "choice_path", lambda: str(folder / "sort-choice.json"))
        patch.setattr(_torch_sort, "choice_path", lambda: str(folder / "torch-sort-choice.json"))
        patch.setattr(numba_cpu, "split_choice_path",
                      lambda: str(folder / "numba-split-choice.json"))
        yield


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


# A backend whose kernels run interpreted (triton under TRITON_INTERPRET=1: a few ms per
# program launched, little per pixel) skips the tests that would take minutes there: the slow
# mark (a 2^25-pixel segment) and the finite-difference checks, which call the kernel hundreds of
# times on tiny inputs. The autograd they check lives in losses.py, shared by every backend;
# tests/test_triton.py cross-validates the kernels themselves, and on a GPU all of these run.
_MANY_CALLS = {"test_gradcheck_fp64", "test_double_backward_through_softmax"}


@functools.cache
def _interpreted(name: str) -> bool:
    """Runs on CPU tensors only through an interpreter: a GPU backend widened for testing."""
    backend = get_backend(name)
    return (backend.availability()[0] and "cpu" in backend.supported_devices()
            and "cpu" not in backend.devices)


def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("backend") if callspec is not None else None
        if not isinstance(name, str) or name not in registered_backends():
            continue
        if item.get_closest_marker("slow"):
            why = "large inputs"
        elif item.originalname in _MANY_CALLS:
            why = "hundreds of kernel calls"
        else:
            continue
        if _interpreted(name):
            item.add_marker(pytest.mark.skip(
                reason=f"{name} runs interpreted on the CPU here: too slow for {why} "
                       "(runs on a GPU)"))


@pytest.fixture(params=_backend_params())
def backend(request) -> str:
    """Every registered backend, skipped with its own reason when it cannot run on the CPU.

    A GPU-only backend that runs interpreted on CPU tensors (triton under TRITON_INTERPRET=1)
    is included, minus a few costly tests (see ``pytest_collection_modifyitems``).
    """
    return request.param


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
