"""Server-side score time of one exact fused query over an in-memory store vs a numpy matrix-vector product.

The store is synthetic (seeded random fp16 unit rows, as `mpsclip serve` holds them); the served path is
:meth:`mpsclip.serve.catalog.Store.topk` (the same scoring as 'mpsclip search --exact' on the CPU), the reference
is ``matrix @ q`` in numpy fp32 (and fp16) plus ``argpartition`` for the top-k. The paths are timed in interleaved
rounds (:func:`mpsclip.bench.timing.time_group`: one call of each per round, the order rotating, the query
rotating), so that a load drifting on a shared machine weighs on all of them alike; the ratio reported is the
median over rounds of served / fp32 matvec within the round. Writes JSON and markdown to --out.

example:
  python -m mpsclip.bench.serve_score --out bench/results/serve-score --items 100000
  python -m mpsclip.bench.serve_score --out /tmp/score --items 2000 --dim 64 --rounds 5 --no-fp16
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from mpsclip.bench.timing import Cell, Timer, TimingSettings, time_group
from mpsclip.serve.catalog import Store

from mpsclip.io import atomic_write

QUERIES = 4  # rotating query vectors: no cache sees the same query twice in a row
SERVED = "served Store.topk (fp16 store)"
FP32, FP16 = "numpy fp32 matvec + argpartition", "numpy fp16 matvec + argpartition"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output prefix (writes .json and .md)")
    parser.add_argument("--items", type=int, default=100_000, help="store rows (default: 100000)")
    parser.add_argument("--dim", type=int, default=512, help="embedding size (default: 512)")
    parser.add_argument("-k", type=int, default=10, help="hits per query (default: 10)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds, one call of each path per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each path first (default: 2)")
    parser.add_argument("--no-fp16", action="store_true", help="leave out the (slow) numpy fp16 matvec")
    args = parser.parse_args(argv)
    if min(args.items, args.dim, args.k, args.rounds) < 1 or args.k > args.items:
        parser.error("--items, --dim, -k and --rounds must be 1 or more, and -k at most --items")
    return args


def cell(name: str, call: Callable[[torch.Tensor], object], queries: list[torch.Tensor]) -> Cell:
    return Cell(model="synthetic", name=name, precision="fp16 store", tower="score", batch=1, call=call,
                inputs=queries)


def median(values: list[float]) -> float:
    return float(np.median(values))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((args.items, args.dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    fp16 = rows.astype(np.float16)
    store = Store("synthetic", None, [str(i) for i in range(args.items)], [{}] * args.items, {"retrieval": fp16})
    generator = torch.Generator().manual_seed(1)
    queries = list(torch.nn.functional.normalize(torch.randn(QUERIES, 1, args.dim, generator=generator), dim=2))
    k = args.k
    cells = [
        cell(SERVED, lambda q: store.topk(q, k, "fused"), queries),
        cell(FP32, lambda q: np.argpartition(-(rows @ q[0].numpy()), k - 1)[:k], queries),
    ]
    if not args.no_fp16:
        cells.append(cell(FP16, lambda q: np.argpartition(-(fp16 @ q[0].numpy().astype(np.float16)), k - 1)[:k],
                          queries))
    settings = TimingSettings(repeats=args.rounds, warmup=args.warmup + 1)  # time_group calls warmup - 1 times
    samples = dict(zip([c.name for c in cells], time_group(cells, Timer(torch.device("cpu")), settings, None),
                       strict=True))
    ratios = [s / b for s, b in zip(samples[SERVED], samples[FP32], strict=True)]
    _, s_rows = store.topk(queries[0], k, "fused")
    ref = np.argsort(-(fp16.astype(np.float32) @ queries[0][0].numpy()), kind="stable")[:k]
    flags = f"--items {args.items} --dim {args.dim} -k {k} --rounds {args.rounds}" + (" --no-fp16" * args.no_fp16)
    record = {
        "made_by": f"python -m mpsclip.bench.serve_score {flags}",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "items": args.items, "dim": args.dim, "k": k, "rounds": args.rounds, "store_dtype": "fp16 (scored in fp32)",
        "timing": "interleaved rounds: one call of each path per round, the order rotating",
        "median_ms": {name: median(times) for name, times in samples.items()},
        "samples_ms": samples,
        "median_ratio_served_to_fp32_matvec": median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "top_k_matches_numpy": s_rows[0].tolist() == ref.tolist(),
    }
    atomic_write(args.out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    md = "\n".join([
        f"# serve score time ({args.items} items, dim {args.dim}, k {k}, {record['machine']})", "",
        f"{args.rounds} interleaved rounds (one call of each path per round, the order rotating).", "",
        "| path | median ms |", "|---|---|",
        *(f"| {name} | {ms:.2f} |" for name, ms in record["median_ms"].items()), "",
        f"median ratio served / fp32 matvec over rounds: {record['median_ratio_served_to_fp32_matvec']:.2f} "
        f"(rounds: {min(ratios):.2f}-{max(ratios):.2f}); top-k equal to numpy: {record['top_k_matches_numpy']}",
    ])
    atomic_write(args.out.with_suffix(".md"), md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
