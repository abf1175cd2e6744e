"""mpsclip bench: the results schema, the parity gate, skip reasons, --compare and the plots (tiny model, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import mpsclip.bench.engines as grid_module
import pytest
import torch
from mpsclip.bench.engines import GridSettings, skip_reason
from mpsclip.bench.report import PLOTS, SCHEMA
from mpsclip.bench.run import bench
from PIL import Image

from mpsclip.cli import main
from mpsclip.errors import MPSCLIPError

SETTINGS = GridSettings(engines=("torch", "onnxruntime", "tensorrt"), batch_sizes=(1, 2), device="cpu", repeats=2,
                        warmup=1)


@pytest.fixture(scope="module")
def run(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    return out, bench([ckpt], SETTINGS, out, progress=False)


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
    md = (out / "results.md").read_text()
    assert "Made by: `mpsclip" in md and "## MPS-Tiny, image tower" in md


def test_engine_that_cannot_run_is_listed_with_its_reason(run: tuple[Path, dict]) -> None:
    _, result = run
    trt = next(e for e in result["engines"] if e["engine"] == "tensorrt")
    assert trt["status"] == "skipped" and "CUDA" in trt["reason"]
    assert not [r for r in result["rows"] if r["engine"] == "tensorrt"]
    assert "fp32 on the CPU" in skip_reason("optimized", "fp16", torch.device("cpu"))
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in skip_reason("optimized", "fp16", torch.device("cuda"))
    assert "skipped: TensorRT" in (run[0] / "results.md").read_text()


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
    assert "not a mpsclip-bench/1 file" in capsys.readouterr().err


def test_cli_requires_out_and_checkpoint(ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--checkpoint", str(ckpt)]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert main(["bench", "--engines", "torch,nope", "--out", "x"]) == 2


def test_search_subverb_writes_its_results_and_needs_out(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "search", "--rows", "1500", "--dim", "32", "--queries", "4"]) == 2
    assert "--out" in capsys.readouterr().err
    args = ["bench", "search", "--rows", "1500", "--dim", "32", "--queries", "4", "--shard-size", "512"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "cpu-search.json").read_text())
    assert result["settings"]["rows"] == 1500 and result["rows"]
