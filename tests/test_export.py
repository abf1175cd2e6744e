import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from extras import require
from mpsclip.export import aoti, export, verify
from mpsclip.export.__main__ import main
from mpsclip.export.onnx import mha_fast_path_disabled, transpose_after_matmul
from mpsclip.export.towers import build_tower, example_input
from onnx import helper, numpy_helper

from mpsclip.engines import load_engine
from mpsclip.errors import MPSCLIPError
from mpsclip.triton_config import QUEUE_DELAY_US
from tests.conftest import TINY
from tests.test_checkpoints import authors_state


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    return tiny_model.save(tmp_path_factory.mktemp("ckpt") / "tiny")


def _reference(model, tower, inputs):
    with torch.no_grad(), mha_fast_path_disabled():
        return build_tower(model, tower)(inputs).numpy()


@pytest.mark.slow
def test_onnx_fp32_parity_with_dynamic_batch(tiny_model, checkpoint, tmp_path):
    out = export(checkpoint, "onnx", tmp_path / "onnx")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arch"] == TINY and manifest["checkpoint"]["sha256"] and manifest["tokenizer"]["name"] == TINY
    engine = load_engine("onnxruntime", out, "cpu", checkpoint_sha256=manifest["checkpoint"]["sha256"])
    for tower in ("image", "text"):
        assert manifest["verification"][tower]["status"] == "verified"
        encode = getattr(engine, f"encode_{tower}")
        for batch in (1, 3):
            inputs = example_input(tiny_model, tower, batch, seed=7)
            max_abs, min_cos = verify.compare(_reference(tiny_model, tower, inputs), encode(inputs).numpy())
            assert max_abs <= 1e-4 and min_cos >= 0.99999, (tower, batch, max_abs, min_cos)


@pytest.mark.slow
def test_cli_exports_authors_pth(tiny_model, tmp_path, capsys):
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": authors_state(tiny_model), "config": {"is_mps": True}}, path)
    out = str(tmp_path / "out")
    rc = main(["--checkpoint", str(path), "--format", "onnx", "--out", out, "--arch", TINY, "--towers", "text"])
    assert rc == 0 and "text: max abs error" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "text_encoder.onnx"]


@pytest.mark.slow
def test_triton_repo_configs_parse(checkpoint, tmp_path):
    pb = require("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] provides Triton's ModelConfig")
    from google.protobuf import text_format

    out = export(checkpoint, "triton-repo", tmp_path / "repo", max_batch=64, opt_batch=16, verify=False)
    for tower, dim in (("image", [3, 224, 224]), ("text", [32])):
        config = text_format.Parse((out / f"{tower}_encoder" / "config.pbtxt").read_text(), pb.ModelConfig())
        assert config.max_batch_size == 64 and list(config.input[0].dims) == dim
        assert config.dynamic_batching.max_queue_delay_microseconds == QUEUE_DELAY_US
        assert list(config.dynamic_batching.preferred_batch_size) == []  # ONNX Runtime: the largest batch it can
        assert (out / f"{tower}_encoder" / "1" / "model.onnx").is_file()
    compile((out / "client_example.py").read_text(), "client_example.py", "exec")
    assert "tritonserver --model-repository" in (out / "README.md").read_text()


@pytest.mark.slow
def test_fp16_onnx_verified_on_onnxruntime_cpu(tiny_model, checkpoint, tmp_path):
    out = export(checkpoint, "onnx", tmp_path / "fp16", precision="fp16")
    manifest = json.loads((out / "manifest.json").read_text())
    engine = load_engine("onnxruntime", out, "cpu", precision="fp16")
    assert engine.precision == "fp16" and engine.dtype == torch.float16
    for tower in ("image", "text"):
        assert manifest["verification"][tower]["status"] == "verified"
        assert manifest["verification"][tower]["min_cosine"] >= 0.999
        inputs = example_input(tiny_model, tower, 2, seed=5)
        output = getattr(engine, f"encode_{tower}")(inputs)
        assert output.dtype == torch.float32
        assert verify.compare(_reference(tiny_model, tower, inputs), output.numpy())[1] >= 0.999


def _transpose_matmul_graph(dtype: type) -> onnx.ModelProto:
    """``MatMul(Transpose(x, perm=[1, 0, 2]), W)`` with a constant W: the graph ORT 1.32's CPU provider crashes on."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weight = np.random.default_rng(0).standard_normal((8, 4)).astype(dtype)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]), helper.make_node("MatMul", ["t", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", elem, [5, "batch", 8])],
        [helper.make_tensor_value_info("y", elem, ["batch", 5, 4])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_transpose_after_matmul_keeps_values():
    require("onnx.reference")
    from onnx.reference import ReferenceEvaluator

    model = _transpose_matmul_graph(np.float32)
    x = np.random.default_rng(1).standard_normal((5, 3, 8)).astype(np.float32)
    before = ReferenceEvaluator(model).run(None, {"x": x})[0]
    assert transpose_after_matmul(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Transpose"]
    np.testing.assert_allclose(ReferenceEvaluator(model).run(None, {"x": x})[0], before, rtol=1e-6)


def test_rewritten_fp16_graph_loads_in_onnxruntime_cpu(tmp_path):
    """The rewrite is what keeps the session alive; the session runs in a child so a regression cannot kill pytest."""
    model = _transpose_matmul_graph(np.float16)
    transpose_after_matmul(model)
    onnx.save(model, tmp_path / "fixed.onnx")
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "print(s.run(None, {'x': np.ones((5, 2, 8), np.float16)})[0].shape)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "fixed.onnx")], capture_output=True, text=True)
    assert done.returncode == 0 and "(2, 5, 4)" in done.stdout, (done.returncode, done.stderr[-500:])


@pytest.mark.skipif(
    os.environ.get("MPSCLIP_SKIP_AOTI") == "1", reason="MPSCLIP_SKIP_AOTI=1: skips the ~20-60 s C++ compile"
)
@pytest.mark.slow
def test_aoti_cpu_package_verified_and_loads_with_torch_only(tiny_model, checkpoint, tmp_path, capsys):
    """Slow (compiles C++ with Inductor, ~20-60 s on 2 cores): one tower, CPU, dynamic batch 1..4."""
    rc = main(["--checkpoint", str(checkpoint), "--format", "aoti", "--device", "cpu", "--towers", "image",
               "--opt-batch", "2", "--max-batch", "4", "--out", str(tmp_path / "aoti")])
    printed = capsys.readouterr()
    assert rc == 0 and "image (fresh process, torch only): max abs error" in printed.out
    assert "aoti: image tower: compiling for cpu" in printed.err and "No CUDA runtime" not in printed.err
    manifest = json.loads((tmp_path / "aoti" / "manifest.json").read_text())
    figures = manifest["verification"]["image"]
    assert manifest["device"] == "cpu" and figures["status"] == "verified" and figures["batches"] == [1, 3]
    assert figures["max_abs"] <= 1e-4 and figures["fresh_process"]["min_cosine"] >= 0.99999
    package = tmp_path / "aoti" / "image_encoder.pt2"
    inputs = [example_input(tiny_model, "image", b, seed=9).numpy() for b in (4, 2)]
    outputs = aoti.run_in_fresh_process(package, inputs)
    for batch, output in zip(inputs, outputs, strict=True):
        max_abs, min_cos = verify.compare(_reference(tiny_model, "image", torch.from_numpy(batch)), output)
        assert max_abs <= 1e-4 and min_cos >= 0.99999
    with pytest.raises(MPSCLIPError, match="fresh process"):
        aoti.run_in_fresh_process(tmp_path / "missing.pt2", inputs)
    engine = load_engine("aoti", tmp_path / "aoti", "cpu", checkpoint_sha256=manifest["checkpoint"]["sha256"])
    assert engine.kind == "aoti" and engine.batch_sizes == (1, 4) and engine.towers == {"image"}
    embedded = engine.encode_image(torch.from_numpy(inputs[1]))
    assert embedded.device.type == "cpu" and embedded.dtype == torch.float32
    assert verify.compare(_reference(tiny_model, "image", torch.from_numpy(inputs[1])), embedded.numpy())[0] <= 1e-4
    with pytest.raises(MPSCLIPError, match="outside the exported range"):
        engine.encode_image(torch.zeros(5, 3, 224, 224))


def test_describe_exit_names_the_signal():
    assert aoti.describe_exit(-11) == "killed by SIGSEGV" and aoti.describe_exit(2) == "exit status 2"


@pytest.mark.parametrize(("fmt", "kwargs"), [("tensorrt", {}), ("aoti", {"device": "cuda"})])
def test_gpu_formats_say_what_is_missing(checkpoint, tmp_path, fmt, kwargs):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(MPSCLIPError, match="GPU|mpsclip\\[gpu\\]"):
        export(checkpoint, fmt, tmp_path / fmt, **kwargs)
    assert not (tmp_path / fmt).exists()


def test_failed_verification_leaves_nothing(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(verify.TOLERANCES, "fp32", verify.Tolerance(min_cosine=1.1, max_abs=0.0))
    out = str(tmp_path / "out")
    rc = main(["--checkpoint", str(checkpoint), "--format", "onnx", "--out", out, "--towers", "image"])
    assert rc == 2 and "differs from PyTorch" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "bf16"}, "bf16"),
        ({"towers": ("audio",)}, "towers"),
        ({"min_batch": 0}, "batch"),
        ({"device": "cpu"}, "--device"),
    ],
)
def test_bad_arguments(checkpoint, tmp_path, kwargs, message):
    with pytest.raises(MPSCLIPError, match=message):
        export(checkpoint, "onnx", tmp_path / "out", **kwargs)


def test_compare_flags_a_flipped_row():
    ref = np.eye(2, dtype=np.float32)
    assert verify.compare(ref, ref * np.array([[1.0], [-1.0]], dtype=np.float32))[1] == pytest.approx(-1.0)
