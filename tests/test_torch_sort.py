"""The torch backend's CPU sort (lovasz_kernels._torch_sort): which rows get the radix sort,
the per-machine measurement behind it, and the same answer from either sort."""

from __future__ import annotations

import json

import pytest
import torch

from lovasz_kernels import _torch_sort, get_backend
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

# speedups at MEASURED_FRACTIONS of the grain, as a machine might measure them
SPEEDUPS = (1.0, 1.5, 2.0, 3.0)


@pytest.fixture
def machine(monkeypatch):
    """Stand-ins for the machine: its thread count and measured speedups (settable), and a
    record of the thread counts asked for."""
    state = {"threads": 2, "speedups": SPEEDUPS, "asked": []}
    monkeypatch.setattr(_torch_sort.torch, "get_num_threads", lambda: state["threads"])

    def speedups(threads):
        state["asked"].append(threads)
        return state["speedups"]

    monkeypatch.setattr(_torch_sort, "padded_radix_speedups", speedups)
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
    monkeypatch.setattr(_torch_sort, "RADIX_SORT_MIN_PIXELS", 1024)  # fractions: 256 ... 768
    decide = _torch_sort.radix_sorted
    assert decide(torch.empty(1, 1024)) and decide(torch.empty(30, 5000))  # a grain: always
    assert not machine["asked"]  # ... without a measurement
    assert not decide(torch.empty(1, 255)) and not machine["asked"]  # under a quarter: never
    assert not decide(torch.empty(1, 300, device="meta"))  # the CPU only
    assert not decide(torch.empty(1, 256))  # speedup 1.0
    assert not decide(torch.empty(1, 270))  # 1.0 + 0.5 * 14 / 128 = 1.05: under the margin
    assert decide(torch.empty(1, 300))  # 1.17
    assert decide(torch.empty(3, 300))  # 900 values: one task of the 2-D sort
    asked = len(machine["asked"])
    assert not decide(torch.empty(4, 300))  # two tasks, on two threads at once
    assert not decide(torch.empty(5, 512))
    assert len(machine["asked"]) == asked  # nothing to measure for them
    machine["threads"] = 1
    assert decide(torch.empty(5, 512))  # one thread: the rows one after the other
    machine["threads"] = 16
    assert decide(torch.empty(1, 1000))  # past the last fraction: its speedup, 3.0
    assert _torch_sort.padded_radix_speedup(640, 16) == pytest.approx(2.5)
    assert set(machine["asked"]) == {1, 2, 16}  # per thread count
    machine["speedups"] = (0.5, 0.7, 0.9, 1.05)  # a machine where it never pays
    assert not decide(torch.empty(1, 1000))
    assert decide(torch.empty(1, 1024))
    with _torch_sort.padding_forced(True):  # the measurement's override, this thread only
        assert decide(torch.empty(1, 300)) and not decide(torch.empty(4, 300))
        with _torch_sort.padding_forced(False):
            assert not decide(torch.empty(1, 1000))
        assert decide(torch.empty(1, 300))
    assert not decide(torch.empty(1, 300))


def test_float64_keys_padded_from_half_a_grain_within_one(machine, monkeypatch):
    monkeypatch.setattr(_torch_sort, "RADIX_SORT_MIN_PIXELS", 1024)
    decide = _torch_sort.radix_sorted
    assert not decide(torch.empty(1, 511, dtype=torch.float64))
    assert decide(torch.empty(2, 512, dtype=torch.float64))
    assert not decide(torch.empty(3, 512, dtype=torch.float64))
    assert decide(torch.empty(3, 1024, dtype=torch.float64))
    assert not machine["asked"]  # a fixed rule: nothing measured


def test_deterministic_algorithms_never_pad(machine, monkeypatch):
    """Under ``torch.use_deterministic_algorithms`` nothing is measured: rows under a grain
    get the comparison sort on every machine, longer ones the (stable) radix sort."""
    monkeypatch.setattr(_torch_sort, "RADIX_SORT_MIN_PIXELS", 1024)
    monkeypatch.setattr(_torch_sort.torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not _torch_sort.radix_sorted(torch.empty(1, 1000))
    assert _torch_sort.radix_sorted(torch.empty(2, 1024))
    assert not machine["asked"]


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
    machine["speedups"] = (4.0,) * 4
    # padded only where the rows fit in one grain of 600 values
    padded = backend.run(errors[:2], fg[:2])
    assert sorts == [(1, False)] * 2
    assert torch.equal(padded[0], compared[0][:2])
    assert torch.equal(padded[1], compared[1][:2])
    sorts.clear()
    backend.run(errors, fg)
    assert sorts == [(2, True)]
    machine["speedups"] = (1.0,) * 4  # measured slower here: compared (float64: a fixed rule)
    sorts.clear()
    backend.run(errors[:2], fg[:2])
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
                              _torch_sort.forget_padded_radix_speedups,
                              "measure_padded_radix_speedups",
                              (SPEEDUPS, {"8192 padded": 0.3})) as (path, measured):
        yield path, measured


def test_speedups_are_measured_once_and_kept_per_machine_and_thread_count(speedup_file):
    path, measured = speedup_file
    assert _torch_sort.padded_radix_speedups(2) == SPEEDUPS and measured == [1]
    saved = json.loads(path.read_text())
    assert saved[_torch_sort._machine_key(2)]["speedups"] == list(SPEEDUPS)
    assert _torch_sort.padded_radix_speedups(2) == SPEEDUPS and measured == [1]  # kept
    assert _torch_sort.measured_padded_radix_speedups() == {2: SPEEDUPS}
    _torch_sort.forget_padded_radix_speedups()
    assert _torch_sort.padded_radix_speedups(2) == SPEEDUPS and measured == [1]  # read back
    assert _torch_sort.padded_radix_speedups(4) == SPEEDUPS and measured == [1, 1]  # new count
    assert len(json.loads(path.read_text())) == 2


@pytest.mark.parametrize("content", [
    "not json", "[]", '{"other machine": {"speedups": [1, 1, 1, 1]}}', None, "wrong length",
    "negative"], ids=["garbage", "a list", "other machine", "a dir", "wrong length", "negative"])
def test_unusable_speedup_file_means_measuring_again(speedup_file, content):
    """A corrupt file, another machine's entry, an entry that makes no sense or a path that
    cannot be written: measured again, nothing raised, the other machines' entries kept."""
    path, measured = speedup_file
    path.parent.mkdir(parents=True)
    key = _torch_sort._machine_key(2)
    if content is None:
        path.mkdir()  # cannot be read or replaced
    elif content in ("wrong length", "negative"):
        speedups = [2.0] * 3 if content == "wrong length" else [2.0, -1.0, 2.0, 2.0]
        path.write_text(json.dumps({key: {"speedups": speedups}}))
    else:
        path.write_text(content)
    assert _torch_sort.padded_radix_speedups(2) == SPEEDUPS and measured == [1]
    if content and content.startswith("{"):
        saved = json.loads(path.read_text())
        assert "other machine" in saved and key in saved


def test_measurement_times_both_sorts_and_leaves_the_callers_random_state(monkeypatch):
    """The real measurement, shortened: a positive speedup per measured size from whole
    extensions with the row padded and not (each as often), and the global random state as
    it was."""
    calls = []
    real = _torch_sort.sort_descending

    def counting(keys, keys_sorted, order, radix=None):
        calls.append((keys.shape[1], _torch_sort.radix_sorted(keys)))
        return real(keys, keys_sorted, order, radix)

    monkeypatch.setattr(_torch_sort, "sort_descending", counting)
    monkeypatch.setattr(torch_eager, "sort_descending", counting)
    state = torch.random.get_rng_state()
    speedups, times_ms = _torch_sort.measure_padded_radix_speedups(rounds=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(speedups) == len(_torch_sort.MEASURED_FRACTIONS)
    assert all(speedup > 0 for speedup in speedups)
    sizes = [int(fraction * _torch_sort.RADIX_SORT_MIN_PIXELS)
             for fraction in _torch_sort.MEASURED_FRACTIONS]
    for size in sizes:  # an untimed round and two timed ones, both sorts each time
        methods = sorted(radix for pixels, radix in calls if pixels == size)
        assert methods == [False] * 3 + [True] * 3
        assert times_ms[f"{size} compared"] > 0 and times_ms[f"{size} padded"] > 0


def test_info_says_what_was_measured(speedup_file, monkeypatch):
    """``lovasz-kernels info``'s line for the torch backend: measured on first use, then the
    speedups measured (here: the fake's) for this thread count, also in a process that only
    reads them."""
    monkeypatch.setattr(_torch_sort.torch, "get_num_threads", lambda: 3)
    assert "measured on first use" in torch_eager.details()
    _torch_sort.padded_radix_speedups(3)
    assert "speedups measured here 1x, 1.5x, 2x, 3x; 3 threads" in torch_eager.details()
    _torch_sort.forget_padded_radix_speedups()  # another process: read from the file
    assert "speedups measured here 1x, 1.5x, 2x, 3x; 3 threads" in torch_eager.details()


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
    sample is mostly not positive, and the path only when every row has few."""
    columns = torch_eager.TOP_K_MIN_PIXELS
    few = _few_positive_errors((3, columns), torch.float32, gen)
    assert torch_eager._few_positive(few) == int((few > 0).sum(dim=1).max())
    many = few.clone()
    many[2, : columns // 4] = 1.0  # one row with a quarter positive: every pixel is sorted
    assert torch_eager._few_positive(many) is None
    assert torch_eager._few_positive(few.abs()) is None  # the sample says: all positive
    assert torch_eager._few_positive(few[:, : columns // 2]) is None  # short rows
    assert torch_eager._few_positive(-few.abs()) == 0


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
    assert torch_eager._few_positive(errors) is not None
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
