"""Fwd+bwd of the losses and the bare kernel on the CPU, per backend (asv)."""

from __future__ import annotations

import lovasz_kernels

from . import common


class LovaszSoftmax:
    """``lovasz_softmax`` forward + backward (mean over present classes)."""

    params = [common.PIXELS, common.CLASSES, common.BACKENDS, common.PER_IMAGE, common.DTYPES]
    param_names = ["pixels", "classes", "backend", "per_image", "dtype"]
    timeout = 180

    def setup(self, pixels, classes, backend, per_image, dtype):
        common.require(backend, "cpu", pixels, classes, per_image)
        self.probas, self.labels = common.softmax_inputs(pixels, classes, dtype)
        if backend == common.LOOP:
            def loss(scores):
                return common.loop_softmax(scores, self.labels, per_image)
        else:
            def loss(scores):
                return lovasz_kernels.lovasz_softmax(scores, self.labels, per_image=per_image,
                                                     backend=backend)
        self.loss = loss
        self.fwd_bwd()  # warm-up: first-call costs (JIT compilation, caches) are not timed

    def fwd_bwd(self):
        self.loss(self.probas.detach().requires_grad_()).backward()

    def time_fwd_bwd(self, *params):
        self.fwd_bwd()

    def peakmem_fwd_bwd(self, *params):
        self.fwd_bwd()


class LovaszHinge:
    """``lovasz_hinge`` forward + backward (binary: one segment per image, or one in total)."""

    params = [common.PIXELS, common.BACKENDS, common.PER_IMAGE, common.DTYPES]
    param_names = ["pixels", "backend", "per_image", "dtype"]
    timeout = 180

    def setup(self, pixels, backend, per_image, dtype):
        common.require(backend, "cpu", pixels, 1, per_image)
        self.logits, self.labels = common.hinge_inputs(pixels, dtype)
        if backend == common.LOOP:
            def loss(scores):
                return common.loop_hinge(scores, self.labels, per_image)
        else:
            def loss(scores):
                return lovasz_kernels.lovasz_hinge(scores, self.labels, per_image=per_image,
                                                   backend=backend)
        self.loss = loss
        self.fwd_bwd()

    def fwd_bwd(self):
        self.loss(self.logits.detach().requires_grad_()).backward()

    def time_fwd_bwd(self, *params):
        self.fwd_bwd()

    def peakmem_fwd_bwd(self, *params):
        self.fwd_bwd()


class LovaszExtension:
    """The bare kernel ``lovasz_extension(errors, fg)``: C segments of ``pixels`` each.

    It returns the loss and the gradient in one call, so this is the kernel's fwd+bwd.
    """

    params = [common.PIXELS, common.CLASSES, common.BACKENDS, common.DTYPES]
    param_names = ["pixels", "classes", "backend", "dtype"]
    timeout = 180

    def setup(self, pixels, classes, backend, dtype):
        if backend == common.LOOP:
            raise NotImplementedError("the per-class loop is a loss, not a kernel")
        common.require(backend, "cpu", pixels, classes, False)
        self.errors, self.fg = common.extension_inputs(pixels, classes, dtype)
        self.backend = backend
        self.time_lovasz_extension()

    def time_lovasz_extension(self, *params):
        lovasz_kernels.lovasz_extension(self.errors, self.fg, backend=self.backend)

    def peakmem_lovasz_extension(self, *params):
        lovasz_kernels.lovasz_extension(self.errors, self.fg, backend=self.backend)
