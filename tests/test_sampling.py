"""EquiBatchSampler: the sliding-window class guarantee, determinism, DataLoader use."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lovasz_kernels import EquiBatchSampler


def random_dataset(rng: random.Random, num_classes: int, num_samples: int) -> list[list[int]]:
    """Skewed class frequencies: some classes in most samples, some in one, some in none."""
    frequency = [rng.choice([0.0, 0.0, 0.02, 0.1, 0.5, 0.9]) for _ in range(num_classes)]
    dataset = []
    for _ in range(num_samples):
        dataset.append([c for c in range(num_classes) if rng.random() < frequency[c]])
    if not any(dataset):
        dataset[rng.randrange(num_samples)].append(rng.randrange(num_classes))
    return dataset


def check_windows(indices: list[int], dataset: list[list[int]], window: int) -> None:
    occurring = {c for classes in dataset for c in classes}
    for start in range(len(indices) - window + 1):
        seen = set().union(*(dataset[i] for i in indices[start:start + window]))
        missing = occurring - seen
        assert not missing, (
            f"window [{start}, {start + window}) of {len(indices)} misses classes {missing}"
        )


@pytest.mark.parametrize("trial", range(40))
def test_every_sliding_window_holds_every_occurring_class(trial):
    rng = random.Random(trial)
    num_classes = rng.randint(1, 12)
    dataset = random_dataset(rng, num_classes, rng.randint(1, 60))
    num_samples = rng.choice([None, rng.randint(1, 200)])
    sampler = EquiBatchSampler(dataset, num_classes, seed=trial, num_samples=num_samples)
    occurring = {c for classes in dataset for c in classes}
    assert sampler.classes == sorted(occurring)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert len(indices) == len(sampler) == (num_samples or len(dataset))
        assert all(dataset[i] for i in indices), "a sample without classes was yielded"
        # the strongest form: windows of K = number of occurring classes, sliding
        check_windows(indices, dataset, len(occurring))
        check_windows(indices, dataset, num_classes)


def test_window_of_k_is_tight():
    """Windows shorter than K can miss a class: the guarantee cannot be tightened."""
    dataset = [[0], [1], [2], [3]]  # each sample holds one class
    indices = list(EquiBatchSampler(dataset, 4, num_samples=40))
    windows_of_3 = [set(indices[i:i + 3]) for i in range(len(indices) - 2)]
    assert all(len(w) == 3 for w in windows_of_3)  # 3 of the 4 classes, never all
    check_windows(indices, dataset, 4)


def test_samples_within_a_class_are_used_evenly():
    dataset = [[0]] * 10 + [[1]] * 3
    indices = list(EquiBatchSampler(dataset, 2, num_samples=60))
    counts = torch.bincount(torch.tensor(indices), minlength=13)
    assert counts[:10].tolist() == [3] * 10  # class 0 targeted 30 times over 10 samples
    assert counts[10:].tolist() == [10] * 3


def test_deterministic_per_seed_and_epoch():
    dataset = random_dataset(random.Random(7), 6, 50)
    first = list(EquiBatchSampler(dataset, 6, seed=3))
    assert first == list(EquiBatchSampler(dataset, 6, seed=3))
    assert first != list(EquiBatchSampler(dataset, 6, seed=4))
    sampler = EquiBatchSampler(dataset, 6, seed=3)
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and second == list(sampler)  # same epoch, same order
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_a_default_device_elsewhere_changes_nothing():
    """Built and iterated under another default device (``torch.set_default_device`` or a
    ``torch.device`` context, as large-model code sets), the sampler's tensors stay on the
    host and the order is the same."""
    dataset = random_dataset(random.Random(7), 6, 50)
    expected = list(EquiBatchSampler(dataset, 6, seed=3))
    with torch.device("meta"):
        sampler = EquiBatchSampler(dataset, 6, seed=3)
        assert list(sampler) == expected


def test_with_dataloader_every_batch_sees_every_class():
    num_classes, dataset = 5, random_dataset(random.Random(3), 5, 80)
    occurring = {c for classes in dataset for c in classes}
    data = TensorDataset(torch.arange(len(dataset)))
    sampler = EquiBatchSampler(dataset, num_classes, seed=1)
    for batch_size in (len(occurring), 8):
        loader = DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=True)
        batches = [batch[0].tolist() for batch in loader]
        assert len(batches) == len(dataset) // batch_size
        for batch in batches:
            assert set().union(*(dataset[i] for i in batch)) == occurring
    # smaller batches: every ceil(K / B) consecutive batches
    batch_size = 2
    per_group = math.ceil(len(occurring) / batch_size)
    batches = [b[0].tolist() for b in DataLoader(data, batch_size=batch_size, sampler=sampler)]
    for start in range(len(batches) - per_group + 1):
        group = [i for b in batches[start:start + per_group] for i in b]
        if len(group) == per_group * batch_size:
            assert set().union(*(dataset[i] for i in group)) == occurring


def replica_sequences(dataset, num_classes, replicas, **kwargs) -> list[list[int]]:
    return [list(EquiBatchSampler(dataset, num_classes, num_replicas=replicas, rank=rank,
                                  **kwargs)) for rank in range(replicas)]


def test_one_replica_is_the_single_process_sequence():
    dataset = random_dataset(random.Random(11), 7, 40)
    single = EquiBatchSampler(dataset, 7, seed=5)
    assert (single.num_replicas, single.rank) == (1, 0)  # torch.distributed not initialized
    assert list(single) == list(EquiBatchSampler(dataset, 7, seed=5, num_replicas=1, rank=0))


@pytest.mark.parametrize("trial", range(30))
def test_replicas_keep_the_guarantee_locally_and_for_the_global_batch(trial):
    rng = random.Random(100 + trial)
    num_classes = rng.randint(1, 12)
    dataset = random_dataset(rng, num_classes, rng.randint(1, 60))
    occurring = {c for classes in dataset for c in classes}
    replicas = rng.randint(2, 5)
    num_samples = rng.randint(1, 150)
    sequences = replica_sequences(dataset, num_classes, replicas, seed=trial,
                                  num_samples=num_samples)
    per_replica = math.ceil(num_samples / replicas)
    for rank, indices in enumerate(sequences):
        assert len(indices) == per_replica
        assert len(EquiBatchSampler(dataset, num_classes, num_samples=num_samples,
                                    num_replicas=replicas, rank=rank)) == per_replica
        assert all(dataset[i] for i in indices), "a sample without classes was yielded"
        check_windows(indices, dataset, len(occurring))  # a loss on each rank's own batch
    # a loss over the global batch: the R batches of one step together, B >= ceil(K / R)
    batch = math.ceil(len(occurring) / replicas)
    for start in range(0, per_replica - batch + 1, batch):
        together = set().union(*(dataset[i] for indices in sequences
                                 for i in indices[start:start + batch]))
        assert together == occurring, f"the global batch at {start} misses {occurring - together}"


def test_replicas_share_the_class_queues():
    """No two ranks take the same sample of a class before its list is used up, and every
    rank walks every class, unlike strided slices of one sequence (4 classes, 2 ranks)."""
    dataset = [[c] for c in range(4) for _ in range(6)]  # 6 samples of each of 4 classes
    sequences = replica_sequences(dataset, 4, 2, seed=2)
    assert [len(s) for s in sequences] == [12, 12]
    together = sequences[0] + sequences[1]
    assert sorted(together) == list(range(24))  # 24 draws, 6 per class: each sample once
    for indices in sequences:
        assert {dataset[i][0] for i in indices} == {0, 1, 2, 3}
    # the same epoch and seed on every rank are what keep them disjoint
    other_seed = EquiBatchSampler(dataset, 4, seed=3, num_replicas=2, rank=1)
    assert list(other_seed) != sequences[1]


def test_replica_arguments_are_checked():
    with pytest.raises(ValueError, match=r"rank must be in \[0, num_replicas\) = \[0, 2\); got 2"):
        EquiBatchSampler([[0]], 1, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, num_replicas\) = \[0, 1\); got 1"):
        EquiBatchSampler([[0]], 1, rank=1)  # no process group: one replica
    with pytest.raises(ValueError, match="num_replicas must be >= 1; got 0"):
        EquiBatchSampler([[0]], 1, num_replicas=0)
    with pytest.raises(ValueError, match="rank must be >= 0; got -1"):
        EquiBatchSampler([[0]], 1, num_replicas=2, rank=-1)
    with pytest.raises(TypeError, match="num_replicas must be an int"):
        EquiBatchSampler([[0]], 1, num_replicas=2.0)
    sampler = EquiBatchSampler([[0], [0]], 1, num_replicas=np.int64(2), rank=np.int32(1))
    assert (sampler.num_replicas, sampler.rank, len(sampler)) == (2, 1, 1)
    assert "num_replicas=2, rank=1" in repr(sampler)


def test_accepts_tensors_and_sets():
    labels = torch.tensor([[0, 0, 255], [0, 2, 2], [1, 0, 0]])
    per_sample = [row[row != 255].unique() for row in labels]
    sampler = EquiBatchSampler(per_sample, 3)
    assert sampler.classes == [0, 1, 2]
    assert EquiBatchSampler([{0, 1}, (1,), range(2)], 2).classes == [0, 1]
    assert "classes_present=3" in repr(sampler)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="num_classes must be >= 1; got 0"):
        EquiBatchSampler([[0]], 0)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        EquiBatchSampler([[0]], 2.0)
    with pytest.raises(ValueError, match=r"classes_per_sample\[1\] must hold classes in \[0, 2\)"):
        EquiBatchSampler([[0], [2]], 2)
    with pytest.raises(TypeError, match=r"classes_per_sample\[0\] must hold ints"):
        EquiBatchSampler([[0.5]], 2)
    with pytest.raises(TypeError, match=r"classes_per_sample\[0\] must hold integer"):
        EquiBatchSampler([torch.tensor([0.0])], 2)
    with pytest.raises(TypeError, match=r"classes_per_sample\[0\] must be an iterable"):
        EquiBatchSampler([3], 4)
    with pytest.raises(TypeError, match="classes_per_sample must be a sequence"):
        EquiBatchSampler(torch.zeros(3, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="at least one sample a class"):
        EquiBatchSampler([[], []], 2)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        EquiBatchSampler([[0]], 1, num_samples=0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        EquiBatchSampler([[0]], 1, seed=-1)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        EquiBatchSampler([[0]], 1).set_epoch(-1)
