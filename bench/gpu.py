"""GPU truth in one call (issue 16): does the GPU embedding path give the CPU's answers?

    python -m mpsclip.bench.gpu --out DIR                    # on the GPU machine (fits one 8-minute call)
    python -m mpsclip.bench.gpu --out DIR --device cpu       # a CPU smoke run: CUDA-only checks SKIP
    python -m mpsclip.bench.gpu --out DIR --checks maxsim,optimize

Builds a random-weight model of ``--arch`` (seeded), a synthetic JPEG folder and a WebDataset shard, embeds
both on the CPU (eager fp32, PIL decoding) as the reference, then checks, each on its own so that one failure
does not stop the others:

* ``embed/<engine>/<decoder>/<source>``: a store made on ``--device`` with each ``--engine`` and decoder has
  the reference's ids and rows within fp16 tolerance (row cosine);
* ``zero-shot``: zero-shot perspectives on the device against the CPU (rows and keywords);
* ``search/<mode>``: exact search with the queries on the device against the CPU result;
* ``maxsim``: ``maxsim_topk`` on the device against the torch reference on the CPU;
* ``optimize``: ``model.optimize()`` (the ``optimized`` engine) against the eager fp32 engine (cosine);
* ``aoti-cuda``: ``mpsclip export --format aoti --device cuda`` in a subprocess (exit status or signal);
* ``onnx-fp16``: an fp16 ONNX export, verified, then loaded by the ``onnxruntime`` engine.

Prints one ``PASS``/``FAIL``/``SKIP`` line per check and the JSON summary, and writes ``<out>/gpu-checks.json``.
Exit status 1 if any check failed. Timings are not taken here: see ``mpsclip bench`` and ``mpsclip.bench.*``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKS = ("embed", "zero-shot", "search", "maxsim", "optimize", "aoti-cuda", "onnx-fp16")
PACKAGES = ("open_clip", "ftfy", "wcwidth", "torchvision", "pyarrow", "safetensors", "tqdm", "yaml", "PIL",
            "onnx", "onnxruntime", "triton", "tensorrt")
STORE_MIN_COSINE = 0.999  # fp16 rows and fp16/bf16 towers against the fp32 CPU reference
SEARCH_ATOL = 2e-3
AOTI_TIMEOUT_S = 240


class Skip(Exception):
    """A check that cannot run here; the message says why."""


def missing_packages() -> list[str]:
    return [name for name in PACKAGES if importlib.util.find_spec(name) is None]


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "missing": missing_packages(),
    }
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    return env


# ----------------------------------------------------------------------------------------------- fixtures
def write_jpegs(folder: Path, count: int, size: int) -> list[bytes]:
    """``count`` smooth, textured JPEG tiles (they compress like aerial imagery); returns their bytes."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        rng = np.random.default_rng(i)
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + rng.normal(0, 12, (size, size, 3)), 0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        (folder / f"tile-{i:04d}.jpg").write_bytes(buffer.getvalue())
        files.append(buffer.getvalue())
    return files


def write_shard(path: Path, jpegs: list[bytes]) -> Path:
    """A WebDataset shard with one ``<key>.jpg`` member per tile."""
    with tarfile.open(path, "w") as tar:
        for i, data in enumerate(jpegs):
            info = tarfile.TarInfo(f"sample-{i:04d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@dataclasses.dataclass
class Fixture:
    work: Path
    device: torch.device
    checkpoint: Path
    sources: dict[str, Path]
    batch: int
    engines: tuple[str, ...]
    _cache: dict[str, Any] = dataclasses.field(default_factory=dict)

    def model(self) -> Any:
        from mpsclip.factory import load_model

        return load_model(self.checkpoint).eval()

    def store(self, name: str, source: str, device: str, **settings: Any) -> Path:
        """The store of ``source`` embedded with ``settings`` (made once per name)."""
        from mpsclip.archive.embedder import EmbedSettings
        from mpsclip.archive.job import embed_archive

        key = f"{name}-{source}"
        if key not in self._cache:
            out = self.work / "stores" / key
            settings = EmbedSettings(batch_size=self.batch, shard_size=10_000, device=device, **settings)
            embed_archive(self.sources[source], out, self.checkpoint, settings=settings, progress=False)
            self._cache[key] = out
        return self._cache[key]

    def reference(self, source: str, perspectives: str = "none") -> Path:
        return self.store(f"cpu-{perspectives}", source, "cpu", decode="cpu", perspectives=perspectives)

    def export_dir(self, fmt: str) -> Path:
        """An image-tower export of the checkpoint in ``fmt`` (onnx or tensorrt), made once."""
        if fmt not in self._cache:
            from mpsclip.export import export

            folder = self.work / f"export-{fmt}"
            self._cache[fmt] = export(self.checkpoint, fmt, folder, towers=("image",), opt_batch=self.batch,
                                      max_batch=max(64, self.batch))
        return self._cache[fmt]


def compare_stores(reference: Path, other: Path, columns: tuple[str, ...]) -> dict[str, Any]:
    """Same ids in the same order, and the minimum row cosine of each column; raise when outside tolerance."""
    from mpsclip.archive.store_reader import open_store, stream

    ref_info, info = open_store(reference), open_store(other)
    if ref_info.n_rows != info.n_rows:
        raise AssertionError(f"{info.n_rows} rows, the CPU store has {ref_info.n_rows}")
    figures: dict[str, Any] = {"rows": ref_info.n_rows}
    for column in columns:
        a = np.concatenate([part.columns[column] for part in stream(ref_info, [column])])
        b = np.concatenate([part.columns[column] for part in stream(info, [column])])
        a, b = a.astype(np.float64).reshape(-1, a.shape[-1]), b.astype(np.float64).reshape(-1, b.shape[-1])
        norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        live = np.linalg.norm(a, axis=1) > 0  # padded perspective rows are zero on both sides
        cosine = float(((a * b).sum(axis=1) / norms)[live].min()) if live.any() else 1.0
        figures[f"{column}_min_cosine"] = round(cosine, 6)
        if not cosine >= STORE_MIN_COSINE:
            raise AssertionError(f"{column}: min row cosine {cosine:.6f} < {STORE_MIN_COSINE} ({figures})")
    ids_a = [m[0] for m in _ids(ref_info)]
    if ids_a != [m[0] for m in _ids(info)]:
        raise AssertionError("the stores hold different ids or a different order")
    return figures


def _ids(info: Any) -> list[tuple[str, dict]]:
    from mpsclip.archive.store_reader import read_ids_metas

    found = read_ids_metas(info, list(range(info.n_rows)))
    return [found[row] for row in range(info.n_rows)]


# ------------------------------------------------------------------------------------------------- checks
def check_embed(fx: Fixture, engine: str, decoder: str, source: str) -> dict[str, Any]:
    from mpsclip.engines import engine_availability

    kind = "optimized" if engine == "torch" and fx.device.type == "cuda" else engine
    reason = engine_availability(kind, fx.device)
    if reason is not None:
        raise Skip(reason)
    engine_dir = {"onnxruntime": "onnx", "tensorrt": "tensorrt"}.get(engine)
    engine_dir = fx.export_dir(engine_dir) if engine_dir else None
    store = fx.store(f"{fx.device.type}-{engine}-{decoder}", source, str(fx.device), engine=engine,
                     engine_dir=engine_dir, decode=decoder)
    return compare_stores(fx.reference(source), store, ("retrieval", "global"))


def check_zero_shot(fx: Fixture) -> dict[str, Any]:
    store = fx.store(f"{fx.device.type}-zero-shot", "jpeg", str(fx.device), perspectives="zero-shot")
    reference = fx.reference("jpeg", "zero-shot")
    figures = compare_stores(reference, store, ("retrieval", "global", "perspectives"))
    from mpsclip.archive.store_reader import open_store

    ref_kw = [m[1].get("keywords") for m in _ids(open_store(reference))]
    kw = [m[1].get("keywords") for m in _ids(open_store(store))]
    figures["keywords_equal"] = round(sum(a == b for a, b in zip(ref_kw, kw, strict=True)) / max(len(kw), 1), 4)
    if figures["keywords_equal"] < 0.9:
        raise AssertionError(f"keywords agree on only {figures['keywords_equal']:.0%} of the items")
    return figures


def check_search(fx: Fixture, mode: str) -> dict[str, Any]:
    from mpsclip.archive.search import encode_queries, exact_topk
    from mpsclip.archive.store_reader import open_store

    info = open_store(fx.reference("jpeg"))
    queries = encode_queries(fx.model(), ["a harbour with boats", "dense forest", "a runway", "farmland"])
    k = min(5, info.n_rows)
    cpu_s, cpu_i = exact_topk(info, queries, k, mode)
    dev_s, dev_i = exact_topk(info, queries.to(fx.device), k, mode)
    max_diff = float((cpu_s - dev_s).abs().max())
    same = float((cpu_i == dev_i).float().mean())
    if max_diff > SEARCH_ATOL:
        raise AssertionError(f"scores differ by {max_diff:.2g} > {SEARCH_ATOL}")
    if same < 1.0 and not torch.allclose(cpu_s, dev_s, atol=SEARCH_ATOL):
        raise AssertionError(f"only {same:.0%} of the hits agree")
    return {"max_score_diff": max_diff, "same_rows": same, "k": k}


def check_maxsim(fx: Fixture) -> dict[str, Any]:
    from mpsclip.kernels import maxsim_topk, maxsim_topk_reference

    gen = torch.Generator().manual_seed(0)
    figures = {}
    for name, q_shape, g_shape in (("gallery-views", (7, 64), (1000, 5, 64)), ("query-views", (7, 3, 64), (999, 64))):
        queries = torch.nn.functional.normalize(torch.randn(q_shape, generator=gen), dim=-1)
        gallery = torch.nn.functional.normalize(torch.randn(g_shape, generator=gen), dim=-1)
        valid = torch.rand(g_shape[:2], generator=gen) > 0.2 if len(g_shape) == 3 else None
        ref_s, ref_i = maxsim_topk_reference(queries, gallery, 10, valid)
        dev_valid = valid.to(fx.device) if valid is not None else None
        dev_s, dev_i = maxsim_topk(queries.to(fx.device), gallery.to(fx.device), 10, dev_valid)
        diff = float((ref_s - dev_s.cpu()).abs().max())
        same = float((ref_i == dev_i.cpu()).float().mean())
        figures[name] = {"max_score_diff": diff, "same_indices": same}
        if diff > 1e-3 or same < 0.99:
            raise AssertionError(f"{name}: {figures[name]}")
    return figures


def check_optimize(fx: Fixture) -> dict[str, Any]:
    from mpsclip.export.towers import example_input

    from mpsclip.engines import load_engine

    model = fx.model().to(fx.device)
    eager = load_engine("torch", model, fx.device)
    fast = load_engine("optimized", model, fx.device, precision="fp16")
    figures: dict[str, Any] = {"precision": fast.precision}
    for tower in ("image", "text"):
        for batch in (1, 5, 8):
            x = example_input(model, tower, batch, seed=batch).to(fx.device)
            a, b = getattr(eager, f"encode_{tower}")(x), getattr(fast, f"encode_{tower}")(x)
            figures[f"{tower}_b{batch}_min_cosine"] = round(float((a * b).sum(-1).min()), 6)
    worst = min(v for k, v in figures.items() if k.endswith("cosine"))
    if worst < STORE_MIN_COSINE:
        raise AssertionError(f"min cosine {worst:.6f} < {STORE_MIN_COSINE}: {figures}")
    return figures


def check_aoti_cuda(fx: Fixture) -> dict[str, Any]:
    if fx.device.type != "cuda":
        raise Skip(f"--device {fx.device}: the CUDA AOTInductor package needs a GPU")
    from mpsclip.export.aoti import describe_exit

    out = fx.work / "aoti-cuda"
    code = (
        "import sys; from mpsclip.export import export; "
        "export(sys.argv[1], 'aoti', sys.argv[2], device='cuda', towers=('image',), opt_batch=4, max_batch=8)"
    )
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", code, str(fx.checkpoint), str(out)], capture_output=True,
                              text=True, timeout=AOTI_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"export + load did not finish in {AOTI_TIMEOUT_S} s") from err
    figures: dict[str, Any] = {"exit": describe_exit(done.returncode), "seconds": round(time.perf_counter() - start, 1)}
    if done.returncode != 0:
        figures["stderr_tail"] = done.stderr[-1500:]
        raise AssertionError(json.dumps(figures))
    figures["verification"] = json.loads((out / "manifest.json").read_text())["verification"]
    return figures


def check_onnx_fp16(fx: Fixture) -> dict[str, Any]:
    from mpsclip.export import export
    from mpsclip.export.towers import example_input

    from mpsclip.engines import load_engine

    out = export(fx.checkpoint, "onnx", fx.work / "onnx-fp16", precision="fp16")
    verification = json.loads((out / "manifest.json").read_text())["verification"]
    model = fx.model()
    eager, ort = load_engine("torch", model, "cpu"), load_engine("onnxruntime", out, "cpu", precision="fp16")
    x = example_input(model, "image", 4, seed=3)
    cosine = float((eager.encode_image(x) * ort.encode_image(x)).sum(-1).min())
    if cosine < STORE_MIN_COSINE:
        raise AssertionError(f"loaded fp16 engine: min cosine {cosine:.6f}")
    return {"verification": verification, "engine_min_cosine": round(cosine, 6)}


# ------------------------------------------------------------------------------------------------- runner
def plan(fx: Fixture, selected: tuple[str, ...]) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    checks: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if "embed" in selected:
        for engine in fx.engines:
            for decoder in ("cpu", "device"):
                for source in fx.sources:
                    checks.append((f"embed/{engine}/{decoder}/{source}",
                                   lambda e=engine, d=decoder, s=source: check_embed(fx, e, d, s)))
    simple = {"zero-shot": check_zero_shot, "maxsim": check_maxsim, "optimize": check_optimize,
              "aoti-cuda": check_aoti_cuda, "onnx-fp16": check_onnx_fp16}
    for name in selected:
        if name == "search":
            checks += [(f"search/{mode}", lambda m=mode: check_search(fx, m)) for mode in ("fused", "global")]
        elif name in simple:
            checks.append((name, lambda f=simple[name]: f(fx)))
    return checks


def run_check(name: str, check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        result: dict[str, Any] = {"status": "PASS", "details": check()}
    except Skip as skip:
        result = {"status": "SKIP", "reason": str(skip)}
    except Exception as err:  # noqa: BLE001 - one failing check must not stop the others
        result = {"status": "FAIL", "reason": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    result["seconds"] = round(time.perf_counter() - start, 2)
    summary = result.get("reason") or json.dumps(result["details"], default=str)[:300]
    print(f"{result['status']} {name} ({result['seconds']} s): {summary}", flush=True)
    return {"name": name, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu-checks.json")
    parser.add_argument("--device", default="auto", help="auto (CUDA when visible), cuda[:N] or cpu")
    parser.add_argument("--arch", default="MPS-Tiny", help="architecture of the random-weight model")
    parser.add_argument("--images", type=int, default=48, help="synthetic JPEG tiles (default 48)")
    parser.add_argument("--tile", type=int, default=256, help="tile side in px")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    parser.add_argument("--engines", default="torch,onnxruntime,tensorrt", help="engines of the embed checks")
    parser.add_argument("--sources", default="jpeg,wds", help="embed sources: jpeg (a folder), wds (a tar shard)")
    args = parser.parse_args(argv)
    selected = tuple(c for c in args.checks.split(",") if c)
    unknown = sorted(set(selected) - set(CHECKS))
    if unknown:
        parser.error(f"--checks: unknown {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    from mpsclip.devices import resolve_device

    device = resolve_device(args.device)
    env = environment(device)
    print(f"environment: {json.dumps(env)}", flush=True)
    if env["missing"]:
        print(f"MISSING packages (checks that need them FAIL with the import error): {', '.join(env['missing'])}")
    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory(prefix="mpsclip-gpu-") as tmp:
        work = Path(tmp)
        setup = run_check("setup", lambda: _setup(work, args))
        results.append(setup)
        if setup["status"] == "PASS":
            fx = Fixture(work, device, work / "model.safetensors", {}, args.batch, tuple(args.engines.split(",")))
            fx.checkpoint = Path(setup["details"]["checkpoint"])
            fx.sources = {name: Path(setup["details"]["sources"][name]) for name in args.sources.split(",")}
            for name, check in plan(fx, selected):
                results.append(run_check(name, check))
                write_report(args.out, env, results)  # after each check: a killed run keeps its lines
    counts = write_report(args.out, env, results)
    print(json.dumps({"counts": counts, "checks": {r["name"]: r["status"] for r in results}}, indent=1))
    return 1 if counts["FAIL"] else 0


def write_report(out: Path, env: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, int]:
    """Write ``<out>/gpu-checks.json`` atomically; returns the PASS/FAIL/SKIP counts."""
    counts = {s: sum(r["status"] == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu-checks.json"
    path.with_suffix(".tmp").write_text(json.dumps({"environment": env, "counts": counts, "checks": results},
                                                   indent=2, default=str) + "\n")
    path.with_suffix(".tmp").replace(path)
    return counts


def _setup(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from mpsclip.model import MPSCLIP

    torch.manual_seed(0)
    model = MPSCLIP(args.arch).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial adapters (up_proj starts at zero), so the fused kernels do something
        for name, param in model.named_parameters():
            if ".g2adapter." in name:
                noise = torch.randn(param.shape, generator=gen)
                param.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.05 * noise)
    checkpoint = model.save(work / "model")
    jpegs = write_jpegs(work / "jpeg", args.images, args.tile)
    shard = write_shard(work / "wds-0000.tar", jpegs)
    return {"checkpoint": str(checkpoint), "sources": {"jpeg": str(work / "jpeg"), "wds": str(shard)}}


if __name__ == "__main__":
    sys.exit(main())
