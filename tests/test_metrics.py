"""IoU metrics against a naive per-pixel count (Python loops over flat lists)."""

from __future__ import annotations

import datetime
import json
import math
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lovasz_kernels import (
    ConfusionMatrix,
    batch_miou,
    confusion_matrix,
    dataset_miou,
    image_miou,
    metrics,
    per_class_iou,
    per_image_iou,
    per_image_miou,
    set_validate_values,
)

# --------------------------------------------------------------------------------------------
# The naive oracle: one pass over the pixels, sets of positions, Python floats


def naive_iou(
    pred: list[int], labels: list[int], num_classes: int, ignore, zero_division=math.nan
) -> list[float]:
    iou = []
    for c in range(num_classes):
        if c == ignore:  # an ignored class has no IoU
            iou.append(math.nan)
            continue
        in_pred = {i for i in range(len(labels)) if labels[i] != ignore and pred[i] == c}
        in_true = {i for i in range(len(labels)) if labels[i] != ignore and labels[i] == c}
        union = in_pred | in_true
        iou.append(len(in_pred & in_true) / len(union) if union else zero_division)
    return iou


def naive_mean(values: list[float], any_pixel: bool = True) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept and any_pixel else math.nan


def naive_image_iou(pred, labels, num_classes, ignore, zero_division=math.nan):
    """(per image IoU lists, per image means, their mean)."""
    ious, means = [], []
    for p, y in zip(pred, labels):
        flat_pred, flat_labels = p.flatten().tolist(), y.flatten().tolist()
        ious.append(naive_iou(flat_pred, flat_labels, num_classes, ignore, zero_division))
        any_pixel = any(label != ignore for label in flat_labels)
        means.append(naive_mean(ious[-1], any_pixel))
    return ious, means, naive_mean(means)


def assert_same(actual: torch.Tensor, expected, what: str) -> None:
    expected = torch.tensor(expected, dtype=torch.float64)
    assert actual.dtype == torch.float64, what
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), (
        f"{what}: NaN pattern differs: {actual} vs {expected}"
    )
    torch.testing.assert_close(
        torch.nan_to_num(actual), torch.nan_to_num(expected), rtol=1e-12, atol=1e-12, msg=what
    )


def random_maps(shape, num_classes, gen, ignore=None, ignore_rate=0.2, dtype=torch.int64):
    labels = torch.randint(0, num_classes, shape, generator=gen)
    # predictions right most of the time, so IoUs are spread over (0, 1)
    noise = torch.randint(0, num_classes, shape, generator=gen)
    pred = torch.where(torch.rand(shape, generator=gen) < 0.6, labels, noise)
    if ignore is not None:
        labels = torch.where(torch.rand(shape, generator=gen) < ignore_rate, ignore, labels)
    return pred.to(dtype), labels.to(dtype)


SHAPES = [(1, 1), (2, 5, 7), (3, 4, 5, 6), (4, 17), (2, 1, 1, 1, 3)]
# (C, ignore_index): none, outside [0, C) above and below, and naming a class
CLASS_CASES = [(1, None), (3, None), (5, 255), (7, -1), (5, 2), (4, 0)]


def check_against_naive_count(pred, labels, num_classes, ignore, zero_division, what):
    flat_pred, flat_labels = pred.flatten().tolist(), labels.flatten().tolist()
    expected = naive_iou(flat_pred, flat_labels, num_classes, ignore, zero_division)
    any_pixel = any(label != ignore for label in flat_labels)
    options = {"ignore_index": ignore, "zero_division": zero_division}
    assert_same(per_class_iou(pred, labels, num_classes, **options), expected, what)
    expected_mean = naive_mean(expected, any_pixel)
    assert_same(batch_miou(pred, labels, num_classes, **options), expected_mean, what)
    assert_same(dataset_miou(pred, labels, num_classes, **options), expected_mean, what)
    ious, means, mean_of_means = naive_image_iou(pred, labels, num_classes, ignore,
                                                 zero_division)
    assert_same(per_image_iou(pred, labels, num_classes, **options), ious, what)
    assert_same(per_image_miou(pred, labels, num_classes, **options), means, what)
    assert_same(image_miou(pred, labels, num_classes, **options), mean_of_means, what)
    cm = ConfusionMatrix(num_classes, **options).update(pred, labels)
    assert_same(cm.iou(), expected, what)
    assert_same(cm.miou(), expected_mean, what)
    assert_same(cm.image_miou(), mean_of_means, what)


@pytest.mark.parametrize("zero_division", [math.nan, 0.0, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("num_classes,ignore", CLASS_CASES)
def test_against_naive_count(shape, num_classes, ignore, zero_division, gen):
    for trial in range(3):
        pred, labels = random_maps(shape, num_classes, gen, ignore)
        what = (f"shape {shape}, C={num_classes}, ignore={ignore}, "
                f"zero_division={zero_division}, trial {trial}")
        check_against_naive_count(pred, labels, num_classes, ignore, zero_division, what)


@pytest.mark.parametrize("pairs_fit", [True, False], ids=["CxC-bins", "per-class-bins"])
@pytest.mark.parametrize("num_classes,ignore", [(3, None), (6, 255), (6, 1)])
def test_both_counting_routes(pairs_fit, num_classes, ignore, gen, monkeypatch):
    """Counting in C x C bins and in per-class bins give the same results, whichever the size
    rule would pick for these inputs."""
    monkeypatch.setattr(metrics, "_pairs_fit", lambda *args: pairs_fit)
    for shape in [(3, 9, 11), (2, 1), (5, 2, 3, 4)]:
        pred, labels = random_maps(shape, num_classes, gen, ignore)
        check_against_naive_count(pred, labels, num_classes, ignore, math.nan, f"{shape}")
        cm = ConfusionMatrix(num_classes, ignore_index=ignore).update(pred, labels)
        expected = [[0] * num_classes for _ in range(num_classes)]
        for p, y in zip(pred.flatten().tolist(), labels.flatten().tolist()):
            if y != ignore:
                expected[y][p] += 1
        assert cm.matrix.tolist() == expected, f"{shape}"


def test_ignore_index_naming_a_class_leaves_every_mean():
    # class 1 is ignored: its pixel (label 1) is dropped, and the pixel of class 0 predicted 1
    # is a miss for class 0, not a false positive of a class with IoU 0 in the mean
    pred = torch.tensor([[0, 1, 1, 2]])
    labels = torch.tensor([[0, 0, 1, 2]])
    expected = [1 / 2, math.nan, 1.0]
    assert_same(per_class_iou(pred, labels, 3, ignore_index=1), expected, "iou")
    for zero_division in (math.nan, 0.0, 1.0):  # no option brings the class back
        assert_same(per_class_iou(pred, labels, 3, 1, zero_division=zero_division), expected,
                    f"zero_division={zero_division}")
        assert_same(batch_miou(pred, labels, 3, 1, zero_division=zero_division), 3 / 4, "mean")
    assert_same(image_miou(pred, labels, 3, ignore_index=1), 3 / 4, "image")
    cm = ConfusionMatrix(3, ignore_index=1).update(pred, labels)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]
    assert_same(cm.iou(), expected, "streaming")
    assert_same(cm.miou(), 3 / 4, "streaming mean")


def test_zero_division_fills_absent_classes():
    pred = torch.tensor([[0, 1], [1, 1]])
    labels = torch.tensor([[0, 1], [0, 1]])
    assert_same(per_class_iou(pred, labels, 3, zero_division=1.0), [1 / 2, 2 / 3, 1.0], "1")
    assert_same(batch_miou(pred, labels, 3, zero_division=1.0), (1 / 2 + 2 / 3 + 1) / 3, "1")
    assert_same(batch_miou(pred, labels, 3, zero_division=0), (1 / 2 + 2 / 3) / 3, "int 0")
    assert_same(per_image_iou(pred, labels, 3, zero_division=0.0),
                [[1.0, 1.0, 0.0], [0.0, 0.5, 0.0]], "per image")
    # nothing counted: no mean, whatever an absent class would score
    ignored = torch.full_like(labels, 255)
    assert_same(per_class_iou(pred, ignored, 3, 255, zero_division=1.0), [1.0] * 3, "all ign")
    for fn in (batch_miou, image_miou, dataset_miou):
        assert torch.isnan(fn(pred, ignored, 3, 255, zero_division=1.0)), fn.__name__
    labels[1] = 255
    assert_same(per_image_miou(pred, labels, 3, 255, zero_division=1.0),
                [(1 + 1 + 1) / 3, math.nan], "image without counted pixel")


def test_labels_compared_in_int64_not_their_dtype():
    # uint8 labels: ignore_index=256 matches no pixel (it would wrap to class 0 in uint8), so
    # a bad prediction at a class-0 pixel is caught, and C = 300 holds a label of 50
    labels = torch.tensor([[0, 1, 2]], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"pred must be in \[0, 3\) at non-ignored .*-1"):
        per_class_iou(torch.tensor([[-1, 1, 2]]), labels, 3, ignore_index=256)
    assert_same(per_class_iou(labels, labels, 3, ignore_index=256), [1.0] * 3, "uint8")
    labels[0, 0] = 50
    iou = per_class_iou(labels, labels, 300)
    assert iou[50] == 1.0 and int((~torch.isnan(iou)).sum()) == 3


def test_confusion_matrix_against_naive_count(gen):
    pred, labels = random_maps((3, 9, 11), 6, gen, ignore=255)
    expected = [[0] * 6 for _ in range(6)]
    for p, y in zip(pred.flatten().tolist(), labels.flatten().tolist()):
        if y != 255:
            expected[y][p] += 1
    assert confusion_matrix(pred, labels, 6, ignore_index=255).tolist() == expected


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_integer_dtypes(dtype, gen):
    pred, labels = random_maps((2, 6, 6), 4, gen)
    expected = per_class_iou(pred, labels, 4)
    assert_same(per_class_iou(pred.to(dtype), labels.to(dtype), 4), expected.tolist(), str(dtype))


def test_bool_maps_are_binary_labels():
    pred = torch.tensor([[True, False], [True, True]])
    labels = torch.tensor([[True, True], [False, True]])
    assert_same(per_class_iou(pred, labels, 2), [0.0, 2 / 4], "bool")


def test_handcomputed_values():
    pred = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]])
    labels = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 255]])
    # class 0: tp 1 (img0) ; pred0 = 2 px, true0 = 2 px (one in each image) -> 1 / 3
    # class 1: tp 2, pred 2, true 3 -> 2 / 3 ; class 2: tp 2, pred 3 (ignored px dropped), true 2
    assert_same(per_class_iou(pred, labels, 4, ignore_index=255),
                [1 / 3, 2 / 3, 2 / 3, math.nan], "hand")
    # image 0: class 0: 1/2, class 1: 2/3 ; image 1: class 0: 0/1, class 2: 2/3
    assert_same(per_image_miou(pred, labels, 4, ignore_index=255),
                [(1 / 2 + 2 / 3) / 2, (0 + 2 / 3) / 2], "hand per image")


def test_absent_everywhere_and_all_ignored():
    pred = torch.zeros(2, 3, dtype=torch.long)
    labels = torch.full((2, 3), 255)
    assert torch.isnan(per_class_iou(pred, labels, 3, ignore_index=255)).all()
    assert torch.isnan(batch_miou(pred, labels, 3, ignore_index=255))
    assert torch.isnan(image_miou(pred, labels, 3, ignore_index=255))
    labels[1] = 0  # image 0 fully ignored: left out of the image mean
    assert_same(per_image_miou(pred, labels, 3, ignore_index=255), [math.nan, 1.0], "ignored")
    assert_same(image_miou(pred, labels, 3, ignore_index=255), 1.0, "ignored")


def test_empty_inputs():
    empty = torch.zeros(0, 4, dtype=torch.long)
    assert torch.isnan(per_class_iou(empty, empty, 2)).all()
    assert torch.isnan(image_miou(empty, empty, 2))
    assert ConfusionMatrix(2).update(empty, empty).matrix.sum() == 0


@pytest.mark.parametrize("zero_division", [math.nan, 0.0, 1.0])
def test_dataset_miou_of_no_label_map_is_nan(zero_division):
    """No pixel counted: NaN, whatever ``zero_division`` fills in for a class."""
    assert torch.isnan(dataset_miou([], [], num_classes=3, zero_division=zero_division))


def test_dataset_miou_over_ragged_list_equals_concatenation(gen):
    preds, labels = [], []
    for size in [(1, 5, 7), (2, 3, 3), (1, 11, 2)]:
        p, y = random_maps(size, 4, gen, ignore=255)
        preds.append(p)
        labels.append(y)
    flat_pred = torch.cat([p.flatten() for p in preds])
    flat_labels = torch.cat([y.flatten() for y in labels])
    expected = naive_mean(naive_iou(flat_pred.tolist(), flat_labels.tolist(), 4, 255))
    assert_same(dataset_miou(preds, labels, 4, ignore_index=255), expected, "ragged")
    assert_same(dataset_miou(iter(preds), iter(labels), 4, 255), expected, "iterators")
    with pytest.raises(ValueError, match="same number"):
        dataset_miou(preds, labels[:2], 4, 255)


def test_streaming_matches_one_shot(gen):
    pred, labels = random_maps((6, 8, 9), 5, gen, ignore=255)
    cm = ConfusionMatrix(5, ignore_index=255)
    for start in range(0, 6, 2):
        assert cm.update(pred[start:start + 2], labels[start:start + 2]) is cm
    assert cm.num_updates == 3
    assert torch.equal(cm.matrix, confusion_matrix(pred, labels, 5, ignore_index=255))
    assert_same(cm.iou(), per_class_iou(pred, labels, 5, 255).tolist(), "iou")
    assert_same(cm.miou(), float(dataset_miou(pred, labels, 5, 255)), "miou")
    assert_same(cm.compute(), float(cm.miou()), "compute")
    assert_same(cm.image_miou(), float(image_miou(pred, labels, 5, 255)), "image")
    assert "updates=3" in repr(cm)
    cm.reset()
    assert cm.matrix.sum() == 0 and cm.num_updates == 0
    assert torch.isnan(cm.miou()) and torch.isnan(cm.image_miou())


def test_streaming_device_handling(gen):
    cm = ConfusionMatrix(3, device="cpu")
    assert cm.matrix.device.type == "cpu"
    cm.update(*random_maps((2, 4), 3, gen))
    assert cm.to("cpu") is cm
    # counts stay where they are: an update elsewhere says where they are expected, before
    # any value check reads the inputs
    pred, labels = random_maps((2, 4), 3, gen)
    kept = r"must be on cpu, where the counts are kept \(this ConfusionMatrix's.*got meta"
    with pytest.raises(ValueError, match=kept):
        cm.update(pred.to("meta"), labels.to("meta"))
    assert cm.num_updates == 1
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="must be on cpu"):
            cm.update(pred.cuda(), labels.cuda())
        gpu = ConfusionMatrix(3).update(pred.cuda(), labels.cuda())
        assert gpu.matrix.device.type == "cuda" and gpu.miou().device.type == "cuda"
        assert ConfusionMatrix(3, device="cuda").matrix.device == torch.device("cuda", 0)
        gpu.to("cpu").update(pred, labels)
        assert gpu.num_updates == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(gen):
    pred, labels = random_maps((4, 33, 17), 6, gen, ignore=255)
    for fn in (per_class_iou, batch_miou, image_miou, per_image_miou, per_image_iou):
        for zero_division in (math.nan, 1.0):
            on_gpu = fn(pred.cuda(), labels.cuda(), 6, 255, zero_division=zero_division)
            assert on_gpu.device.type == "cuda"
            expected = fn(pred, labels, 6, 255, zero_division=zero_division)
            assert_same(on_gpu.cpu(), expected.tolist(), fn.__name__)
    cm = ConfusionMatrix(6, ignore_index=255, device="cuda").update(pred.cuda(), labels.cuda())
    assert torch.equal(cm.matrix.cpu(), confusion_matrix(pred, labels, 6, 255))


def test_num_classes_far_above_the_pixel_count():
    """IoU needs per-class counts only: 2^20 classes on 4 pixels take O(C) memory, not the
    8 TiB of a C x C matrix; the functions that return that matrix refuse to build it."""
    pred = torch.tensor([[0, 1], [1, 1]])
    labels = torch.tensor([[0, 1], [0, 1]])
    num_classes = 2**20
    iou = per_class_iou(pred, labels, num_classes)
    assert iou.shape == (num_classes,)
    assert_same(iou[:2], [1 / 2, 2 / 3], "present classes")
    assert bool(torch.isnan(iou[2:]).all())
    assert_same(batch_miou(pred, labels, num_classes), (1 / 2 + 2 / 3) / 2, "batch")
    assert_same(dataset_miou([pred], [labels], num_classes), (1 / 2 + 2 / 3) / 2, "dataset")
    assert_same(image_miou(pred, labels, num_classes), (1 + 1 / 4) / 2, "image")
    assert per_image_iou(pred, labels, num_classes).shape == (2, num_classes)
    with pytest.raises(ValueError, match=r"num_classes=1048576 needs a C x C .* 8.19e\+03 GiB"):
        confusion_matrix(pred, labels, num_classes)
    with pytest.raises(ValueError, match="num_classes=1048576 .*per_class_iou"):
        ConfusionMatrix(num_classes)
    ConfusionMatrix(2**14)  # the largest accepted: a 2 GiB matrix


def test_num_classes_whose_counts_would_exhaust_memory_is_refused():
    """A num_classes whose per-class counts pass 2^28 entries (a wrong num_classes: 10^9 took
    24 GiB and the process was killed) raises, naming it."""
    pred = torch.tensor([[0, 1], [1, 1]])
    labels = torch.tensor([[0, 1], [0, 1]])
    for fn in (per_class_iou, batch_miou, image_miou, per_image_miou, per_image_iou):
        with pytest.raises(ValueError, match=r"num_classes=1000000000 needs per-class counts"):
            fn(pred, labels, 10**9)
    with pytest.raises(ValueError, match=r"num_classes=1000000000 needs per-class counts"):
        dataset_miou([pred], [labels], 10**9)
    largest_per_image = 2**28 // (2 * 3)
    with pytest.raises(ValueError, match=r"needs per-class counts of 2 images x 3 x C"):
        per_image_miou(pred, labels, largest_per_image + 1)
    from lovasz_kernels.metrics import _check_count_size

    _check_count_size(largest_per_image, 2)  # the largest accepted (not run: 7 GB at its peak)


def test_counting_needs_no_host_sync(gen, monkeypatch):
    """With value checks off, nothing reads a tensor's value on the host: every count and
    mean stays on the device (the calls below would raise otherwise)."""
    pred, labels = random_maps((3, 5, 6), 4, gen, ignore=1)

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    set_validate_values(False)
    try:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__",
                     "nonzero"):
            monkeypatch.setattr(torch.Tensor, name, refuse)
        for zero_division in (math.nan, 0.0):
            options = {"ignore_index": 1, "zero_division": zero_division}
            for fn in (per_class_iou, batch_miou, per_image_iou, per_image_miou, image_miou,
                       dataset_miou):
                fn(pred, labels, 4, **options)
            for pairs_fit in (True, False):
                monkeypatch.setattr(metrics, "_pairs_fit", lambda *args, fit=pairs_fit: fit)
                cm = ConfusionMatrix(4, **options).update(pred, labels)
                cm.iou(), cm.miou(), cm.image_miou()
        confusion_matrix(pred, labels, 4, 1)
    finally:
        monkeypatch.undo()
        set_validate_values(True)


# --------------------------------------------------------------------------------------------
# Distributed evaluation: ConfusionMatrix.all_reduce on a real 2-process gloo group

DDP_WORLD = 2
DDP_CLASSES = 5
# images per rank (unequal); the global batch is their concatenation
DDP_SIZES = [3, 2]


def _ddp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch: class 4 absent everywhere, class 3 only on rank 1, ignored pixels."""
    gen = torch.Generator().manual_seed(7)
    pred, labels = random_maps((sum(DDP_SIZES), 6, 5), DDP_CLASSES - 1, gen, ignore=255)
    labels[:DDP_SIZES[0]] = torch.where(labels[:DDP_SIZES[0]] == 3, 0, labels[:DDP_SIZES[0]])
    return pred, labels


def _ddp_results(cm: ConfusionMatrix) -> dict:
    """What a rank reads, with None for NaN (NaN != NaN would fail any comparison)."""
    def values(tensor):
        return [None if math.isnan(v) else v for v in tensor.flatten().tolist()]

    return {"matrix": cm.matrix.tolist(), "iou": values(cm.iou()), "miou": values(cm.miou()),
            "image_miou": values(cm.image_miou()), "num_updates": cm.num_updates}


def _ddp_cases(rank: int) -> dict:
    """Each case's result (or the error it raised) on this rank, as JSON."""
    out: dict = {}

    def record(name, fn):
        try:
            out[name] = fn()
        except Exception as exc:  # every rank reports; the parent compares
            out[name] = f"{type(exc).__name__}: {exc}"

    pred, labels = _ddp_batch()
    start = sum(DDP_SIZES[:rank])
    mine = slice(start, start + DDP_SIZES[rank])

    def summed():  # rank 0 adds its images one by one, rank 1 in one batch
        cm = ConfusionMatrix(DDP_CLASSES, ignore_index=255)
        chunks = [slice(i, i + 1) for i in range(mine.start, mine.stop)] if rank == 0 else [mine]
        for chunk in chunks:
            cm.update(pred[chunk], labels[chunk])
        assert cm.all_reduce() is cm
        results = _ddp_results(cm)
        for again in (lambda: cm.all_reduce(), lambda: cm.update(pred[mine], labels[mine])):
            try:
                again()
                results.setdefault("not refused", []).append(True)
            except RuntimeError as exc:
                results.setdefault("refused", []).append(str(exc))
        cm.reset()  # a fresh evaluation may reduce again
        results["after reset"] = _ddp_results(cm.update(pred[mine], labels[mine]).all_reduce())
        return results

    def one_rank_without_batches():  # rank 1 never updates; device= puts its zeros on the CPU
        cm = ConfusionMatrix(DDP_CLASSES, ignore_index=255, device="cpu")
        if rank == 0:
            cm.update(pred[mine], labels[mine])
        return _ddp_results(cm.all_reduce())

    def mismatched_settings():  # the same ValueError on every rank, not a crash in gloo
        cm = ConfusionMatrix(DDP_CLASSES + rank, ignore_index=255,
                             zero_division=0.0 if rank else math.nan)
        return _ddp_results(cm.update(pred[mine], labels[mine]).all_reduce())

    record("summed", summed)
    record("one_rank_without_batches", one_rank_without_batches)
    record("mismatched_settings", mismatched_settings)
    return out


def _ddp_worker(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=DDP_WORLD,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        results = _ddp_cases(rank)
    except Exception:
        results = {"crash": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    with open(f"{out_dir}/rank{rank}.json", "w") as handle:
        json.dump(results, handle)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed gloo")
    out_dir = tmp_path_factory.mktemp("metrics_ddp")
    mp.start_processes(_ddp_worker, args=(str(out_dir / "store"), str(out_dir)),
                       nprocs=DDP_WORLD, join=True, start_method="spawn")
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(DDP_WORLD)]


def test_all_reduce_sums_the_ranks(ddp_results):
    pred, labels = _ddp_batch()
    one_process = _ddp_results(ConfusionMatrix(DDP_CLASSES, ignore_index=255).update(pred, labels))
    for rank, results in enumerate(ddp_results):
        got = results["summed"]
        assert isinstance(got, dict), f"rank {rank}: {got}"
        refused = got.pop("refused", [])
        after_reset = got.pop("after reset")
        assert got == {**one_process, "num_updates": 4}, f"rank {rank}"
        assert len(refused) == 2 and "reset()" in refused[0], f"rank {rank}: {got}"
        assert after_reset == {**one_process, "num_updates": 2}, f"rank {rank}"


def test_all_reduce_with_a_rank_without_batches(ddp_results):
    pred, labels = _ddp_batch()
    first = slice(0, DDP_SIZES[0])
    expected = _ddp_results(
        ConfusionMatrix(DDP_CLASSES, ignore_index=255).update(pred[first], labels[first])
    )
    for rank, results in enumerate(ddp_results):
        assert results["one_rank_without_batches"] == expected, f"rank {rank}"


def test_all_reduce_rejects_mismatched_settings_on_every_rank(ddp_results):
    messages = [results["mismatched_settings"] for results in ddp_results]
    expected = ("ValueError: every rank must build its ConfusionMatrix with the same "
                "(num_classes, ignore_index, zero_division); got rank 0: (5, 255, 'nan'); "
                "rank 1: (6, 255, 0.0)")
    assert messages == [expected] * DDP_WORLD


# --------------------------------------------------------------------------------------------
# Bad input


def test_rejects_bad_input():
    ok = torch.zeros(2, 3, dtype=torch.long)
    shape_message = r"pred must have the shape of labels \(2, 3\); got \(3, 2\)"
    with pytest.raises(ValueError, match=shape_message):
        per_class_iou(ok.T, ok, 2)
    with pytest.raises(TypeError, match="pred must be an integer .* got torch.float32 .*argmax"):
        per_class_iou(ok.float(), ok, 2)
    with pytest.raises(TypeError, match="labels must be an integer"):
        image_miou(ok, ok.double(), 2)
    with pytest.raises(TypeError, match="pred must be a torch.Tensor; got list"):
        batch_miou([0, 1], ok, 2)
    with pytest.raises(ValueError, match="num_classes must be >= 1; got 0"):
        per_class_iou(ok, ok, 0)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        ConfusionMatrix(2.0)
    with pytest.raises(TypeError, match="ignore_index must be an int or None"):
        ConfusionMatrix(2, ignore_index="255")
    with pytest.raises(ValueError, match="shape"):
        image_miou(torch.tensor(0), torch.tensor(0), 2)
    with pytest.raises(ValueError, match="same device"):
        per_class_iou(ok, ok.to("meta"), 2)


def test_rejects_out_of_range_values():
    labels = torch.tensor([[0, 1, 255]])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\); got 1 out-of-range .*255"):
        per_class_iou(torch.zeros_like(labels), labels, 2)
    with pytest.raises(ValueError, match=r"pred must be in \[0, 2\) at non-ignored pixels; .*-1"):
        per_class_iou(torch.tensor([[0, -1, 0]]), labels, 2, ignore_index=255)
    # a prediction at an ignored pixel is not counted, whatever it is
    assert_same(per_class_iou(torch.tensor([[0, 1, 9]]), labels, 2, 255), [1.0, 1.0], "ign")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\) or ignore_index=255"):
        ConfusionMatrix(3, ignore_index=255).update(torch.tensor([[0]]), torch.tensor([[3]]))


def test_unchecked_out_of_range_values_are_dropped():
    set_validate_values(False)
    try:
        iou = per_class_iou(torch.tensor([0, 5, 1]), torch.tensor([0, 1, 7]), 2)
    finally:
        set_validate_values(True)
    assert_same(iou, [1.0, math.nan], "unchecked")


def test_rejects_bad_options():
    ok = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="device must name a device torch can use here .*'nope'"):
        ConfusionMatrix(4, device="nope")
    with pytest.raises(ValueError, match="device must name"):
        ConfusionMatrix(4).to("nope")
    with pytest.raises(TypeError, match="device must be a torch.device or a string .*; got int"):
        ConfusionMatrix(4, device=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device must name .*'cuda'"):
            ConfusionMatrix(4, device="cuda")
    for bad in (True, "0", None, torch.tensor(0.0)):
        with pytest.raises(TypeError, match="zero_division must be a float"):
            per_class_iou(ok, ok, 2, zero_division=bad)
    for bad in (2.0, -0.5, math.inf):
        message = f"zero_division must be nan or in \\[0, 1\\]; got {bad}"
        with pytest.raises(ValueError, match=message):
            batch_miou(ok, ok, 2, zero_division=bad)
    with pytest.raises(ValueError, match="zero_division"):
        ConfusionMatrix(2, zero_division=-1)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor; got list"):
        dataset_miou(ok, [ok], 2)
    with pytest.raises(ValueError, match="must be on cpu"):
        dataset_miou([ok, ok.to("meta")], [ok, ok.to("meta")], 2)
