"""``nn.Module`` wrappers of the Lovász losses."""

from collections.abc import Sequence
from typing import List, Optional  # noqa: UP035 - TorchScript reads attribute annotations

import torch
from torch import nn

from lovasz_kernels import _ops, _validate
from lovasz_kernels._registry import get_backend
from lovasz_kernels.distributed import check_dist_options
from lovasz_kernels.losses import lovasz_hinge, lovasz_softmax, softmax_loss

__all__ = ["LovaszHingeLoss", "LovaszSoftmaxLoss"]


def _check_backend_name(backend: str | None) -> str | None:
    if backend is not None:
        get_backend(backend)  # unknown names fail at construction, not mid-epoch
    return backend


def _dist_repr(module: nn.Module) -> str:
    """The distributed options, shown only when they differ from the defaults."""
    parts = []
    if module.process_group is not None:
        parts.append("process_group=<ProcessGroup>")
    if module.dist_mode != "exact":
        parts.append(f"dist_mode={module.dist_mode!r}, bins={module.bins!r}")
    return "".join(", " + part for part in parts)


class LovaszHingeLoss(nn.Module):
    """Binary Lovász hinge as a module; see :func:`lovasz_kernels.lovasz_hinge`.

    ``process_group`` (with ``per_image=False``) makes it the loss of the global batch across
    ranks; the group is kept as a plain attribute (not saved in the ``state_dict``).

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels import LovaszHingeLoss
    >>> criterion = LovaszHingeLoss(per_image=True, ignore_index=255)
    >>> criterion
    LovaszHingeLoss(per_image=True, ignore_index=255, backend=None)
    >>> loss = criterion(torch.randn(2, 1, 8, 8), torch.randint(0, 2, (2, 8, 8)))
    """

    def __init__(
        self,
        per_image: bool = True,
        ignore_index: int | None = None,
        backend: str | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        dist_mode: str = "exact",
        bins: int = 2**16,
    ) -> None:
        super().__init__()
        self.per_image = _validate.check_flag("per_image", per_image)
        self.ignore_index = _validate.check_ignore_index(ignore_index)
        self.backend = _check_backend_name(backend)
        check_dist_options(process_group, dist_mode, bins, allow_fp16_grid=False)
        self.process_group = process_group
        self.dist_mode = dist_mode
        self.bins = bins
        self._backend_name = "" if backend is None else backend
        self._distributed = process_group is not None

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            if self._distributed:
                raise RuntimeError(
                    "a scripted Lovász loss cannot take a process_group; use the eager or "
                    "torch.compile'd module for the global-batch loss")
            return _ops.lovasz_loss(logits, labels, None, "present", [], self.per_image,
                                    self.ignore_index, "hinge", self._backend_name)
        return self._eager_forward(logits, labels)

    @torch.jit.unused
    def _eager_forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return lovasz_hinge(
            logits, labels, per_image=self.per_image, ignore_index=self.ignore_index,
            backend=self.backend, process_group=self.process_group, dist_mode=self.dist_mode,
            bins=self.bins,
        )

    def extra_repr(self) -> str:
        return (
            f"per_image={self.per_image}, ignore_index={self.ignore_index}, "
            f"backend={self.backend!r}{_dist_repr(self)}"
        )


class LovaszSoftmaxLoss(nn.Module):
    """Multi-class Lovász-Softmax as a module; see :func:`lovasz_kernels.lovasz_softmax`.

    ``class_weights`` is a buffer, so it follows ``.to(device)`` and is saved in the
    ``state_dict``. ``process_group`` (with ``per_image=False``) makes it the loss of the
    global batch across ranks; the group is a plain attribute (not saved).

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels import LovaszSoftmaxLoss
    >>> criterion = LovaszSoftmaxLoss(from_logits=True, ignore_index=255)
    >>> criterion  # doctest: +NORMALIZE_WHITESPACE
    LovaszSoftmaxLoss(classes='present', per_image=False, ignore_index=255,
                      from_logits=True, backend=None)
    >>> loss = criterion(torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8)))
    """

    class_weights: Optional[torch.Tensor]  # noqa: UP045 - TorchScript reads Optional
    _class_list: List[int]  # noqa: UP006

    def __init__(
        self,
        classes: str | Sequence[int] = "present",
        per_image: bool = False,
        ignore_index: int | None = None,
        class_weights: Sequence[float] | torch.Tensor | None = None,
        from_logits: bool = False,
        backend: str | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        dist_mode: str = "exact",
        bins: int | str = 2**16,
    ) -> None:
        super().__init__()
        self.classes = _validate.normalize_classes(classes)
        self.per_image = _validate.check_flag("per_image", per_image)
        self.ignore_index = _validate.check_ignore_index(ignore_index)
        self.from_logits = _validate.check_flag("from_logits", from_logits)
        self.backend = _check_backend_name(backend)
        weights = _validate.normalize_class_weights(class_weights)
        if weights is not None and weights.dim() != 1:
            raise ValueError(
                "class_weights must be 1-D, one weight per class; "
                f"got shape {_validate.shape_str(weights.shape)}"
            )
        self.register_buffer("class_weights", weights)
        check_dist_options(process_group, dist_mode, bins, allow_fp16_grid=True)
        self.process_group = process_group
        self.dist_mode = dist_mode
        self.bins = bins
        self._classes_mode = self.classes if isinstance(self.classes, str) else "list"
        self._class_list = [] if isinstance(self.classes, str) else sorted(self.classes)
        self._backend_name = "" if backend is None else backend
        self._distributed = process_group is not None

    def forward(self, probas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            if self._distributed:
                raise RuntimeError(
                    "a scripted Lovász loss cannot take a process_group; use the eager or "
                    "torch.compile'd module for the global-batch loss")
            return softmax_loss(probas, labels, self.class_weights, self._classes_mode,
                                self._class_list, self.per_image, self.ignore_index,
                                self.from_logits, self._backend_name)
        return self._eager_forward(probas, labels)

    @torch.jit.unused
    def _eager_forward(self, probas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return lovasz_softmax(
            probas, labels, classes=self.classes, per_image=self.per_image,
            ignore_index=self.ignore_index, class_weights=self.class_weights,
            from_logits=self.from_logits, backend=self.backend,
            process_group=self.process_group, dist_mode=self.dist_mode, bins=self.bins,
        )

    def extra_repr(self) -> str:
        weights = "" if self.class_weights is None else (
            f", class_weights={[round(w, 4) for w in self.class_weights.tolist()]}"
        )
        return (
            f"classes={self.classes!r}, per_image={self.per_image}, "
            f"ignore_index={self.ignore_index}{weights}, from_logits={self.from_logits}, "
            f"backend={self.backend!r}{_dist_repr(self)}"
        )
