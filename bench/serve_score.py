"""Server-side score time of one exact fused query over an in-memory store vs a numpy matrix-vector product.

The store is synthetic (seeded random fp16 unit rows, as `mpsclip serve` holds them); the served path is
:meth:`mpsclip.serve.catalog.Store.topk` (the same scoring as 'mpsclip search'), the reference is
``matrix @ q`` in numpy fp32 plus ``argpartition`` for the top-k. Writes JSON and markdown to --out.

example:
  python -m mpsclip.bench.serve_score --out bench/results/serve-score --items 100000
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from mpsclip.serve.catalog import Store

from mpsclip.io import atomic_write


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output prefix (writes .json and .md)")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((args.items, args.dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    fp16 = rows.astype(np.float16)
    store = Store("synthetic", None, [str(i) for i in range(args.items)], [{}] * args.items, {"retrieval": fp16})
    query = torch.nn.functional.normalize(torch.randn(1, args.dim, generator=torch.Generator().manual_seed(1)), dim=1)
    q = query[0].numpy()
    served = median_ms(lambda: store.topk(query, args.k, "fused"), args.repeats)
    matvec32 = median_ms(lambda: np.argpartition(-(rows @ q), args.k)[: args.k], args.repeats)
    matvec16 = median_ms(lambda: np.argpartition(-(fp16 @ q.astype(np.float16)), args.k)[: args.k], args.repeats)
    s_scores, s_rows = store.topk(query, args.k, "fused")
    ref = np.argsort(-(fp16.astype(np.float32) @ q), kind="stable")[: args.k]
    record = {
        "made_by": "python -m mpsclip.bench.serve_score " + f"--items {args.items} --dim {args.dim} -k {args.k}",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "items": args.items, "dim": args.dim, "k": args.k, "store_dtype": "fp16 (scored in fp32)",
        "served_score_ms": served, "numpy_matvec_fp32_ms": matvec32, "numpy_matvec_fp16_ms": matvec16,
        "ratio_to_fp32_matvec": served / matvec32, "top_k_matches_numpy": s_rows[0].tolist() == ref.tolist(),
    }
    atomic_write(args.out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    md = "\n".join([
        f"# serve score time ({args.items} items, dim {args.dim}, k {args.k}, {record['machine']})", "",
        "| path | median ms |", "|---|---|",
        f"| served Store.topk (fp16 store) | {served:.2f} |",
        f"| numpy fp32 matvec + argpartition | {matvec32:.2f} |",
        f"| numpy fp16 matvec + argpartition | {matvec16:.2f} |", "",
        f"ratio served / fp32 matvec: {served / matvec32:.2f}; top-k equal to numpy: {record['top_k_matches_numpy']}",
    ])
    atomic_write(args.out.with_suffix(".md"), md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
