"""The ``lovasz-kernels`` command: ``info``, ``check`` and ``bench``."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata

import torch

from lovasz_kernels import _cases
from lovasz_kernels._registry import get_backend, registered_backends
from lovasz_kernels.losses import lovasz_hinge, lovasz_softmax

REFERENCE = "numpy"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    from lovasz_kernels import __version__

    print(f"lovasz-kernels {__version__}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    for package in ("torch", "numpy", "numba", "triton"):
        print(f"{package:8s} {_version(package)}")
    print(f"torch threads: {torch.get_num_threads()}  cpu cores: {os.cpu_count()}")
    if torch.cuda.is_available():
        print(f"cuda: {torch.cuda.get_device_name(0)} (torch.version.cuda={torch.version.cuda})")
    else:
        print("cuda: not available")
    rows = []
    for name in registered_backends():
        backend = get_backend(name)
        available, reason = backend.availability()
        devices = "/".join(backend.supported_devices())
        notes = reason or "; ".join(filter(None, [backend.summary, backend.details()]))
        rows.append([name, "yes" if available else "no", devices, notes])
    print()
    print(_table(["backend", "available", "devices", "notes"], rows))
    return 0


def _backends_to_run(requested: str | None, device: torch.device) -> list[str]:
    names = registered_backends() if requested is None else requested.split(",")
    chosen = []
    for name in names:
        backend = get_backend(name)
        available, reason = backend.availability()
        if not available:
            print(f"skipping {name}: {reason}")
        elif device.type not in backend.supported_devices():
            print(f"skipping {name}: does not run on {device.type}")
        else:
            chosen.append(name)
    return chosen


def _loss_cases() -> list[tuple[str, Callable[[str, torch.device], tuple]]]:
    """Loss-level cases: (name, run(backend, device) -> (loss, grad of the input))."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 17, 23, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 6, (3, 17, 23), generator=gen)
    labels[0, :4] = 255
    binary = torch.randint(0, 2, (3, 17, 23), generator=gen)

    def softmax_case(**kwargs):
        def run(backend: str, device: torch.device):
            scores = logits.to(device).softmax(dim=1).requires_grad_()
            loss = lovasz_softmax(scores, labels.to(device), ignore_index=255, backend=backend,
                                  **kwargs)
            return loss, torch.autograd.grad(loss, scores)[0]
        return run

    def hinge_case(**kwargs):
        def run(backend: str, device: torch.device):
            scores = logits[:, 0].to(device).requires_grad_()
            loss = lovasz_hinge(scores, binary.to(device), backend=backend, **kwargs)
            return loss, torch.autograd.grad(loss, scores)[0]
        return run

    return [
        ("softmax batch, ignore", softmax_case()),
        ("softmax per-image, all classes", softmax_case(per_image=True, classes="all")),
        ("hinge per-image", hinge_case()),
        ("hinge batch", hinge_case(per_image=False)),
    ]


def cmd_check(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    reference = get_backend(REFERENCE)
    names = [n for n in _backends_to_run(args.backend, device) if n != REFERENCE]
    if device.type != "cpu":
        print(f"the {REFERENCE} reference runs on the CPU; inputs are copied to it")
    rows = []
    failed = 0

    def record(case: str, name: str, loss, grad, ref_loss, ref_grad, dtype, grad_expected=None):
        nonlocal failed
        grad_expected = ref_grad if grad_expected is None else grad_expected
        bad_loss = int(_cases.mismatches(loss, ref_loss, _cases.LOSS_TOLERANCE[dtype]).sum())
        bad_grad = int(_cases.mismatches(grad, grad_expected, _cases.GRAD_TOLERANCE[dtype]).sum())
        ok = bad_loss == 0 and bad_grad == 0
        failed += not ok
        rows.append([
            case, name, f"{_cases.max_deviation(loss, ref_loss):.2e}",
            f"{_cases.max_deviation(grad, grad_expected):.2e}",
            "ok" if ok else f"MISMATCH ({bad_loss} loss, {bad_grad} grad entries)",
        ])

    for case in _cases.extension_cases(device):
        ref_loss, ref_grad = reference.run(case.errors.cpu(), case.fg.cpu())
        for name in names:
            loss, grad = get_backend(name).run(case.errors, case.fg)
            if case.tie_free:
                record(case.name, name, loss, grad, ref_loss, ref_grad, case.errors.dtype)
            else:  # tied errors: compare each tie group's total gradient
                record(case.name, name, loss, _cases.tie_group_sums(case.errors.cpu(), grad.cpu()),
                       ref_loss, None, case.errors.dtype,
                       grad_expected=_cases.tie_group_sums(case.errors.cpu(), ref_grad))
    for case_name, run in _loss_cases():
        ref_loss, ref_grad = run(REFERENCE, torch.device("cpu"))
        for name in names:
            loss, grad = run(name, device)
            record(case_name, name, loss, grad, ref_loss, ref_grad, torch.float64)
    print(_table(["case", "backend", "max |Δloss|", "max |Δgrad|", "status"], rows))
    if not names:
        print(f"no backend besides the {REFERENCE} reference is available to check")
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _interleaved_times(
    runs: dict[str, Callable[[], object]], repeat: int, device: torch.device
) -> dict[str, list[float]]:
    """Wall times of each run, alternating between runs every round.

    Interleaving exposes every backend to the same machine noise, so their ratios hold up
    on a busy machine even when absolute times drift.
    """
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def cmd_bench(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    side = 256 if args.quick else args.pixels
    repeat = 3 if args.quick else args.repeat
    names = _backends_to_run(args.backend, device)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch, args.classes, side, side, generator=gen).to(device)
    labels = torch.randint(0, args.classes, (args.batch, side, side), generator=gen).to(device)
    probas = logits.softmax(dim=1)
    print(
        f"lovasz_softmax fwd+bwd, float32, batch {args.batch} x {args.classes} classes x "
        f"{side}x{side} pixels, per_image={args.per_image}, {device.type}, "
        f"median of {repeat} interleaved rounds"
    )

    def run(name: str):
        scores = probas.clone().requires_grad_()
        loss = lovasz_softmax(scores, labels, per_image=args.per_image, backend=name)
        loss.backward()
        return loss.detach(), scores.grad

    # cross-check before timing (this first call is also the warm-up)
    results = {name: run(name) for name in names}
    reference = results.get(REFERENCE)
    times = _interleaved_times({name: lambda n=name: run(n) for name in names}, repeat, device)
    medians = {name: statistics.median(times[name]) for name in names}
    rows = []
    failed = 0
    for name in names:
        if reference is None:
            speedup = deviation = "-"
        else:
            speedup = f"{medians[REFERENCE] / medians[name]:.2f}x"
            # float32 probabilities tie; compare gradient totals over tie groups
            grad, expected = (
                _cases.softmax_tie_group_sums(probas, labels, results[key][1])
                for key in (name, REFERENCE)
            )
            deviation = f"{_cases.max_deviation(grad, expected):.1e}"
            loss_bad = _cases.mismatches(results[name][0], reference[0],
                                         _cases.LOSS_TOLERANCE[torch.float32])
            grad_bad = _cases.mismatches(grad, expected, _cases.GRAD_TOLERANCE[torch.float32])
            if bool(loss_bad.any()) or bool(grad_bad.any()):
                failed += 1
                deviation += " MISMATCH"
        rows.append([name, f"{medians[name] * 1e3:.1f}", speedup, deviation])
    print(_table(["backend", "median ms", f"vs {REFERENCE}", "max |Δgrad| (tie groups)"], rows))
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lovasz-kernels", description="Lovász losses: backends, cross-checks, timings."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="backends, availability, versions, devices")
    info.set_defaults(handler=cmd_info)

    check = commands.add_parser(
        "check", help="cross-validate every available backend against the numpy reference"
    )
    check.add_argument("--backend", help="comma-separated backends (default: all available)")
    check.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    check.set_defaults(handler=cmd_check)

    bench = commands.add_parser("bench", help="time lovasz_softmax fwd+bwd per backend")
    bench.add_argument("--backend", help="comma-separated backends (default: all available)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--pixels", type=int, default=512, help="image side (default 512)")
    bench.add_argument("--classes", type=int, default=21)
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--per-image", action="store_true")
    bench.add_argument("--repeat", type=int, default=5)
    bench.add_argument("--quick", action="store_true", help="256x256 pixels, 3 repeats")
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, RuntimeError, TypeError) as exc:
        print(f"lovasz-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
