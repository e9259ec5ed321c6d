"""The Lovász-Softmax in a compiled training step: eager vs ``torch.compile``, side by side.

A small fully convolutional network (three 3x3 convolutions) on random images with 21 classes
and ignored pixels; one step = forward, cross-entropy + Lovász-Softmax (``from_logits=True``),
backward, SGD update. The script reports

- the graph breaks of the forward + loss under ``torch._dynamo.explain`` (0: the loss is one
  custom operator in the graph);
- the first compiled call (compilation included) and the median step time of eager and
  compiled steps, measured in interleaved rounds so both see the same machine load;
- that the compiled and eager steps give the same loss and parameter gradients.

Run from the repository root::

    python examples/compiled_training.py                        # default backend
    python examples/compiled_training.py --backend torch --batch 8 --side 128
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lovasz_kernels import lovasz_softmax

IGNORE = 255


def make_model(classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=2, dilation=2), nn.ReLU(),
        nn.Conv2d(32, classes, 3, padding=1),
    )


def make_step(model: nn.Module, backend: str | None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees one model

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad()
        logits = model(images)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE) + lovasz_softmax(
            logits, labels, from_logits=True, ignore_index=IGNORE, backend=backend)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default=None, help="backend name (default: automatic)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--side", type=int, default=96)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.side, args.side, generator=gen)
    labels = torch.randint(0, args.classes, (args.batch, args.side, args.side), generator=gen)
    labels[:, :4] = IGNORE
    model = make_model(args.classes)
    eager = make_step(model, args.backend)

    def forward_and_loss(images):
        return lovasz_softmax(model(images), labels, from_logits=True, ignore_index=IGNORE,
                              backend=args.backend)

    breaks = torch._dynamo.explain(forward_and_loss)(images).graph_break_count
    compiled = torch.compile(eager)
    eager_loss = eager(images, labels)
    eager_grads = [p.grad.clone() for p in model.parameters()]
    start = time.perf_counter()
    compiled_loss = compiled(images, labels)
    first_call = time.perf_counter() - start
    same = torch.allclose(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6) and all(
        torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)
        for p, g in zip(model.parameters(), eager_grads))
    times = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for name, step in (("eager", eager), ("compiled", compiled)):
            start = time.perf_counter()
            step(images, labels)
            times[name].append((time.perf_counter() - start) * 1e3)
    result = {
        "graph_breaks": breaks,
        "first_compiled_call_s": first_call,
        "eager_ms": statistics.median(times["eager"]),
        "compiled_ms": statistics.median(times["compiled"]),
        "same_loss_and_grads": same,
    }
    print(f"{args.batch} x 3 x {args.side}^2 images, {args.classes} classes, backend "
          f"{args.backend or 'automatic'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"graph breaks in forward + loss (torch._dynamo.explain): {breaks}")
    print(f"first compiled call (compiles): {first_call:.1f} s")
    print(f"step, median of {args.rounds} interleaved rounds: eager {result['eager_ms']:.1f} ms, "
          f"compiled {result['compiled_ms']:.1f} ms")
    print(f"compiled step gives the eager loss and gradients: {same}")
    return result


if __name__ == "__main__":
    main()
