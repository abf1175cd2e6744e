"""mpsclip bench: the results schema, the parity gate, skip reasons, the estimate, --compare and the plots
(tiny model, CPU)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mpsclip.bench.engines as grid_module
import pytest
import torch
from mpsclip.bench.engines import GridSettings, skip_reason
from mpsclip.bench.report import PLOTS, SCHEMA, markdown
from mpsclip.bench.run import bench
from mpsclip.bench.timing import (
    MIN_ROUNDS,
    Cell,
    Timer,
    TimingSettings,
    estimate,
    estimate_message,
    estimate_seconds,
    probe,
    run_grid,
)
from PIL import Image

from mpsclip.cli import main
from mpsclip.errors import MPSCLIPError

SETTINGS = GridSettings(engines=("torch", "onnxruntime", "tensorrt"), batch_sizes=(1, 2), device="cpu", repeats=2,
                        warmup=1, build_workers=2)  # the two ONNX towers export in two spawned processes


@pytest.fixture(scope="module")
def run(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    return out, bench([ckpt], SETTINGS, out, progress=False)


@pytest.mark.slow
def test_results_schema(run: tuple[Path, dict]) -> None:
    out, result = run
    written = json.loads((out / "results.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["schema"] == SCHEMA
    assert {"cpu", "cores", "torch", "onnxruntime", "triton", "gpu", "load_average"} <= set(written["machine"])
    assert written["models"][0]["arch"] == "MPS-Tiny" and len(written["models"][0]["sha256"]) == 64
    cells = {(r["engine"], r["tower"], r["batch"]) for r in written["rows"]}
    assert cells == {(e, t, b) for e in ("plain", "torch", "onnxruntime") for t in ("image", "text") for b in (1, 2)}
    for row in written["rows"]:
        assert row["samples"] == 2 and row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["items_per_s"] == pytest.approx(row["batch"] / row["p50_ms"] * 1e3, rel=1e-2, abs=0.06)
        assert row["ratio_to_plain"] == pytest.approx(
            next(p["p50_ms"] for p in written["rows"] if p["engine"] == "plain" and p["tower"] == row["tower"]
                 and p["batch"] == row["batch"]) / row["p50_ms"], rel=1e-2)
    ok = {e["engine"]: e for e in written["engines"]}
    assert ok["onnxruntime"]["status"] == "ok" and min(ok["onnxruntime"]["parity_min_cosine"].values()) > 0.999
    assert ok["onnxruntime"]["export_s"] > 0 and ok["onnxruntime"]["source"] == "exported on the fly"
    assert ok["torch"]["export_s"] is None and ok["torch"]["load_s"] >= 0
    timing = written["timing"]
    assert 0 < timing["exports_s"] <= timing["prepare_s"] <= timing["total_s"]
    assert timing["estimated_timing_s"] > 0 and 0 < timing["timing_s"] <= timing["total_s"]
    md = (out / "results.md").read_text()
    assert "Made by: `mpsclip" in md and "## MPS-Tiny, image tower" in md


@pytest.mark.slow
def test_engine_that_cannot_run_is_listed_with_its_reason(run: tuple[Path, dict]) -> None:
    _, result = run
    trt = next(e for e in result["engines"] if e["engine"] == "tensorrt")
    assert trt["status"] == "skipped" and "CUDA" in trt["reason"]
    assert not [r for r in result["rows"] if r["engine"] == "tensorrt"]
    assert "fp32 on the CPU" in skip_reason("optimized", "fp16", torch.device("cpu"))
    assert "fp32 or fp16" in skip_reason("onnxruntime", "bf16", torch.device("cpu"))
    assert skip_reason("aoti", "fp32", torch.device("cpu")) is None
    if not torch.cuda.is_available():
        for kind in ("torch", "optimized", "onnxruntime", "aoti", "tensorrt"):
            assert "no CUDA GPU" in skip_reason(kind, "fp16", torch.device("cuda"))
    assert "skipped: TensorRT" in (run[0] / "results.md").read_text()


@pytest.mark.parametrize(("start", "end", "shared"), [(0.5, 2.3, False), (2.6, 4.9, True), (0.4, 3.5, True)])
def test_shared_machine_warning_discounts_the_runs_own_load(
    run: tuple[Path, dict], start: float, end: float, shared: bool
) -> None:
    """The run keeps about one thread per core busy: an end-of-run load near the core count is its own."""
    result = json.loads(json.dumps(run[1]))
    result["machine"].update(cores=2, load_average=[start, 0, 0], load_average_end=[end, 0, 0])
    assert ("Shared machine" in markdown(result)) == shared


@pytest.mark.slow
def test_plots_are_png_images(run: tuple[Path, dict]) -> None:
    for name in PLOTS:
        with Image.open(run[0] / name) as image:
            assert image.format == "PNG" and image.size[0] > 100


def test_perturbed_engine_fails_the_parity_gate(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = grid_module.load_engine

    class Perturbed:
        def __init__(self, engine: object) -> None:
            self.engine = engine

        def __getattr__(self, name: str) -> object:
            return getattr(self.engine, name)

        def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
            out = self.engine.encode_image(pixels)
            return torch.nn.functional.normalize(out + 0.5 * torch.randn_like(out), dim=-1)

    def load(kind: str, *args: object, **kwargs: object) -> object:
        engine = real(kind, *args, **kwargs)
        return Perturbed(engine) if kind == "optimized" else engine

    monkeypatch.setattr(grid_module, "load_engine", load)
    settings = GridSettings(engines=("optimized",), towers=("image",), batch_sizes=(1,), device="cpu", repeats=2)
    with pytest.raises(MPSCLIPError, match=r"parity gate: the optimized engine .* image tower min cosine"):
        bench([ckpt], settings, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.slow
def test_compare_two_runs(run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, result = run
    slower = json.loads(json.dumps(result))
    for row in slower["rows"]:
        row["p50_ms"] *= 2
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps(slower))
    assert main(["bench", "--compare", str(out / "results.json"), str(tmp_path / "b" / "results.json"),
                 "--out", str(tmp_path / "cmp")]) == 0
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert text == capsys.readouterr().out
    row = next(line for line in text.splitlines() if "| onnxruntime | fp32 | 2 |" in line)
    assert "| 2.00 |" in row


def test_compare_refuses_a_file_that_is_not_a_result(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "x.json").write_text("{}")
    assert main(["bench", "--compare", str(tmp_path / "x.json"), str(tmp_path / "x.json"), "--out", str(tmp_path)]) == 2
    assert f"not a {SCHEMA} file" in capsys.readouterr().err


def sleeping_cells(per_item_ms: dict[str, float], batches: tuple[int, ...]) -> list[Cell]:
    """Cells whose call sleeps ``per_item_ms[name] * batch`` ms: a machine-independent engine to time."""
    def sleeper(ms: float):  # noqa: ANN202
        return lambda x: time.sleep(ms / 1e3)

    return [Cell("m", name, "fp32", "image", b, sleeper(ms * b), [torch.zeros(1)] * 3)
            for b in batches for name, ms in per_item_ms.items()]


def test_estimate_follows_the_timing_rules() -> None:
    cells = sleeping_cells({"plain": 10.0, "torch": 30.0}, (1, 2))
    for cell in cells:
        cell.probe_ms = cell.batch * (10.0 if cell.name == "plain" else 30.0)
    # rounds of 0.04 s (batch 1) and 0.08 s (batch 2); warmup 2 = the probe + 1 call
    assert estimate_seconds(cells, TimingSettings(repeats=5, warmup=2)) == pytest.approx(6 * 0.04 + 6 * 0.08)
    # --duration 0.2: 0.1 s per group; rounds stop after the first that ends past it, never below MIN_ROUNDS
    bounded = TimingSettings(repeats=50, warmup=2, duration=0.2)
    assert estimate_seconds(cells, bounded) == pytest.approx((1 + 3) * 0.04 + (1 + MIN_ROUNDS) * 0.08)


def test_estimate_message_matches_duration() -> None:
    """The timed rounds match --duration (to within one round per group), the warm-up is said apart, and where
    --repeats or MIN_ROUNDS make the rounds differ from --duration the line says so."""
    cells = sleeping_cells({"plain": 10.0, "torch": 30.0}, (1, 2))
    for cell in cells:
        cell.probe_ms = cell.batch * (10.0 if cell.name == "plain" else 30.0)  # rounds of 0.04 s and 0.08 s
    settings = TimingSettings(repeats=1000, warmup=2, duration=12.0)
    found = estimate(cells, settings)
    assert 12.0 <= found.rounds_s <= 12.0 + 0.04 + 0.08 + 1e-9 and found.warmup_s == pytest.approx(0.12)
    assert estimate_message(found, settings) == (
        "timing will take about 12 s: 12 s of timed rounds for --duration 12 s, 0.1 s of warm-up calls"
    )
    capped = TimingSettings(repeats=10, warmup=2, duration=12.0)
    assert estimate_message(estimate(cells, capped), capped) == (
        "timing will take about 1.3 s: 1.2 s of timed rounds for --duration 12 s, 0.1 s of warm-up calls, "
        "2 of 2 groups stop at --repeats 10 rounds before their share"
    )
    floored = TimingSettings(repeats=1000, warmup=1, duration=0.1)
    assert estimate_message(estimate(cells, floored), floored) == (
        "timing will take about 0.4 s: 0.4 s of timed rounds for --duration 0.1 s, 0.0 s of warm-up calls, "
        "2 of 2 groups run their 3 rounds past their share"
    )
    plain = TimingSettings(repeats=5, warmup=2)
    assert estimate_message(estimate(cells, plain), plain) == (
        "timing will take about 0.7 s (5 timed rounds per group, 0.1 s of warm-up calls)"
    )


def test_estimate_is_close_to_what_the_timing_takes() -> None:
    cells = sleeping_cells({"plain": 4.0, "torch": 8.0, "onnxruntime": 2.0}, (1, 4))
    timer = Timer(torch.device("cpu"))
    for cell in cells:
        probe(cell, timer)
    for settings in (TimingSettings(repeats=6, warmup=2), TimingSettings(repeats=100, warmup=1, duration=0.3)):
        estimate = estimate_seconds(cells, settings)
        start = time.perf_counter()
        rows = run_grid(cells, settings, torch.device("cpu"), progress=False)
        took = time.perf_counter() - start
        assert abs(took - estimate) <= 0.3 * estimate, (estimate, took)
        samples = {r.samples for r in rows}
        assert samples == {6} if settings.duration is None else MIN_ROUNDS <= min(samples) <= max(samples) < 100
    assert {(r.engine, r.batch): r.ratio_to_plain for r in rows}[("torch", 4)] == pytest.approx(0.5, rel=0.2)


def test_cli_requires_out_and_checkpoint(ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--checkpoint", str(ckpt)]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert main(["bench", "--engines", "torch,nope", "--out", "x"]) == 2


@pytest.mark.slow
def test_search_subverb_on_a_store_leaves_it_unchanged(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mpsclip.bench.search import SCHEMA as SEARCH_SCHEMA
    from mpsclip.bench.search import synthetic_store

    store = tmp_path / "store"
    synthetic_store(store, 1500, dim=32, views=2, shard_size=512, clusters=20)
    before = sorted(p.name for p in store.iterdir())
    assert main(["bench", "search", str(store), "--queries", "4"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert main(["bench", "search", "--out", str(tmp_path / "x")]) == 2
    assert "give STORE or --synthetic N" in capsys.readouterr().err
    args = ["bench", "search", str(store), "--queries", "4", "--faiss", "Flat", "--faiss", "IVF8,Flat", "--nprobe",
            "1,8", "--quiet", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert sorted(p.name for p in store.iterdir()) == before  # the index was built in a scratch folder
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["schema"] == SEARCH_SCHEMA and result["store"]["rows"] == 1500
    searches = {(r["search"], r["mode"]): r for r in result["rows"]}
    for mode in ("fused", "max-response"):
        assert searches[("exact (streamed)", mode)]["recall@10"] == 1.0
        assert searches[("in memory", mode)]["recall@10"] == 1.0  # the same exact scores, held in memory
        assert searches[("IVF8,Flat nprobe 8", mode)]["recall@10"] == 1.0  # every list probed: exact
        assert searches[("IVF8,Flat nprobe 1", mode)]["recall@10"] <= 1.0
    assert [b["factory"] for b in result["builds"]] == ["Flat", "IVF8,Flat"]
    assert "| in memory | fused |" in (tmp_path / "out" / "results.md").read_text()
    with Image.open(tmp_path / "out" / "recall_latency.png") as image:
        assert image.format == "PNG"


@pytest.mark.slow
def test_archive_subverb_measures_the_pipeline_next_to_the_model(ckpt: Path, synth: Path, tmp_path: Path) -> None:
    from mpsclip.bench.archive import SCHEMA as ARCHIVE_SCHEMA

    args = ["bench", "archive", str(synth / "images"), "--checkpoint", str(ckpt), "--batch", "4", "--shard-size",
            "4", "--workers", "0", "--perspectives", "none", "--model-repeats", "2", "--device", "cpu", "--quiet",
            "--out", str(tmp_path)]
    assert main(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["schema"] == ARCHIVE_SCHEMA and result["settings"]["items"] == 6
    alone, pipeline = result["rows"]
    assert alone["what"] == "model alone (image tower), torch fp32" and alone["vs_model_alone"] == 1.0
    assert (pipeline["engine"], pipeline["precision"], pipeline["vs_first_engine"]) == ("torch", "fp32", 1.0)
    assert pipeline["items"] == 6 and pipeline["failed"] == 0 and pipeline["items_per_s"] > 0
    assert pipeline["vs_model_alone"] == pytest.approx(pipeline["items_per_s"] / alone["items_per_s"], rel=1e-2)
    assert "| pipeline, perspectives=none, decode=cpu, workers=0, torch fp32 |" in (tmp_path / "results.md").read_text()
    with Image.open(tmp_path / "throughput.png") as image:
        assert image.format == "PNG"


@pytest.mark.slow
def test_engine_dir_is_used_instead_of_exporting(ckpt: Path, tmp_path: Path) -> None:
    from mpsclip.export import export

    folder = export(ckpt, "onnx", tmp_path / "onnx", towers=("image",), min_batch=1, opt_batch=2, max_batch=2,
                    verify=False)
    settings = GridSettings(engines=("onnxruntime",), towers=("image",), batch_sizes=(1, 2), device="cpu",
                            repeats=2, engine_dirs={"onnxruntime": str(folder)}, baseline=None)
    result = bench([ckpt], settings, tmp_path / "out", progress=False)
    record = result["engines"][0]
    assert record["source"] == str(folder) and record["export_s"] is None and record["status"] == "ok"
    assert result["timing"]["exports_s"] < 1.0  # nothing was exported on the fly
    assert {(r["engine"], r["batch"], r["ratio_to_plain"]) for r in result["rows"]} == {
        ("onnxruntime", 1, None), ("onnxruntime", 2, None)}  # --baseline none: no plain cells, no ratios
