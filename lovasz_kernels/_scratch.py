"""Scratch arrays reused between calls, one set per Python thread.

The CPU kernels need tens of MB of temporary arrays per call (sort keys, radix buffers, the
prox's sorted lists and prefix sums). Freshly allocated, such arrays are often fresh pages
from the OS, and faulting them in is not free: measured on the 2-core VM, a third of a 512²
numba hinge call (3.3 ms, 2.3 ms with reused scratch) and a fifth of a 512² exact prox. So
kernels take their temporaries from here. Each Python thread has its own arrays (several
threads run kernels at once: the callers and the kernels' worker threads, see
:func:`lovasz_kernels._numba_core.run_tasks`), and arrays above ``KEEP_BYTES`` are not kept,
so a huge input does not pin its memory afterwards.

A call's large outputs are often new pages too, faulted in as the kernels write them.
:func:`output` gives a thread's previous output of a name back once nothing refers to it any
more: a training loop's gradient, consumed by the backward pass before the next step. On the
2-core VM a 1 × 256² × 150 numba loss call in a training step took 406-409 faults and 8-28 ms
of system time in new memory, none in reused memory, and 1.14-1.31x as long
(``python tests/perf/training_step.py``).

Kept arrays are memory a call needs all the same: :func:`release_kept` drops every thread's
(those here and any other store made by :func:`new_kept_store`), so that a peak measured
after it counts what a call allocates from nothing (``lovasz_kernels.bench.measure``).
"""

from __future__ import annotations

import itertools
import math
import threading
import weakref

import numpy as np

#: scratch up to this many bytes (per name and thread) is kept between calls
KEEP_BYTES = 64 << 20
#: outputs up to this many bytes (per name and thread) are kept for reuse: a gradient of
#: 8 × 512² × 21 float32 probabilities is 176 MB
KEEP_OUTPUT_BYTES = 256 << 20

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


def _thread_arrays() -> dict:
    arrays = getattr(_cache, "arrays", None)
    if arrays is None:
        arrays = _cache.arrays = new_kept_store()
    return arrays


def scratch(name: str, size: int, dtype: np.dtype | type) -> np.ndarray:
    """A 1-D array of ``size`` elements of ``dtype``, uninitialized.

    The same memory comes back on the next call with the same ``name`` from the same thread
    (so a caller must be done with it by then). Larger than ``KEEP_BYTES``: a fresh array.
    """
    dtype = np.dtype(dtype)
    if size * dtype.itemsize > KEEP_BYTES:
        return np.empty(size, dtype=dtype)
    arrays = _thread_arrays()
    cached = arrays.get(name)
    if cached is None or cached.dtype != dtype or cached.size < size:
        cached = arrays[name] = np.empty(size, dtype=dtype)
    return cached[:size]


def output(name: str, shape: tuple[int, ...], dtype: np.dtype | type,
           zeroed: bool = False, keep: bool = True) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` for a call to return, uninitialized (zeros with
    ``zeroed``): the memory of this thread's previous output of ``name`` when that is large
    enough and nothing refers to it any more, else new memory (kept for the next call, up to
    ``KEEP_OUTPUT_BYTES``). Not ``keep``: new memory, and none kept (memory held between
    calls is memory the rest of a training step cannot use).

    The caller must hand out the returned array itself (``torch.from_numpy`` of it, or the
    array): a weak reference to it tells whether it is still alive, and everything made from
    it (tensors, their views, numpy views of those) keeps it alive. A view of it made with
    numpy does not, so none may outlive the call.
    """
    dtype = np.dtype(dtype)
    size = math.prod(shape)
    arrays = _thread_arrays()
    key = ("output", name)
    if not keep or size * dtype.itemsize > KEEP_OUTPUT_BYTES:
        arrays.pop(key, None)
        return np.zeros(shape, dtype=dtype) if zeroed else np.empty(shape, dtype=dtype)
    kept = arrays.get(key)
    if kept is not None:
        memory, handed_out = kept
        if handed_out() is None and memory.dtype == dtype and memory.size >= size:
            array = memory[:size].reshape(shape)
            if zeroed:
                array.fill(0)
            arrays[key] = (memory, weakref.ref(array))
            return array
    # new memory: zeros from the OS cost no pass of their own
    memory = np.zeros(size, dtype=dtype) if zeroed else np.empty(size, dtype=dtype)
    array = memory.reshape(shape)
    arrays[key] = (memory, weakref.ref(array))
    return array


__all__ = ["KEEP_BYTES", "KEEP_OUTPUT_BYTES", "new_kept_store", "output", "release_kept",
           "scratch"]
