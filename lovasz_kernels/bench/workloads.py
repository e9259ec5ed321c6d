"""What is timed: workloads, their seeded inputs, and one fwd+bwd call per contender.

A *workload* is one loss on one input shape: ``lovasz_softmax``, ``lovasz_hinge`` or the bare
kernel ``lovasz_extension``, with a batch of ``batch`` square images of ``side`` pixels a side.
The *contenders* timed on a workload are the backends, :data:`LOOP` (the per-class loop users
replace) and :data:`FLOOR` (a sort of as many keys as the loss sorts, see
:mod:`lovasz_kernels.bench.floors`). Every harness (``lovasz-kernels bench``, the asv suite,
``tests/perf``) builds its inputs here, from the same seed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import torch

from lovasz_kernels import _cases
from lovasz_kernels._validate import compute_dtype
from lovasz_kernels.bench.baselines import (
    per_class_loop_lovasz_softmax,
    per_image_loop_lovasz_hinge,
)
from lovasz_kernels.losses import lovasz_extension, lovasz_hinge, lovasz_softmax

SEED = 0
LOSSES = ("softmax", "hinge", "extension")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
#: the per-class Python loop of the common public implementation (:mod:`.baselines`)
LOOP = "loop"
#: a sort of as many keys as the loss sorts (:mod:`.floors`)
FLOOR = "floor"
#: the cross-check used where the numpy reference would take too long: the torch backend
#: computing in float64 on the benchmark's device
TORCH_FLOAT64 = "torch float64"

#: how the scores relate to the labels: ``random`` (independent of them, the default: every
#: backend sorts the same work, whatever the data) or ``trained`` (favouring the labelled
#: class, as a network's scores do once it has learned; a shortcut that depends on the data,
#: such as the numba backend leaving out of its sort the background pixels past a segment's
#: last fg pixel, shows there what it gives in training)
SCORES = ("random", "trained")
#: ``trained`` softmax logits: the labelled class's logit raised by this much over standard
#: normal ones (its pixels are argmax-right: about 97% at 21 classes, 90% at 150)
TRAINED_SOFTMAX_MARGIN = 4.0
#: ``trained`` hinge logits: shifted by this much towards the label's side (about half the
#: pixels then still within the margin, with a positive hinge error)
TRAINED_HINGE_MARGIN = 1.0

_NAME = re.compile(r"(softmax|hinge|extension) (\d+)x(\d+)x(\d+)(?:x(\d+))? (per-image|batch) "
                   r"(\w+)(?: (trained))?")


@dataclass(frozen=True)
class Workload:
    """One loss on a batch of ``batch`` images of ``side`` x ``side`` pixels.

    ``classes`` is 1 for the hinge. ``per_image``: one segment per (image, class) instead of
    one per class over the whole batch. ``extension`` times the bare kernel on the (S, P)
    errors the softmax loss of the same shape would build.
    """

    loss: str
    batch: int
    side: int
    classes: int = 1
    per_image: bool = False
    dtype: str = "float32"
    scores: str = "random"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        for field in ("batch", "side", "classes"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer; got {value!r}")
        if self.loss == "hinge" and self.classes != 1:
            raise ValueError(f"the hinge is binary: classes must be 1; got {self.classes}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.scores not in SCORES:
            raise ValueError(f"scores must be one of {', '.join(SCORES)}; got {self.scores!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def pixels_per_image(self) -> int:
        return self.side * self.side

    @property
    def pixels(self) -> int:
        """Pixels in the batch."""
        return self.batch * self.pixels_per_image

    @property
    def segments(self) -> int:
        """Segments sorted when every class is present (random labels, large images)."""
        return self.classes * (self.batch if self.per_image else 1)

    @property
    def segment_pixels(self) -> int:
        return self.pixels_per_image * (1 if self.per_image else self.batch)

    @property
    def elements(self) -> int:
        """(segment, pixel) pairs: the keys a loss call sorts."""
        return self.segments * self.segment_pixels

    @property
    def name(self) -> str:
        """A short unique id, e.g. ``softmax 1x512x512x21 batch float32`` (``... trained``
        for trained-like scores); see :meth:`parse`."""
        shape = f"{self.batch}x{self.side}x{self.side}"
        if self.loss != "hinge":
            shape += f"x{self.classes}"
        mode = "per-image" if self.per_image else "batch"
        trained = " trained" if self.scores == "trained" else ""
        return f"{self.loss} {shape} {mode} {self.dtype}{trained}"

    @classmethod
    def parse(cls, name: str) -> Workload:
        match = _NAME.fullmatch(name)
        if match is None or match[3] != match[4]:
            raise ValueError(f"not a workload name: {name!r} (e.g. "
                             f"{Workload('softmax', 1, 512, 21).name!r})")
        loss, batch, side, _, classes, mode, dtype, trained = match.groups()
        return cls(loss, int(batch), int(side), int(classes or 1), mode == "per-image", dtype,
                   trained or "random")

    def describe(self) -> str:
        """A table heading: what is computed, on which shape."""
        if self.loss == "softmax":
            what = (f"lovasz_softmax fwd+bwd, {self.dtype}, batch {self.batch} x {self.classes} "
                    f"classes x {self.side}x{self.side} pixels")
        elif self.loss == "hinge":
            what = (f"lovasz_hinge fwd+bwd, {self.dtype}, batch {self.batch} x "
                    f"{self.side}x{self.side} pixels")
        else:
            what = (f"lovasz_extension, {self.dtype}, {self.segments} segments x "
                    f"{self.segment_pixels} pixels (the softmax errors of batch {self.batch} x "
                    f"{self.classes} classes x {self.side}x{self.side})")
        scores = ", trained-like scores" if self.scores == "trained" else ""
        return f"{what}, per_image={self.per_image}{scores}"

    def key(self) -> dict:
        """The workload's fields for a JSON record."""
        return {
            "workload": self.name, "description": self.describe(), "loss": self.loss,
            "batch": self.batch, "side": self.side, "pixels_per_image": self.pixels_per_image,
            "classes": None if self.loss == "hinge" else self.classes,
            "per_image": self.per_image, "dtype": self.dtype, "scores": self.scores,
            "segments": self.segments,
            "pixels_per_segment": self.segment_pixels,
        }


# --------------------------------------------------------------------------------------------
# seeded inputs


def softmax_inputs(
    batch: int, num_classes: int, side: int, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", seed: int = SEED, trained: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``(probas (B, C, side, side), labels (B, side, side))`` for Lovász-Softmax.

    Probabilities are a softmax of standard normal logits computed in float32, then cast to
    ``dtype`` (so every dtype sees the same distribution); labels are uniform over classes.
    ``trained``: the labelled class's logit raised by :data:`TRAINED_SOFTMAX_MARGIN`.
    """
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_classes, side, side, generator=gen)
    labels = torch.randint(0, num_classes, (batch, side, side), generator=gen)
    if trained:
        logits.scatter_add_(1, labels[:, None],
                            torch.full_like(logits[:, :1], TRAINED_SOFTMAX_MARGIN))
    return logits.softmax(dim=1).to(device, dtype), labels.to(device)


def hinge_inputs(
    batch: int, side: int, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", seed: int = SEED, foreground: float = 0.5,
    trained: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``(logits (B, side, side) ~ N(0, 1), labels (B, side, side) in {0, 1})``,
    each label 1 with probability ``foreground``; ``trained``: the logits shifted by
    :data:`TRAINED_HINGE_MARGIN` towards the label's sign."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, side, side, generator=gen)
    labels = (torch.rand(batch, side, side, generator=gen) < foreground).long()
    if trained:
        logits += TRAINED_HINGE_MARGIN * (2.0 * labels - 1.0)
    return logits.to(device, dtype), labels.to(device)


def _segment_rows(workload: Workload, per_pixel: torch.Tensor) -> torch.Tensor:
    """A per-pixel tensor of the loss's input, (B, C, H, W) or (B, H, W), as (S, P) rows in
    segment order: segment (image b, class c) is row b·C + c per image, class c per batch."""
    if workload.loss == "hinge":
        return per_pixel.reshape(workload.batch if workload.per_image else 1, -1)
    if workload.per_image:
        return per_pixel.reshape(workload.batch * workload.classes, -1)
    return per_pixel.movedim(1, 0).reshape(workload.classes, -1)


def segment_errors(
    workload: Workload, scores: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(errors, fg), (S, P) in segment order, as the loss builds them in its compute dtype.

    Softmax: ``1 − p`` on the class's pixels, ``p`` elsewhere; hinge: ``1 − logit · (2y − 1)``.
    Computed in the loss's compute dtype, so equal errors here are the ties every backend sees.
    """
    scores = scores.detach().to(compute_dtype(scores.dtype))
    if workload.loss == "hinge":
        fg = labels == 1
        errors = 1 - scores * (2.0 * fg.to(scores.dtype) - 1.0)
    else:
        classes = torch.arange(workload.classes, device=labels.device).view(1, -1, 1, 1)
        fg = labels[:, None] == classes
        errors = torch.where(fg, 1 - scores, scores)
    return _segment_rows(workload, errors), _segment_rows(workload, fg)


class Prepared:
    """A workload's seeded inputs on ``device`` and a fwd+bwd call per contender.

    ``scores`` and ``labels`` are the loss's inputs: probabilities (B, C, H, W) and labels for
    the softmax, logits and {0, 1} labels (B, H, W) for the hinge, (S, P) errors and fg for
    the bare kernel.
    """

    def __init__(self, workload: Workload, device: torch.device | str = "cpu",
                 seed: int = SEED):
        self.workload = workload
        self.device = torch.device(device)
        w = workload
        if w.loss == "hinge":
            self.scores, self.labels = hinge_inputs(w.batch, w.side, w.torch_dtype,
                                                    self.device, seed,
                                                    trained=w.scores == "trained")
        else:
            self.scores, self.labels = softmax_inputs(w.batch, w.classes, w.side,
                                                      w.torch_dtype, self.device, seed,
                                                      trained=w.scores == "trained")
            if w.loss == "extension":
                errors, self.labels = segment_errors(w, self.scores, self.labels)
                self.scores = errors.to(w.torch_dtype)

    @property
    def input_bytes(self) -> int:
        """Size of the scores (probabilities, logits or errors): the unit of peak memory."""
        return self.scores.numel() * self.scores.element_size()

    def fwd_bwd(self, contender: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and gradient w.r.t. the scores for a backend name or :data:`LOOP`."""
        return _fwd_bwd(self.workload, contender, self.scores, self.labels)

    def reference(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-check's answer: ``"numpy"`` (the reference, on CPU copies) or
        :data:`TORCH_FLOAT64` (the torch backend in float64 on this device)."""
        if kind == "numpy":
            return _fwd_bwd(self.workload, "numpy", self.scores.cpu(), self.labels.cpu())
        if kind == TORCH_FLOAT64:
            return _fwd_bwd(self.workload, "torch", self.scores.double(), self.labels)
        raise ValueError(f"reference must be 'numpy' or {TORCH_FLOAT64!r}; got {kind!r}")

    @cached_property
    def errors_and_fg(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, P) errors in the compute dtype and fg, every segment (see :func:`segment_errors`)."""
        if self.workload.loss == "extension":
            return self.scores.to(compute_dtype(self.scores.dtype)), self.labels
        return segment_errors(self.workload, self.scores, self.labels)

    def sorted_segments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(errors, fg) of the segments the loss sorts: a softmax skips absent classes."""
        errors, fg = self.errors_and_fg
        if self.workload.loss == "softmax":
            present = fg.any(dim=1)
            return errors[present], fg[present]
        return errors, fg

    def _error_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """A gradient w.r.t. the scores as one w.r.t. the (S, P) errors, in float64."""
        grad = grad.detach().to(torch.float64)
        if self.workload.loss == "extension":
            return grad
        # d error / d score is −1 on fg and +1 elsewhere, for the softmax (1 − p or p) and the
        # hinge (1 − logit · (2y − 1)) alike
        _, fg = self.errors_and_fg
        score_grad = _segment_rows(self.workload, grad)
        return torch.where(fg.to(grad.device), -score_grad, score_grad)

    def tie_group_sums(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient summed over each group of equal errors of a segment, per pixel.

        Tied errors may be sorted in any order, which moves the gradient within the group but
        not its total: comparing these sums compares two answers whatever their tie order.
        """
        errors, _ = self.errors_and_fg
        return _cases.tie_group_sums(errors.to(grad.device), self._error_grad(grad))

    def tie_group_tolerance(self, grad: torch.Tensor, tol: _cases.Tolerance) -> torch.Tensor:
        """Per pixel, the sum over its tie group of the per-entry tolerance around ``grad``.

        A group's total may be off by its members' tolerances together: a half-precision
        gradient is rounded once per pixel, and a large tie group adds up those roundings.
        """
        errors, _ = self.errors_and_fg
        per_entry = tol.atol + tol.rtol * self._error_grad(grad).abs()
        return _cases.tie_group_sums(errors.to(grad.device), per_entry)


def _fwd_bwd(workload: Workload, contender: str, scores: torch.Tensor,
             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if workload.loss == "extension":
        if contender == LOOP:
            raise ValueError("the per-class loop is a loss, not a kernel: no extension workload")
        loss, grad = lovasz_extension(scores, labels, backend=contender)
        return loss, grad
    scores = scores.detach().requires_grad_()  # a fresh leaf, no copy
    if workload.loss == "softmax":
        if contender == LOOP:
            loss = per_class_loop_lovasz_softmax(scores, labels, workload.per_image)
        else:
            loss = lovasz_softmax(scores, labels, per_image=workload.per_image,
                                  backend=contender)
    elif contender == LOOP:
        loss = per_image_loop_lovasz_hinge(scores, labels, workload.per_image)
    else:
        loss = lovasz_hinge(scores, labels, per_image=workload.per_image, backend=contender)
    loss.backward()
    return loss.detach(), scores.grad


# --------------------------------------------------------------------------------------------
# grids


#: ``lovasz-kernels bench``: image sides of the default and the ``--quick`` sweep
DEFAULT_SIDES = (64, 256, 512, 1024)
QUICK_SIDES = (64, 128, 256)

#: The standard CPU workloads (float32): the sizes the performance goals are stated on. The
#: asv suite and ``tests/perf`` time these; append, never change an entry (history stays
#: comparable).
SUITE: tuple[Workload, ...] = (
    Workload("softmax", 1, 512, 21),
    Workload("softmax", 1, 256, 150),
    Workload("softmax", 8, 64, 5, per_image=True),
    Workload("softmax", 4, 256, 21, per_image=True),
    Workload("softmax", 1, 1024, 2),
    Workload("softmax", 16, 32, 21, per_image=True),
    Workload("hinge", 1, 1024, per_image=True),
    Workload("hinge", 8, 256, per_image=True),
    Workload("extension", 1, 512, 21),
    Workload("extension", 1, 1024, 2),
    # scores that favour the label: what leaving the settled tail out of the sort gives
    # nearer training (with random labels it leaves out every background pixel)
    Workload("softmax", 1, 512, 21, scores="trained"),
    Workload("softmax", 4, 256, 21, per_image=True, scores="trained"),
)

#: Added by the full grid (asv with ``LOVASZ_BENCH_GRID=full``): larger inputs and float16.
FULL_SUITE_EXTRA: tuple[Workload, ...] = (
    Workload("softmax", 1, 512, 150),
    Workload("softmax", 1, 1024, 21),
    Workload("softmax", 8, 512, 21),
    Workload("softmax", 1, 512, 21, dtype="float16"),
    Workload("hinge", 1, 2048, per_image=True),
    Workload("hinge", 8, 256, dtype="float16", per_image=True),
    Workload("extension", 1, 1024, 21),
    # batch IoU over large images: one segment of 8M pixels per class, which the torch
    # backend sorts a range of values at a time
    Workload("hinge", 8, 1024),
    Workload("softmax", 8, 1024, 2),
)

#: The GPU goals' sizes: 2^20 pixels x 21 classes, and 8 x 512² x 21 over the batch.
CUDA_SUITE: tuple[Workload, ...] = (
    Workload("softmax", 1, 1024, 21),
    Workload("softmax", 8, 512, 21),
    Workload("softmax", 1, 1024, 21, dtype="float16"),
    Workload("hinge", 8, 512, per_image=True),
)
