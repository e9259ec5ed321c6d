"""``nn.Module`` wrappers of the Lovász losses.

The three modules store their options once, normalized, and share one ``forward``: eager and
``torch.compile`` call the Python function (with ``process_group`` support); a module compiled
with ``torch.jit.script`` calls the ``lovasz_kernels::lovasz_loss`` operator directly.
"""

from collections.abc import Sequence
from typing import List, Optional  # noqa: UP035 - TorchScript reads attribute annotations

import torch
from torch import nn

from lovasz_kernels import _ops, _validate
from lovasz_kernels._registry import get_backend
from lovasz_kernels.distributed import check_dist_options
from lovasz_kernels.losses import (
    _class_selection,
    _class_weights_tensor,
    _group_name,
    kind_loss,
)

__all__ = ["LovaszHingeLoss", "LovaszSigmoidLoss", "LovaszSoftmaxLoss"]


class _LovaszLoss(nn.Module):
    """Options shared by the modules; subclasses set the loss kind in ``__init__``."""

    class_weights: Optional[torch.Tensor]  # noqa: UP045 - TorchScript reads Optional
    _class_list: List[int]  # noqa: UP006

    def __init__(
        self,
        kind: str,
        classes: str | Sequence[int],
        per_image: bool,
        ignore_index: int | None,
        class_weights: Sequence[float] | torch.Tensor | None,
        backend: str | None,
        process_group: torch.distributed.ProcessGroup | None,
        dist_mode: str,
        bins: int | str,
        reduction: str,
    ) -> None:
        super().__init__()
        self.per_image = _validate.check_flag("per_image", per_image)
        self.reduction = _validate.check_reduction(reduction, self.per_image)
        self.ignore_index = _validate.check_ignore_index(ignore_index)
        if backend is not None:
            get_backend(backend)  # unknown names fail at construction, not mid-epoch
        self.backend = backend
        self.classes = _validate.normalize_classes(classes)
        self._classes_mode, self._class_list = _class_selection(self.classes)
        weights = _validate.normalize_class_weights(class_weights)
        if weights is not None and weights.dim() != 1:
            raise ValueError(
                "class_weights must be 1-D, one weight per class; "
                f"got shape {_validate.shape_str(weights.shape)}"
            )
        # a buffer: it follows .to(device) and is saved in the state_dict
        self.register_buffer("class_weights", weights)
        check_dist_options(process_group, dist_mode, bins,
                           allow_fp16_grid=_ops.LOSS_KINDS[kind].bg_offset == 0)
        self.process_group = process_group  # a plain attribute: not saved
        self.dist_mode = dist_mode
        self.bins = bins
        self._kind = kind
        self._backend_name = "" if backend is None else backend
        self._distributed = process_group is not None

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            if self._distributed:
                raise RuntimeError(
                    "a scripted Lovász loss cannot take a process_group; use the eager or "
                    "torch.compile'd module for the global-batch loss")
            return kind_loss(scores, labels, self.class_weights, self._classes_mode,
                             self._class_list, self.per_image, self.ignore_index, self._kind,
                             self._backend_name, reduction=self.reduction)
        return self._eager_forward(scores, labels)

    @torch.jit.unused
    def _eager_forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weights = _class_weights_tensor(self.class_weights, scores.device)
        _ops.check_loss_arguments(self._kind, scores, labels, weights, self._classes_mode,
                                  self._class_list)
        return kind_loss(
            scores, labels, weights, self._classes_mode, self._class_list, self.per_image,
            self.ignore_index, self._kind, self._backend_name,
            _group_name(self.process_group, self.per_image), self.dist_mode, str(self.bins),
            self.reduction,
        )

    def _options_repr(self) -> str:
        """class_weights, backend and the distributed options that differ from defaults."""
        parts = []
        if self.class_weights is not None:
            parts.append(f"class_weights={[round(w, 4) for w in self.class_weights.tolist()]}")
        return ", ".join(parts)

    def _tail_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}"] if self.reduction != "mean" else []
        parts.append(f"backend={self.backend!r}")
        if self.process_group is not None:
            parts.append("process_group=<ProcessGroup>")
        if self.dist_mode != "exact":
            parts.append(f"dist_mode={self.dist_mode!r}, bins={self.bins!r}")
        return ", ".join(parts)


class LovaszHingeLoss(_LovaszLoss):
    """Binary Lovász hinge as a module; see :func:`lovasz_kernels.lovasz_hinge`
    (``multilabel=True``: one binary problem per channel).

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
        *,
        multilabel: bool = False,
        classes: str | Sequence[int] = "present",
        class_weights: Sequence[float] | torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> None:
        multilabel = _validate.check_flag("multilabel", multilabel)
        if not multilabel and (classes != "present" or class_weights is not None):
            raise ValueError("classes and class_weights select and weigh the channels of a "
                             "multilabel problem: pass multilabel=True")
        super().__init__("multilabel_hinge" if multilabel else "hinge", classes, per_image,
                         ignore_index, class_weights, backend, process_group, dist_mode, bins,
                         reduction)
        self.multilabel = multilabel

    def extra_repr(self) -> str:
        parts = [f"per_image={self.per_image}", f"ignore_index={self.ignore_index}"]
        if self.multilabel:
            parts += ["multilabel=True", f"classes={self.classes!r}"]
        parts += [p for p in (self._options_repr(), self._tail_repr()) if p]
        return ", ".join(parts)


class LovaszSoftmaxLoss(_LovaszLoss):
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

    _from_logits_kind = "softmax_of_logits"
    _probas_kind = "probas"

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
        *,
        reduction: str = "mean",
    ) -> None:
        from_logits = _validate.check_flag("from_logits", from_logits)
        kind = self._from_logits_kind if from_logits else self._probas_kind
        super().__init__(kind, classes, per_image, ignore_index, class_weights, backend,
                         process_group, dist_mode, bins, reduction)
        self.from_logits = from_logits

    def extra_repr(self) -> str:
        parts = [f"classes={self.classes!r}", f"per_image={self.per_image}",
                 f"ignore_index={self.ignore_index}", self._options_repr(),
                 f"from_logits={self.from_logits}", self._tail_repr()]
        return ", ".join(p for p in parts if p)


class LovaszSigmoidLoss(LovaszSoftmaxLoss):
    """Multilabel Lovász-Sigmoid as a module; see :func:`lovasz_kernels.lovasz_sigmoid`.

    Examples
    --------
    >>> import torch
    >>> from lovasz_kernels import LovaszSigmoidLoss
    >>> criterion = LovaszSigmoidLoss(from_logits=True, per_image=True)
    >>> loss = criterion(torch.randn(2, 3, 8, 8), torch.rand(2, 3, 8, 8) > 0.5)
    """

    _from_logits_kind = "sigmoid_of_logits"
    _probas_kind = "multilabel_probas"
