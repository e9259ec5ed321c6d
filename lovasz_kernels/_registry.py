"""Backend registry: the one kernel interface and how a backend is chosen.

A backend is a module under ``lovasz_kernels/backends/`` that defines

``lovasz_extension(errors, fg) -> (loss, grad)``
    the kernel (docs/design.md §1) on torch tensors, inputs already validated;
``availability() -> (bool, str)`` (optional)
    whether it can run in this process, and why not (an install hint);
``supported_devices() -> tuple[str, ...]`` (optional)
    device types it accepts now, when that depends on the environment: the native
    ``devices`` and possibly more (the triton backend accepts CPU tensors under
    ``TRITON_INTERPRET=1``);
``details() -> str`` (optional)
    one line for ``lovasz-kernels info`` about how it will run (threads, device, mode).
``lovasz_extension_(errors, fg) -> (loss, grad)`` (optional)
    the kernel on errors its caller gives up (the generic loss path's own (S, P) errors,
    never a user's): it may overwrite them, e.g. hold the gradient in their storage, and
    may return the losses in float64 (the loss path sums them in float64);
``lovasz_loss(scores, labels, plan) -> (loss, grad)`` (optional)
    a fused way to run a whole loss call, described by a
    :class:`lovasz_kernels._plan.SegmentPlan`, straight from ``scores`` (B, C, P) (the
    hinge's logits with C = 1, or probabilities, in their own dtype) and ``labels`` (B, P)
    int64, with no (S, P) errors/fg tensors. Returns the 0-d float64 total
    ``Σ_s plan.weight[s] · extension_s`` and its gradient w.r.t. ``scores`` (B, C, P) in the
    compute dtype, the weight and the sign (-1 on foreground, +1 elsewhere) folded into one
    scatter; or None, to leave a call it has no faster way for to the generic path. Without
    it (or when it returns None), :func:`lovasz_kernels._plan.generic_lovasz_loss` runs the
    plan through ``lovasz_extension``. Multilabel plans (labels (B, C, P)) reach it only when
    the module also sets ``FUSED_MULTILABEL = True``.
``label_census(labels, num_classes, ignore_index) -> LabelCensus | None`` (optional)
    one pass over a loss call's labels (B, P) int64 class indices, on a device whose values
    are free to read: each image's pixels per class, its valid pixels and the count of labels
    out of range (a :class:`lovasz_kernels._plan.LabelCensus`), which replace the plan's
    counts and the label check's pass (the check runs only to explain labels out of range),
    and the labels in the form its ``lovasz_loss`` reads them (the plan's
    ``backend_labels``); or None where it has no use for one (then the shared checks and
    counts run). Called for C >= 2 classes, not for multilabel or global-batch calls.
``check_scores(scores, value_check) -> bool`` (optional)
    one pass over a loss call's scores (B, C, P) on a device whose values are free to read:
    True when it proves them valid for the call's ``value_check`` ("finite",
    "unit_interval", or "simplex": in [0, 1] and, with C > 1, summing to 1 within
    :func:`lovasz_kernels._validate.simplex_tolerance`), which replaces the shared check's
    passes; False where it proves nothing (then the shared check runs, and explains a
    failure). It must never accept what the shared check refuses.
``temporary_bytes_per_pixel(dtype) -> int`` (optional)
    the most bytes a pixel its extension holds at once, besides the errors, the foreground
    and the gradient, on errors of that (compute) dtype when the generic path gives a chunk
    an allowance (:func:`lovasz_kernels._plan.chunk_allowance_bytes`) that fits them: a
    strictly budgeted call's chunks are then sized by it, not by the generic path's
    generous :data:`lovasz_kernels._plan.GENERIC_BYTES_PER_PIXEL`.

and one :func:`register_backend` line at the bottom of this file. Modules are imported
lazily, so an optional dependency that is missing costs nothing until that backend is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch

from lovasz_kernels import _validate
from lovasz_kernels._plan import LabelCensus, SegmentPlan, generic_lovasz_loss

ExtensionResult = tuple[torch.Tensor, torch.Tensor]


class BackendUnavailableError(ValueError, RuntimeError):
    """A requested backend cannot run here; the message says why and how to fix it.

    A ``ValueError`` (the ``backend=`` argument cannot be honoured) and a ``RuntimeError``
    (the cause is the environment: a missing package or device).
    """


@dataclass(frozen=True)
class Backend:
    """One implementation of the Lovász extension kernel.

    Parameters
    ----------
    name
        The name users pass as ``backend=``.
    module
        Import path of the module implementing the kernel (see this module's docstring).
    devices
        Device types (``"cpu"``, ``"cuda"``) the backend accepts.
    priority
        Rank for automatic selection (``backend=None``): the highest-priority available
        backend that accepts the tensor's device is used.
    summary
        One line for ``lovasz-kernels info`` and the README.
    """

    name: str
    module: str
    devices: tuple[str, ...]
    priority: int
    summary: str
    _loaded: dict[str, ModuleType] = field(default_factory=dict, repr=False, compare=False)

    def _load(self) -> ModuleType:
        if "module" not in self._loaded:
            self._loaded["module"] = importlib.import_module(self.module)
        return self._loaded["module"]

    def availability(self) -> tuple[bool, str]:
        """``(True, "")`` when the backend can run here, else ``(False, reason)``."""
        try:
            module = self._load()
        except ImportError as exc:  # a dependency of the backend module is missing
            return False, f"{self.name}: cannot import {self.module} ({exc})"
        check: Callable[[], tuple[bool, str]] | None = getattr(module, "availability", None)
        return (True, "") if check is None else check()

    def supported_devices(self) -> tuple[str, ...]:
        """Device types accepted now (may widen ``devices``, e.g. under an interpreter)."""
        available, _ = self.availability()
        if not available:
            return self.devices
        dynamic = getattr(self._load(), "supported_devices", None)
        return self.devices if dynamic is None else tuple(dynamic())

    def details(self) -> str:
        """The module's ``details()`` line when it is available and has one, else ``""``."""
        if not self.availability()[0]:
            return ""
        describe: Callable[[], str] | None = getattr(self._load(), "details", None)
        return "" if describe is None else describe()

    def require(self, device: torch.device) -> None:
        """Raise with the reason and a fix when this backend cannot run on ``device``."""
        available, reason = self.availability()
        if not available:
            raise BackendUnavailableError(f"backend {self.name!r} is not available: {reason}")
        if device.type in self.devices:  # native (``supported_devices`` only ever widens)
            return
        accepted = self.supported_devices()
        if device.type not in accepted:
            others = [
                b.name
                for b in _BACKENDS.values()
                if device.type in b.supported_devices() and b.availability()[0]
            ]
            raise ValueError(
                f"backend {self.name!r} runs on {'/'.join(accepted)} tensors only; got a tensor "
                f"on {device}. Move the tensor (e.g. .cpu()) or pick a backend for "
                f"{device.type}: {', '.join(others) or 'none available'}"
            )

    def run(self, errors: torch.Tensor, fg: torch.Tensor) -> ExtensionResult:
        """Run the kernel on validated inputs on a device this backend accepts.

        Callers validate first: :func:`lovasz_kernels.lovasz_extension` and the losses.
        """
        num_segments, num_pixels = errors.shape
        if num_segments == 0 or num_pixels == 0:
            # kernels need not handle empty arrays: the answer is fixed by the contract
            return (
                errors.new_zeros(num_segments, dtype=_validate.compute_dtype(errors.dtype)),
                torch.zeros_like(errors),
            )
        return self._load().lovasz_extension(errors, fg)

    def run_on_scratch(self, errors: torch.Tensor, fg: torch.Tensor) -> ExtensionResult:
        """:meth:`run` on errors the caller will not read again: the backend's
        ``lovasz_extension_`` when it has one (it may overwrite them)."""
        overwriting = getattr(self._load(), "lovasz_extension_", None)
        if overwriting is None or errors.numel() == 0:
            return self.run(errors, fg)
        return overwriting(errors, fg)

    def label_census(self, labels: torch.Tensor, num_classes: int,
                     ignore_index: int | None) -> LabelCensus | None:
        """The module's ``label_census`` of (B, P) int64 labels, when it has one and there
        are labels; else None."""
        census = getattr(self._load(), "label_census", None)
        if census is None or labels.numel() == 0:
            return None
        return census(labels, num_classes, ignore_index)

    def check_scores(self, scores: torch.Tensor, value_check: str) -> bool:
        """The module's ``check_scores`` of (B, C, P) scores, when it has one; else False."""
        check = getattr(self._load(), "check_scores", None)
        return False if check is None else check(scores, value_check)

    def run_loss(
        self, scores: torch.Tensor, labels: torch.Tensor, plan: SegmentPlan
    ) -> ExtensionResult:
        """Run one loss call (see :mod:`lovasz_kernels._plan`): the backend's fused
        ``lovasz_loss`` when it has one (for multilabel plans: and ``FUSED_MULTILABEL``), else
        the generic path through :meth:`run_on_scratch` (also where the fused path returns
        None)."""
        module = self._load()
        fused = getattr(module, "lovasz_loss", None)
        if fused is not None and (not plan.multilabel
                                  or getattr(module, "FUSED_MULTILABEL", False)):
            result = fused(scores, labels, plan)
            if result is not None:
                return result
        held: Callable[[torch.dtype], int] | None = getattr(
            module, "temporary_bytes_per_pixel", None)
        return generic_lovasz_loss(
            self.run_on_scratch, scores, labels, plan,
            backend_bytes_per_pixel=None if held is None else held(
                _validate.compute_dtype(scores.dtype)))


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Add a backend to the registry (``replace=True`` to overwrite an existing name)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a Backend record; got {type(backend).__name__}")
    if backend.name in _BACKENDS and not replace:
        raise ValueError(
            f"a backend named {backend.name!r} is already registered; pass replace=True"
        )
    _BACKENDS[backend.name] = backend
    return backend


def unregister_backend(name: str) -> None:
    """Remove a backend (for tests and plugins)."""
    _BACKENDS.pop(name, None)


def registered_backends() -> tuple[str, ...]:
    """Names of every registered backend, available or not, in priority order."""
    ordered = sorted(_BACKENDS.values(), key=lambda b: (-b.priority, b.name))
    return tuple(b.name for b in ordered)


def available_backends() -> dict[str, tuple[bool, str]]:
    """Map each registered backend name to ``(available, reason_when_not)``.

    Examples
    --------
    >>> from lovasz_kernels import available_backends
    >>> available_backends()["numpy"]
    (True, '')
    """
    return {name: _BACKENDS[name].availability() for name in registered_backends()}


def get_backend(name: str) -> Backend:
    """The registered backend called ``name`` (whether or not it can run here)."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str or None; got {type(name).__name__}")
    try:
        return _BACKENDS[name]
    except KeyError:
        known = ", ".join(repr(n) for n in registered_backends())
        raise ValueError(f"unknown backend {name!r}; registered backends: {known}") from None


def select_backend(name: str | None, device: torch.device) -> Backend:
    """Resolve ``backend=`` for a tensor on ``device``.

    An explicit name must be able to run there (else it raises, saying why); ``None`` picks
    the highest-priority available backend for the device and silently skips the others.
    """
    if name is not None:
        backend = get_backend(name)
        backend.require(device)
        return backend
    for candidate in registered_backends():
        backend = _BACKENDS[candidate]
        # native devices only: an interpreter that widens ``supported_devices`` is for tests,
        # never a silent default
        if device.type in backend.devices and backend.availability()[0]:
            return backend
    raise BackendUnavailableError(f"no available backend accepts {device.type} tensors")


# One line per backend. Priority: the fastest available backend for a device wins.
register_backend(Backend(
    name="numpy", module="lovasz_kernels.backends.numpy_ref", devices=("cpu",), priority=10,
    summary="reference: per-segment loop, float64 throughout (the oracle)",
))
register_backend(Backend(
    name="torch", module="lovasz_kernels.backends.torch_eager", devices=("cpu", "cuda"),
    priority=20, summary="eager PyTorch: one batched sort over all segments",
))
register_backend(Backend(
    name="numba", module="lovasz_kernels.backends.numba_cpu", devices=("cpu",), priority=30,
    summary="radix sort of packed keys, fused post-sort pass, parallel over and within segments",
))
register_backend(Backend(
    name="triton", module="lovasz_kernels.backends.triton_gpu", devices=("cuda",), priority=30,
    summary="Triton kernels: fused loss (keys from scores and labels, sort, exact tile scan, "
            "gradient written in place); sort-free histogram for 16-bit inputs",
))
