"""ProxLovasz: SGD with momentum on the proximal direction of the Lovász hinge."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.optim.sgd import sgd

from lovasz_kernels import _validate
from lovasz_kernels.optim.prox import check_lam, check_method, compute_prox

__all__ = ["ProxLovasz"]

_CLOSURE_OPTIONS = ("per_image", "ignore_index")


def _check_number(name: str, value: object, message: str, tensor_ok: bool = False) -> float:
    if tensor_ok and isinstance(value, torch.Tensor):
        # a one-element tensor, as torch.optim.SGD takes for lr; read for the checks only
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(
                f"{name} must be a number or a one-element real tensor; got a "
                f"{value.dtype} tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{message}: {value}")
    return value


class ProxLovasz(torch.optim.Optimizer):
    r"""Proximal-gradient training on the binary Lovász hinge (paper, Appendix C).

    Instead of the Lovász hinge's subgradient, the loss layer backpropagates the proximal
    direction (F − prox_λ(F)) / λ, the gradient of the hinge's Moreau envelope (see
    :func:`~lovasz_kernels.optim.lovasz_hinge_moreau`), and the parameters take an SGD step
    with momentum. With an identity model (the parameters are the logits), ``lr = λ`` and no
    momentum, one step is exactly the proximal step F ← prox_λ(F) (Prop. C.1); ``lam=None``
    ties λ to the current learning rate, so schedulers move both.

    .. code-block:: text

        input: lr γ, momentum μ, dampening τ, weight decay w, nesterov, λ (None: λ = γ)
        for t = 1, 2, ...:
            F, y        = closure()                        # logits of the batch, labels
            P           = prox_λ(F)                        # exact, or the greedy path
            d           = (F − P) / λ                      # gradient of the Moreau envelope
            g_θ         = ∂F/∂θᵀ d  (+ whatever .grad already holds)
            g_θ         = g_θ + w θ                        # if w ≠ 0
            b_t         = g_θ if t = 1 else μ b_{t−1} + (1 − τ) g_θ   # if μ ≠ 0
            g_θ         = g_θ + μ b_t if nesterov else b_t             # if μ ≠ 0
            θ           = θ − γ g_θ
        return L(F), the Lovász hinge of the logits before the step

    The last four lines are :func:`torch.optim.sgd.sgd`, the functional form of
    :class:`torch.optim.SGD`, called with g_θ as the gradient: the momentum buffers are
    ``state[p]["momentum_buffer"]`` as in SGD.

    Parameters
    ----------
    params
        Parameters or parameter groups, as for any ``torch.optim`` optimizer.
    lr
        Learning rate γ > 0: a number or, as :class:`torch.optim.SGD` takes it, a one-element
        tensor.
    momentum, dampening, weight_decay, nesterov
        As in :class:`torch.optim.SGD` (momentum defaults to 0.9 here).
    lam
        λ > 0, the proximal step; None (default) uses the learning rate. One λ is used per
        step, read from the first parameter group (the loss has one prox); the other groups
        may use other learning rates.
    method
        ``"exact"`` or ``"greedy"`` (see :func:`~lovasz_kernels.optim.prox_lovasz_hinge`).
    max_steps
        With ``method="greedy"``: event limit per image (None: follow the path to λ).
        :attr:`prox_finished` says whether the last step's path reached λ.

    Notes
    -----
    ``step(closure)`` requires a closure that runs the forward pass and returns
    ``(logits, labels)`` or ``(logits, labels, options)`` with ``options`` a dict of
    ``per_image`` (default True) and ``ignore_index`` (default None) for
    :func:`~lovasz_kernels.lovasz_hinge`; labels may be integer, bool or a floating mask
    whose values are exactly 0/1 (or the ignore label). Every group's hyperparameters are
    checked again at each step, with the messages of the constructor. The closure runs with
    gradients enabled; ``step`` backpropagates the proximal direction from ``logits``
    itself. As with any optimizer, call ``zero_grad()`` (in the closure or before
    ``step``): gradients already in ``.grad`` (for example from a regularizer's
    ``backward()`` inside the closure) are added to the proximal direction. The prox runs
    on the CPU (numba); GPU logits are copied to the host and the direction back, once each
    per step.

    A large λ makes the direction (F − prox)/λ tend to a squared-hinge gradient that loses the
    Jaccard weighting; λ of the order of the learning rate gives a direction close to the
    plain subgradient. See ``examples/prox_vs_momentum.py``.

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels.optim import ProxLovasz
    >>> model = torch.nn.Conv2d(3, 1, 3, padding=1)
    >>> images = torch.randn(2, 3, 8, 8)
    >>> labels = (torch.rand(2, 8, 8) > 0.5).long()
    >>> optimizer = ProxLovasz(model.parameters(), lr=0.01, lam=0.1)
    >>> def closure():
    ...     optimizer.zero_grad()
    ...     return model(images), labels
    >>> loss = optimizer.step(closure)
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        lam: float | None = None,
        method: str = "exact",
        max_steps: int | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            lam=lam,
            method=method,
            max_steps=max_steps,
        )
        self._check_group(defaults)
        self.prox_finished = True
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        """Validate a group's hyperparameters: the defaults and every group in ``__init__``,
        and every group again at each step (a scheduler, a user or ``add_param_group`` may
        have changed them since; a NaN momentum would turn every parameter into NaN)."""
        lr = _check_number("lr", group["lr"], "Invalid learning rate", tensor_ok=True)
        if lr <= 0.0:
            raise ValueError(f"Invalid learning rate: {group['lr']} (lr must be > 0)")
        momentum = _check_number("momentum", group["momentum"], "Invalid momentum value")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum} (momentum must be >= 0)")
        dampening = _check_number("dampening", group["dampening"], "Invalid dampening value")
        if not 0.0 <= dampening <= 1.0:
            raise ValueError(f"Invalid dampening value: {dampening} (must be in [0, 1])")
        weight_decay = _check_number(
            "weight_decay", group["weight_decay"], "Invalid weight_decay value"
        )
        if weight_decay < 0.0:
            raise ValueError(
                f"Invalid weight_decay value: {weight_decay} (weight_decay must be >= 0)"
            )
        nesterov = group["nesterov"]
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be True or False; got {nesterov!r}")
        if nesterov and (momentum <= 0.0 or dampening != 0.0):
            raise ValueError(
                f"Nesterov momentum requires momentum > 0 and dampening = 0; got "
                f"momentum={momentum}, dampening={dampening}"
            )
        if group["lam"] is not None:
            check_lam(group["lam"], "lam")
        check_method(group["method"], group["max_steps"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("lam", None)
            group.setdefault("method", "exact")
            group.setdefault("max_steps", None)
        self.__dict__.setdefault("prox_finished", True)

    def _step_lam(self) -> float:
        """λ of this step: the first group's ``lam``, or its current learning rate."""
        group = self.param_groups[0]
        lam = group["lam"] if group["lam"] is not None else group["lr"]
        return check_lam(lam, "lam" if group["lam"] is not None else "lr (used as lam)")

    @staticmethod
    def _parse_closure_output(output: object) -> tuple[torch.Tensor, torch.Tensor, dict]:
        expected = (
            "the closure must return (logits, labels) or (logits, labels, options) with "
            f"options a dict of {' and '.join(map(repr, _CLOSURE_OPTIONS))}"
        )
        if not isinstance(output, (tuple, list)) or len(output) not in (2, 3):
            received = type(output).__name__
            if isinstance(output, (tuple, list)):
                received += f" of {len(output)} values"
            raise TypeError(f"{expected}; got {received}")
        logits, labels = output[0], output[1]
        options = output[2] if len(output) == 3 else {}
        if not isinstance(options, Mapping):
            raise TypeError(
                f"{expected}, such as {{'per_image': False}}; got options {options!r} of type "
                f"{type(options).__name__}"
            )
        unknown = sorted(set(options) - set(_CLOSURE_OPTIONS))
        if unknown:
            raise ValueError(
                f"closure options must be among {list(_CLOSURE_OPTIONS)}; got {unknown}"
            )
        logits = _validate.check_floating("logits (from the closure)", logits)
        if not logits.requires_grad:
            raise ValueError(
                "logits (from the closure) must depend on the optimized parameters "
                "(requires_grad is False); compute them inside the closure with grad enabled"
            )
        return logits, labels, options

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One proximal-gradient step; returns the Lovász hinge of the closure's logits.

        Parameters
        ----------
        closure
            Runs the forward pass and returns ``(logits, labels)`` or
            ``(logits, labels, {"per_image": ..., "ignore_index": ...})``.
        """
        if closure is None:
            raise ValueError(
                "ProxLovasz.step needs a closure returning (logits, labels): the direction "
                "depends on the logits, not on a precomputed gradient"
            )
        for group in self.param_groups:
            self._check_group(group)
        with torch.enable_grad():
            logits, labels, options = self._parse_closure_output(closure())
            lam = self._step_lam()
            group = self.param_groups[0]
            result = compute_prox(
                logits.detach(),
                labels,
                lam,
                options.get("per_image", True),
                options.get("ignore_index"),
                group["method"],
                group["max_steps"],
            )
            logits.backward(result.direction(logits))
        self.prox_finished = result.finished

        # the parameter update is torch's SGD with momentum, fed the backpropagated direction
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            momentum = group["momentum"]
            buffers = []
            if momentum != 0:
                buffers = [self.state[param].get("momentum_buffer") for param in params]
            sgd(
                params,
                [param.grad for param in params],
                buffers,
                has_sparse_grad=any(param.grad.is_sparse for param in params),
                weight_decay=group["weight_decay"],
                momentum=momentum,
                lr=group["lr"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=False,
            )
            for param, buffer in zip(params, buffers):  # sgd creates the first buffers
                self.state[param]["momentum_buffer"] = buffer

        out_dtype = _validate.compute_dtype(logits.dtype)
        return torch.tensor(result.loss_input, dtype=out_dtype, device=logits.device)
