"""Choices measured once per machine and kept in a small JSON file.

Which sort runs fastest depends on the processor (numba's sorts of packed keys, the torch
backend's padded radix sort against its comparison sort), so the backends time the candidates
on first use and keep the result here, one entry per machine key (the processor and whatever
else the timing depends on). A missing, corrupt or unwritable file only means measuring again;
nothing here ever raises.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile


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
