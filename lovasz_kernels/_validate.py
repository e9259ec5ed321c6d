"""Input checks shared by every entry point.

Every message names the argument, what was expected and what was received. Shape and type
checks are free and always run; checks that read the values (NaN, label range, probabilities
summing to one) cost one pass over the data and, on a GPU, a device synchronisation, so they can
be switched off with :func:`set_validate_values` once a training script is known to be sound.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

from lovasz_kernels._masked import count_true

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_validate_values = True


def set_validate_values(enabled: bool) -> None:
    """Turn the value checks (NaN/inf scores, label range, probability simplex) on or off.

    They are on by default. Shape, dtype and device checks always run. With them off, input
    they would reject gives undefined results, which differ between backends (numba, for
    one, reads labels of 2 to 254 classes as bytes: a label of 256 counts as class 0).

    Examples
    --------
    >>> import lovasz_kernels
    >>> lovasz_kernels.set_validate_values(False)  # in a tuned training loop
    >>> lovasz_kernels.set_validate_values(True)
    """
    global _validate_values
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool; got {type(enabled).__name__}")
    _validate_values = enabled


def validate_values_enabled() -> bool:
    """Whether value checks run (see :func:`set_validate_values`)."""
    return _validate_values


# a dict lookup: torch.promote_types is a dispatched operator, a few microseconds per call
_COMPUTE_DTYPES = {dtype: torch.promote_types(dtype, torch.float32)
                   for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels compute in: the input dtype, but never below float32."""
    found = _COMPUTE_DTYPES.get(dtype)
    return torch.promote_types(dtype, torch.float32) if found is None else found


def shape_str(shape: Sequence[int]) -> str:
    """A shape as Python writes a tuple: (2, 3), (2,), ()."""
    return str(tuple(int(n) for n in shape))


def as_int(value: object) -> int | None:
    """``value`` as a Python int when it is an integer, Python's or numpy's
    (``numbers.Integral``: what ``np.unique`` and array indexing give), else None. A bool
    is not an integer here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def numpy_as_tensor(name: str, value: object) -> object:
    """A numpy array as a tensor (a copy: nothing keeps the caller's array), anything else as
    it is: the options that take a tensor (classes, class weights) take an array too."""
    if not isinstance(value, np.ndarray):
        return value
    try:
        return torch.tensor(value)
    except TypeError:
        raise TypeError(f"{name} as an array must hold numbers; got dtype {value.dtype}") from None


def check_tensor(name: str, value: object) -> torch.Tensor:
    """``value``, a dense tensor (sparse and nested tensors have no strides to read or
    reshape: refused here, not deep inside a kernel)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if value.layout != torch.strided or value.is_nested:
        layout = "nested" if value.is_nested else str(value.layout)
        raise TypeError(f"{name} must be a dense (strided) tensor; got a {layout} tensor "
                        f"(convert it with .to_dense() first)")
    return value


def check_floating(name: str, value: object) -> torch.Tensor:
    tensor = check_tensor(name, value)
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a float16, bfloat16, float32 or float64 tensor; got {tensor.dtype}"
        )
    return tensor


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return value


REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: object, per_image: bool) -> str:
    """``reduction`` of the per-image losses: "mean" over the images that count, their
    "sum", or "none" (one loss per image); the batch loss is one number, so only "mean"."""
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if reduction != "mean" and not per_image:
        raise ValueError(
            f"reduction={reduction!r} reduces the per-image losses and needs per_image=True; "
            "with per_image=False the loss of the batch is one number (reduction='mean')")
    return reduction


def check_same_device(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(
            f"{name} must be on the same device as {ref_name} ({ref.device}); got {value.device}"
        )


def check_ignore_index(ignore_index: object) -> int | None:
    if ignore_index is None:
        return None
    value = as_int(ignore_index)
    if value is None:
        raise TypeError(f"ignore_index must be an int or None; got {ignore_index!r}")
    ignore_index = value
    int64 = torch.iinfo(torch.int64)
    if not int64.min <= ignore_index <= int64.max:
        raise ValueError(f"ignore_index must fit in int64; got {ignore_index}")
    return ignore_index


def check_finite(name: str, tensor: torch.Tensor, hint: str = "") -> None:
    """Reject NaN and +-inf (a NaN sorts anywhere and silently corrupts every increment)."""
    if not _validate_values:
        return
    tensor = tensor.detach()
    if tensor.numel() == 0:
        return
    # one pass settles the usual case: a NaN makes both bounds NaN, an infinity is a bound
    low, high = (float(bound) for bound in torch.aminmax(tensor))
    if math.isfinite(low) and math.isfinite(high):
        return
    bad = ~torch.isfinite(tensor)
    n_bad = int(bad.sum())
    if n_bad:
        n_nan = int(torch.isnan(tensor).sum())
        raise ValueError(
            f"{name} must be finite; got {n_nan} NaN and {n_bad - n_nan} infinite values "
            f"out of {tensor.numel()}{hint}"
        )


def valid_pixels(labels: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """Bool mask of the pixels whose label is not ``ignore_index``.

    The comparison is made on int64 values, never in the labels' own dtype: ``uint8`` labels
    compared with ``ignore_index=256`` (or int32 labels with ``2**40``, or ``-100``) would
    wrap around and ignore a real class. An ``ignore_index`` the labels cannot hold simply
    matches no pixel. Every entry point (losses, prox, metrics) uses this one rule.
    """
    if ignore_index is None:
        return torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    if labels.dtype == torch.int64:
        return labels != ignore_index
    return labels.to(torch.int64) != ignore_index


def check_label_dtype(name: str, labels: torch.Tensor, *, binary: bool) -> None:
    """Integer and bool labels for every loss; floating 0/1 masks too when ``binary``."""
    if labels.dtype.is_complex or (labels.dtype.is_floating_point and not binary):
        raise TypeError(
            f"{name} must be an integer or bool tensor of class indices; got {labels.dtype} "
            "(convert with labels.long())"
        )


def label_values(name: str, labels: torch.Tensor, *, binary: bool) -> torch.Tensor:
    """Labels as the int64 class indices every kernel reads.

    Integer and bool labels are accepted for every loss. With ``binary`` (the hinge, the
    sigmoid case C == 1, the prox) floating masks are accepted too, as
    segmentation_models_pytorch users pass them (``y.float()``); their values must be whole
    numbers (0, 1 or the ignore label), checked with the other value checks.
    """
    check_label_dtype(name, labels, binary=binary)
    if labels.dtype.is_floating_point:
        if _validate_values and labels.numel():
            whole = labels == torch.round(labels)
            if not bool(whole.all()):
                example = float(labels[~whole].flatten()[0])
                raise ValueError(
                    f"{name} as a floating mask must hold whole numbers (0, 1 or the ignore "
                    f"label); got {int((~whole).sum())} other values (e.g. {example:g})"
                )
        return labels.to(torch.int64)
    return labels if labels.dtype == torch.int64 else labels.to(torch.int64)


def check_labels(
    labels: torch.Tensor, valid_values: str, num_classes: int, ignore_index: int | None,
    name: str = "labels",
) -> None:
    """Labels (int64, see :func:`label_values`) must lie in ``[0, num_classes)`` or equal
    ``ignore_index``."""
    if not _validate_values or labels.numel() == 0 or labels.dtype == torch.bool:
        return
    # one pass settles the usual case; the census below (three passes) runs only when some
    # label is outside [0, num_classes): ignored pixels, or an error to explain
    low, high = (int(bound) for bound in torch.aminmax(labels))
    if low >= 0 and high < num_classes:
        return
    out_of_range = ((labels < 0) | (labels >= num_classes)) & valid_pixels(labels, ignore_index)
    n_bad = int(count_true(out_of_range.reshape(-1)))
    if n_bad:
        bad_values = labels[out_of_range]
        example = int(bad_values.flatten()[0])
        ignore = "" if ignore_index is None else f" or ignore_index={ignore_index}"
        hint = ""
        if ignore_index is None and bool((bad_values == example).all()):
            # one value outside the classes, as a border or void label (255, -100) would be
            hint = f"; pass ignore_index={example} if those pixels are to be ignored"
        raise ValueError(
            f"{name} must be in {valid_values}{ignore}; got {n_bad} out-of-range values "
            f"(e.g. {example}){hint}"
        )


#: The bits of 1.0 in each float dtype. Read as integers of the float's width, the floats
#: from +0.0 up to 1.0 are exactly the integers [0, these bits], in the floats' order; -0.0,
#: every negative value and every NaN fall outside (below 0 as signed integers, above these
#: bits as unsigned ones).
BITS_OF_ONE = {
    torch.float16: 0x3C00,
    torch.bfloat16: 0x3F80,
    torch.float32: 0x3F800000,
    torch.float64: 0x3FF0000000000000,
}
_SIGNED_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_in_unit_interval(tensor: torch.Tensor) -> bool:
    """Whether every value is in [+0.0, 1.0], from the range of its bits (:data:`BITS_OF_ONE`):
    an integer min and max, which took 0.54-0.61 of the time of the floats' (no NaN rule) on
    2^21 to 10^7 float32 probabilities on a 2-core Intel Xeon VM. False sends the caller to
    the floats' own range (-0.0 is a probability too)."""
    if tensor.dtype not in BITS_OF_ONE:
        return False
    signed = _SIGNED_OF_WIDTH[tensor.element_size()]
    low, high = (int(bound) for bound in torch.aminmax(tensor.view(signed)))
    return low >= 0 and high <= BITS_OF_ONE[tensor.dtype]


def simplex_tolerance(dtype: torch.dtype) -> float:
    """How far from 1 a pixel's probabilities may sum: loose enough for probabilities
    rounded to bfloat16 (sums off by up to 2^-9) and then widened; tight enough to catch
    logits or a softmax over the wrong dim."""
    return max(1e-2, 4 * torch.finfo(dtype).eps)


def check_probas(probas: torch.Tensor, simplex: bool = True) -> None:
    """Probabilities lie in [0, 1] and, with ``simplex`` and C > 1 classes, sum to one over
    dim 1 (multilabel probabilities are independent per channel: no sum).

    One pass finds the range, of the values' bits (:func:`_bits_in_unit_interval`); only when
    that fails, the floats' own: the min and max of a tensor holding a NaN are NaN and an
    infinity is outside [0, 1], so a finite range in [0, 1] proves every value finite and
    the NaN/inf census (another pass) runs only to explain a failure.
    """
    if not _validate_values or probas.numel() == 0:
        return
    hint = "; pass from_logits=True if these are logits"
    probas = probas.detach()
    if not _bits_in_unit_interval(probas):
        low, high = (float(bound) for bound in torch.aminmax(probas))
        if not (low >= 0.0 and high <= 1.0):  # a NaN bound fails both comparisons
            check_finite("probas", probas, hint)
            raise ValueError(
                f"probas must lie in [0, 1]; got values in [{low:.4g}, {high:.4g}]{hint}")
    num_classes = probas.shape[1]
    if simplex and num_classes > 1:
        sums = probas.sum(dim=1, dtype=torch.float32)
        tolerance = simplex_tolerance(probas.dtype)
        low_sum, high_sum = (float(bound) for bound in torch.aminmax(sums))
        deviation = max(1.0 - low_sum, high_sum - 1.0)
        if deviation > tolerance:
            raise ValueError(
                f"probas must sum to 1 over the class dimension (dim 1, C={num_classes}); "
                f"got sums off by up to {deviation:.3g}{hint}"
            )


def normalize_classes(classes: object) -> str | list[int]:
    """``"present"``, ``"all"`` or a list of distinct ints (range checked once C is known)."""
    if isinstance(classes, str):
        if classes not in ("present", "all"):
            raise ValueError(
                f"classes must be 'present', 'all' or a list of class indices; got {classes!r}"
            )
        return classes
    classes = numpy_as_tensor("classes", classes)
    if isinstance(classes, torch.Tensor):
        if (classes.dim() != 1 or classes.dtype.is_floating_point or classes.dtype.is_complex
                or classes.dtype == torch.bool):
            raise TypeError(
                f"classes as a tensor or array must be 1-D integer; got {classes.dtype} "
                f"{shape_str(classes.shape)}"
            )
        classes = classes.tolist()
    chosen = [as_int(c) for c in classes] if isinstance(classes, Sequence) else [None]
    if None in chosen:
        raise TypeError(
            f"classes must be 'present', 'all' or a sequence of ints; got {classes!r}"
        )
    if not chosen:
        raise ValueError("classes must not be an empty list")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"classes must not repeat a class; got {chosen}")
    return chosen


def resolve_classes(classes: object, num_classes: int) -> str | list[int]:
    """``"present"``, ``"all"`` or a sorted list of distinct class indices in range."""
    chosen = normalize_classes(classes)
    if isinstance(chosen, str):
        return chosen
    if num_classes == 1:
        if chosen != [1]:
            raise ValueError(
                "with C == 1 (the sigmoid case) the only class is the foreground class 1; "
                f"got classes={chosen}"
            )
        return chosen
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes must be in [0, {num_classes}); got {bad}")
    return sorted(chosen)


CLASS_WEIGHTS_EXPECTED = "class_weights must be a sequence of numbers or a tensor"


def check_class_weights_tensor(class_weights: torch.Tensor) -> None:
    """Class weights given as a tensor: dense, not 0-d, of real numbers (a bool tensor is
    refused as a list of bools is: a mask of classes is what ``classes=`` takes)."""
    check_tensor("class_weights", class_weights)
    if class_weights.dim() == 0:
        raise TypeError(f"{CLASS_WEIGHTS_EXPECTED}; got a 0-d tensor")
    if class_weights.dtype == torch.bool or class_weights.dtype.is_complex:
        raise TypeError(f"{CLASS_WEIGHTS_EXPECTED} of real numbers; got {class_weights.dtype}")


def normalize_class_weights(class_weights: object) -> torch.Tensor | None:
    """A float64 CPU tensor of finite, non-negative weights, one positive (or None).

    The length is checked against C by the loss operator, once C is known.
    """
    if class_weights is None:
        return None
    expected = CLASS_WEIGHTS_EXPECTED
    class_weights = numpy_as_tensor("class_weights", class_weights)
    if isinstance(class_weights, torch.Tensor):
        check_class_weights_tensor(class_weights)
        weights = class_weights.detach().to(device="cpu", dtype=torch.float64)
        check_class_weight_values(weights)
        return weights
    if not isinstance(class_weights, Sequence) or isinstance(class_weights, str):
        raise TypeError(f"{expected}; got {type(class_weights).__name__}")
    # plain Python numbers are checked in Python: no tensor read (nothing for a compiler to
    # trace, no device synchronisation)
    try:
        values = [float(weight) for weight in class_weights]
    except (TypeError, ValueError):
        raise TypeError(f"{expected}; got {class_weights!r}") from None
    if any(isinstance(weight, (bool, str)) for weight in class_weights):
        raise TypeError(f"{expected}; got {class_weights!r}")
    if not all(math.isfinite(value) and value >= 0 for value in values):
        raise ValueError(f"class_weights must be finite and >= 0; got {values}")
    if values and not any(value > 0 for value in values):
        raise ValueError("class_weights must have at least one positive weight")
    return torch.tensor(values, dtype=torch.float64)


def check_class_weight_values(weights: torch.Tensor) -> None:
    """Finite, non-negative, at least one positive (one read of C values)."""
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"class_weights must be finite and >= 0; got {weights.tolist()}")
    if weights.numel() and not bool((weights > 0).any()):
        raise ValueError("class_weights must have at least one positive weight")


def check_extension_inputs(errors: object, fg: object) -> None:
    """The kernel contract: errors (S, P) float, fg (S, P) bool, no NaN, no +inf."""
    check_extension_shapes(errors, fg)
    if not _validate_values or errors.numel() == 0:
        return
    errors = errors.detach()
    # one pass settles the usual case: a NaN makes both bounds NaN, +inf is the upper bound,
    # and only a -inf lower bound (padding) needs the fg check
    low, high = (float(bound) for bound in torch.aminmax(errors))
    if not high < math.inf:
        n_nan = int(torch.isnan(errors).sum())
        n_pos_inf = int(torch.isposinf(errors).sum())
        raise ValueError(
            f"errors must not contain NaN or +inf (-inf marks padding); got {n_nan} NaN "
            f"and {n_pos_inf} +inf values"
        )
    if low == -math.inf:
        n_fg_padding = int(count_true((fg & torch.isneginf(errors)).reshape(-1)))
        if n_fg_padding:
            raise ValueError(
                f"padding pixels (errors == -inf) must have fg == False; got {n_fg_padding} "
                "padding pixels marked foreground"
            )


def check_extension_shapes(errors: object, fg: object) -> None:
    """errors (S, P) float and fg (S, P) bool on one device (reads no value)."""
    errors = check_floating("errors", errors)
    fg = check_tensor("fg", fg)
    if errors.dim() != 2:
        raise ValueError(
            f"errors must have shape (S, P) (segments x pixels); got {shape_str(errors.shape)}"
        )
    if fg.dtype != torch.bool:
        raise TypeError(f"fg must be a bool tensor; got {fg.dtype}")
    if fg.shape != errors.shape:
        raise ValueError(
            f"fg must have the shape of errors {shape_str(errors.shape)}; "
            f"got {shape_str(fg.shape)}"
        )
    check_same_device("fg", fg, "errors", errors)
