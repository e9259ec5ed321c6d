"""IoU metrics against a naive per-pixel count (Python loops over flat lists)."""

from __future__ import annotations

import math

import pytest
import torch

from lovasz_kernels import (
    ConfusionMatrix,
    batch_miou,
    confusion_matrix,
    dataset_miou,
    image_miou,
    per_class_iou,
    per_image_miou,
    set_validate_values,
)

# --------------------------------------------------------------------------------------------
# The naive oracle: one pass over the pixels, sets of positions, Python floats


def naive_iou(pred: list[int], labels: list[int], num_classes: int, ignore) -> list[float]:
    iou = []
    for c in range(num_classes):
        in_pred = {i for i in range(len(labels)) if labels[i] != ignore and pred[i] == c}
        in_true = {i for i in range(len(labels)) if labels[i] != ignore and labels[i] == c}
        union = in_pred | in_true
        iou.append(len(in_pred & in_true) / len(union) if union else math.nan)
    return iou


def naive_mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def naive_image_miou(pred: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore):
    per_image = [
        naive_mean(naive_iou(p.flatten().tolist(), y.flatten().tolist(), num_classes, ignore))
        for p, y in zip(pred, labels)
    ]
    return naive_mean(per_image), per_image


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


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("num_classes,ignore", [(1, None), (3, None), (5, 255), (7, -1)])
def test_against_naive_count(shape, num_classes, ignore, gen):
    for trial in range(3):
        pred, labels = random_maps(shape, num_classes, gen, ignore)
        flat_pred, flat_labels = pred.flatten().tolist(), labels.flatten().tolist()
        expected = naive_iou(flat_pred, flat_labels, num_classes, ignore)
        what = f"shape {shape}, C={num_classes}, ignore={ignore}, trial {trial}"
        assert_same(per_class_iou(pred, labels, num_classes, ignore_index=ignore), expected, what)
        assert_same(batch_miou(pred, labels, num_classes, ignore), naive_mean(expected), what)
        assert_same(dataset_miou(pred, labels, num_classes, ignore), naive_mean(expected), what)
        image_mean, per_image = naive_image_miou(pred, labels, num_classes, ignore)
        assert_same(image_miou(pred, labels, num_classes, ignore), image_mean, what)
        assert_same(per_image_miou(pred, labels, num_classes, ignore), per_image, what)


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
    if torch.cuda.is_available():  # counts stay where they started; updates are moved there
        pred, labels = random_maps((2, 4), 3, gen)
        cm.update(pred.cuda(), labels.cuda())
        assert cm.matrix.device.type == "cpu"
        gpu = ConfusionMatrix(3).update(pred.cuda(), labels.cuda())
        assert gpu.matrix.device.type == "cuda" and gpu.miou().device.type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(gen):
    pred, labels = random_maps((4, 33, 17), 6, gen, ignore=255)
    for fn in (per_class_iou, batch_miou, image_miou, per_image_miou):
        on_gpu = fn(pred.cuda(), labels.cuda(), 6, 255)
        assert on_gpu.device.type == "cuda"
        assert_same(on_gpu.cpu(), fn(pred, labels, 6, 255).tolist(), fn.__name__)


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
