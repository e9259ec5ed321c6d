"""Proximal operator of the Lovász hinge (``lovasz_kernels.optim``) (asv)."""

from __future__ import annotations

from lovasz_kernels import bench

LAM = 0.1  # a step comparable to a learning rate; larger steps merge more pixels
FOREGROUND = 0.3


class ProxLovaszHinge:
    """``prox_lovasz_hinge(logits, labels, lam)``: the exact and the greedy method, on one
    image of ``side`` x ``side`` pixels (30% foreground)."""

    params = [[256, 512], ["exact", "greedy"]]
    param_names = ["side", "method"]
    timeout = 180

    def setup(self, side, method):
        from lovasz_kernels.optim import prox_lovasz_hinge

        logits, labels = bench.hinge_inputs(1, side, foreground=FOREGROUND)
        self.run = lambda: prox_lovasz_hinge(logits, labels, LAM, method=method)
        self.run()

    def time_prox(self, side, method):
        self.run()

    def peakmem_prox(self, side, method):
        self.run()
