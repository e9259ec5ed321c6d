"""Floors: what a loss call cannot beat, and the byte model behind GB/s.

A Lovász loss is dominated by one sort per segment, so each workload is also timed against a
sort of as many keys as the loss sorts:

- CPU: ``np.sort`` of random packed uint64 keys (a 32-bit key above a 32-bit pixel index, the
  layout a CPU kernel sorts), one array per segment, the segments spread over the available
  threads (``np.sort`` releases the GIL, so the threads sort at once);
- CUDA: one ``torch.sort`` of the very keys the triton backend sorts, built from the
  workload's errors by :func:`triton_sort_keys`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

#: integer type as wide as each float: the keys of :func:`triton_sort_keys`
_KEY_DTYPE = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
              torch.float32: torch.int32, torch.float64: torch.int64}


def available_threads() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class CpuSortFloor:
    """``np.sort`` of ``segments`` rows of ``segment_pixels`` random packed uint64 keys.

    Calling it sorts every row once. Each thread owns a contiguous block of rows (one task per
    thread, not per row: thousands of small per-image segments would otherwise time the
    pool's overhead); rows are copied into a reused buffer and sorted there in place, so a call
    sorts unsorted keys every time without faulting in fresh memory. Use as a context manager,
    or call :meth:`close`, to stop the threads.
    """

    def __init__(self, segments: int, segment_pixels: int, threads: int | None = None,
                 seed: int = 0):
        rng = np.random.default_rng(seed)
        keys = rng.integers(0, 1 << 32, size=(segments, segment_pixels), dtype=np.uint64)
        self.keys = (keys << np.uint64(32)) | np.arange(segment_pixels, dtype=np.uint64)
        self._sorted = np.empty_like(self.keys)
        self.threads = max(1, min(threads or available_threads(), segments))
        self._blocks = [block for block in np.array_split(np.arange(segments), self.threads)
                        if block.size]
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def _sort_block(self, rows: np.ndarray) -> None:
        for row in rows:
            target = self._sorted[row]
            np.copyto(target, self.keys[row])
            target.sort()

    def __call__(self) -> np.ndarray:
        if self._pool is None:
            self._sort_block(np.arange(self.keys.shape[0]))
        else:
            for done in [self._pool.submit(self._sort_block, b) for b in self._blocks]:
                done.result()
        return self._sorted

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> CpuSortFloor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def triton_sort_keys(errors: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """The integer keys the triton backend sorts: ``2 (bits(max(e, 0)) − 2^(w−2)) + fg``.

    ``errors`` (S, P) float of width w bits, ``fg`` (S, P) bool. ``bits`` reads the clamped
    float's bits as a signed w-bit integer (errors ≤ 0, −0.0 and −inf padding all become 0:
    they carry no loss, so their order is irrelevant), which orders like the values; shifting
    by 2^(w−2) and doubling makes room for the label in the low bit without losing a value bit.
    The result fits a w-bit signed integer, and descending key order is descending error order
    with foreground first among equal errors. Built with torch ops, so it runs on any device.
    """
    key_dtype = _KEY_DTYPE.get(errors.dtype)
    if key_dtype is None:
        raise TypeError(f"errors must be float16/bfloat16/float32/float64; got {errors.dtype}")
    bits = errors.contiguous().view(key_dtype)
    bits = torch.where(bits > 0, bits, torch.zeros_like(bits))
    half = 1 << (torch.iinfo(key_dtype).bits - 2)
    return (bits - half) * 2 + fg.to(key_dtype)


def triton_key_errors(keys: torch.Tensor, float_dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`triton_sort_keys` for the value: max(e, 0) back from a key."""
    half = 1 << (torch.iinfo(keys.dtype).bits - 2)
    return ((keys >> 1) + half).view(float_dtype)


def cuda_sort_floor(errors: torch.Tensor, fg: torch.Tensor) -> Callable[[], object]:
    """One descending ``torch.sort`` along the rows of the triton keys of ``(errors, fg)``."""
    keys = triton_sort_keys(errors, fg)
    return lambda: torch.sort(keys, dim=1, descending=True)


# --------------------------------------------------------------------------------------------
# the byte model behind GB/s, and the cards' peak bandwidth

#: bytes per element of one ideal pass of a key/index sort: read a 32-bit key, write the sorted
#: 32-bit key and the 64-bit index ``torch.sort`` returns
SORT_PASS_BYTES = 4 + 4 + 8


def ideal_bytes(num_elements: int, num_pixels: int, score_bytes: int = 4,
                label_bytes: int = 8) -> int:
    """Bytes an ideal fwd+bwd must move: the denominator of the GB/s on GPUs.

    ``num_elements`` = S·P (segments × pixels per segment), ``num_pixels`` = pixels in the
    batch (each label is read once however many classes use it). Three passes, each reading
    and writing every byte exactly once, nothing re-read from cache:

    - key build: read the scores (``score_bytes`` per element) and labels (``label_bytes``
      per pixel), write one 32-bit key and one 32-bit pixel index per element (8 B);
    - sort: one ideal pass over (key, index) pairs: read 8 B and write 8 B per element
      (a real radix sort makes several such passes: this is a floor, not an estimate);
    - post-sort: read the sorted pairs (8 B), write the gradient (``score_bytes``) per element.

    That is ``(2·score_bytes + 32)·S·P + label_bytes·pixels``: 40 B per element for float32.
    """
    per_element = score_bytes + 8 + 16 + 8 + score_bytes
    return per_element * num_elements + label_bytes * num_pixels


#: peak HBM bandwidth (TB/s) of the cards we know, by words of ``torch.cuda.get_device_name``;
#: the first entry whose words all appear in the name wins
HBM_PEAK_TBPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIE"), 2.0),
    (("H100", "SXM"), 3.35),
    (("H100", "HBM3"), 3.35),  # the SXM card calls itself "NVIDIA H100 80GB HBM3"
    (("H200",), 4.8),
    (("A100", "80GB"), 2.04),
    (("A100", "40GB"), 1.56),
)


def hbm_peak_gbps(card_name: str) -> float | None:
    """Peak memory bandwidth in GB/s of the card called ``card_name``, None when unknown."""
    name = card_name.upper()
    for words, tbps in HBM_PEAK_TBPS:
        if all(word in name for word in words):
            return tbps * 1e3
    return None
