"""The one engine seam: each kind loads or says why not, parity, manifests, devices, batch limits, precision."""

import json
import warnings

import pytest
import torch
from mpsclip.export import export
from mpsclip.export.towers import example_input

from mpsclip.choices import ENGINES
from mpsclip.engines import EXPORTED, embedding_precision, engine_availability, load_engine, runtime_engine
from mpsclip.engines.base import Engine
from mpsclip.errors import MPSCLIPError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def onnx_dir(ckpt, tmp_path_factory):
    return export(ckpt, "onnx", tmp_path_factory.mktemp("engines") / "onnx", min_batch=1, opt_batch=2, max_batch=4)


def _sha(folder):
    return json.loads((folder / "manifest.json").read_text())["checkpoint"]["sha256"]


@pytest.mark.parametrize("kind", ENGINES)
def test_each_kind_loads_or_says_why(kind, tiny_model, onnx_dir):
    reason = engine_availability(kind, "cpu")
    if kind == "tensorrt":
        assert reason and "CUDA" in reason
        with pytest.raises(MPSCLIPError, match="CUDA"):
            load_engine(kind, onnx_dir, "cpu")
        return
    assert reason is None
    if kind == "aoti":
        return  # loading needs a compiled package: tests/test_export.py covers it (~40 s)
    source = tiny_model if kind in ("torch", "optimized") else onnx_dir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optimize() warns that it runs plain PyTorch on the CPU
        engine = load_engine(kind, source, "cpu")
    assert isinstance(engine, Engine) and engine.kind == kind and engine.device == CPU
    assert engine.dtype == torch.float32 and engine.precision == "fp32" and engine.towers == {"image", "text"}


def test_eager_and_onnxruntime_agree_on_device_tensors(tiny_model, onnx_dir):
    eager = load_engine("torch", tiny_model, "cpu")
    ort = load_engine("onnxruntime", onnx_dir, "cpu", checkpoint_sha256=_sha(onnx_dir))
    for tower in ("image", "text"):
        x = example_input(tiny_model, tower, 3, seed=11)
        a, b = getattr(eager, f"encode_{tower}")(x), getattr(ort, f"encode_{tower}")(x)
        assert a.device == b.device == CPU and a.dtype == b.dtype == torch.float32 and a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-4), (tower, (a - b).abs().max())
        assert torch.allclose(b.norm(dim=-1), torch.ones(3), atol=1e-4)


def test_manifest_checksum_mismatch_refused(onnx_dir):
    with pytest.raises(MPSCLIPError, match="another checkpoint"):
        load_engine("onnxruntime", onnx_dir, "cpu", checkpoint_sha256="0" * 64)
    with pytest.raises(MPSCLIPError, match="no .pt2 tower"):
        load_engine("aoti", onnx_dir, "cpu")
    with pytest.raises(MPSCLIPError, match="exported in fp32"):
        load_engine("onnxruntime", onnx_dir, "cpu", precision="fp16")


def test_batch_limits_enforced(tiny_model, tmp_path, onnx_dir):
    folder = tmp_path / "limited"
    folder.mkdir()
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    manifest["towers"] = {"image": {"file": "image.pt2"}}
    (folder / "image.pt2").write_bytes(b"")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    from mpsclip.engines.base import check_input
    from mpsclip.engines.manifest import read_export

    info = read_export(folder, "aoti")
    assert info.batch_sizes == (1, 4) and set(info.files) == {"image"}

    class Limited:
        name, device, batch_sizes, towers = "limited", CPU, (1, 4), frozenset({"image"})

    with pytest.raises(MPSCLIPError, match=r"batch of 5 is outside the exported range \[1, 4\]"):
        check_input(Limited(), "image", torch.zeros(5, 3, 8, 8))
    with pytest.raises(MPSCLIPError, match="has no text tower"):
        check_input(Limited(), "text", torch.zeros(1, 8, dtype=torch.long))


def test_wrong_sources_and_kinds_refused(tiny_model, onnx_dir):
    with pytest.raises(MPSCLIPError, match="unknown engine"):
        load_engine("tflite", tiny_model, "cpu")
    with pytest.raises(MPSCLIPError, match="runs a loaded model"):
        load_engine("torch", onnx_dir, "cpu")
    with pytest.raises(MPSCLIPError, match="export` folder"):
        load_engine("onnxruntime", tiny_model, "cpu")


@pytest.mark.parametrize(
    ("kind", "device", "requested", "expected"),
    [
        ("optimized", "cuda", None, ("fp16", torch.float16, True)),
        ("optimized", "cpu", "fp16", ("fp32", torch.float32, False)),
        ("torch", "cuda", None, ("fp32", torch.float32, False)),
        ("torch", "cuda", "bf16", ("bf16", torch.bfloat16, True)),
        ("torch", "cpu", None, ("fp32", torch.float32, False)),
        ("tensorrt", "cuda", "fp16", ("fp16", torch.float16, True)),
        ("onnxruntime", "cpu", "fp16", ("fp16", torch.float16, False)),
    ],
)
def test_one_precision_per_path(kind, device, requested, expected):
    plan = embedding_precision(kind, device, requested)
    assert (plan.precision, plan.dtype, plan.autocast) == expected
    # the fp16 fast runtime is never wrapped in an autocast of another dtype
    assert not (kind == "optimized" and plan.autocast and plan.dtype != torch.float16 and requested is None)


def test_engines_shield_their_precision_from_outer_autocast(tiny_model):
    """The composition issue 16 names: an engine called inside a bf16 autocast still runs its own precision."""
    eager = load_engine("torch", tiny_model, "cpu")
    x = example_input(tiny_model, "image", 2, seed=3)
    plain = eager.encode_image(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = load_engine("optimized", tiny_model, "cpu", precision="fp16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shielded = optimized.encode_image(x)
    assert shielded.dtype == torch.float32 and torch.allclose(shielded, plain, atol=1e-5)


def test_embed_runtime_choice(tiny_model, onnx_dir, monkeypatch):
    engine = runtime_engine("torch", tiny_model, CPU, None, "x")
    assert engine.kind == "torch" and engine.precision == "fp32"
    with pytest.raises(MPSCLIPError, match="needs --engine"):
        runtime_engine("onnxruntime", tiny_model, CPU, None, "x")
    with pytest.raises(MPSCLIPError, match="tensorrt engine cannot run on cpu"):
        runtime_engine("tensorrt", tiny_model, CPU, onnx_dir, _sha(onnx_dir))
    assert runtime_engine("onnxruntime", tiny_model, CPU, onnx_dir, _sha(onnx_dir)).kind == "onnxruntime"


def test_embedder_applies_the_decided_precision(tiny_model, monkeypatch):
    """On CUDA the embedder runs the fp16 optimized engine under fp16 autocast, never bf16 (decided on the CPU)."""
    from mpsclip.archive import embedder as embedder_module

    seen = {}

    def fake_runtime_engine(runtime, model, device, export_dir, sha, precision=None):
        seen["kind"] = "optimized" if device.type == "cuda" else "torch"
        engine = load_engine("torch", model, CPU)
        engine.kind, engine.precision = "optimized", "fp16"
        return engine

    monkeypatch.setattr(embedder_module, "runtime_engine", fake_runtime_engine)
    monkeypatch.setattr(embedder_module, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
    monkeypatch.setattr(embedder_module.Embedder, "_probe_dims", lambda self: (0, 0))
    settings = embedder_module.EmbedSettings(device="cuda", decode="cpu")
    emb = embedder_module.Embedder(tiny_model, settings, "x")
    assert seen["kind"] == "optimized"
    assert (emb.precision.dtype, emb.precision.autocast) == (torch.float16, True)


def test_exported_kinds_are_listed():
    assert set(EXPORTED) <= set(ENGINES)


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path, capsys):
    """``python -m mpsclip.bench.gpu --device cpu``: a subset runs, CUDA-only checks SKIP with a reason."""
    from mpsclip.bench import gpu

    argv = ["--out", str(tmp_path), "--device", "cpu", "--checks", "embed,search,maxsim,aoti-cuda",
            "--engines", "torch,tensorrt", "--sources", "jpeg,wds", "--images", "4", "--batch", "4"]
    assert gpu.main(argv) == 0
    report = json.loads((tmp_path / "gpu-checks.json").read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status["setup"] == status["embed/torch/device/wds"] == status["search/fused"] == status["maxsim"] == "PASS"
    assert status["embed/tensorrt/cpu/jpeg"] == status["aoti-cuda"] == "SKIP"
    assert report["checks"][1]["details"]["global_min_cosine"] == 1.0
    out = capsys.readouterr().out
    assert "PASS maxsim" in out and "SKIP aoti-cuda" in out and '"counts"' in out


@pytest.mark.slow
def test_gpu_check_isolates_a_failing_check(tmp_path, monkeypatch, capsys):
    from mpsclip.bench import gpu

    def broken(fx):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu, "check_maxsim", broken)
    rc = gpu.main(["--out", str(tmp_path), "--device", "cpu", "--checks", "maxsim,optimize", "--images", "2"])
    status = {c["name"]: c["status"] for c in json.loads((tmp_path / "gpu-checks.json").read_text())["checks"]}
    assert rc == 1 and status == {"setup": "PASS", "maxsim": "FAIL", "optimize": "PASS"}
    assert "FAIL maxsim" in capsys.readouterr().out
