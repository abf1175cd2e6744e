"""int8 towers (issue 23): quantization end to end (export, gate, embed, search) and a broken one refused.

The tiny model has random weights: its items' embeddings all lie within cosine ~0.9 of each other, so a top-10
list over near-duplicate store items is reshuffled by any int8 noise (overlap ~0.7 on 100 items). The end-to-end
test therefore sets ``mpsclip export --min-overlap 0.3`` (the flag users have too); the embedding-level floor keeps
its default, and it is what refuses the broken quantization below.
"""

from __future__ import annotations

import json
from pathlib import Path

import mpsclip.export as export_module
import numpy as np
import onnx
import pytest
import torch
from mpsclip.export import GateSettings, export
from mpsclip.export.calibration import load_calibration
from mpsclip.export.gate import run_gate
from mpsclip.export.quantize import node_classes, quantize_tower

from mpsclip.cli import main
from mpsclip.engines import load_engine
from mpsclip.errors import MPSCLIPError

pytest.importorskip("onnxruntime")

ITEMS = 30
TINY_MIN_OVERLAP = 0.3
TINY_GATE = GateSettings(store_items=60, queries=10, min_overlap=TINY_MIN_OVERLAP)


@pytest.fixture(scope="module")
def int8_dir(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "q8"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--precision", "int8", "--out", str(out),
                 "--calibration-items", str(ITEMS), "--gate-items", str(TINY_GATE.store_items),
                 "--min-overlap", str(TINY_MIN_OVERLAP)]) == 0
    return out


def test_int8_export_records_gate_and_fp32_layers(int8_dir: Path, tiny_model) -> None:
    manifest = json.loads((int8_dir / "manifest.json").read_text())
    assert manifest["precision"] == "int8"
    quantization = manifest["quantization"]
    assert quantization["gate"]["passed"] and quantization["calibration"]["synthetic"] == ["images", "captions"]
    for tower in ("image", "text"):
        kept = quantization["towers"][tower]["kept_fp32"]
        assert kept["layernorm"] > 0 and kept["softmax"] > 0 and kept["attention"] > 0
        assert quantization["towers"][tower]["quantized_nodes"] > 0
        assert quantization["gate"]["embedding"][tower]["held_back_min_cosine"] >= TINY_GATE.min_cosine
        assert manifest["verification"][tower]["by"] == "quality gate"
        graph = onnx.load(str(int8_dir / manifest["towers"][tower]["file"]))
        assert any(node.op_type == "QuantizeLinear" for node in graph.graph.node)
    assert quantization["gate"]["retrieval"]["store_items"] == TINY_GATE.store_items
    assert quantization["gate"]["settings"]["min_overlap"] == TINY_MIN_OVERLAP
    engine = load_engine("onnxruntime", int8_dir, "cpu", precision="int8")
    assert engine.precision == "int8"
    pixels = torch.randn(2, 3, tiny_model.image_size, tiny_model.image_size)
    out = engine.encode_image(pixels)
    assert out.shape == (2, tiny_model.embed_dim) and torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-4)
    with pytest.raises(MPSCLIPError, match="exported in int8, asked for fp32"):
        load_engine("onnxruntime", int8_dir, "cpu", precision="fp32")
    with pytest.raises(MPSCLIPError, match="mpsclip export"):
        load_engine("torch", tiny_model, "cpu", precision="int8")


def test_int8_store_records_precision_and_fp32_query_is_said(int8_dir, ckpt, synth, tmp_path, capsys) -> None:
    store = tmp_path / "store"
    rc = main(["embed", str(synth / "images"), "--out", str(store), "--checkpoint", str(ckpt), "--device", "cpu",
               "--engine", "onnxruntime", "--engine-dir", str(int8_dir), "--precision", "int8", "--workers", "0",
               "--quiet"])
    assert rc == 0
    assert json.loads((store / "manifest.json").read_text())["engine_precision"] == "int8"
    capsys.readouterr()
    assert main(["search", str(store), "an airport", "--device", "cpu", "-k", "3"]) == 0
    captured = capsys.readouterr()
    assert "embedded at int8, queries are encoded at fp32" in captured.err
    assert captured.out.strip()


def test_broken_gate_layer_is_refused(ckpt, tmp_path, monkeypatch, capsys) -> None:
    """The G²A gate's input forced to int8 with a scale 1000x too small: every value saturates."""

    def broken(fp32_path, out_path, inputs, keep_fp32=(), overrides=None):  # noqa: ANN001, ANN202
        model = onnx.load(str(fp32_path))
        names = set(node_classes(model)["g2a_gate"])
        gate_inputs = [n.input[0] for n in model.graph.node if n.name in names]
        scale, zero = np.array(1e-5, dtype=np.float32), np.array(128, dtype=np.uint8)
        bad = {name: [{"scale": scale, "zero_point": zero}] for name in gate_inputs}
        return quantize_tower(fp32_path, out_path, inputs, (), bad)

    monkeypatch.setattr(export_module, "quantize_tower", broken)
    out = tmp_path / "q8"
    with pytest.raises(MPSCLIPError, match="int8 quality gate missed, nothing was written") as err:
        export(ckpt, "onnx", out, precision="int8", towers=("image",), calibration_items=ITEMS, gate=TINY_GATE)
    assert "image tower: min cosine to fp32" in str(err.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_gate_figures_of_an_unquantized_copy_are_perfect(tiny_model, tmp_path) -> None:
    """The fp32 export through the same gate: cosine 1 and full overlap (the gate measures only the quantization)."""
    from mpsclip.export.onnx import write_onnx

    folder = tmp_path / "fp32"
    folder.mkdir()
    write_onnx(tiny_model, "text", folder / "text_encoder.onnx")
    (folder / "manifest.json").write_text(json.dumps({"precision": "fp32", "towers": {"text": {
        "file": "text_encoder.onnx"}}}))
    calibration = load_calibration(None, tiny_model.image_size, 10)
    figures = run_gate(tiny_model, load_engine("onnxruntime", folder, "cpu"), calibration,
                       GateSettings(store_items=20, queries=5))
    assert figures["passed"], figures["failures"]
    assert figures["embedding"]["text"]["calibration_min_cosine"] > 0.9999
    assert figures["retrieval"]["top_k_overlap"] == 1.0


@pytest.mark.slow
def test_bench_archive_sets_int8_against_fp32_on_the_same_source(int8_dir, ckpt, synth, tmp_path) -> None:
    fp32 = export(ckpt, "onnx", tmp_path / "fp32", towers=("image",), verify=False)
    out = tmp_path / "out"
    assert main(["bench", "archive", str(synth / "images"), "--checkpoint", str(ckpt), "--engine", "onnxruntime",
                 "--engine-dir", str(int8_dir), "--engine-dir", str(fp32), "--precision", "fp32,int8", "--batch", "4",
                 "--shard-size", "4", "--workers", "0", "--perspectives", "none", "--model-repeats", "2",
                 "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["precision"], r["workers"]) for r in rows] == [("fp32", None), ("int8", None), ("fp32", 0), ("int8", 0)]
    assert {r["engine"] for r in rows} == {"onnxruntime"} and rows[1]["engine_dir"] == str(int8_dir)
    assert rows[3]["items"] == 6 and rows[3]["failed"] == 0
    assert rows[3]["vs_first_engine"] == pytest.approx(rows[3]["items_per_s"] / rows[2]["items_per_s"], rel=1e-2)
    table = (out / "results.md").read_text()
    assert "| pipeline, perspectives=none, decode=cpu, workers=0, onnxruntime int8 |" in table


def test_bench_archive_engine_choices_are_checked(int8_dir) -> None:
    from mpsclip.bench.archive import ArchiveSettings, engine_choices

    def choices(**kw):  # noqa: ANN003, ANN202
        return engine_choices(ArchiveSettings(checkpoint=Path("m.safetensors"), **kw))

    assert choices(precisions=("fp32", "bf16")) == [(None, "fp32"), (None, "bf16")]
    assert choices(engine="onnxruntime", engine_dirs=(int8_dir,)) == [(int8_dir, "int8")]
    with pytest.raises(MPSCLIPError, match="--engine-dir is only used with"):
        choices(engine_dirs=(int8_dir,))
    with pytest.raises(MPSCLIPError, match="--engine onnxruntime needs --engine-dir"):
        choices(engine="onnxruntime")
    with pytest.raises(MPSCLIPError, match="--precision fp32: no --engine-dir was exported in fp32"):
        choices(engine="onnxruntime", engine_dirs=(int8_dir,), precisions=("fp32",))


def test_min_overlap_outside_0_to_1_is_refused(tmp_path, capsys) -> None:
    rc = main(["export", "--checkpoint", str(tmp_path / "m.safetensors"), "--format", "onnx", "--precision", "int8",
               "--out", str(tmp_path / "q8"), "--min-overlap", "95"])
    assert rc == 2 and "--min-overlap 95.0: give a fraction of the top-10 lists, 0 to 1" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_takes_an_fp32_and_an_int8_folder_of_one_engine(int8_dir, ckpt, tmp_path, capsys) -> None:
    fp32 = export(ckpt, "onnx", tmp_path / "fp32", towers=("image",), verify=False)
    out = tmp_path / "out"
    assert main(["bench", "--checkpoint", str(ckpt), "--engines", "onnxruntime", "--engine-dir",
                 f"onnxruntime:int8={int8_dir}", "--engine-dir", f"onnxruntime:fp32={fp32}", "--precision",
                 "fp32,int8", "--towers", "image", "--batch-sizes", "2", "--repeats", "2", "--baseline", "none",
                 "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())["engines"]
    assert [(r["precision"], r["source"], r["export_s"]) for r in records] == [
        ("fp32", str(fp32), None), ("int8", str(int8_dir), None)]
    assert main(["bench", "--checkpoint", str(ckpt), "--engine-dir", f"onnxruntime:int4={int8_dir}", "--out",
                 str(out)]) == 2
    assert "write KIND=DIR or KIND:PRECISION=DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_int8_gate_bench_searches_distinct_scenes(ckpt, tmp_path) -> None:
    from mpsclip.bench import int8_gate

    out = tmp_path / "gate"
    rc = int8_gate.main(["--checkpoint", str(ckpt), "--items", "20", "--queries", "5", "--calibration-items", "8",
                         "--min-overlap", "0.3", "--out", str(out)])
    result = json.loads((out / "results.json").read_text())
    gate = result["gate"]
    assert rc == (0 if gate["passed"] else 1) and result["calibration_items"] == 8
    assert (gate["retrieval"]["store_items"], gate["retrieval"]["queries"]) == (20, 5)
    assert set(gate["embedding"]) == {"image", "text"} and set(result["quantization"]) == {"image", "text"}
    assert "distinct synthetic scenes" in (out / "results.md").read_text()


@pytest.mark.slow
def test_int8_speed_bench_times_the_variants_it_fuses(tiny_model, tmp_path, monkeypatch) -> None:
    from mpsclip.bench import int8_speed
    from mpsclip.export.onnx import write_onnx

    fp32 = tmp_path / "text.onnx"
    write_onnx(tiny_model, "text", fp32)
    monkeypatch.setitem(int8_speed.GEMM_SHAPES, "text", ((8, 16, 16),))
    out = tmp_path / "out"
    assert int8_speed.main(["--onnx", f"text={fp32}", "--calibration", "8", "--rounds", "2", "--gemm-rounds", "2",
                            "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    text = result["towers"]["text"]
    assert list(text) == ["fp32", *int8_speed.VARIANTS] and text["fp32"]["ratio_to_fp32_p50"] == 1.0
    fused = {name: set(v["kernel_ms_per_op"]) for name, v in text.items()}
    assert "QLinearMatMul" in fused["qdq"] and "MatMulIntegerToFloat" in fused["qdq-float-out"]
    assert "DynamicQuantizeMatMul" in fused["dynamic"] and "QLinearMatMul" not in fused["fp32"]
    assert result["gemm"][0]["shape_mkn"] == [8, 16, 16] and isinstance(result["cpu_flags"]["avx2"], bool)
