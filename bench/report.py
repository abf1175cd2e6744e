"""What ``mpsclip bench`` writes: ``results.json``, ``results.md``, PNG plots, and ``--compare`` of two runs.

``results.json`` (schema :data:`SCHEMA`): ``command`` (the command line that made it), ``machine`` (CPU model
and cores, load average at the start and end, GPU name and driver, torch/triton/onnxruntime versions),
``settings``, ``timing`` (seconds exporting, preparing, the timing estimate printed before timing and what
timing took), ``models`` (name, arch, checkpoint sha256), ``engines`` (one record per engine × precision:
``ok`` with export and load seconds and parity cosines, or ``skipped`` with the reason) and ``rows`` (one per
timed cell: first-call, p50/p90/p99 ms, items/s, samples, ratio to the plain baseline).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from mpsclip.errors import MPSCLIPError
from mpsclip.io import atomic_write

SCHEMA = "mpsclip-bench/2"
READABLE = ("mpsclip-bench/1", SCHEMA)
"""Schemas ``--compare`` reads (their rows are alike)."""
PLOTS = ("latency.png", "throughput.png", "ratios.png")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages now, to two decimals (a run records them at its start and end)."""
    return [round(x, 2) for x in os.getloadavg()]


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "onnxruntime": _version("onnxruntime"),
        "open_clip": _version("open_clip_torch"),
        "device": str(device),
        "gpu": None,
        "driver": None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # noqa: BLE001  (the driver version is informative only)
            info["driver"] = None
    return info


def command_line() -> str:
    argv = sys.argv[1:] if Path(sys.argv[0]).name in ("mpsclip", "__main__.py") else sys.argv
    return "mpsclip " + " ".join(argv)


def write_json(out: Path, result: dict[str, Any]) -> Path:
    return atomic_write(out / "results.json", json.dumps(result, indent=2) + "\n")


def read_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise MPSCLIPError(f"{path}: cannot read a bench result ({err}); pass a results.json of mpsclip bench") from err
    if result.get("schema") not in READABLE:
        raise MPSCLIPError(f"{path}: not a {SCHEMA} file (schema {result.get('schema')!r}); run mpsclip bench again")
    return result


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _shared_line(m: dict[str, Any]) -> str | None:
    """A warning when other processes competed for the CPU: a 1-minute load average above 1 before the run
    started, or above the core count + 1 at its end (the run itself keeps about one thread per core busy, so its
    own work alone lifts the end-of-run figure to about the core count)."""
    start, end = m["load_average"][0], (m.get("load_average_end") or m["load_average"])[0]
    if m["cores"] and (start > 1 or end > m["cores"] + 1):
        return (f"Shared machine: the 1-minute load average was {start} at the start and {end} at the end "
                f"on {m['cores']} cores, so other processes ran meanwhile and milliseconds are inflated; each group's "
                "cells were timed in interleaved rounds, so compare the `x plain` ratios, not milliseconds.")
    return None


def markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    where = m["gpu"] or f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads)"
    rounds = f"{s['repeats']} timed rounds per group" + (
        f" (at most; as many as fit --duration {s['duration']} s)" if s.get("duration") else "")
    lines = [
        "# mpsclip bench",
        "",
        f"Made by: `{result['command']}`",
        "",
        f"Machine: {where}; load average {m['load_average']} at the start, {m.get('load_average_end')} at the end; "
        f"torch {m['torch']}, triton {m['triton']}, onnxruntime {m['onnxruntime']}. Batch sizes {s['batch_sizes']}, "
        f"precisions {s['precisions']}. Each cell's first call and one probe call are timed when its engine is "
        f"loaded; then {max(0, s['warmup'] - 1)} more warm-up call(s) and {rounds}: one call of every cell of a "
        f"model, tower, batch and precision per round, the order rotating, on {s['rotating_inputs']} rotating random "
        "inputs. Latency in ms (p50/p90/p99); `x plain` is plain open_clip's p50 over the row's p50 in the same "
        "group (above 1: faster than plain).",
    ]
    if "timing" in result:
        t = result["timing"]
        lines += ["", f"Run: {t['total_s']:.0f} s in all; exports on the fly {t['exports_s']:.0f} s "
                      f"({s.get('build_workers')} process(es)), preparing (loading, exports, parity, probes) "
                      f"{t['prepare_s']:.0f} s; timing estimated {t['estimated_timing_s']:.0f} s before it started, "
                      f"took {t['timing_s']:.0f} s."]
    for extra in (_shared_line(m), result.get("note")):
        if extra:
            lines += ["", extra]
    lines += ["", "## Engines", "", "| model | engine | precision | status | export s | load s | parity min cosine |",
              "|---|---|---|---|---:|---:|---|"]
    for e in result["engines"]:
        cos = ", ".join(f"{t} {c:.6f}" for t, c in e["parity_min_cosine"].items())
        status = e["status"] if e["reason"] is None else f"{e['status']}: {e['reason']}"
        export = "" if e.get("export_s") is None else f"{e['export_s']:.1f}"
        load = "" if e.get("load_s") is None else f"{e['load_s']:.1f}"
        lines.append(f"| {e['model']} | {e['engine']} | {e['precision']} | {status} | {export} | {load} | {cos} |")
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in result["rows"]:
        groups[(r["model"], r["tower"])].append(r)
    for (model, tower), rows in groups.items():
        lines += ["", f"## {model}, {tower} tower", "",
                  "| engine | precision | batch | first call ms | p50 ms | p90 ms | p99 ms | items/s | samples "
                  "| x plain |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(rows, key=lambda r: (r["precision"], r["batch"])):
            lines.append(
                f"| {r['engine']} | {r['precision']} | {r['batch']} | {r['first_call_ms']:.1f} | {r['p50_ms']:.2f} | "
                f"{r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['items_per_s']:,.1f} | {r['samples']} | "
                f"{_ratio(r['ratio_to_plain'])} |"
            )
    return "\n".join(lines) + "\n"


def _series(rows: list[dict], model: str, tower: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["model"] == model and r["tower"] == tower:
            out[f"{r['engine']} {r['precision']}"].append(r)
    return {k: sorted(v, key=lambda r: r["batch"]) for k, v in out.items()}


def save_png(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return path


def plots(out: Path, result: dict[str, Any]) -> list[Path]:
    """latency.png (log-log latency vs batch), throughput.png (items/s vs batch), ratios.png (bars of x plain)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    panels = sorted({(r["model"], r["tower"]) for r in rows})
    if not panels:
        return []
    written = []
    for name, key, ylabel, log_y in (("latency.png", "p50_ms", "p50 latency (ms)", True),
                                     ("throughput.png", "items_per_s", "items / s", False)):
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, layout="constrained")
        for ax, (model, tower) in zip(axes[0], panels, strict=True):
            for label, series in _series(rows, model, tower).items():
                ax.plot([r["batch"] for r in series], [r[key] for r in series], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log" if log_y else "linear")
            ax.set_title(f"{model}, {tower}", fontsize=9)
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        written.append(save_png(fig, out / name))
        plt.close(fig)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, layout="constrained")
    for ax, (model, tower) in zip(axes[0], panels, strict=True):
        series = {k: v for k, v in _series(rows, model, tower).items() if not k.startswith("plain ")}
        batches = sorted({r["batch"] for v in series.values() for r in v})
        width = 0.8 / max(1, len(series))
        for i, (label, values) in enumerate(series.items()):
            by_batch = {r["batch"]: r["ratio_to_plain"] or 0.0 for r in values}
            ax.bar([j + i * width for j in range(len(batches))], [by_batch.get(b, 0.0) for b in batches], width,
                   label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(batches))], [str(b) for b in batches])
        ax.set_title(f"{model}, {tower}", fontsize=9)
        ax.set_xlabel("batch size")
        ax.set_ylabel("plain p50 / engine p50")
        ax.legend(fontsize=7)
    fig.suptitle("speed against plain open_clip in the same run: plain p50 / engine p50 (above 1: faster)")
    written.append(save_png(fig, out / "ratios.png"))
    plt.close(fig)
    return written


def write_all(out: Path, result: dict[str, Any]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [write_json(out, result), atomic_write(out / "results.md", markdown(result))]
    return written + plots(out, result)


def _key(row: dict) -> tuple:
    return (row["model"], row["engine"], row["tower"], row["batch"], row["precision"])


def compare(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    """Markdown with the two runs' rows side by side (p50 and ratio to plain; B/A of p50)."""
    left, right = {_key(r): r for r in a["rows"]}, {_key(r): r for r in b["rows"]}
    keys = sorted(set(left) | set(right), key=lambda k: (k[0], k[2], k[1], k[4], k[3]))
    where = [r["machine"]["gpu"] or f"{r['machine']['cpu']} x{r['machine']['cores']}" for r in (a, b)]
    lines = [
        f"# mpsclip bench: {names[0]} vs {names[1]}",
        "",
        f"{names[0]}: `{a['command']}` on {where[0]}",
        f"{names[1]}: `{b['command']}` on {where[1]}",
        "",
        f"| model | tower | engine | precision | batch | {names[0]} p50 ms | {names[1]} p50 ms | "
        f"{names[1]}/{names[0]} | {names[0]} x plain | {names[1]} x plain |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k in keys:
        ra, rb = left.get(k), right.get(k)
        pa = "–" if ra is None else f"{ra['p50_ms']:.2f}"
        pb = "–" if rb is None else f"{rb['p50_ms']:.2f}"
        change = "–" if ra is None or rb is None else f"{rb['p50_ms'] / ra['p50_ms']:.2f}"
        xa = "–" if ra is None else _ratio(ra["ratio_to_plain"])
        xb = "–" if rb is None else _ratio(rb["ratio_to_plain"])
        lines.append(f"| {k[0]} | {k[2]} | {k[1]} | {k[4]} | {k[3]} | {pa} | {pb} | {change} | {xa} | {xb} |")
    return "\n".join(lines) + "\n"
