"""The ``lovasz-kernels`` command: ``info``, ``check`` and ``bench``.

Flags are checked before any work starts: a bad one prints ``error: --flag ...`` and the
command exits with status 2. The benchmark itself lives in :mod:`lovasz_kernels.bench`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import sys
import tempfile
from collections.abc import Sequence

import torch

from lovasz_kernels import __version__, _cases, _plan, bench
from lovasz_kernels._registry import get_backend, registered_backends
from lovasz_kernels.bench import engine, measure, report
from lovasz_kernels.bench.rules import REFERENCE, backend_problem

USAGE_ERROR = 2


#: bench's class count when --classes is not given
DEFAULT_CLASSES = 21


class UsageError(Exception):
    """A bad flag: ``flag`` and what is wrong with its value."""

    def __init__(self, flag: str, problem: str):
        super().__init__(f"{flag} {problem}")


def cmd_info(args: argparse.Namespace) -> int:
    print(f"lovasz-kernels {__version__}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    versions = report.versions()
    for package in ("torch", "numpy", "numba", "triton"):
        print(f"{package:8s} {versions[package]}")
    print(f"torch threads: {torch.get_num_threads()}  cpu cores: {os.cpu_count()}")
    if torch.cuda.is_available():
        print(f"cuda: {torch.cuda.get_device_name(0)} (torch.version.cuda={torch.version.cuda})")
    else:
        print("cuda: not available")
    lines = []
    for name in registered_backends():
        backend = get_backend(name)
        available, reason = backend.availability()
        devices = "/".join(backend.supported_devices())
        notes = reason or "; ".join(filter(None, [backend.summary, backend.details()]))
        lines.append([name, "yes" if available else "no", devices, notes])
    print()
    print(report.format_table(["backend", "available", "devices", "notes"], lines))
    return 0


# --------------------------------------------------------------------------------------------
# flag checks (before any work)


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError("--device", f"must be cpu or cuda (or cuda:N); got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device", f"{text}: torch sees no CUDA device here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError("--device", f"{text}: only {torch.cuda.device_count()} CUDA "
                             "device(s) here")
    return device


def _backends(requested: str | None, device: torch.device, *, interpreters: bool,
              reference: bool = True) -> list[str]:
    """Backends to run on ``device``, saying why each other one is skipped.

    Named backends may run through an interpreter; by default (none named) only
    ``interpreters=True`` allows that, and ``reference=False`` leaves out the numpy reference.
    A named backend that cannot run at all is an error.
    """
    if requested is None:
        names = [n for n in registered_backends() if reference or n != REFERENCE]
    else:
        # in the order given, each once
        names = list(dict.fromkeys(n.strip() for n in requested.split(",") if n.strip()))
    chosen, skipped = [], []
    for name in names:
        try:
            problem = backend_problem(name, device.type,
                                      native_only=requested is None and not interpreters)
        except ValueError as exc:  # unknown name
            raise UsageError("--backend", str(exc)) from None
        if problem is None:
            chosen.append(name)
        else:
            skipped.append(f"{name}: {problem}")
            print(f"skipping {name}: {problem}")
    if requested is not None and not chosen:
        raise UsageError("--backend", f"{requested}: nothing can run here ({'; '.join(skipped)})")
    return chosen


def _positive(flag: str, value: int) -> int:
    if value < 1:
        raise UsageError(flag, f"must be a positive integer; got {value}")
    return value


def _budget(value: float) -> float:
    if math.isnan(value) or value < 0:
        raise UsageError("--budget", f"must be a number of seconds >= 0 (inf: skip nothing); "
                         f"got {value}")
    return value


def _chunk_floor_bytes(megabytes: float | None) -> int | None:
    if megabytes is None:
        return None
    if not math.isfinite(megabytes) or megabytes < 0:
        raise UsageError("--chunk-floor", f"must be a number of MB >= 0; got {megabytes}")
    return int(megabytes * (1 << 20))


def _memory_bytes(device: torch.device) -> int | None:
    """The memory of ``device``: the machine's RAM for the CPU (None where the OS does not
    say), the card's for a GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def _inputs_fit(workloads: list[bench.Workload], device: torch.device) -> None:
    """Refuse sizes whose inputs alone (the scores and int64 labels) exceed the device's
    memory: allocating them would fail with a traceback, after the work has started."""
    available = _memory_bytes(device)
    if available is None:
        return
    for workload in workloads:
        itemsize = workload.torch_dtype.itemsize
        needed = workload.pixels * (workload.classes * itemsize + 8)
        if needed > available:
            raise UsageError("--pixels", (
                f"{workload.side} (--batch {workload.batch}, {workload.classes} class(es), "
                f"{workload.dtype}): the inputs alone take {needed / 2**30:.1f} GiB, more than "
                f"the {available / 2**30:.1f} GiB of {device.type} memory here"))


def _writable_folder(path: str) -> str:
    """Create ``path`` if needed and prove it writable now, not after the whole benchmark
    (the last check: a bad flag leaves no folder behind)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError("--out", f"must be a folder; {path} is a file")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError("--out", f"cannot write into {path}: {exc.strerror or exc}") from None
    return path


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return values


# --------------------------------------------------------------------------------------------
# check and bench


def cmd_check(args: argparse.Namespace) -> int:
    device = _device(args.device)
    names = [n for n in _backends(args.backend, device, interpreters=True) if n != REFERENCE]
    if not names:
        raise UsageError("--backend", f"nothing to check: no backend besides the {REFERENCE} "
                         "reference can run here")
    reference = get_backend(REFERENCE)
    if device.type != "cpu":
        print(f"the {REFERENCE} reference runs on the CPU; inputs are copied to it")
    lines = []

    def record(case: str, name: str, loss, grad, ref_loss, ref_grad, dtype) -> None:
        bad_loss = int(_cases.mismatches(loss, ref_loss, _cases.LOSS_TOLERANCE[dtype]).sum())
        bad_grad = int(_cases.mismatches(grad, ref_grad, _cases.GRAD_TOLERANCE[dtype]).sum())
        status = ("ok" if bad_loss == 0 and bad_grad == 0
                  else f"MISMATCH ({bad_loss} loss, {bad_grad} grad entries)")
        lines.append([case, name, f"{_cases.max_deviation(loss, ref_loss):.2e}",
                      f"{_cases.max_deviation(grad, ref_grad):.2e}", status])

    for case in _cases.extension_cases(device):
        errors = case.errors.cpu()
        ref_loss, ref_grad = reference.run(errors, case.fg.cpu())
        if not case.tie_free:  # tied errors: compare each tie group's total gradient
            ref_grad = _cases.tie_group_sums(errors, ref_grad)
        for name in names:
            loss, grad = get_backend(name).run(case.errors, case.fg)
            if not case.tie_free:
                grad = _cases.tie_group_sums(errors, grad.cpu())
            record(case.name, name, loss, grad, ref_loss, ref_grad, case.errors.dtype)
    for case_name, run in _cases.loss_cases():
        ref_loss, ref_grad = run(REFERENCE, torch.device("cpu"))
        for name in names:
            loss, grad = run(name, device)
            record(case_name, name, loss, grad, ref_loss, ref_grad, torch.float64)
    print(report.format_table(["case", "backend", "max |Δloss|", "max |Δgrad|", "status"], lines))
    failed = sum(line[-1] != "ok" for line in lines)
    print(f"\n{len(lines) - failed} passed, {failed} failed")
    return 1 if failed or not lines else 0


def cmd_bench(args: argparse.Namespace) -> int:
    device = _device(args.device)
    batch = _positive("--batch", args.batch)
    repeat = _positive("--repeat", args.repeat if args.repeat is not None else
                       (3 if args.quick else 5))
    budget = _budget(args.budget)
    floor_bytes = _chunk_floor_bytes(args.chunk_floor)
    if device.type == "cuda":
        print(f"the {REFERENCE} reference runs on CPU copies, for cross-checks where it is "
              "cheap (elsewhere the torch backend in float64 on the GPU checks)")
    names = _backends(args.backend, device, interpreters=False,
                      reference=device.type == "cpu")
    sides = args.pixels or list(bench.QUICK_SIDES if args.quick else bench.DEFAULT_SIDES)
    per_image = args.per_image if args.per_image is not None else args.loss == "hinge"
    if args.loss == "hinge" and args.classes is not None:
        raise UsageError("--classes", "does not apply to --loss hinge (one binary problem: "
                         f"no classes to count); got {','.join(map(str, args.classes))}")
    class_counts = [1] if args.loss == "hinge" else args.classes or [DEFAULT_CLASSES]
    workloads = [bench.Workload(args.loss, batch, side, classes, per_image, args.dtype,
                                args.scores)
                 for classes in class_counts for side in sides]
    _inputs_fit(workloads, device)
    out = _writable_folder(args.out)
    settings = engine.Settings(workloads, names, device, repeat, budget)
    clock = measure.clock_for(device)
    meter, memory = measure.peak_meter_for(device)
    ctx = report.context(settings, clock.name, memory, report.card_name(device))
    print(f"{len(workloads)} workload(s) x {len(settings.contenders)} contenders "
          f"({', '.join(settings.contenders)}), median of {repeat} interleaved rounds; "
          f"skipping any call estimated above {budget:g} s (--budget)")
    if floor_bytes is not None:
        ctx["chunk_floor_bytes"] = floor_bytes
        print(f"chunk floor on {device.type}: {args.chunk_floor:g} MB, kept strictly "
              "(set_chunk_floor: memory before speed)")

    with _plan.chunk_floor_set(device.type, floor_bytes) if floor_bytes is not None else (
            contextlib.nullcontext()):
        progress = report.Progress(engine.steps(settings))
        results = engine.run(settings, progress=progress, clock=clock, meter=meter,
                             on_result=lambda r: progress.say(report.workload_table(r, ctx)))
        progress.close()

    doc = report.document("lovasz-kernels " + " ".join(args.argv), settings, ctx, results)
    json_path = os.path.join(out, report.BENCH_JSON)
    report.write_json(doc, json_path)
    print(f"wrote {json_path}")
    png_path = os.path.join(out, report.BENCH_PNG)
    scores = ", trained-like scores" if args.scores == "trained" else ""
    title = (f"{args.loss}, {args.dtype}, batch {batch}, per_image={per_image}{scores}, "
             f"{ctx['device']}")
    if report.plot(results, title, png_path):
        print(f"wrote {png_path}")
    failed = engine.failures(results)
    if failed:
        print(f"{failed} result(s) disagree with the cross-check or failed (not timed)")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lovasz-kernels", description="Lovász losses: backends, cross-checks, timings."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="backends, availability, versions, devices")
    info.set_defaults(handler=cmd_info)

    check = commands.add_parser(
        "check", help="cross-validate every available backend against the numpy reference"
    )
    check.add_argument("--backend", help="comma-separated backends (default: all available)")
    check.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    check.set_defaults(handler=cmd_check)

    sides = ",".join(map(str, bench.DEFAULT_SIDES))
    quick = ",".join(map(str, bench.QUICK_SIDES))
    bench_parser = commands.add_parser(
        "bench",
        help="time fwd+bwd of every available backend, the per-class loop and a sort floor",
        description="Cross-check each backend, then time fwd+bwd in interleaved rounds next to "
        "the per-class loop and a sort floor, and measure peak memory; print a table per "
        f"workload and write {report.BENCH_JSON} and {report.BENCH_PNG} into --out.",
    )
    add = bench_parser.add_argument
    add("--backend", help="comma-separated backends (default: all available natively)")
    add("--loss", choices=("softmax", "hinge", "extension"), default="softmax",
        help="softmax (default), hinge, or extension (the bare kernel on softmax errors)")
    add("--device", default="cpu", help="cpu or cuda (default: cpu)")
    add("--pixels", type=_int_list, metavar="SIDES",
        help=f"comma-separated image sides, e.g. 256,512 (default {sides}; --quick: {quick})")
    add("--classes", type=_int_list, metavar="COUNTS",
        help=f"comma-separated class counts, one plot panel each (default {DEFAULT_CLASSES}; "
        "not the hinge)")
    add("--batch", type=int, default=1, help="images per batch (default 1)")
    add("--per-image", action=argparse.BooleanOptionalAction, default=None,
        help="per-image IoU (default: off for softmax, on for hinge)")
    add("--dtype", choices=tuple(bench.workloads.DTYPES), default="float32")
    add("--scores", choices=bench.workloads.SCORES, default="random",
        help="random: independent of the labels (default); trained: favouring the labelled "
        "class, as a trained network's do (some shortcuts depend on the data)")
    add("--repeat", type=int, help="timed rounds (default 5; --quick: 3)")
    add("--budget", type=float, default=bench.DEFAULT_BUDGET_S, metavar="SECONDS",
        help="skip calls estimated to take longer (from a smaller size or a cost model; "
        f"default {bench.DEFAULT_BUDGET_S:g})")
    add("--chunk-floor", type=float, metavar="MB",
        help="set the device's chunk floor, as lovasz_kernels.set_chunk_floor does: kept "
        "strictly, memory before speed (0: the standard workloads within twice their input; "
        "default: the device's own floor, which bends for speed)")
    add("--quick", action="store_true", help=f"sides {quick}, 3 rounds")
    add("--out", default=".", help="folder for the JSON and PNG (default: .)")
    bench_parser.set_defaults(handler=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.handler(args)
    except UsageError as exc:
        print(f"lovasz-kernels {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
