"""Scratch arrays reused between calls, one set per Python thread.

The CPU kernels need tens of MB of temporary arrays per call (sort keys, radix buffers, the
prox's sorted lists and prefix sums). Freshly allocated, such arrays are often fresh pages
from the OS, and faulting them in is not free: measured on the 2-core VM, a third of a 512²
numba hinge call (3.3 ms, 2.3 ms with reused scratch) and a fifth of a 512² exact prox. So
kernels take their temporaries from here. Each Python thread has its own arrays (several
threads run kernels at once: the callers and the kernels' worker threads, see
:func:`lovasz_kernels._numba_core.run_tasks`), and arrays above ``KEEP_BYTES`` are not kept,
so a huge input does not pin its memory afterwards.

Kept arrays are memory a call needs all the same: :func:`release_kept` drops every thread's
(those here and any other store made by :func:`new_kept_store`), so that a peak measured
after it counts what a call allocates from nothing (``lovasz_kernels.bench.measure``).
"""

from __future__ import annotations

import itertools
import threading
import weakref

import numpy as np

#: scratch up to this many bytes (per name and thread) is kept between calls
KEEP_BYTES = 64 << 20

_cache = threading.local()


class _KeptStore(dict):
    """One thread's arrays kept between calls, by name (a dict that can be weakly
    referenced: the registry must not keep a finished thread's arrays alive)."""

    __slots__ = ("__weakref__",)


_stores: weakref.WeakValueDictionary[int, _KeptStore] = weakref.WeakValueDictionary()
_stores_lock = threading.Lock()
_store_ids = itertools.count()


def new_kept_store() -> dict:
    """An empty dict for one thread's arrays kept between calls, which :func:`release_kept`
    empties."""
    store = _KeptStore()
    with _stores_lock:
        _stores[next(_store_ids)] = store
    return store


def release_kept() -> None:
    """Drop the arrays that every thread keeps between calls; each is freed once no running
    call holds it (a call keeps its own reference), and the next call allocates anew."""
    with _stores_lock:
        stores = list(_stores.values())
    for store in stores:
        store.clear()


def scratch(name: str, size: int, dtype: np.dtype | type) -> np.ndarray:
    """A 1-D array of ``size`` elements of ``dtype``, uninitialized.

    The same memory comes back on the next call with the same ``name`` from the same thread
    (so a caller must be done with it by then). Larger than ``KEEP_BYTES``: a fresh array.
    """
    dtype = np.dtype(dtype)
    if size * dtype.itemsize > KEEP_BYTES:
        return np.empty(size, dtype=dtype)
    arrays = getattr(_cache, "arrays", None)
    if arrays is None:
        arrays = _cache.arrays = new_kept_store()
    cached = arrays.get(name)
    if cached is None or cached.dtype != dtype or cached.size < size:
        cached = arrays[name] = np.empty(size, dtype=dtype)
    return cached[:size]


__all__ = ["KEEP_BYTES", "new_kept_store", "release_kept", "scratch"]
