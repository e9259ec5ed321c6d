"""Proximal machinery for the binary Lovász hinge (paper, Appendix C; docs/design.md).

- :func:`prox_lovasz_hinge`: the exact proximal operator, or the paper's greedy path;
- :func:`lovasz_hinge_moreau`: the Moreau envelope, a differentiable loss whose gradient is
  the proximal direction;
- :class:`ProxLovasz`: an SGD-with-momentum optimizer that backpropagates that direction.

The kernels need numba (``pip install numba``); importing this package
does not.
"""

from lovasz_kernels.optim.prox import GreedyProx, lovasz_hinge_moreau, prox_lovasz_hinge
from lovasz_kernels.optim.prox_lovasz import ProxLovasz

__all__ = ["GreedyProx", "ProxLovasz", "lovasz_hinge_moreau", "prox_lovasz_hinge"]
