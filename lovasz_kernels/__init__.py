"""Lovász hinge and Lovász-Softmax losses (Berman, Rannen Triki & Blaschko, CVPR 2018).

One kernel interface, several cross-validated backends chosen per call by name::

    from lovasz_kernels import lovasz_softmax
    loss = lovasz_softmax(probas, labels, backend="torch")
"""

from lovasz_kernels._plan import set_chunk_floor
from lovasz_kernels._registry import (
    Backend,
    BackendUnavailableError,
    available_backends,
    get_backend,
    register_backend,
    registered_backends,
)
from lovasz_kernels._validate import set_validate_values, validate_values_enabled
from lovasz_kernels.losses import (
    lovasz_extension,
    lovasz_grad,
    lovasz_hinge,
    lovasz_sigmoid,
    lovasz_softmax,
)
from lovasz_kernels.metrics import (
    ConfusionMatrix,
    batch_miou,
    confusion_matrix,
    dataset_miou,
    image_miou,
    per_class_iou,
    per_image_iou,
    per_image_miou,
)
from lovasz_kernels.nn import LovaszHingeLoss, LovaszSigmoidLoss, LovaszSoftmaxLoss
from lovasz_kernels.sampling import EquiBatchSampler

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "ConfusionMatrix",
    "EquiBatchSampler",
    "LovaszHingeLoss",
    "LovaszSigmoidLoss",
    "LovaszSoftmaxLoss",
    "available_backends",
    "batch_miou",
    "confusion_matrix",
    "dataset_miou",
    "get_backend",
    "image_miou",
    "lovasz_extension",
    "lovasz_grad",
    "lovasz_hinge",
    "lovasz_sigmoid",
    "lovasz_softmax",
    "per_class_iou",
    "per_image_iou",
    "per_image_miou",
    "register_backend",
    "registered_backends",
    "set_chunk_floor",
    "set_validate_values",
    "validate_values_enabled",
]
