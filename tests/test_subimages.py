import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mpsclip.cli import main
from mpsclip.data.synth import generate
from mpsclip.errors import MPSCLIPError
from mpsclip.subimages import langsam, load_items, mask_iou, shard, write_subimages
from mpsclip.subimages.oracle import OracleBackend
from mpsclip.subimages.saliency import SaliencyBackend, clean, saliency_masks


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, n_train=2, n_test=2, seed=0, workers=1)
    return out


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_oracle_writes_the_synth_subimages(synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "subs"
    code = main(
        [
            "subimages",
            str(synth / "test.json"),
            "--out",
            str(out),
            "--backend",
            "oracle",
            "--mask-root",
            str(synth / "masks"),
            "--quiet",
            "--score-against",
            str(synth / "masks"),
        ]
    )
    assert code == 0
    expected = sorted(p.relative_to(synth / "subimages") for p in (synth / "subimages").rglob("*.png"))
    test_stems = {Path(r["image"]).stem for r in json.loads((synth / "test.json").read_text())}
    expected = [p for p in expected if p.parts[0] in test_stems]
    written = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert written == expected and written
    for rel in written:
        assert np.array_equal(_pixels(out / rel), _pixels(synth / "subimages" / rel))
    assert mask_iou(out, synth / "masks", [(p.parts[0], p.name.removesuffix("_blackbg.png")) for p in written]) == 1.0


def test_resume_skips_existing(synth: Path, tmp_path: Path) -> None:
    items = load_items(synth / "train.json", synth)  # per-caption file: grouped per image
    assert len(items) == 2
    backend = OracleBackend(synth / "masks")
    first = write_subimages(items, backend, tmp_path)
    second = write_subimages(items, backend, tmp_path)
    assert first.written == first.keywords > 0 and first.failures == 0
    assert second.written == 0 and second.skipped == first.written


def test_sharding_is_disjoint(synth: Path) -> None:
    items = load_items(synth / "train.json", synth) + load_items(synth / "test.json", synth)
    parts = [shard(items, rank, 3) for rank in range(3)]
    names = [item.image for part in parts for item in part]
    assert sorted(names) == sorted(item.image for item in items) and len(set(names)) == len(names)
    with pytest.raises(MPSCLIPError):
        shard(items, 3, 3)


def test_failures_are_counted_and_the_run_goes_on(synth: Path, tmp_path: Path) -> None:
    items = load_items(synth / "test.json", tmp_path / "nowhere")
    summary = write_subimages(items, OracleBackend(synth / "masks"), tmp_path / "out")
    assert summary.written == 0 and summary.failures == summary.keywords > 0
    assert "image not found" in summary.format()


def test_clip_saliency_on_tiny_model(synth: Path, tmp_path: Path, tiny_model) -> None:
    items = load_items(synth / "test.json", synth)
    backend = SaliencyBackend(tiny_model, batch_size=2, k=0.0)
    summary = write_subimages(items, backend, tmp_path)
    assert summary.failures == 0 and summary.written + summary.empty == summary.keywords > 0
    for path in tmp_path.rglob("*_blackbg.png"):
        image = _pixels(synth / "images" / f"{path.parent.name}.png")
        assert _pixels(path).shape == image.shape
    iou = mask_iou(tmp_path, synth / "masks", [(item.stem, noun) for item in items for noun in item.nouns])
    assert 0.0 <= iou <= 1.0


def test_saliency_mask_threshold_and_cleaning() -> None:
    similarity = -np.ones((1, 7, 7), dtype=np.float32)
    similarity[0, 2:5, 2:5] = 1.0
    import torch

    masks = saliency_masks(torch.from_numpy(similarity), (70, 70), k=0.5, kernel=3)
    assert masks.shape == (1, 70, 70) and masks[0, 35, 35] and not masks[0, 2, 2]
    speck = torch.zeros(1, 1, 9, 9)
    speck[0, 0, 4, 4] = 1.0
    assert clean(speck, 3).sum() == 0


def test_langsam_missing_dependency_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(langsam, "module_available", lambda name: False)
    with pytest.raises(MPSCLIPError, match=r"mpsclip\[sam\]"):
        langsam.LangSamBackend()


def test_langsam_missing_checkpoint_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(langsam, "module_available", lambda name: True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(MPSCLIPError, match="--sam-checkpoint PATH"):
        langsam.LangSamBackend()
    with pytest.raises(MPSCLIPError, match="SAM checkpoint not found"):
        langsam.LangSamBackend(sam_checkpoint=tmp_path / "missing.pth")


def test_cli_saliency_needs_checkpoint(synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["subimages", str(synth / "test.json"), "--out", str(tmp_path), "--backend", "clip-saliency"])
    assert code == 2 and "--checkpoint" in capsys.readouterr().err


def test_langsam_offline_hub_is_a_clear_error(monkeypatch, tmp_path):
    import sys
    import types

    from mpsclip.subimages.langsam import build_langsam

    class LangSAM:
        def __init__(self, model_type: str = "vit_h", checkpoint: str | None = None) -> None:
            raise OSError("cannot find the requested files in the local cache")

    module = types.ModuleType("samgeo.text_sam")
    module.LangSAM = LangSAM
    monkeypatch.setitem(sys.modules, "samgeo", types.ModuleType("samgeo"))
    monkeypatch.setitem(sys.modules, "samgeo.text_sam", module)
    with pytest.raises(MPSCLIPError, match="could not load GroundingDINO"):
        build_langsam("vit_h", tmp_path / "sam.pth")
