"""The per-shard embedding pipeline: zero-shot perspectives, image-tower runtimes and on-device JPEG decoding."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from extras import require
from kills import killed_after_shards
from PIL import Image

from mpsclip.archive.embedder import jpeg_pixels
from mpsclip.archive.job import EmbedSettings, embed_archive
from mpsclip.archive.perspectives import ZeroShotPerspectives, ZeroShotSettings
from mpsclip.archive.store_reader import StoreData, load_store
from mpsclip.cli import main
from mpsclip.data.transforms import eval_transform
from mpsclip.errors import MPSCLIPError
from mpsclip.model import MPSCLIP

SMALL = EmbedSettings(batch_size=3, shard_size=4, workers=0, device="cpu")
# a random tiny model scores the vocabulary almost uniformly: no probability threshold, so it picks nouns
ZERO_SHOT = dataclasses.replace(SMALL, perspectives="zero-shot", zero_shot=ZeroShotSettings(top_k=2, threshold=0.0))


@pytest.fixture(scope="module")
def jpegs(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic scenes as JPEG files of assorted sizes."""
    out = tmp_path_factory.mktemp("jpegs")
    for i, png in enumerate(sorted((synth / "images").glob("*.png"))):
        with Image.open(png) as image:
            image.convert("RGB").resize((64 + 16 * i, 64)).save(out / f"{png.stem}.jpg", quality=90)
    return out


def _global(data: StoreData) -> torch.Tensor:
    return torch.from_numpy(data.columns["global"]).float()


def _embeddings(store: Path) -> dict[str, np.ndarray]:
    return {name: values.astype(np.float32) for name, values in load_store(store).columns.items()}


def test_jpeg_pixels_match_the_pil_transform(jpegs: Path) -> None:
    path = sorted(jpegs.glob("*.jpg"))[2]
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    (ours,) = jpeg_pixels([data], 224, torch.device("cpu"))
    with Image.open(path) as image:
        reference = eval_transform(224)(image)
    assert isinstance(ours, torch.Tensor) and ours.shape == reference.shape
    # decoders and resize kernels differ by a few grey levels (normalised units: 1/255/0.27 ≈ 0.015 per level)
    assert (ours - reference).abs().mean() < 0.05
    broken = jpeg_pixels([data, torch.frombuffer(bytearray(b"\xff\xd8 not a jpeg"), dtype=torch.uint8)], 224,
                         torch.device("cpu"))
    assert isinstance(broken[0], torch.Tensor) and isinstance(broken[1], str)


@pytest.mark.slow
def test_device_decoding_gives_the_same_store_layout_and_close_vectors(jpegs: Path, ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    for path in jpegs.glob("*.jpg"):
        (tmp_path / "src" / path.name).write_bytes(path.read_bytes())
    (tmp_path / "src" / "truncated.jpg").write_bytes(next(jpegs.glob("*.jpg")).read_bytes()[:200])
    embed_archive(tmp_path / "src", tmp_path / "pil", ckpt, settings=SMALL, progress=False)
    device = dataclasses.replace(SMALL, decode="device")
    embed_archive(tmp_path / "src", tmp_path / "dev", ckpt, settings=device, progress=False)
    pil, dev = load_store(tmp_path / "pil"), load_store(tmp_path / "dev")
    assert pil.ids == dev.ids and "truncated.jpg" not in dev.ids and len(dev.ids) == 6
    failures = [json.loads(line) for line in (tmp_path / "dev" / "failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failures] == ["truncated.jpg"]
    cosine = torch.nn.functional.cosine_similarity(_global(pil), _global(dev), dim=-1)
    assert cosine.min() > 0.99
    assert json.loads((tmp_path / "dev" / "manifest.json").read_text())["decode"] == "device"
    with pytest.raises(MPSCLIPError, match="decode"):  # resuming with the other decoder would mix vectors
        embed_archive(tmp_path / "src", tmp_path / "dev", ckpt, settings=SMALL, progress=False)


@pytest.mark.slow
def test_zero_shot_perspectives_cut_masked_sub_images(tiny_model: MPSCLIP) -> None:
    torch.manual_seed(0)
    images = torch.randn(3, 3, 224, 224)
    cut = ZeroShotPerspectives(tiny_model, ZeroShotSettings(top_k=2, threshold=0.0), torch.device("cpu"))(images)
    assert cut.regions.shape == (3, 2, 3, 224, 224) and cut.mask.shape == (3, 2)
    assert [len(nouns) for nouns in cut.keywords] == cut.mask.sum(dim=1).tolist()
    assert cut.mask.any(), "a random model still finds salient blobs for its top nouns"
    b, r = cut.mask.nonzero()[0].tolist()
    region, image = cut.regions[b, r], images[b]
    kept = (region == image).all(dim=0)
    black = torch.tensor([-1.7923, -1.7521, -1.4802]).view(3, 1)  # CLIP-normalised black
    assert 0 < kept.float().mean() < 1
    assert torch.allclose(region[:, ~kept], black.expand(3, int((~kept).sum())), atol=1e-3)
    glob = tiny_model.encode_image(images)
    assert torch.allclose(cut.glob, glob, atol=1e-5)
    none = ZeroShotPerspectives(tiny_model, ZeroShotSettings(top_k=2, threshold=0.9), torch.device("cpu"))(images)
    assert not none.mask.any() and none.keywords == [[], [], []]


@pytest.mark.slow
def test_zero_shot_store_has_keywords_and_is_resumable(jpegs: Path, ckpt: Path, tmp_path: Path) -> None:
    embed_archive(jpegs, tmp_path / "full", ckpt, settings=ZERO_SHOT, progress=False)
    with killed_after_shards(1):
        embed_archive(jpegs, tmp_path / "part", ckpt, settings=ZERO_SHOT, progress=False)
    embed_archive(jpegs, tmp_path / "part", ckpt, settings=ZERO_SHOT, progress=False)
    for name in ("shard-00000.parquet", "shard-00001.parquet", "manifest.json"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "part" / name).read_bytes()
    data = load_store(tmp_path / "full")
    with_sub_images = [bool(v) for v in data.columns["valid"][:, 0]]
    assert with_sub_images == [bool(meta["keywords"]) for meta in data.metas]
    assert any(with_sub_images)
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["perspectives"] == "zero-shot" and manifest["zero_shot"]["top_k"] == 2
    assert manifest["zero_shot"]["vocabulary_nouns"] > 100
    other = dataclasses.replace(ZERO_SHOT, zero_shot=ZeroShotSettings(top_k=3, threshold=0.0))
    with pytest.raises(MPSCLIPError, match="zero_shot"):
        embed_archive(jpegs, tmp_path / "full", ckpt, settings=other, progress=False)


@pytest.mark.slow
def test_zero_shot_changes_only_the_sub_image_side(jpegs: Path, ckpt: Path, tmp_path: Path) -> None:
    embed_archive(jpegs, tmp_path / "none", ckpt, settings=SMALL, progress=False)
    embed_archive(jpegs, tmp_path / "zs", ckpt, settings=ZERO_SHOT, progress=False)
    none, zs = _embeddings(tmp_path / "none"), _embeddings(tmp_path / "zs")
    np.testing.assert_allclose(none["global"], zs["global"], atol=2e-3)  # same global embeddings (fp16 store)
    has = zs["valid"][:, 0] > 0
    assert not np.allclose(none["retrieval"][has], zs["retrieval"][has], atol=1e-2)


@pytest.mark.slow
def test_onnxruntime_runtime_matches_torch(jpegs: Path, ckpt: Path, tmp_path: Path) -> None:
    require("onnxruntime")
    from mpsclip.export import export

    engine = export(ckpt, "onnx", tmp_path / "engine", towers=("image",), max_batch=8, opt_batch=4)
    embed_archive(jpegs, tmp_path / "torch", ckpt, settings=SMALL, progress=False)
    ort = dataclasses.replace(SMALL, engine="onnxruntime", engine_dir=engine)
    embed_archive(jpegs, tmp_path / "ort", ckpt, settings=ort, progress=False)
    a, b = _embeddings(tmp_path / "torch"), _embeddings(tmp_path / "ort")
    for name in ("retrieval", "global", "perspectives"):
        np.testing.assert_allclose(a[name], b[name], atol=2e-3)
    assert json.loads((tmp_path / "ort" / "manifest.json").read_text())["runtime"] == "onnxruntime"


def test_runtime_errors(jpegs: Path, ckpt: Path, tiny_model: MPSCLIP, tmp_path: Path) -> None:
    with pytest.raises(MPSCLIPError, match="needs --engine"):
        embed_archive(jpegs, tmp_path / "a", ckpt, settings=dataclasses.replace(SMALL, engine="onnxruntime"))
    fake = tmp_path / "engine"
    fake.mkdir()
    (fake / "manifest.json").write_text(json.dumps({"checkpoint": {"sha256": "0" * 64}, "towers": {}}))
    with pytest.raises(MPSCLIPError, match="another checkpoint"):
        settings = dataclasses.replace(SMALL, engine="onnxruntime", engine_dir=fake, precision="fp32")
        embed_archive(jpegs, tmp_path / "b", ckpt, settings=settings, progress=False)
    with pytest.raises(MPSCLIPError, match="has no .onnx tower"):  # the store's identity reads the folder first
        settings = dataclasses.replace(SMALL, engine="onnxruntime", engine_dir=fake)
        embed_archive(jpegs, tmp_path / "b", ckpt, settings=settings, progress=False)
    with pytest.raises(MPSCLIPError, match="only used with --engine"):
        embed_archive(jpegs, tmp_path / "c", ckpt, settings=dataclasses.replace(SMALL, engine_dir=fake), progress=False)


@pytest.mark.slow
def test_cli_zero_shot(jpegs: Path, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["embed", str(jpegs), "--out", str(tmp_path / "s"), "--checkpoint", str(ckpt), "--device", "cpu"]
    args += ["--perspectives", "zero-shot", "--keywords-threshold", "0", "--workers", "0", "--quiet"]
    assert main(args) == 0
    assert "6 of 6 items embedded" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["zero_shot"]["threshold"] == 0.0


@pytest.mark.slow
def test_device_decoding_reads_jpeg_members_of_tar_shards(jpegs: Path, ckpt: Path, tmp_path: Path) -> None:
    import tarfile

    with tarfile.open(tmp_path / "shard-0000.tar", "w") as tar:
        for path in sorted(jpegs.glob("*.jpg")):
            tar.add(path, arcname=path.name)
    shard = tmp_path / "shard-0000.tar"
    embed_archive(shard, tmp_path / "pil", ckpt, settings=SMALL, progress=False)
    embed_archive(shard, tmp_path / "dev", ckpt, settings=dataclasses.replace(SMALL, decode="device"), progress=False)
    pil, dev = load_store(tmp_path / "pil"), load_store(tmp_path / "dev")
    assert pil.ids == dev.ids and len(dev.ids) == 6
    assert torch.nn.functional.cosine_similarity(_global(pil), _global(dev), dim=-1).min() > 0.99


def test_zero_shot_needs_patch_tokens() -> None:
    from mpsclip.priorclip import PriorCLIP

    prior = PriorCLIP("PriorCLIP-Tiny", "rank", res_layers=(1, 1, 1, 1), res_width=8)
    with pytest.raises(MPSCLIPError, match="needs an MPS-CLIP model"):
        ZeroShotPerspectives(prior, ZeroShotSettings(), torch.device("cpu"))
