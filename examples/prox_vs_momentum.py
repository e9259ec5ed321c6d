"""SGD, SGD + momentum and ProxLovasz on the Lovász hinge: the paper's synthetic setting.

Binary images of one circle each; the only feature of a pixel is its ground truth as ±1 plus
unit Gaussian noise; the model is linear, logit = w·feature + b (two parameters), trained on
the per-image Lovász hinge with the whole set as one batch. The plot shows the Jaccard loss
(1 − mean IoU of the thresholded predictions over the images) against iterations.

Run ``python examples/prox_vs_momentum.py`` (under a minute on one CPU core); it writes
``prox_vs_momentum.png`` in the current folder (``--out`` to change) and prints a table.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence

import torch

from lovasz_kernels import lovasz_hinge
from lovasz_kernels.optim import ProxLovasz


def circle_images(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(count, size, size) int64 masks, each a disc of random centre and radius."""
    grid = torch.arange(size, dtype=torch.float32)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    masks = []
    for _ in range(count):
        radius = size * (0.1 + 0.25 * torch.rand((), generator=generator))
        centre = radius + (size - 2 * radius) * torch.rand(2, generator=generator)
        masks.append((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2)
    return torch.stack(masks).long()


def jaccard_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """1 − mean over images of the IoU of (logits > 0) with the foreground (IoU 1 if both empty)."""
    predicted = logits > 0
    truth = labels == 1
    intersection = (predicted & truth).flatten(1).sum(1).double()
    union = (predicted | truth).flatten(1).sum(1).double()
    iou = torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))
    return float(1 - iou.mean())


class LinearPixelModel(torch.nn.Module):
    """logit = w · feature + b, the same two parameters for every pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(0.1))
        self.bias = torch.nn.Parameter(torch.tensor(-1.0))  # starts predicting background

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.weight * features + self.bias


def run(
    make_optimizer: Callable[[Sequence[torch.nn.Parameter]], torch.optim.Optimizer],
    features: torch.Tensor,
    labels: torch.Tensor,
    iterations: int,
) -> list[float]:
    """Jaccard loss before training and after each iteration."""
    model = LinearPixelModel()
    optimizer = make_optimizer(list(model.parameters()))
    curve = [jaccard_loss(model(features).detach(), labels)]
    for _ in range(iterations):
        if isinstance(optimizer, ProxLovasz):
            def closure():
                optimizer.zero_grad()
                return model(features), labels

            optimizer.step(closure)
        else:
            optimizer.zero_grad()
            lovasz_hinge(model(features), labels).backward()
            optimizer.step()
        curve.append(jaccard_loss(model(features).detach(), labels))
    return curve


def main(argv: Sequence[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image side (pixels)")
    parser.add_argument("--images", type=int, default=16, help="number of images (one batch)")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate of every method")
    parser.add_argument("--lam", type=float, default=None,
                        help="large ProxLovasz λ (default: 0.15 × pixels in the batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="prox_vs_momentum.png", help="where to save the plot")
    args = parser.parse_args(argv)

    generator = torch.Generator().manual_seed(args.seed)
    labels = circle_images(args.images, args.size, generator)
    noise = torch.randn(labels.shape, generator=generator)
    features = (2 * labels - 1).float() + noise
    lr = args.lr
    # the prox moves a margin by about λ/B · (its Jaccard increment ~ 1/pixels per image):
    # λ must be of the order of the pixel count of the batch before the direction changes
    lam = args.lam if args.lam is not None else 0.15 * labels.numel()

    methods: dict[str, Callable] = {
        "SGD": lambda p: torch.optim.SGD(p, lr=lr),
        "SGD + momentum": lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9),
        "ProxLovasz, λ = lr": lambda p: ProxLovasz(p, lr=lr, momentum=0.9),
        f"ProxLovasz, λ = {lam:.3g}": lambda p: ProxLovasz(p, lr=lr, momentum=0.9, lam=lam),
        f"ProxLovasz greedy, λ = {lam:.3g}": lambda p: ProxLovasz(
            p, lr=lr, momentum=0.9, lam=lam, method="greedy"
        ),
    }
    results: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for name, make in methods.items():
        start = time.perf_counter()
        results[name] = run(make, features, labels, args.iterations)
        seconds[name] = time.perf_counter() - start

    title = (f"{args.images} images {args.size}², linear model, lr = {lr:g}, "
             "momentum 0.9 (all but SGD)")
    checkpoints = sorted({0, *(round(args.iterations * f) for f in (0.1, 0.25, 0.5)),
                          args.iterations})
    print(title)
    header = f"{'iteration':>28} " + " ".join(f"{c:>7d}" for c in checkpoints) + "    mean   time"
    print(header)
    for name, curve in results.items():
        values = " ".join(f"{curve[c]:7.4f}" for c in checkpoints)
        mean = sum(curve) / len(curve)
        print(f"{name:>28} {values} {mean:7.4f} {seconds[name]:5.1f}s")
    bayes = jaccard_loss(features, labels)
    print(f"{'sign(feature)':>28} {bayes:7.4f}  (Jaccard loss of thresholding at 0, for scale)")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the dev and bench extras
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return results
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for name, curve in results.items():
        style = "--" if "greedy" in name else "-"
        # drawn wide: with λ = lr, ProxLovasz lies on top of it
        width, alpha = (4.0, 0.45) if name == "SGD + momentum" else (1.5, 1.0)
        axis.plot(range(len(curve)), curve, style, label=name, linewidth=width, alpha=alpha)
    axis.axhline(bayes, color="grey", linewidth=0.8, linestyle=":", label="sign(feature)")
    axis.set_xlabel("iteration")
    axis.set_ylabel("Jaccard loss (1 − mean IoU)")
    axis.set_title(title, fontsize=9)
    top = max(max(curve) for curve in results.values())
    axis.set_ylim(0, min(1.0, top * 1.05) if math.isfinite(top) else 1.0)
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    plt.close(figure)
    print(f"plot saved to {args.out}")
    return results


if __name__ == "__main__":
    main()
