"""Lovász hinge and Lovász-Softmax losses (Berman, Rannen Triki & Blaschko, CVPR 2018).

One kernel interface, several cross-validated backends chosen per call by name::

    from lovasz_kernels import lovasz_softmax
    loss = lovasz_softmax(probas, labels, backend="torch")
"""

from lovasz_kernels._registry import (
    Backend,
    BackendUnavailableError,
    available_backends,
    get_backend,
    register_backend,
    registered_backends,
)
from lovasz_kernels._validate import set_validate_values, validate_values_enabled
from lovasz_kernels.losses import lovasz_extension, lovasz_grad, lovasz_hinge, lovasz_softmax
from lovasz_kernels.nn import LovaszHingeLoss, LovaszSoftmaxLoss

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "LovaszHingeLoss",
    "LovaszSoftmaxLoss",
    "available_backends",
    "get_backend",
    "lovasz_extension",
    "lovasz_grad",
    "lovasz_hinge",
    "lovasz_softmax",
    "register_backend",
    "registered_backends",
    "set_validate_values",
    "validate_values_enabled",
]
