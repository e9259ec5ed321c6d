"""The numba backend's own pieces: the radix sort, the within-segment parallel path, the
small-segment sorts, dtype specializations, and behaviour without numba.

Cross-validation of the whole kernel against the reference runs in test_extension.py and the
loss tests (the ``backend`` fixture); here each path is forced explicitly and compared.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lovasz_kernels import _numba_core as core
from lovasz_kernels import get_backend, lovasz_extension, lovasz_hinge, lovasz_softmax
from lovasz_kernels._registry import Backend, select_backend
from lovasz_kernels.backends import numba_cpu
from tests.helpers import GRAD_TOLERANCE, LOSS_TOLERANCE, assert_close_report, tie_free_errors

pytestmark = pytest.mark.skipif(
    not numba_cpu.availability()[0], reason=numba_cpu.availability()[1]
)

_FLOAT_DTYPES = [np.float32, np.float64]


def _special_values(dtype) -> np.ndarray:
    info = np.finfo(dtype)
    return np.array(
        [0.0, -0.0, info.smallest_subnormal, 2 * info.smallest_subnormal, info.tiny,
         -info.smallest_subnormal, 1.0, np.nextafter(dtype(1.0), dtype(2.0)),
         np.nextafter(dtype(1.0), dtype(0.0)), info.max, np.inf, -np.inf, -1.0, 0.5],
        dtype=dtype,
    )


def _float_rows(dtype, rng: np.random.Generator) -> list[np.ndarray]:
    """Rows of NaN-free floats that stress the key packing and the radix digits."""
    special = _special_values(dtype)
    wide = (rng.standard_normal(3000) * np.exp(rng.uniform(-40, 40, 3000))).astype(dtype)
    return [
        special,
        rng.choice(special, 2500),  # many ties among special values
        np.full(3000, 0.25, dtype=dtype),  # all keys equal
        np.full(3000, -np.inf, dtype=dtype),  # padding only
        rng.standard_normal(5000).astype(dtype),
        rng.random(4099).astype(dtype),  # softmax-like errors in [0, 1)
        wide,
        np.concatenate([wide, special, -wide]),
        # float64 values that share their top 32 bits: only the low half orders them
        (1.0 + rng.integers(0, 2**20, 3000) * 2.0**-52).astype(dtype),
    ]


def _sort_with(method: str, keys: np.ndarray, buffer: np.ndarray, n: int) -> np.ndarray:
    """keys[:n] sorted by one of the sorts; returns the array holding them."""
    if method == "comparison":
        return core.sort_keys(keys, buffer, n, 10**9, core.SORT_LSD)
    if method == "numpy":
        keys[:n].sort()
        return keys
    key_or, key_and = core.key_bits(keys, 0, n)
    sort = core.radix_sort_msd if method == "msd" else core.radix_sort_lsd
    return sort(keys, buffer, n, key_or, key_and)


_SORTS = ["lsd", "msd", "numpy", "comparison"]


def _sorted_keys(errors: np.ndarray, fg: np.ndarray, method: str) -> np.ndarray:
    """Pack and sort one row with the module's kernels, as the serial segment path does."""
    grad = np.full(errors.shape, np.nan, dtype=errors.dtype)
    batch = numba_cpu._extension_batch(errors[None], fg[None], grad[None])
    keys = np.zeros(errors.size, dtype=np.uint64)
    buffer = np.zeros(errors.size, dtype=np.uint64)
    n, n_fg = numba_cpu._pack_range(batch, 0, 0, errors.size, keys, 0)
    assert n == int((errors > 0).sum()) and n_fg == int(fg.sum())
    assert bool(np.all(grad[errors <= 0] == 0)), "non-positive errors get gradient 0 at once"
    if n == 0:
        return keys[:0]
    result = _sort_with(method, keys, buffer, n)
    if errors.dtype == np.float64:
        numba_cpu._refine_float64_ties(result, 0, n, batch, 0)
    return result[:n].copy()


@pytest.mark.parametrize("dtype", _FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("method", _SORTS)
def test_packed_sort_is_a_stable_descending_argsort(dtype, method):
    """Sorted keys give exactly argsort(-errors, stable) over the positive errors, with each
    pixel's label, for -0.0, +0.0, subnormals, +-inf, ties and wide ranges, whichever sort
    runs (the machine's choice may be any of them)."""
    rng = np.random.default_rng(7)
    for errors in _float_rows(dtype, rng):
        fg = rng.random(errors.size) < 0.4
        fg[errors == -np.inf] = False
        keys = _sorted_keys(errors, fg, method)
        indices = ((keys & np.uint64(0xFFFFFFFF)) >> np.uint64(1)).astype(np.int64)
        labels = (keys & np.uint64(1)).astype(bool)
        order = np.argsort(-errors, kind="stable")
        expected = order[errors[order] > 0]
        np.testing.assert_array_equal(indices, expected)
        np.testing.assert_array_equal(labels, fg[expected])


def test_radix_sorts_match_np_sort_on_raw_keys():
    """Keys with random 31-bit prefixes (dense, sparse, one value, two values, a narrow
    window, skewed) and unique low halves come out exactly as np.sort puts them, by the LSD
    sort, the MSD sort and sort_keys with either (past MSD_MIN_KEYS)."""
    rng = np.random.default_rng(3)
    n = core.MSD_MIN_KEYS + 3000
    low = np.arange(n, dtype=np.uint64)
    prefixes = [
        rng.integers(0, 2**31, n),
        rng.integers(0, 2**9, n) << 13,  # shared low zero bits (float16): a narrower window
        np.full(n, 12345),  # no bit varies: no pass
        rng.choice([7, 2**30 + 7], n),  # one varying bit, far from the others
        rng.integers(2**31 - 50, 2**31, n),
        (rng.integers(0, 2**27, n) | (1 << 30)),  # softmax errors: 27 bits vary
        # bits 0 and 30 vary: the middle of three digits is constant, its pass skipped
        rng.integers(0, 2, n) | (rng.integers(0, 2, n) << 30),
        # most keys in a few MSD buckets (one bucket far past cache size), the rest spread
        np.where(rng.random(n) < 0.9, 5 << 20, rng.integers(0, 2**31, n)) | rng.integers(0, 64, n),
    ]
    for prefix in prefixes:
        keys = (prefix.astype(np.uint64) << np.uint64(32)) | low  # packed in pixel order
        expected = np.sort(keys)
        key_bits = core.key_bits(keys, 0, n)
        for sort in (core.radix_sort_lsd, core.radix_sort_msd):
            result = sort(keys.copy(), np.empty_like(keys), n, *key_bits)
            np.testing.assert_array_equal(result, expected, err_msg=sort.__name__)
        for method in (core.SORT_LSD, core.SORT_MSD):
            result = core.sort_keys(keys.copy(), np.empty_like(keys), n, 0, method)
            np.testing.assert_array_equal(result[:n], expected, err_msg=str(method))


def test_radix_layout_covers_exactly_the_varying_bits():
    """Digits start at the lowest varying prefix bit, cover the highest, and are as few as
    11-bit digits allow, all of one width."""
    def layout(prefix_or, prefix_and):
        shift = np.uint64(32)
        low, high = core.varying_prefix_bits(
            np.uint64(prefix_or) << shift, np.uint64(prefix_and) << shift
        )
        return (low, *core.digit_layout(low, high, core.MAX_DIGIT_BITS))

    assert layout(5, 5)[2] == 0  # nothing varies
    assert layout(0x4000_0000 | (2**27 - 1), 0x4000_0000) == (32, 9, 3)
    assert layout(0x7FFF_FFFF, 0) == (32, 11, 3)
    assert layout(0x7FFF_E000, 0) == (32 + 13, 9, 2)  # float16: low 13 bits are 0
    assert layout(0x4000_0007, 0x4000_0000) == (32, 3, 1)


def _cases_for_paths(gen: torch.Generator):
    yield "tie-free fp32", tie_free_errors((1, 5000), torch.float32, gen), 0.3
    yield "tie-free fp64", tie_free_errors((2, 5000), torch.float64, gen), 0.3
    yield "tie-free fp16", tie_free_errors((1, 3000), torch.float16, gen), 0.5
    yield "tie-free bf16", tie_free_errors((1, 3000), torch.bfloat16, gen), 0.5
    yield "no fg", tie_free_errors((1, 4000), torch.float32, gen), 0.0
    yield "all fg", tie_free_errors((1, 4000), torch.float64, gen), 1.0
    yield "tiny", tie_free_errors((1, 3), torch.float32, gen), 0.5
    yield "no positive", -tie_free_errors((1, 3000), torch.float32, gen).abs(), 0.5
    yield "all equal", torch.full((1, 3000), 0.75, dtype=torch.float64), 0.4
    ties = torch.randint(-3, 6, (1, 6000), generator=gen).double() / 4
    yield "ties fp64", ties, 0.4
    yield "ties fp32", ties.float(), 0.4


def _padded(errors: torch.Tensor, fg: torch.Tensor, gen: torch.Generator):
    pad = torch.rand(errors.shape, generator=gen) < 0.3
    return errors.masked_fill(pad, -torch.inf), fg & ~pad


@pytest.mark.parametrize("padding", [False, True], ids=["dense", "padded"])
def test_within_segment_path_matches_serial_and_reference(monkeypatch, gen, padding):
    """Forcing the blocked path (threshold lowered) gives the serial path's gradient
    (bit-identical: same keys, same order, same arithmetic) and the reference's."""
    for name, errors, fg_rate in _cases_for_paths(gen):
        fg = torch.rand(errors.shape, generator=gen) < fg_rate
        if padding:
            errors, fg = _padded(errors, fg, gen)
        monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_PIXELS", 1 << 40)
        serial_loss, serial_grad = numba_cpu.lovasz_extension(errors, fg)
        monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_PIXELS", 1)
        monkeypatch.setattr(numba_cpu, "_split_pays", lambda *args: True)
        monkeypatch.setattr(core, "thread_count", lambda: 3)
        blocked_loss, blocked_grad = numba_cpu.lovasz_extension(errors, fg)
        monkeypatch.undo()
        assert torch.equal(blocked_grad, serial_grad), name
        torch.testing.assert_close(blocked_loss, serial_loss, rtol=1e-12, atol=0, msg=name)
        ref_loss, ref_grad = get_backend("numpy").run(errors, fg)
        dtype = errors.dtype
        assert_close_report(blocked_loss, ref_loss, LOSS_TOLERANCE[dtype], f"{name} loss")
        if "ties" not in name and "equal" not in name:
            assert_close_report(blocked_grad, ref_grad, GRAD_TOLERANCE[dtype], f"{name} grad")


@pytest.mark.parametrize("num_blocks", [1, 2, 5, 16])
def test_blocked_segment_any_block_count(gen, num_blocks):
    """Blocks that hold no positive error, or more blocks than keys, change nothing."""
    errors = tie_free_errors((1, 3001), torch.float64, gen)
    errors[0, :1500] = -torch.inf  # the first blocks have nothing to pack
    fg = (torch.rand(errors.shape, generator=gen) < 0.3) & (errors > -torch.inf)
    ref_loss, ref_grad = get_backend("numpy").run(errors, fg)
    grad = np.full((1, 3001), np.nan)
    batch = numba_cpu._extension_batch(errors.numpy(), fg.numpy(), grad)
    keys, buffer = np.empty(3001, np.uint64), np.empty(3001, np.uint64)
    for radix_min in (0, 10**9):
        loss = numba_cpu._segment_blocked(batch, 0, keys, buffer, num_blocks, radix_min)
        assert loss == pytest.approx(ref_loss.item(), rel=1e-12)
        assert_close_report(torch.from_numpy(grad), ref_grad, GRAD_TOLERANCE[torch.float64],
                            f"{num_blocks} blocks grad")


@pytest.mark.parametrize("radix_min", [0, 1 << 40])
def test_sort_choice_does_not_change_the_answer(monkeypatch, gen, radix_min):
    """Radix everywhere and comparison sort everywhere agree with the reference."""
    monkeypatch.setattr(numba_cpu, "RADIX_MIN_KEYS", radix_min)
    for dtype in (torch.float32, torch.float64):
        errors = tie_free_errors((5, 2000), dtype, gen)
        errors[1, 100:] = -torch.inf
        fg = (torch.rand(5, 2000, generator=gen) < 0.3) & (errors > -torch.inf)
        loss, grad = numba_cpu.lovasz_extension(errors, fg)
        ref_loss, ref_grad = get_backend("numpy").run(errors, fg)
        assert_close_report(loss, ref_loss, LOSS_TOLERANCE[dtype], "loss")
        assert_close_report(grad, ref_grad, GRAD_TOLERANCE[dtype], "grad")


def _settled_rows(dtype, rng: np.random.Generator) -> dict[str, tuple]:
    """name: (errors, fg, whether the tail past the last fg pixel is dropped) for one row."""
    def fg_above(n=3000):  # fg errors above most background ones (the softmax of many classes)
        fg = rng.random(n) < 0.1
        return np.where(fg, rng.uniform(0.5, 1, n), rng.uniform(0, 0.6, n)).astype(dtype), fg

    rows = {"fg above": (*fg_above(), True)}
    errors, fg = fg_above()
    ties = rng.choice(np.flatnonzero(~fg), 60, replace=False)
    errors[ties] = errors[fg].min()  # background tied with the last fg, before and after it
    rows["ties at the bound"] = (errors, fg, True)
    errors = rng.uniform(0, 1, 2000).astype(dtype)
    errors[[5, 700, 1999]] = errors.max()
    errors[[6, 9]] = -np.inf
    rows["no fg, the max tied"] = (errors, np.zeros(2000, bool), True)
    errors, fg = fg_above()
    errors[np.flatnonzero(fg)[3]] = 0.0  # an unsorted fg pixel: past it increments go on
    rows["an fg error of 0"] = (errors, fg, False)
    fg = rng.random(3000) < 0.5
    rows["labels mixed"] = (rng.uniform(0, 1, 3000).astype(dtype), fg, False)
    if dtype == np.float64:  # background sharing the last fg's top 32 bits, on both sides
        errors, fg = fg_above()
        last = np.flatnonzero(fg)[np.argmin(errors[fg])]
        near = rng.choice(np.flatnonzero(~fg), 80, replace=False)
        errors[near] = errors[last] * (1 + rng.integers(-40, 41, 80) * 2.0**-44)
        rows["float64 ties of the prefix"] = (errors, fg, True)
    return rows


def _segment_keys_sorted(errors: np.ndarray, fg: np.ndarray, drop: bool):
    """(loss, gradient, keys sorted) of one row by the serial path's kernels, the settled tail
    dropped (as every call does) or not."""
    grad = np.full(errors.shape, np.nan, dtype=errors.dtype)
    batch = numba_cpu._extension_batch(errors[None], fg[None], grad[None])
    keys, buffer = np.zeros(errors.size, np.uint64), np.zeros(errors.size, np.uint64)
    if drop:
        n, n_fg = numba_cpu._pack_segment(batch, 0, keys)
    else:
        n, n_fg = numba_cpu._pack_range(batch, 0, 0, errors.size, keys, 0)
    sorted_keys = core.sort_keys(keys, buffer, n, numba_cpu.RADIX_MIN_KEYS, core.SORT_LSD)
    return numba_cpu._finish_segment(batch, 0, sorted_keys, n, n_fg), grad, n


@pytest.mark.parametrize("dtype", _FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_settled_tail_left_unsorted_keeps_every_bit(dtype):
    """Background pixels past the last fg pixel are left out of the sort only where every fg
    pixel is sorted and they are enough to pay; the loss and the gradient (signs of zeros
    included) are those of sorting every key, and the reference's."""
    for name, (errors, fg, dropped) in _settled_rows(dtype, np.random.default_rng(3)).items():
        loss, grad, kept = _segment_keys_sorted(errors, fg, drop=True)
        whole_loss, whole_grad, sorted_count = _segment_keys_sorted(errors, fg, drop=False)
        assert sorted_count == int((errors > 0).sum()), name
        assert (kept < sorted_count) == dropped, name
        if dropped:
            assert kept < sorted_count * (1 - numba_cpu.SETTLED_TAIL_MIN_FRACTION), name
        assert np.float64(loss).tobytes() == np.float64(whole_loss).tobytes(), name
        assert grad.tobytes() == whole_grad.tobytes(), name
        ref_loss, ref_grad = get_backend("numpy").run(torch.from_numpy(errors)[None],
                                                      torch.from_numpy(fg)[None])
        assert_close_report(torch.tensor([loss], dtype=ref_loss.dtype), ref_loss,
                            LOSS_TOLERANCE[ref_grad.dtype], f"{name} loss")
        if "ties" not in name and "tied" not in name:
            assert_close_report(torch.from_numpy(grad)[None], ref_grad,
                                GRAD_TOLERANCE[ref_grad.dtype], f"{name} grad")


def test_settled_tail_gets_the_passes_zero_with_its_sign():
    """A negative background scale makes the tail's gradient -0.0, as the pass writes it."""
    errors = np.array([0.9, 0.8, 0.3, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01], np.float32)
    fg = np.zeros(10, bool)
    fg[:2] = True
    grads = []
    for drop in (True, False):
        grad = np.full((1, 10), np.nan, dtype=np.float32)
        batch = numba_cpu._extension_batch(errors[None], fg[None], grad)
        batch = batch._replace(grad_scale=np.array([-2.0]))
        keys, buffer = np.zeros(10, np.uint64), np.zeros(10, np.uint64)
        pack = numba_cpu._pack_segment if drop else (
            lambda b, s, k: numba_cpu._pack_range(b, s, 0, 10, k, 0))
        n, n_fg = pack(batch, 0, keys)
        assert (n == 2) == drop
        numba_cpu._finish_segment(batch, 0, core.sort_keys(keys, buffer, n, 64, core.SORT_LSD),
                                  n, n_fg)
        grads.append(grad)
    assert np.all(np.signbit(grads[0][0, 2:])) and grads[0].tobytes() == grads[1].tobytes()


def test_nonpositive_errors_count_in_n_fg(gen):
    """fg pixels with error <= 0 are never sorted but still enlarge the union."""
    errors = torch.tensor([[0.9, -0.2, 0.4, 0.0, -0.0, 0.1]], dtype=torch.float64)
    fg = torch.tensor([[False, True, True, True, True, False]])
    loss, grad = numba_cpu.lovasz_extension(errors, fg)
    ref_loss, ref_grad = get_backend("numpy").run(errors, fg)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-15)
    assert torch.allclose(grad, ref_grad, rtol=1e-15, atol=0)
    assert grad[0, 0].item() == pytest.approx(1 / 5)  # union = n_fg 4 + the first mistake


def test_two_specializations_for_four_dtypes(gen):
    """float16/bfloat16 are widened to float32, so the kernels compile for 2 dtypes only."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        errors = tie_free_errors((3, 50), dtype, gen)
        lovasz_extension(errors, torch.rand(3, 50, generator=gen) < 0.5, backend="numba")
    # the fused loss path adds int64 labels; the score dtypes are float32 and float64 only
    score_dtypes = {
        str(signature[0].types[0].dtype)
        for signature in numba_cpu._segments_shared.signatures
    }
    assert score_dtypes <= {"float32", "float64"}


def test_non_contiguous_inputs_are_copied_once(gen):
    errors = tie_free_errors((40, 6), torch.float32, gen).t()
    fg = (torch.rand(40, 6, generator=gen) < 0.5).t()
    loss, grad = numba_cpu.lovasz_extension(errors, fg)
    ref_loss, ref_grad = get_backend("numpy").run(errors.contiguous(), fg.contiguous())
    assert_close_report(grad, ref_grad, GRAD_TOLERANCE[torch.float32], "grad")


# --------------------------------------------------------------------------------------------
# The fused loss path (lovasz_loss): keys packed straight from the scores and labels


def _loss_and_grad(loss_fn, scores, labels, backend_name="numba", **options):
    scores = scores.detach().clone().requires_grad_()
    loss = loss_fn(scores, labels, backend=backend_name, **options)
    loss.backward()
    return loss.detach(), scores.grad


def _fused_and_generic(monkeypatch, loss_fn, scores, labels, **options):
    """(loss, grad) through lovasz_loss, then with it removed (the generic path through
    lovasz_extension); fails unless each run took the path it names."""
    calls = {"lovasz_loss": 0, "lovasz_extension": 0}
    for entry_point in calls:
        original = getattr(numba_cpu, entry_point)

        def spy(*args, _original=original, _name=entry_point):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(numba_cpu, entry_point, spy)
    fused = _loss_and_grad(loss_fn, scores, labels, **options)
    assert calls == {"lovasz_loss": 1, "lovasz_extension": 0}, calls
    monkeypatch.delattr(numba_cpu, "lovasz_loss")
    generic = _loss_and_grad(loss_fn, scores, labels, **options)
    assert calls == {"lovasz_loss": 1, "lovasz_extension": 1}, calls
    monkeypatch.undo()
    return fused, generic


def _assert_same(fused, generic, dtype, what):
    (fused_loss, fused_grad), (generic_loss, generic_grad) = fused, generic
    assert fused_loss.dtype == generic_loss.dtype and fused_grad.dtype == generic_grad.dtype
    # the same keys in the same order: only the weight's rounding (float64 in the fused
    # scatter, the grad's dtype in the generic one) and the loss's float64 total differ
    tolerance = {torch.float64: 1e-12}.get(dtype, 1e-5)
    torch.testing.assert_close(fused_loss, generic_loss, rtol=tolerance, atol=0, msg=what)
    torch.testing.assert_close(fused_grad, generic_grad, rtol=tolerance, atol=0, msg=what)


_SCORE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", _SCORE_DTYPES, ids=str)
@pytest.mark.parametrize("per_image", [False, True], ids=["batch", "per_image"])
@pytest.mark.parametrize("ignore_index", [None, 255])
@pytest.mark.parametrize(
    ("classes", "class_weights"),
    [("present", None), ("all", None), ([0, 2, 4], None), ("present", [1, 0, 2, 0.5, 3])],
    ids=["present", "all", "list", "weights"],
)
def test_fused_softmax_equals_generic(monkeypatch, gen, dtype, per_image, ignore_index,
                                      classes, class_weights):
    """The fused path is what numba runs, and it gives the generic path's loss and gradient:
    batch segments over several images (strided channels), images without a class or with
    no valid pixel, zero-weight classes, 16-bit inputs."""
    batch, num_classes = 3, 5
    logits = torch.randn(batch, num_classes, 7, 9, generator=gen, dtype=torch.float64)
    probas = logits.softmax(dim=1).to(dtype)
    labels = torch.randint(0, num_classes - 1, (batch, 7, 9), generator=gen)  # class 4 absent
    labels[1] = 3  # an image with one class
    if ignore_index is not None:
        labels[torch.rand(labels.shape, generator=gen) < 0.2] = ignore_index
        labels[2] = ignore_index  # an image without a valid pixel
    fused, generic = _fused_and_generic(
        monkeypatch, lovasz_softmax, probas, labels, classes=classes, per_image=per_image,
        ignore_index=ignore_index, class_weights=class_weights,
    )
    _assert_same(fused, generic, dtype, "softmax")


@pytest.mark.parametrize(
    ("num_classes", "ignore_index"),
    [(5, -100), (5, 3), (254, 300), (255, -1), (300, 299)],
    ids=["negative", "a class", "uint8, large ignore", "int64, negative", "int64, a class"],
)
def test_fused_labels_narrowed_or_not(monkeypatch, gen, num_classes, ignore_index):
    """Labels go to the kernels as uint8 below 255 classes (the ignore label remapped to 255)
    and as int64 from 255 on: either way the fused path matches the generic one."""
    logits = torch.randn(2, num_classes, 5, 7, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (2, 5, 7), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.3] = ignore_index
    labels[0, 0, :3] = num_classes - 1  # the highest class is present
    for per_image in (False, True):
        fused, generic = _fused_and_generic(
            monkeypatch, lovasz_softmax, logits.softmax(dim=1), labels, per_image=per_image,
            ignore_index=ignore_index,
        )
        _assert_same(fused, generic, torch.float64, f"{num_classes} classes")


@pytest.mark.parametrize(("num_channels", "ignore_index", "dtype", "ignore_label"), [
    (1, None, np.int64, 0), (1, -100, np.int64, -100), (2, None, np.uint8, 3),
    (5, 3, np.uint8, 6), (254, None, np.uint8, 255), (255, 7, np.int64, 7)])
def test_labels_are_narrowed_only_where_segments_reread_them(num_channels, ignore_index, dtype,
                                                             ignore_label):
    """One channel: each label is read by one segment, so the kernels read the int64 labels
    (narrowing would be a pass of its own); 2 to 254 channels: uint8, the ignore label C + 1."""
    labels = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]])
    if ignore_index is not None:
        labels[0, 0] = ignore_index
    flat, ignore = numba_cpu._narrow_labels(labels, ignore_index, num_channels)
    assert flat.dtype == dtype and ignore == ignore_label
    expected = labels.reshape(-1).numpy()
    if dtype == np.uint8 and ignore_index is not None:
        expected = np.where(expected == ignore_index, ignore_label, expected)
    np.testing.assert_array_equal(flat, expected)


def _expected_census(labels: torch.Tensor, num_classes: int, ignore_index: int | None):
    """What a census of ``labels`` must give, from plain torch ops."""
    ignored = (torch.zeros_like(labels, dtype=torch.bool) if ignore_index is None
               else labels == ignore_index)
    in_range = (labels >= 0) & (labels < num_classes) & ~ignored
    class_pixels = torch.stack([((labels == c) & in_range).sum(dim=1)
                                for c in range(num_classes)], dim=1)
    narrow = torch.where(in_range, labels, torch.where(ignored, num_classes + 1, num_classes))
    return (class_pixels, (~ignored).sum(dim=1, keepdim=True),
            int((~in_range & ~ignored).sum()), narrow.reshape(-1).to(torch.uint8).numpy())


@pytest.mark.parametrize("num_classes", [2, 3, 4, 5, 21, 254])
@pytest.mark.parametrize("ignore_index", [None, 0, -100, 255])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("blocks", [1, 3], ids=["one-block", "three-blocks"])
def test_label_census_counts_checks_and_narrows(monkeypatch, gen, num_classes, ignore_index,
                                                batch, blocks):
    """Each image's pixels per class, its valid pixels, the labels out of range (neither a
    class nor ignored: unchecked labels) and the narrowed labels, with blocks that cut
    images (three threads' blocks over 3 x 1001 pixels) and the per-class passes (up to 3
    classes) and tallies (more) of the count."""
    if blocks > 1:
        monkeypatch.setattr(numba_cpu, "NARROW_SPLIT_LABELS", 1)
        monkeypatch.setattr(core, "thread_count", lambda: blocks)
    labels = torch.randint(0, num_classes, (batch, 1001), generator=gen)
    labels[0, :7] = num_classes - 1  # a run of one label
    picks = torch.rand(labels.shape, generator=gen)
    labels[picks < 0.05] = -1  # out of range, below
    labels[(picks >= 0.05) & (picks < 0.1)] = num_classes + 300  # above
    if ignore_index is not None:
        labels[(picks >= 0.1) & (picks < 0.3)] = ignore_index
    census = numba_cpu.label_census(labels, num_classes, ignore_index)
    class_pixels, valid_pixels, out_of_range, narrow = _expected_census(
        labels, num_classes, ignore_index)
    assert torch.equal(census.class_pixels, class_pixels)
    assert torch.equal(census.valid_pixels, valid_pixels)
    assert census.out_of_range == out_of_range > 0
    narrowed, ignore_label = census.labels
    np.testing.assert_array_equal(narrowed, narrow)
    assert ignore_label == num_classes + 1


@pytest.mark.parametrize("num_classes", [1, 255])
def test_label_census_declines_where_labels_stay_int64(num_classes):
    assert numba_cpu.label_census(torch.zeros(1, 4, dtype=torch.int64), num_classes,
                                  None) is None


_CENSUS_CALLS = [
    dict(), dict(classes="all"), dict(classes=[0, 3]), dict(per_image=True),
    dict(ignore_index=255), dict(ignore_index=0, per_image=True),
    dict(class_weights=[1.0, 2.0, 0.5, 1.0, 3.0]),
    dict(classes="all", ignore_index=255, per_image=True),
]


@pytest.mark.parametrize("options", _CENSUS_CALLS, ids=str)
def test_loss_is_the_same_with_and_without_the_census(monkeypatch, gen, options):
    """The census replaces the plan's counts and the backend's own narrowing: the same bits
    either way, and the same as the reference."""
    probas = torch.randn(3, 5, 9, 13, generator=gen, dtype=torch.float64).softmax(dim=1)
    labels = torch.randint(0, 5, (3, 9, 13), generator=gen)
    labels[0] = 4  # an image of one class
    ignore_index = options.get("ignore_index")
    labels[1, :2] = 1 if ignore_index is None else ignore_index
    results = []
    for census in (True, False):
        with monkeypatch.context() as patch:
            if not census:
                patch.setattr(Backend, "label_census", lambda self, *args: None)
            scores = probas.clone().requires_grad_()
            lovasz_softmax(scores, labels, backend="numba", **options).backward()
            results.append((scores.grad, float(lovasz_softmax(probas, labels, backend="numba",
                                                              **options))))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]
    reference = lovasz_softmax(probas, labels, backend="numpy", **options)
    assert_close_report(torch.tensor(results[0][1], dtype=torch.float64), reference,
                        LOSS_TOLERANCE[torch.float64], "loss")


def test_unchecked_labels_out_of_range_are_background_with_and_without_the_census(
        monkeypatch, gen):
    """With value checks off, a label outside the classes is no class's foreground and
    makes no class present (as the plan counts without a census), either way."""
    from lovasz_kernels import set_validate_values

    probas = torch.randn(2, 4, 6, 7, generator=gen, dtype=torch.float64).softmax(dim=1)
    labels = torch.randint(0, 4, (2, 6, 7), generator=gen)
    labels[0, :2] = -1
    labels[1, 3:] = 9
    losses = []
    set_validate_values(False)
    try:
        for census in (True, False):
            with monkeypatch.context() as patch:
                if not census:
                    patch.setattr(Backend, "label_census", lambda self, *args: None)
                scores = probas.clone().requires_grad_()
                loss = lovasz_softmax(scores, labels, backend="numba", per_image=True)
                loss.backward()
                losses.append((float(loss.detach()), scores.grad))
    finally:
        set_validate_values(True)
    assert losses[0][0] == losses[1][0] and torch.equal(losses[0][1], losses[1][1])


def test_census_stands_for_the_label_check_and_leaves_it_the_explaining(monkeypatch, gen):
    """Labels in range: the census checked them, no other pass runs; labels out of range:
    the shared check explains them, in the words every backend uses."""
    probas = torch.rand(2, 3, 8, 8, generator=gen).softmax(dim=1)
    labels = torch.randint(0, 3, (2, 8, 8), generator=gen)
    from lovasz_kernels import _validate

    checked = []
    shared_check = _validate.check_labels
    monkeypatch.setattr(_validate, "check_labels",
                        lambda *args, **kwargs: checked.append(1) or shared_check(*args, **kwargs))
    lovasz_softmax(probas, labels, backend="numba")
    assert not checked
    labels[1, 2, 3] = 7
    messages = []
    for backend in ("numba", "numpy"):
        with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)") as error:
            lovasz_softmax(probas, labels, backend=backend)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and checked


# (what is done to a softmax's probabilities, what check_scores proves for each value check)
_SCORE_CHANGES = {
    "none": {"finite": True, "unit_interval": True, "simplex": True},
    "nan": {"finite": False, "unit_interval": False, "simplex": False},
    "inf": {"finite": False, "unit_interval": False, "simplex": False},
    "-inf": {"finite": False, "unit_interval": False, "simplex": False},
    "negative": {"finite": True, "unit_interval": False, "simplex": False},
    "above one": {"finite": True, "unit_interval": False, "simplex": False},
    # -0.0 is a probability, which the bits cannot tell: the shared check accepts it
    "-0.0": {"finite": True, "unit_interval": False, "simplex": False},
    "sums 0.995": {"finite": True, "unit_interval": True, "simplex": True},
    "sums 1.005": {"finite": True, "unit_interval": True, "simplex": True},
    "sums 0.98": {"finite": True, "unit_interval": True, "simplex": False},
    "one pixel's sum 1.02": {"finite": True, "unit_interval": True, "simplex": False},
}


def _changed_scores(probas: torch.Tensor, change: str, at: tuple[int, int, int]):
    """``probas`` (B, C, P) with ``change`` made at (image, channel, pixel) ``at``."""
    changed = probas.clone()
    image, channel, pixel = at
    single = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf"),
              "negative": -1e-30, "above one": 1.0 + 2.0 ** -20, "-0.0": -0.0}
    if change in single:
        changed[image, channel, pixel] = single[change]
    elif change.startswith("sums"):
        changed *= float(change.split()[1])
    elif change == "one pixel's sum 1.02":
        changed[image, :, pixel] *= 1.02
    return changed


@pytest.mark.parametrize("change", list(_SCORE_CHANGES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("split", [False, True], ids=["one-task", "split"])
def test_check_scores_proves_what_the_shared_check_accepts(monkeypatch, gen, change, dtype,
                                                           split):
    """Each value check proves valid scores valid and never proves what the shared check
    refuses (what it cannot prove, the shared check decides): sums against the shared
    tolerance, a bad value at either end or in the middle of the tasks' blocks (4 tasks over
    3 images of 5 channels of 1001 pixels: blocks that cut images and channels)."""
    monkeypatch.setattr(core, "thread_count", lambda: 5)  # it looks: a channel per thread
    if split:
        monkeypatch.setattr(numba_cpu, "_CHECK_TASK_VALUES", 3753)  # 4 tasks
    probas = torch.randn(3, 5, 1001, generator=gen, dtype=torch.float64).softmax(dim=1)
    from lovasz_kernels import _validate

    for at in [(0, 0, 0), (2, 4, 1000), (1, 2, 1000), (1, 0, 1)]:
        scores = _changed_scores(probas.to(dtype), change, at)
        for value_check, proven in _SCORE_CHANGES[change].items():
            assert numba_cpu.check_scores(scores, value_check) is proven, (value_check, at)
            if not proven:
                continue
            # what it proves, the shared check accepts
            if value_check == "finite":
                _validate.check_finite("logits", scores)
            else:
                _validate.check_probas(scores, simplex=value_check == "simplex")


def test_check_scores_sums_against_the_shared_tolerance(monkeypatch):
    """Sums that miss 1 by the tolerance less C * 2^-20 are proven; by more than the
    tolerance, refused by both; in between, left to the shared check."""
    from lovasz_kernels import _validate

    monkeypatch.setattr(core, "thread_count", lambda: 4)

    probas = torch.full((1, 4, 64), 0.25, dtype=torch.float64)
    tolerance = _validate.simplex_tolerance(torch.float64)
    for off, proven in [(tolerance - 5 * 2.0 ** -20, True), (tolerance - 2 * 2.0 ** -20, False),
                        (tolerance * 1.01, False)]:
        scores = probas * (1 - off)
        assert numba_cpu.check_scores(scores, "simplex") is proven, off
        if off > tolerance:
            with pytest.raises(ValueError, match="must sum to 1"):
                _validate.check_probas(scores)
        else:
            _validate.check_probas(scores)


@pytest.mark.parametrize("scores", [
    torch.full((1, 2, 6), 0.5, dtype=torch.float16),
    torch.full((1, 2, 6), 0.5, dtype=torch.bfloat16),
    torch.full((1, 6, 2), 0.5).transpose(1, 2),  # not contiguous
    torch.full((2, 6), 0.5),  # not (B, C, P)
], ids=["float16", "bfloat16", "strided", "2-d"])
def test_check_scores_proves_nothing_it_does_not_read(monkeypatch, scores):
    monkeypatch.setattr(core, "thread_count", lambda: 8)
    assert numba_cpu.check_scores(scores, "simplex") is False


def test_check_scores_looks_only_where_it_pays(monkeypatch):
    """At most one channel per thread and ``_CHECK_MOST_VALUES`` values."""
    probas = torch.full((2, 4, 8), 0.25)
    monkeypatch.setattr(core, "thread_count", lambda: 4)
    assert numba_cpu.check_scores(probas, "simplex")
    monkeypatch.setattr(numba_cpu, "_CHECK_MOST_VALUES", probas.numel() - 1)
    assert not numba_cpu.check_scores(probas, "simplex")
    monkeypatch.setattr(numba_cpu, "_CHECK_MOST_VALUES", probas.numel())
    monkeypatch.setattr(core, "thread_count", lambda: 3)
    assert not numba_cpu.check_scores(probas, "simplex")


def test_check_scores_stands_for_the_shared_check(monkeypatch, gen):
    """Valid scores: no shared pass over them; invalid ones: the shared check explains, in
    the words every backend uses."""
    from lovasz_kernels import _validate

    monkeypatch.setattr(core, "thread_count", lambda: 3)  # it looks: a channel per thread
    checked = []
    shared_probas, shared_finite = _validate.check_probas, _validate.check_finite
    monkeypatch.setattr(_validate, "check_probas", lambda *args, **kwargs: checked.append(
        "probas") or shared_probas(*args, **kwargs))
    monkeypatch.setattr(_validate, "check_finite", lambda *args, **kwargs: checked.append(
        "finite") or shared_finite(*args, **kwargs))
    probas = torch.rand(2, 3, 8, 8, generator=gen).softmax(dim=1)
    labels = torch.randint(0, 3, (2, 8, 8), generator=gen)
    logits = torch.randn(2, 8, 8, generator=gen)
    lovasz_softmax(probas, labels, backend="numba")
    lovasz_hinge(logits, labels.clamp(max=1), backend="numba")
    assert not checked
    lovasz_softmax(probas, labels, backend="torch")  # a backend without the hook
    assert checked == ["probas"]
    probas[1, 2, 3, 4] = 1.5
    logits[0, 1, 1] = float("nan")
    for call, pattern in [(lambda backend: lovasz_softmax(probas, labels, backend=backend),
                           r"probas must lie in \[0, 1\]"),
                          (lambda backend: lovasz_hinge(logits, labels.clamp(max=1),
                                                        backend=backend),
                           "logits must be finite")]:
        messages = []
        for backend in ("numba", "numpy"):
            with pytest.raises(ValueError, match=pattern) as error:
                call(backend)
            messages.append(str(error.value))
        assert messages[0] == messages[1]


@pytest.mark.parametrize("dtype", _SCORE_DTYPES, ids=str)
@pytest.mark.parametrize("per_image", [False, True], ids=["batch", "per_image"])
@pytest.mark.parametrize("ignore_index", [None, 2])
def test_fused_hinge_and_sigmoid_equal_generic(monkeypatch, gen, dtype, per_image,
                                               ignore_index):
    """The hinge (errors 1 -+ logit, bool labels too) and the C == 1 sigmoid softmax layout."""
    logits = torch.randn(4, 1, 6, 11, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, 2, (4, 6, 11), generator=gen)
    labels[1] = 0  # an image without foreground
    if ignore_index is not None:
        labels[torch.rand(labels.shape, generator=gen) < 0.2] = ignore_index
        labels[3] = ignore_index
    hinge = _fused_and_generic(
        monkeypatch, lovasz_hinge, logits, labels, per_image=per_image, ignore_index=ignore_index
    )
    _assert_same(*hinge, dtype, "hinge")
    if ignore_index is None:
        hinge_bool = _fused_and_generic(
            monkeypatch, lovasz_hinge, logits[:, 0], labels.bool(), per_image=per_image
        )
        _assert_same(*hinge_bool, dtype, "hinge, bool labels")
    sigmoid = _fused_and_generic(
        monkeypatch, lovasz_softmax, logits.sigmoid(), labels, per_image=per_image,
        ignore_index=ignore_index,
    )
    _assert_same(*sigmoid, dtype, "sigmoid softmax")


@pytest.mark.parametrize("per_image", [False, True], ids=["batch", "per_image"])
def test_fused_within_segment_path(monkeypatch, gen, per_image):
    """Few segments on the blocked path (forced) agree with the generic path."""
    logits = torch.randn(2, 40, 50, generator=gen)
    labels = torch.randint(0, 3, (2, 40, 50), generator=gen)  # 2 is ignored
    monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_PIXELS", 1)
    monkeypatch.setattr(numba_cpu, "_split_pays", lambda *args: True)
    monkeypatch.setattr(core, "thread_count", lambda: 3)
    monkeypatch.setattr(numba_cpu, "RADIX_MIN_KEYS", 0)
    fused = _loss_and_grad(lovasz_hinge, logits, labels, per_image=per_image, ignore_index=2)
    monkeypatch.delattr(numba_cpu, "lovasz_loss")
    generic = _loss_and_grad(lovasz_hinge, logits, labels, per_image=per_image, ignore_index=2)
    _assert_same(fused, generic, torch.float32, "blocked hinge")


def test_fused_path_declines_offsets_beyond_the_key_field(monkeypatch, gen):
    """A batch segment whose (B, C, P) offsets overflow the 31-bit field takes the generic path
    through lovasz_extension (whose keys only index B * P pixels)."""
    probas = torch.randn(3, 4, 10, 10, generator=gen).softmax(dim=1)
    labels = torch.randint(0, 4, (3, 10, 10), generator=gen)
    plan_args = (probas.reshape(3, 4, 100), labels.reshape(3, 100))
    monkeypatch.setattr(numba_cpu, "MAX_PIXELS", 2 * 400 + 100 - 1)
    from lovasz_kernels._plan import SegmentPlan

    plan = SegmentPlan(None, torch.arange(4), torch.arange(4),
                       torch.full((4,), 0.25, dtype=torch.float64), 0.0, None, dense=False)
    extension_calls = []
    original = numba_cpu.lovasz_extension
    monkeypatch.setattr(numba_cpu, "lovasz_extension",
                        lambda *args: extension_calls.append(1) or original(*args))
    numba_cpu.lovasz_loss(*plan_args, plan)
    assert extension_calls == [1]
    declined = _loss_and_grad(lovasz_softmax, probas, labels)
    monkeypatch.undo()
    fused = _loss_and_grad(lovasz_softmax, probas, labels)
    _assert_same(fused, declined, torch.float32, "declined")


def test_auto_selection_picks_numba_on_cpu():
    assert select_backend(None, torch.device("cpu")).name == "numba"


def test_details_reports_version_and_threads():
    line = numba_cpu.details()
    assert core.numba.__version__ in line and "threads" in line and "sort" in line


def test_without_numba_imports_and_explains():
    """With numba hidden the module imports, says how to install it, an explicit request
    raises with that hint, and automatic selection quietly picks another backend."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["numba"] = None  # import numba now raises ImportError
        import torch
        from lovasz_kernels import BackendUnavailableError, lovasz_extension
        from lovasz_kernels._registry import Backend, select_backend
        from lovasz_kernels.backends import numba_cpu
        ok, reason = numba_cpu.availability()
        assert not ok and "pip install numba" in reason, reason
        try:
            lovasz_extension(torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.bool),
                             backend="numba")
        except BackendUnavailableError as exc:
            assert "pip install numba" in str(exc), exc
        else:
            raise AssertionError("backend='numba' ran without numba")
        assert select_backend(None, torch.device("cpu")).name != "numba"
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


@pytest.mark.parametrize("classes", ["all", "present"])
def test_unit_grad_output_backward(gen, classes):
    """loss.backward() hands out the saved gradient without a multiply: it equals the
    gradient of 2 * loss halved, accumulates correctly with retain_graph (the first .grad
    is a copy, not the saved tensor) and is still right when grad_output is not 1 or needs
    a graph of its own."""
    probas = torch.randn(2, 4, 9, 11, generator=gen).softmax(dim=1).requires_grad_()
    labels = torch.randint(0, 3, (2, 9, 11), generator=gen)  # class 3 absent
    loss = lovasz_softmax(probas, labels, classes=classes, backend="numba")
    (doubled,) = torch.autograd.grad(2 * loss, probas, retain_graph=True)
    loss.backward(retain_graph=True)
    first = probas.grad.clone()
    assert torch.equal(first, doubled / 2)
    probas.grad.mul_(3)  # must not reach the saved gradient
    loss.backward()
    assert torch.equal(probas.grad, 4 * first)
    loss = lovasz_softmax(probas, labels, classes=classes, backend="numba")
    grad_output = torch.ones((), dtype=loss.dtype, requires_grad=True)
    (grad,) = torch.autograd.grad(loss, probas, grad_output, create_graph=True)
    assert torch.equal(grad.detach(), first)
    assert grad.requires_grad  # still a function of grad_output


class _RecordOutputs(TorchDispatchMode):
    """Records (op, dtype, numel) of every tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(value, torch.Tensor):
                self.outputs.append((str(func), value.dtype, value.numel()))
        return result


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_scores_backward_rounds_the_product_straight_into_their_dtype(gen, dtype):
    """A grad_output that is not a host 1 (on a GPU, every backward): the 16-bit gradient is
    the float32 product rounded once, the bits of rounding a float32 product, and backward
    makes no float32 product twice the input's size beside the saved gradient (that made
    5x the input on a GPU; 3x now)."""
    probas = torch.randn(1, 21, 16, 16, generator=gen).softmax(dim=1).to(dtype)
    labels = torch.randint(0, 21, (1, 16, 16), generator=gen)
    wide = probas.float().requires_grad_()
    lovasz_softmax(wide, labels, backend="numba").backward()  # the saved float32 gradient
    narrow = probas.clone().requires_grad_()
    doubled = 2 * lovasz_softmax(narrow, labels, backend="numba")
    with _RecordOutputs() as recorded:
        doubled.backward()
    assert narrow.grad.dtype == dtype
    assert torch.equal(narrow.grad, (2 * wide.grad).to(dtype))
    full_size = [(op, out_dtype) for op, out_dtype, numel in recorded.outputs
                 if numel == probas.numel() and "detach" not in op]  # (views, not new memory)
    assert full_size and all(out_dtype == dtype for _, out_dtype in full_size), full_size


def _poison_kept_outputs() -> set[int]:
    """Fill the memory of this thread's kept outputs with NaN; returns where each starts."""
    from lovasz_kernels import _scratch

    starts = set()
    for key, kept in _scratch._thread_arrays().items():
        if isinstance(key, tuple) and key[0] == "output":
            memory = kept[0]
            memory.fill(np.nan)
            starts.add(memory.ctypes.data)
    return starts


@pytest.mark.parametrize("memory", ["new", "reused"])
@pytest.mark.parametrize("per_image", [False, True], ids=["batch", "per_image"])
def test_fused_gradient_not_zeroed_when_segments_cover_everything(monkeypatch, gen, per_image,
                                                                  memory):
    """With every (image, class) a segment, the fused path takes the gradient's memory
    without zeroing it: the kernels must write every pixel, ignored and unsorted ones
    included. New memory is poisoned with NaN to catch a pixel left unwritten, and so is a
    previous call's gradient, whose memory the call reuses."""
    from lovasz_kernels import _scratch

    new_arrays = []

    class PoisonedNumpy:
        """numpy, but new float arrays from ``empty`` come filled with NaN (only the module
        that takes the gradient's memory sees it: numba, compiling a kernel meanwhile, must
        not)."""

        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def empty(*args, **kwargs):
            array = np.empty(*args, **kwargs)
            if array.dtype.kind == "f":
                array.fill(np.nan)
                new_arrays.append(array.ctypes.data)
            return array

    probas = torch.randn(2, 4, 9, 11, generator=gen).softmax(dim=1)
    probas[0, 1] = 0  # zero errors on background: unsorted pixels
    probas = probas / probas.sum(dim=1, keepdim=True)
    labels = torch.randint(0, 4, (2, 9, 11), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.2] = 255
    expected = _loss_and_grad(lovasz_softmax, probas, labels, classes="all",
                              per_image=per_image, ignore_index=255, backend_name="numpy")
    _scratch.release_kept()
    poisoned = set()
    if memory == "reused":
        _loss_and_grad(lovasz_softmax, probas, labels, classes="all", per_image=per_image,
                       ignore_index=255)  # its gradient is dropped: the memory is free
        poisoned = _poison_kept_outputs()
    monkeypatch.setattr(_scratch, "np", PoisonedNumpy())
    loss, grad = _loss_and_grad(lovasz_softmax, probas, labels, classes="all",
                                per_image=per_image, ignore_index=255)
    monkeypatch.undo()
    assert grad.data_ptr() in (poisoned if memory == "reused" else new_arrays)
    assert not grad.isnan().any()
    assert_close_report(loss, expected[0], LOSS_TOLERANCE[torch.float32], "loss")
    assert_close_report(grad, expected[1], GRAD_TOLERANCE[torch.float32], "grad")


def test_scratch_is_reused_per_thread_and_bounded(monkeypatch):
    """Scratch is the same memory on a second call of the same thread (no fresh pages per
    call), another thread's own, and not kept at all beyond KEEP_BYTES."""
    import threading

    from lovasz_kernels import _scratch

    keys, buffers = numba_cpu._key_scratch(1000)
    assert keys.shape == buffers.shape == (1000,) and keys.dtype == np.uint64
    assert not np.shares_memory(keys, buffers)
    again, _ = numba_cpu._key_scratch(1000)
    assert np.shares_memory(keys, again)
    assert not np.shares_memory(keys, _scratch.scratch("another name", 1000, np.uint64))
    other = {}
    thread = threading.Thread(target=lambda: other.update(keys=numba_cpu._key_scratch(1000)[0]))
    thread.start()
    thread.join()
    assert not np.shares_memory(keys, other["keys"])
    monkeypatch.setattr(_scratch, "KEEP_BYTES", 1000)
    first, _ = numba_cpu._key_scratch(1000)
    second, _ = numba_cpu._key_scratch(1000)
    assert not np.shares_memory(first, second) and not np.shares_memory(first, keys)


def test_outputs_are_reused_only_once_nothing_refers_to_them(monkeypatch):
    """An output's memory comes back to the same thread's next request of that name once the
    array handed out, every tensor made from it and every view of those are gone; while any
    lives, a request gets new memory and the held values stay as they were."""
    import threading

    from lovasz_kernels import _scratch

    _scratch.release_kept()
    first = _scratch.output("test output", (3, 4), np.float32)
    start = first.ctypes.data
    del first
    again = _scratch.output("test output", (3, 4), np.float32)
    assert again.ctypes.data == start
    del again
    smaller = _scratch.output("test output", (2, 5), np.float32, zeroed=True)
    assert smaller.ctypes.data == start and smaller.shape == (2, 5) and not smaller.any()
    del smaller

    def holders(array):
        tensor = torch.from_numpy(array)
        return {"array": array, "tensor": tensor, "tensor view": tensor.reshape(-1)[::2],
                "numpy of the tensor": tensor.reshape(-1).numpy()}

    for name in ["array", "tensor", "tensor view", "numpy of the tensor"]:
        held = _scratch.output("test output", (3, 4), np.float32)
        held[:] = 5.0
        start = held.ctypes.data
        holder = holders(held)[name]
        del held
        other = _scratch.output("test output", (3, 4), np.float32, zeroed=True)
        other[:] = 7.0
        assert other.ctypes.data != start, name
        assert (np.asarray(holder) == 5.0).all(), name
        del other, holder
    other_thread = {}
    mine = _scratch.output("test output", (3, 4), np.float32)
    start = mine.ctypes.data
    del mine
    thread = threading.Thread(target=lambda: other_thread.update(
        start=_scratch.output("test output", (3, 4), np.float32).ctypes.data))
    thread.start()
    thread.join()
    assert other_thread["start"] != start
    assert _scratch.output("test output", (3, 4), np.float32).ctypes.data == start
    _scratch.release_kept()
    assert ("output", "test output") not in _scratch._thread_arrays()
    monkeypatch.setattr(_scratch, "KEEP_OUTPUT_BYTES", 40)
    _scratch.output("test output", (3, 4), np.float32)  # 48 bytes: not kept
    assert ("output", "test output") not in _scratch._thread_arrays()


@pytest.mark.parametrize("entry_point", ["loss", "extension"])
def test_a_gradient_held_is_never_overwritten_and_a_dropped_one_is_reused(gen, entry_point):
    """A later call of the same shape leaves a gradient the caller still holds (a leaf's
    .grad, or the extension's result) as it was, and takes the memory of one dropped."""
    def call(seed):
        generator = torch.Generator().manual_seed(seed)
        if entry_point == "extension":
            errors = torch.randn(3, 500, generator=generator)
            return lovasz_extension(errors, torch.rand(3, 500, generator=generator) < 0.3,
                                    backend="numba")[1]
        probas = torch.randn(2, 3, 20, 25, generator=generator).softmax(dim=1)
        labels = torch.randint(0, 3, (2, 20, 25), generator=generator)
        return _loss_and_grad(lovasz_softmax, probas, labels)[1]

    held = call(1)
    expected = held.clone()
    later = call(2)
    assert held.data_ptr() != later.data_ptr()
    assert torch.equal(held, expected)
    assert not torch.equal(later, expected)
    start = later.data_ptr()
    del later
    again = call(1)
    assert again.data_ptr() == start
    assert torch.equal(again, expected)


def test_a_floor_set_keeps_no_gradient_memory(gen):
    """Under a floor set (memory first) a call's gradient is new memory and none is kept
    between calls, also none an earlier default call kept; the default keeps it again."""
    from lovasz_kernels import _scratch
    from lovasz_kernels._plan import chunk_floor_set

    probas = torch.randn(2, 3, 20, 25, generator=gen).softmax(dim=1)
    labels = torch.randint(0, 3, (2, 20, 25), generator=gen)
    key = ("output", "numba loss gradient")
    _loss_and_grad(lovasz_softmax, probas, labels)
    assert key in _scratch._thread_arrays()
    with chunk_floor_set("cpu", 0):
        loss, grad = _loss_and_grad(lovasz_softmax, probas, labels)
        assert key not in _scratch._thread_arrays()
    assert torch.equal(grad, _loss_and_grad(lovasz_softmax, probas, labels)[1])
    assert key in _scratch._thread_arrays()


def test_concurrent_calls_from_threads_match_sequential_ones(gen):
    """Python threads running the loss at once (numba releases the GIL) each get their own
    scratch: the results equal those of the same calls one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    inputs = []
    for _ in range(6):
        probas = torch.randn(1, 5, 40, 50, generator=gen).softmax(dim=1)
        inputs.append((probas, torch.randint(0, 5, (1, 40, 50), generator=gen)))

    def run(pair):
        probas = pair[0].clone().requires_grad_()
        loss = lovasz_softmax(probas, pair[1], backend="numba")
        loss.backward()
        return loss.detach(), probas.grad

    sequential = [run(pair) for pair in inputs]
    with ThreadPoolExecutor(max_workers=3) as pool:
        for _ in range(3):
            concurrent = list(pool.map(run, inputs))
            for (loss, grad), (loss_seq, grad_seq) in zip(concurrent, sequential):
                assert torch.equal(loss, loss_seq) and torch.equal(grad, grad_seq)


@pytest.mark.parametrize("splits", [True, False], ids=["split", "whole"])
@pytest.mark.parametrize("threads", [2, 3])
def test_leftover_segments_split_where_the_rule_says(monkeypatch, gen, threads, splits):
    """With more segments than threads, the last S mod W segments run split across the
    threads when the rule says that pays (asked once, with their count and size), else whole
    with the others: the same gradient as one thread per segment either way, the loss to
    rounding."""
    probas = torch.randn(1, 7, 30, 40, generator=gen).softmax(dim=1)
    labels = torch.randint(0, 7, (1, 30, 40), generator=gen)

    def run():
        scores = probas.clone().requires_grad_()
        loss = lovasz_softmax(scores, labels, backend="numba")
        loss.backward()
        return loss.detach(), scores.grad

    monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_PIXELS", 1 << 40)
    whole_loss, whole_grad = run()
    monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_PIXELS", 1)
    asked = []
    monkeypatch.setattr(numba_cpu, "_split_pays", lambda *args: asked.append(args) or splits)
    monkeypatch.setattr(core, "thread_count", lambda: threads)
    blocked = []
    original = numba_cpu._segment_blocked

    def spy(batch, s, *args):
        blocked.append(s)
        return original(batch, s, *args)

    monkeypatch.setattr(numba_cpu, "_segment_blocked", spy)
    split_loss, split_grad = run()
    assert asked == [(7 % threads, 30 * 40, threads)]
    assert blocked == (list(range(7 - 7 % threads, 7)) if splits else [])
    assert torch.equal(split_grad, whole_grad)
    torch.testing.assert_close(split_loss, whole_loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("splits", [True, False], ids=["split", "whole"])
def test_fewer_segments_than_threads_split_where_the_rule_says(monkeypatch, gen, splits):
    """Fewer segments than threads: each is split across the threads when the rule says so,
    else they run whole, one per thread; the same gradient either way."""
    errors = tie_free_errors((2, 5000), torch.float32, gen)
    fg = torch.rand(errors.shape, generator=gen) < 0.3
    monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_PIXELS", 1 << 40)
    whole_loss, whole_grad = numba_cpu.lovasz_extension(errors, fg)
    monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_PIXELS", 1)
    asked = []
    monkeypatch.setattr(numba_cpu, "_split_pays", lambda *args: asked.append(args) or splits)
    monkeypatch.setattr(core, "thread_count", lambda: 4)
    blocked = []
    original = numba_cpu._segment_blocked
    monkeypatch.setattr(numba_cpu, "_segment_blocked",
                        lambda batch, s, *args: blocked.append(s) or original(batch, s, *args))
    loss, grad = numba_cpu.lovasz_extension(errors, fg)
    assert asked == [(2, 5000, 4)]
    assert blocked == ([0, 1] if splits else [])
    assert torch.equal(grad, whole_grad)
    torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=0)


# one segment of 2^18 and of 2^20 pixels, as a machine might measure them
COSTS = numba_cpu.SplitCosts(whole_ms=(2.0, 8.0), split_ms=(1.5, 5.0))
MANY_CORES = numba_cpu.SplitCosts(whole_ms=(2.0, 8.0), split_ms=(0.5, 2.0))


@pytest.mark.parametrize(("count", "pixels", "costs", "expected"), [
    (1, 1 << 18, COSTS, True),  # 1.5 x 1.25 < 2.0
    (2, 1 << 18, COSTS, False),  # two splits one after the other: 3.75 > 2.0
    (1, 1 << 20, COSTS, True),
    (1, 1 << 19, COSTS, True),  # interpolated: 2.67 x 1.25 < 4.0
    (2, 1 << 19, COSTS, False),  # 6.7 > 4.0
    (1, 1 << 22, COSTS, True),  # extrapolated: 19 x 1.25 < 32
    (1, 1 << 18, numba_cpu.SplitCosts((2.0, 8.0), (1.7, 7.0)), False),  # faster, not by 1.25x
    (3, 1 << 20, MANY_CORES, True),
    (5, 1 << 20, MANY_CORES, False),
    (1, numba_cpu.SPLIT_MIN_PIXELS - 1, numba_cpu.SplitCosts((2.0, 8.0), (0.0, 0.0)), False),
    (0, 1 << 20, COSTS, False),
])
def test_split_rule_follows_the_measured_costs(monkeypatch, count, pixels, costs, expected):
    """Split when ``count`` splits one after another, by the costs measured with this many
    threads (interpolated in the pixels) and the margin, beat one segment's whole time;
    never below SPLIT_MIN_PIXELS (where nothing is measured)."""
    asked = []
    monkeypatch.setattr(numba_cpu, "split_costs", lambda threads: asked.append(threads) or costs)
    assert numba_cpu._split_pays(count, pixels, 4) is expected
    assert asked == ([] if pixels < numba_cpu.SPLIT_MIN_PIXELS or count < 1 else [4])


@pytest.fixture
def split_file(monkeypatch, tmp_path):
    """The measured split costs kept under tmp_path, their measurement counted."""
    path = tmp_path / "cache" / "numba-split-choice.json"
    monkeypatch.setattr(numba_cpu, "split_choice_path", lambda: str(path))
    measured = []
    monkeypatch.setattr(numba_cpu, "measure_split_costs",
                        lambda threads: measured.append(threads) or COSTS)
    numba_cpu.forget_split_costs()
    yield path, measured
    numba_cpu.forget_split_costs()


def test_split_costs_are_measured_once_and_kept_per_thread_count(split_file, monkeypatch):
    path, measured = split_file
    monkeypatch.setattr(core, "thread_count", lambda: 3)
    assert "split across threads: measured on first use" in numba_cpu.details()
    assert numba_cpu.split_costs(2) == COSTS and measured == [2]
    saved = json.loads(path.read_text())
    assert saved[numba_cpu._split_key(2)] == {"whole_ms": [2.0, 8.0], "split_ms": [1.5, 5.0]}
    assert numba_cpu.split_costs(2) == COSTS and measured == [2]  # this process: kept
    numba_cpu.forget_split_costs()
    assert numba_cpu.split_costs(2) == COSTS and measured == [2]  # another process: read back
    assert numba_cpu.split_costs(3) == COSTS and measured == [2, 3]  # another thread count
    numba_cpu.forget_split_costs()
    assert "whole 2.0 / 8.0 ms, split 1.5 / 5.0 ms" in numba_cpu.details()  # from the file


@pytest.mark.parametrize("content", ["not json", "[]", '{"key": 1}', "{}"])
def test_unusable_split_file_means_measuring_again(split_file, content):
    path, measured = split_file
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert numba_cpu.split_costs(2) == COSTS and measured == [2]
    other = numba_cpu._split_key(5)
    path.write_text(json.dumps({other: {"whole_ms": [1.0], "split_ms": [1.0, 2.0]}}))
    numba_cpu.forget_split_costs()
    assert numba_cpu.split_costs(5) == COSTS and measured == [2, 5]  # one time only: foreign


def test_measurement_times_both_paths(monkeypatch):
    """The measurement runs a segment of each size whole and split (the gradient it writes
    is the reference's), and gives two positive times each."""
    monkeypatch.setattr(numba_cpu, "SPLIT_MEASURED_PIXELS", (3000, 7000))
    monkeypatch.setattr(numba_cpu, "SPLIT_MEASURE_ROUNDS", 2)
    calls = {"whole": 0, "split": 0}
    whole, split = numba_cpu._segments_task, numba_cpu._segment_blocked

    def count(name, function):
        def counted(*args):
            calls[name] += 1
            return function(*args)
        return counted

    monkeypatch.setattr(numba_cpu, "_segments_task", count("whole", whole))
    monkeypatch.setattr(numba_cpu, "_segment_blocked", count("split", split))
    costs = numba_cpu.measure_split_costs(3)
    assert calls == {"whole": 6, "split": 6}  # 2 sizes x (1 untimed + 2 timed rounds)
    assert len(costs.whole_ms) == len(costs.split_ms) == 2
    assert all(value > 0 for value in costs.whole_ms + costs.split_ms)


@pytest.mark.parametrize("blocked", [False, True], ids=["serial", "blocked"])
def test_packing_skips_unsorted_pixels_wherever_they_are(monkeypatch, gen, blocked):
    """Packing writes every pixel's key and keeps only the sorted ones (error > 0, not
    ignored): unsorted pixels here and there (at a block's first and last pixel too), a long
    run of padding, and none at all match the reference, serial and split across threads."""
    chunk = 2048
    num_pixels = 6 * chunk + 123
    errors = torch.rand(3, num_pixels, generator=gen, dtype=torch.float64) + 0.01
    fg = torch.rand(3, num_pixels, generator=gen) < 0.3
    errors[0, [5, chunk - 1, chunk, 4 * chunk + 7]] = 0.0  # row 0: a few unsorted pixels
    errors[1, 2 * chunk:3 * chunk] = -torch.inf  # row 1: a long run of padding
    # row 2: every pixel sorted
    if blocked:
        monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_PIXELS", 1)
        monkeypatch.setattr(numba_cpu, "_split_pays", lambda *args: True)
        monkeypatch.setattr(core, "thread_count", lambda: 4)
    for dtype in (torch.float32, torch.float64):
        for row in range(3):  # one segment at a time: rows < threads takes the blocked path
            loss, grad = numba_cpu.lovasz_extension(errors[row:row + 1].to(dtype), fg[row:row + 1])
            ref_loss, ref_grad = get_backend("numpy").run(errors[row:row + 1].to(dtype),
                                                          fg[row:row + 1])
            assert_close_report(loss, ref_loss, LOSS_TOLERANCE[dtype], f"row {row} loss")
            assert_close_report(grad, ref_grad, GRAD_TOLERANCE[dtype], f"row {row} grad")


def test_packing_batch_segments_with_ignored_pixels(monkeypatch, gen):
    """Batch segments (one row per image) of thousands of pixels, ignored pixels in a few
    places: the fused softmax path matches the generic one."""
    chunk = 2048
    probas = torch.randn(3, 4, 1, 2 * chunk + 50, generator=gen, dtype=torch.float64)
    probas = probas.softmax(dim=1)
    labels = torch.randint(0, 4, (3, 1, 2 * chunk + 50), generator=gen)
    labels[1, 0, chunk + 3] = 255
    labels[2, 0, :10] = 255
    fused, generic = _fused_and_generic(
        monkeypatch, lovasz_softmax, probas, labels, ignore_index=255
    )
    _assert_same(fused, generic, torch.float64, "batch segments")


# --------------------------------------------------------------------------------------------
# a strict budget: segments sorted a range of keys at a time


@pytest.mark.parametrize("dtype", _FLOAT_DTYPES)
@pytest.mark.parametrize("capacity, blocks", [(1, 1), (5, 1), (64, 1), (700, 1), (5, 2),
                                              (700, 3)])
def test_segment_by_ranges_matches_the_whole_segment_bit_for_bit(dtype, capacity, blocks):
    """Ranges of at most ``capacity`` keys (digits refined where one holds more; in float64
    runs of keys with one 32-bit prefix kept whole, however many), each packed in ``blocks``
    blocks of pixels on the worker threads, give the loss and gradient of the segment sorted
    whole, bit for bit: ties, special values, -0.0, padding."""
    rng = np.random.default_rng(7)
    methods = numba_cpu._SortMethods(core.SORT_LSD, core.SORT_LSD)
    for row in _float_rows(dtype, rng):
        errors = row.reshape(1, -1).copy()
        fg = rng.random(errors.shape) < 0.3
        whole_grad = np.full(errors.shape, np.nan, dtype=dtype)
        whole_batch = numba_cpu._extension_batch(errors, fg, whole_grad)
        keys, buffer = (np.empty(errors.size, dtype=np.uint64) for _ in range(2))
        whole = numba_cpu._segment_serial(whole_batch, 0, keys, buffer, core.RADIX_MIN_KEYS,
                                          core.SORT_LSD)
        grad = np.full(errors.shape, np.nan, dtype=dtype)
        batch = numba_cpu._extension_batch(errors, fg, grad)
        keys, buffer = (np.empty(capacity + blocks, dtype=np.uint64) for _ in range(2))
        counts = np.empty((blocks, 1 << numba_cpu._RANGE_DIGIT_BITS), dtype=np.int64)
        by_ranges = numba_cpu._segment_by_ranges(batch, 0, keys, buffer, counts,
                                                 core.RADIX_MIN_KEYS, methods)
        assert by_ranges == whole
        np.testing.assert_array_equal(grad, whole_grad)


def test_key_ranges_hold_at_most_their_capacity_and_cover_every_key():
    """Concentrated errors (every one in one top digit) are counted again by finer digits:
    ranges of at most the capacity, ascending, together every sorted pixel."""
    rng = np.random.default_rng(3)
    errors = (0.5 + rng.random((1, 20000)) * 2.0**-10).astype(np.float32)
    errors[0, ::7] = -1.0  # not sorted
    fg = rng.random(errors.shape) < 0.5
    batch = numba_cpu._extension_batch(errors, fg, np.empty_like(errors))
    counts = np.empty((2, 1 << numba_cpu._RANGE_DIGIT_BITS), dtype=np.int64)
    ranges, n_fg = numba_cpu._key_ranges(batch, 0, 1000, counts)
    assert n_fg == fg.sum()
    totals = [int(block_counts.sum()) for _, _, block_counts in ranges]
    assert len(ranges) >= (errors > 0).sum() // 1000
    assert all(total <= 1000 for total in totals)
    assert sum(totals) == (errors > 0).sum()
    # the blocks' counts: of the first and of the second half of the pixels
    halves = [(errors[0, :10000] > 0).sum(), (errors[0, 10000:] > 0).sum()]
    assert [sum(int(c[b]) for _, _, c in ranges) for b in range(2)] == halves
    assert all(hi <= next_lo for (_, hi, _), (next_lo, _, _) in zip(ranges, ranges[1:]))


def _strict_and_default(call):
    from lovasz_kernels._plan import chunk_floor_set

    default = call()
    with chunk_floor_set("cpu", 0):
        strict = call()
    return default, strict


@pytest.mark.parametrize("case", ["softmax batch", "softmax batch float16",
                                  "softmax per image", "hinge", "extension"])
def test_a_strict_budget_gives_the_default_answer_bit_for_bit(case, gen, monkeypatch):
    """With the CPU floor at 0 numba sorts segments a range of keys at a time (over threads,
    batch segments across images, ignored pixels, an image with none valid, 16-bit scores
    widened by the call): the same loss and gradient as by default, bit for bit."""
    ranged = []
    real = numba_cpu._segment_by_ranges
    monkeypatch.setattr(numba_cpu, "_segment_by_ranges",
                        lambda *args: ranged.append(args[1]) or real(*args))
    side = 160
    if case == "extension":
        errors = torch.randn(3, side * side, generator=gen)
        fg = torch.rand(errors.shape, generator=gen) < 0.4

        def call():
            return tuple(t.clone() for t in lovasz_extension(errors, fg, backend="numba"))
    else:
        # a segment's keys must not fit: few classes and images per pixel of a segment
        classes = {"hinge": 1, "softmax per image": 2}.get(case, 3)
        images = 2 if case == "softmax per image" else 3
        shape = (images, side, side) if classes == 1 else (images, classes, side, side)
        scores = torch.randn(shape, generator=gen)
        if classes > 1:
            scores = scores.softmax(dim=1)
        if case.endswith("float16"):
            scores = scores.half()
        labels = torch.randint(0, max(classes, 2), (images, side, side), generator=gen)
        labels[0, :10] = 255
        labels[-1] = 255  # no valid pixel

        def call():
            leaf = scores.clone().requires_grad_()
            if classes == 1:
                loss = lovasz_hinge(leaf, labels, ignore_index=255, backend="numba")
            else:
                loss = lovasz_softmax(leaf, labels, per_image=case == "softmax per image",
                                      ignore_index=255, backend="numba")
            loss.backward()
            return loss.detach(), leaf.grad

    (default_loss, default_grad), (strict_loss, strict_grad) = _strict_and_default(call)
    assert ranged, "the strict call sorted no segment by ranges"
    assert torch.equal(strict_loss, default_loss)
    assert torch.equal(strict_grad, default_grad)


def test_a_strict_budget_bounds_numbas_memory():
    """numpy's allocations in a loss call (the gradient, numba's keys and buffers, from any
    thread; traced by tracemalloc) stay within twice the input with the CPU floor at 0, where
    by default one 512² hinge image's keys alone are 4x it."""
    from lovasz_kernels.bench.measure import NumpyAllocationPeakMeter

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 512, 512, generator=gen)
    labels = torch.randint(0, 2, (1, 512, 512), generator=gen)
    input_bytes = logits.numel() * logits.element_size()

    def traced_peak():
        lovasz_hinge(logits, labels, backend="numba")  # compiled, scratch made (and released)
        return NumpyAllocationPeakMeter().extra_peak_bytes(
            lambda: lovasz_hinge(logits, labels, backend="numba"))

    default, strict = _strict_and_default(traced_peak)
    assert default > 3 * input_bytes
    assert strict <= 2 * input_bytes
