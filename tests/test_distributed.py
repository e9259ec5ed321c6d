"""The global-batch losses on real ``torch.distributed`` gloo groups (2 and 3 CPU processes).

Starting a process costs seconds (imports), so 3 processes are spawned once: every case of
``CASES`` runs on the 3-rank default group, then on a 2-rank subgroup (all members together,
as collectives require), and each process writes, per case, "ok" or the traceback. Each
(world size, case) pair is then its own test.

Every rank builds the same global batch from a seed, takes its (unequal, possibly empty)
slice, and compares its loss and gradient with the single-process loss of the concatenated
batch, sliced the same way.
"""

from __future__ import annotations

import datetime
import json
import os
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lovasz_kernels import (
    EquiBatchSampler,
    LovaszHingeLoss,
    LovaszSoftmaxLoss,
    available_backends,
    get_backend,
    lovasz_extension,
    lovasz_hinge,
    lovasz_softmax,
)
from lovasz_kernels.distributed import histogram_extension

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

WORLD_SIZES = (2, 3)
# images per rank: unequal, one rank empty; the global batch is their concatenation
BATCH_SIZES = {2: [3, 1], 3: [2, 0, 3]}
IGNORE = 255
NUM_CLASSES = 4


def _cpu_backends() -> list[str]:
    """Available backends that run natively on CPU tensors (not triton under its interpreter:
    the kernels are cross-validated elsewhere, and interpreted they would take minutes here)."""
    names = []
    for name, (available, _) in available_backends().items():
        if available and "cpu" in get_backend(name).devices:
            names.append(name)
    return names


# --------------------------------------------------------------------------------------------
# Helpers run inside the workers


def _rank_slice(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _loss_and_grad(fn: Callable, scores: torch.Tensor, *args, **kwargs):
    scores = scores.detach().clone().requires_grad_()
    loss = fn(scores, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), scores)  # a sum of per-image losses too
    return loss.detach(), grad


# Checks inside the workers record their failures instead of raising: a rank that left a case
# early would skip collectives its peers are waiting in, and every later case would hang.
_FAILURES: list[str] = []


def _expect(condition: bool, message: str) -> None:
    if not condition:
        _FAILURES.append(message)


def _expect_close(actual, expected, rtol=1.3e-6, atol=1e-5, msg="") -> None:
    """torch.testing.assert_close, recorded, and without its import of torch.distributed.tensor
    (seconds, once per process, as soon as a process group exists)."""
    if isinstance(actual, tuple):
        for got, want in zip(actual, expected, strict=True):
            _expect_close(got, want, rtol, atol, msg)
        return
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        _FAILURES.append(f"{msg}: {actual.dtype}{tuple(actual.shape)} != "
                         f"{expected.dtype}{tuple(expected.shape)}")
        return
    gap = (actual.double() - expected.double()).abs()
    bad = gap > atol + rtol * expected.double().abs()
    if bad.any():
        _FAILURES.append(
            f"{msg}: {int(bad.sum())} of {bad.numel()} entries differ, the first at "
            f"{tuple(torch.nonzero(bad)[0].tolist())}; largest difference {gap.max().item():.3g}"
        )


def _gather_objects(value, group: dist.ProcessGroup) -> list:
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, value, group=group)
    return every


def _assert_same_everywhere(loss: torch.Tensor, what: str, group: dist.ProcessGroup) -> None:
    every = _gather_objects(loss.item(), group)
    _expect(len(set(every)) == 1, f"{what}: the loss differs between ranks: {every}")


def _softmax_batch(seed: int, total: int, sizes: list[int], dtype=torch.float64):
    """(probas, labels) of the global batch: class 3 only in the last rank's images, a few
    ignored pixels everywhere."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(total, NUM_CLASSES, 5, 6, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, NUM_CLASSES - 1, (total, 5, 6), generator=gen)
    last = _rank_slice(sizes, len(sizes) - 1)
    labels[last][:, 0, :3] = NUM_CLASSES - 1  # present on one rank only
    labels[:, 4, 5] = IGNORE
    return logits.softmax(dim=1).to(dtype), labels


def _compare(group, rank, sizes, fn, scores, labels, backend, what, loss_tol=1e-12, **kwargs):
    """Distributed loss / local gradient vs the single-process loss of the concatenated batch."""
    mine = _rank_slice(sizes, rank)
    expected_loss, expected_grad = _loss_and_grad(fn, scores, labels, backend=backend, **kwargs)
    loss, grad = _loss_and_grad(
        fn, scores[mine], labels[mine], backend=backend, process_group=group, **kwargs
    )
    _expect(
        abs(loss.item() - expected_loss.item()) <= loss_tol * max(1, expected_loss.item()),
        f"{what}: loss {loss.item()!r} != single-process {expected_loss.item()!r}",
    )
    _expect_close(grad, expected_grad[mine], rtol=1e-9, atol=1e-12, msg=what)
    _assert_same_everywhere(loss, what, group)
    return loss, grad


# --------------------------------------------------------------------------------------------
# Cases (each runs on every rank of the group)


def case_softmax_exact(rank: int, world: int, group: dist.ProcessGroup) -> None:
    sizes = BATCH_SIZES[world]
    probas, labels = _softmax_batch(1, sum(sizes), sizes)
    options = [
        {},
        {"classes": "all"},
        {"classes": [0, 3]},
        {"class_weights": [0.5, 2.0, 0.0, 1.0]},
        {"from_logits": True},
    ]
    for backend in _cpu_backends():
        for kwargs in options:
            scores = probas.log() if kwargs.get("from_logits") else probas
            _compare(group, rank, sizes, lovasz_softmax, scores, labels, backend,
                     f"{backend} {kwargs}", ignore_index=IGNORE, **kwargs)


def case_softmax_exact_fully_ignored_rank(rank: int, world: int, group: dist.ProcessGroup) -> None:
    """Rank 0's images are all ignored, and hold the only pixels of class 0 otherwise."""
    sizes = BATCH_SIZES[world]
    probas, labels = _softmax_batch(2, sum(sizes), sizes)
    labels[_rank_slice(sizes, 0)] = IGNORE
    for backend in _cpu_backends():
        _compare(group, rank, sizes, lovasz_softmax, probas, labels, backend, backend,
                 ignore_index=IGNORE)


def case_softmax_exact_float32_and_sigmoid(rank: int, world: int, group: dist.ProcessGroup) -> None:
    sizes = BATCH_SIZES[world]
    probas, labels = _softmax_batch(3, sum(sizes), sizes, dtype=torch.float32)
    fg_probas = probas[:, :1]
    binary = (labels == 1).long()
    for backend in _cpu_backends():
        mine = _rank_slice(sizes, rank)
        for scores, target in ((probas, labels), (fg_probas, binary)):
            expected, expected_grad = _loss_and_grad(
                lovasz_softmax, scores, target, backend=backend, ignore_index=IGNORE
            )
            loss, grad = _loss_and_grad(
                lovasz_softmax, scores[mine], target[mine], backend=backend,
                ignore_index=IGNORE, process_group=group,
            )
            _expect_close(loss, expected, rtol=1e-6, atol=1e-7)
            _expect_close(grad, expected_grad[mine], rtol=1e-5, atol=1e-7)


def case_hinge_exact(rank: int, world: int, group: dist.ProcessGroup) -> None:
    sizes = BATCH_SIZES[world]
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(sum(sizes), 1, 6, 5, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 2, (sum(sizes), 6, 5), generator=gen)
    labels[:, 0, 0] = IGNORE
    for backend in _cpu_backends():
        _compare(group, rank, sizes, lovasz_hinge, logits, labels, backend, backend,
                 per_image=False, ignore_index=IGNORE)
        ignored = labels.clone()
        ignored[_rank_slice(sizes, world - 1)] = IGNORE  # the last rank has nothing valid
        _compare(group, rank, sizes, lovasz_hinge, logits, ignored, backend, f"{backend} ignored",
                 per_image=False, ignore_index=IGNORE)


def case_forward_mode_sums_every_rank(rank: int, world: int, group: dist.ProcessGroup) -> None:
    """The global-batch loss is a function of every rank's scores: its tangent (torch.func.jvp
    and dual tensors) is the single-process tangent of the whole batch, the same on every
    rank; per image (nothing communicated) it is the rank's own."""
    from torch.autograd import forward_ad

    sizes = BATCH_SIZES[world]
    probas, labels = _softmax_batch(9, sum(sizes), sizes)
    tangent = torch.randn(probas.shape, generator=torch.Generator().manual_seed(10),
                          dtype=probas.dtype)
    mine = _rank_slice(sizes, rank)
    for backend in _cpu_backends():
        def loss(p, y, backend=backend, **kwargs):
            return lovasz_softmax(p, y, ignore_index=IGNORE, backend=backend, **kwargs)

        _, expected = torch.func.jvp(lambda p: loss(p, labels), (probas,), (tangent,))
        _, found = torch.func.jvp(lambda p: loss(p, labels[mine], process_group=group),
                                  (probas[mine],), (tangent[mine],))
        _expect_close(found, expected, rtol=1e-9, atol=1e-12, msg=f"{backend} torch.func.jvp")
        _assert_same_everywhere(found, f"{backend} torch.func.jvp", group)
        with forward_ad.dual_level():
            dual = loss(forward_ad.make_dual(probas[mine], tangent[mine]), labels[mine],
                        process_group=group)
            _expect_close(forward_ad.unpack_dual(dual).tangent, expected, rtol=1e-9,
                          atol=1e-12, msg=f"{backend} dual tensors")
        if mine.stop > mine.start:  # per image: the loss and its tangent are the rank's own
            _, local = torch.func.jvp(lambda p: loss(p, labels[mine], per_image=True),
                                      (probas[mine],), (tangent[mine],))
            _, found = torch.func.jvp(
                lambda p: loss(p, labels[mine], per_image=True, process_group=group),
                (probas[mine],), (tangent[mine],))
            _expect_close(found, local, rtol=0, atol=0, msg=f"{backend} per image")


def case_nothing_valid_anywhere(rank: int, world: int, group: dist.ProcessGroup) -> None:
    sizes = BATCH_SIZES[world]
    probas, labels = _softmax_batch(5, sum(sizes), sizes)
    labels[:] = IGNORE
    mine = _rank_slice(sizes, rank)
    for mode in ("exact", "histogram"):
        loss, grad = _loss_and_grad(
            lovasz_softmax, probas[mine], labels[mine], ignore_index=IGNORE,
            process_group=group, dist_mode=mode,
        )
        _expect(loss.item() == 0 and not grad.any(), f"softmax {mode}: {loss.item()}")
        loss, grad = _loss_and_grad(
            lovasz_hinge, probas[mine, 0], labels[mine], ignore_index=IGNORE, per_image=False,
            process_group=group, dist_mode=mode,
        )
        _expect(loss.item() == 0 and not grad.any(), f"hinge {mode}: {loss.item()}")


def case_modules(rank: int, world: int, group: dist.ProcessGroup) -> None:
    sizes = BATCH_SIZES[world]
    probas, labels = _softmax_batch(6, sum(sizes), sizes)
    mine = _rank_slice(sizes, rank)
    for mode in ("exact", "histogram"):
        criterion = LovaszSoftmaxLoss(
            ignore_index=IGNORE, process_group=group, dist_mode=mode, bins=256
        )
        _expect("process_group=<ProcessGroup>" in repr(criterion), repr(criterion))
        got = _loss_and_grad(criterion, probas[mine], labels[mine])
        expected = _loss_and_grad(
            lovasz_softmax, probas[mine], labels[mine], ignore_index=IGNORE,
            process_group=group, dist_mode=mode, bins=256,
        )
        _expect_close(got, expected, rtol=0, atol=0)
        hinge = LovaszHingeLoss(per_image=False, process_group=group, dist_mode=mode, bins=256)
        got = _loss_and_grad(hinge, probas[mine, 0] - 0.5, (labels[mine] == 1).long())
        expected = _loss_and_grad(
            lovasz_hinge, probas[mine, 0] - 0.5, (labels[mine] == 1).long(), per_image=False,
            process_group=group, dist_mode=mode, bins=256,
        )
        _expect_close(got, expected, rtol=0, atol=0)


def case_histogram_matches_local_histogram(rank: int, world: int, group: dist.ProcessGroup) -> None:
    """Distributing the histogram mode changes nothing: same loss and increments as the
    histogram of the concatenated batch in one process."""
    sizes = [5, 0, 17, 3][:world]
    gen = torch.Generator().manual_seed(7)
    errors = torch.rand(3, sum(sizes), generator=gen, dtype=torch.float64)
    fg = torch.rand(3, sum(sizes), generator=gen) < 0.3
    errors[1, ::4] = -torch.inf  # padding
    fg[1, ::4] = False
    mine = _rank_slice(sizes, rank)
    for bins, value_range in ((16, 1.0), (1000, 1.0), (64, None), ("fp16", 1.0)):
        expected_loss, expected_grad = histogram_extension(errors, fg, bins, value_range, None)
        loss, grad = histogram_extension(
            errors[:, mine], fg[:, mine], bins, value_range, group
        )
        _expect_close(loss, expected_loss, rtol=1e-12, atol=1e-15)
        _expect_close(grad, expected_grad[:, mine], rtol=0, atol=0)
        _assert_same_everywhere(loss.sum(), f"bins={bins}", group)


def _subgradient_violation(errors, fg, grad, gen, trials=200) -> float:
    """max over trial points y of <g, y> - f(y) (must be <= 0) per the extension's convexity."""
    worst = -torch.inf
    num_pixels = errors.shape[1]
    for trial in range(trials):
        if trial % 3 == 0:  # the same values in another order
            y = errors[:, torch.randperm(num_pixels, generator=gen)]
        elif trial % 3 == 1:
            y = torch.randn(errors.shape, generator=gen, dtype=torch.float64)
        else:  # a small move from the point: the tightest test of the tie blocks
            y = errors + 1e-3 * torch.randn(errors.shape, generator=gen, dtype=torch.float64)
        f_y, _ = lovasz_extension(y.clamp_min(-1e30), fg, backend="numpy")
        worst = max(worst, float(((grad * y).sum(dim=1) - f_y).max()))
    return worst


def case_histogram_exact_on_the_grid(rank: int, world: int, group: dist.ProcessGroup) -> None:
    """Errors on the bin grid (k/64, many ties): the loss is exact and the gradient a
    subgradient at the errors."""
    sizes = {2: [40, 7], 3: [40, 0, 7]}[world]
    gen = torch.Generator().manual_seed(8)
    total = sum(sizes)
    errors = torch.randint(0, 65, (4, total), generator=gen).to(torch.float64) / 64
    fg = torch.rand(4, total, generator=gen) < 0.4
    fg[2] = False  # no foreground at all: the first mistake costs 1
    fg[3] = True
    mine = _rank_slice(sizes, rank)
    loss, grad = histogram_extension(errors[:, mine], fg[:, mine], 64, 1.0, group)
    exact_loss, _ = lovasz_extension(errors, fg, backend="numpy")
    _expect_close(loss, exact_loss.to(torch.float64), rtol=1e-12, atol=1e-14)
    global_grad = torch.cat(_gather_objects(grad, group), dim=1)
    # <g, x> = f(x), and f(y) >= <g, y> everywhere: g is a subgradient
    _expect_close((global_grad * errors).sum(dim=1), exact_loss.double())
    violation = _subgradient_violation(errors, fg, global_grad, gen)
    _expect(violation <= 1e-12, f"not a subgradient: <g, y> - f(y) = {violation}")


def case_histogram_softmax_bound(rank: int, world: int, group: dist.ProcessGroup) -> None:
    """Off the grid, |histogram - exact| <= the bin width (softmax: 1 / bins)."""
    sizes = BATCH_SIZES[world]
    probas, labels = _softmax_batch(9, sum(sizes), sizes, dtype=torch.float32)
    mine = _rank_slice(sizes, rank)
    exact = lovasz_softmax(probas, labels, ignore_index=IGNORE, backend="numpy").item()
    for bins in (2, 8, 256, 2**16):
        loss = lovasz_softmax(
            probas[mine], labels[mine], ignore_index=IGNORE, process_group=group,
            dist_mode="histogram", bins=bins,
        ).item()
        _expect(abs(loss - exact) <= 1 / bins + 1e-6, f"bins={bins}: {loss} vs {exact}")
        _assert_same_everywhere(torch.tensor(loss), f"bins={bins}", group)


def case_histogram_hinge_bound(rank: int, world: int, group: dist.ProcessGroup) -> None:
    """Hinge errors are unbounded: bins span [0, max error] (all-reduced); bound max / bins."""
    sizes = BATCH_SIZES[world]
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(sum(sizes), 7, 6, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 2, (sum(sizes), 7, 6), generator=gen)
    mine = _rank_slice(sizes, rank)
    exact = lovasz_hinge(logits, labels, per_image=False, backend="numpy").item()
    max_error = float((1 - logits * (2 * labels - 1)).max())
    for bins in (4, 64, 4096):
        loss = lovasz_hinge(
            logits[mine], labels[mine], per_image=False, process_group=group,
            dist_mode="histogram", bins=bins,
        ).item()
        _expect(abs(loss - exact) <= max_error / bins * (1 + 1e-9),
                f"bins={bins}: {loss} vs {exact}")


def case_histogram_fp16_grid_is_exact(rank: int, world: int, group: dist.ProcessGroup) -> None:
    """float16 probabilities and bins="fp16": one bin per distinct error, so the loss is exact
    and the gradient a subgradient, at any number of pixels (here with many ties)."""
    sizes = {2: [150, 41], 3: [150, 0, 41]}[world]
    gen = torch.Generator().manual_seed(11)
    total = sum(sizes)
    probas = torch.rand(3, total, generator=gen).half()
    probas[:, ::3] = probas[:, 1::3][:, : probas[:, ::3].shape[1]]  # ties
    probas[0, :50] = torch.tensor([0.0, 2.0**-24, 0.5, 1.0, 1 - 2.0**-11]).half().repeat(10)
    fg = torch.rand(3, total, generator=gen) < 0.3
    errors = torch.where(fg, 1 - probas.double(), probas.double())  # as lovasz_softmax builds
    mine = _rank_slice(sizes, rank)
    loss, grad = histogram_extension(errors[:, mine], fg[:, mine], "fp16", 1.0,
                                     group)
    exact_loss, _ = lovasz_extension(errors, fg, backend="numpy")
    _expect_close(loss, exact_loss.double(), rtol=1e-12, atol=1e-14)
    global_grad = torch.cat(_gather_objects(grad, group), dim=1)
    violation = _subgradient_violation(errors, fg, global_grad, gen, trials=30)
    _expect(violation <= 1e-12, f"not a subgradient: <g, y> - f(y) = {violation}")

    # end to end: float16 probabilities through lovasz_softmax
    batch_sizes = BATCH_SIZES[world]
    probas, labels = _softmax_batch(11, sum(batch_sizes), batch_sizes, dtype=torch.float16)
    mine = _rank_slice(batch_sizes, rank)
    exact = lovasz_softmax(probas, labels, ignore_index=IGNORE, backend="numpy")
    loss = lovasz_softmax(
        probas[mine], labels[mine], ignore_index=IGNORE, process_group=group,
        dist_mode="histogram", bins="fp16",
    )
    _expect_close(loss, exact, rtol=1e-6, atol=1e-7)


def case_per_image_needs_no_collectives(rank: int, world: int, group: dist.ProcessGroup) -> None:
    sizes = BATCH_SIZES[world]
    probas, labels = _softmax_batch(12, sum(sizes), sizes)
    mine = _rank_slice(sizes, rank)
    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
             "all_gather_object", "broadcast", "barrier")
    saved = {name: getattr(dist, name) for name in names if hasattr(dist, name)}

    def refuse(*args, **kwargs):
        raise AssertionError("a collective was called with per_image=True")

    try:
        for name in saved:
            setattr(dist, name, refuse)
        for mode in ("exact", "histogram"):
            got = _loss_and_grad(
                lovasz_softmax, probas[mine], labels[mine], per_image=True, ignore_index=IGNORE,
                process_group=group, dist_mode=mode,
            )
            expected = _loss_and_grad(
                lovasz_softmax, probas[mine], labels[mine], per_image=True, ignore_index=IGNORE
            )
            _expect_close(got, expected, rtol=0, atol=0)
            got = _loss_and_grad(
                lovasz_softmax, probas[mine], labels[mine], per_image=True, ignore_index=IGNORE,
                process_group=group, dist_mode=mode, reduction="none",
            )
            expected = _loss_and_grad(lovasz_softmax, probas[mine], labels[mine],
                                      per_image=True, ignore_index=IGNORE, reduction="none")
            _expect_close(got, expected, rtol=0, atol=0)
            got = _loss_and_grad(
                LovaszHingeLoss(process_group=group, dist_mode=mode),
                probas[mine, 0] - 0.5, (labels[mine] == 1).long(),
            )
            expected = _loss_and_grad(lovasz_hinge, probas[mine, 0] - 0.5,
                                      (labels[mine] == 1).long())
            _expect_close(got, expected, rtol=0, atol=0)
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _averaged_like_ddp(model: torch.nn.Module, group: dist.ProcessGroup) -> None:
    """What DDP does to the gradients in backward: the mean over ranks."""
    for param in model.parameters():
        dist.all_reduce(param.grad, group=group)
        param.grad /= dist.get_world_size(group)


def case_ddp_gradient_factor(rank: int, world: int, group: dist.ProcessGroup) -> None:
    """Under DDP, backward of ``world * loss`` gives the single-process gradient of the
    concatenated batch (DDP averages the ranks' gradients); ``loss`` alone gives 1/world of it.

    A real DDP model for 2 ranks; for 3, the same averaging done by hand (the first DDP
    construction in a process costs seconds of imports).
    """
    from torch.nn.parallel import DistributedDataParallel

    sizes = [3, 1, 2][:world]
    gen = torch.Generator().manual_seed(13)
    images = torch.randn(sum(sizes), 3, 6, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (sum(sizes), 6, 5), generator=gen)
    labels[_rank_slice(sizes, world - 1)][:, :2] = NUM_CLASSES - 1
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(3, NUM_CLASSES, 3, padding=1).double()
    mine = _rank_slice(sizes, rank)

    def single_process_grads():
        reference.zero_grad()
        lovasz_softmax(reference(images), labels, from_logits=True).backward()
        return [p.grad.clone() for p in reference.parameters()]

    expected = single_process_grads()
    for scale in (world, 1):
        model = torch.nn.Conv2d(3, NUM_CLASSES, 3, padding=1).double()
        model.load_state_dict(reference.state_dict())
        wrapped = DistributedDataParallel(model, process_group=group) if world == 2 else model
        loss = lovasz_softmax(
            wrapped(images[mine]), labels[mine], from_logits=True,
            process_group=group,
        )
        (scale * loss).backward()
        if world != 2:
            _averaged_like_ddp(model, group)
        for got, want in zip(model.parameters(), expected):
            _expect_close(got.grad, want * scale / world, rtol=1e-9, atol=1e-12)


def case_compiled_fullgraph(rank: int, world: int, group: dist.ProcessGroup) -> None:
    """torch.compile(fullgraph=True) through the process group: the eager global loss."""
    sizes = BATCH_SIZES[world]
    probas, labels = _softmax_batch(6, sum(sizes), sizes)
    mine = _rank_slice(sizes, rank)
    logits = probas.log()[mine]

    def loss_of(scores, labels):
        return lovasz_softmax(scores, labels, from_logits=True, ignore_index=IGNORE,
                              process_group=group)

    expected_loss, expected_grad = _loss_and_grad(loss_of, logits, labels[mine])
    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    loss, grad = _loss_and_grad(compiled, logits, labels[mine])
    _expect(loss.item() == expected_loss.item(), f"compiled {loss.item()} != {expected_loss}")
    _expect_close(grad, expected_grad, rtol=1e-12, atol=0, msg="compiled")


def case_ranks_disagree_or_fail(rank: int, world: int, group: dist.ProcessGroup) -> None:
    """Different options on one rank, or one rank's inputs rejected: every rank raises the
    same kind of ValueError (no deadlock, no abort in a mismatched collective)."""
    sizes = BATCH_SIZES[world]
    probas, labels = _softmax_batch(7, sum(sizes), sizes)
    mine = _rank_slice(sizes, rank)
    last = world - 1
    wrong = {
        "dist_mode": {"dist_mode": "histogram" if rank == last else "exact"},
        "bins": {"dist_mode": "histogram", "bins": 64 if rank == last else 128},
        "C (classes)": {"classes_cut": rank == last},
        "classes": {"classes": "all" if rank == last else "present"},
    }
    for option, kwargs in wrong.items():
        scores = probas[mine]
        if kwargs.pop("classes_cut", False):  # one class fewer on the last rank
            scores = scores[:, :-1] / scores[:, :-1].sum(dim=1, keepdim=True)
        try:
            lovasz_softmax(scores, labels[mine].clamp(max=scores.shape[1] - 1),
                           process_group=group, **kwargs)
        except ValueError as exc:
            _expect(f"with the same {option}" in str(exc), f"{option}: {exc}")
        else:
            _expect(False, f"{option}: no error on rank {rank}")
    bad = labels[mine].clone()
    if rank == last and bad.numel():
        bad.view(-1)[0] = 99
    try:
        lovasz_softmax(probas[mine], bad, ignore_index=IGNORE, process_group=group)
    except ValueError as exc:
        expected = "labels must be in" if rank == last else "rejected their inputs"
        _expect(expected in str(exc), f"rejected inputs on rank {rank}: {exc}")
    else:
        _expect(not bad.numel(), f"rejected inputs: no error on rank {rank}")


def case_equibatch_shards_the_epoch(rank: int, world: int, group: dist.ProcessGroup) -> None:
    # 6 samples of each class: the ranks' draws of one epoch are all different samples
    dataset = [[c % NUM_CLASSES] for c in range(24)]
    by_default = EquiBatchSampler(dataset, NUM_CLASSES, seed=4)
    _expect((by_default.num_replicas, by_default.rank) == (dist.get_world_size(), dist.get_rank()),
            f"default replicas {by_default.num_replicas}, rank {by_default.rank}: not the "
            "default group's")
    in_group = list(EquiBatchSampler(dataset, NUM_CLASSES, seed=4, num_replicas=world, rank=rank))
    everyone = _gather_objects(in_group, group)
    expected = [list(EquiBatchSampler(dataset, NUM_CLASSES, seed=4, num_replicas=world, rank=r))
                for r in range(world)]
    _expect(everyone == expected, f"ranks drew {everyone}, one process {expected}")
    drawn = [i for indices in everyone for i in indices]
    _expect(len(set(drawn)) == len(drawn), f"a sample was drawn twice: {everyone}")


CASES = {
    name[len("case_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")
}


# one spawn of 3 processes serves both world sizes: the 3-rank cases run on the default group,
# the 2-rank cases on the subgroup of global ranks 1 and 2 (so group ranks differ from global
# ones, and global rank 0 waits outside the group)
MEMBERS = {3: [0, 1, 2], 2: [1, 2]}


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=len(MEMBERS[3]),
        timeout=datetime.timedelta(seconds=30),
    )
    groups = {3: dist.group.WORLD, 2: dist.new_group(MEMBERS[2])}
    results: dict[int, dict[str, str]] = {}
    try:
        for world in WORLD_SIZES:
            group = groups[world]
            if rank in MEMBERS[world]:
                results[world] = {}
                for name, case in CASES.items():
                    _FAILURES.clear()
                    try:
                        case(dist.get_rank(group), world, group)
                        results[world][name] = "\n".join(_FAILURES) or "ok"
                    except Exception:  # report every case; the parent fails the one that broke
                        results[world][name] = "\n".join([*_FAILURES, traceback.format_exc()])
                    dist.barrier(group=group)
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(results, handle)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> dict[int, list[dict[str, str]]]:
    """Spawn the processes once; per world size, every member's per-case results."""
    out_dir = tmp_path_factory.mktemp("distributed")
    crash = ""
    try:
        mp.start_processes(
            _worker, args=(str(out_dir / "store"), str(out_dir)), nprocs=len(MEMBERS[3]),
            join=True, start_method="spawn",
        )
    except Exception as exc:  # keep whatever the ranks reported before one of them died
        crash = f"a worker died: {exc}"
    per_rank = []
    for rank in MEMBERS[3]:
        path = out_dir / f"rank{rank}.json"
        found = json.loads(path.read_text()) if path.exists() else {}
        per_rank.append({int(world): cases for world, cases in found.items()})
        for cases in per_rank[-1].values():
            for name in CASES:
                cases.setdefault(name, f"not run; {crash}")
    return {
        world: [per_rank[rank].get(world, {}) for rank in members]
        for world, members in MEMBERS.items()
    }


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_distributed(distributed_results, world: int, case: str) -> None:
    failures = [
        f"group rank {rank}:\n{result.get(case, 'not run')}"
        for rank, result in enumerate(distributed_results[world])
        if result.get(case) != "ok"
    ]
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------------
# In this process: argument checks and the histogram math without communication


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"dist_mode": "approx"}, ValueError, "dist_mode must be 'exact' or 'histogram'"),
        ({"bins": 0}, ValueError, "bins must be an int in"),
        ({"bins": True}, ValueError, "bins must be an int in"),
        ({"bins": "fp32"}, ValueError, "bins must be a positive int or 'fp16'"),
        ({"process_group": "world"}, TypeError, "process_group must be a torch.distributed"),
    ],
)
def test_bad_distributed_arguments(kwargs, error, pattern):
    probas = torch.full((1, 2, 2, 2), 0.5)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(error, match=pattern):
        lovasz_softmax(probas, labels, **kwargs)
    with pytest.raises(error, match=pattern):
        LovaszSoftmaxLoss(**kwargs)


def test_hinge_has_no_fp16_grid():
    with pytest.raises(ValueError, match="bins must be a positive int; got 'fp16'"):
        lovasz_hinge(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), bins="fp16")
    with pytest.raises(ValueError, match="bins must be a positive int; got 'fp16'"):
        LovaszHingeLoss(bins="fp16")


def test_default_repr_unchanged_and_histogram_shown():
    assert "process_group" not in repr(LovaszSoftmaxLoss())
    assert repr(LovaszHingeLoss(dist_mode="histogram", bins=64)).endswith(
        "backend=None, dist_mode='histogram', bins=64)"
    )


@pytest.mark.parametrize("bins", [1, 3, 16, 1000])
def test_histogram_loss_within_one_bin_width(bins):
    gen = torch.Generator().manual_seed(bins)
    for _ in range(20):
        num_pixels = int(torch.randint(1, 300, (1,), generator=gen))
        errors = torch.rand(4, num_pixels, generator=gen, dtype=torch.float64) * 1.4 - 0.2
        fg = torch.rand(4, num_pixels, generator=gen) < torch.rand(4, 1, generator=gen)
        exact, _ = lovasz_extension(errors, fg, backend="numpy")
        for value_range in (None, 1.5):
            loss, grad = histogram_extension(errors, fg, bins, value_range, None)
            width = (errors.clamp_min(0).amax(dim=1) if value_range is None
                     else torch.full((4,), value_range, dtype=torch.float64)) / bins
            assert bool(((loss - exact).abs() <= width * (1 + 1e-12)).all())
            assert bool((grad >= 0).all()) and not grad[errors <= 0].any()


def test_histogram_on_the_grid_is_exact_with_a_subgradient():
    gen = torch.Generator().manual_seed(3)
    errors = torch.randint(-2, 9, (6, 80), generator=gen).to(torch.float64) / 8
    fg = torch.rand(6, 80, generator=gen) < 0.5
    fg[0] = False
    errors[1, :20] = -torch.inf  # padding
    fg[1, :20] = False
    loss, grad = histogram_extension(errors, fg, 8, 1.0, None)
    exact, _ = lovasz_extension(errors, fg, backend="numpy")
    assert torch.allclose(loss, exact.double(), rtol=1e-13, atol=1e-15)
    finite = errors.clamp_min(-1e30)
    assert _subgradient_violation(finite, fg, grad, gen, trials=300) <= 1e-12


def test_plain_bin_average_would_not_be_a_subgradient():
    """Why the increments are averaged per class: one tie of 1 fg and 5 bg pixels after 6 fg
    and 5 bg (n_fg = 7). The plain average gives the 5 bg pixels more than J allows them."""
    errors = torch.tensor([[2.0] * 11 + [1.0] * 6], dtype=torch.float64)
    fg = torch.tensor([[True] * 6 + [False] * 5 + [True] + [False] * 5])
    _, grad = histogram_extension(errors, fg, 2, 2.0, None)
    exact, _ = lovasz_extension(errors, fg, backend="numpy")
    tie = slice(11, 17)
    plain = torch.full((6,), float(grad[0, tie].sum()) / 6)
    # y: the 11 leading pixels first, then the tie's 5 background pixels, then its fg pixel
    y = torch.zeros_like(errors)
    y[0, :11] = 2.0
    y[0, 12:] = 1.0
    f_y, _ = lovasz_extension(y, fg, backend="numpy")
    ours, averaged = grad.clone(), grad.clone()
    averaged[0, tie] = plain
    assert float((ours * y).sum()) <= f_y.item() + 1e-12
    assert float((averaged * y).sum()) > f_y.item() + 1e-2  # 5/72 against J's 5/204
    assert torch.allclose((grad * errors).sum(), exact.double())
