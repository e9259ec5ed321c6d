"""The asv suite (benchmarks/) stays in step with the registry and runs."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import benchmarks
from benchmarks import common
from lovasz_kernels import available_backends, registered_backends


def _benchmark_classes():
    for info in pkgutil.iter_modules(benchmarks.__path__):
        module = importlib.import_module(f"benchmarks.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and hasattr(cls, "params"):
                yield cls


CLASSES = list(_benchmark_classes())


def test_suite_has_every_operation_family():
    names = {cls.__name__ for cls in CLASSES}
    assert {"LovaszSoftmax", "LovaszHinge", "LovaszExtension", "ProxLovaszHinge",
            "CudaLovaszSoftmax"} <= names


@pytest.mark.parametrize("cls", [c for c in CLASSES if "backend" in c.param_names],
                         ids=lambda c: c.__name__)
def test_every_registered_backend_is_in_the_grid(cls):
    grid = cls.params[cls.param_names.index("backend")]
    missing = set(registered_backends()) - set(grid)
    assert not missing, f"{cls.__name__} does not time {sorted(missing)}"
    assert common.LOOP in grid  # the yardstick


def test_grids_are_append_only():
    """Existing grid values never change (results stay comparable); new ones go at the end."""
    assert common.PIXELS[:4] == [64**2, 256**2, 512**2, 1024**2]
    assert common.CLASSES[:3] == [2, 21, 150]
    assert common.PER_IMAGE[:2] == [False, True]
    assert common.DTYPES[:2] == ["float32", "float16"]
    assert common.BACKENDS[:5] == ["numpy", "torch", "numba", "triton", "loop"]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_each_benchmark_runs_on_the_smallest_input(cls):
    """setup + every time_/peakmem_/track_ body at the first grid point with torch (or skip)."""
    params = [values[0] for values in cls.params]
    if "backend" in cls.param_names:
        params[cls.param_names.index("backend")] = "torch"
    bench = cls()
    try:
        bench.setup(*params)
    except NotImplementedError as exc:
        pytest.skip(f"asv would skip it here: {exc}")
    methods = [m for m in dir(bench) if m.startswith(("time_", "peakmem_", "track_"))]
    assert methods
    for name in methods:
        result = getattr(bench, name)(*params)
        if name.startswith("track_"):
            assert result > 0


def test_unavailable_and_too_slow_combinations_are_skipped():
    with pytest.raises(NotImplementedError, match="reference would take"):
        common.require("torch", "cpu", 1024**2, 150, False)
    with pytest.raises(NotImplementedError, match="per-class loop would take"):
        common.require(common.LOOP, "cpu", 512**2, 150, False)
    with pytest.raises(NotImplementedError, match="unknown backend"):
        common.require("no-such-backend", "cpu", 64**2, 2, False)
    for name, (available, _) in available_backends().items():
        if not available:
            with pytest.raises(NotImplementedError):
                common.require(name, "cpu", 64**2, 2, False)
    common.require("torch", "cpu", 512**2, 21, False)  # the headline sizes run
    common.require(common.LOOP, "cpu", 512**2, 21, False)


def test_image_shapes_hold_the_pixel_count():
    for pixels in common.PIXELS:
        height, width = common.image_shape(pixels)
        assert common.BATCH * height * width == pixels
