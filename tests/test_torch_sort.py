"""The torch backend's CPU sort (lovasz_kernels._torch_sort): which rows get the radix sort or
numpy's sort of packed keys, the per-machine measurement behind it, and the same answer from
every sort."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from lovasz_kernels import _plan, _torch_sort, get_backend
from lovasz_kernels.backends import torch_eager
from tests.helpers import (
    GRAD_TOLERANCE,
    LOSS_TOLERANCE,
    assert_close_report,
    distinct_float32,
    measured_choice_file,
    tie_free_errors,
)
from tests.test_extension import _reference

COMPARED, RADIX, PACKED = _torch_sort.COMPARED, _torch_sort.RADIX, _torch_sort.PACKED
SPREAD = _torch_sort.SPREAD_PACKED
# speedups at MEASURED_FRACTIONS of the grain, as a machine might measure them: padding that
# pays from a quarter of a grain on, packed keys that never pay
SPEEDUPS = {RADIX: (0.5, 0.8, 1.0, 1.5, 2.0, 3.0), PACKED: (1.0,) * 6, SPREAD: (0.5,) * 6}


@pytest.fixture
def machine(monkeypatch):
    """Stand-ins for the machine: its thread count and measured speedups (settable), and a
    record of the thread counts asked for."""
    state = {"threads": 2, "speedups": SPEEDUPS, "asked": []}
    monkeypatch.setattr(_torch_sort.torch, "get_num_threads", lambda: state["threads"])

    def speedups(threads):
        state["asked"].append(threads)
        return state["speedups"]

    monkeypatch.setattr(_torch_sort, "short_row_speedups", speedups)
    return state


def _record_sorts(monkeypatch) -> list[tuple[int, bool]]:
    """A list that each ``torch.sort`` appends its (dims, descending) to."""
    sorts = []
    real_sort = torch.sort

    def counting_sort(values, *args, **kwargs):
        sorts.append((values.dim(), kwargs.get("descending", False)))
        return real_sort(values, *args, **kwargs)

    monkeypatch.setattr(_torch_sort.torch, "sort", counting_sort)
    return sorts


def test_rows_padded_where_the_2d_sort_runs_them_one_by_one_and_it_was_measured_faster(
        machine, monkeypatch):
    monkeypatch.setattr(_torch_sort, "RADIX_SORT_MIN_PIXELS", 1024)  # fractions: 32 ... 768
    method = _torch_sort.sort_method
    assert method(torch.empty(1, 1024)) == method(torch.empty(30, 5000)) == RADIX  # a grain
    assert not machine["asked"]  # ... without a measurement
    assert method(torch.empty(1, 255)) == COMPARED  # under a quarter: never padded
    assert method(torch.empty(1, 300, device="meta")) == COMPARED  # the CPU only
    assert method(torch.empty(1, 256)) == COMPARED  # speedup 1.0
    assert method(torch.empty(1, 270)) == COMPARED  # 1.0 + 0.5 * 14 / 128 = 1.05: < margin
    assert method(torch.empty(1, 300)) == RADIX  # 1.17
    assert method(torch.empty(3, 300)) == RADIX  # 900 values: one task of the 2-D sort
    assert method(torch.empty(4, 300)) == COMPARED  # two tasks, on two threads at once
    assert method(torch.empty(5, 512)) == COMPARED  # (packing them was measured slower)
    machine["threads"] = 1
    assert method(torch.empty(5, 512)) == RADIX  # one thread: the rows one after the other
    machine["threads"] = 16
    assert method(torch.empty(1, 1000)) == RADIX  # past the last fraction: its speedup, 3.0
    assert _torch_sort.sort_speedup(RADIX, 640, 16) == pytest.approx(2.5)
    assert set(machine["asked"]) == {1, 2, 16}  # per thread count
    machine["speedups"] = {**SPEEDUPS, RADIX: (0.5, 0.5, 0.5, 0.7, 0.9, 1.05)}  # never pays
    assert method(torch.empty(1, 1000)) == COMPARED
    assert method(torch.empty(1, 1024)) == RADIX


def test_packed_keys_where_they_were_measured_fastest(machine, monkeypatch):
    """Packed keys compete with the comparison sort at any length under a grain and with
    padding from a quarter of one; the fastest measured wins, by the same margin."""
    monkeypatch.setattr(_torch_sort, "RADIX_SORT_MIN_PIXELS", 1024)
    machine["speedups"] = {**SPEEDUPS, PACKED: (1.0, 2.0, 1.0, 1.0, 1.0, 4.0)}
    method = _torch_sort.sort_method
    assert method(torch.empty(1, 16)) == COMPARED  # before the first fraction: its 1.0
    assert method(torch.empty(1, 40)) == COMPARED  # 1.0 + 8 / 96 = 1.08: under the margin
    assert method(torch.empty(1, 64)) == PACKED  # 1.33
    assert method(torch.empty(1, 128)) == PACKED
    assert method(torch.empty(2, 128)) == PACKED  # within one grain
    assert method(torch.empty(9, 128)) == COMPARED  # two tasks, on two threads at once
    assert method(torch.empty(1, 512)) == RADIX  # padded 2.0, packed 1.0
    assert method(torch.empty(1, 700)) == PACKED  # padded 2.73, packed 3.20
    assert _torch_sort.sort_speedup(PACKED, 700, 2) == pytest.approx(1 + 3 * 188 / 256)
    machine["threads"] = 1
    assert method(torch.empty(9, 128)) == PACKED
    assert method(torch.empty(1, 128, dtype=torch.float64)) == COMPARED  # no room for an index


def test_rows_spread_over_threads_packed_where_that_was_measured_faster(machine, monkeypatch):
    """Rows the 2-D sort spreads over threads: never padded, packed where numpy's sort on one
    thread was measured faster than the 2-D sort on all of them."""
    monkeypatch.setattr(_torch_sort, "RADIX_SORT_MIN_PIXELS", 1024)
    method = _torch_sort.sort_method
    machine["speedups"] = {RADIX: (9.0,) * 6, PACKED: (9.0,) * 6,
                           SPREAD: (0.5, 2.0, 1.0, 1.0, 1.0, 1.0)}
    assert method(torch.empty(9, 128)) == PACKED  # 2.0
    assert method(torch.empty(40, 32)) == COMPARED  # 0.5
    assert method(torch.empty(40, 64)) == COMPARED  # 0.5 + 1.5 * 32 / 96 = 1.0: under
    assert method(torch.empty(40, 100)) == PACKED  # 1.56
    assert method(torch.empty(3, 700)) == COMPARED  # padding would pay alone, not spread
    machine["speedups"] = {**machine["speedups"], SPREAD: (4.0,) * 6}
    assert method(torch.empty(3, 700)) == PACKED
    assert method(torch.empty(3, 700, dtype=torch.float64)) == COMPARED
    with _torch_sort.method_forced(RADIX):
        assert method(torch.empty(3, 700)) == COMPARED


def test_a_floor_set_never_packs(machine, monkeypatch):
    """Under a floor set only torch's own sorts run: numpy's packed copy is outside the
    budget (and torch's allocation count). Where packing was measured fastest, alone or
    spread, the padded radix sort or the comparison sort runs instead."""
    monkeypatch.setattr(_torch_sort, "RADIX_SORT_MIN_PIXELS", 1024)
    machine["speedups"] = {RADIX: (2.0,) * 6, PACKED: (9.0,) * 6, SPREAD: (9.0,) * 6}
    method = _torch_sort.sort_method
    assert [method(torch.empty(1, 700)), method(torch.empty(9, 128))] == [PACKED, PACKED]
    monkeypatch.setattr(_plan, "_FLOORS_SET", {"cpu": 0})
    assert method(torch.empty(1, 700)) == RADIX  # padded: 2.0
    assert method(torch.empty(1, 128)) == COMPARED  # under a quarter grain: never padded
    assert method(torch.empty(9, 128)) == COMPARED  # spread over the threads


def test_a_forced_method_applies_only_where_there_is_a_choice(machine, monkeypatch):
    """The measurement's override, this thread only: any length under a grain (rows the 2-D
    sort spreads over threads never padded), never a grain or more, or int64 keys."""
    monkeypatch.setattr(_torch_sort, "RADIX_SORT_MIN_PIXELS", 1024)
    method = _torch_sort.sort_method
    with _torch_sort.method_forced(PACKED):
        assert method(torch.empty(1, 16)) == PACKED and method(torch.empty(1, 300)) == PACKED
        assert method(torch.empty(4, 300)) == PACKED and method(torch.empty(1, 1024)) == RADIX
        assert method(torch.empty(1, 300, dtype=torch.float64)) == COMPARED
        with _torch_sort.method_forced(RADIX):
            assert method(torch.empty(1, 16)) == RADIX
        with _torch_sort.method_forced(COMPARED):
            assert method(torch.empty(1, 1000)) == COMPARED
        assert method(torch.empty(1, 300)) == PACKED
    assert not machine["asked"]  # forced: nothing measured
    assert method(torch.empty(1, 300)) == RADIX  # as measured (SPEEDUPS)


def test_float64_keys_padded_from_half_a_grain_within_one(machine, monkeypatch):
    monkeypatch.setattr(_torch_sort, "RADIX_SORT_MIN_PIXELS", 1024)
    method = _torch_sort.sort_method
    assert method(torch.empty(1, 511, dtype=torch.float64)) == COMPARED
    assert method(torch.empty(2, 512, dtype=torch.float64)) == RADIX
    assert method(torch.empty(3, 512, dtype=torch.float64)) == COMPARED
    assert method(torch.empty(3, 1024, dtype=torch.float64)) == RADIX
    assert not machine["asked"]  # a fixed rule: nothing measured


def test_deterministic_algorithms_never_pad_or_pack(machine, monkeypatch):
    """Under ``torch.use_deterministic_algorithms`` nothing is measured: rows under a grain
    get the comparison sort on every machine, longer ones the (stable) radix sort."""
    monkeypatch.setattr(_torch_sort, "RADIX_SORT_MIN_PIXELS", 1024)
    monkeypatch.setattr(_torch_sort.torch, "are_deterministic_algorithms_enabled", lambda: True)
    machine["speedups"] = {RADIX: (4.0,) * 6, PACKED: (4.0,) * 6, SPREAD: (4.0,) * 6}
    assert _torch_sort.sort_method(torch.empty(1, 1000)) == COMPARED
    assert _torch_sort.sort_method(torch.empty(9, 1000)) == COMPARED
    assert _torch_sort.sort_method(torch.empty(1, 64)) == COMPARED
    assert _torch_sort.sort_method(torch.empty(2, 1024)) == RADIX
    assert not machine["asked"]


def _sorted_by(method: str, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keys_sorted, order = torch.empty_like(keys), torch.empty(keys.shape, dtype=torch.int64)
    _torch_sort.sort_descending(keys.clone(), keys_sorted, order, method)
    return keys_sorted, order


@pytest.mark.parametrize("num_pixels", [1, 2, 1000, 5000])
@pytest.mark.parametrize("group_keys", [1 << 16, 2000], ids=["one group", "groups of rows"])
def test_packed_keys_sort_like_the_radix_sort_ties_and_extremes_included(
        gen, monkeypatch, num_pixels, group_keys):
    """Every int32 key (the extremes, zero, negatives, many ties), rows packed all at once or
    in groups: the packed sort gives the radix sort's keys and order bit for bit (ties by
    position), and the comparison sort's keys."""
    monkeypatch.setattr(_torch_sort, "PACKED_GROUP_KEYS", group_keys)
    keys = torch.randint(-50, 50, (3, num_pixels), generator=gen, dtype=torch.int32)
    keys[0] = torch.randint(-2**31, 2**31 - 1, (num_pixels,), generator=gen, dtype=torch.int32)
    extremes = torch.tensor([-2**31, 2**31 - 1, 0, -1, 1], dtype=torch.int32)
    keys[1, :min(5, num_pixels)] = extremes[:num_pixels]
    packed = _sorted_by(PACKED, keys)
    radix = _sorted_by(RADIX, keys)
    assert torch.equal(packed[0], radix[0]) and torch.equal(packed[1], radix[1])
    assert torch.equal(packed[0], _sorted_by(COMPARED, keys)[0])
    assert torch.equal(packed[0], torch.gather(keys, 1, packed[1]))
    stable = torch.sort(-keys.long(), dim=1, stable=True).indices
    assert torch.equal(packed[1], stable)


@pytest.mark.parametrize("num_pixels", [1, 2, 1000, 40000])
def test_picked_keys_sort_in_their_positions_like_the_radix_sort(gen, num_pixels):
    """Keys picked at ascending positions of a row (every int32 key: extremes, zero,
    negatives, ties) come back in the radix sort's order, ties by position, with the
    positions themselves left in that order."""
    keys = torch.randint(-50, 50, (3 * num_pixels,), generator=gen, dtype=torch.int32)
    keys[:num_pixels] = torch.randint(-2**31, 2**31 - 1, (num_pixels,), generator=gen,
                                      dtype=torch.int32)
    keys[:5] = torch.tensor([-2**31, 2**31 - 1, 0, -1, 1], dtype=torch.int32)[:keys.numel()]
    positions = torch.randperm(keys.numel(), generator=gen)[:num_pixels].sort().values
    picked = torch.index_select(keys, 0, positions)
    radix_keys, radix_order = _sorted_by(RADIX, picked.unsqueeze(0))
    sorted_positions = positions.clone()
    sorted_keys = _torch_sort.sort_picked_descending(keys, sorted_positions)
    assert torch.equal(sorted_keys, radix_keys[0])
    assert torch.equal(sorted_positions, positions[radix_order[0]])


def test_every_sort_gives_the_same_extension(gen, monkeypatch, machine):
    """Rows that may be padded or packed: the losses and gradients of each forced sort are
    the comparison sort's bit for bit, with -0.0 errors, -inf padding and zeros sorted
    last, and the input untouched; float64 never packs."""
    monkeypatch.setattr(_torch_sort, "RADIX_SORT_MIN_PIXELS", 1024)
    backend = get_backend("torch")
    for dtype in (torch.float32, torch.float64):
        errors = tie_free_errors((2, 400), dtype, gen)
        errors[0, :20] = -0.0
        errors[1, -30:] = -torch.inf
        errors[1, ::9] = 0.0
        fg = torch.rand(errors.shape, generator=gen) < 0.3
        kept = errors.clone()
        results = {}
        for method in (COMPARED, RADIX, PACKED):
            with _torch_sort.method_forced(method):
                results[method] = backend.run(errors, fg)
        assert torch.equal(errors, kept)
        for method in (RADIX, PACKED):
            assert torch.equal(results[method][0], results[COMPARED][0]), (dtype, method)
            assert torch.equal(results[method][1], results[COMPARED][1]), (dtype, method)


def test_short_packed_rows_go_on_in_numpy_with_the_torch_ops_bits(gen, monkeypatch):
    """Float32 rows sorted as packed keys, at most ``NUMPY_MAX_PIXELS`` in a chunk: the
    extension goes on in numpy from the sort, with the torch ops' loss and gradient bit for
    bit: ties, -0.0, -inf padding, a row with no foreground (the first increment's 0/0), one
    positive error, none, rows of one pixel. Over the cap, or in float64, torch ops run (and
    under a floor set nothing packs: :func:`test_a_floor_set_never_packs`)."""
    ran_in_numpy = []
    real = torch_eager._extension_in_numpy

    def recording(fg, grad):
        ran_in_numpy.append(tuple(grad.shape))
        return real(fg, grad)

    monkeypatch.setattr(torch_eager, "_extension_in_numpy", recording)
    errors = torch.randn(5, 300, generator=gen).round(decimals=1)  # ties
    errors[0, :20] = -0.0
    errors[1, -30:] = -torch.inf
    errors[3] = -errors[3].abs()
    errors[3, 7] = 0.5  # one positive error
    errors[4] = -errors[4].abs() - 0.1  # none
    fg = torch.rand(errors.shape, generator=gen) < 0.3
    fg[2] = False  # no foreground
    fg[1, -30:] = False
    backend = get_backend("torch")
    for rows in (errors, errors[:, :1], errors.double()):
        with _torch_sort.method_forced(PACKED):
            in_numpy = backend.run(rows, fg[:, :rows.shape[1]])
            with monkeypatch.context() as patched:
                patched.setattr(torch_eager, "NUMPY_MAX_PIXELS", 0)
                with_torch_ops = backend.run(rows, fg[:, :rows.shape[1]])
        assert torch.equal(in_numpy[0], with_torch_ops[0]), rows.shape
        assert torch.equal(in_numpy[1], with_torch_ops[1]), rows.shape
        ref_loss, ref_grad = _reference(rows, fg[:, :rows.shape[1]])
        assert_close_report(in_numpy[0], ref_loss, LOSS_TOLERANCE[rows.dtype], "loss")
    assert ran_in_numpy == [(5, 300), (5, 1)]  # float64 never packs


def _small_call_cases(gen):
    """Loss calls of every plan layout, each a function of its scores: the softmax per image
    and over the batch with every class selection, class weights and an ignore label (two
    images of three partly or wholly ignored), the hinge, the multilabel sigmoid, a 16-bit
    input, one pixel, ``reduction="none"``; rounded scores for ties and zero errors."""
    from lovasz_kernels import lovasz_hinge, lovasz_sigmoid, lovasz_softmax

    def torch_backend(loss):
        return functools.partial(loss, backend="torch")

    lovasz_hinge, lovasz_sigmoid, lovasz_softmax = (
        torch_backend(lovasz_hinge), torch_backend(lovasz_sigmoid), torch_backend(lovasz_softmax))
    labels = torch.randint(0, 4, (3, 5, 6), generator=gen)
    ignored = labels.clone()
    ignored[0, :2] = 255
    ignored[2] = 255
    masks = torch.randint(0, 2, (3, 5, 6), generator=gen)
    masks_ignored = torch.where(ignored == 255, 255, masks)
    channel_masks = torch.randint(0, 2, (3, 4, 5, 6), generator=gen)
    channel_masks[1, 2] = 255
    cases = {}
    for per_image in (True, False):
        for classes in ("present", "all", [1, 3]):
            for weights in (None, [0.5, 1.0, 2.0, 0.0]):
                cases[f"softmax {per_image} {classes} {weights}"] = (
                    (3, 4, 5, 6), lambda p, per_image=per_image, classes=classes, weights=weights:
                    lovasz_softmax(p.softmax(1), labels, classes=classes, per_image=per_image,
                                   class_weights=weights))
            cases[f"softmax ignored {per_image} {classes}"] = (
                (3, 4, 5, 6), lambda p, per_image=per_image, classes=classes: lovasz_softmax(
                    p.softmax(1), ignored, classes=classes, per_image=per_image,
                    ignore_index=255))
        cases[f"hinge {per_image}"] = ((3, 5, 6), lambda x, per_image=per_image: lovasz_hinge(
            x, masks, per_image=per_image))
        cases[f"hinge ignored {per_image}"] = (
            (3, 5, 6), lambda x, per_image=per_image: lovasz_hinge(
                x, masks_ignored, per_image=per_image, ignore_index=255))
        cases[f"sigmoid {per_image}"] = (
            (3, 4, 5, 6), lambda p, per_image=per_image: lovasz_sigmoid(
                p.sigmoid(), channel_masks, per_image=per_image, ignore_index=255))
    cases["softmax float16"] = ((3, 4, 5, 6), lambda p: lovasz_softmax(
        p.softmax(1).half(), labels))
    cases["hinge one pixel"] = ((1, 1, 1), lambda x: lovasz_hinge(x, masks[:1, :1, :1]))
    cases["softmax none"] = ((3, 4, 5, 6), lambda p: lovasz_softmax(
        p.softmax(1), labels, per_image=True, reduction="none").sum())
    return cases


def test_small_calls_run_in_numpy_with_the_generic_paths_bits(gen, monkeypatch):
    """A CPU call of at most ``SMALL_CALL_MAX_PIXELS`` (segment, pixel) pairs in float32 runs
    in numpy (the torch backend's ``lovasz_loss``), with the generic path's loss and
    gradient bit for bit (its rows sorted as packed keys too) in every plan layout."""
    ran_in_numpy = []
    real = torch_eager._loss_in_numpy

    def recording(scores, labels, plan):
        ran_in_numpy.append(tuple(scores.shape))
        return real(scores, labels, plan)

    monkeypatch.setattr(torch_eager, "_loss_in_numpy", recording)
    for name, (shape, loss_of) in _small_call_cases(gen).items():
        scores = torch.randn(shape, generator=gen).round(decimals=1).requires_grad_()
        results = []
        for cap in (torch_eager.SMALL_CALL_MAX_PIXELS, 0):
            ran_in_numpy.clear()
            with monkeypatch.context() as patched, _torch_sort.method_forced(PACKED):
                patched.setattr(torch_eager, "SMALL_CALL_MAX_PIXELS", cap)
                loss = loss_of(scores)
            assert len(ran_in_numpy) == (1 if cap else 0), name
            (grad,) = torch.autograd.grad(loss, scores)
            results.append((loss, grad))
        (small_loss, small_grad), (loss, grad) = results
        assert torch.equal(small_loss, loss), name
        assert torch.equal(small_grad, grad), name
        assert small_grad.abs().sum() > 0, name


def test_small_calls_elsewhere_take_the_generic_path(gen, monkeypatch):
    """Over the cap, in float64, under a floor set, under deterministic algorithms or with
    another sort forced, the torch backend's ``lovasz_loss`` declines (None) and the generic
    path runs the call."""
    from lovasz_kernels import lovasz_hinge, set_chunk_floor

    ran_in_numpy = []
    monkeypatch.setattr(torch_eager, "_loss_in_numpy",
                        lambda *args: ran_in_numpy.append(1))  # would break the call
    logits = torch.randn(2, 8, 8, generator=gen)
    masks = torch.randint(0, 2, (2, 8, 8), generator=gen)
    expected = lovasz_hinge(logits.double(), masks, backend="numpy")
    with monkeypatch.context() as patched:
        patched.setattr(torch_eager, "SMALL_CALL_MAX_PIXELS", 8 * 8 * 2 - 1)
        assert_close_report(lovasz_hinge(logits, masks, backend="torch"), expected,
                            LOSS_TOLERANCE[torch.float32], "over the cap")
    assert_close_report(lovasz_hinge(logits.double(), masks, backend="torch"), expected,
                        LOSS_TOLERANCE[torch.float64], "float64")
    with _torch_sort.method_forced(COMPARED):
        assert_close_report(lovasz_hinge(logits, masks, backend="torch"), expected,
                            LOSS_TOLERANCE[torch.float32], "comparison sort forced")
    set_chunk_floor("cpu", 0)
    try:
        assert_close_report(lovasz_hinge(logits, masks, backend="torch"), expected,
                            LOSS_TOLERANCE[torch.float32], "a floor set")
    finally:
        set_chunk_floor("cpu", None)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert_close_report(lovasz_hinge(logits, masks, backend="torch"), expected,
                            LOSS_TOLERANCE[torch.float32], "deterministic algorithms")
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert not ran_in_numpy


def test_packed_and_radix_sorts_give_tied_errors_the_same_gradients(gen):
    """Exactly tied errors: the packed and the radix sort order them alike (by position), so
    their gradients are equal bit for bit; the comparison sort's tie groups sum alike."""
    from lovasz_kernels._cases import tie_group_sums

    errors = torch.randint(0, 6, (2, 3000), generator=gen).float() / 4 - 0.5
    fg = torch.rand(errors.shape, generator=gen) < 0.4
    backend = get_backend("torch")
    results = {}
    for method in (COMPARED, RADIX, PACKED):
        with _torch_sort.method_forced(method):
            results[method] = backend.run(errors, fg)
    assert torch.equal(results[PACKED][1], results[RADIX][1])
    assert torch.equal(results[PACKED][0], results[RADIX][0])
    ref_loss, ref_grad = _reference(errors, fg)
    assert_close_report(results[PACKED][0], ref_loss, LOSS_TOLERANCE[torch.float32], "loss")
    for method in (PACKED, COMPARED):
        assert_close_report(tie_group_sums(errors, results[method][1]),
                            tie_group_sums(errors, ref_grad), GRAD_TOLERANCE[torch.float32],
                            f"{method} tie-group grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_radix_sorted_rows_give_the_comparison_sorts_answer(gen, monkeypatch, machine, dtype):
    """Rows sorted one by one, ascending on the complemented keys (PyTorch's radix sort on
    the CPU), shorter ones padded up to a grain: the comparison sort's losses and gradients
    bit for bit, with -0.0 errors, -inf padding and zeros sorted last."""
    errors = tie_free_errors((3, 300), dtype, gen)
    errors[0, :20] = -0.0
    errors[1, -30:] = -torch.inf
    errors[2, ::9] = 0.0
    fg = torch.rand(errors.shape, generator=gen) < 0.3
    backend = get_backend("torch")
    sorts = _record_sorts(monkeypatch)
    compared = backend.run(errors, fg)
    assert sorts == [(2, True)]  # rows under a quarter of a grain: one 2-D sort
    sorts.clear()
    monkeypatch.setattr(_torch_sort, "RADIX_SORT_MIN_PIXELS", 300)
    radix = backend.run(errors, fg)
    assert sorts == [(1, False)] * 3  # one ascending 1-D sort per row
    assert torch.equal(radix[0], compared[0]) and torch.equal(radix[1], compared[1])
    sorts.clear()
    monkeypatch.setattr(_torch_sort, "RADIX_SORT_MIN_PIXELS", 600)  # rows padded to 600
    machine["speedups"] = {RADIX: (4.0,) * 6, PACKED: (1.0,) * 6, SPREAD: (1.0,) * 6}
    # padded only where the rows fit in one grain of 600 values
    padded = backend.run(errors[:2], fg[:2])
    assert sorts == [(1, False)] * 2
    assert torch.equal(padded[0], compared[0][:2])
    assert torch.equal(padded[1], compared[1][:2])
    sorts.clear()
    backend.run(errors, fg)
    assert sorts == [(2, True)]
    machine["speedups"] = {RADIX: (1.0,) * 6, PACKED: (1.0,) * 6,  # measured slower here
                           SPREAD: (1.0,) * 6}
    sorts.clear()
    backend.run(errors[:2], fg[:2])  # compared (float64: a fixed rule)
    assert sorts == ([(1, False)] * 2 if dtype == torch.float64 else [(2, True)])
    assert torch.equal(errors.isneginf().sum(), torch.tensor(30))  # the input is untouched

    monkeypatch.undo()
    sorts = _record_sorts(monkeypatch)
    long_errors = distinct_float32(_torch_sort.RADIX_SORT_MIN_PIXELS, gen).to(dtype)
    long_fg = torch.rand(long_errors.shape, generator=gen) < 0.3
    loss, grad = backend.run(long_errors, long_fg)
    assert sorts == [(1, False)]  # the default minimum: PyTorch's grain size
    ref_loss, ref_grad = _reference(long_errors, long_fg)
    assert_close_report(loss, ref_loss, LOSS_TOLERANCE[dtype], "radix-sorted loss")
    assert_close_report(grad, ref_grad, GRAD_TOLERANCE[dtype], "radix-sorted grad")


# --------------------------------------------------------------------------------------------
# the speedups, measured once per machine and thread count


@pytest.fixture
def speedup_file(monkeypatch, tmp_path):
    """An empty place for the speedups and a fake measurement that counts its calls."""
    with measured_choice_file(monkeypatch, tmp_path, _torch_sort, "torch-sort-choice.json",
                              _torch_sort.forget_short_row_speedups,
                              "measure_short_row_speedups",
                              (SPEEDUPS, {"8192 radix": 0.3})) as (path, measured):
        yield path, measured


def test_speedups_are_measured_once_and_kept_per_machine_and_thread_count(speedup_file):
    path, measured = speedup_file
    assert _torch_sort.short_row_speedups(2) == SPEEDUPS and measured == [1]
    saved = json.loads(path.read_text())[_torch_sort._machine_key(2)]
    assert all(saved[name] == list(values) for name, values in SPEEDUPS.items())
    assert _torch_sort.short_row_speedups(2) == SPEEDUPS and measured == [1]  # kept
    assert _torch_sort.measured_short_row_speedups() == {2: SPEEDUPS}
    _torch_sort.forget_short_row_speedups()
    assert _torch_sort.short_row_speedups(2) == SPEEDUPS and measured == [1]  # read back
    assert _torch_sort.short_row_speedups(4) == SPEEDUPS and measured == [1, 1]  # new count
    assert len(json.loads(path.read_text())) == 2


@pytest.mark.parametrize("content", [
    "not json", "[]", '{"other machine": {"radix": [1, 1, 1, 1, 1, 1]}}', None, "wrong length",
    "negative", "no spread", "no packed"],
    ids=["garbage", "a list", "other machine", "a dir", "wrong length", "negative",
         "no spread", "the first version's entry"])
def test_unusable_speedup_file_means_measuring_again(speedup_file, content):
    """A corrupt file, another machine's entry, an entry that makes no sense or a path that
    cannot be written: measured again, nothing raised, the other machines' entries kept."""
    path, measured = speedup_file
    path.parent.mkdir(parents=True)
    key = _torch_sort._machine_key(2)
    entries = {"wrong length": {RADIX: [2.0] * 5, PACKED: [2.0] * 6, SPREAD: [2.0] * 6},
               "negative": {RADIX: [2.0] * 6, PACKED: [2.0, -1.0, 2.0, 2.0, 2.0, 2.0],
                            SPREAD: [2.0] * 6},
               "no spread": {RADIX: [2.0] * 6, PACKED: [2.0] * 6},
               "no packed": {"speedups": [2.0] * 4}}
    if content is None:
        path.mkdir()  # cannot be read or replaced
    elif content in entries:
        path.write_text(json.dumps({key: entries[content]}))
    else:
        path.write_text(content)
    assert _torch_sort.short_row_speedups(2) == SPEEDUPS and measured == [1]
    if content and content.startswith("{"):
        saved = json.loads(path.read_text())
        assert "other machine" in saved and key in saved


@pytest.mark.parametrize("threads", [1, 2])
def test_measurement_times_every_sort_and_leaves_the_callers_random_state(monkeypatch, threads):
    """The real measurement, shortened: a positive speedup per sort and measured size from
    whole extensions of one row with each sort (each as often), then, with more than one
    thread, sorts of rows spread over every thread (a grain per thread) packed and compared;
    the global random state as it was."""
    calls = []
    real = _torch_sort.sort_descending

    def counting(keys, keys_sorted, order, method=None):
        calls.append((tuple(keys.shape), method))
        return real(keys, keys_sorted, order, method)

    real_numpy = torch_eager._extension_in_numpy

    def counting_numpy(fg, grad):  # short rows sorted as packed keys, in numpy from there
        calls.append((tuple(grad.shape), PACKED))
        return real_numpy(fg, grad)

    monkeypatch.setattr(_torch_sort, "sort_descending", counting)
    monkeypatch.setattr(torch_eager, "sort_descending", counting)
    monkeypatch.setattr(torch_eager, "_extension_in_numpy", counting_numpy)
    monkeypatch.setattr(_torch_sort.torch, "get_num_threads", lambda: threads)
    state = torch.random.get_rng_state()
    speedups, times_ms = _torch_sort.measure_short_row_speedups(rounds=2, spread_rounds=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert set(speedups) == {RADIX, PACKED, SPREAD}
    for values in speedups.values():
        assert len(values) == len(_torch_sort.MEASURED_FRACTIONS)
        assert all(speedup > 0 for speedup in values)
    grain = _torch_sort.RADIX_SORT_MIN_PIXELS
    for fraction in _torch_sort.MEASURED_FRACTIONS:
        size = int(fraction * grain)
        # each sort against the comparison sort in rounds of its own, an untimed round and
        # two timed ones: the packed sort never follows the padded radix sort (whose
        # spinning threads it would pay for)
        methods = [method for shape, method in calls if shape == (1, size)]
        assert sorted(methods) == sorted([COMPARED] * 6 + [RADIX, PACKED] * 3)
        assert all((before, after) != (RADIX, PACKED)
                   for before, after in zip(methods, methods[1:]))
        assert all(times_ms[f"{size} {method}"] > 0 for method in (RADIX, PACKED))
        assert all(times_ms[f"{size} {COMPARED} beside {method}"] > 0
                   for method in (RADIX, PACKED))
        if threads == 1:
            assert all(shape[0] == 1 for shape, _ in calls) and speedups[SPREAD] == (1.0,) * 6
        else:
            spread_shape = (threads * grain // size, size)
            spread_methods = sorted(method for shape, method in calls if shape == spread_shape)
            assert spread_methods == sorted([COMPARED, PACKED] * 2)
            assert times_ms[f"{spread_shape[0]} x {size} {PACKED}"] > 0


def test_info_says_what_was_measured(speedup_file, monkeypatch):
    """``lovasz-kernels info``'s line for the torch backend: measured on first use, then the
    speedups measured (here: the fake's) for this thread count, also in a process that only
    reads them."""
    monkeypatch.setattr(_torch_sort.torch, "get_num_threads", lambda: 3)
    assert "measured on first use" in torch_eager.details()
    assert f"at most {torch_eager.SMALL_CALL_MAX_PIXELS} (segment, pixel) pairs in numpy" in (
        torch_eager.details())
    _torch_sort.short_row_speedups(3)
    measured = ("radix 0.5x, 0.8x, 1x, 1.5x, 2x, 3x; packed 1x, 1x, 1x, 1x, 1x, 1x; "
                "packed over threads 0.5x, 0.5x, 0.5x, 0.5x, 0.5x, 0.5x; 3 threads")
    assert measured in torch_eager.details()
    assert "at 1024, 4096, 8192, 12288, 16384, 24576 pixels" in torch_eager.details()
    _torch_sort.forget_short_row_speedups()  # another process: read from the file
    assert measured in torch_eager.details()


# --------------------------------------------------------------------------------------------
# rows with few positive errors: only those sorted (torch.topk)


def _few_positive_errors(shape, dtype, gen, share=0.01):
    """(S, P) errors, no two of the same magnitude, of which about ``share`` are positive,
    as a trained model's hinge has them."""
    rows, cols = shape
    magnitudes = distinct_float32(rows * cols, gen).reshape(rows, cols).to(dtype)
    positive = torch.rand(shape, generator=gen) < share
    return torch.where(positive, magnitudes, -magnitudes)


def test_few_positive_errors_take_the_top_k_and_many_do_not(gen):
    """The count is taken only for CPU rows of TOP_K_MIN_PIXELS or more whose first row's
    sample needs few keys, and the path only when every row needs few. Rows with an fg
    error <= 0 (a trained hinge's) need every positive error."""
    columns = torch_eager.TOP_K_MIN_PIXELS
    few = _few_positive_errors((3, columns), torch.float32, gen)
    fg = torch.rand(few.shape, generator=gen) < 0.4
    assert torch_eager._few_needed(few, fg) == int((few > 0).sum(dim=1).max())
    many = few.clone()
    many[2, : columns // 4] = 1.0  # one row with a quarter positive: every pixel is sorted
    assert torch_eager._few_needed(many, fg) is None
    assert torch_eager._few_needed(few.abs(), fg) is None  # the sample says: all needed
    assert torch_eager._few_needed(few[:, : columns // 2], fg[:, : columns // 2]) is None
    # none positive: one key each, a zero whose increment the sign clears (not an empty top k)
    assert torch_eager._few_needed(-few.abs(), fg) == 1


def _settled_rows(shape, dtype, gen):
    """(S, P) softmax-like errors whose fg errors (1/20 of the pixels) are above most
    background ones, and fg: row 0 as such, row 1 without fg and its largest error tied,
    row 2 with one fg error of 0, row 3 with background errors tied with its smallest fg
    error, row 4 with -inf padding."""
    rows, cols = shape
    fg = torch.rand(shape, generator=gen) < 1 / 20
    magnitudes = distinct_float32(rows * cols, gen).reshape(shape).to(dtype)
    errors = torch.where(fg, 0.5 + magnitudes / 2, magnitudes * 0.52)
    fg[1] = False
    errors[1, [3, 900, cols - 1]] = errors[1].max()
    errors[2, torch.nonzero(fg[2])[0, 0]] = 0.0
    tied = torch.nonzero(~fg[3])[:40, 0]
    errors[3, tied] = errors[3][fg[3]].min()
    errors[4, cols // 2:] = -torch.inf
    fg[4, cols // 2:] = False
    return errors, fg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_settled_tail_takes_the_top_k_with_the_references_answer(gen, dtype):
    """Rows whose background pixels past the last fg pixel need no order: each needs its
    keys down to its smallest fg error (its largest ones without fg; every positive one with
    an fg error of 0), so where those are few only they are sorted, and the loss and the
    gradient are the reference's, and sorting every pixel's (the gradient bit for bit)."""
    columns = torch_eager.TOP_K_MIN_PIXELS * 2
    errors, fg = _settled_rows((5, columns), dtype, gen)
    expected = []
    for row, row_fg in zip(errors, fg):
        positive = row > 0
        if not bool(row_fg.any()):
            expected.append(int((row == row.max()).sum()))
        elif bool((row_fg & ~positive).any()):
            expected.append(int(positive.sum()))
        else:
            expected.append(int((row >= row[row_fg].min()).sum()))
    assert torch_eager._needed_keys(errors, fg).flatten().tolist() == expected
    rows = [0, 1, 3, 4]  # row 2 needs every positive error: not few
    assert expected[1] >= 3  # the largest error and the three set to it
    assert max(expected[r] for r in rows) <= columns * torch_eager.TOP_K_MAX_FRACTION < expected[2]
    assert torch_eager._few_needed(errors[rows], fg[rows]) == max(expected[r] for r in rows)
    assert torch_eager._few_needed(errors, fg) is None
    picked_errors, picked_fg = errors[rows].clone(), fg[rows].clone()
    loss, grad = get_backend("torch").run(picked_errors, picked_fg)
    ref_loss, ref_grad = _reference(picked_errors, picked_fg)
    assert_close_report(loss, ref_loss, LOSS_TOLERANCE[dtype], "loss")
    from lovasz_kernels._cases import tie_group_sums
    assert_close_report(tie_group_sums(picked_errors, grad),
                        tie_group_sums(picked_errors, ref_grad), GRAD_TOLERANCE[dtype], "grad")
    whole_grad = torch.empty_like(picked_errors)
    whole_loss = torch_eager._extension_rows(picked_errors.clone(), picked_fg, whole_grad)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(loss, whole_loss.to(dtype), rtol=4 * eps, atol=0)
    untied = torch.tensor([0, 3])  # rows 1 and 2 (of the picked) hold ties
    assert torch.equal(grad[untied], whole_grad[untied])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_top_k_rows_give_the_references_answer(gen, dtype):
    """Rows with few positive errors, one with none, one with -inf padding and a -0.0: the
    extension of only their positive errors matches the numpy reference, and sorting every
    pixel (forced): the gradient bit for bit where no errors tie, the loss up to the order of
    its float64 sum."""
    columns = torch_eager.TOP_K_MIN_PIXELS * 2
    errors = _few_positive_errors((4, columns), dtype, gen)
    errors[1] = -errors[1].abs()  # no positive error
    errors[2, columns // 2:] = -torch.inf  # padding
    errors[3, 7] = -0.0
    fg = torch.rand(errors.shape, generator=gen) < 0.4
    fg[2, columns // 2:] = False
    assert torch_eager._few_needed(errors, fg) is not None
    loss, grad = get_backend("torch").run(errors, fg)
    ref_loss, ref_grad = _reference(errors, fg)
    assert_close_report(loss, ref_loss, LOSS_TOLERANCE[dtype], "loss")
    assert_close_report(grad, ref_grad, GRAD_TOLERANCE[dtype], "grad")
    assert bool((grad[errors <= 0] == 0).all())
    whole_grad = torch.empty_like(errors)
    whole_loss = torch_eager._extension_rows(errors.clone(), fg, whole_grad)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(loss, whole_loss.to(dtype), rtol=4 * eps, atol=0)
    assert torch.equal(grad, whole_grad)


@pytest.mark.parametrize(("classes", "scores", "top_k"), [
    (150, "random", True),  # every background pixel past the last fg one
    (21, "random", True),
    (8, "trained", False),  # the label's errors small: most rows need far more than 1/16
    (2, "random", False),
])
def test_softmax_calls_sort_only_the_keys_their_rows_need(monkeypatch, classes, scores,
                                                          top_k):
    """Through the public loss: a softmax whose settled tails leave few keys sorts only
    those, with the reference's loss, and one whose tails do not sorts every pixel."""
    from lovasz_kernels import bench, lovasz_softmax

    taken = []
    top = torch_eager._extension_top
    monkeypatch.setattr(torch_eager, "_extension_top",
                        lambda *args: taken.append(args[3]) or top(*args))
    workload = bench.Workload("softmax", 1, 128, classes, scores=scores)
    prepared = bench.Prepared(workload)
    loss = lovasz_softmax(prepared.scores, prepared.labels, backend="torch")
    assert bool(taken) == top_k
    assert all(count <= 128 * 128 * torch_eager.TOP_K_MAX_FRACTION for count in taken)
    reference = lovasz_softmax(prepared.scores.double(), prepared.labels, backend="numpy")
    assert_close_report(loss.double()[None], reference[None], LOSS_TOLERANCE[torch.float32],
                        "loss")


def test_top_k_with_tied_errors_keeps_each_tie_groups_gradient(gen):
    """Exactly tied positive errors may come out of topk in another order than out of a
    sort: the loss and each tie group's gradient sum stay the reference's."""
    from lovasz_kernels._cases import tie_group_sums

    columns = torch_eager.TOP_K_MIN_PIXELS
    errors = -torch.rand(2, columns, generator=gen)
    picked = torch.rand(2, columns, generator=gen) < 0.02
    errors[picked] = torch.randint(1, 6, (int(picked.sum()),), generator=gen).float() / 4
    fg = torch.rand(errors.shape, generator=gen) < 0.5
    loss, grad = get_backend("torch").run(errors, fg)
    ref_loss, ref_grad = _reference(errors, fg)
    assert_close_report(loss, ref_loss, LOSS_TOLERANCE[torch.float32], "loss")
    assert_close_report(tie_group_sums(errors, grad), tie_group_sums(errors, ref_grad),
                        GRAD_TOLERANCE[torch.float32], "tie-group grad")


def test_increments_of_the_first_pixels_equal_the_whole_rows(gen):
    """jaccard_increments on a row's first k pixels, told the row's foreground and length,
    gives the whole row's first k increments bit for bit (counts in an integer type too)."""
    from lovasz_kernels._jaccard import jaccard_increments

    gt = torch.rand(3, 5000, generator=gen) < 0.3
    gt[1] = False
    for dtype in (torch.float32, torch.float64):
        whole = jaccard_increments(gt, dtype)
        first = jaccard_increments(gt[:, :700], dtype, fg_total=gt.sum(dim=1, keepdim=True),
                                   row_pixels=gt.shape[1])
        assert torch.equal(first, whole[:, :700])
    big = torch.zeros(1, 2**24 + 8, dtype=torch.bool)
    big[0, ::3] = True
    first = jaccard_increments(big[:, :64], torch.float32, fg_total=big.sum(dim=1, keepdim=True),
                               row_pixels=big.shape[1])
    assert torch.equal(first, jaccard_increments(big, torch.float32)[:, :64])
