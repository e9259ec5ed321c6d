"""The benchmark engine (lovasz_kernels.bench): workloads, floors, timing, memory, rules,
the driver and its tables. Fast, CPU only; the CUDA paths run through their pure parts."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from lovasz_kernels import _scratch, bench, lovasz_extension, lovasz_softmax
from lovasz_kernels.bench import engine, floors, measure, report, rules
from lovasz_kernels.bench.workloads import TORCH_FLOAT64, segment_errors
from tests.helpers import registered_fake_backend

TINY = [bench.Workload("softmax", 1, 16, 3), bench.Workload("hinge", 2, 12, per_image=True),
        bench.Workload("extension", 2, 8, 3, per_image=True)]


def _run(workloads, backends=("numpy", "torch"), **kwargs):
    kwargs.setdefault("repeat", 2)
    return bench.run(bench.Settings(list(workloads), list(backends), **kwargs))


def _split(line: str) -> list[str]:
    return re.split(r" {2,}", line.strip())


# --------------------------------------------------------------------------------------------
# workloads and inputs


def test_workload_names_round_trip():
    for workload in bench.SUITE + bench.FULL_SUITE_EXTRA + bench.CUDA_SUITE + tuple(TINY):
        assert bench.Workload.parse(workload.name) == workload
    assert bench.Workload("softmax", 1, 512, 21).name == "softmax 1x512x512x21 batch float32"
    assert bench.Workload("hinge", 8, 256, per_image=True).name == \
        "hinge 8x256x256 per-image float32"
    trained = bench.Workload("softmax", 2, 64, 5, True, "bfloat16", "trained")
    assert trained.name == "softmax 2x64x64x5 per-image bfloat16 trained"
    assert bench.Workload.parse(trained.name) == trained
    assert trained.key()["scores"] == "trained" and "trained-like scores" in trained.describe()


@pytest.mark.parametrize("name", ["softmax 1x512x256x21 batch float32", "softmax 512",
                                  "conv 1x8x8x2 batch float32"])
def test_workload_parse_rejects_other_text(name):
    with pytest.raises(ValueError, match="not a workload name"):
        bench.Workload.parse(name)


@pytest.mark.parametrize("kwargs,message", [
    ({"loss": "dice"}, "loss must be one of"),
    ({"batch": 0}, "batch must be a positive integer; got 0"),
    ({"side": -1}, "side must be a positive integer"),
    ({"loss": "hinge", "classes": 3}, "classes must be 1"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"scores": "learned"}, "scores must be one of random, trained; got 'learned'"),
])
def test_workload_rejects_bad_fields(kwargs, message):
    fields = {"loss": "softmax", "batch": 1, "side": 8, "classes": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        bench.Workload(**fields)


def test_workload_geometry():
    batch = bench.Workload("softmax", 4, 256, 21)
    assert (batch.segments, batch.segment_pixels) == (21, 4 * 256**2)
    per_image = bench.Workload("softmax", 4, 256, 21, per_image=True)
    assert (per_image.segments, per_image.segment_pixels) == (84, 256**2)
    assert per_image.elements == batch.elements == 21 * 4 * 256**2


def test_inputs_are_seeded_and_shaped():
    probas, labels = bench.softmax_inputs(2, 4, 8, torch.float16)
    again, labels_again = bench.softmax_inputs(2, 4, 8, torch.float16)
    assert probas.shape == (2, 4, 8, 8) and probas.dtype == torch.float16
    assert labels.shape == (2, 8, 8) and int(labels.max()) < 4
    assert torch.equal(probas, again) and torch.equal(labels, labels_again)
    torch.testing.assert_close(probas.float().sum(1), torch.ones(2, 8, 8), atol=3e-3, rtol=0)
    logits, binary = bench.hinge_inputs(3, 5)
    assert logits.shape == binary.shape == (3, 5, 5) and set(binary.unique().tolist()) <= {0, 1}
    _, sparse = bench.hinge_inputs(1, 200, foreground=0.3)
    assert abs(sparse.float().mean().item() - 0.3) < 0.01


def test_trained_scores_favour_the_labels():
    """Trained-like softmax scores are argmax-right on most pixels (about 97% at 21 classes)
    and random ones on about 1 in C; trained-like hinge logits leave about half the pixels
    within the margin; the labels are those of the random scores."""
    random_probas, labels = bench.softmax_inputs(2, 21, 64)
    probas, trained_labels = bench.softmax_inputs(2, 21, 64, trained=True)
    assert torch.equal(labels, trained_labels)
    assert 0.94 < (probas.argmax(1) == labels).float().mean().item() < 0.99
    assert (random_probas.argmax(1) == labels).float().mean().item() < 0.1
    torch.testing.assert_close(probas.sum(1), torch.ones(2, 64, 64))
    logits, binary = bench.hinge_inputs(2, 64, trained=True)
    within = (1 - logits * (2.0 * binary - 1)) > 0
    assert 0.4 < within.float().mean().item() < 0.6
    assert torch.equal(binary, bench.hinge_inputs(2, 64)[1])
    prepared = bench.Prepared(bench.Workload("softmax", 2, 64, 21, scores="trained"))
    assert torch.equal(prepared.scores, probas)


@pytest.mark.parametrize("per_image", [False, True])
def test_segment_errors_are_the_losses_segments(per_image):
    workload = bench.Workload("softmax", 2, 5, 3, per_image=per_image, dtype="float16")
    probas, labels = bench.softmax_inputs(2, 3, 5, torch.float16)
    errors, fg = segment_errors(workload, probas, labels)
    assert errors.dtype == torch.float32  # the losses compute in float32 at least
    assert errors.shape == (workload.segments, workload.segment_pixels)
    image, cls = (1, 2)
    row = image * 3 + cls if per_image else cls
    cols = slice(0, 25) if per_image else slice(25, 50)
    p = probas[image, cls].float().flatten()
    y = labels[image].flatten() == cls
    assert torch.equal(fg[row, cols], y)
    assert torch.equal(errors[row, cols], torch.where(y, 1 - p, p))


def test_extension_workload_is_the_softmax_kernel():
    """The bare kernel's workload sorts the softmax loss's segments: their mean is the loss."""
    shape = dict(batch=2, side=10, classes=3)
    errors = bench.Prepared(bench.Workload("extension", **shape))
    softmax = bench.Prepared(bench.Workload("softmax", **shape))
    losses, _ = lovasz_extension(errors.scores, errors.labels, backend="torch")
    expected = lovasz_softmax(softmax.scores, softmax.labels, backend="torch")
    torch.testing.assert_close(losses.mean(), expected)


def test_tie_group_sums_ignore_tie_order():
    """Two answers that order tied errors differently agree on the tie-group sums."""
    prepared = bench.Prepared(bench.Workload("hinge", 1, 6, per_image=True))
    prepared.scores = torch.round(prepared.scores * 2) / 2  # many tied errors
    _, grad = prepared.fwd_bwd("numpy")
    errors, _ = prepared.errors_and_fg
    shuffled = grad.clone().flatten()
    first, second = torch.nonzero(errors[0] == errors[0, 0]).flatten()[:2].tolist()
    shuffled[[first, second]] = shuffled[[second, first]] + torch.tensor([0.01, -0.01])
    shuffled = shuffled.view_as(grad)
    assert not torch.equal(shuffled, grad)
    torch.testing.assert_close(prepared.tie_group_sums(shuffled), prepared.tie_group_sums(grad))
    assert not torch.allclose(prepared.tie_group_sums(2 * grad), prepared.tie_group_sums(grad))


def test_reference_kinds_agree():
    prepared = bench.Prepared(bench.Workload("softmax", 1, 12, 3))
    loss, grad = prepared.reference("numpy")
    loss64, grad64 = prepared.reference(TORCH_FLOAT64)
    assert grad64.dtype == torch.float64
    torch.testing.assert_close(loss64.float(), loss.float())
    torch.testing.assert_close(prepared.tie_group_sums(grad64), prepared.tie_group_sums(grad))
    with pytest.raises(ValueError, match="reference must be"):
        prepared.reference("cupy")


def test_loop_is_not_a_kernel():
    with pytest.raises(ValueError, match="loop is a loss"):
        bench.Prepared(TINY[2]).fwd_bwd(bench.LOOP)


# --------------------------------------------------------------------------------------------
# floors


@pytest.mark.parametrize("segments,threads", [(1, 4), (5, 2), (3, 1)])
def test_cpu_sort_floor_sorts_every_segment(segments, threads):
    with floors.CpuSortFloor(segments, 300, threads=threads) as floor:
        assert floor.threads == min(threads, segments)
        keys = floor.keys.copy()
        result = floor().copy()
        again = floor()
    assert np.array_equal(result, np.sort(keys, axis=1)) and np.array_equal(again, result)
    assert np.array_equal(floor.keys, keys)  # sorted into a buffer: unsorted every call
    # packed: a random 32-bit key above the pixel index
    assert np.array_equal(np.sort(keys & np.uint64(0xFFFFFFFF), axis=1),
                          np.broadcast_to(np.arange(300, dtype=np.uint64), (segments, 300)))


def test_triton_sort_keys_order_like_the_errors():
    errors = torch.tensor([[0.5, -1.0, 2.0, 0.5, 0.0, -0.0, -math.inf, 1e-30]])
    fg = torch.tensor([[False, True, False, True, True, False, False, True]])
    keys = floors.triton_sort_keys(errors, fg)
    assert keys.dtype == torch.int32
    _, order = torch.sort(keys, dim=1, descending=True, stable=True)
    # descending error, foreground first among equals; errors <= 0 all become 0 (last)
    assert order[0, :4].tolist() == [2, 3, 0, 7]
    assert torch.equal(keys & 1, fg.int())
    assert torch.equal(floors.triton_key_errors(keys, torch.float32), errors.clamp_min(0))
    assert int(keys[0, 1]) == -(2**31) + 1  # an error <= 0, on fg: the smallest key + 1


def test_triton_sort_keys_are_the_triton_kernels_keys():
    """The CUDA floor sorts exactly what the triton backend sorts: its key kernel's output."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if rules.backend_problem("triton", device, native_only=False):
        pytest.skip(rules.backend_problem("triton", device, native_only=False))
    from lovasz_kernels.backends import triton_gpu

    gen = torch.Generator().manual_seed(0)
    errors = torch.randn(3, 100, generator=gen)
    errors[0, :5] = torch.tensor([0.0, -0.0, -math.inf, 1e-40, 3.0])
    fg = (torch.rand(3, 100, generator=gen) < 0.4) & (errors > -math.inf)
    errors, fg = errors.to(device), fg.to(device)
    # the backend's key kernel, launched as the backend launches it on (S, P) errors
    call = triton_gpu._errors_call(errors, fg, torch.empty_like(errors))
    keys = triton_gpu._build_keys(call, flat=False).view(errors.shape)
    assert torch.equal(keys, floors.triton_sort_keys(errors, fg))


@pytest.mark.parametrize("dtype,key_dtype", [(torch.float64, torch.int64),
                                             (torch.float16, torch.int16),
                                             (torch.bfloat16, torch.int16)])
def test_triton_sort_keys_are_as_wide_as_the_float(dtype, key_dtype):
    errors = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)).to(dtype)
    fg = errors > 0.3
    keys = floors.triton_sort_keys(errors, fg)
    assert keys.dtype == key_dtype
    assert torch.equal(floors.triton_key_errors(keys, dtype), errors.clamp_min(0))
    with pytest.raises(TypeError, match="errors must be float"):
        floors.triton_sort_keys(errors.int(), fg)


def test_cuda_floor_sorts_the_keys():
    errors, fg = bench.Prepared(bench.Workload("softmax", 1, 8, 2)).sorted_segments()
    values, _ = floors.cuda_sort_floor(errors, fg)()
    expected, _ = torch.sort(floors.triton_sort_keys(errors, fg), dim=1, descending=True)
    assert torch.equal(values, expected)


def test_byte_model():
    # float32: 4 (scores) + 8 (keys+indices) + 16 (sort pass) + 8 (post-sort read) + 4 (grad)
    assert floors.ideal_bytes(1000, 10) == 40 * 1000 + 8 * 10
    assert floors.ideal_bytes(1000, 10, score_bytes=2, label_bytes=1) == 36 * 1000 + 10
    assert floors.SORT_PASS_BYTES == 16


@pytest.mark.parametrize("card,gbps", [
    ("NVIDIA H100 80GB HBM3", 3350), ("NVIDIA H100 PCIe", 2000), ("NVIDIA H100 SXM5", 3350),
    ("NVIDIA H200", 4800), ("NVIDIA A100-SXM4-80GB", 2040), ("NVIDIA A100-PCIE-40GB", 1560),
    ("NVIDIA H100 NVL", None), ("Tesla T4", None),
])
def test_hbm_peak_by_card_name(card, gbps):
    assert floors.hbm_peak_gbps(card) == gbps


# --------------------------------------------------------------------------------------------
# timing and memory


class _TickClock:
    """Each call takes one 'second' per position in the round; records the call order."""

    name = "ticks"

    def __init__(self):
        self.order = []

    def measure(self, call):
        call()
        taken = float(len(self.order))
        self.order.append(call)
        return lambda: taken


def test_interleaved_times_alternate_the_calls():
    calls = {"a": lambda: "a", "b": lambda: "b"}
    clock = _TickClock()
    rounds = []
    times = measure.interleaved_times(calls, 3, clock, after_round=lambda: rounds.append(1))
    assert [c() for c in clock.order] == ["a", "b"] * 3
    assert times == {"a": [0.0, 2.0, 4.0], "b": [1.0, 3.0, 5.0]} and len(rounds) == 3
    with pytest.raises(ValueError, match="repeat must be at least 1; got 0"):
        measure.interleaved_times(calls, 0, clock)


def test_time_after_times_the_call_alone_right_after_the_op_before():
    ran = []
    clock = _TickClock()
    clock.order.append(None)  # its next measurement reads 1.0
    taken = measure.time_after(lambda: ran.append("call"), lambda: ran.append("before"), clock)
    assert ran == ["before", "call"] and taken == 1.0
    assert measure.time_after(lambda: None, lambda: None) >= 0.0  # the wall clock by default


class _FakeEvent:
    log: list[str] = []
    now = 0.0

    def record(self):
        _FakeEvent.now += 2.5
        self.time = _FakeEvent.now
        self.log.append("record")

    def synchronize(self):
        self.log.append("event sync")

    def elapsed_time(self, end):
        return end.time - self.time  # in ms, as CUDA events report


def test_cuda_event_clock_reads_events_in_seconds():
    _FakeEvent.log = []
    clock = measure.CudaEventClock("cpu", event=_FakeEvent,
                                   synchronize=lambda: _FakeEvent.log.append("device sync"))
    read = clock.measure(lambda: _FakeEvent.log.append("call"))
    assert _FakeEvent.log == ["device sync", "record", "call", "record"]
    assert read() == pytest.approx(2.5e-3) and _FakeEvent.log[-1] == "event sync"
    assert clock.name == "CUDA events"


def test_clock_and_meter_for_the_cpu():
    assert isinstance(measure.clock_for("cpu"), measure.WallClock)
    assert measure.WallClock().measure(lambda: None)() >= 0


def _rss_meter_or_skip() -> measure.RssPeakMeter:
    meter = measure.RssPeakMeter()
    reason = meter.unavailable_reason()
    if reason:
        pytest.skip(reason)
    return meter


def test_rss_peak_counts_what_a_call_allocates():
    meter = _rss_meter_or_skip()

    def allocate_64_mb():
        block = np.ones(64 << 20, dtype=np.uint8)
        return int(block[::4096].sum())

    extra = meter.extra_peak_bytes(allocate_64_mb)
    assert 60e6 < extra < 200e6
    assert meter.extra_peak_bytes(lambda: None) < 16e6


def test_rss_peak_counts_scratch_kept_from_an_earlier_call():
    """A call whose 32 MB of scratch was kept from the warm-up call needs it all the same:
    the meter releases kept scratch first, so the second call's peak counts it too."""
    meter = _rss_meter_or_skip()

    def sort_in_scratch():
        keys = _scratch.scratch("test keys", 4 << 20, np.uint64)  # 32 MB
        keys[:] = 1
        return int(keys[::4096].sum())

    sort_in_scratch()  # warm-up: the scratch is now kept
    assert meter.extra_peak_bytes(sort_in_scratch) > 30e6
    assert meter.extra_peak_bytes(sort_in_scratch) > 30e6


def test_allocation_peak_counts_torch_work_arrays_kept_from_an_earlier_call(monkeypatch):
    """The torch backend keeps small work arrays between calls: the allocation meter counts
    them as the call's, as the RSS meter counts numba's scratch: the same peak as when
    nothing is kept."""
    from lovasz_kernels.backends import torch_eager

    errors = torch.rand(2, 2000)
    fg = errors > 0.7
    meter = measure.TorchAllocationPeakMeter()

    def call():
        return torch_eager.lovasz_extension(errors, fg)

    call()  # warm-up: its work arrays are kept
    kept_peak = meter.extra_peak_bytes(call)
    monkeypatch.setattr(torch_eager, "KEPT_WORK_MAX_ELEMENTS", 0)  # nothing kept
    assert kept_peak == meter.extra_peak_bytes(call)


def test_release_kept_empties_every_threads_scratch_and_spares_arrays_in_use():
    """Every live thread's kept arrays are dropped (this one's and a waiting worker's), so
    their next calls allocate anew; an array a call still holds stays valid."""
    import threading

    taken, released = threading.Event(), threading.Event()
    worker_saw = {}

    def worker():
        first = _scratch.scratch("test release", 1000, np.float64)
        first[:] = 3.0
        taken.set()
        released.wait(timeout=30)
        again = _scratch.scratch("test release", 1000, np.float64)
        worker_saw["fresh"] = not np.shares_memory(first, again)
        worker_saw["intact"] = bool((first == 3.0).all())

    thread = threading.Thread(target=worker)
    thread.start()
    mine = _scratch.scratch("test release", 1000, np.float64)
    mine[:] = 7.0
    assert np.shares_memory(mine, _scratch.scratch("test release", 1000, np.float64))
    assert taken.wait(timeout=30)
    _scratch.release_kept()
    released.set()
    thread.join()
    assert not np.shares_memory(mine, _scratch.scratch("test release", 1000, np.float64))
    assert (mine == 7.0).all()  # still this caller's memory
    assert worker_saw == {"fresh": True, "intact": True}


def test_peak_meter_falls_back_where_rss_cannot_be_reset(monkeypatch, tmp_path):
    monkeypatch.setattr(measure, "_CLEAR_REFS", str(tmp_path / "missing" / "clear_refs"))
    meter, reason = measure.peak_meter_for("cpu")
    assert meter is None and "peak RSS cannot be reset here" in reason


# --------------------------------------------------------------------------------------------
# rules


def test_backend_problem():
    assert rules.backend_problem("numpy", "cpu") is None
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        rules.backend_problem("nope", "cpu")
    with registered_fake_backend("absent", unavailable="needs a thing"):
        assert rules.backend_problem("absent", "cpu") == "needs a thing"
        assert "absent" not in rules.runnable_backends("cpu")
    assert "numpy" in rules.runnable_backends("cpu")
    assert rules.backend_problem("numpy", "cuda") == "numpy does not run on cuda"


def test_backend_flag_problem_refuses_unknown_names_with_a_message():
    assert rules.backend_flag_problem("numpy", "cpu") is None
    assert rules.backend_flag_problem("numpy", "cuda") == "numpy does not run on cuda"
    assert "unknown backend 'nope'" in rules.backend_flag_problem("nope", "cpu")


def test_budget_skips_by_model_then_by_measurement():
    budget = rules.Budget(10.0)
    huge = bench.Workload("softmax", 1, 1024, 150)
    assert re.fullmatch(r"estimated \d+\.\d s per call > budget 10 s",
                        budget.skip_reason("numpy", huge))
    assert budget.skip_reason(bench.LOOP, bench.Workload("softmax", 1, 512, 150))
    assert budget.skip_reason("torch", huge) is None  # not modelled, not measured yet
    small = bench.Workload("softmax", 1, 64, 150)
    budget.record("torch", small, 1.0)
    assert budget.estimate("torch", huge) > 256  # extrapolated from the measurement
    assert budget.skip_reason("torch", huge)
    assert rules.Budget(math.inf).skip_reason("numpy", huge) is None
    for bad in (math.nan, -1.0):
        with pytest.raises(ValueError, match="budget must be a number of seconds"):
            rules.Budget(bad)


def test_cross_check_reference_is_cheap():
    budget = rules.Budget(10.0)
    small, large = bench.Workload("softmax", 1, 64, 21), bench.Workload("softmax", 1, 1024, 21)
    assert budget.reference_for_check(small, reference_timed=False) == "numpy"
    assert budget.reference_for_check(large, reference_timed=False) == TORCH_FLOAT64
    assert budget.reference_for_check(bench.Workload("softmax", 1, 512, 21),
                                      reference_timed=True) == "numpy"  # timed anyway


def test_default_suite_fits_the_budget():
    """The standard workloads run every contender within the budget (no asv n/a)."""
    budget = rules.Budget()
    for workload in bench.SUITE:
        for contender in ("numpy", bench.LOOP):
            assert budget.skip_reason(contender, workload) is None, (workload, contender)


# --------------------------------------------------------------------------------------------
# the driver


def test_run_cross_checks_times_and_measures():
    results = _run(TINY)
    assert [r["workload"] for r in results] == [w.name for w in
                                                sorted(TINY, key=lambda w: w.elements)]
    for result in results:
        entries = result["contenders"]
        expected = {"numpy", "torch", bench.FLOOR} | (
            set() if result["loss"] == "extension" else {bench.LOOP})
        assert set(entries) == expected
        assert result["reference"] == "numpy"
        assert entries["numpy"]["status"] == "reference"
        assert entries["torch"]["status"] == "ok"
        assert entries["torch"]["max_abs_grad_deviation"] < 1e-6
        assert entries[bench.FLOOR]["status"] == engine.FLOOR_STATUS
        for entry in entries.values():
            assert len(entry["samples_s"]) == 2
            assert entry["median_s"] == pytest.approx(sum(entry["samples_s"]) / 2)
        if measure.RssPeakMeter().unavailable_reason() is None:
            assert entries["torch"]["peak_bytes"] >= 0
        assert "peak_bytes" not in entries[bench.FLOOR]
    assert bench.failures(results) == 0


@pytest.mark.parametrize("largest", [1 << 20, 0], ids=["small input", "large input"])
def test_small_inputs_are_timed_on_new_sets_in_turn(monkeypatch, largest):
    """Every round gives all contenders the next of INPUT_SETS seeded input sets (the first
    is the cross-checked one), so a sort never times keys it has just sorted; an input over
    ROTATED_MAX_INPUT_BYTES keeps one set."""
    monkeypatch.setattr(engine, "ROTATED_MAX_INPUT_BYTES", largest)
    seen: list[tuple[str, int]] = []
    real = bench.Prepared.fwd_bwd

    def recording(self, contender):
        seen.append((contender, int(self.scores.detach().reshape(-1)[:8].mul(1e6).sum())))
        return real(self, contender)

    monkeypatch.setattr(bench.Prepared, "fwd_bwd", recording)
    _run(TINY[1:2], ("torch",), repeat=6, measure_memory=False)
    timed = [scores for contender, scores in seen[2:]]  # after the cross-check's calls
    assert [contender for contender, _ in seen[2:]] == ["torch", bench.LOOP] * 6
    rounds = timed[::2]
    assert rounds == timed[1::2]  # both contenders on the same set each round
    if largest:
        assert len(set(rounds)) == engine.INPUT_SETS
        assert rounds == (rounds[:engine.INPUT_SETS] * 2)[:6]  # in turn
        assert rounds[0] == seen[0][1]  # the cross-checked set first
    else:
        assert len(set(rounds)) == 1


def test_run_does_not_time_a_wrong_answer():
    with registered_fake_backend("doubled", scale_grad=2.0):
        results = _run(TINY[:1], ("numpy", "torch", "doubled"), measure_memory=False)
    entries = results[0]["contenders"]
    assert entries["doubled"]["status"].startswith("MISMATCH")
    assert entries["doubled"]["samples_s"] == [] and entries["doubled"]["median_s"] is None
    assert entries["torch"]["status"] == "ok" and len(entries["torch"]["samples_s"]) == 2
    assert bench.failures(results) == 1


def test_run_reports_a_backend_that_raises_and_goes_on():
    with registered_fake_backend("broken", raises="kernel exploded"):
        results = _run(TINY[:2], ("numpy", "broken"), measure_memory=False)
    for result in results:
        status = result["contenders"]["broken"]["status"]
        assert status == "ERROR: RuntimeError: kernel exploded"
        assert result["contenders"]["numpy"]["median_s"] is not None
    assert bench.failures(results) == 2


def test_run_skips_over_budget_and_says_so():
    said = []

    class Progress:
        def update(self, steps=1, status=None):
            pass

        def say(self, message):
            said.append(message)

    small, larger = bench.Workload("softmax", 1, 8, 2), bench.Workload("softmax", 1, 32, 2)
    results = bench.run(bench.Settings([larger, small], ["numpy", "torch"], repeat=1,
                                       budget_s=0.0, measure_memory=False), progress=Progress())
    assert [r["side"] for r in results] == [8, 32]
    first, second = (r["contenders"] for r in results)
    assert first["torch"]["median_s"] is not None  # nothing measured yet: the model decides
    assert second["torch"]["status"].startswith("skipped: estimated")
    assert any(re.match(r"skipping torch at softmax 1x32x32x2 .*: estimated .* > budget 0 s", m)
               for m in said)


def test_gpu_layout_on_cpu_tensors(monkeypatch):
    """The --device cuda layout, run on CPU tensors: the numpy reference only cross-checks
    (or, where it is too slow, the torch backend in float64 does), the floor is torch.sort of
    the triton keys, bytes for GB/s are recorded."""
    sorted_keys = []
    real_floor = floors.cuda_sort_floor
    monkeypatch.setattr(floors, "cuda_sort_floor",
                        lambda e, f: sorted_keys.append(e.shape) or real_floor(e, f))
    workloads = [bench.Workload("softmax", 1, 16, 3), bench.Workload("softmax", 1, 24, 3)]
    monkeypatch.setattr(rules, "REFERENCE_CHECK_S", 1e-9)  # the numpy reference: too slow
    results = _run(workloads, ("numpy", "torch"), layout="gpu", measure_memory=False)
    assert sorted_keys == [(3, 256), (3, 576)]
    for result in results:
        assert set(result["contenders"]) == {"torch", bench.LOOP, bench.FLOOR}
        assert result["reference"] == TORCH_FLOAT64
        assert result["contenders"]["torch"]["status"] == "ok"
        pixels = result["pixels_per_image"]
        assert result["bytes_model"] == {"ideal": floors.ideal_bytes(3 * pixels, pixels),
                                         "floor": 16 * 3 * pixels}


def test_settings_validate():
    with pytest.raises(ValueError, match="repeat must be at least 1; got 0"):
        bench.Settings(TINY, ["torch"], repeat=0)
    with pytest.raises(ValueError, match="layout must be"):
        bench.Settings(TINY, ["torch"], layout="tpu")
    assert bench.Settings(TINY, ["numpy", "torch"], layout="gpu").contenders == [
        "torch", bench.LOOP, bench.FLOOR]


def test_warmed_call():
    workload = bench.Workload("hinge", 1, 16, per_image=True)
    assert bench.warmed_call(workload, "torch")()[1].shape == (1, 16, 16)
    floor = bench.warmed_call(workload.name, bench.FLOOR)
    assert floor().shape == (1, 256)
    floor.close()
    with pytest.raises(bench.OverBudget, match="estimated"):
        bench.warmed_call(bench.Workload("softmax", 1, 1024, 150), "numpy")
    assert issubclass(bench.OverBudget, NotImplementedError)  # asv: n/a


# --------------------------------------------------------------------------------------------
# tables


def _gpu_record(**contenders) -> dict:
    elements = 21 << 20
    return {"description": "lovasz_softmax fwd+bwd ...", "reference": TORCH_FLOAT64,
            "sorted_segments": 21, "pixels_per_segment": 1 << 20, "input_bytes": 4 * elements,
            "bytes_model": {"ideal": 40 * elements + 8 * (1 << 20), "floor": 16 * elements},
            "contenders": contenders}


def _gpu_context(card: str | None) -> dict:
    return {"layout": "gpu", "repeat": 3, "device": f"cuda ({card})", "clock": "CUDA events",
            "memory": "torch.cuda.max_memory_allocated", "card": card,
            "hbm_peak_gbps": floors.hbm_peak_gbps(card) if card else None}


def test_gpu_table():
    """Made-up record of 2^20 x 21 on an H100: every derived column."""
    record = _gpu_record(
        triton={"status": "ok", "median_s": 2e-3, "max_abs_grad_deviation": 0.0,
                "peak_bytes": 8 * 21 << 20},
        torch={"status": "ok", "median_s": 8e-3, "max_abs_grad_deviation": 0.0},
        loop={"status": engine.LOOP_STATUS, "median_s": 8e-2, "max_abs_grad_deviation": 1e-3},
        floor={"status": engine.FLOOR_STATUS, "median_s": 1.5e-3},
    )
    text = report.workload_table(record, _gpu_context("NVIDIA H100 80GB HBM3"))
    lines = text.splitlines()
    assert "cuda (NVIDIA H100 80GB HBM3), median of 3 interleaved rounds (CUDA events)" in lines[0]
    assert _split(lines[1]) == ["backend", "median ms", "/ floor", "non-sort ms", "GB/s",
                                "% HBM peak", "vs torch", "vs loop", "peak MB", "x input",
                                "max |Δgrad| (tie groups)"]
    ideal = record["bytes_model"]["ideal"]
    triton = _split(lines[3])
    assert triton[:9] == ["triton", "2.000", "1.33", "0.500", f"{ideal / 2e-3 / 1e9:.0f}",
                          f"{100 * ideal / 2e-3 / 3.35e12:.0f}%", "4.00x", "40.00x",
                          f"{8 * 21 * 2**20 / 1e6:.1f}"]
    assert triton[9] == "2.00x"
    floor = _split(lines[6])
    assert floor[:5] == ["floor", "1.500", "1.00", "-", f"{16 * 21 * 2**20 / 1.5e-3 / 1e9:.0f}"]
    assert "non-sort ms = median - the floor's median" in text
    assert "torch backend in float64" in text
    assert "% HBM peak: of the NVIDIA H100 80GB HBM3's 3.35 TB/s" in text


def test_gpu_table_without_a_known_peak():
    record = _gpu_record(torch={"status": "ok", "median_s": 8e-3, "max_abs_grad_deviation": 0})
    text = report.workload_table(record, _gpu_context("NVIDIA GeForce RTX 4090"))
    assert "% HBM peak" not in text.splitlines()[1]
    assert "no % HBM peak column: the peak bandwidth of NVIDIA GeForce RTX 4090 is unknown" in text


def test_cpu_table_and_document(tmp_path):
    settings = bench.Settings(TINY[:1], ["numpy", "torch"], repeat=1)
    results = bench.run(settings)
    ctx = report.context(settings, "wall clock", "peak RSS ...")
    lines = report.workload_table(results[0], ctx).splitlines()
    assert _split(lines[1]) == ["backend", "median ms", "vs numpy", "vs loop", "/ floor",
                                "peak MB", "x input", "max |Δgrad| (tie groups)"]
    assert re.match(r"^numpy\s+\d+\.\d+\s+1\.00x\s+\d+\.\d\dx\s+\d+\.\d\d\s", lines[3])
    assert re.search(r"^floor\s+\d+\.\d+\s+.*\s1\.00\s+-\s+-\s+-$", "\n".join(lines), re.M)
    assert any("floor: np.sort of 768 random packed uint64 keys" in line for line in lines)
    doc = report.document("lovasz-kernels bench", settings, ctx, results)
    assert doc["settings"]["contenders"] == ["numpy", "torch", "loop", "floor"]
    assert doc["byte_model"] is None and doc["results"] == results
    assert report.plot(results, "title", str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


def test_format_ms():
    assert [report.format_ms(s) for s in (None, 1.2345e-3, 0.0123456)] == ["-", "1.234", "12.3"]


def test_half_precision_gradients_pass_the_float64_check(monkeypatch):
    """float16 gradients are rounded once per pixel; a tie group's total may be off by its
    members' roundings together (float16 probabilities tie a lot), and that is not a mismatch."""
    monkeypatch.setattr(rules, "REFERENCE_CHECK_S", 0.0)  # the float64 torch cross-check
    workload = bench.Workload("softmax", 1, 1024, 2, dtype="float16")
    results = _run([workload], ("torch",), repeat=1, measure_memory=False, layout="gpu")
    assert results[0]["reference"] == TORCH_FLOAT64
    assert results[0]["contenders"]["torch"]["status"] == "ok"
