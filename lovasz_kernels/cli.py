"""The ``lovasz-kernels`` command: ``info``, ``check`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata

import torch

from lovasz_kernels import _baselines, _cases, _validate
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


# --------------------------------------------------------------------------------------------
# bench

BENCH_JSON = "lovasz-bench.json"
BENCH_PNG = "lovasz-bench.png"
LOOP = "loop"  # the per-class Python loop of the common public implementation (_baselines)
SORT_FLOOR = "torch.sort"  # one sort of the same (S, P) float32 keys: the floor on a GPU
QUICK_SIDES = (64, 128, 256)
DEFAULT_SIDES = (64, 256, 512, 1024)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
INSTALL_BENCH = "pip install 'lovasz-kernels[bench]'"


def _interleaved_times(
    runs: dict[str, Callable[[], object]], repeat: int, device: torch.device,
    after_round: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Wall times of each run, alternating between runs every round.

    Interleaving exposes every backend to the same machine noise, so their ratios hold up
    on a busy machine even when absolute times drift. CUDA work is synchronized before the
    clock starts and before it stops.
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
        if after_round is not None:
            after_round()
    return times


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return values


@dataclass(frozen=True)
class _Combo:
    """One point of the bench grid."""

    loss: str  # "softmax" or "hinge"
    batch: int
    side: int
    num_classes: int  # 1 for the hinge
    per_image: bool
    dtype: torch.dtype

    @property
    def pixels(self) -> int:
        """Pixels per image: the plot's x axis."""
        return self.side * self.side

    @property
    def segments(self) -> int:
        """Segments the kernel sorts (random labels: every class is present everywhere)."""
        return self.num_classes * (self.batch if self.per_image else 1)

    @property
    def segment_pixels(self) -> int:
        return self.pixels * (1 if self.per_image else self.batch)

    @property
    def elements(self) -> int:
        return self.segments * self.segment_pixels

    def work(self, row: str) -> float:
        """Relative cost, to extrapolate a row's time from a smaller combination."""
        sort_work = self.elements * math.log2(max(self.segment_pixels, 2))
        if row == LOOP and self.loss == "softmax":
            # the loop's backward writes a full (pixels, C) gradient per class: O(C^2 P)
            return sort_work + self.elements * self.num_classes
        return sort_work

    def describe(self, device: torch.device) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        if self.loss == "softmax":
            what = (f"lovasz_softmax fwd+bwd, {dtype}, batch {self.batch} x {self.num_classes} "
                    f"classes x {self.side}x{self.side} pixels")
        else:
            what = (f"lovasz_hinge fwd+bwd, {dtype}, batch {self.batch} x "
                    f"{self.side}x{self.side} pixels")
        return f"{what}, per_image={self.per_image}, {device.type}"

    def key(self) -> dict:
        return {
            "loss": self.loss, "batch": self.batch, "side": self.side, "pixels": self.pixels,
            "classes": self.num_classes if self.loss == "softmax" else None,
            "per_image": self.per_image, "dtype": str(self.dtype).removeprefix("torch."),
            "segments": self.segments, "pixels_per_segment": self.segment_pixels,
        }


def _grouped(errors: torch.Tensor, error_grad: torch.Tensor) -> torch.Tensor:
    """Tie-group sums over the whole batch (each group is a union of the segments' tie groups)."""
    return _cases.tie_group_sums(errors.detach().cpu().double().reshape(1, -1),
                                 error_grad.detach().cpu().double().reshape(1, -1))


class _Workload:
    """Inputs of one combination and a fwd+bwd closure per row."""

    def __init__(self, combo: _Combo, device: torch.device):
        self.combo = combo
        self.device = device
        compute = _validate.compute_dtype(combo.dtype)
        if combo.loss == "softmax":
            self.scores, self.labels = _baselines.softmax_inputs(
                combo.batch, combo.num_classes, combo.side, combo.dtype, device)
            # errors exactly as the losses build them (in the compute dtype), so tie groups
            # here are the ties every backend sees
            probas = self.scores.detach().cpu().to(compute).movedim(1, 0)
            fg = self.labels.cpu()[None] == torch.arange(combo.num_classes).view(-1, 1, 1, 1)
            self._errors = torch.where(fg, 1 - probas, probas)
            self._sign = torch.where(fg, -1.0, 1.0)  # d error / d proba
        else:
            self.scores, self.labels = _baselines.hinge_inputs(
                combo.batch, combo.side, combo.dtype, device)
            signs = 2.0 * self.labels.cpu().to(compute) - 1.0
            self._errors = 1 - self.scores.detach().cpu().to(compute) * signs
            self._sign = -signs

    def cpu_copy(self) -> _Workload:
        other = object.__new__(_Workload)
        other.__dict__.update(self.__dict__, device=torch.device("cpu"),
                              scores=self.scores.cpu(), labels=self.labels.cpu())
        return other

    def run(self, row: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and gradient of the scores for a backend name or the loop."""
        combo = self.combo
        scores = self.scores.detach().clone().requires_grad_()
        if combo.loss == "softmax":
            if row == LOOP:
                loss = _baselines.per_class_loop_lovasz_softmax(scores, self.labels,
                                                                combo.per_image)
            else:
                loss = lovasz_softmax(scores, self.labels, per_image=combo.per_image,
                                      backend=row)
        elif row == LOOP:
            loss = _baselines.per_image_loop_lovasz_hinge(scores, self.labels, combo.per_image)
        else:
            loss = lovasz_hinge(scores, self.labels, per_image=combo.per_image, backend=row)
        loss.backward()
        return loss.detach(), scores.grad

    def tie_group_sums(self, grad: torch.Tensor) -> torch.Tensor:
        """Gradient totals per tie group of errors: comparable whatever the tie order."""
        error_grad = grad.detach().cpu().double()
        if self.combo.loss == "softmax":
            error_grad = error_grad.movedim(1, 0)
        return _grouped(self._errors, error_grad * self._sign)

    def sort_keys(self) -> torch.Tensor:
        """(S, P) float32 keys of the kernel's size, for the sort floor."""
        gen = torch.Generator().manual_seed(1)
        keys = torch.rand(self.combo.segments, self.combo.segment_pixels, generator=gen)
        return keys.to(self.device)


class _Progress:
    """A tqdm bar on stderr when tqdm is installed; messages go to stdout either way."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
        except ImportError:
            print(f"(tqdm is not installed: no progress bar; {INSTALL_BENCH})", file=sys.stderr)
            self.bar = None
        else:
            self.bar = tqdm(total=total, file=sys.stderr, unit="step", leave=False,
                            dynamic_ncols=True, disable=None)

    def update(self, steps: int = 1, status: str | None = None) -> None:
        if self.bar is not None:
            if status is not None:
                self.bar.set_description_str(status, refresh=False)
            self.bar.update(steps)

    def say(self, message: str) -> None:
        if self.bar is None:
            print(message)
        else:
            self.bar.write(message, file=sys.stdout)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            models = [ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    return info


def _plot(results: list[dict], title: str, path: str) -> bool:
    """Log-log time vs pixels per image, one line per row, one panel per class count."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter
    except ImportError:
        print(f"matplotlib is not installed: no plot ({INSTALL_BENCH})")
        return False
    panels = sorted({r["classes"] for r in results}, key=lambda c: -1 if c is None else c)
    fig = Figure(figsize=(5.2 * len(panels), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, classes in zip(axes, panels):
        lines: dict[str, list[tuple[int, float]]] = {}
        for result in results:
            if result["classes"] != classes:
                continue
            for row, data in result["rows"].items():
                if data.get("median_s") is not None:
                    lines.setdefault(row, []).append((result["pixels"], data["median_s"]))
        for row, points in lines.items():
            points.sort()
            style = {"linestyle": "--", "color": "0.4"} if row in (LOOP, SORT_FLOOR) else {}
            label = {LOOP: "per-class loop (public)", SORT_FLOOR: "torch.sort floor"}.get(row, row)
            ax.loglog(*zip(*points), marker="o", label=label, **style)
        sides = sorted({r["side"] for r in results if r["classes"] == classes})
        ax.set_xticks([side * side for side in sides], [f"{side}²" for side in sides])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("pixels per image")
        ax.set_ylabel("median fwd+bwd time (s)")
        ax.set_title("binary (hinge)" if classes is None else f"{classes} classes")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.savefig(path, dpi=120)
    return True


def _gpu_mode(device: torch.device) -> bool:
    """GPU layout of the run: reference untimed on CPU copies, sort floor row, GB/s column."""
    return device.type == "cuda"


def cmd_bench(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here")
    sides = args.pixels or list(QUICK_SIDES if args.quick else DEFAULT_SIDES)
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 5)
    if repeat < 1:
        raise ValueError(f"--repeat must be at least 1; got {repeat}")
    dtype = DTYPES[args.dtype]
    per_image = args.per_image if args.per_image is not None else args.loss == "hinge"
    class_counts = args.classes if args.loss == "softmax" else [1]
    names = _backends_to_run(args.backend, device)
    if args.backend is None:  # by default, time native devices only
        for name in [n for n in names if device.type not in get_backend(n).devices]:
            print(f"skipping {name}: runs on {device.type} only through an interpreter, for "
                  "tests (name it in --backend to time it anyway)")
            names.remove(name)
    gpu = _gpu_mode(device)
    timed_reference = not gpu and REFERENCE in names
    if gpu:
        names = [n for n in names if n != REFERENCE]
        print(f"the {REFERENCE} reference runs on CPU copies, for the cross-check only")
    rows = [*names, LOOP] + ([SORT_FLOOR] if gpu else [])
    combos = sorted(
        (_Combo(args.loss, args.batch, side, c, per_image, dtype)
         for c in class_counts for side in sides),
        key=lambda combo: (combo.elements, combo.num_classes),
    )
    print(f"{len(combos)} combination(s) x {len(rows)} rows, median of {repeat} interleaved "
          f"rounds; skipping any call estimated above {args.budget:g} s (--budget)")

    # per row: (work, seconds) of its largest timed combination, to extrapolate from
    measured: dict[str, tuple[float, float]] = {}

    def estimate(row: str, combo: _Combo) -> float | None:
        if row not in measured:
            return None
        work, seconds = measured[row]
        return seconds * combo.work(row) / work

    def over_budget(row: str, combo: _Combo) -> str | None:
        guess = estimate(row, combo)
        if guess is None or guess <= args.budget:
            return None
        return f"estimated {guess:.1f} s per call > --budget {args.budget:g} s"

    progress = _Progress(len(combos) * (repeat + 1))
    results: list[dict] = []
    failed = 0
    for combo in combos:
        heading = combo.describe(device)
        result = {**combo.key(), "rows": {}, "skipped": None}
        results.append(result)
        progress.update(0, f"{combo.side}x{combo.side} x{combo.num_classes}")
        reason = over_budget(REFERENCE, combo)
        if reason:
            result["skipped"] = f"{REFERENCE} reference {reason}"
            progress.say(f"skipping {heading}: the {REFERENCE} reference is {reason}")
            progress.update(repeat + 1)
            continue
        work = _Workload(combo, device)
        reference_work = work.cpu_copy() if gpu else work
        start = time.perf_counter()
        ref_loss, ref_grad = reference_work.run(REFERENCE)
        first_reference_call = time.perf_counter() - start
        if REFERENCE not in measured:
            measured[REFERENCE] = (combo.work(REFERENCE), first_reference_call)
        ref_groups = reference_work.tie_group_sums(ref_grad)
        grad_tol = _cases.GRAD_TOLERANCE[dtype]
        loss_tol = _cases.LOSS_TOLERANCE[dtype]

        runs: dict[str, Callable[[], object]] = {}
        for row in rows:
            entry: dict = {"samples_s": [], "median_s": None}
            result["rows"][row] = entry
            reason = over_budget(row, combo)
            if reason:
                entry["status"] = f"skipped: {reason}"
                progress.say(f"skipping {row} at {heading}: {reason}")
                continue
            if row == SORT_FLOOR:
                keys = work.sort_keys()
                runs[row] = lambda k=keys: torch.sort(k, dim=1, descending=True)
                runs[row]()
                entry["status"] = "not checked (a sort)"
                continue
            if row == REFERENCE:
                loss, grad = ref_loss, ref_grad  # its first call is the cross-check's
            else:
                loss, grad = work.run(row)  # cross-check first (also the warm-up)
            groups = work.tie_group_sums(grad)
            entry["max_abs_loss_deviation"] = _cases.max_deviation(loss, ref_loss)
            entry["max_abs_grad_deviation"] = _cases.max_deviation(groups, ref_groups)
            bad = int(_cases.mismatches(loss, ref_loss, loss_tol).sum()
                      + _cases.mismatches(groups, ref_groups, grad_tol).sum())
            if row == LOOP:
                # float cumulative counts and cancelling differences (DESIGN.md §1): reported,
                # not held to the backends' tolerance
                entry["status"] = "reported, not checked (float counts)"
            elif bad:
                failed += 1
                entry["status"] = f"MISMATCH ({bad} entries)"
                continue  # a wrong result is not timed
            else:
                entry["status"] = "ok"
            if row != REFERENCE or timed_reference:
                runs[row] = lambda r=row, w=work: w.run(r)
        progress.update(1)

        times = _interleaved_times(runs, repeat, device, after_round=progress.update)
        for row, samples in times.items():
            entry = result["rows"][row]
            entry["samples_s"] = samples
            entry["median_s"] = statistics.median(samples)
            measured[row] = (combo.work(row), entry["median_s"])
        progress.say(_bench_table(result, rows, heading, repeat, device))
    progress.close()

    out = args.out
    os.makedirs(out, exist_ok=True)
    header = f"lovasz_{args.loss} fwd+bwd, {args.dtype}, batch {args.batch}, " \
             f"per_image={per_image}, {device.type}"
    document = {
        "command": "lovasz-kernels bench " + " ".join(args.argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": _machine(),
        "versions": {p: _version(p) for p in (
            "lovasz-kernels", "torch", "numpy", "numba", "triton", "matplotlib", "tqdm")},
        "backends": {name: get_backend(name).details() for name in names},
        "settings": {"device": device.type, "repeat": repeat, "budget_s": args.budget,
                     "rows": rows, "reference": REFERENCE,
                     "timing": "wall clock, interleaved rounds, CUDA synchronized"},
        "byte_model": _baselines.ideal_bytes.__doc__ if gpu else None,
        "results": results,
    }
    json_path = os.path.join(out, BENCH_JSON)
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=1)
    print(f"wrote {json_path}")
    png_path = os.path.join(out, BENCH_PNG)
    if _plot(results, header, png_path):
        print(f"wrote {png_path}")
    if failed:
        print(f"{failed} result(s) disagree with the {REFERENCE} reference (MISMATCH, not timed)")
    return 1 if failed else 0


def _bench_table(result: dict, rows: list[str], heading: str, repeat: int,
                 device: torch.device) -> str:
    entries = result["rows"]

    def median(row: str) -> float | None:
        return entries.get(row, {}).get("median_s")

    cuda = _gpu_mode(device)
    header = ["backend", "median ms"]
    header += ["vs sort", "GB/s"] if cuda else [f"vs {REFERENCE}"]
    header += ["vs loop", "max |Δgrad| (tie groups)"]
    lines = []
    score_bytes = torch.finfo(DTYPES[result["dtype"]]).bits // 8
    model_bytes = _baselines.ideal_bytes(result["segments"] * result["pixels_per_segment"],
                                         result["batch"] * result["pixels"], score_bytes)
    sort_bytes = _baselines.SORT_PASS_BYTES * result["segments"] * result["pixels_per_segment"]
    for row in rows:
        entry = entries.get(row)
        if entry is None or entry["status"].startswith("skipped"):
            continue
        time_s = median(row)
        cells = [row, "-" if time_s is None else _ms(time_s)]

        def ratio(base: str, time_s=time_s) -> str:
            base_s = median(base)
            return "-" if base_s is None or time_s is None else f"{base_s / time_s:.2f}x"

        if cuda:
            gbps = None if time_s is None else (
                (sort_bytes if row == SORT_FLOOR else model_bytes) / time_s / 1e9)
            cells += [ratio(SORT_FLOOR) if row != SORT_FLOOR else "1.00x",
                      "-" if gbps is None else f"{gbps:.0f}"]
        else:
            cells.append(ratio(REFERENCE))
        cells.append(ratio(LOOP))
        deviation = entry.get("max_abs_grad_deviation")
        note = ("MISMATCH" if entry["status"].startswith("MISMATCH")
                else "(not checked)" if row == LOOP else "")
        cells.append(" ".join(filter(None, [
            "-" if deviation is None else f"{deviation:.1e}", note])))
        lines.append(cells)
    text = [f"{heading}, median of {repeat} interleaved rounds", _table(header, lines)]
    if cuda:
        text.append("GB/s: bytes of an ideal key build + one sort pass + post-sort pass "
                    "(_baselines.ideal_bytes) / median time; torch.sort: one pass over its keys")
    return "\n".join(text) + "\n"



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

    bench = commands.add_parser(
        "bench",
        help="time fwd+bwd of every available backend (and the per-class loop) on a grid",
        description="Cross-check each backend against the numpy reference, then time fwd+bwd "
        f"(interleaved rounds); print a table per combination and write {BENCH_JSON} and "
        f"{BENCH_PNG} into --out.",
    )
    bench.add_argument("--backend", help="comma-separated backends (default: all available)")
    bench.add_argument("--loss", choices=("softmax", "hinge"), default="softmax")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    bench.add_argument("--pixels", type=_int_list, metavar="SIDES",
                       help="comma-separated image sides, e.g. 256,512 (default "
                       f"{','.join(map(str, DEFAULT_SIDES))}; --quick: "
                       f"{','.join(map(str, QUICK_SIDES))})")
    bench.add_argument("--classes", type=_int_list, default=[21], metavar="COUNTS",
                       help="comma-separated class counts, one plot panel each (default 21; "
                       "softmax only)")
    bench.add_argument("--batch", type=int, default=1, help="images per batch (default 1)")
    bench.add_argument("--per-image", action=argparse.BooleanOptionalAction, default=None,
                       help="per-image IoU (default: off for softmax, on for hinge)")
    bench.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    bench.add_argument("--repeat", type=int, help="timed rounds (default 5; --quick: 3)")
    bench.add_argument("--budget", type=float, default=10.0, metavar="SECONDS",
                       help="skip calls estimated (from a smaller size) to take longer "
                       "(default 10)")
    bench.add_argument("--quick", action="store_true",
                       help=f"sides {','.join(map(str, QUICK_SIDES))}, 3 repeats")
    bench.add_argument("--out", default=".", help="folder for the JSON and PNG (default: .)")
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]
    try:
        return args.handler(args)
    except (ValueError, RuntimeError, TypeError) as exc:
        print(f"lovasz-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
