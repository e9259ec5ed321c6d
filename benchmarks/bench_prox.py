"""Proximal operator of the Lovász hinge (``lovasz_kernels.optim``), once it exists (asv)."""

from __future__ import annotations

from . import common

LAM = 0.1  # a step comparable to a learning rate; larger steps merge more pixels


class ProxLovaszHinge:
    """``prox_lovasz_hinge(logits, labels, lam)``: the exact and the greedy method."""

    params = [common.PIXELS, common.PER_IMAGE, common.PROX_METHODS]
    param_names = ["pixels", "per_image", "method"]
    timeout = 180

    def setup(self, pixels, per_image, method):
        try:
            from lovasz_kernels.optim import prox_lovasz_hinge
        except ImportError:  # commits before the optimizer landed
            raise NotImplementedError("lovasz_kernels.optim is not in this commit") from None
        self.logits, self.labels = common.hinge_inputs(pixels, "float32")
        self.run = lambda: prox_lovasz_hinge(self.logits, self.labels, LAM,
                                             per_image=per_image, method=method)
        self.run()

    def time_prox(self, *params):
        self.run()

    def peakmem_prox(self, *params):
        self.run()
