"""The losses and the kernel as PyTorch custom operators (namespace ``lovasz_kernels``).

Everything that depends on values — the value checks, which classes are present, how many
segments there are, which backend runs and the run itself — happens inside an operator that
compilers treat as opaque, with a fake implementation that gives shapes and dtypes only. So
``torch.compile`` (default and ``fullgraph=True``) traces a loss call as one node, and Dynamo
never reaches a ``.item()``, a numba dispatcher or a collective.

Operators (all functional, outputs never alias inputs):

``lovasz_kernels::lovasz_loss(scores, labels, class_weights, classes, class_list, per_image,
ignore_index, kind, backend, group_name, dist_mode, bins, reduction) -> (loss, grad)``
    The whole loss of one call (:func:`lovasz_kernels.lovasz_softmax` or
    :func:`lovasz_kernels.lovasz_hinge`) and its gradient w.r.t. ``scores``, computed once in
    forward; backward only scales the saved gradient. With ``reduction="none"`` the loss is
    one per image, (B,), and ``grad`` holds each image's derivative (its Jacobian's rows).
``lovasz_kernels::lovasz_extension(errors, fg, backend) -> (loss, grad)``
    The kernel on (S, P) segments; the per-segment loss is differentiable w.r.t. ``errors``.
``lovasz_kernels::lovasz_grad(gt_sorted) -> increments``
    Algorithm 1 of the paper.

Autograd. The Lovász extension is piecewise linear, so its gradient is the saved ``grad``
output and its second derivative is zero almost everywhere. The formula is registered on the
operators (so TorchScript and direct ``torch.ops`` calls differentiate) and used by an
``autograd.Function`` with ``setup_context`` around each of them, through which the Python
functions call the operators: that form is what ``torch.func`` transforms require. ``vmap``
runs the operator once per mapped slice. Forward mode (``torch.func.jvp``, dual tensors) is
the same formula the other way: d loss = <saved gradient, tangent>.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch.autograd import forward_ad

from lovasz_kernels import _validate
from lovasz_kernels._jaccard import jaccard_increments
from lovasz_kernels._plan import (
    LabelCensus,
    generic_lovasz_loss,
    plan_segments,
    reads_are_free,
    reduce_per_image,
)
from lovasz_kernels._registry import Backend, select_backend


@dataclass(frozen=True)
class LossKind:
    """What the scores and labels of a loss call are."""

    scores_name: str  # the scores' name in messages: "probas" or "logits"
    bg_offset: float  # a background pixel's error is score + bg_offset (foreground: 1 - score)
    multilabel: bool  # labels (B, C, *spatial): one binary problem per channel
    value_check: str  # "simplex" (probabilities summing to 1), "unit_interval", "finite"
    checked_name: str = ""  # the name the value checks use, when not scores_name


LOSS_KINDS = {
    # lovasz_softmax: probabilities (B, C, *spatial), labels (B, *spatial); C == 1: P(class 1)
    "probas": LossKind("probas", 0.0, False, "simplex"),
    "softmax_of_logits": LossKind(
        "probas", 0.0, False, "finite", "probas (softmax of the logits, from_logits=True)"),
    # lovasz_hinge: logits (B, *spatial) or (B, 1, *spatial), labels (B, *spatial)
    "hinge": LossKind("logits", 1.0, False, "finite"),
    # multilabel: scores and labels (B, C, *spatial), labels in {0, 1}
    "multilabel_hinge": LossKind("logits", 1.0, True, "finite"),
    "multilabel_probas": LossKind("probas", 0.0, True, "unit_interval"),
    "sigmoid_of_logits": LossKind(
        "probas", 0.0, True, "finite", "probas (sigmoid of the logits, from_logits=True)"),
}
CLASS_MODES = ("present", "all", "list")


# --------------------------------------------------------------------------------------------
# Shapes (metadata only: called by the Python functions, the operators and their fakes)


def loss_shapes(
    kind: str, scores: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the inputs as scores (B, C, P) and labels (B, P) ((B, C, P) for a multilabel
    kind), or a ValueError naming them.

    ``kind="hinge"``: logits (B, *spatial) or (B, 1, *spatial), labels (B, *spatial) (C = 1).
    Otherwise probabilities (B, C, *spatial) and labels (B, *spatial); with C == 1 labels
    may also have the probabilities' shape.
    """
    shape = _validate.shape_str
    if LOSS_KINDS[kind].multilabel:
        name = LOSS_KINDS[kind].scores_name
        if scores.dim() < 2 or scores.shape[1] == 0:
            raise ValueError(f"{name} must have shape (B, C, *spatial) with C >= 1 channels; "
                             f"got {shape(scores.shape)}")
        if labels.shape != scores.shape:
            raise ValueError(
                f"labels must have the shape of {name} {shape(scores.shape)} (B, C, *spatial): "
                f"one binary mask per channel; got {shape(labels.shape)}")
        batch, channels = scores.shape[:2]
        num_pixels = _pixels(scores.shape[2:])
        return (scores.reshape(batch, channels, num_pixels),
                labels.reshape(batch, channels, num_pixels))
    if kind == "hinge":
        if scores.dim() == 0:
            raise ValueError(
                "logits must have shape (B, *spatial) or (B, 1, *spatial); got a scalar")
        squeezable = (
            scores.dim() >= 2 and scores.shape[1] == 1
            and labels.shape == scores.shape[:1] + scores.shape[2:]
        )
        if labels.shape != scores.shape and not squeezable:
            raise ValueError(
                f"labels must have shape (B, *spatial) matching logits (B, *spatial) or "
                f"(B, 1, *spatial); got {shape(labels.shape)} for logits {shape(scores.shape)}"
            )
        batch, num_pixels = scores.shape[0], _pixels(labels.shape[1:])
        return scores.reshape(batch, 1, num_pixels), labels.reshape(batch, num_pixels)
    name = "probas"
    if scores.dim() < 2:
        raise ValueError(f"{name} must have shape (B, C, *spatial); got {shape(scores.shape)}")
    batch, num_classes = scores.shape[:2]
    if num_classes == 0:
        raise ValueError(
            f"{name} must have at least one class (C >= 1) in shape (B, C, *spatial); "
            f"got {shape(scores.shape)}"
        )
    expected = scores.shape[:1] + scores.shape[2:]
    sigmoid_layout = num_classes == 1 and labels.shape == scores.shape
    if labels.shape != expected and not sigmoid_layout:
        raise ValueError(
            f"labels must have shape {shape(expected)} (B, *spatial) matching {name} "
            f"(B, C, *spatial); got {shape(labels.shape)} for {name} {shape(scores.shape)}"
        )
    num_pixels = _pixels(scores.shape[2:])
    return scores.reshape(batch, num_classes, num_pixels), labels.reshape(batch, num_pixels)


def hinge_shapes(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a binary problem as (B, P) views (see :func:`loss_shapes`)."""
    logits_3d, labels_2d = loss_shapes("hinge", logits, labels)
    return logits_3d[:, 0], labels_2d


def _pixels(spatial: torch.Size) -> int:
    count = 1
    for size in spatial:
        count *= size
    return count


def check_loss_arguments(
    kind: str, scores: torch.Tensor, labels: torch.Tensor,
    class_weights: torch.Tensor | None, classes: str, class_list: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every check that reads no value; returns the (B, C, P) / (B, P) views."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind must be one of {sorted(LOSS_KINDS)}; got {kind!r}")
    if classes not in CLASS_MODES:
        raise ValueError(f"classes must be one of {CLASS_MODES}; got {classes!r}")
    scores_name = LOSS_KINDS[kind].scores_name
    _validate.check_floating(scores_name, scores)
    _validate.check_same_device("labels", labels, scores_name, scores)
    scores_3d, labels_2d = loss_shapes(kind, scores, labels)
    num_classes = scores_3d.shape[1]
    binary = num_classes == 1 or LOSS_KINDS[kind].multilabel
    _validate.check_label_dtype("labels", labels, binary=binary)
    if classes == "list":
        _validate.resolve_classes(list(class_list), num_classes)
    if class_weights is not None:
        if class_weights.shape != (num_classes,):
            raise ValueError(
                f"class_weights must have shape ({num_classes},), one weight per class; "
                f"got {_validate.shape_str(class_weights.shape)}"
            )
        _validate.check_same_device("class_weights", class_weights, scores_name, scores)
    return scores_3d, labels_2d


# --------------------------------------------------------------------------------------------
# The loss operator


def _lovasz_loss_impl(
    scores: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor | None,
    classes: str,
    class_list: list[int],
    per_image: bool,
    ignore_index: int | None,
    kind: str,
    backend: str,
    group_name: str,
    dist_mode: str,
    bins: str,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (0-d, compute dtype; (B,) for ``reduction="none"``) and its gradient w.r.t.
    ``scores`` (shape of ``scores``, compute dtype) of one loss call; see the module
    docstring and :mod:`lovasz_kernels._plan`.

    ``backend`` "" picks one for the device; ``group_name`` "" means no process group;
    ``bins`` is the histogram mode's bin count as text, or "fp16".
    """
    scores_3d, labels_2d = check_loss_arguments(
        kind, scores, labels, class_weights, classes, class_list)
    _validate.check_reduction(reduction, per_image)
    num_classes = scores_3d.shape[1]
    group_batch = None
    if group_name and not per_image:
        from lovasz_kernels.distributed import GroupBatch

        group_batch = GroupBatch(group_name, dist_mode, bins, labels_2d.numel(),
                                 value_range=None if LOSS_KINDS[kind].bg_offset else 1.0)
    multilabel = LOSS_KINDS[kind].multilabel
    try:
        labels_2d = _validate.label_values(
            "labels", labels_2d, binary=num_classes == 1 or multilabel)
        chosen = select_backend(backend or None, scores.device)
        census = None
        if (group_batch is None and not multilabel and num_classes > 1
                and reads_are_free(labels_2d.device)):
            census = chosen.label_census(labels_2d, num_classes, ignore_index)
        if _validate.validate_values_enabled():
            _check_loss_values(kind, scores_3d, labels_2d, ignore_index, class_weights,
                               census, chosen if reads_are_free(scores.device) else None)
    except ValueError:
        if group_batch is not None:  # the other ranks must not wait for this one
            group_batch.agree(_agreed_options(scores_3d, kind, dist_mode, bins, classes),
                              labels.device, failed=True)
        raise
    plan_options = dict(
        labels=labels_2d, num_classes=num_classes, classes=classes, class_list=list(class_list),
        # constants: the operator's gradient is w.r.t. the scores only, and backends read the
        # weights' values (numba through numpy, which refuses a tensor that requires grad)
        class_weights=(None if class_weights is None
                       else class_weights.detach().to(torch.float64)),
        per_image=per_image, ignore_index=ignore_index, bg_offset=LOSS_KINDS[kind].bg_offset,
        labels_checked=_validate.validate_values_enabled(),
        multilabel=multilabel,
    )
    if group_batch is not None:
        group_batch.agree(_agreed_options(scores_3d, kind, dist_mode, bins, classes),
                          labels.device, failed=False)
        plan = plan_segments(**plan_options, reduce_counts=group_batch.census)
        loss, grad = generic_lovasz_loss(group_batch.extension_with(chosen), scores_3d,
                                         labels_2d, plan, chunked=False)
    else:
        plan = plan_segments(**plan_options, census=census)
        loss, grad = chosen.run_loss(scores_3d, labels_2d, plan)
        if reduction != "mean":
            loss, grad = reduce_per_image(plan, scores_3d, loss, grad.reshape(scores_3d.shape),
                                          reduction)
    compute = _validate.compute_dtype(scores.dtype)
    return loss.to(compute), grad.to(compute).reshape(scores.shape)


lovasz_loss_op = torch.library.custom_op("lovasz_kernels::lovasz_loss", mutates_args=())(
    _lovasz_loss_impl)


@lovasz_loss_op.register_fake
def _lovasz_loss_fake(scores, labels, class_weights, classes, class_list, per_image,
                      ignore_index, kind, backend, group_name, dist_mode, bins,
                      reduction="mean"):
    check_loss_arguments(kind, scores, labels, class_weights, classes, class_list)
    _validate.check_reduction(reduction, per_image)
    compute = _validate.compute_dtype(scores.dtype)
    loss_shape = scores.shape[:1] if reduction == "none" else ()
    return (scores.new_empty(loss_shape, dtype=compute),
            scores.new_empty(scores.shape, dtype=compute))


def _agreed_options(
    scores: torch.Tensor, kind: str, dist_mode: str, bins: str, classes: str
) -> dict[str, object]:
    """What every rank of a distributed call must share (see ``GroupBatch.agree``)."""
    return {"C (classes)": scores.shape[1], "kind of loss": kind, "dist_mode": dist_mode,
            "bins": bins, "dtype": scores.dtype, "classes": classes}


def _check_loss_values(
    kind: str, scores: torch.Tensor, labels: torch.Tensor, ignore_index: int | None,
    class_weights: torch.Tensor | None, census: LabelCensus | None = None,
    backend: Backend | None = None,
) -> None:
    """The checks that read values (one pass each; a device synchronisation on a GPU). A
    backend's census of the labels has checked their range already: they are looked at
    again only to explain labels out of range. ``backend`` (where reads are free) may prove
    the scores valid in a pass of its own (its ``check_scores``); the shared check runs where
    it does not."""
    loss_kind = LOSS_KINDS[kind]
    num_classes = 2 if loss_kind.multilabel else max(scores.shape[1], 2)
    valid_range = "{0, 1}" if num_classes == 2 else f"[0, {num_classes})"
    if census is None or census.out_of_range:
        _validate.check_labels(labels, valid_range, num_classes, ignore_index)
    name = loss_kind.checked_name or loss_kind.scores_name
    proven = backend is not None and backend.check_scores(scores, loss_kind.value_check)
    if not proven and loss_kind.value_check == "finite":
        _validate.check_finite(name, scores)
    elif not proven:
        _validate.check_probas(scores, simplex=loss_kind.value_check == "simplex")
    if class_weights is not None:
        _validate.check_class_weight_values(class_weights)


# --------------------------------------------------------------------------------------------
# The kernel operators


def _lovasz_extension_impl(
    errors: torch.Tensor, fg: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (S,) and gradient (S, P) of the Lovász extension of each row (see
    :func:`lovasz_kernels.lovasz_extension`)."""
    _validate.check_extension_inputs(errors, fg)
    return select_backend(backend or None, errors.device).run(errors, fg)


lovasz_extension_op = torch.library.custom_op(
    "lovasz_kernels::lovasz_extension", mutates_args=())(_lovasz_extension_impl)


@lovasz_extension_op.register_fake
def _lovasz_extension_fake(errors, fg, backend):
    _validate.check_extension_shapes(errors, fg)
    loss = errors.new_empty(errors.shape[:1], dtype=_validate.compute_dtype(errors.dtype))
    return loss, errors.new_empty(errors.shape)


@torch.library.custom_op("lovasz_kernels::lovasz_grad", mutates_args=())
def lovasz_grad_op(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of the paper on (..., P) sorted ground truth (see
    :func:`lovasz_kernels.lovasz_grad`)."""
    dtype = _increments_dtype(gt_sorted)
    if gt_sorted.dtype != torch.bool:
        if _validate.validate_values_enabled() and bool(
            ((gt_sorted != 0) & (gt_sorted != 1)).any()
        ):
            raise ValueError("gt_sorted must contain only 0 and 1 (or be a bool tensor)")
        gt_sorted = gt_sorted != 0
    if gt_sorted.shape[-1] == 0:
        return torch.zeros(gt_sorted.shape, dtype=dtype, device=gt_sorted.device)
    return jaccard_increments(gt_sorted, dtype)


@lovasz_grad_op.register_fake
def _lovasz_grad_fake(gt_sorted):
    return gt_sorted.new_empty(gt_sorted.shape, dtype=_increments_dtype(gt_sorted))


def _increments_dtype(gt_sorted: torch.Tensor) -> torch.dtype:
    return torch.float64 if gt_sorted.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Autograd: one formula for both operators that return (loss, grad)


def _setup_context(ctx, inputs, output) -> None:
    ctx.set_materialize_grads(False)
    ctx.input_dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])


#: where the loss operator takes its process group's name (a global-batch loss)
_LOSS_GROUP_ARGUMENT = 9


def _setup_context_with_tangents(group_argument: int | None):
    """A ``setup_context`` for the Functions that do forward mode: :func:`_setup_context`,
    the gradient kept for :func:`_jvp` too (the same tensor), and the name of the process
    group at argument ``group_argument`` (None: the operator takes none)."""

    def setup_context(ctx, inputs, output) -> None:
        _setup_context(ctx, inputs, output)
        ctx.save_for_forward(output[1])
        ctx.loss_dim, ctx.loss_dtype = output[0].dim(), output[0].dtype
        ctx.group_name = "" if group_argument is None else inputs[group_argument]

    return setup_context


def _jvp(ctx, tangent: torch.Tensor | None, *others):
    """Forward mode: d loss = <saved gradient, tangent of the input> (summed over the input's
    dimensions beyond the loss's); the saved gradient's own tangent is zero a.e. Tangents of
    the other inputs (labels, class weights) are ignored, as backward gives them none. A
    global-batch loss is one number on every rank, a function of every rank's scores: its
    tangent is the sum of every rank's product (a collective, as the forward's are)."""
    (saved,) = ctx.saved_tensors
    if tangent is None:
        return None, None
    product = saved.to(ctx.loss_dtype) * tangent
    loss_tangent = product.sum(dim=tuple(range(ctx.loss_dim, product.dim())))
    if ctx.group_name:
        from lovasz_kernels.distributed import sum_over_group

        sum_over_group(loss_tangent, ctx.group_name)
    return loss_tangent.to(ctx.loss_dtype), torch.zeros_like(saved)


def _backward(ctx, d_loss: torch.Tensor | None, d_grad: torch.Tensor | None):
    """d input = d_loss · saved gradient; the saved gradient's own derivative is zero a.e."""
    (saved,) = ctx.saved_tensors
    others = (None,) * (len(ctx.needs_input_grad) - 1)
    if d_loss is None:
        # only the gradient output is differentiated (double backward): zero a.e.
        zero = None if d_grad is None else torch.zeros_like(saved, dtype=ctx.input_dtype)
        return (zero, *others)
    if _is_unit_host_scalar(d_loss) and not _graph_kept():
        # loss.backward(): the saved gradient is the answer, no full-size multiply. Safe to
        # hand out only when the graph is released after this step: then nothing else refers
        # to it and autograd may adopt it as .grad (a retained graph would see later in-place
        # changes of that .grad)
        return (saved.to(ctx.input_dtype), *others)
    scale = d_loss.reshape(d_loss.shape + (1,) * (saved.dim() - d_loss.dim()))
    if ctx.input_dtype != saved.dtype and _is_plain_eager(d_loss):
        # 16-bit scores: the product is rounded once, straight into their dtype (the same bits
        # as rounding a float32 product), with no float32 product twice their size beside
        # the saved gradient: on a GPU, where d_loss is never read, that made 5x the input
        narrow = torch.empty(saved.shape, dtype=ctx.input_dtype, device=saved.device)
        return (torch.mul(saved, scale, out=narrow), *others)
    return ((scale * saved).to(ctx.input_dtype), *others)


def _is_plain_eager(d_loss: torch.Tensor) -> bool:
    """d_loss needs no graph of its own, and no transform or tracer is active (an ``out=``
    product or a read of its value is safe)."""
    return (
        not d_loss.requires_grad
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
    )


def _is_unit_host_scalar(d_loss: torch.Tensor) -> bool:
    """d_loss is a plain 1 on a device whose values are free to read, and no transform or
    tracer is active. A tensor subclass is never read: a fake tensor (``FakeTensorMode``, as
    memory and FLOP estimators run a training step) has no value."""
    return (
        d_loss.numel() == 1
        and type(d_loss) is torch.Tensor
        and reads_are_free(d_loss.device)
        and _is_plain_eager(d_loss)
        and d_loss.item() == 1
    )


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph``/``create_graph``)."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):  # not inside the autograd engine: assume kept
        return True


lovasz_loss_op.register_autograd(_backward, setup_context=_setup_context)
lovasz_extension_op.register_autograd(_backward, setup_context=_setup_context)


def _vmap_by_slices(operator):
    """A vmap rule that runs ``operator`` once per mapped slice and stacks (loss, grad)."""

    def rule(info, in_dims, *args):
        results = []
        for index in range(info.batch_size):
            # in_dims mirrors the arguments (a list argument gets a list of Nones)
            sliced = [arg.select(dim, index) if isinstance(dim, int) else arg
                      for arg, dim in zip(args, in_dims)]
            results.append(operator(*sliced))
        losses = torch.stack([loss for loss, _ in results])
        grads = torch.stack([grad for _, grad in results])
        return (losses, grads), (0, 0)

    return rule


def _differentiable(operator, name: str, forward_mode: bool,
                    group_argument: int | None = None,
                    backward=_backward) -> type[torch.autograd.Function]:
    """``operator`` wrapped in an ``autograd.Function`` with ``setup_context`` (the form
    ``torch.func`` transforms require) and the operators' formula (or ``backward``) and vmap
    rule; with ``forward_mode``, also :func:`_jvp` (``torch.func.jvp``, ``jacfwd``), which
    Dynamo refuses to trace: the Function it compiles has none. ``group_argument``: as in
    :func:`_setup_context_with_tangents`."""

    overload = operator._opoverload  # what Dynamo traces in a closure (not the op's record)

    def forward(*args):
        return overload(*args)

    methods = {
        "__doc__": f"{operator} with the operators' autograd formula, for torch.func.",
        "forward": staticmethod(forward),
        "setup_context": staticmethod(_setup_context),
        "backward": staticmethod(backward),
        "vmap": staticmethod(_vmap_by_slices(operator)),
    }
    if forward_mode:
        methods["setup_context"] = staticmethod(_setup_context_with_tangents(group_argument))
        methods["jvp"] = staticmethod(_jvp)
    return type(name, (torch.autograd.Function,), methods)


_DIRECT_DEVICES = ("cpu", "cuda")


def _needs_dispatcher(tensors: tuple) -> bool:
    """Whether a call must go through the dispatcher: under a compiler or a ``torch.func``
    transform, a dispatch mode or the profiler (which records the operator by name), or with
    a tensor subclass (fake tensors included) or a device the implementation does not run on
    (meta tensors get the fake)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return True
    if torch._C._len_torch_dispatch_stack() or torch.autograd.profiler._is_profiler_enabled:
        return True
    return any(
        tensor is not None
        and (type(tensor) is not torch.Tensor or tensor.device.type not in _DIRECT_DEVICES)
        for tensor in tensors)


def _eager_caller(operator, implementation, num_tensors: int):
    """``operator(*args)`` for plain eager calls, which go straight to ``implementation``
    when nothing needs the dispatcher: its autograd, dispatch and checks cost a small CPU
    loss call a few percent, and the callers apply the autograd formula themselves.
    ``num_tensors``: the leading arguments that are tensors (or None)."""

    overload = operator._opoverload

    def call(*args):
        if _needs_dispatcher(args[:num_tensors]):
            return overload(*args)
        return implementation(*args)

    return call


def _eager_differentiable(call, name: str, group_argument: int | None = None,
                          forward_mode: bool = True,
                          backward=_backward) -> type[torch.autograd.Function]:
    """The same formula in the ``forward(ctx, ...)`` form, for plain eager calls of ``call``
    (an :func:`_eager_caller`): a ``setup_context`` Function binds its arguments with
    ``inspect.signature`` on every call, about a tenth of a small loss call's time.
    ``forward_mode`` and ``backward`` as in :func:`_differentiable`."""

    setup_context = (_setup_context_with_tangents(group_argument) if forward_mode
                     else _setup_context)

    def forward(ctx, *args):
        output = call(*args)
        setup_context(ctx, args, output)
        return output

    methods = {
        "__doc__": "An operator with its autograd formula, for eager calls.",
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    }
    if forward_mode:
        methods["jvp"] = staticmethod(_jvp)
    return type(name, (torch.autograd.Function,), methods)


def _function_for_call(for_compiler, for_transforms, for_eager):
    """The Function Dynamo can trace while compiling, the ``torch.func``-ready one while a
    transform is active, else the cheaper eager twin (the last two also do forward mode)."""
    if torch.compiler.is_compiling():
        return for_compiler
    if torch._C._are_functorch_transforms_active():
        return for_transforms
    return for_eager


def _differentiated(tensor: torch.Tensor) -> bool:
    """Whether a call on ``tensor`` must record its derivative: backward (grad mode and
    ``requires_grad``), or forward mode (a ``torch.func`` transform, which the bare operator
    would answer with a zero tangent, or a dual tensor of ``torch.autograd.forward_ad``)."""
    if torch.is_grad_enabled() and tensor.requires_grad:
        return True
    if torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():
        return True
    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(tensor).tangent is not None


_call_loss = _eager_caller(lovasz_loss_op, _lovasz_loss_impl, num_tensors=3)
_call_extension = _eager_caller(lovasz_extension_op, _lovasz_extension_impl, num_tensors=2)
_CompiledLossFunction = _differentiable(lovasz_loss_op, "_CompiledLossFunction",
                                       forward_mode=False)
_LossFunction = _differentiable(lovasz_loss_op, "_LossFunction", forward_mode=True,
                                group_argument=_LOSS_GROUP_ARGUMENT)
_EagerLossFunction = _eager_differentiable(_call_loss, "_EagerLossFunction",
                                           group_argument=_LOSS_GROUP_ARGUMENT)
_CompiledExtensionFunction = _differentiable(lovasz_extension_op, "_CompiledExtensionFunction",
                                            forward_mode=False)
_ExtensionFunction = _differentiable(lovasz_extension_op, "_ExtensionFunction",
                                     forward_mode=True)
_EagerExtensionFunction = _eager_differentiable(_call_extension, "_EagerExtensionFunction")


def lovasz_loss(
    scores: torch.Tensor,
    labels: torch.Tensor,
    class_weights: Optional[torch.Tensor],  # noqa: UP045 - TorchScript reads Optional, not X | None
    classes: str,
    class_list: list[int],
    per_image: bool,
    ignore_index: Optional[int],  # noqa: UP045
    kind: str,
    backend: str,
    group_name: str = "",
    dist_mode: str = "exact",
    bins: str = "65536",
    reduction: str = "mean",
) -> torch.Tensor:
    """The loss of one call through :data:`lovasz_loss_op`, differentiable (also under
    ``torch.func``); arguments as the operator's."""
    # TorchScript, scripted or traced, records the operator (its autograd is registered); a
    # Python autograd.Function would be traced as an opaque node that differs between traces
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return torch.ops.lovasz_kernels.lovasz_loss(
            scores, labels, class_weights, classes, class_list, per_image, ignore_index, kind,
            backend, group_name, dist_mode, bins, reduction)[0]
    if not _differentiated(scores):
        # nothing to differentiate (evaluation, no_grad): the bare operator
        return _call_loss(
            scores, labels, class_weights, classes, class_list, per_image, ignore_index, kind,
            backend, group_name, dist_mode, bins, reduction)[0]
    function = _function_for_call(_CompiledLossFunction, _LossFunction, _EagerLossFunction)
    return function.apply(
        scores, labels, class_weights, classes, class_list, per_image, ignore_index, kind,
        backend, group_name, dist_mode, bins, reduction)[0]


def lovasz_extension(
    errors: torch.Tensor, fg: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, grad) of :data:`lovasz_extension_op`, the loss differentiable w.r.t. errors."""
    if torch.jit.is_tracing():  # records the operator, as lovasz_loss does
        return torch.ops.lovasz_kernels.lovasz_extension(errors, fg, backend)
    if not _differentiated(errors):
        return _call_extension(errors, fg, backend)
    function = _function_for_call(_CompiledExtensionFunction, _ExtensionFunction,
                                  _EagerExtensionFunction)
    return function.apply(errors, fg, backend)
