"""Proximal operator and Moreau envelope of the binary Lovász hinge (paper, Appendix C).

prox_λ(F) = argmin_X L(X) + ‖X − F‖² / (2λ) with L the Lovász hinge of
:func:`lovasz_kernels.lovasz_hinge`. In margin space (m = 1 − y·X, y = ±1) this is
min_m Δ̄_J(relu(m)) + ‖m − m0‖² / (2λ), solved per segment by the numba kernels of
:mod:`lovasz_kernels.optim._prox_kernels` (docs/design.md, the prox):

- pixels with m0 ≤ 0 and ignored pixels are returned unchanged (bit for bit);
- on V+ = {m0 > 0}: m = max(m0 − Π_{B(λΔ_J)}(m0), 0), the base-polytope projection computed
  from the sorted foreground and background margins (one merge with pooling, certified;
  divide and conquer where the certificate fails); n_fg counts every foreground pixel of the
  segment, including those already classified with margin;
- ``per_image=True`` makes the loss a mean over the B' images that have a valid pixel, so each
  image gets the prox of its own loss with λ / B'.
"""

from __future__ import annotations

import importlib
import math
import numbers
import sys
from types import ModuleType
from typing import NamedTuple, Optional

import numpy as np
import torch

from lovasz_kernels import _ops, _validate
from lovasz_kernels._ops import hinge_shapes
from lovasz_kernels._scratch import scratch

__all__ = ["GreedyProx", "lovasz_hinge_moreau", "prox_lovasz_hinge"]

_METHODS = ("exact", "greedy")
_INSTALL_HINT = "install it with: pip install numba (from a clone: pip install -e '.[numba]')"


class GreedyProx(NamedTuple):
    """Result of ``prox_lovasz_hinge(..., method="greedy")``.

    ``prox`` has the shape and dtype of the logits; ``finished`` is False when some segment
    stopped after ``max_steps`` events before reaching step λ.
    """

    prox: torch.Tensor
    finished: bool


class ProxResult(NamedTuple):
    """Everything one kernel call gives, for the public functions and the optimizer."""

    prox: torch.Tensor  # logits layout and dtype, on the logits' device
    # (F − prox) / λ as float64 on the host, (B, P); the kernels form it from each pixel's
    # shift, never as a difference of F and the prox (that cancels when λ is small)
    direction_host: np.ndarray
    lam: float
    loss_input: float  # Lovász hinge at F (the mean over counted segments)
    loss_prox: float  # Lovász hinge at the prox
    finished: bool

    def direction(self, like: torch.Tensor) -> torch.Tensor:
        """(F − prox) / λ in the layout, dtype and device of ``like`` (the logits)."""
        direction = torch.from_numpy(self.direction_host)
        return direction.reshape(like.shape).to(device=like.device, dtype=like.dtype)

    def envelope(self) -> float:
        """The Moreau envelope L(prox) + ‖F − prox‖² / (2λ), as L(prox) + λ‖direction‖²/2.

        Never above L(F) (F itself is a candidate of the minimum): the two losses are
        summed in different orders, and at a λ too small to move the prox by a rounding
        step they may differ by a few ulps the wrong way.
        """
        direction = self.direction_host.ravel()
        value = self.loss_prox + 0.5 * self.lam * float(np.dot(direction, direction))
        return min(value, self.loss_input)


def _kernels() -> ModuleType:
    """The numba kernels, or an ImportError that says how to install numba."""
    try:
        module = importlib.import_module("lovasz_kernels.optim._prox_kernels")
    except ImportError as error:  # numba present but broken, or hidden by a test
        raise ImportError(
            f"prox_lovasz_hinge needs numba ({error}); {_INSTALL_HINT}"
        ) from error
    if not module.NUMBA_AVAILABLE:
        raise ImportError(
            f"prox_lovasz_hinge needs numba ({module.NUMBA_IMPORT_ERROR}); {_INSTALL_HINT}"
        )
    return module


def check_lam(lam: object, name: str = "lam") -> float:
    """λ as a positive finite float (a Python number or a one-element tensor)."""
    if isinstance(lam, torch.Tensor) and lam.numel() == 1 and lam.dtype != torch.bool:
        lam = lam.item()
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"{name} must be a positive number; got {type(lam).__name__}")
    value = float(lam)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a positive finite number; got {lam!r}")
    return value


def check_method(method: object, max_steps: object) -> int:
    """Validate ``method`` and ``max_steps``; returns max_steps for the kernel (−1: no limit)."""
    if method not in _METHODS:
        raise ValueError(f"method must be 'exact' or 'greedy'; got {method!r}")
    if max_steps is None:
        return -1
    steps = _validate.as_int(max_steps)
    if steps is None:
        raise TypeError(f"max_steps must be a positive int or None; got {max_steps!r}")
    if steps < 1:
        raise ValueError(f"max_steps must be a positive int or None; got {max_steps}")
    if method != "greedy":
        raise ValueError(
            f"max_steps applies to method='greedy' only (the exact prox has no step limit); "
            f"got max_steps={max_steps} with method={method!r}"
        )
    return steps


def compute_prox(
    logits: object,
    labels: object,
    lam: object,
    per_image: object,
    ignore_index: object,
    method: object,
    max_steps: object,
) -> ProxResult:
    """Validate, run the kernel on a CPU copy, and map the result back: the one entry point
    of :func:`prox_lovasz_hinge`, :func:`lovasz_hinge_moreau` and ``ProxLovasz``."""
    logits = _validate.check_floating("logits", logits)
    labels = _validate.check_tensor("labels", labels)
    _validate.check_same_device("labels", labels, "logits", logits)
    lam = check_lam(lam)
    per_image = _validate.check_flag("per_image", per_image)
    ignore_index = _validate.check_ignore_index(ignore_index)
    kernel_max_steps = check_method(method, max_steps)
    logits_2d, labels_2d = hinge_shapes(logits, labels)
    labels_2d = _validate.label_values("labels", labels_2d, binary=True)
    _validate.check_labels(labels_2d, "{0, 1}", 2, ignore_index)
    _validate.check_finite("logits", logits_2d)
    kernels = _kernels()

    # one copy to the host (and one back below); the kernels read float32 or float64 logits
    # and compute in float64, so that the prox is exact to ~1e-15
    compute = torch.float32 if logits_2d.dtype == torch.float32 else torch.float64
    logits_host = logits_2d.detach().to(device="cpu", dtype=compute).contiguous().numpy()
    labels_host = np.ascontiguousarray(labels_2d.to(device="cpu", dtype=torch.int64).numpy())
    if not per_image:
        logits_host, labels_host = logits_host.reshape(1, -1), labels_host.reshape(1, -1)
    if ignore_index is None:
        counted = np.full(labels_host.shape[0], labels_host.shape[1] > 0)
    else:
        counted = (labels_host != ignore_index).any(axis=1)
    num_counted = int(counted.sum())
    # the loss is the mean of the counted segments' losses: each gets λ / (their number)
    weight = np.where(counted, 1.0 / max(num_counted, 1), 0.0)
    lam_rows = lam * weight
    smallest_step = sys.float_info.min  # the smallest normal float64
    if num_counted and lam / num_counted < smallest_step:
        # the direction divides pooled margins' deviations by each segment's step: a step
        # that is subnormal has lost its precision (or is 0)
        raise ValueError(
            f"lam must be at least {smallest_step * num_counted:.4g} here (each of the "
            f"{num_counted} segments takes a step lam / {num_counted}, which must be a normal "
            f"float64, >= {smallest_step:.4g}); got {lam!r}"
        )

    out = np.empty(logits_host.shape, dtype=np.float64)
    direction = np.empty(logits_host.shape, dtype=np.float64)  # (F − prox) / λ of each row
    loss_in = np.zeros(logits_host.shape[0])
    loss_out = np.zeros(logits_host.shape[0])
    finished = True
    if logits_host.size:
        has_ignore = ignore_index is not None
        ignore_label = ignore_index if has_ignore else 0
        workspace = scratch(
            "prox workspace", kernels.workspace_slots(logits_host.shape[1]), np.float64
        )
        if method == "exact":
            kernels._prox_exact_rows(
                logits_host, labels_host, ignore_label, has_ignore, lam_rows, out, direction,
                loss_in, loss_out, workspace, True,
            )
        else:
            finished = bool(kernels._prox_greedy_rows(
                logits_host, labels_host, ignore_label, has_ignore, lam_rows, kernel_max_steps,
                out, direction, loss_in, loss_out, workspace,
            ))
        # (F − prox) / λ = (F − prox) / λ_row · (λ_row / λ), and λ_row / λ is the row's weight
        if num_counted > 1:
            direction *= weight[:, None]
    out_tensor = torch.from_numpy(out)
    prox = out_tensor.reshape(logits.shape).to(device=logits.device, dtype=logits.dtype)
    return ProxResult(
        prox=prox,
        direction_host=direction.reshape(logits_2d.shape),
        lam=lam,
        loss_input=float(np.dot(weight, loss_in)),
        loss_prox=float(np.dot(weight, loss_out)),
        finished=finished,
    )


def prox_lovasz_hinge(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lam: float,
    per_image: bool = True,
    ignore_index: int | None = None,
    method: str = "exact",
    *,
    max_steps: int | None = None,
) -> torch.Tensor | GreedyProx:
    """Proximal point of the Lovász hinge: argmin_X L(X) + ‖X − F‖² / (2λ).

    ``L`` is :func:`lovasz_kernels.lovasz_hinge` with the same ``per_image`` and
    ``ignore_index``. No autograd: the result is a new tensor.

    Parameters
    ----------
    logits
        F: (B, *spatial) or (B, 1, *spatial) float scores of the foreground class.
    labels
        (B, *spatial) labels in {0, 1} or ``ignore_index``: integer, bool, or a floating mask
        (``y.float()``) whose values are exactly those.
    lam
        λ > 0, the step of the proximal operator. Each segment's step (λ / B' per image)
        must be a normal float64 (≥ 2.2e-308); any smaller λ raises a ValueError.
    per_image
        True: L is the mean over the B' images with a valid pixel, so each image gets the
        prox of its own hinge with λ / B'. False: one segment over the batch, step λ.
    ignore_index
        Label of ignored pixels; they are returned unchanged.
    method
        ``"exact"``: the exact prox (docs/design.md): pixels with margin 1 − y·F ≤ 0 are
        unchanged; on the others, the projection onto the base polytope of λΔ_J, clipped at
        margin 0. The two label lists are sorted (radix sort), then merged once by their
        would-be prox values with adjacent violators pooled; a check of each pooled group
        certifies the result (it passed on every input tried). Where it fails, divide and
        conquer over the two lists solves the image: ~log P linear sweeps, O(P²) at worst.
        ``"greedy"``: the paper's approximate minimization path (Appendix C): margins move
        along −g (the Lovász gradient in their initial order), neighbours that meet merge and
        move with their mean g, groups that reach margin 0 freeze, until step λ. It equals
        the exact prox whenever no two margins meet before λ (the order does not change).
    max_steps
        ``method="greedy"`` only: stop each image after this many merge/freeze events.

    Returns
    -------
    ``method="exact"``: the prox, a tensor like ``logits`` (dtype, device, shape).
    ``method="greedy"``: :class:`GreedyProx` ``(prox, finished)``; ``finished`` is False
    when ``max_steps`` stopped some image before step λ.

    Notes
    -----
    The kernels run in numba on the CPU in float64 (``pip install numba``).
    Tensors on a GPU make one copy to the host and the result one copy back.

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels.optim import prox_lovasz_hinge
    >>> logits = torch.tensor([[0.5, -0.2, 2.0, 0.3]], dtype=torch.float64)
    >>> labels = torch.tensor([[1, 0, 1, 0]])
    >>> prox_lovasz_hinge(logits, labels, lam=0.1)
    tensor([[ 0.5250, -0.2167,  2.0000,  0.2667]], dtype=torch.float64)
    """
    result = compute_prox(logits, labels, lam, per_image, ignore_index, method, max_steps)
    if method == "greedy":
        return GreedyProx(result.prox, result.finished)
    return result.prox


def _moreau_impl(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lam: float,
    per_image: bool,
    ignore_index: Optional[int],  # noqa: UP045 - the operator's schema is read from these
    method: str,
    max_steps: Optional[int],  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor]:
    """The envelope (0-d, in max(dtype, float32)) and its gradient (F − prox) / λ (the
    logits' shape and dtype) of one call, arguments as :func:`lovasz_hinge_moreau`'s."""
    result = compute_prox(logits, labels, lam, per_image, ignore_index, method, max_steps)
    value = torch.tensor(result.envelope(), dtype=_validate.compute_dtype(logits.dtype),
                         device=logits.device)
    return value, result.direction(logits)


#: a custom operator, as the losses are: ``torch.compile`` traces a call as one node
#: (``fullgraph=True`` included), and ``torch.func.grad`` and ``vmap`` work
moreau_op = torch.library.custom_op("lovasz_kernels::lovasz_hinge_moreau",
                                    mutates_args=())(_moreau_impl)


@moreau_op.register_fake
def _moreau_fake(logits, labels, lam, per_image, ignore_index, method, max_steps):
    _validate.check_floating("logits", logits)
    hinge_shapes(logits, labels)
    return (logits.new_empty((), dtype=_validate.compute_dtype(logits.dtype)),
            logits.new_empty(logits.shape))


def _first_order_backward(ctx, d_value, d_direction):
    """d logits = d value · (F − prox) / λ. The envelope's second derivative (the prox's
    Jacobian) is not zero and not implemented: differentiating the gradient again raises
    rather than giving 0, as the losses' formula would (theirs is zero). Dynamo traces this
    with every upstream gradient given: there it is not read (compiled graphs refuse double
    backward themselves)."""
    if d_direction is not None and not torch.compiler.is_compiling():
        raise RuntimeError(
            "lovasz_hinge_moreau has no second derivative here (that of the Moreau envelope "
            "is the prox's Jacobian, not zero); differentiate it once")
    return _ops._backward(ctx, d_value, None)


_call_moreau = _ops._eager_caller(moreau_op, _moreau_impl, num_tensors=2)
# no forward mode: its formula would give the gradient a zero tangent, so a Hessian by
# forward-over-reverse would come out 0; without one PyTorch raises
_CompiledMoreauFunction = _ops._differentiable(
    moreau_op, "_CompiledMoreauFunction", forward_mode=False, backward=_first_order_backward)
_EagerMoreauFunction = _ops._eager_differentiable(
    _call_moreau, "_EagerMoreauFunction", forward_mode=False, backward=_first_order_backward)


def lovasz_hinge_moreau(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lam: float,
    per_image: bool = True,
    ignore_index: int | None = None,
    method: str = "exact",
    *,
    max_steps: int | None = None,
) -> torch.Tensor:
    """Moreau envelope of the Lovász hinge: L(prox) + ‖F − prox‖² / (2λ), differentiable.

    A smooth (1/λ-Lipschitz gradient) lower approximation of the Lovász hinge, equal to it as
    λ → 0. Its gradient is the proximal direction (F − prox_λ(F)) / λ, so a gradient step of
    size λ on it is exactly a proximal step on the hinge (paper, Appendix C); it works with
    any optimizer.

    Neither is formed from the difference F − prox, which keeps nothing of the step once λ
    is below the logits' resolution: the kernels compute each pixel's shift per unit of λ
    directly (its Jaccard increment, or its pooled group's mean increment plus its
    deviation from the group's mean margin), and the value is L(prox) + λ‖d‖²/2, never
    above L(F). Where no two margins are within λ of each other the gradient is the hinge's
    gradient to rounding at any λ down to 1e-300. Tied margins are the exception at small
    λ: once λ times the gap between the increments of a tie falls below the margins'
    resolution (~1e-16), which pixels of the tie pool is decided by rounding, and the
    gradient moves from the pooled one towards the hinge gradient of one order of the tie
    (a subgradient).

    Parameters
    ----------
    logits, labels, lam, per_image, ignore_index, method, max_steps
        As in :func:`prox_lovasz_hinge`. With ``method="greedy"`` the value and gradient are
        those of the greedy point (an upper bound on the envelope, exact when the greedy path
        is).

    Returns
    -------
    Scalar tensor in max(logits.dtype, float32) on the logits' device.

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels.optim import lovasz_hinge_moreau
    >>> logits = torch.tensor([[0.5, -0.2, 2.0, 0.3]], dtype=torch.float64, requires_grad=True)
    >>> labels = torch.tensor([[1, 0, 1, 0]])
    >>> value = lovasz_hinge_moreau(logits, labels, lam=0.1)
    >>> value.backward()
    >>> logits.grad
    tensor([[-0.2500,  0.1667,  0.0000,  0.3333]], dtype=torch.float64)
    """
    logits = _validate.check_floating("logits", logits)
    labels = _validate.check_tensor("labels", labels)
    # the operator's arguments, typed (its schema checks types only)
    arguments = (logits, labels, check_lam(lam), _validate.check_flag("per_image", per_image),
                 _validate.check_ignore_index(ignore_index), method,
                 _normalized_max_steps(method, max_steps))
    if not _ops._differentiated(logits):
        return _call_moreau(*arguments)[0]
    function = _ops._function_for_call(_CompiledMoreauFunction, _CompiledMoreauFunction,
                                       _EagerMoreauFunction)
    return function.apply(*arguments)[0]


def _normalized_max_steps(method: object, max_steps: object) -> int | None:
    """``max_steps`` checked (with ``method``) and as an int, or None."""
    steps = check_method(method, max_steps)
    return None if steps < 0 else steps
