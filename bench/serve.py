"""Load on ``mpsclip serve`` over loopback: latency percentiles, requests/s and errors per concurrency level.

A seeded synthetic store is embedded with a random-weight checkpoint (``--arch``, or ``--checkpoint``), then for
each serving configuration an ``mpsclip serve`` subprocess is started on free 127.0.0.1 ports and loaded with
``POST /search`` text and image queries by ``c`` concurrent clients (aiohttp), each cell bounded by ``--requests``
and ``--seconds``. Configurations: ``triton`` (Triton towers, dynamic batching, the default queue delay),
``triton-unbatched`` (Triton, dynamic batching off: one request per tower call), ``no-triton`` (towers in the API's
process behind its own batcher). ``--queue-delays`` adds Triton runs with other queue delays (text queries at the
lowest and highest concurrency only), the measurement the default delay is chosen from. Rows per tower call come
from the server's own ``mpsclip_batch_size`` histogram. Writes ``serve-load.json``, ``serve-load.md`` and
``serve-load.png`` under ``--out``.

example:
  python -m mpsclip.bench.serve --out bench/results --arch MPS-Tiny --concurrency 1,8,32 --requests 300 --seconds 8
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mpsclip.bench.report import load_average, machine, save_png

from mpsclip.errors import MPSCLIPError
from mpsclip.io import atomic_write

SCHEMA = "mpsclip-bench-serve/1"
CONFIGS = ("triton", "triton-unbatched", "no-triton")
KINDS = ("text", "image")
HOST = "127.0.0.1"
QUERIES = ("an airport", "a harbour with boats", "storage tanks", "a dense residential area", "a river bridge",
           "farmland with fields", "a stadium", "a parking lot with cars", "a beach", "a forest")


@dataclass(frozen=True)
class LoadSettings:
    concurrency: tuple[int, ...] = (1, 8, 32)
    kinds: tuple[str, ...] = KINDS
    configs: tuple[str, ...] = CONFIGS
    requests: int = 300
    seconds: float = 8.0
    warmup: int = 8
    queue_delays: tuple[int, ...] = ()
    arch: str = "MPS-Tiny"
    checkpoint: str | None = None
    images: int = 16
    k: int = 10
    start_timeout_s: float = 300.0

    def check(self) -> None:
        unknown = [c for c in self.configs if c not in CONFIGS] + [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise MPSCLIPError(f"--configs/--kinds: unknown {', '.join(unknown)}; choose from {CONFIGS} and {KINDS}")
        if not self.concurrency or min(self.concurrency) < 1 or self.requests < 1 or self.seconds <= 0:
            raise MPSCLIPError("--concurrency levels, --requests and --seconds must be positive")


@dataclass
class Server:
    """One ``mpsclip serve`` subprocess and what its start and stop took."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    home: str
    start_s: float = 0.0
    stop_s: float | None = None
    exit_code: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind((HOST, 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def make_store(settings: LoadSettings, work: Path) -> tuple[Path, Path]:
    """A seeded synthetic store (``images`` 64-px scenes, global embeddings only) and its checkpoint."""
    from mpsclip.archive.job import EmbedSettings, embed_archive
    from mpsclip.data.synth import generate
    from mpsclip.model import MPSCLIP

    generate(work / "synth", n_train=0, n_test=settings.images, seed=0, image_size=64, workers=1)
    if settings.checkpoint is None:
        torch.manual_seed(0)
        checkpoint = MPSCLIP(settings.arch).eval().save(work / "ckpt" / "random")
    else:
        checkpoint = Path(settings.checkpoint)
    store = work / "store"
    embed = EmbedSettings(perspectives="none", batch_size=16, device="cpu")
    embed_archive(work / "synth" / "images", store, checkpoint, settings=embed, progress=False)
    return store, Path(checkpoint)


def start_server(name: str, store: Path, flags: list[str], work: Path, timeout_s: float) -> Server:
    """``mpsclip serve`` with ``flags`` on free ports; returns once a text query answers 200."""
    api, http, grpc, metrics = free_ports(4)
    home = tempfile.mkdtemp(prefix="pyt", dir="/tmp")  # short: PyTriton's AF_UNIX sockets live below it
    log = work / f"{name}.log"
    cmd = [sys.executable, "-m", "mpsclip", "serve", str(store), "--host", HOST, "--port", str(api),
           "--triton-http-port", str(http), "--triton-grpc-port", str(grpc), "--triton-metrics-port", str(metrics),
           "--max-queue", "1024", *flags]
    env = {**os.environ, "PYTRITON_HOME": home}
    begin = time.perf_counter()
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(name, api, process, log, home)
    body = json.dumps({"text": QUERIES[0], "k": 1}).encode()
    while True:
        if process.poll() is not None:
            shutil.rmtree(home, ignore_errors=True)
            raise MPSCLIPError(f"mpsclip serve ({name}) exited with {process.returncode}; see {log}:\n"
                               + log.read_text(errors="replace")[-3000:])
        if time.perf_counter() - begin > timeout_s:
            stop_server(server)
            raise MPSCLIPError(f"mpsclip serve ({name}) not answering after {timeout_s:.0f} s; see {log}")
        try:
            request = urllib.request.Request(f"{server.url}/search", body, {"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                if response.status == 200:
                    break
        except urllib.error.HTTPError as err:  # it listens but answers wrong: waiting longer will not help
            answer = err.read().decode(errors="replace")[:500]
            stop_server(server)
            raise MPSCLIPError(f"mpsclip serve ({name}) answered a test query with {err.code}: {answer}; "
                               f"see {log}") from err
        except OSError:
            time.sleep(0.5)
    server.start_s = time.perf_counter() - begin
    return server


def stop_server(server: Server, timeout_s: float = 90.0) -> None:
    """SIGINT, as Ctrl-C; records how long the drain and stop took and the exit code."""
    begin = time.perf_counter()
    server.process.send_signal(signal.SIGINT)
    try:
        server.exit_code = server.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.exit_code = server.process.wait()
    server.stop_s = time.perf_counter() - begin
    shutil.rmtree(server.home, ignore_errors=True)


def batch_histogram(url: str) -> tuple[float, float]:
    """``(sum, count)`` of the server's ``mpsclip_batch_size`` histogram: rows and tower calls so far."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    values = {}
    for name in ("sum", "count"):
        match = re.search(rf"^mpsclip_batch_size_{name} (\S+)$", text, re.MULTILINE)
        values[name] = float(match.group(1)) if match else 0.0
    return values["sum"], values["count"]


def bodies(kind: str, images: list[bytes], k: int) -> list[dict[str, Any]]:
    if kind == "text":
        return [{"text": q, "k": k} for q in QUERIES]
    return [{"image": base64.b64encode(data).decode(), "k": k} for data in images]


async def load(url: str, payloads: list[dict[str, Any]], concurrency: int, requests: int, seconds: float
               ) -> dict[str, Any]:
    """``concurrency`` clients posting ``payloads`` in turn until ``requests`` were sent or ``seconds`` passed."""
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = itertools.count()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:

        async def client() -> None:
            while loop.time() < deadline and (i := next(counter)) < requests:
                begin = time.perf_counter()
                try:
                    async with session.post(f"{url}/search", json=payloads[i % len(payloads)]) as response:
                        await response.read()
                        status = str(response.status)
                except (aiohttp.ClientError, TimeoutError) as err:
                    status = type(err).__name__
                if status == "200":
                    latencies.append(time.perf_counter() - begin)
                else:
                    errors[status] = errors.get(status, 0) + 1

        begin = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - begin
    sent = len(latencies) + sum(errors.values())
    ms = 1000 * np.asarray(latencies) if latencies else np.asarray([np.nan])
    return {
        "requests": sent, "ok": len(latencies), "errors": errors, "error_rate": (sent - len(latencies)) / max(sent, 1),
        "wall_s": wall, "requests_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(np.mean(ms)),
    }


def measure_server(server: Server, kinds: tuple[str, ...], concurrency: tuple[int, ...], images: list[bytes],
                   settings: LoadSettings, say: Any) -> list[dict[str, Any]]:
    rows = []
    for kind in kinds:
        payloads = bodies(kind, images, settings.k)
        asyncio.run(load(server.url, payloads, 2, settings.warmup, settings.seconds))
        for c in concurrency:
            rows_before, calls_before = batch_histogram(server.url)
            cell = asyncio.run(load(server.url, payloads, c, settings.requests, settings.seconds))
            rows_after, calls_after = batch_histogram(server.url)
            calls = calls_after - calls_before
            row = {"config": server.name, "kind": kind, "concurrency": c, **cell, **server.extra,
                   "rows_per_tower_call": (rows_after - rows_before) / calls if calls else None}
            rows.append(row)
            say(f"  {server.name:<22} {kind:<5} c={c:<3} {row['requests_per_s']:7.1f} req/s  "
                f"p50 {row['p50_ms']:7.1f}  p99 {row['p99_ms']:7.1f} ms  errors {row['error_rate']:.1%}  "
                f"rows/call {row['rows_per_tower_call'] or 0:.1f}")
    return rows


def config_flags(name: str) -> list[str]:
    return {"triton": ["--triton"], "triton-unbatched": ["--triton", "--no-batching"],
            "no-triton": ["--no-triton"]}[name]


def acceptance(rows: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """The issue's bar: at ``concurrency``, Triton dynamic batching at least doubles text requests/s over
    unbatched Triton, with p99 at most 2x unbatched's."""
    def cell(config: str) -> dict[str, Any] | None:
        found = [r for r in rows if r["config"] == config and r["kind"] == "text" and r["concurrency"] == concurrency
                 and "queue_delay_us" not in r]
        return found[0] if found else None

    batched, unbatched = cell("triton"), cell("triton-unbatched")
    if batched is None or unbatched is None:
        return {"concurrency": concurrency, "met": None, "reason": "needs text rows of triton and triton-unbatched"}
    speedup = batched["requests_per_s"] / unbatched["requests_per_s"] if unbatched["requests_per_s"] else None
    p99_ratio = batched["p99_ms"] / unbatched["p99_ms"]
    met = speedup is not None and speedup >= 2 and p99_ratio <= 2
    return {"concurrency": concurrency, "throughput_ratio": speedup, "p99_ratio": p99_ratio, "met": met}


def bench_serve(settings: LoadSettings, out: Path, command: str, say: Any = print) -> dict[str, Any]:
    """Run every configuration and write ``out``/serve-load.{json,md,png}; ``command`` is what made them."""
    settings.check()
    load_start = load_average()
    rows: list[dict[str, Any]] = []
    servers: list[dict[str, Any]] = []
    begin = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mpsclip-bench-serve-"))
    try:
        store, checkpoint = make_store(settings, work)
        images = [p.read_bytes() for p in sorted((work / "synth" / "images").glob("*.png"))]
        plan = [(name, config_flags(name), settings.kinds, settings.concurrency, {}) for name in settings.configs]
        edges = tuple(sorted({min(settings.concurrency), max(settings.concurrency)}))
        plan += [(f"triton-delay-{d}us", ["--triton", "--triton-queue-delay-us", str(d)], ("text",), edges,
                  {"queue_delay_us": d}) for d in settings.queue_delays]
        for name, flags, kinds, levels, extra in plan:
            say(f"starting {name} ...")
            server = start_server(name, store, flags, work, settings.start_timeout_s)
            server.extra = extra
            try:
                rows += measure_server(server, kinds, levels, images, settings, say)
            finally:
                stop_server(server)
            servers.append({"config": name, "flags": flags, "start_s": server.start_s, "stop_s": server.stop_s,
                            "exit_code": server.exit_code})
    except BaseException:
        say(f"the servers' logs are kept in {work}")  # the error names one of them
        raise
    shutil.rmtree(work, ignore_errors=True)
    from mpsclip.serve.triton import QUEUE_DELAY_US

    result = {
        "schema": SCHEMA,
        "command": command,
        "machine": {**machine(torch.device("cpu")), "load_average": load_start,
                    "load_average_end": load_average()},
        "settings": {**asdict(settings), "default_queue_delay_us": QUEUE_DELAY_US},
        "model": f"{settings.arch}, random weights (torch seed 0)" if settings.checkpoint is None else str(checkpoint),
        "servers": servers,
        "rows": rows,
        "acceptance": acceptance(rows, max(settings.concurrency)),
        "total_s": time.perf_counter() - begin,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "serve-load.json", json.dumps(result, indent=2) + "\n")
    atomic_write(out / "serve-load.md", markdown(result))
    plot(out / "serve-load.png", result)
    return result


def _f(value: float | None, fmt: str = ".1f") -> str:
    return "–" if value is None or value != value else format(value, fmt)


def markdown(result: dict[str, Any]) -> str:
    m, s, a = result["machine"], result["settings"], result["acceptance"]
    lines = [
        "# mpsclip serve under load (loopback)",
        "",
        f"Made by: `{result['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); load average "
        f"{m['load_average']} at the start, {m['load_average_end']} at the end (the client, the API and Triton share "
        f"these cores). Model: {result['model']}, fp32, CPU; store of {s['images']} items. Each cell: "
        f"`POST /search` (k={s['k']}) from c concurrent aiohttp clients until {s['requests']} requests or "
        f"{s['seconds']} s; latency of answered requests, requests/s = answered / wall time; rows per tower call "
        f"from the server's `mpsclip_batch_size` histogram. Triton dynamic batching: max batch 32, queue delay "
        f"{s['default_queue_delay_us']} µs. "
        f"Total {result['total_s']:.0f} s.",
    ]
    lines += shared_line(m)
    lines.append("")
    if a.get("met") is None:
        lines.append(f"Acceptance (text, c={a['concurrency']}): not measured ({a['reason']}).")
    else:
        lines.append(
            f"Acceptance (text, c={a['concurrency']}: dynamic batching ≥ 2x the requests/s of unbatched Triton, p99 "
            f"≤ 2x): throughput {a['throughput_ratio']:.2f}x, p99 {a['p99_ratio']:.2f}x → "
            f"**{'met' if a['met'] else 'not met'}**.")
    lines += ["", "| config | kind | c | requests | req/s | p50 ms | p95 ms | p99 ms | errors | rows/call |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['config']} | {r['kind']} | {r['concurrency']} | {r['requests']} | {_f(r['requests_per_s'])} "
            f"| {_f(r['p50_ms'])} | {_f(r['p95_ms'])} | {_f(r['p99_ms'])} | {r['error_rate']:.1%} "
            f"| {_f(r['rows_per_tower_call'])} |")
    lines += delay_lines(result)
    lines += ["", "| server | start s (to first answer) | stop s (SIGINT to exit) | exit code |",
              "|---|---:|---:|---:|"]
    for sv in result["servers"]:
        lines.append(f"| {sv['config']} | {sv['start_s']:.1f} | {_f(sv['stop_s'])} | {sv['exit_code']} |")
    return "\n".join(lines) + "\n"


def delay_lines(result: dict[str, Any]) -> list[str]:
    """The queue-delay sweep: text p50 at the lowest and requests/s at the highest concurrency per delay."""
    default = result["settings"]["default_queue_delay_us"]
    runs = {default: [r for r in result["rows"] if r["config"] == "triton" and r["kind"] == "text"]}
    for r in result["rows"]:
        if "queue_delay_us" in r:
            runs.setdefault(r["queue_delay_us"], []).append(r)
    if len(runs) < 2:
        return []
    lines = ["", "Triton queue delay sweep (text queries; each delay is its own server start):", "",
             "| queue delay µs | lowest c: p50 ms | highest c: req/s | highest c: p99 ms | highest c: rows/call |",
             "|---:|---:|---:|---:|---:|"]
    for delay in sorted(runs):
        rows = sorted(runs[delay], key=lambda r: r["concurrency"])
        if not rows:
            continue
        low, high = rows[0], rows[-1]
        mark = " (default)" if delay == default else ""
        lines.append(f"| {delay}{mark} | {_f(low['p50_ms'])} | {_f(high['requests_per_s'])} | {_f(high['p99_ms'])} "
                     f"| {_f(high['rows_per_tower_call'])} |")
    return lines


def shared_line(machine: dict[str, Any]) -> list[str]:
    busiest = max(machine["load_average"][0], machine["load_average_end"][0])
    if not machine["cores"] or busiest <= machine["cores"]:
        return []
    return ["", f"Shared machine: 1-minute load average up to {busiest} on {machine['cores']} cores, so other "
                "processes competed with the client, the API and Triton for the cores. Compare configurations "
                "within this run, not with other runs."]


def plot(path: Path, result: dict[str, Any]) -> Path:
    """Requests/s (top) and p99 ms (bottom) against concurrency, one panel per query kind, a line per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KINDS if any(r["kind"] == k for r in result["rows"])]
    fig, axes = plt.subplots(2, len(kinds), figsize=(5.5 * len(kinds), 7), squeeze=False)
    for col, kind in enumerate(kinds):
        for config in dict.fromkeys(r["config"] for r in result["rows"] if r["kind"] == kind):
            rows = [r for r in result["rows"] if r["kind"] == kind and r["config"] == config]
            xs = [r["concurrency"] for r in rows]
            axes[0][col].plot(xs, [r["requests_per_s"] for r in rows], "o-", label=config)
            axes[1][col].plot(xs, [r["p99_ms"] for r in rows], "o-", label=config)
        axes[0][col].set_title(f"{kind} queries")
        axes[0][col].set_ylabel("requests / s")
        axes[1][col].set_ylabel("p99 latency (ms)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"mpsclip serve, {result['settings']['arch']}, loopback, {result['machine']['cores']} cores")
    save_png(fig, path)
    plt.close(fig)
    return path


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpsclip.bench.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for serve-load.json/.md/.png")
    parser.add_argument("--arch", default="MPS-Tiny", help="random-weight model to serve (default: MPS-Tiny)")
    parser.add_argument("--checkpoint", help="serve this checkpoint instead of a random --arch one")
    parser.add_argument("--concurrency", type=_ints, default=(1, 8, 32), help="client counts (default: 1,8,32)")
    parser.add_argument("--kinds", type=_names, default=KINDS, help="text,image (default: both)")
    parser.add_argument("--configs", type=_names, default=CONFIGS, help=f"default: {','.join(CONFIGS)}")
    parser.add_argument("--requests", type=int, default=300, help="most requests per cell (default: 300)")
    parser.add_argument("--seconds", type=float, default=8.0, help="most seconds per cell (default: 8)")
    parser.add_argument("--queue-delays", type=_ints, default=(), metavar="US,US",
                        help="extra Triton runs with these queue delays (text, lowest and highest concurrency)")
    parser.add_argument("--images", type=int, default=16, help="items in the synthetic store (default: 16)")
    args = parser.parse_args(argv)
    settings = LoadSettings(
        concurrency=args.concurrency, kinds=args.kinds, configs=args.configs, requests=args.requests,
        seconds=args.seconds, queue_delays=args.queue_delays, arch=args.arch, checkpoint=args.checkpoint,
        images=args.images,
    )
    argv = sys.argv[1:] if argv is None else argv
    result = bench_serve(settings, args.out, " ".join(["python -m mpsclip.bench.serve", *argv]))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
