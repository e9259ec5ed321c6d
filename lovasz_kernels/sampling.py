"""Class-cycling sampling of training images (paper §3.1, "equibatch").

The Lovász-Softmax with ``classes="present"`` and ``per_image=False`` optimizes the batch-mIoU,
which only approaches the dataset-mIoU when every class shows up in (nearly) every batch. The
paper does this for Pascal VOC by cycling over the classes when building batches.
:class:`EquiBatchSampler` is that sampler.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from lovasz_kernels import _validate

__all__ = ["EquiBatchSampler"]


def _check_int(name: str, value: object, minimum: int) -> int:
    number = _validate.as_int(value)
    if number is None:
        raise TypeError(f"{name} must be an int; got {value!r}")
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {number}")
    return number


def _classes_of(sample: int, classes: object, num_classes: int) -> list[int]:
    """The distinct classes of one sample, checked to be ints in [0, num_classes)."""
    if isinstance(classes, torch.Tensor):
        if classes.dtype.is_floating_point or classes.dtype.is_complex:
            raise TypeError(
                f"classes_per_sample[{sample}] must hold integer class indices; "
                f"got a {classes.dtype} tensor"
            )
        classes = classes.flatten().tolist()
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable):
        raise TypeError(
            f"classes_per_sample[{sample}] must be an iterable of class indices; got {classes!r}"
        )
    found = set()
    for given in classes:
        c = _validate.as_int(given)
        if c is None:
            raise TypeError(
                f"classes_per_sample[{sample}] must hold ints; got {given!r} in {classes!r}"
            )
        if not 0 <= c < num_classes:
            raise ValueError(
                f"classes_per_sample[{sample}] must hold classes in [0, {num_classes}); got {c}"
            )
        found.add(c)
    return sorted(found)


def _replica_of(num_replicas: object, rank: object) -> tuple[int, int]:
    """The replica count and this process's rank: as given, else from the default process
    group when ``torch.distributed`` is initialized (as ``DistributedSampler`` does), else one
    replica."""
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    count = _check_int("num_replicas", num_replicas, 1)
    index = _check_int("rank", rank, 0)
    if index >= count:
        raise ValueError(f"rank must be in [0, num_replicas) = [0, {count}); got {index}")
    return count, index


class EquiBatchSampler(Sampler[int]):
    """Sample indices that cycle over the classes, so every class keeps appearing.

    Each epoch draws a random order of the K classes that occur in the dataset and repeats it:
    position t of the epoch targets class ``order[t % K]`` and yields a sample that contains it.
    Each class walks through its own shuffled list of samples (reshuffled when used up), so
    within a class the samples are used evenly.

    **Guarantee.** Within one epoch, *every* run of K consecutive indices yielded (a sliding
    window, not only aligned ones; K = number of classes occurring in the dataset, K <=
    ``num_classes``) contains, for each occurring class, at least one sample with that class;
    hence so does every run of ``num_classes`` consecutive indices. With
    ``DataLoader(batch_size=B)`` every ``ceil(K / B)`` consecutive full batches see every class
    (every batch when B >= K). Classes that occur in no sample are ignored,
    and samples without any class are never yielded.

    **Distributed training.** With R replicas (``num_replicas``, by default the world size of
    an initialized ``torch.distributed``), each rank yields its own ``ceil(num_samples / R)``
    indices of one shared epoch: every rank computes the same draws, so the class queues are
    shared and no two ranks take the same sample of a class before its list is used up. Rank
    r walks the same class order from position ``r * ceil(K / R)``, so the guarantee above
    holds on every rank for its own indices (for a loss on each rank's batch), and the R
    batches of one step, each of size B >= ``ceil(K / R)``, together contain every class (for
    a loss over the global batch, ``process_group=``). Pass ``num_replicas=1, rank=0`` for the
    same sequence on every rank.

    Parameters
    ----------
    classes_per_sample
        ``classes_per_sample[i]``: the classes present in sample i (an iterable of ints or an
        integer tensor, e.g. ``labels[i].unique()`` without the ignore label).
    num_classes
        C: classes are in [0, C).
    seed
        Base seed; epoch e uses ``seed + e`` (like ``DistributedSampler``), so the sequence is
        the same on every run and changes with :meth:`set_epoch`.
    num_samples
        Indices per epoch over all replicas; default ``len(classes_per_sample)`` (an epoch as
        long as the dataset, though rare-class samples repeat and some frequent-class samples
        may be skipped). Each replica yields ``ceil(num_samples / num_replicas)``.
    num_replicas, rank
        R replicas and this one's index in [0, R); default: the world size and rank of the
        default process group when ``torch.distributed`` is initialized, else 1 and 0.

    Examples
    --------
    >>> from lovasz_kernels import EquiBatchSampler
    >>> sampler = EquiBatchSampler([[0], [0, 1], [0], [0, 2], [0]], num_classes=3, seed=0)
    >>> len(sampler)
    5
    >>> indices = list(sampler)
    >>> all({1, 3} & set(indices[i:i + 3]) == {1, 3} for i in range(len(indices) - 2))
    True
    """

    def __init__(
        self,
        classes_per_sample: Sequence[Iterable[int]] | Sequence[torch.Tensor],
        num_classes: int,
        seed: int = 0,
        num_samples: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.num_classes = _check_int("num_classes", num_classes, 1)
        self.seed = _check_int("seed", seed, 0)
        if isinstance(classes_per_sample, (str, bytes, torch.Tensor)) or not isinstance(
            classes_per_sample, Sequence
        ):
            raise TypeError(
                "classes_per_sample must be a sequence (one entry per sample) of class "
                f"iterables; got {type(classes_per_sample).__name__}"
            )
        total = len(classes_per_sample) if num_samples is None else _check_int(
            "num_samples", num_samples, 1
        )
        self.num_replicas, self.rank = _replica_of(num_replicas, rank)
        # indices this replica yields per epoch, and all replicas together
        self.num_samples = math.ceil(total / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        samples_of_class: list[list[int]] = [[] for _ in range(self.num_classes)]
        for sample, classes in enumerate(classes_per_sample):
            for c in _classes_of(sample, classes, self.num_classes):
                samples_of_class[c].append(sample)
        self.classes = [c for c in range(self.num_classes) if samples_of_class[c]]
        if not self.classes:
            raise ValueError(
                "classes_per_sample must give at least one sample a class; got "
                f"{len(classes_per_sample)} samples with no class"
            )
        # host tensors whatever the default device (a sampler feeds a DataLoader indices)
        self._samples_of_class = [torch.tensor(s, dtype=torch.int64, device="cpu")
                                  for s in samples_of_class]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of epoch ``epoch`` (call before each epoch, as with
        ``DistributedSampler``)."""
        self.epoch = _check_int("epoch", epoch, 0)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator(device="cpu").manual_seed(self.seed + self.epoch)
        class_order = [self.classes[i] for i in torch.randperm(
            len(self.classes), generator=generator, device="cpu").tolist()]
        # every replica draws for all of them, in the same order, so the queues stay shared
        offset = math.ceil(len(class_order) / self.num_replicas)
        queues: dict[int, list[int]] = {}
        for position in range(self.num_samples):
            for replica in range(self.num_replicas):
                target = class_order[(position + replica * offset) % len(class_order)]
                if not queues.get(target):
                    samples = self._samples_of_class[target]
                    queues[target] = samples[torch.randperm(
                        len(samples), generator=generator, device="cpu")].tolist()
                sample = queues[target].pop()
                if replica == self.rank:
                    yield sample

    def __repr__(self) -> str:
        return (
            f"EquiBatchSampler(num_samples={self.num_samples}, num_classes={self.num_classes}, "
            f"classes_present={len(self.classes)}, seed={self.seed}, "
            f"num_replicas={self.num_replicas}, rank={self.rank})"
        )
