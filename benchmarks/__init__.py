"""asv benchmarks for lovasz_kernels (``asv run``; see README "Benchmarks").

asv imports every module here: pytest-benchmark files live under ``tests/perf/`` instead.
"""
