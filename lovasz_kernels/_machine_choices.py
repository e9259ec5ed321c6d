"""Choices measured once per machine and kept in a small JSON file.

Which sort runs fastest depends on the processor (numba's sorts of packed keys, the torch
backend's padded radix sort against its comparison sort), and whether splitting a segment
across threads pays on how its threads scale, so the backends time the candidates on first
use and keep the result here (:func:`kept_or_measured`), one entry per machine key (the
processor and whatever else the timing depends on). A missing, corrupt or unwritable file
only means measuring again; nothing here ever raises.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

Value = TypeVar("Value")

#: says when a choice is measured (INFO: first use on a machine, a fraction of a second)
logger = logging.getLogger("lovasz_kernels")


@functools.cache  # read once per process: choices are looked up on every call
def processor_model() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return model


def cache_path(filename: str) -> str:
    """``filename`` in ``$XDG_CACHE_HOME/lovasz_kernels`` or ``~/.cache/lovasz_kernels``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "lovasz_kernels", filename)


def _read_all(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def read_entry(path: str, key: str) -> dict | None:
    """This machine's entry in the file, or None (no file, unreadable, no such entry)."""
    entry = _read_all(path).get(key)
    return entry if isinstance(entry, dict) else None


def write_entry(path: str, key: str, entry: dict) -> None:
    """Add or replace this machine's entry, keeping the others (atomically: a reader sees the
    old file or the new one; a failure only costs a measurement next time)."""
    saved = _read_all(path)
    saved[key] = entry
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(saved, out, indent=1)
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def kept_or_measured(
    kept: dict, slot: Hashable, lock: threading.Lock, path: str, key: str,
    decode: Callable[[dict | None], Value | None],
    measure: Callable[[], tuple[Value, dict]], *, what: str,
) -> Value:
    """A choice measured once per machine: ``kept[slot]`` if this process has it; else the
    file's entry for ``key`` at ``path``, through ``decode`` (None: missing, corrupt or from
    another version); else ``measure()``'s value, its entry saved in the file, with an INFO
    record on the ``lovasz_kernels`` logger before and after (``what`` is measured). One
    thread at a time reads or measures (``lock``); the others then find it kept."""
    value = kept.get(slot)
    if value is not None:
        return value
    with lock:
        if slot not in kept:
            value = decode(read_entry(path, key))
            if value is None:
                logger.info("lovasz_kernels: measuring %s (first use on this machine)", what)
                start = time.perf_counter()
                value, entry = measure()
                write_entry(path, key, entry)
                logger.info("lovasz_kernels: measured %s in %.2f s, kept in %s", what,
                            time.perf_counter() - start, path)
            kept[slot] = value
    return kept[slot]


def kept_or_saved(
    kept: dict, slot: Hashable, path: str, key: str,
    decode: Callable[[dict | None], Value | None],
) -> Value | None:
    """What :func:`kept_or_measured` would give without measuring: ``kept[slot]``, else the
    file's entry decoded, else None (for ``lovasz-kernels info``)."""
    value = kept.get(slot)
    return value if value is not None else decode(read_entry(path, key))
