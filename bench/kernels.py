"""Correctness checks and timings of the fused kernels on a GPU.

    python -m mpsclip.bench.kernels --out bench/results

Writes ``<out>/<device>-kernels.json`` and ``<out>/<device>-kernels.md``. Timings use CUDA events: at least
20 warm-up calls, then the median of at least 30 timed calls, rotating among several input sets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
from mpsclip.kernels import g2a_adapter_forward, maxsim_topk, maxsim_topk_reference, optimize
from mpsclip.kernels.g2a import triton

from mpsclip.adapters import G2Adapter, attach_adapters

WARMUP, REPEATS, ROTATE = 20, 30, 3
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def median_ms(fn: Callable[[object], object], inputs: list, warmup: int = WARMUP, repeats: int = REPEATS) -> float:
    """Median milliseconds of ``fn(inputs[i % len(inputs)])`` over ``repeats`` calls after ``warmup``."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times = []
    for i in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(inputs[i % len(inputs)])
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def randomize_adapters(model: torch.nn.Module, seed: int) -> None:
    """Non-zero adapter weights (up_proj starts at zero, which would hide the adapters)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "g2adapter" in name:
                if name.endswith("gate"):
                    param.fill_(0.4)
                elif "norm.weight" in name:
                    param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
                else:
                    param.copy_(0.05 * torch.randn(param.shape, generator=gen))


def random_adapter(width: int, seed: int) -> G2Adapter:
    adapter = G2Adapter(width)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            scale, offset = (0.0, 0.4) if name == "gate" else (0.05, 1.0 if "norm.weight" in name else 0.0)
            param.copy_(offset + scale * torch.randn(param.shape, generator=gen))
    return adapter.eval()


def check_adapter() -> list[dict]:
    rows = []
    for width, tokens in ((768, 50), (512, 77)):
        adapter = random_adapter(width, seed=width).cuda()
        x = torch.randn(16, tokens, width, device="cuda")
        with torch.no_grad():
            want = adapter(x)
        for name, dtype in DTYPES.items():
            with torch.no_grad():
                got = g2a_adapter_forward(adapter, x.to(dtype))
                again = g2a_adapter_forward(adapter, x.to(dtype))
            err = ((got.float() - want).norm() / (want - x).norm()).item()
            rows.append({
                "check": f"adapter D={width} L={tokens} {name}", "rel_err_of_adapter_delta": err,
                "finite": bool(torch.isfinite(got).all()), "deterministic": bool(torch.equal(got, again)),
                "ok": bool(err < (3e-2 if dtype == torch.bfloat16 else 1e-2) and torch.isfinite(got).all()),
            })
    return rows


def _compare_topk(got: tuple, want: tuple) -> dict:
    (gs, gi), (ws, wi) = got, want
    finite = torch.isfinite(ws)
    same_finite = torch.equal(torch.isfinite(gs), finite)
    err = (gs[finite] - ws[finite]).abs().max().item() if finite.any() else 0.0
    return {"index_agreement": (gi == wi).float().mean().item(), "max_score_err": err,
            "nan_free": not bool(torch.isnan(gs).any()), "ok": bool(same_finite and err < 2e-2)}


def check_maxsim() -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, dtype in DTYPES.items():
        q = torch.randn(300, 512, device="cuda", generator=gen).to(dtype)
        g = torch.randn(100_003, 5, 512, device="cuda", generator=gen).to(dtype)
        valid = torch.rand(100_003, 5, device="cuda", generator=gen) > 0.2
        got = maxsim_topk(q, g, 10, valid)
        again = maxsim_topk(q, g, 10, valid)
        row = _compare_topk(got, maxsim_topk_reference(q, g, 10, valid))
        row.update(check=f"maxsim t2i Q=300 N=100003 V=5 k=10 {name}",
                   deterministic=bool(torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])))
        rows.append(row)
    q = torch.randn(64, 4, 256, device="cuda", generator=gen).half()
    g = torch.randn(5_000, 256, device="cuda", generator=gen).half()
    row = _compare_topk(maxsim_topk(q, g, 1024), maxsim_topk_reference(q, g, 1024))
    rows.append({"check": "maxsim i2t Q=64 V=4 N=5000 k=1024 fp16", **row})
    g = torch.randn(700, 3, 128, device="cuda", generator=gen).half()
    q = torch.randn(5, 128, device="cuda", generator=gen).half()
    row = _compare_topk(maxsim_topk(q, g, 1000), maxsim_topk_reference(q, g, 1000))
    rows.append({"check": "maxsim t2i k=1000 > N=700 (padding)", **row})
    host = torch.randn(300_000, 5, 128, generator=torch.Generator().manual_seed(1)).half().pin_memory()
    q = torch.randn(8, 128, device="cuda", generator=gen).half()
    row = _compare_topk(maxsim_topk(q, host, 10), maxsim_topk_reference(q, host.cuda(), 10))
    rows.append({"check": "maxsim streamed from pinned host N=300000", **row})
    return rows


def bench_adapter(dtype: torch.dtype) -> list[dict]:
    rows = []
    for tower, width, tokens in (("image", 768, 50), ("text", 512, 77)):
        adapter = random_adapter(width, seed=1).cuda().to(dtype)
        for batch in (1, 64, 512):
            xs = [torch.randn(batch, tokens, width, device="cuda", dtype=dtype) for _ in range(ROTATE)]
            with torch.no_grad():
                eager = median_ms(adapter, xs)
                fused = median_ms(lambda x, a=adapter: g2a_adapter_forward(a, x), xs)
            rows.append({"what": f"adapter ({tower}, L={tokens}, D={width})", "batch": batch,
                         "eager_ms": eager, "fused_ms": fused, "speedup": eager / fused})
    return rows


def build_models(dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    plain = open_clip.create_model("ViT-B-32-quickgelu").eval()
    torch.manual_seed(0)
    authors = open_clip.create_model("ViT-B-32-quickgelu")
    attach_adapters(authors.visual.transformer)
    attach_adapters(authors.transformer)
    randomize_adapters(authors, seed=2)
    authors.eval()
    return {"plain": plain.cuda().to(dtype), "authors": authors.cuda().to(dtype)}


def bench_towers(dtype: torch.dtype, precision: str, compile_plain: bool) -> tuple[list[dict], list[dict]]:
    models = build_models(dtype)
    t0 = time.perf_counter()
    ours = optimize(models["authors"], precision=precision)
    ours_eager = optimize(models["authors"], precision=precision, compile=False)
    rows, checks = [], []
    variants: dict[str, dict[str, Callable]] = {
        "plain eager": {"image": models["plain"].encode_image, "text": models["plain"].encode_text},
        "authors eager": {"image": models["authors"].encode_image, "text": models["authors"].encode_text},
        "ours optimize(compile=False)": {"image": ours_eager.encode_image, "text": ours_eager.encode_text},
        "ours optimize()": {"image": ours.encode_image, "text": ours.encode_text},
    }
    if compile_plain:
        compiled = {t: torch.compile(getattr(models["plain"], f"encode_{t}")) for t in ("image", "text")}
        variants["plain torch.compile"] = compiled
    for batch in (1, 64, 512):
        images = [torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype) for _ in range(ROTATE)]
        tokens = [torch.randint(1, 49406, (batch, 77), device="cuda") for _ in range(ROTATE)]
        for t in tokens:
            t[:, 20:] = 0
            t[:, 19] = 49407
        with torch.no_grad():
            for tower, inputs in (("image", images), ("text", tokens)):
                want = torch.nn.functional.normalize(variants["authors eager"][tower](inputs[0]).float(), dim=-1)
                got = getattr(ours, f"encode_{tower}")(inputs[0])
                again = getattr(ours, f"encode_{tower}")(inputs[0])
                checks.append({"check": f"optimize() {tower} batch {batch} cosine vs authors eager",
                               "min_cosine": (got * want).sum(-1).min().item(),
                               "deterministic": bool(torch.equal(got, again)),
                               "ok": bool((got * want).sum(-1).min() >= 0.999)})
                for name, fns in variants.items():
                    if name == "plain torch.compile" and batch != 512:
                        continue
                    ms = median_ms(fns[tower], inputs)
                    rows.append({"what": f"{tower} tower, {name}", "batch": batch, "ms": ms,
                                 "items_per_s": batch / ms * 1e3})
    checks.append({"check": "optimize() build + graph captures + tower timings (s)",
                   "seconds": time.perf_counter() - t0, "ok": True})
    return rows, checks


def bench_search(n_items: int, views: int, dim: int, k: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(5)
    gallery = torch.empty(n_items, views, dim, device="cuda", dtype=torch.float16)
    for start in range(0, n_items, 1 << 20):
        part = gallery[start : start + (1 << 20)]
        part.copy_(torch.randn(part.shape, device="cuda", generator=gen))
    flat = gallery.view(n_items * views, dim)
    gallery_bytes = gallery.numel() * gallery.element_size()
    rows = []
    for n_queries in (1, 64, 256):
        queries = [torch.randn(n_queries, dim, device="cuda", generator=gen).half() for _ in range(ROTATE)]

        def torch_baseline(q: torch.Tensor) -> tuple:
            return (q @ flat.T).view(q.shape[0], n_items, views).amax(-1).topk(k)

        def ours(q: torch.Tensor) -> tuple:
            return maxsim_topk(q, gallery, k)

        a, b = ours(queries[0]), torch_baseline(queries[0])
        agree = (a[1] == b.indices).float().mean().item()
        repeat_same = torch.equal(ours(queries[0])[1], a[1]) and torch.equal(ours(queries[0])[0], a[0])
        for name, fn in (("torch baseline", torch_baseline), ("ours maxsim_topk", ours)):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            ms = median_ms(fn, queries, warmup=5 if n_queries > 1 else WARMUP)
            extra = (torch.cuda.max_memory_allocated() - base) / 2**20
            rows.append({"what": f"search N={n_items} V={views} D={dim} k={k}, {name}", "batch": n_queries,
                         "ms": ms, "extra_MiB": extra, "effective_TB_s": gallery_bytes / ms / 1e9,
                         "index_agreement_with_torch": agree, "deterministic": bool(repeat_same)})
    return rows


def run_section(name: str, fn: Callable[[], None], checks: list[dict]) -> None:
    """Run one part of the benchmark; record a failure as a failed check instead of stopping."""
    start = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the report must say what failed
        checks.append({"check": f"{name} raised", "error": f"{type(exc).__name__}: {exc}"[:300], "ok": False})
    for c in checks:
        print(c, flush=True)
    print(f"[{name}] {time.perf_counter() - start:.1f} s", flush=True)


def markdown(meta: dict, checks: list[dict], adapter: list[dict], towers: list[dict], search: list[dict]) -> str:
    lines = [f"# Kernel benchmark: {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, dtype {meta['dtype']}; "
             f"median of {REPEATS} CUDA-event timings after {WARMUP} warm-up calls, {ROTATE} rotating inputs.",
             "", "## Checks", "", "| check | ok | details |", "|---|---|---|"]
    for c in checks:
        details = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in c.items() if k not in ("check", "ok"))
        lines.append(f"| {c['check']} | {c['ok']} | {details} |")
    lines += ["", "## Adapter alone", "", "| what | batch | eager ms | fused ms | speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['batch']} | {r['eager_ms']:.3f} | {r['fused_ms']:.3f} | {r['speedup']:.2f} |"
              for r in adapter]
    lines += ["", "## Towers", "", "| what | batch | ms | items/s |", "|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['batch']} | {r['ms']:.3f} | {r['items_per_s']:,.0f} |" for r in towers]
    lines += ["", "## Max-response search", "", "| what | Q | ms | extra MiB | TB/s | agree | deterministic |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['batch']} | {r['ms']:.3f} | {r['extra_MiB']:.1f} | {r['effective_TB_s']:.2f} "
              f"| {r['index_agreement_with_torch']:.4f} | {r['deterministic']} |" for r in search]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results (e.g. bench/results)")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--search-items", type=int, default=4_000_000)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--checks-only", action="store_true", help="correctness checks only (a smoke run)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or triton is None:
        raise SystemExit("mpsclip.bench.kernels needs a CUDA GPU and Triton")
    dtype = DTYPES[args.precision]
    torch.backends.cuda.matmul.allow_tf32 = True
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "dtype": args.precision}
    checks: list[dict] = []
    adapter, towers, search = [], [], []
    # Search first: it does not depend on the adapter kernel, and a CUDA fault ends the process's context.
    run_section("maxsim checks", lambda: checks.extend(check_maxsim()), checks)
    if not args.checks_only:
        run_section("search bench", lambda: search.extend(bench_search(args.search_items, 5, 512, 10)), checks)
    run_section("adapter checks", lambda: checks.extend(check_adapter()), checks)
    if not args.checks_only:
        run_section("adapter bench", lambda: adapter.extend(bench_adapter(dtype)), checks)

        def towers_section() -> None:
            rows, tower_checks = bench_towers(dtype, args.precision, compile_plain=not args.no_compile)
            towers.extend(rows)
            checks.extend(tower_checks)

        run_section("tower bench", towers_section, checks)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = meta["device"].replace(" ", "-")
    result = {"meta": meta, "checks": checks, "adapter": adapter, "towers": towers, "search": search}
    (args.out / f"{stem}-kernels.json").write_text(json.dumps(result, indent=2))
    text = markdown(meta, checks, adapter, towers, search)
    (args.out / f"{stem}-kernels.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
