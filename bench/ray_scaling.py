"""``mpsclip embed --ray`` across hosts: items/s with 1, 2 and 3 worker hosts of one CPU each, against one process.

A real multi-node cluster is made on this machine (:mod:`mpsclip.bench.raycluster`: hosts in network namespaces,
run as root): a head host for the driver and three worker hosts of ``--num-cpus 1``. The same synthetic source is
embedded by a single process on one thread and by the cluster with 1, 2 and 3 actors (one per host). Each run's
time is the job's own (``mpsclip embed``'s summary: listing the source to the last shard, so actor start-up is
included) and its steady rate the items recorded after the first shard over the time from the first shard's record
to the last (``--ray-log`` times: start-up excluded); its store is checked byte-identical to the single process's,
and the hosts that embedded its shards are recorded. The scheduling overhead per shard is the difference in job
time between small and large shards on one host, divided by the difference in shard counts (start-up cancels out).

    sudo .venv/bin/python -m mpsclip.bench.ray_scaling --out bench/results/CPU-x2-ray-cluster --checkpoint m.safetensors

Writes ``results.json`` and ``results.md``. On a machine of two cores the three hosts share them: the figures say
what the scheduling costs and that shards spread, not what three real machines would gain.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mpsclip.bench.raycluster import RayCluster, netns_unavailable, ray_cluster
from mpsclip.bench.report import command_line, cpu_model, load_average, write_json

from mpsclip.data.synth import generate
from mpsclip.errors import MPSCLIPError
from mpsclip.io import atomic_write

SUMMARY = re.compile(r"(\d+) of (\d+) items embedded in (\d+) shards \(([\d.]+) s")


def _embed(prefix: list[str], source: Path, store: Path, ckpt: Path, shard: int, extra: list[str]) -> dict[str, Any]:
    args = ["embed", str(source), "--out", str(store), "--checkpoint", str(ckpt), "--shard-size", str(shard)]
    args += ["--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet", *extra]
    env = ["env", "OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1"]
    done = subprocess.run([*prefix, *env, sys.executable, "-m", "mpsclip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise MPSCLIPError(f"mpsclip embed failed ({done.returncode}): {done.stderr[-2000:]}")
    found = SUMMARY.search(done.stdout)
    if found is None:
        raise MPSCLIPError(f"no summary line in mpsclip embed's output: {done.stdout[-500:]}")
    embedded, items, shards, seconds = found.groups()
    return {"items": int(items), "embedded": int(embedded), "shards": int(shards), "seconds": float(seconds)}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def _ray_run(cluster: RayCluster, source: Path, work: Path, ckpt: Path, shard: int, actors: int) -> dict[str, Any]:
    store, log = work / f"ray-{actors}-{shard}", work / f"ray-{actors}-{shard}.jsonl"
    extra = ["--ray", "--ray-address", cluster.address, "--ray-actors", str(actors), "--ray-log", str(log)]
    run = _embed(cluster.exec_prefix(), source, store, ckpt, shard, extra)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    hosts = sorted({r["node"] for r in records})
    span = records[-1]["recorded_at"] - records[0]["recorded_at"]
    steady = sum(r["items"] for r in records[1:]) / span if span > 0 else None
    return run | {"actors": actors, "hosts": hosts, "shard_compute_s": round(sum(r["seconds"] for r in records), 3),
                  "steady_rate": steady, "store": store}


def measure(ckpt: Path, images: int, shard: int, work: Path) -> dict[str, Any]:
    generate(work / "synth", n_train=0, n_test=images, seed=0, image_size=64, workers=1)
    source = work / "synth" / "images"
    single = _embed([], source, work / "single", ckpt, shard, [])
    reference = _files(work / "single")
    rows = [{"run": "single process, 1 thread", **single, "rate": single["embedded"] / single["seconds"]}]
    with ray_cluster(workers=3) as cluster:
        for actors in (1, 2, 3):
            run = _ray_run(cluster, source, work, ckpt, shard, actors)
            identical = _files(run.pop("store")) == reference
            rows.append({"run": f"Ray, {actors} host(s)", **run, "rate": run["embedded"] / run["seconds"],
                         "identical_store": identical})
        small = _ray_run(cluster, source, work, ckpt, max(1, shard // 4), 1)
    small.pop("store")
    big = rows[1]
    overhead = (small["seconds"] - big["seconds"]) / (small["shards"] - big["shards"])
    return {"rows": rows, "overhead": {"small_shards": small, "per_shard_s": round(overhead, 4)}}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# `mpsclip embed --ray` on a multi-node cluster (hosts in network namespaces)",
        "",
        f"`{result['command']}`",
        "",
        f"{m['cpu']}, {m['cores']} cores shared by all hosts; load average {m['load_start']} at the start, "
        f"{m['load_end']} at the end. {result['settings']['images']} synthetic 64-px images, shards of "
        f"{result['settings']['shard_size']}, tiny random-weight model, fp32, one thread per host.",
        "",
        "| run | hosts used | items | shards | job s | items/s | vs single | steady items/s | vs single | same store |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = result["rows"][0]["rate"]
    for row in result["rows"]:
        hosts = ", ".join(row.get("hosts", [])) or "-"
        same = {True: "yes", False: "NO"}.get(row.get("identical_store"), "-")
        steady = row.get("steady_rate")
        steady_cells = f"{steady:.1f} | {steady / base:.2f}x" if steady else "- | -"
        lines.append(f"| {row['run']} | {hosts} | {row['embedded']} | {row['shards']} | {row['seconds']:.1f} | "
                     f"{row['rate']:.1f} | {row['rate'] / base:.2f}x | {steady_cells} | {same} |")
    over = result["overhead"]
    lines += ["", f"Scheduling overhead per shard (one host, shards of {result['settings']['shard_size']} vs "
              f"{max(1, result['settings']['shard_size'] // 4)}): {over['per_shard_s'] * 1000:.0f} ms.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the model to embed with")
    parser.add_argument("--images", type=int, default=768, help="synthetic images (default: 768)")
    parser.add_argument("--shard-size", type=int, default=16, help="items per shard (default: 16)")
    args = parser.parse_args(argv)
    why = netns_unavailable()
    if why is not None:
        raise SystemExit(f"mpsclip.bench.ray_scaling: {why}")
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="mpsray-bench-") as work:
        measured = measure(args.checkpoint.resolve(), args.images, args.shard_size, Path(work))
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_start": load_start,
               "load_end": load_average()}
    result = {"command": command_line(), "machine": machine,
              "settings": {"images": args.images, "shard_size": args.shard_size}, **measured}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    atomic_write(args.out / "results.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
