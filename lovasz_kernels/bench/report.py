"""Reporting: a table per workload, the JSON document, the plot, the progress bar.

Everything here formats records made by :mod:`lovasz_kernels.bench.engine` (plain dicts), so
the GPU tables can be produced and tested from made-up records on a machine without a GPU.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from importlib import metadata

import torch

from lovasz_kernels._registry import get_backend
from lovasz_kernels.bench import floors
from lovasz_kernels.bench.rules import REFERENCE
from lovasz_kernels.bench.workloads import FLOOR, LOOP, TORCH_FLOAT64

BENCH_JSON = "lovasz-bench.json"
BENCH_PNG = "lovasz-bench.png"
INSTALL_BENCH = "pip install matplotlib tqdm"
MB = 1e6


def format_table(header: Sequence[str], lines: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns two spaces apart, a dashed rule under the header."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]

    def line(cells: Sequence[object]) -> str:
        return "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, lines)])


def format_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3f}" if abs(ms) < 10 else f"{ms:.1f}"


def _ratio(numerator: float | None, denominator: float | None, suffix: str = "") -> str:
    if numerator is None or not denominator:
        return "-"
    return f"{numerator / denominator:.2f}{suffix}"


def card_name(device: torch.device | str) -> str | None:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)


def context(settings, clock_name: str, memory: str, card: str | None = None) -> dict:
    """What every table of a run shares: layout, rounds, clock, memory method, the card."""
    device = settings.device.type + (f" ({card})" if card else "")
    return {"layout": settings.layout, "repeat": settings.repeat, "device": device,
            "clock": clock_name, "memory": memory, "card": card,
            "hbm_peak_gbps": floors.hbm_peak_gbps(card) if card else None}


def workload_table(result: dict, ctx: dict) -> str:
    """The table of one workload's record, with the notes that explain its columns."""
    entries = result["contenders"]

    def median(name: str) -> float | None:
        return entries.get(name, {}).get("median_s")

    gpu = ctx["layout"] == "gpu"
    peak_gbps = ctx.get("hbm_peak_gbps")
    header = ["backend", "median ms"]
    if gpu:
        header += ["/ floor", "non-sort ms", "GB/s"] + (["% HBM peak"] if peak_gbps else [])
        header += ["vs torch"]
    elif REFERENCE in entries:
        header += [f"vs {REFERENCE}"]
    header += ["vs loop"] + ([] if gpu else ["/ floor"])
    header += ["peak MB", "x input", "max |Δgrad| (tie groups)"]
    lines = []
    for name, entry in entries.items():
        if entry["status"].startswith("skipped"):
            continue
        seconds = entry.get("median_s")
        cells = [name, format_ms(seconds)]
        if gpu:
            floor_s = median(FLOOR)
            byte_count = result["bytes_model"]["floor" if name == FLOOR else "ideal"]
            gbps = None if seconds is None else byte_count / seconds / 1e9
            non_sort = (None if name == FLOOR or seconds is None or floor_s is None
                        else seconds - floor_s)
            cells += [_ratio(seconds, floor_s), format_ms(non_sort),
                      "-" if gbps is None else f"{gbps:.0f}"]
            if peak_gbps:
                cells.append("-" if gbps is None else f"{100 * gbps / peak_gbps:.0f}%")
            cells.append(_ratio(median("torch"), seconds, "x"))
        elif REFERENCE in entries:
            cells.append(_ratio(median(REFERENCE), seconds, "x"))
        cells.append(_ratio(median(LOOP), seconds, "x"))
        if not gpu:
            cells.append(_ratio(seconds, median(FLOOR)))
        peak = entry.get("peak_bytes")
        cells += ["-" if peak is None else f"{peak / MB:.1f}",
                  "-" if peak is None else f"{peak / result['input_bytes']:.2f}x"]
        deviation = entry.get("max_abs_grad_deviation")
        status = entry["status"]
        note = ("MISMATCH" if status.startswith("MISMATCH") else "ERROR" if
                status.startswith("ERROR") else "(not checked)" if name == LOOP else "")
        cells.append(" ".join(filter(None, ["-" if deviation is None else f"{deviation:.1e}",
                                             note])))
        lines.append(cells)
    heading = (f"{result['description']}, {ctx['device']}, median of {ctx['repeat']} "
               f"interleaved rounds ({ctx['clock']})")
    return "\n".join([heading, format_table(header, lines), *_notes(result, ctx)]) + "\n"


def _notes(result: dict, ctx: dict) -> list[str]:
    keys = result["sorted_segments"] * result["pixels_per_segment"]
    checked = ("the numpy reference" if result["reference"] == REFERENCE
               else "the torch backend in float64 on the same device (the numpy reference "
               "would take too long)" if result["reference"] == TORCH_FLOAT64
               else result["reference"])
    notes = [f"cross-check: against {checked}"]
    if ctx["layout"] == "gpu":
        notes += [
            f"floor: one torch.sort (descending, per row) of the {result['sorted_segments']} x "
            f"{result['pixels_per_segment']} integer keys the triton backend sorts; "
            "non-sort ms = median - the floor's median (a difference, not a measurement)",
            "GB/s: bytes of an ideal key build + one sort pass + post-sort pass "
            "(bench.floors.ideal_bytes) / median; the floor: one pass over its keys",
        ]
        card, peak = ctx.get("card"), ctx.get("hbm_peak_gbps")
        if peak:
            notes.append(f"% HBM peak: of the {card}'s {peak / 1e3:g} TB/s")
        else:
            notes.append(f"no % HBM peak column: the peak bandwidth of {card or 'this device'}"
                         " is unknown (bench.floors.HBM_PEAK_TBPS)")
    else:
        notes.append(f"floor: np.sort of {keys} random packed uint64 keys "
                     f"({result['sorted_segments']} segments over the available threads)")
    memory = ctx["memory"]
    if any("peak_bytes" in e for e in result["contenders"].values()):
        notes.append(f"peak MB: {memory}; x input: over the "
                     f"{result['input_bytes'] / MB:.1f} MB input")
    elif memory:
        notes.append(f"peak memory not measured: {memory}")
    return ["  " + note for note in notes]


# --------------------------------------------------------------------------------------------
# JSON


def versions() -> dict:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {p: version(p) for p in ("lovasz-kernels", "torch", "numpy", "numba", "triton",
                                   "matplotlib", "tqdm")}


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads_available": floors.available_threads(),
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


def document(command: str, settings, ctx: dict, results: list[dict]) -> dict:
    """The JSON record of a run: command, machine, versions, settings, every sample."""
    return {
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "versions": versions(),
        "backends": {name: get_backend(name).details() for name in settings.backends},
        "settings": {"device": ctx["device"], "layout": settings.layout,
                     "repeat": settings.repeat, "budget_s": settings.budget_s,
                     "contenders": settings.contenders, "timing": ctx["clock"],
                     "memory": ctx["memory"], "hbm_peak_gbps": ctx["hbm_peak_gbps"],
                     "chunk_floor_bytes": ctx.get("chunk_floor_bytes")},
        "byte_model": floors.ideal_bytes.__doc__ if settings.layout == "gpu" else None,
        "results": results,
    }


def write_json(doc: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(doc, handle, indent=1)


# --------------------------------------------------------------------------------------------
# plot and progress


def plot(results: list[dict], title: str, path: str) -> bool:
    """Log-log median time vs pixels per image, a line per contender, a panel per class count.

    Returns False (saying why) when matplotlib is missing.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter
    except ImportError:
        print(f"matplotlib is not installed: no plot ({INSTALL_BENCH})")
        return False
    panels = sorted({r["classes"] for r in results}, key=lambda c: -1 if c is None else c)
    fig = Figure(figsize=(5.2 * len(panels), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    labels = {LOOP: "per-class loop (public)", FLOOR: "sort floor"}
    for ax, classes in zip(axes, panels):
        series: dict[str, list[tuple[int, float]]] = {}
        for result in results:
            if result["classes"] != classes:
                continue
            for name, entry in result["contenders"].items():
                if entry.get("median_s") is not None:
                    point = (result["pixels_per_image"], entry["median_s"])
                    series.setdefault(name, []).append(point)
        for name, points in series.items():
            points.sort()
            style = {"linestyle": "--", "color": "0.4" if name == LOOP else "0.7"} \
                if name in labels else {}
            ax.loglog(*zip(*points), marker="o", label=labels.get(name, name), **style)
        sides = sorted({r["side"] for r in results if r["classes"] == classes})
        ax.set_xticks([side * side for side in sides], [f"{side}²" for side in sides])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("pixels per image")
        ax.set_ylabel("median time (s)")
        ax.set_title("binary (hinge)" if classes is None else f"{classes} classes")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.savefig(path, dpi=120)
    return True


class Progress:
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
