"""The shared numba core: the sort chosen per machine, the worker threads, calls from several
Python threads under every numba threading layer, and the compile notice.

Each sort is forced through every path of the backend (serial, over segments, within a
segment) and must give the reference's answer: the machine's choice may be any of them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from lovasz_kernels import _numba_core as core
from lovasz_kernels import lovasz_hinge, lovasz_softmax
from lovasz_kernels.backends import numba_cpu
from tests.helpers import (
    GRAD_TOLERANCE,
    LOSS_TOLERANCE,
    assert_close_report,
    measured_choice_file,
)

pytestmark = pytest.mark.skipif(not core.NUMBA_AVAILABLE, reason=core.NUMBA_IMPORT_ERROR)

_METHODS = {"lsd": numba_cpu._SortMethods(core.SORT_LSD, core.SORT_LSD),
            "msd": numba_cpu._SortMethods(core.SORT_MSD, core.SORT_MSD),
            "numpy": numba_cpu._SortMethods(core.SORT_NUMPY, core.SORT_LSD)}


def _loss_and_grad(loss_fn, scores, labels, backend="numba", **options):
    scores = scores.detach().clone().requires_grad_()
    loss = loss_fn(scores, labels, backend=backend, **options)
    loss.backward()
    return loss.detach(), scores.grad


# --------------------------------------------------------------------------------------------
# every sort through every path


@pytest.mark.parametrize("method", list(_METHODS))
@pytest.mark.parametrize("path", ["serial", "over segments", "within a segment"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_each_sort_on_each_path_matches_the_reference(monkeypatch, gen, method, path, dtype):
    """Segments past MSD_MIN_KEYS (the MSD pass runs), ties, ignored pixels, an absent class:
    the loss and gradient equal the numpy reference's whichever sort runs, on one thread, with
    segments over threads (per image) and with segments split across threads (batch)."""
    monkeypatch.setattr(numba_cpu, "_sort_methods", lambda num_pixels: _METHODS[method])
    threads = {"serial": 1, "over segments": 2, "within a segment": 3}[path]
    monkeypatch.setattr(core, "thread_count", lambda: threads)
    monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_PIXELS", 1000)
    monkeypatch.setattr(numba_cpu, "_split_pays", lambda *args: True)
    host_sorted, blocked = numba_cpu._segment_host_sorted, numba_cpu._segment_blocked
    sorted_by_numpy, split = [], []
    monkeypatch.setattr(numba_cpu, "_segment_host_sorted",
                        lambda *args: sorted_by_numpy.append(1) or host_sorted(*args))
    monkeypatch.setattr(numba_cpu, "_segment_blocked",
                        lambda *args: split.append(1) or blocked(*args))
    side = 130  # 16900 pixels per image > MSD_MIN_KEYS
    assert side * side > core.MSD_MIN_KEYS
    probas = torch.randn(2, 4, side, side, generator=gen, dtype=torch.float64).softmax(dim=1)
    probas[:, :, :5] = 0.25  # ties across the whole batch
    labels = torch.randint(0, 3, (2, side, side), generator=gen)  # class 3 absent
    labels[0, :3] = 255
    per_image = path != "within a segment"  # per image: 6 segments
    if not per_image:
        probas, labels = probas[:, :2] / probas[:, :2].sum(1, keepdim=True), labels % 2
        labels[0, :3] = 255  # 2 batch segments, fewer than the 3 threads
    probas = probas.to(dtype)
    expected = _loss_and_grad(lovasz_softmax, probas, labels, backend="numpy",
                              per_image=per_image, ignore_index=255)
    loss, grad = _loss_and_grad(lovasz_softmax, probas, labels, per_image=per_image,
                                ignore_index=255)
    assert_close_report(loss, expected[0], LOSS_TOLERANCE[dtype], "loss")
    assert_close_report(grad, expected[1], GRAD_TOLERANCE[dtype], "grad")
    assert bool(sorted_by_numpy) == (method == "numpy" and per_image)
    assert bool(split) == (not per_image)


def test_hinge_within_a_segment_with_each_sort(monkeypatch, gen):
    """One hinge segment split over threads (the default path of a single image) gives the
    same gradient with every sort, bit for bit (the same keys in the same order)."""
    logits = torch.randn(1, 120, 130, generator=gen)
    labels = torch.randint(0, 2, (1, 120, 130), generator=gen)
    monkeypatch.setattr(core, "thread_count", lambda: 2)
    monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_PIXELS", 1)
    monkeypatch.setattr(numba_cpu, "_split_pays", lambda *args: True)
    results = {}
    for method in _METHODS:
        monkeypatch.setattr(numba_cpu, "_sort_methods", lambda n, m=method: _METHODS[m])
        results[method] = _loss_and_grad(lovasz_hinge, logits, labels)
    for method, (loss, grad) in results.items():
        assert torch.equal(grad, results["lsd"][1]), method
        torch.testing.assert_close(loss, results["lsd"][0], rtol=1e-6, atol=0)


def test_large_segments_ask_for_the_machine_choice(monkeypatch):
    """Segments from SORT_CHOICE_MIN_PIXELS on use the measured choice; smaller ones the LSD
    sort, without measuring anything."""
    asked = []
    choice = core.SortChoice(core.SORT_NUMPY, core.SORT_MSD, {})
    monkeypatch.setattr(core, "sort_choice", lambda: asked.append(1) or choice)
    assert numba_cpu._sort_methods(numba_cpu.SORT_CHOICE_MIN_PIXELS - 1) == (
        core.SORT_LSD, core.SORT_LSD)
    assert not asked
    assert numba_cpu._sort_methods(numba_cpu.SORT_CHOICE_MIN_PIXELS) == (
        core.SORT_NUMPY, core.SORT_MSD)
    assert asked


# --------------------------------------------------------------------------------------------
# the choice, measured once per machine


@pytest.fixture
def choice_file(monkeypatch, tmp_path):
    """An empty place for the choice and a fake measurement that counts its calls."""
    fake = core.SortChoice(core.SORT_MSD, core.SORT_MSD, {"lsd": 2.0, "msd": 1.0, "numpy": 3.0})
    with measured_choice_file(monkeypatch, tmp_path, core, "sort-choice.json",
                              core.forget_sort_choice, "measure_sorts", fake) as (path, measured):
        yield path, measured, fake


def test_choice_is_measured_once_and_kept_per_machine(choice_file):
    path, measured, fake = choice_file
    assert core.measured_sort_choice() is None and measured == []  # asks, measures nothing
    assert core.sort_choice() == fake and measured == [1]
    saved = json.loads(path.read_text())
    assert saved[core._machine_key()]["host"] == "msd"
    assert core.sort_choice() == fake and measured == [1]  # this process: no new read
    core.forget_sort_choice()
    assert core.measured_sort_choice() == fake  # another process (lovasz-kernels info): read
    assert core.sort_choice() == fake and measured == [1]  # read back


def test_choices_are_measured_by_one_thread_while_the_others_wait(tmp_path, caplog):
    """Every measured-once choice goes through kept_or_measured: threads asking at once get
    one measurement between them, said in two INFO records, and its entry is in the file; a
    decoder that refuses the file's entry means measuring again."""
    from lovasz_kernels._machine_choices import kept_or_measured

    path, kept, lock, started = str(tmp_path / "choice.json"), {}, threading.Lock(), []

    def measure():
        started.append(1)
        time.sleep(0.05)  # long enough for the other threads to ask meanwhile
        return 7, {"value": 7}

    def decode(entry):
        return None if entry is None else entry["value"]

    def ask():
        return kept_or_measured(kept, "slot", lock, path, "key", decode, measure, what="a test")

    with caplog.at_level(logging.INFO, logger="lovasz_kernels"), ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: ask(), range(4)))
    assert answers == [7] * 4 and started == [1]
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2 and "measuring a test (first use" in messages[0]
    assert "measured a test in" in messages[1] and path in messages[1]
    assert json.loads((tmp_path / "choice.json").read_text()) == {"key": {"value": 7}}
    kept.clear()
    assert ask() == 7 and started == [1]  # read back
    kept.clear()
    assert kept_or_measured(kept, "slot", lock, path, "key", lambda entry: None,
                            measure, what="a test") == 7 and started == [1, 1]


@pytest.mark.parametrize("content", ["not json", "[]", '{"other machine": {"host": "lsd"}}',
                                     None], ids=["garbage", "a list", "other machine", "a dir"])
def test_unusable_choice_file_means_measuring_again(choice_file, content):
    """A corrupt file, another machine's entry or a path that cannot be written: measured
    again, nothing raised, the other machines' entries kept."""
    path, measured, fake = choice_file
    path.parent.mkdir(parents=True)
    if content is None:
        path.mkdir()  # cannot be read or replaced
    else:
        path.write_text(content)
    assert core.sort_choice() == fake and measured == [1]
    if content and content.startswith("{"):
        saved = json.loads(path.read_text())
        assert "other machine" in saved and core._machine_key() in saved


@pytest.mark.parametrize(("lsd", "msd", "numpy", "host", "kernel"), [
    (1.0, 0.95, 0.95, "lsd", "lsd"),  # within the margin: the LSD sort stays
    (1.0, 0.8, 0.9, "msd", "msd"),  # MSD clearly faster; numpy not faster than MSD
    (1.0, 1.2, 0.5, "numpy", "lsd"),  # numpy's sort (AVX-512) far ahead
    (1.0, 0.8, 0.7, "numpy", "msd"),
    (1.0, 0.8, 0.75, "msd", "msd"),  # numpy within the margin of the kernel's choice
])
def test_choice_keeps_the_lsd_sort_unless_another_is_clearly_faster(lsd, msd, numpy, host,
                                                                     kernel):
    chosen = core.choose_sorts({"lsd": lsd, "msd": msd, "numpy": numpy})
    assert chosen == (core.SORT_NAMES.index(host), core.SORT_NAMES.index(kernel))


def test_measuring_times_every_method_on_every_thread(monkeypatch):
    """The real measurement (small keys to stay quick): every method timed, with one copy of
    the keys per thread, and the choice made from those times."""
    monkeypatch.setattr(core, "CALIBRATION_KEYS", 1 << 15)
    sorted_copies = []
    original = core._sort_copy
    monkeypatch.setattr(core, "_sort_copy",
                        lambda *args: sorted_copies.append(args[0]) or original(*args))
    monkeypatch.setattr(core, "thread_count", lambda: 2)
    choice = core.measure_sorts(rounds=1)
    assert set(choice.times_ms) == set(core.SORT_NAMES)
    assert (choice.host, choice.kernel) == core.choose_sorts(choice.times_ms)
    assert sorted(set(sorted_copies)) == [0, 1, 2] and len(sorted_copies) == 2 * 3 * 2


def test_calibration_keys_are_sorted_alike_by_every_method():
    """The measurement sorts what the backend sorts, and every method agrees on it."""
    keys = core.calibration_keys(40000, seed=3)
    expected = np.sort(keys)
    for method in (core.SORT_LSD, core.SORT_MSD):
        result = core.sort_keys(keys.copy(), np.empty_like(keys), keys.size, 0, method)
        np.testing.assert_array_equal(result, expected)


def _keys_with_varying_bits(count: int, varying_bits: int, seed: int) -> np.ndarray:
    """Packed keys (prefix, then the index and a label bit, in index order) whose prefixes
    vary in their low ``varying_bits`` bits, with ties among them."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, 1 << varying_bits, count, dtype=np.uint64) | np.uint64(1 << 30)
    payload = (np.arange(count, dtype=np.uint64) << np.uint64(1)) | rng.integers(
        0, 2, count, dtype=np.uint64)
    return (prefix << np.uint64(32)) | payload


@pytest.mark.parametrize("count", [core.INSERTION_MAX + 1, core.RADIX_MIN_KEYS, 100, 1023,
                                   2047, 5000])
@pytest.mark.parametrize("varying_bits", [1, 7, 27, 30])
def test_small_sorts_with_digits_sized_to_the_keys_match_numpys(count, varying_bits):
    """From RADIX_MIN_KEYS keys the LSD sort runs with digits sized to the count (4 bits at
    a few dozen keys, 11 from 2048): every layout gives np.sort's order, ties included."""
    keys = _keys_with_varying_bits(count, varying_bits, seed=count + varying_bits)
    expected = np.sort(keys)
    result = core.sort_keys(keys.copy(), np.empty_like(keys), count, core.RADIX_MIN_KEYS,
                            core.SORT_LSD)
    np.testing.assert_array_equal(result[:count], expected)


def test_digit_width_follows_the_key_count():
    assert [core.digit_bits_for(count) for count in (1, 31, 32, 64, 1023, 1024, 2048, 1 << 20)
            ] == [4, 4, 5, 6, 9, 10, 11, core.MAX_DIGIT_BITS]
    assert core.RADIX_MIN_KEYS > core.INSERTION_MAX


if core.NUMBA_AVAILABLE:

    @core.njit(cache=False)
    def _increments_both_ways(n_fg, fg_seen, bg_seen, is_fg):
        """Every (n_fg, fg_seen, bg_seen, is_fg) row's increment with and without branches."""
        out = np.empty((n_fg.size, 2))
        for row in range(n_fg.size):
            out[row, 0] = core.jaccard_increment(n_fg[row], fg_seen[row], bg_seen[row],
                                                 is_fg[row], False)
            out[row, 1] = core.jaccard_increment(n_fg[row], fg_seen[row], bg_seen[row],
                                                 is_fg[row], True)
        return out


def test_branch_free_increments_are_the_same_bits():
    """The branch-free increment divides the same operands as the branches: equal bits on
    every case of the closed form (the first mistake with no foreground, foreground,
    background, the last foreground seen) and at counts whose products are not exact in
    float64."""
    rows = []
    for n_fg in (0, 1, 2, 3, 17, 1000, 2**26 + 1, 2**40 + 3):
        for bg_seen in (0, 1, 2, 3, 1001, 2**27 - 1, 2**41 + 5):
            for fg_seen in sorted({0, 1, n_fg // 2, max(n_fg - 1, 0), n_fg}):
                for is_fg in (False, True):
                    if fg_seen > n_fg or (is_fg and fg_seen == 0) or (
                            not is_fg and bg_seen == 0):
                        continue  # not a pixel at a sorted position
                    rows.append((n_fg, fg_seen, bg_seen, is_fg))
    n_fg, fg_seen, bg_seen, is_fg = (np.array(column) for column in zip(*rows))
    both = _increments_both_ways(n_fg, fg_seen, bg_seen, is_fg)
    assert len(rows) > 200
    np.testing.assert_array_equal(both[:, 1].view(np.int64), both[:, 0].view(np.int64))
    assert both[(n_fg == 0) & (bg_seen == 1) & ~is_fg, 0].tolist() == [1.0]


def test_passes_go_branch_free_where_labels_are_mixed():
    """A segment whose rarer label is at least 1/12 of its pixels takes the branch-free
    increments (a branch on its labels would mispredict); one where a label is rare keeps
    the branches (taken the same way almost every time)."""
    decide = core.njit(lambda n_fg, n: core.labels_unpredictable(n_fg, n))
    assert [decide(n_fg, 1200) for n_fg in (0, 50, 99, 100, 600, 1100, 1101, 1200)] == [
        False, False, False, True, True, True, False, False]


# --------------------------------------------------------------------------------------------
# worker threads


def test_run_tasks_returns_in_order_and_waits_for_every_task():
    done = []

    def task(index, delay):
        time.sleep(delay)
        done.append(index)
        return index * 10

    assert core.run_tasks(task, [(0, 0.0), (1, 0.05), (2, 0.02)]) == [0, 10, 20]
    assert sorted(done) == [0, 1, 2]

    def failing(index):
        if index == 0:
            raise KeyError("first")
        time.sleep(0.05)
        done.append(("late", index))

    done.clear()
    with pytest.raises(KeyError, match="first"):
        core.run_tasks(failing, [(0,), (1,)])
    assert done == [("late", 1)], "the caller returned before the other task ended"
    with pytest.raises(ValueError, match="second"):
        core.run_tasks(lambda i: (_ for _ in ()).throw(ValueError("second")) if i else 0,
                       [(0,), (1,)])


def test_run_tasks_does_not_wait_for_a_pool_thread_that_has_not_started(monkeypatch):
    # the pool's only thread is held by another job (as when the OS has not scheduled it):
    # the caller runs every task itself and returns; the late job then finds nothing to run
    pool = ThreadPoolExecutor(1)
    started, release = threading.Event(), threading.Event()
    pool.submit(lambda: (started.set(), release.wait()))
    assert started.wait(10)
    monkeypatch.setattr(core, "_executor", lambda size: pool)
    monkeypatch.setattr(core, "thread_count", lambda: 2)
    ran = []

    def task(index):
        ran.append((index, threading.get_ident()))
        return index + 1

    outcome = {}
    caller = threading.Thread(target=lambda: outcome.update(
        results=core.run_tasks(task, [(0,), (1,), (2,)]), thread=threading.get_ident()))
    caller.start()
    caller.join(10)
    finished_before_release = not caller.is_alive()
    release.set()
    caller.join(10)
    pool.shutdown(wait=True)
    assert finished_before_release, "run_tasks waited for a pool thread that never started"
    assert outcome["results"] == [1, 2, 3]
    assert ran == [(index, outcome["thread"]) for index in range(3)], (
        "every task runs once, on the caller, and the late job runs none")


_IDLE_SCRIPT = textwrap.dedent(
    """
    import os, threading, time, torch
    from lovasz_kernels import lovasz_hinge, lovasz_softmax
    torch.set_num_threads(1)  # torch's own pool, which spins too, is not under test
    probas = torch.rand(1, 4, 300, 300).softmax(dim=1)
    labels = torch.randint(0, 4, (1, 300, 300))
    me = str(threading.get_native_id())

    def others_cpu_ns():
        total = 0
        for tid in os.listdir("/proc/self/task"):
            if tid != me:
                with open(f"/proc/self/task/{tid}/schedstat") as stat:
                    total += int(stat.read().split()[0])
        return total

    worst = 0
    for _ in range(3):
        lovasz_softmax(probas, labels, backend="numba")  # over segments
        lovasz_hinge(probas[:, 0], labels > 0, backend="numba")  # one segment split
        before = others_cpu_ns()
        time.sleep(0.1)
        worst = max(worst, others_cpu_ns() - before)
    print("idle cpu ns", worst)
    """
)


def test_idle_worker_threads_do_not_spin():
    """After the loss calls return, no thread of the process burns CPU: the kernels' threads
    block (an OpenMP pool's idle threads spin for milliseconds after every parallel region,
    slowing whatever torch runs next)."""
    if not os.path.exists("/proc/self/task"):
        pytest.skip("needs Linux's /proc")
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    env.pop("OMP_WAIT_POLICY", None)
    done = subprocess.run([sys.executable, "-c", _IDLE_SCRIPT], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    idle_ns = int(done.stdout.split("idle cpu ns")[1])
    assert idle_ns < 2_000_000, f"{idle_ns / 1e6:.1f} ms of CPU in 100 ms idle"


def test_forked_child_starts_its_own_threads(gen):
    """A child forked after the pool started (a DataLoader worker) gets threads of its own
    instead of waiting forever on the parent's."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    script = textwrap.dedent(
        """
        import os, torch
        from lovasz_kernels import _numba_core as core, lovasz_softmax
        probas = torch.rand(1, 3, 300, 300).softmax(dim=1)
        labels = torch.randint(0, 3, (1, 300, 300))
        core.thread_count = lambda: 2
        expected = lovasz_softmax(probas, labels, backend="numba")
        pid = os.fork()
        if pid == 0:
            torch.set_num_threads(1)  # as DataLoader workers do: torch's own pool hangs here
            ok = torch.equal(lovasz_softmax(probas, labels, backend="numba"), expected)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert "child 0" in done.stdout, done.stdout + done.stderr


# --------------------------------------------------------------------------------------------
# several Python threads under every threading layer (fixed per process: one subprocess each)


def _threading_layers() -> list:
    layers = ["omp", "workqueue"]
    try:
        from numba.np.ufunc import tbbpool  # noqa: F401
    except ImportError:
        pass
    else:
        layers.append("tbb")
    return layers


_CONCURRENT_SCRIPT = textwrap.dedent(
    """
    from concurrent.futures import ThreadPoolExecutor
    import numba, torch
    from lovasz_kernels import lovasz_hinge, lovasz_softmax
    from lovasz_kernels.optim import prox_lovasz_hinge

    gen = torch.Generator().manual_seed(0)
    jobs = []
    for k in range(4):
        probas = torch.randn(2, 5, 200, 180, generator=gen).softmax(dim=1)
        labels = torch.randint(0, 5, (2, 200, 180), generator=gen)
        logits = torch.randn(1, 300, 300, generator=gen)
        binary = torch.randint(0, 2, (1, 300, 300), generator=gen)
        jobs.append(("softmax", probas, labels))  # over segments
        jobs.append(("hinge", logits, binary))  # one segment split over threads
        jobs.append(("prox", logits, binary))  # one large row, steps split

    def run(job):
        kind, scores, labels = job
        if kind == "prox":
            return (prox_lovasz_hinge(scores, labels, 0.5),)
        scores = scores.clone().requires_grad_()
        loss_fn = lovasz_softmax if kind == "softmax" else lovasz_hinge
        loss = loss_fn(scores, labels, backend="numba")
        loss.backward()
        return loss.detach(), scores.grad

    sequential = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            for got, expected in zip(pool.map(run, jobs), sequential):
                assert all(torch.equal(a, b) for a, b in zip(got, expected))
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region was ever launched through numba
        layer = "never started"
    print("ok", layer)
    """
)


@pytest.mark.parametrize("layer", _threading_layers())
def test_losses_and_prox_from_four_threads_under_each_threading_layer(layer):
    """Four Python threads calling the losses and the prox at once give the sequential
    results, whatever NUMBA_THREADING_LAYER says (the workqueue layer aborts the process when
    two threads launch numba parallel regions at once: the kernels launch none)."""
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer, NUMBA_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", _CONCURRENT_SCRIPT], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "ok never started" in done.stdout, done.stdout


# --------------------------------------------------------------------------------------------
# the compile notice

_NOTICE_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from lovasz_kernels import _numba_core as core
    core.insertion_sort(np.array([3, 1, 2], dtype=np.uint64), 0, 3)
    print("done")
    """
)


def test_first_compile_says_so_once_and_a_cached_run_says_nothing(tmp_path):
    """In a fresh numba cache the first kernel prints the notice (once); a second process
    loads the kernel from the cache silently."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    runs = [subprocess.run([sys.executable, "-c", _NOTICE_SCRIPT], capture_output=True,
                           text=True, timeout=300, env=env) for _ in range(2)]
    notice = core.COMPILE_NOTICE.split("(")[0].strip()
    first, second = runs
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stderr.count(notice) == 1, first.stderr
    assert notice not in second.stderr, second.stderr
