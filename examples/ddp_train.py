"""Minimal DistributedDataParallel training with the global-batch Lovász-Softmax.

Run with, e.g.::

    torchrun --nproc_per_node=2 examples/ddp_train.py            # gloo on CPU, nccl on GPUs
    torchrun --nproc_per_node=2 examples/ddp_train.py --dist-mode histogram

Each rank trains a tiny fully convolutional net on its own synthetic images (the class of a
pixel is decided by which colour channel is brightest, plus noise). The batch Lovász-Softmax is
computed over the pixels of *all* ranks (``process_group=dist.group.WORLD``), so every rank
sees the same loss value; ``loss * world_size`` is backpropagated because DDP averages the
ranks' gradients, and the product then reproduces the single-process gradient of the
concatenated batch.

Before and after training it prints, on one deliberately skewed batch (class 2 is rare on rank 0 and
frequent on the others), the global-batch loss next to the mean of the per-rank losses that a
plain ``per_image=False`` loss would give under DDP, and the single-process loss of the
concatenated batch (equal to the global one).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lovasz_kernels import LovaszSoftmaxLoss, lovasz_softmax

NUM_CLASSES = 3


def synthetic_batch(
    batch: int, size: int, generator: torch.Generator, rare_class_pixels: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) and labels (B, H, W): the label is the brightest channel.

    ``rare_class_pixels``: keep class 2 on only that many pixels per image (a skewed batch).
    """
    images = torch.rand(batch, NUM_CLASSES, size, size, generator=generator)
    labels = images.argmax(dim=1)
    if rare_class_pixels is not None:
        is_rare = labels == 2
        keep = torch.zeros_like(is_rare)
        keep.view(batch, -1)[:, :rare_class_pixels] = True
        demote = is_rare & ~keep
        images[:, 2][demote] = 0.0  # class 2 stops being the brightest there
        labels = images.argmax(dim=1)
    images = images + 0.1 * torch.randn(images.shape, generator=generator)
    return images, labels


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, NUM_CLASSES, 1)
    )


def compare_on_skewed_batch(
    model: nn.Module, device: torch.device, world: int, title: str
) -> None:
    """Print the global-batch loss, the mean of per-rank losses, and the single-process loss."""
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(100 + rank)
    images, labels = synthetic_batch(
        2, 32, generator, rare_class_pixels=4 if rank == 0 else None
    )
    images, labels = images.to(device), labels.to(device)
    with torch.no_grad():
        probas = model(images).softmax(dim=1)
        global_loss = lovasz_softmax(probas, labels, process_group=dist.group.WORLD)
        per_rank = lovasz_softmax(probas, labels)  # what each rank computes on its own
        mean_of_ranks = per_rank.clone()
        dist.all_reduce(mean_of_ranks)
        mean_of_ranks /= world
        every_probas = [torch.empty_like(probas) for _ in range(world)]
        every_labels = [torch.empty_like(labels) for _ in range(world)]
        dist.all_gather(every_probas, probas)
        dist.all_gather(every_labels, labels)
        single = lovasz_softmax(torch.cat(every_probas), torch.cat(every_labels))
    rare = int((labels == 2).sum())
    print(f"[rank {rank}] class-2 pixels here: {rare:5d}   per-rank loss: {per_rank.item():.6f}")
    dist.barrier()
    if rank == 0:
        print(
            f"{title}\n"
            f"global-batch loss (process_group): {global_loss.item():.6f}\n"
            f"single-process loss of the concatenated batch: {single.item():.6f}\n"
            f"mean of per-rank losses (plain DDP): {mean_of_ranks.item():.6f}\n"
            f"difference: {mean_of_ranks.item() - global_loss.item():+.6f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4, help="images per rank")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--dist-mode", choices=("exact", "histogram"), default="exact")
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device = torch.device("cpu")

    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts them)
    model = make_model().to(device)
    compare_on_skewed_batch(model, device, world, "before training:")

    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    criterion = LovaszSoftmaxLoss(
        from_logits=True, process_group=dist.group.WORLD, dist_mode=args.dist_mode
    )
    optimizer = torch.optim.Adam(ddp_model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(rank)  # each rank its own data
    for step in range(args.steps):
        images, labels = synthetic_batch(args.batch, args.size, generator)
        loss = criterion(ddp_model(images.to(device)), labels.to(device))
        optimizer.zero_grad()
        # DDP averages gradients over ranks; the global loss needs their sum
        (loss * world).backward()
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  global-batch Lovász-Softmax {loss.item():.4f}")
    compare_on_skewed_batch(model, device, world, "after training:")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
