import json

import numpy as np
import onnxruntime
import pytest
import torch
from mpsclip.export import OrtEncoder, export, verify
from mpsclip.export.__main__ import main
from mpsclip.export.onnx import mha_fast_path_disabled
from mpsclip.export.towers import build_tower, example_input

from mpsclip.errors import MPSCLIPError
from tests.conftest import TINY
from tests.test_checkpoints import authors_state


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    return tiny_model.save(tmp_path_factory.mktemp("ckpt") / "tiny")


def _reference(model, tower, inputs):
    with torch.no_grad(), mha_fast_path_disabled():
        return build_tower(model, tower)(inputs).numpy()


def test_onnx_fp32_parity_with_dynamic_batch(tiny_model, checkpoint, tmp_path):
    out = export(checkpoint, "onnx", tmp_path / "onnx")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arch"] == TINY and manifest["checkpoint"]["sha256"] and manifest["tokenizer"]["name"] == TINY
    for tower in ("image", "text"):
        assert manifest["verification"][tower]["status"] == "verified"
        encoder = OrtEncoder(out / manifest["towers"][tower]["file"])
        for batch in (1, 3):
            inputs = example_input(tiny_model, tower, batch, seed=7)
            max_abs, min_cos = verify.compare(_reference(tiny_model, tower, inputs), encoder(inputs.numpy()))
            assert max_abs <= 1e-4 and min_cos >= 0.99999, (tower, batch, max_abs, min_cos)


def test_cli_exports_authors_pth(tiny_model, tmp_path, capsys):
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": authors_state(tiny_model), "config": {"is_mps": True}}, path)
    rc = main([str(path), "--format", "onnx", "--out", str(tmp_path / "out"), "--arch", TINY, "--towers", "text"])
    assert rc == 0 and "text: max abs error" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "text_encoder.onnx"]


def test_triton_repo_configs_parse(checkpoint, tmp_path):
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] provides Triton's ModelConfig protobuf")
    from mpsclip.export.triton_repo import parse_config

    out = export(checkpoint, "triton-repo", tmp_path / "repo", max_batch=64, opt_batch=16, verify=False)
    for tower, dim in (("image", [3, 224, 224]), ("text", [32])):
        config = parse_config((out / f"{tower}_encoder" / "config.pbtxt").read_text())
        assert config.max_batch_size == 64 and list(config.input[0].dims) == dim
        assert list(config.dynamic_batching.preferred_batch_size) == [16, 64]
        assert (out / f"{tower}_encoder" / "1" / "model.onnx").is_file()
    compile((out / "client_example.py").read_text(), "client_example.py", "exec")
    assert "tritonserver --model-repository" in (out / "README.md").read_text()


def test_fp16_onnx_is_not_reported_verified_without_cuda(checkpoint, tmp_path):
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA provider present: fp16 verification runs")
    out = export(checkpoint, "onnx", tmp_path / "fp16", precision="fp16", towers=("text",))
    assert json.loads((out / "manifest.json").read_text())["verification"]["text"]["status"] == "not-run"


@pytest.mark.parametrize("fmt", ["tensorrt", "aoti"])
def test_gpu_formats_say_what_is_missing(checkpoint, tmp_path, fmt):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(MPSCLIPError, match="GPU|mpsclip\\[gpu\\]"):
        export(checkpoint, fmt, tmp_path / fmt)
    assert not (tmp_path / fmt).exists()


def test_failed_verification_leaves_nothing(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(verify.TOLERANCES, "fp32", verify.Tolerance(min_cosine=1.1, max_abs=0.0))
    rc = main([str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "out"), "--towers", "image"])
    assert rc == 2 and "differs from PyTorch" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"precision": "bf16"}, "bf16"), ({"towers": ("audio",)}, "towers"), ({"min_batch": 0}, "batch")],
)
def test_bad_arguments(checkpoint, tmp_path, kwargs, message):
    with pytest.raises(MPSCLIPError, match=message):
        export(checkpoint, "onnx", tmp_path / "out", **kwargs)


def test_compare_flags_a_flipped_row():
    ref = np.eye(2, dtype=np.float32)
    assert verify.compare(ref, ref * np.array([[1.0], [-1.0]], dtype=np.float32))[1] == pytest.approx(-1.0)
