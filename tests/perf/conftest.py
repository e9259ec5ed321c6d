"""pytest-benchmark timings: off by default, run with ``pytest tests/perf --benchmark-only``.

The default ``python -m pytest`` run does not collect this folder (``--ignore=tests/perf`` in
pyproject.toml's addopts, undone by naming the folder); every test here also carries the
``perf`` marker.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/perf/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.perf)
