"""Real sizes on a CUDA GPU (skipped without one): what the interpreter never reaches.

The triton backend's fused loss at 2^20 pixels x 21 classes for each sort strategy, against
the torch backend in float64 on the same GPU (losses, and gradients summed over each group of
tied errors, since ties are certain at this size); a 2^25-pixel segment against the float64
definition; offsets past 2^31 elements. ``benchmarks/gpu_check.sh`` runs this file.
"""

from __future__ import annotations

import pytest
import torch

from lovasz_kernels import get_backend, lovasz_extension, lovasz_softmax
from lovasz_kernels._cases import GRAD_TOLERANCE, LOSS_TOLERANCE, mismatches, tie_group_sums

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _triton():
    backend = get_backend("triton")
    if not backend.availability()[0]:
        pytest.skip(backend.availability()[1])
    return backend._load()


def _batch(dtype, side=1024, classes=21, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(1, classes, side, side, device="cuda", generator=gen)
    labels = torch.randint(0, classes, (1, side, side), device="cuda", generator=gen)
    labels[:, :8] = 255
    return logits.softmax(dim=1).to(dtype), labels


def _loss_and_grad(probas, labels, backend):
    scores = probas.detach().clone().requires_grad_()
    loss = lovasz_softmax(scores, labels, ignore_index=255, backend=backend)
    (grad,) = torch.autograd.grad(loss, scores)
    return loss.detach(), grad


def _segment_view(probas, labels, score_grad):
    """Per-class errors as the kernel computes them (in float32: ties are ties of these) and
    d loss / d errors in float64, for tie-group sums."""
    classes = probas.shape[1]
    p = probas.reshape(classes, -1).float()
    fg = labels.reshape(1, -1) == torch.arange(classes, device=labels.device)[:, None]
    valid = (labels.reshape(1, -1) != 255).expand_as(fg)
    errors = torch.where(fg, 1 - p, p).masked_fill(~valid, -1.0)
    error_grad = torch.where(fg, -score_grad.reshape(classes, -1).double(),
                             score_grad.reshape(classes, -1).double())
    return errors, error_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("strategy", ["rows", "flat", "histogram"])
def test_fused_loss_at_2e20_x_21_matches_float64(dtype, strategy):
    triton_gpu = _triton()
    if strategy == "histogram" and dtype == torch.float32:
        pytest.skip("the histogram strategy is for 16-bit scores")
    probas, labels = _batch(dtype)
    with triton_gpu._override(sort=strategy):
        loss, grad = _loss_and_grad(probas, labels, "triton")
    expected_loss, expected_grad = _loss_and_grad(probas.double(), labels, "torch")
    assert not mismatches(loss, expected_loss, LOSS_TOLERANCE[dtype]).any()
    errors, ours = _segment_view(probas, labels, grad)
    _, theirs = _segment_view(probas, labels, expected_grad)
    # a 16-bit gradient is rounded once per pixel: a tie group's total may be off by the sum
    # of its members' tolerances
    tol = GRAD_TOLERANCE[dtype]
    group_tol = tie_group_sums(errors, tol.atol + tol.rtol * theirs.abs())
    gap = (tie_group_sums(errors, ours) - tie_group_sums(errors, theirs)).abs()
    assert not (gap > group_tol).any(), f"{int((gap > group_tol).sum())} tie-group sums differ"


def test_segment_of_2e25_pixels_matches_float64_definition():
    _triton()
    n = 1 << 25
    gen = torch.Generator(device="cuda").manual_seed(1234)
    ranks = torch.randperm(n, device="cuda", generator=gen)
    errors = (0x3F000000 + (n - 1 - ranks).to(torch.int32)).view(torch.float32).reshape(1, -1)
    fg_sorted = torch.rand(n, device="cuda", generator=gen) < 0.3
    fg = fg_sorted[ranks].reshape(1, -1)
    _, grad = lovasz_extension(errors, fg, backend="triton")
    fg_seen = torch.cumsum(fg_sorted, 0, dtype=torch.int64)
    position = torch.arange(1, n + 1, device="cuda", dtype=torch.int64)
    jaccard = 1.0 - (fg_seen[-1] - fg_seen).double() / (fg_seen[-1] + position - fg_seen).double()
    expected = torch.diff(jaccard, prepend=jaccard.new_zeros(1))[ranks]
    bad = mismatches(grad[0], expected, GRAD_TOLERANCE[torch.float32])
    assert not bad.any(), f"{int(bad.sum())} of {n} gradients differ"


def test_offsets_past_2e31_elements_match_rows_run_alone():
    """(2^20 segments x 2048) fp32 errors take the kernel's int64 offsets; three of
    its rows, run alone (int32 offsets), give the same losses."""
    _triton()
    gen = torch.Generator(device="cuda").manual_seed(0)
    errors = torch.randn(1 << 20, 2048, device="cuda", generator=gen)
    fg = torch.rand(1 << 20, 2048, device="cuda", generator=gen) < 0.3
    loss, _ = lovasz_extension(errors, fg, backend="triton")
    for row in (0, 1 << 19, (1 << 20) - 1):
        alone, _ = lovasz_extension(errors[row:row + 1].clone(), fg[row:row + 1].clone(),
                                    backend="triton")
        torch.testing.assert_close(loss[row:row + 1], alone, rtol=1e-6, atol=0)


def test_torch_backend_ranges_on_a_gpu_match_the_cpu(monkeypatch):
    """A segment over the GPU budget (a 32 MB floor here, as ``set_chunk_floor`` allows) is
    sorted a range of values at a time on the GPU too: a 4 x 1024² hinge, batch IoU, the CPU
    torch backend's answer (float64 logits: no ties, one gradient)."""
    from lovasz_kernels import _plan, lovasz_hinge
    from lovasz_kernels.backends import torch_eager

    monkeypatch.setattr(_plan, "_FLOORS_SET", {"cuda": 32 << 20})
    calls = []
    real = torch_eager._extension_by_ranges
    monkeypatch.setattr(torch_eager, "_extension_by_ranges",
                        lambda *args: calls.append(args[0].device.type) or real(*args))
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 1024, 1024, generator=gen, dtype=torch.float64)
    labels = (torch.rand(logits.shape, generator=gen) < 0.4).long()
    results = {}
    for device in ("cuda", "cpu"):
        scores = logits.to(device).requires_grad_()
        loss = lovasz_hinge(scores, labels.to(device), per_image=False, backend="torch")
        (grad,) = torch.autograd.grad(loss, scores)
        results[device] = loss.detach().cpu(), grad.cpu()
    assert calls and calls[0] == "cuda"
    loss_tol = LOSS_TOLERANCE[torch.float64]
    assert not mismatches(results["cuda"][0], results["cpu"][0], loss_tol).any()
    bad = mismatches(results["cuda"][1], results["cpu"][1], GRAD_TOLERANCE[torch.float64])
    assert not bad.any(), f"{int(bad.sum())} gradients differ"
